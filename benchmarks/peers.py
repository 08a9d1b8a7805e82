"""Peers on the same work (issue 5, item 3): other ways to hit a target entropy per row.

All solve the same random problem (N(0, 1) logits, per-row targets in [0.2, 0.8]·log n) and are
timed side by side; each reports the accuracy it reached, max |H - target| in float64.

* ``entropy_softmax``: the core (implicit derivative);
* ``unrolled autodiff``: plain Newton steps from the core's first guess, differentiated through
  every step, as many as reach the core's accuracy (gradient only);
* ``optimistix Newton``: ``optimistix.root_find`` + ``optimistix.Newton`` under ``vmap``, from
  the core's first guess, stopped at the core's accuracy; its gradient uses optimistix's
  ``ImplicitAdjoint``;
* ``bisection``: the t-SNE perplexity search from γ = 1 (double/halve, then bisect), with the
  fewest iterations that reach the core's accuracy on this problem;
* ``scipy brentq``: what a scientist writes on the CPU: NumPy float64, ``scipy.optimize.brentq``
  row by row (timed on a subset of rows and scaled to the batch; not jitted, single thread).

Run ``python -m benchmarks.peers [--quick]``.
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

import entnorm_jax as en
from benchmarks import common
from benchmarks.accuracy import bisection_path
from benchmarks.core import (
  _unrolled_steps,
  entropy_error,
  optimistix_entropy_softmax,
  random_problem,
  unrolled_entropy_softmax,
)

SHAPES = {True: (64, 1024), False: (256, 4096)}  # quick -> problem shape


def bisection_entropy_softmax(x: jax.Array, target: jax.Array, num_iters: int) -> jax.Array:
  """softmax(γ·x) with γ from ``num_iters`` steps of the t-SNE search."""
  gamma = bisection_path(x, target, num_iters)[-1]
  return jax.nn.softmax(gamma[:, None] * x, axis=-1)


def _row_entropy64(gamma: float, d: np.ndarray) -> float:
  """H(softmax(γ·d)) of one row, in float64."""
  e = np.exp(gamma * d - np.max(gamma * d))
  return float(common.entropy64(e / e.sum()))


def brentq_gamma(x: np.ndarray, target: np.ndarray, *, xtol: float = 1e-12) -> np.ndarray:
  """Per-row ``scipy.optimize.brentq`` on H(γ) - H_t over γ in [0, γ_hi] (NumPy float64)."""
  out = np.empty(len(x))
  for i, (row, t) in enumerate(zip(x, target, strict=True)):
    d = row - row.max()
    hi = 1.0
    while _row_entropy64(hi, d) > t:  # expand the bracket until H(hi) <= target
      hi *= 2.0
    out[i] = optimize.brentq(lambda g, d=d, t=t: _row_entropy64(g, d) - t, 0.0, hi, xtol=xtol)
  return out


def _bisection_iters(x, target, tol: float, max_iters: int = 80) -> int:
  path = jax.jit(bisection_path, static_argnums=2)(x, target, max_iters)
  for k in range(max_iters):
    q = jax.nn.softmax(path[k][:, None] * x, axis=-1)
    if entropy_error(q, target) <= tol:
      return k + 1
  return max_iters


def run(quick: bool = False) -> dict:
  """Times every peer on one problem; JSON-serializable figures."""
  shape = SHAPES[quick]
  x, target, w = random_problem(1, shape, scale=1.0, fractions=(0.2, 0.8))
  err_core = entropy_error(en.entropy_softmax(x, target), target)
  tol = max(err_core, 1e-6)
  num_iters = _unrolled_steps(x, target, tol)
  bis_iters = _bisection_iters(x, target, tol)
  loss = lambda f: lambda x, t, w: jnp.sum(w * f(x, t))
  fwd = {
    "entropy_softmax": lambda x, t: en.entropy_softmax(x, t),
    "optimistix Newton": functools.partial(optimistix_entropy_softmax, atol=tol),
    "bisection (t-SNE)": lambda x, t: bisection_entropy_softmax(x, t, bis_iters),
  }
  grads = {
    "entropy_softmax": jax.grad(loss(fwd["entropy_softmax"])),
    "unrolled autodiff": jax.grad(loss(lambda x, t: unrolled_entropy_softmax(x, t, num_iters))),
    "optimistix Newton": jax.grad(loss(fwd["optimistix Newton"])),
  }
  compiled = {
    f"forward {k}": (common.compile_ahead(f, x, target), (x, target)) for k, f in fwd.items()
  }
  compiled |= {
    f"grad {k}": (common.compile_ahead(f, x, target, w), (x, target, w)) for k, f in grads.items()
  }
  times = common.time_calls(
    compiled,
    repeats=5 if quick else 11,
    max_total_s=10 if quick else 60,
    warmup_s=common.warmup_s(quick),
  )
  errors = {k: entropy_error(compiled[f"forward {k}"][0](x, target), target) for k in fwd}

  rows = min(8 if quick else 32, shape[0])
  x64, t64 = np.asarray(x[:rows], np.float64), np.asarray(target[:rows], np.float64)
  samples = []
  for _ in range(3):
    start = time.perf_counter()
    gamma = brentq_gamma(x64, t64)
    samples.append((time.perf_counter() - start) / rows * shape[0])
  q = jax.nn.softmax(jnp.asarray(gamma)[:, None] * jnp.asarray(x64), axis=-1)
  errors["scipy brentq"] = entropy_error(q, t64)
  times["forward scipy brentq"] = {
    "median_s": float(np.median(samples)),
    "q25_s": float(np.min(samples)),
    "q75_s": float(np.max(samples)),
    "min_s": float(np.min(samples)),
    "samples": len(samples),
    "calls_per_sample": 1,
    "rows_timed": rows,
  }
  base = times["forward entropy_softmax"]["median_s"]
  gbase = times["grad entropy_softmax"]["median_s"]
  ratios = {k: v["median_s"] / (gbase if k.startswith("grad") else base) for k, v in times.items()}
  return {
    "name": "peers",
    "quick": quick,
    "shape": list(shape),
    "unrolled_steps": num_iters,
    "bisection_iters": bis_iters,
    "tolerance": tol,
    "times": times,
    "ratio_to_entropy_softmax": ratios,
    "error": errors,
  }


def markdown(result: dict) -> str:
  """One table: median time, spread, ratio to the core and the accuracy reached."""
  shape = "×".join(map(str, result["shape"]))
  rows = []
  for name, t in result["times"].items():
    method = name.split(" ", 1)[1]
    err = result["error"].get(method)
    rows.append(
      [
        name,
        common.fmt_time(t["median_s"]),
        f"{common.fmt_time(t['q25_s'])} – {common.fmt_time(t['q75_s'])}",
        f"{result['ratio_to_entropy_softmax'][name]:.2f}",
        "" if err is None or name.startswith("grad") else f"{err:.1e}",
      ]
    )
  text = common.markdown_table(["function", "median", "spread", "× ours", "max |H − t|"], rows)
  return (
    f"## Peers on [{shape}] (float32; brentq float64 NumPy, per row, scaled from "
    f"{result['times']['forward scipy brentq']['rows_timed']} rows)\n\n{text}\n\n"
    f"bisection uses {result['bisection_iters']} iterations to reach "
    f"{result['tolerance']:.1e}; ratios of gradients are to the core's gradient.\n"
  )


def plot(result: dict, out_dir) -> list[pathlib.Path]:
  """Horizontal bars of median time per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(result["times"])
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.0))
  ax.barh(names, [result["times"][n]["median_s"] * 1e3 for n in names], color="tab:blue")
  ax.set_xscale("log")
  ax.set_xlabel("median time per call (ms)", fontsize=9)
  ax.tick_params(labelsize=8)
  fig.tight_layout()
  ax.set_title(
    f"peers on {'×'.join(map(str, result['shape']))}, {jax.default_backend()}", fontsize=9
  )
  return [common.write_figure(fig, pathlib.Path(out_dir) / "peers.png")]


def main(argv=None) -> None:
  common.module_main("peers", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

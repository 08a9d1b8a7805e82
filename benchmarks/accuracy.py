"""Accuracy vs cost (issue 5, item 2): |H - target| after 1, 2, 3, ... passes over the data.

Methods, all vectorized over rows and run in JAX:

* ``core``: ``en.solve_gamma(..., num_iters=k)`` (safeguarded third-order steps from a
  model-based first guess). It reads the data once for its exp-free statistics, once to evaluate
  the first guess, then once per step, so ``k`` steps cost ``k + 2`` passes; the default
  adaptive solve is reported beside it (its passes vary by row block);
* ``seed Newton``: the seed's iteration from γ = 1, ``γ ← γ + (H - H_t) / (γ V)`` (the same as
  ``p ← p^γ'`` with ``γ' = 1 + (H_t - H) / (H² - Σ p log² p)``); one pass per iteration;
* ``bisection``: the t-SNE perplexity search (γ = 1, double/halve until bracketed, then bisect);
  one pass per iteration.

Error = |H(softmax(γ·z)) - H_t| evaluated in float64 with NumPy, reported per family of logits as
the maximum (and median) over rows and targets. A negative or NaN γ (the seed's Newton can
overshoot through 0) counts as a failure (error = inf). Targets are fractions 0.05 … 0.99 of
log n. float32 solves are measured, and float64 ones too outside ``--quick``.

Run ``python -m benchmarks.accuracy [--quick]``.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import entnorm_jax as en
from benchmarks import common

FRACTIONS = (0.05, 0.2, 0.5, 0.8, 0.95, 0.99)
FAMILIES = (
  "gauss 0.1",
  "gauss 1",
  "gauss 10",
  "seed p~U(0,1)",
  "log-uniform",
  "gumbel",
  "zipf-like",
  "near-ties",
)
# quick -> (rows per family and target, row length, iterations)
SIZES = {True: (4, 256, 6), False: (32, 1000, 14)}


def family_logits(name: str, rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
  """``[rows, n]`` float64 logits of one family (random, never constant).

  Families: Gaussian with scale 0.1/1/10; the seed's p ~ U(0, 1) (logits log p); log-uniform
  probabilities over 8 decades (logits uniform in [-8 ln 10, 0]); Gumbel; Zipf-like
  (p_i ∝ rank^-1.1, shuffled); near-ties (4 entries within 1e-3 of the maximum above N(0, 1)).
  """
  if name.startswith("gauss"):
    return float(name.split()[1]) * rng.standard_normal((rows, n))
  if name == "seed p~U(0,1)":
    return np.log(rng.uniform(1e-12, 1.0, (rows, n)))
  if name == "log-uniform":
    return rng.uniform(-8 * np.log(10.0), 0.0, (rows, n))
  if name == "gumbel":
    return rng.gumbel(size=(rows, n))
  if name == "zipf-like":
    z = -1.1 * np.log(np.arange(1, n + 1, dtype=np.float64))
    return rng.permuted(np.broadcast_to(z, (rows, n)), axis=1)
  if name == "near-ties":
    z = rng.standard_normal((rows, n))
    top = z.max(axis=1, keepdims=True) + 1.0
    z[:, :4] = top - rng.uniform(0.0, 1e-3, (rows, 4))
    return z
  raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")


def problem(rows: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All families × targets stacked: logits ``[F·T·rows, n]``, targets, family index."""
  rng = np.random.default_rng(seed)
  xs, ts, fam = [], [], []
  for i, name in enumerate(FAMILIES):
    for frac in FRACTIONS:
      xs.append(family_logits(name, rng, rows, n))
      ts.append(np.full(rows, frac * np.log(n)))
      fam.append(np.full(rows, i))
  return np.concatenate(xs), np.concatenate(ts), np.concatenate(fam)


def entropy64(x: np.ndarray, gamma: np.ndarray) -> np.ndarray:
  """H(softmax(γ·x)) per row, in float64 (:func:`benchmarks.common.entropy64` of the weights)."""
  s = gamma[:, None] * (x - x.max(axis=1, keepdims=True))
  e = np.exp(s - s.max(axis=1, keepdims=True))
  return common.entropy64(e / e.sum(axis=1, keepdims=True))


def _entropy_var(x, gamma):
  """H and Var_q[x] of q = softmax(γ·x), per row (one pass)."""
  d = x - jnp.max(x, axis=-1, keepdims=True)
  log_q = jax.nn.log_softmax(gamma[:, None] * d, axis=-1)
  q = jnp.exp(log_q)
  mean = jnp.sum(q * d, axis=-1)
  var = jnp.sum(q * jnp.square(d - mean[:, None]), axis=-1)
  return -jnp.sum(q * log_q, axis=-1), var


def seed_newton_path(x: jax.Array, target: jax.Array, num_iters: int) -> jax.Array:
  """γ after 1..num_iters iterations of the seed's Newton from γ = 1: ``[num_iters, rows]``."""

  def body(gamma, _):
    h, var = _entropy_var(x, gamma)
    gamma = gamma + (h - target) / (gamma * var)
    return gamma, gamma

  _, path = jax.lax.scan(body, jnp.ones(x.shape[:1], x.dtype), None, length=num_iters)
  return path


def bisection_path(x: jax.Array, target: jax.Array, num_iters: int) -> jax.Array:
  """γ after 1..num_iters steps of the t-SNE perplexity search from γ = 1."""

  def body(state, _):
    gamma, lo, hi = state
    h, _ = _entropy_var(x, gamma)
    too_high = h > target  # γ too small
    lo = jnp.where(too_high, gamma, lo)
    hi = jnp.where(too_high, hi, gamma)
    up = jnp.where(jnp.isinf(hi), 2.0 * gamma, 0.5 * (gamma + hi))
    down = 0.5 * (gamma + lo)
    gamma = jnp.where(too_high, up, down)
    return (gamma, lo, hi), gamma

  one = jnp.ones(x.shape[:1], x.dtype)
  _, path = jax.lax.scan(body, (one, 0.0 * one, jnp.inf * one), None, length=num_iters)
  return path


def _errors(x64, t64, gamma) -> np.ndarray:
  gamma = np.asarray(gamma, np.float64)
  err = np.abs(entropy64(x64, np.where(gamma >= 0, gamma, 0.0)) - t64)
  return np.where((gamma >= 0) & np.isfinite(err), err, np.inf)


def _summarize(err: np.ndarray, fam: np.ndarray) -> dict:
  out = {}
  for i, name in enumerate(FAMILIES):
    e = err[fam == i]
    out[name] = {"max": float(np.max(e)), "median": float(np.median(e))}
  return out


def _measure(dtype, x64, t64, fam, max_iters) -> dict:
  x = jnp.asarray(x64, dtype)
  t = jnp.asarray(t64, dtype)
  # Errors are judged on the logits the solver actually received (rounded to `dtype`): rounding the
  # inputs moves near-tied rows' entropy by far more than the solver's own error.
  x64 = np.asarray(x, np.float64)
  curves = {"core": [], "seed Newton": [], "bisection": []}
  for k in range(max_iters + 1):
    gamma = en.solve_gamma(x, t, num_iters=k)
    curves["core"].append(_summarize(_errors(x64, t64, gamma), fam))
  for name, path_fn in (("seed Newton", seed_newton_path), ("bisection", bisection_path)):
    path = jax.jit(path_fn, static_argnums=2)(x, t, max_iters)
    start = np.ones(len(t64))
    curves[name].append(_summarize(_errors(x64, t64, start), fam))
    for k in range(max_iters):
      curves[name].append(_summarize(_errors(x64, t64, path[k]), fam))
  return curves


def run(quick: bool = False) -> dict:
  """Error after k = 0..K iterations for every method, family and dtype."""
  rows, n, max_iters = SIZES[quick]
  x64, t64, fam = problem(rows, n)
  result = {
    "name": "accuracy",
    "quick": quick,
    "n": n,
    "rows_per_target": rows,
    "fractions": list(FRACTIONS),
    "families": list(FAMILIES),
    "passes_before_first_iteration": {"core": 2, "seed Newton": 0, "bisection": 0},
    "float32": _measure(jnp.float32, x64, t64, fam, max_iters),
  }
  if not quick:
    with common.float64():
      result["float64"] = _measure(jnp.float64, x64, t64, fam, max_iters)
  return result


def passes_to_reach(curve: list, family: str, tol: float, offset: int) -> int | None:
  """Fewest passes (iterations + ``offset``) after which the max error is <= ``tol``."""
  for k, per in enumerate(curve):
    if per[family]["max"] <= tol:
      return k + offset
  return None


def markdown(result: dict) -> str:
  """Passes needed to reach max |H - target| <= 1e-4 (float32) and 1e-10 (float64)."""
  parts = [
    f"## Accuracy vs passes (n = {result['n']}, targets {result['fractions']} × log n)\n",
    "Passes over the data until max |H − target| over all rows and targets is below the "
    "tolerance (core: 1 exp-free statistics pass + iterations; — = not reached in "
    f"{len(result['float32']['core']) - 1} iterations).\n",
  ]
  offsets = result["passes_before_first_iteration"]
  for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
    if dtype not in result:
      continue
    curves = result[dtype]
    rows = []
    for fam in result["families"]:
      row = [fam]
      for method, curve in curves.items():
        p = passes_to_reach(curve, fam, tol, offsets[method])
        row.append("—" if p is None else str(p))
      rows.append(row)
    parts.append(f"### {dtype}, tolerance {tol:g}\n")
    parts.append(common.markdown_table(["family", *curves], rows) + "\n")
  return "\n".join(parts)


def plot(result: dict, out_dir) -> list[pathlib.Path]:
  """Max error vs passes, one panel per family (float64 solid, float32 dashed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fams = result["families"]
  fig, axes = plt.subplots(2, (len(fams) + 1) // 2, figsize=(11, 5), sharex=True, sharey=True)
  colors = {"core": "tab:blue", "seed Newton": "tab:red", "bisection": "tab:gray"}
  offsets = result["passes_before_first_iteration"]
  for ax, fam in zip(axes.flat, fams, strict=False):
    for dtype, style in (("float64", "-"), ("float32", "--")):
      if dtype not in result:
        continue
      for method, curve in result[dtype].items():
        err = np.array([per[fam]["max"] for per in curve])
        err = np.clip(np.where(np.isfinite(err), err, 10.0), 1e-16, 10.0)
        passes = np.arange(len(err)) + offsets[method]
        label = f"{method} ({dtype})" if ax is axes.flat[0] else None
        ax.semilogy(passes, err, style, color=colors[method], lw=1.2, label=label)
    ax.set_title(fam, fontsize=9)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.set_ylim(1e-16, 20)
  for ax in axes[-1]:
    ax.set_xlabel("passes over the data", fontsize=8)
  for ax in axes[:, 0]:
    ax.set_ylabel("max |H − target|", fontsize=8)
  fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  return [common.write_figure(fig, pathlib.Path(out_dir) / "accuracy.png")]


def main(argv=None) -> None:
  common.module_main("accuracy", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

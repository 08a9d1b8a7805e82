"""Scaling (issue 5, item 1): entropy_softmax vs jax.nn.softmax as rows get longer and batches grow.

Forward, and forward+backward (reverse-mode gradient of ``sum(w * f(x))``), float32, jit, the
two functions timed side by side (interleaved) at every size. Two sweeps:

* row length n from 16 to 262,144 with about the same number of elements per call
  (``batch = elements // n``);
* batch from 1 up at a fixed row length of 1024.

Reported: median time per call, time per element, and the ratio to softmax.
Targets are half of log n for every row. Run ``python -m benchmarks.scaling [--quick]``.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import entnorm_jax as en
from benchmarks import common

# quick -> (elements per call in the row-length sweep, row lengths, batches at n = 1024)
SIZES = {
  True: (2**18, (64, 4096, 262144), (1, 256)),
  False: (2**21, (16, 64, 256, 1024, 4096, 16384, 65536, 262144), (1, 8, 64, 512, 4096)),
}


def _functions():
  softmax = lambda x, t: jax.nn.softmax(x, axis=-1)
  ours = lambda x, t: en.entropy_softmax(x, t)
  loss = lambda f: lambda x, t, w: jnp.sum(w * f(x, t))
  return {
    "softmax": softmax,
    "entropy_softmax": ours,
    "grad softmax": jax.grad(loss(softmax)),
    "grad entropy_softmax": jax.grad(loss(ours)),
  }


def measure(batch: int, n: int, *, repeats: int, max_total_s: float, warmup_s: float = 1.0) -> dict:
  """Times the four functions on a random ``[batch, n]`` problem."""
  k1, k2 = jax.random.split(jax.random.key(n * 7919 + batch))
  x = jax.random.normal(k1, (batch, n), jnp.float32)
  w = jax.random.normal(k2, (batch, n), jnp.float32)
  t = jnp.full((batch,), 0.5 * np.log(n), jnp.float32)
  compiled = {}
  for name, f in _functions().items():
    args = (x, t, w) if name.startswith("grad") else (x, t)
    compiled[name] = (common.compile_ahead(f, *args), args)
  times = common.time_calls(compiled, repeats=repeats, max_total_s=max_total_s, warmup_s=warmup_s)
  med = {k: v["median_s"] for k, v in times.items()}
  return {
    "batch": batch,
    "n": n,
    "times": times,
    "ns_per_element": {k: 1e9 * v / (batch * n) for k, v in med.items()},
    "ratio_forward": med["entropy_softmax"] / med["softmax"],
    "ratio_grad": med["grad entropy_softmax"] / med["grad softmax"],
  }


def sizes(quick: bool) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
  """``(row-length sweep, batch sweep)`` as lists of ``(batch, n)``."""
  elements, lengths, batches = SIZES[quick]
  by_length = [(max(1, elements // n), n) for n in lengths]
  by_batch = [(b, 1024) for b in batches]
  return by_length, by_batch


def run(quick: bool = False) -> dict:
  """Both sweeps (row length, batch); JSON-serializable figures."""
  by_length, by_batch = sizes(quick)
  opts = {"repeats": 5 if quick else 11, "max_total_s": 3.0 if quick else 15.0}
  opts["warmup_s"] = common.warmup_s(quick)
  result = {"name": "scaling", "quick": quick, "by_length": [], "by_batch": []}
  for key, grid in (("by_length", by_length), ("by_batch", by_batch)):
    for batch, n in grid:
      result[key].append(measure(batch, n, **opts))
  return result


def markdown(result: dict) -> str:
  """Time per element and the ratio to softmax, for both sweeps."""
  parts = ["## Scaling: entropy_softmax vs softmax (float32, ns per element, median)\n"]
  for key, title in (("by_length", "row length sweep"), ("by_batch", "batch sweep, n = 1024")):
    rows = []
    for r in result[key]:
      ns = r["ns_per_element"]
      rows.append(
        [
          f"{r['batch']}×{r['n']}",
          f"{ns['softmax']:.3g}",
          f"{ns['entropy_softmax']:.3g}",
          f"{r['ratio_forward']:.2f}",
          f"{ns['grad softmax']:.3g}",
          f"{ns['grad entropy_softmax']:.3g}",
          f"{r['ratio_grad']:.2f}",
        ]
      )
    headers = ["batch×n", "softmax", "entropy", "ratio", "grad softmax", "grad entropy", "ratio"]
    parts.append(f"### {title}\n")
    parts.append(common.markdown_table(headers, rows) + "\n")
  return "\n".join(parts)


def plot(result: dict, out_dir) -> list[pathlib.Path]:
  """Time per element (top) and ratio to softmax (bottom) for both sweeps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(9, 5.5), sharex="col")
  styles = {
    "softmax": ("tab:gray", "-"),
    "entropy_softmax": ("tab:blue", "-"),
    "grad softmax": ("tab:gray", "--"),
    "grad entropy_softmax": ("tab:blue", "--"),
  }
  for col, (key, xkey, xlabel) in enumerate(
    (("by_length", "n", "row length n"), ("by_batch", "batch", "batch (n = 1024)"))
  ):
    rows = result[key]
    xs = [r[xkey] for r in rows]
    for name, (color, ls) in styles.items():
      axes[0, col].loglog(
        xs, [r["ns_per_element"][name] for r in rows], ls, color=color, marker=".", label=name
      )
    axes[1, col].semilogx(xs, [r["ratio_forward"] for r in rows], "-", marker=".", label="forward")
    axes[1, col].semilogx(xs, [r["ratio_grad"] for r in rows], "--", marker=".", label="grad")
    axes[1, col].set_xlabel(xlabel, fontsize=8)
    axes[0, col].set_ylabel("ns per element", fontsize=8)
    axes[1, col].set_ylabel("entropy_softmax / softmax", fontsize=8)
    for ax in axes[:, col]:
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  axes[1, 0].legend(fontsize=7)
  fig.suptitle(f"scaling, {jax.default_backend()} float32", fontsize=10)
  fig.tight_layout()
  return [common.write_figure(fig, pathlib.Path(out_dir) / "scaling.png")]


def main(argv=None) -> None:
  common.module_main("scaling", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

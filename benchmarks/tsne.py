"""t-SNE perplexity calibration (issue 11, part 3): ours vs scikit-learn's and openTSNE's searches.

Every method gets the same kNN squared distances, computed the way ``sklearn.manifold.TSNE`` does
(``NearestNeighbors(n_neighbors=k).kneighbors_graph(mode="distance")``, squared, float32,
k = min(n - 1, 3·perplexity + 1)), and calibrates every row to perplexity 30:

* ``entnorm_jax``: ``en.perplexity_affinities`` (float32, jit, compiled ahead; one thread here);
* ``scikit-learn``: ``sklearn.manifold._utils._binary_search_perplexity`` (float32 in, float64
  arithmetic, bisection on β to 1e-5 nats, single thread);
* ``openTSNE``: ``openTSNE._tsne.compute_gaussian_perplexity`` (float64 bisection to 1e-8 nats),
  on the unsquared distances it expects, with one thread (like scikit-learn), when importable.

Cases: sklearn's digits; 20,000 synthetic points (10 Gaussian clusters in 10 dimensions) with
k = 91, where the bar is ours <= 0.6x scikit-learn's time; 20,000 standard-normal points in 50
dimensions (high-dimensional data: every distance is large next to the spread of a row); and
digits with 1e5 added to every squared distance (exact in float32: digits' squared distances are
integers), which leaves P unchanged in exact arithmetic. The peers evaluate exp(-β d) without
subtracting the row minimum, so large distances underflow and they lose rows.

Accuracy, per method: max |H(P_i) - log perplexity| over rows (float64, nats), the rows off by
more than 1e-4 nats, max |P - P_sklearn| (scikit-learn on the case's distances without offset)
and max |P - P_exact| (a NumPy float64 bisection run to convergence on the distances minus their
row minimum). Times: medians of interleaved repeats; the kNN search is not timed.

Run ``python -m benchmarks.tsne [--quick]``: prints the tables and writes ``tsne.json``,
``tsne.md`` and ``tsne.png`` into ``benchmarks/results/``.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import entnorm_jax as en
from benchmarks import common

PERPLEXITY = 30.0
OFF_NATS = 1e-4  # a row is "off" when its entropy misses the target by more than this
SPEED_BAR = 0.6  # ours / scikit-learn at 20,000 synthetic points, k = 91


class Case(NamedTuple):
  name: str
  source: str  # "digits", "blobs" (10 clusters in 10-d) or "gauss50" (N(0, I) in 50-d)
  n_points: int | None  # None: the whole data set
  offset: float = 0.0  # added to every squared distance
  bar: bool = False  # the speed bar applies to this case


CASES = {
  True: (
    Case("digits", "digits", None),
    Case("synthetic 1,797 (10-d clusters)", "blobs", 1797),  # digits' shape: one compile
    Case("digits + 1e5", "digits", None, offset=1e5),
  ),
  False: (
    Case("digits", "digits", None),
    Case("synthetic 20,000 (10-d clusters)", "blobs", 20000, bar=True),
    Case("synthetic 20,000 (50-d normal)", "gauss50", 20000),
    Case("digits + 1e5", "digits", None, offset=1e5),
  ),
}


def points(source: str, n_points: int | None) -> np.ndarray:
  """The data set of a case (deterministic)."""
  if source == "digits":
    from sklearn.datasets import load_digits

    x = load_digits().data
    return x if n_points is None else x[:n_points]
  rng = np.random.default_rng(0)
  if source == "blobs":
    centers = rng.normal(0.0, 4.0, (10, 10))
    return centers[rng.integers(0, 10, n_points)] + rng.standard_normal((n_points, 10))
  if source == "gauss50":
    return rng.standard_normal((n_points, 50))
  raise ValueError(f"unknown source {source!r}")


def knn_sq_distances(x: np.ndarray, perplexity: float) -> np.ndarray:
  """``[n, k]`` float32 squared distances to the k nearest neighbours, as sklearn's TSNE."""
  from sklearn.neighbors import NearestNeighbors

  n = len(x)
  k = min(n - 1, int(3.0 * perplexity + 1))
  graph = NearestNeighbors(n_neighbors=k).fit(x).kneighbors_graph(mode="distance")
  graph.data **= 2
  graph.sort_indices()
  return graph.data.reshape(n, k).astype(np.float32)


def _entropy_at(beta: np.ndarray, d: np.ndarray) -> np.ndarray:
  """H(softmax(-β d)) per row, d >= 0 with a zero in every row (so no overflow, sum >= 1)."""
  e = np.exp(-beta[:, None] * d)
  z = e.sum(axis=1)
  return np.log(z) + beta * np.sum(e * d, axis=1) / z


def exact_affinities(d2: np.ndarray, perplexity: float, steps: int = 100) -> np.ndarray:
  """The reference, independent of every method timed: NumPy float64 bisection on β to 2^-steps
  of its bracket, on d - min_j d (exact, so an offset changes nothing)."""
  d = np.asarray(d2, np.float64)
  d = d - d.min(axis=1, keepdims=True)
  target = np.log(perplexity)
  lo = np.zeros(len(d))
  hi = 1.0 / np.maximum(d.mean(axis=1), 1e-300)
  for _ in range(2000):  # bracket: double hi until H(hi) <= target
    above = _entropy_at(hi, d) > target
    if not above.any():
      break
    lo, hi = np.where(above, hi, lo), np.where(above, 2 * hi, hi)
  for _ in range(steps):
    mid = 0.5 * (lo + hi)
    above = _entropy_at(mid, d) > target
    lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
  e = np.exp(-0.5 * (lo + hi)[:, None] * d)
  return e / e.sum(axis=1, keepdims=True)


def peers(perplexity: float) -> dict:
  """name -> (function of its own input, function making that input from float32 squared d)."""
  from sklearn.manifold._utils import _binary_search_perplexity

  out = {
    "scikit-learn": (
      lambda d: _binary_search_perplexity(d, perplexity, 0),
      lambda d2: np.ascontiguousarray(d2, np.float32),
    )
  }
  try:
    from openTSNE import _tsne
  except ImportError:
    return out
  perplexities = np.array([perplexity])
  out["openTSNE"] = (
    lambda d: np.asarray(_tsne.compute_gaussian_perplexity(d, perplexities, num_threads=1)),
    lambda d2: np.sqrt(np.asarray(d2, np.float64)),  # it squares the distances it is given
  )
  return out


def accuracy(p, target_h: float, reference_sklearn, reference_exact) -> dict:
  err = np.abs(common.entropy64(p) - target_h)
  return {
    "max_entropy_error": float(err.max()),
    "rows_off": int(np.sum(err > OFF_NATS)),
    "max_abs_error_vs_sklearn": float(np.abs(p - reference_sklearn).max()),
    "max_abs_error_vs_exact": float(np.abs(p - reference_exact).max()),
  }


def measure(
  case: Case, *, repeats: int, max_total_s: float, compiled: dict, warmup_s: float = 1.0
) -> dict:
  """Times and accuracy of every method on one case."""
  d2 = knn_sq_distances(points(case.source, case.n_points), PERPLEXITY)
  base_sklearn = peers(PERPLEXITY)["scikit-learn"][0](d2)  # reference: distances without offset
  exact = exact_affinities(d2, PERPLEXITY)
  if case.offset:
    shifted = d2 + np.float32(case.offset)
    if not np.array_equal(shifted - np.float32(case.offset), d2):
      raise ValueError(f"offset {case.offset} is not exact in float32 for case {case.name!r}")
    d2 = shifted
  dj = jnp.asarray(d2)
  if d2.shape not in compiled:  # one compilation per shape
    compiled[d2.shape] = common.compile_ahead(lambda d: en.perplexity_affinities(d, PERPLEXITY), dj)
  fns = {"entnorm_jax": (compiled[d2.shape], (dj,))}
  for name, (fn, prepare) in peers(PERPLEXITY).items():
    fns[name] = (fn, (prepare(d2),))
  times = common.time_calls(fns, repeats=repeats, max_total_s=max_total_s, warmup_s=warmup_s)
  target_h = float(np.log(PERPLEXITY))
  acc = {
    name: accuracy(np.asarray(fn(*args)), target_h, base_sklearn, exact)
    for name, (fn, args) in fns.items()
  }
  sk = times["scikit-learn"]["median_s"]
  return {
    "case": case.name,
    "n_points": int(d2.shape[0]),
    "k": int(d2.shape[1]),
    "offset": case.offset,
    "bar": case.bar,
    "times": times,
    "ratio_to_sklearn": {name: t["median_s"] / sk for name, t in times.items()},
    "ratio_of_minima_to_sklearn": {
      name: t["min_s"] / times["scikit-learn"]["min_s"] for name, t in times.items()
    },
    "accuracy": acc,
  }


def run(quick: bool = False) -> dict:
  """Every case of the size table; JSON-serializable figures."""
  opts = {"repeats": 3 if quick else 9, "max_total_s": 2.0 if quick else 20.0}
  opts["warmup_s"] = common.warmup_s(quick)
  compiled: dict = {}
  cases = [measure(c, compiled=compiled, **opts) for c in CASES[quick]]
  bars = [
    {
      "case": c["case"],
      "target": f"entnorm_jax <= {SPEED_BAR:g}x scikit-learn's time",
      "measured": c["ratio_to_sklearn"]["entnorm_jax"],
      "measured_min": c["ratio_of_minima_to_sklearn"]["entnorm_jax"],
      "met": bool(c["ratio_to_sklearn"]["entnorm_jax"] <= SPEED_BAR),
    }
    for c in cases
    if c["bar"]
  ]
  return {
    "name": "tsne",
    "quick": quick,
    "perplexity": PERPLEXITY,
    "methods": list(cases[0]["times"]),
    "cases": cases,
    "bars": bars,
  }


def markdown(result: dict) -> str:
  """One table per case (time, ratio, accuracy), then the bar."""
  parts = [
    f"## t-SNE calibration: perplexity {result['perplexity']:g}, same kNN squared distances\n",
    "Medians of interleaved repeats, one thread each; accuracy in float64: max |H − log perp| "
    f"(nats), rows off by more than {OFF_NATS:g} nats, max |P − P_sklearn| (scikit-learn on the "
    "distances without offset), max |P − P_exact| (float64 bisection run to convergence).\n",
  ]
  for c in result["cases"]:
    rows = []
    for name, t in c["times"].items():
      a = c["accuracy"][name]
      rows.append(
        [
          name,
          common.fmt_time(t["median_s"]),
          f"{common.fmt_time(t['q25_s'])} – {common.fmt_time(t['q75_s'])}",
          f"{c['ratio_to_sklearn'][name]:.2f}",
          f"{a['max_entropy_error']:.1e}",
          str(a["rows_off"]),
          f"{a['max_abs_error_vs_sklearn']:.1e}",
          f"{a['max_abs_error_vs_exact']:.1e}",
        ]
      )
    parts.append(f"### {c['case']}: {c['n_points']} points × k = {c['k']}\n")
    # pipes inside a cell are escaped so that the Markdown table keeps its columns
    headers = ["method", "median", "IQR", "× sklearn", r"max \|H − log perp\|", "rows off"]
    headers += [r"max \|P − P_sklearn\|", r"max \|P − P_exact\|"]
    parts.append(common.markdown_table(headers, rows) + "\n")
  if result["bars"]:
    rows = [
      [
        b["case"],
        b["target"],
        f"{b['measured']:.2f}",
        f"{b['measured_min']:.2f}",
        "yes" if b["met"] else "NO",
      ]
      for b in result["bars"]
    ]
    parts.append("### Target (judged on the ratio of medians)\n")
    headers = ["case", "target", "ratio of medians", "ratio of minima", "met"]
    parts.append(common.markdown_table(headers, rows) + "\n")
  return "\n".join(parts)


def plot(result: dict, out_dir) -> list[pathlib.Path]:
  """Time relative to scikit-learn (left) and entropy error (right), per case and method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cases, methods = result["cases"], result["methods"]
  colors = {"entnorm_jax": "tab:blue", "scikit-learn": "tab:orange", "openTSNE": "tab:green"}
  fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 + 0.75 * len(cases) * len(methods) / 2))
  y = np.arange(len(cases))
  h = 0.8 / len(methods)
  for i, m in enumerate(methods):
    pos = y + (i - (len(methods) - 1) / 2) * h
    ratio = [c["ratio_to_sklearn"][m] for c in cases]
    err = [max(c["accuracy"][m]["max_entropy_error"], 1e-12) for c in cases]
    axes[0].barh(pos, ratio, height=h, color=colors.get(m, "tab:gray"), label=m)
    axes[1].barh(pos, err, height=h, color=colors.get(m, "tab:gray"), label=m)
  labels = [f"{c['case']}\n({c['n_points']}×{c['k']})" for c in cases]
  for ax in axes:
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", alpha=0.3)
  axes[0].axvline(1.0, color="k", lw=0.8)
  axes[0].axvline(SPEED_BAR, color="tab:red", lw=0.8, ls="--", label=f"bar {SPEED_BAR:g}x")
  axes[0].set_xlabel("median time / scikit-learn's", fontsize=8)
  axes[1].set_xscale("log")
  axes[1].axvline(1e-5, color="k", lw=0.8, ls=":", label="sklearn's tolerance")
  axes[1].set_xlabel("max |H − log perplexity| (nats, float64)", fontsize=8)
  axes[1].set_yticklabels([])
  axes[0].legend(fontsize=7, loc="lower right")
  axes[1].legend(fontsize=7, loc="upper right")
  fig.suptitle(
    f"t-SNE calibration, perplexity {result['perplexity']:g}, {jax.default_backend()}",
    fontsize=10,
  )
  fig.tight_layout()
  return [common.write_figure(fig, pathlib.Path(out_dir) / "tsne.png")]


def main(argv=None) -> None:
  common.module_main("tsne", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

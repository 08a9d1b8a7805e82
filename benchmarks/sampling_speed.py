"""One decoding step's sampling over a [64, 50000] float32 logits batch: entropy method vs top-p.

Top-p sorts every row; the entropy method runs a fixed number of one-pass solver iterations. Both
include the categorical draw (Gumbel-max over the whole row), so the figures are the cost of a
complete sampling step; "transform only" times the logits processing without the draw.

Run: ``python -m benchmarks.sampling_speed`` (writes ``benchmarks/results/sampling_speed.*``).
"""

from __future__ import annotations

import functools
import pathlib

import jax

from benchmarks import common
from entnorm_jax import sampling as ens

RESULTS = pathlib.Path(__file__).parent / "results"
BATCH, VOCAB = 64, 50_000


def _cases() -> dict[str, tuple]:
  """name -> a function of (key, logits) that runs one sampling step."""
  sample = ens.sample
  process = ens.process_logits
  return {
    "entropy (perplexity 20)": functools.partial(sample, method="entropy", perplexity=20.0),
    "top_p (p=0.9, sort)": functools.partial(sample, method="top_p", p=0.9),
    "min_p (p=0.05)": functools.partial(sample, method="min_p", p=0.05),
    "top_k (k=50)": functools.partial(sample, method="top_k", k=50),
    "temperature (T=0.8)": functools.partial(sample, method="temperature", temperature=0.8),
    "transform only: entropy": lambda key, z: process(z, method="entropy", perplexity=20.0),
    "transform only: top_p": lambda key, z: process(z, method="top_p", p=0.9),
  }


def run(quick: bool = False) -> dict:
  """Times one sampling step per method on the same logits, interleaved, in one process.

  Args:
    quick: a smoke run: 16 rows instead of 64 and fewer repeats (the bar is stated for [64, 50000]).

  Returns:
    JSON-serializable figures: per-method median/IQR seconds, the entropy/top-p ratio, the bar.
  """
  key = jax.random.key(0)
  # LM-like logits: a heavy upper tail over a Gaussian bulk.
  shape = (BATCH // 4 if quick else BATCH, VOCAB)
  bulk = common.random_logits(1, shape, scale=2.0)
  logits = bulk + 4.0 * jax.random.exponential(jax.random.key(2), shape) ** 2 / 10.0
  compiled = {name: common.compile_ahead(f, key, logits) for name, f in _cases().items()}
  stats = common.time_calls(
    {name: (fn, (key, logits)) for name, fn in compiled.items()},
    repeats=3 if quick else 15,
    max_total_s=10 if quick else 120,
  )
  entropy = stats["entropy (perplexity 20)"]["median_s"]
  top_p = stats["top_p (p=0.9, sort)"]["median_s"]
  return {
    "shape": list(shape),
    "dtype": "float32",
    "times": stats,
    "ratio_entropy_over_top_p": entropy / top_p,
    "ratio_transform_entropy_over_top_p": stats["transform only: entropy"]["median_s"]
    / stats["transform only: top_p"]["median_s"],
    "bar_entropy_le_top_p": bool(entropy <= top_p),
    "environment": common.environment(),
    "notes": "CPU shared with other jobs while measured: repeats interleaved, medians and IQR.",
  }


def _table(result: dict) -> str:
  top_p = result["times"]["top_p (p=0.9, sort)"]["median_s"]
  rows = [
    [
      name,
      common.fmt_time(s["median_s"]),
      f"{common.fmt_time(s['q25_s'])} – {common.fmt_time(s['q75_s'])}",
      f"{s['median_s'] / top_p:.2f}",
    ]
    for name, s in result["times"].items()
  ]
  return common.markdown_table(["step [64, 50000] f32", "median", "IQR", "vs top_p"], rows)


def main() -> None:
  result = run(quick=common.quick_from_env())
  table = _table(result)
  env = result["environment"]
  text = (
    "# Sampling step speed\n\n"
    f"{env['backend']} ({env['cpu_model']}, {env['cpu_count']} cores), jax {env['jax']}. "
    f"{result['notes']}\n\n{table}\n\n"
    f"entropy / top_p = {result['ratio_entropy_over_top_p']:.2f} "
    f"(bar: <= 1, {'met' if result['bar_entropy_le_top_p'] else 'NOT met'}); "
    f"logits transform alone: {result['ratio_transform_entropy_over_top_p']:.2f}.\n"
  )
  print(text)
  common.save_json(result, RESULTS / "sampling_speed.json")
  (RESULTS / "sampling_speed.md").write_text(text)


if __name__ == "__main__":
  main()

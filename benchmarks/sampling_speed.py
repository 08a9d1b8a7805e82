"""One decoding step's sampling over a [64, 50000] float32 logits batch, and top-p against torch.

Top-p finds its cut among the ``lax.top_k`` candidates, or by an exact bisection on the threshold
when the nucleus is larger (no full sort); the entropy method runs its one-pass solver
iterations. The sampling steps include the categorical draw (Gumbel-max over the whole row);
"transform only" times the logits processing alone.

Top-p is also timed side by side with Hugging Face's ``TopPLogitsWarper`` algorithm re-implemented
in torch (sort ascending, softmax, cumulative sum, drop the tokens whose cumulative mass is
``<= 1 - top_p``, always keep the last one, scatter back), on two kinds of rows: LM-like (a
heavy upper tail: the nucleus holds a few tokens, the cut is among the candidates) and flat
(Gaussian logits of scale 2: ~12k tokens, the cut needs the bisection). torch is optional: without
it the comparison is recorded as not available.

Run: ``python -m benchmarks.sampling_speed [--quick] [--out DIR]`` (writes
``benchmarks/results/sampling_speed.*`` on a full run; see :func:`benchmarks.common.out_dir`).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from benchmarks import common
from entnorm_jax import sampling as ens

BATCH, VOCAB = 64, 50_000
TOP_P = 0.9
JAX_TOP_P = "transform only: top_p"
JAX_TOP_P_FLAT = "transform only: top_p, flat rows"
TORCH_TOP_P = "torch HF TopP warper"
TORCH_TOP_P_FLAT = "torch HF TopP warper, flat rows"


def _cases() -> dict[str, tuple]:
  """name -> a function of (key, logits) that runs one sampling step."""
  sample = ens.sample
  process = ens.process_logits
  return {
    "entropy (perplexity 20)": functools.partial(sample, method="entropy", perplexity=20.0),
    "top_p (0.9)": functools.partial(sample, method="top_p", top_p=TOP_P),
    "min_p (0.05)": functools.partial(sample, method="min_p", min_p=0.05),
    "top_k (50)": functools.partial(sample, method="top_k", top_k=50),
    "temperature (0.8)": functools.partial(sample, method="temperature", temperature=0.8),
    "transform only: entropy": lambda key, z: process(z, method="entropy", perplexity=20.0),
    JAX_TOP_P: lambda key, z: process(z, method="top_p", top_p=TOP_P),
  }


def torch_top_p_warper(torch, scores, top_p: float):
  """Hugging Face's TopPLogitsWarper algorithm in torch (min_tokens_to_keep=1).

  Args:
    torch: the torch module.
    scores: ``[batch, n]`` float tensor of logits.
    top_p: the nucleus mass.

  Returns:
    ``scores`` with ``-inf`` at the tokens outside the nucleus.
  """
  sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
  mass_up_to = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
  drop_sorted = mass_up_to <= 1.0 - top_p
  drop_sorted[..., -1:] = False  # the most likely token is always kept
  drop = drop_sorted.scatter(-1, order, drop_sorted)
  return scores.masked_fill(drop, -float("inf"))


def _torch():
  try:
    import torch
  except ImportError:
    return None
  return torch


def run(quick: bool = False) -> dict:
  """Times one sampling step per method on the same logits, interleaved, in one process.

  Args:
    quick: a smoke run: 16 rows instead of 64 and fewer repeats (the bar is stated for [64, 50000]).

  Returns:
    JSON-serializable figures: per-function median/IQR seconds, the entropy/top-p ratio, the
    top-p/torch ratios when torch is installed, and the bars.
  """
  key = jax.random.key(0)
  shape = (BATCH // 4 if quick else BATCH, VOCAB)
  bulk = common.random_logits(1, shape, scale=2.0)
  # LM-like logits: a heavy upper tail over a Gaussian bulk. Flat: the Gaussian bulk alone.
  logits = bulk + 4.0 * jax.random.exponential(jax.random.key(2), shape) ** 2 / 10.0
  flat = bulk
  fns = {
    name: (common.compile_ahead(f, key, logits), (key, logits)) for name, f in _cases().items()
  }
  fns[JAX_TOP_P_FLAT] = (fns[JAX_TOP_P][0], (key, flat))
  torch = _torch()
  torch_info: dict = {"available": torch is not None}
  if torch is not None:
    scores, scores_flat = (torch.from_numpy(np.array(x)) for x in (logits, flat))
    warper = functools.partial(torch_top_p_warper, torch, top_p=TOP_P)
    fns[TORCH_TOP_P] = (warper, (scores,))
    fns[TORCH_TOP_P_FLAT] = (warper, (scores_flat,))
    torch_info |= {"version": torch.__version__, "threads": torch.get_num_threads()}
  stats = common.time_calls(
    fns,
    repeats=3 if quick else 15,
    max_total_s=10 if quick else 150,
    warmup_s=common.warmup_s(quick),
  )
  result = {
    "shape": list(shape),
    "dtype": "float32",
    "top_p": TOP_P,
    "times": stats,
    "ratio_entropy_over_top_p": stats["entropy (perplexity 20)"]["median_s"]
    / stats["top_p (0.9)"]["median_s"],
    "ratio_transform_entropy_over_top_p": stats["transform only: entropy"]["median_s"]
    / stats[JAX_TOP_P]["median_s"],
    "bar_entropy_le_top_p": bool(
      stats["entropy (perplexity 20)"]["median_s"] <= stats["top_p (0.9)"]["median_s"]
    ),
    "nucleus_size_median": {
      "lm_like": float(np.median(_kept(ens.top_p_logits(logits, TOP_P)))),
      "flat": float(np.median(_kept(ens.top_p_logits(flat, TOP_P)))),
    },
    "torch": torch_info,
    "environment": common.environment(),
    "notes": "Repeats interleaved, medians and IQR (the machine may be shared: see the IQRs).",
  }
  if torch is not None:
    ratio = stats[JAX_TOP_P]["median_s"] / stats[TORCH_TOP_P]["median_s"]
    ratio_flat = stats[JAX_TOP_P_FLAT]["median_s"] / stats[TORCH_TOP_P_FLAT]["median_s"]
    agree = [
      float(np.mean(_kept_mask(ens.top_p_logits(x, TOP_P)) == np.isfinite(warper(t).numpy())))
      for x, t in ((logits, scores), (flat, scores_flat))
    ]
    torch_info |= {
      "ratio_top_p_over_torch": ratio,
      "ratio_top_p_over_torch_flat": ratio_flat,
      "bar_top_p_le_torch": bool(ratio <= 1.0 and ratio_flat <= 1.0),
      "kept_sets_agree_fraction": {"lm_like": agree[0], "flat": agree[1]},
    }
  return result


def _kept_mask(out) -> np.ndarray:
  return np.isfinite(np.asarray(out))


def _kept(out) -> np.ndarray:
  return _kept_mask(out).sum(-1)


def markdown(result: dict) -> str:
  """The timing table, the ratios and the torch comparison."""
  env = result["environment"]
  shape = "×".join(map(str, result["shape"]))
  top_p = result["times"]["top_p (0.9)"]["median_s"]
  rows = [
    [
      name,
      common.fmt_time(s["median_s"]),
      f"{common.fmt_time(s['q25_s'])} – {common.fmt_time(s['q75_s'])}",
      f"{s['median_s'] / top_p:.2f}",
    ]
    for name, s in result["times"].items()
  ]
  table = common.markdown_table([f"[{shape}] f32", "median", "IQR", "vs top_p step"], rows)
  torch = result["torch"]
  if torch.get("ratio_top_p_over_torch") is not None:
    agree = torch["kept_sets_agree_fraction"]
    versus = (
      f"top_p transform / torch HF TopP warper (torch {torch['version']}, "
      f"{torch['threads']} threads): {torch['ratio_top_p_over_torch']:.2f} on LM-like rows "
      f"(nucleus ~{result['nucleus_size_median']['lm_like']:.0f} tokens), "
      f"{torch['ratio_top_p_over_torch_flat']:.2f} on flat rows "
      f"(~{result['nucleus_size_median']['flat']:.0f} tokens) "
      f"(bar: <= 1, {'met' if torch['bar_top_p_le_torch'] else 'NOT met'}); kept sets agree on "
      f"{agree['lm_like']:.6f} / {agree['flat']:.6f} of the entries."
    )
  else:
    versus = "torch not installed: the comparison with Hugging Face's TopP warper was skipped."
  return (
    "# Sampling step speed\n\n"
    f"{env['backend']} ({env['cpu_model']}, {env['cpu_count']} cores), jax {env['jax']}. "
    f"{result['notes']}\n\n{table}\n\n"
    f"entropy / top_p step = {result['ratio_entropy_over_top_p']:.2f} "
    f"(bar: <= 1, {'met' if result['bar_entropy_le_top_p'] else 'NOT met'}); "
    f"logits transform alone: {result['ratio_transform_entropy_over_top_p']:.2f}.\n\n"
    f"{versus}\n"
  )


def main(argv=None) -> None:
  common.module_main("sampling_speed", __doc__, run, markdown, None, argv)


if __name__ == "__main__":
  main()

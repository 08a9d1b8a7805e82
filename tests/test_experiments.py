"""Smoke runs of the training experiments (length extrapolation, attention collapse).

Each experiment's ``run`` → ``markdown`` → ``plot`` path runs at tiny sizes (the size tables are
patched) so the experiments cannot go stale; the figures are checked for shape and sanity, never
for speed or for which variant wins.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The benchmarks package lives at the repository root, next to tests/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import attention_collapse, extrapolation  # noqa: E402
from benchmarks.corpus import CharCorpus  # noqa: E402

TINY_EXTRAPOLATION = dict(
  features=16,
  heads=2,
  layers=1,
  train_length=8,
  batch=2,
  steps=3,
  seeds=2,
  sweep_seed=100,
  lr_grid=(1e-3, 3e-3),
  eval_windows=2,
  eval_batch=2,
  control_seeds=1,
)


@pytest.fixture(scope="module")
def corpus():
  return CharCorpus()


def test_critical_rope_base_turns_the_slowest_dimension_once():
  base = extrapolation.critical_rope_base(128, 32)
  slowest = base ** (-15 / 16)
  np.testing.assert_allclose(2 * np.pi / slowest, 128, rtol=1e-6)


def test_rope_logits_depend_on_relative_position_only():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
  base = extrapolation.critical_rope_base(16, 8)

  def logit(m, n):
    rq = extrapolation.rope(q, jnp.array([m]), base)
    rk = extrapolation.rope(k, jnp.array([n]), base)
    return jnp.sum(rq * rk)

  np.testing.assert_allclose(logit(3, 1), logit(40, 38), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", extrapolation.VARIANTS)
def test_attention_fns_are_causal_and_normalized(variant):
  length, train_length = 12, 8
  q, k, v = jax.random.normal(jax.random.key(1), (3, 2, length, 2, 4))
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  fn = extrapolation.make_attention_fn(variant, train_length, 10.0)
  out = fn(q, k, v, mask=mask)
  # Causal: the first rows do not see the later keys.
  out_prefix = fn(q[:, :5], k[:, :5], v[:, :5], mask=mask[..., :5, :5])
  np.testing.assert_allclose(out[:, :5], out_prefix, rtol=1e-4, atol=1e-5)
  if variant == "log_n":  # the row with n_valid = train_length has scale 1: standard attention
    std = extrapolation.make_attention_fn("standard", train_length, 10.0)(q, k, v, mask=mask)
    row = train_length - 1
    np.testing.assert_allclose(out[:, row], std[:, row], rtol=1e-4, atol=1e-5)
    assert not np.allclose(out[:, -1], std[:, -1], atol=1e-4)


def test_prefix_of_a_long_window_is_the_short_evaluation(corpus):
  # Causal attention: one pass at the longest length gives every shorter evaluation.
  cfg = dict(TINY_EXTRAPOLATION)
  exp = extrapolation.Experiment("entropy_fixed", corpus.vocab_size, cfg, 5.0)
  params, _ = exp.init(0)
  x, y = extrapolation.eval_windows(corpus, 2, 32)
  loss_long, ent_long = exp.evaluate(params, x, y)
  loss_short, ent_short = exp.evaluate(params, x[:, :8], y[:, :8])
  np.testing.assert_allclose(loss_long[:8], loss_short, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ent_long[:, :8], ent_short, rtol=1e-4, atol=1e-4)
  # Entropy-normalized rows sit on their relative target (0.5) at every length.
  np.testing.assert_allclose(np.asarray(ent_long)[:, 1:] / (2 * cfg["heads"]), 0.5, atol=2e-3)


def test_extrapolation_run_tiny(monkeypatch, tmp_path):
  monkeypatch.setitem(extrapolation.SIZES, True, dict(TINY_EXTRAPOLATION))
  # One plain and one entropy variant (each compiles its own model twice: the main and the control
  # arm); the four variants' attention functions are checked above.
  monkeypatch.setattr(extrapolation, "VARIANTS", ("standard", "entropy_learned"))
  result = extrapolation.run(quick=True)
  json.dumps(result)
  cfg = result["config"]
  assert cfg["eval_lengths"] == [8, 16, 32, 64] and len(cfg["buckets"]) == 4
  assert result["lr_sweep"]["chosen_peak_lr"] in (1e-3, 3e-3)
  for variant in extrapolation.VARIANTS:
    summ = result["summary"][variant]
    assert len(summ["bucket_loss"]) == 4 and all(
      np.isfinite(s["mean"]) for s in summ["bucket_loss"]
    )
    assert all(s["std"] >= 0 and len(s["values"]) == 2 for s in summ["bucket_loss"])
    ent = [per[0]["mean"] for per in summ["length_entropy"]]
    assert all(0 <= e <= 1 for e in ent), (variant, ent)
    if variant.startswith("entropy"):
      np.testing.assert_allclose(ent, 0.5, atol=0.02)
  assert len(result["summary"]["entropy_learned"]["learned_targets"]["mean"][0]) == 2
  assert set(result["control"]["summary"]) == set(extrapolation.VARIANTS)
  text = extrapolation.markdown(result)
  assert "[0,8)" in text and "Control arm" in text and "±" in text
  png = tmp_path / "extrapolation.png"
  extrapolation.plot(result, png)
  assert png.stat().st_size > 0


def test_attention_collapse_run_tiny(monkeypatch, tmp_path):
  tiny = dict(steps=4, batch=2, length=8, layers=1, eval_every=2, seeds=2)
  monkeypatch.setitem(attention_collapse.SIZES, True, tiny)
  result = attention_collapse.run(quick=True)
  json.dumps(result)
  assert result["config"]["seeds"] == 2 and result["wall_s"] > 0
  for name, curves in result["runs"].items():
    assert len(curves) == 2, name
    assert curves[0]["step"] == [0, 2, 4]
  summ = result["summary"]["no_warmup/entropy_fixed"]
  np.testing.assert_allclose(summ["final_entropy_per_layer"]["mean"], 0.5, atol=0.02)
  assert len(result["summary"]["warmup/entropy_learned"]["learned_targets"]["mean"][0]) == 4
  text = attention_collapse.markdown(result)
  assert "±" in text and "seed spread" in text
  png = tmp_path / "attention_collapse.png"
  attention_collapse.plot(result, png)
  assert png.stat().st_size > 0

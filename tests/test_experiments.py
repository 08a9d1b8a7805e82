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
from conftest import check_figures

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


def _targets(variant):
  """The target keyword the module would pass to ``variant``'s attention_fn (1.2 nats, 0.5)."""
  if variant not in extrapolation.ENTROPY:
    return {}
  keyword = extrapolation.ENTROPY[variant][0]
  return {keyword: jnp.asarray(0.5 if keyword == "target_fraction" else 1.2)}


@pytest.mark.parametrize("variant", extrapolation.VARIANTS)
def test_attention_fns_are_causal_and_normalized(variant):
  length, train_length = 12, 8
  q, k, v = jax.random.normal(jax.random.key(1), (3, 2, length, 2, 4))
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  s = jnp.full((2,), 1 / np.log(train_length))  # SSMax's s at its initial value
  fn = extrapolation.make_attention_fn(variant, train_length, 10.0, ssmax_s=s)
  out = fn(q, k, v, mask=mask, **_targets(variant))
  # Causal: the first rows do not see the later keys.
  out_prefix = fn(q[:, :5], k[:, :5], v[:, :5], mask=mask[..., :5, :5], **_targets(variant))
  np.testing.assert_allclose(out[:, :5], out_prefix, rtol=1e-4, atol=1e-5)
  std = extrapolation.make_attention_fn("standard", train_length, 10.0)(q, k, v, mask=mask)
  if variant in ("log_n", "ssmax"):  # scale 1 at n_valid = train_length: standard attention
    row = train_length - 1
    np.testing.assert_allclose(out[:, row], std[:, row], rtol=1e-4, atol=1e-5)
    assert not np.allclose(out[:, -1], std[:, -1], atol=1e-4)
  if variant in extrapolation.TRAINING_FREE:  # rows up to the trained length are untouched
    np.testing.assert_allclose(out[:, :train_length], std[:, :train_length], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, train_length:], std[:, train_length:], atol=1e-4)


def test_experiment_rows_sit_on_their_targets_and_prefixes_are_short_evaluations(corpus):
  # Causal attention: one pass at the longest length gives every shorter evaluation.
  cfg = dict(TINY_EXTRAPOLATION)
  exp = extrapolation.Experiment("nats_fixed", corpus.vocab_size, cfg, 5.0)
  levels = np.array([[1.5, 0.8]])  # [layers, heads], nats
  params, _ = exp.init(0, levels)
  x, y = extrapolation.eval_windows(corpus, 2, 32)
  loss_long, ent_long = exp.evaluate(params, x, y)
  loss_short, ent_short = exp.evaluate(params, x[:, :8], y[:, :8])
  np.testing.assert_allclose(loss_long[:8], loss_short, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ent_long[..., :8], ent_short, rtol=1e-4, atol=1e-4)
  # Each head's rows hold its level in nats, or log n_valid where a row cannot reach it.
  n_valid = np.arange(1, 33)
  want = np.minimum(levels[0][:, None], np.log(n_valid))
  np.testing.assert_allclose(np.asarray(ent_long)[0] / 2, want, atol=2e-3)


@pytest.mark.parametrize(("variant", "moves"), [("nats_fixed", False), ("nats_learned", True)])
def test_fixed_targets_stay_and_learned_ones_train(corpus, variant, moves):
  cfg = dict(TINY_EXTRAPOLATION)
  exp = extrapolation.Experiment(variant, corpus.vocab_size, cfg, 5.0)
  levels = np.array([[1.5, 0.8]])
  params, opt_state = exp.init(0, levels)
  np.testing.assert_allclose(
    extrapolation.learned_parameters("nats_learned", params), levels, rtol=1e-5
  )
  x, y = next(corpus.batches(0, 2, 8))
  for _ in range(3):
    params, opt_state, _ = exp.step(params, opt_state, x, y, jnp.float32(1e-2))
  after = np.asarray(extrapolation.learned_parameters("nats_learned", params))
  assert np.allclose(after, levels, rtol=1e-6) != moves


def test_reference_levels_are_the_octave_ending_at_the_trained_length():
  assert extrapolation.octaves(16) == [(1, 2), (2, 4), (4, 8), (8, 16)]
  assert extrapolation.octave_labels(16) == ["2", "3-4", "5-8", "9-16"]
  head_entropy = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # [layers, heads, octaves]
  levels = extrapolation.reference_levels({"head_entropy": head_entropy.tolist()}, 8)
  np.testing.assert_array_equal(levels, head_entropy[:, :, 2])  # rows [4, 8): n_valid 5..8


def test_extrapolation_run_tiny(monkeypatch, tmp_path, figures):
  monkeypatch.setitem(extrapolation.SIZES, True, dict(TINY_EXTRAPOLATION))
  # A plain, a learned-scale and a measured variant, and one training-free variant (each compiles
  # its model once per arm); every variant's attention function is checked above, the learned
  # targets' training below.
  trained = ("standard", "ssmax", "ceiling")
  monkeypatch.setattr(extrapolation, "TRAINED", trained)
  monkeypatch.setattr(extrapolation, "TRAINING_FREE", ("hold_eval",))
  monkeypatch.setattr(extrapolation, "VARIANTS", (*trained, "hold_eval"))
  monkeypatch.setattr(extrapolation, "CONTROL_TRAINED", ("standard",))
  result = extrapolation.run(quick=True)
  json.dumps(result)
  cfg = result["config"]
  assert cfg["eval_lengths"] == [8, 16, 32, 64] and len(cfg["buckets"]) == 4
  assert result["lr_sweep"]["chosen_peak_lr"] in (1e-3, 3e-3)
  summary = result["summary"]
  for variant in extrapolation.VARIANTS:
    summ = summary[variant]
    assert len(summ["bucket_loss"]) == 4 and all(
      np.isfinite(s["mean"]) for s in summ["bucket_loss"]
    )
    assert all(s["std"] >= 0 and len(s["values"]) == 2 for s in summ["bucket_loss"])
    rel = [per[0]["mean"] for per in summ["length_relative"]]
    assert all(0 <= e <= 1 for e in rel), (variant, rel)
    assert np.asarray(summ["head_entropy"]["mean"]).shape == (1, 2, 6)
  # The ceiling holds every head at or below its seed's reference level; the training-free hold
  # changes nothing up to the trained length and holds the level beyond it.
  levels = np.asarray([r["reference_levels"] for r in result["runs"]["standard"]])  # [seeds, 1, 2]
  for seed, run in enumerate(result["runs"]["ceiling"]):
    assert np.all(np.asarray(run["head_entropy"]) <= levels[seed][..., None] + 2e-3)
  for seed, run in enumerate(result["runs"]["hold_eval"]):
    std = result["runs"]["standard"][seed]
    np.testing.assert_allclose(run["position_loss"][:8], std["position_loss"][:8], atol=1e-5)
    held = np.asarray(run["head_entropy"])[..., 3:]  # octaves past the trained length
    np.testing.assert_allclose(
      held, np.broadcast_to(levels[seed][..., None], held.shape), atol=2e-3
    )
  assert len(summary["ssmax"]["learned"]["mean"][0]) == 2
  assert set(result["control"]["summary"]) == {"standard", "hold_eval"}
  text = extrapolation.markdown(result)
  assert "[0,8)" in text and "Control arm" in text and "±" in text and "(0/2)" in text
  extrapolation.plot(result, tmp_path / "extrapolation.png")
  check_figures(figures, ["extrapolation.png"])


def test_attention_collapse_run_tiny(monkeypatch, tmp_path, figures):
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
  for setting in attention_collapse.SETTINGS:  # a floor holds every layer's mean at or above it
    floor = result["summary"][f"{setting}/entropy_floor"]
    assert np.all(np.asarray(floor["final_entropy_per_layer"]["mean"]) >= 0.5 - 0.02)
    touched = np.asarray(floor["final_floor_touched_per_layer"]["mean"])
    assert touched.shape == (1,) and np.all((touched >= 0) & (touched <= 1))
  text = attention_collapse.markdown(result)
  assert "±" in text and "seed spread" in text
  attention_collapse.plot(result, tmp_path / "attention_collapse.png")
  check_figures(figures, ["attention_collapse.png"])

"""Tests of entnorm_jax.sampling against float64 NumPy references of each sampler."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from entnorm_jax import sampling as ens

VOCAB = 12
DRAWS = 60_000


# ------------------------------------------------------------------ float64 NumPy references


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.where(np.isfinite(z), np.exp(z - np.max(z[np.isfinite(z)])), 0.0)
  return e / e.sum()


def _entropy(p):
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def _renormalize(p, keep):
  q = np.where(keep, p, 0.0)
  return q / q.sum()


def _smallest_set(p, order, mass):
  """Keeps entries in ``order`` until the kept mass reaches ``mass``."""
  keep = np.zeros(p.shape, bool)
  total = 0.0
  for i in order:
    if p[i] == 0 or total >= mass:
      break
    keep[i] = True
    total += p[i]
  return keep


def _ref_entropy(z, target):
  with np.errstate(divide="ignore"):
    logp = np.log(_softmax(z))
  valid = np.isfinite(logp)
  h = lambda g: _entropy(_softmax(np.where(valid, g * logp, -np.inf))) - target
  gamma = optimize.brentq(h, 1e-9, 1e3, xtol=1e-14)
  return _softmax(np.where(valid, gamma * logp, -np.inf))


def _reference(z, method, params, mu=None):
  """The distribution each method is defined to draw from, computed independently."""
  if method == "entropy":
    target = params.get("target_entropy", math.log(params.get("perplexity", 1.0)))
    return _ref_entropy(z, target)
  p = _softmax(np.asarray(z, np.float64) / params.get("temperature", 1.0))
  top = p == p.max()
  if method == "temperature":
    return p
  if method == "top_k":
    keep = p >= np.sort(p)[-params["k"]]
  elif method == "top_p":
    keep = _smallest_set(p, np.argsort(-p, kind="stable"), params["p"])
  elif method == "min_p":
    keep = p >= params["p"] * p.max()
  elif method == "typical":
    with np.errstate(divide="ignore"):
      score = np.abs(-np.log(p) - _entropy(p))
    keep = _smallest_set(p, np.argsort(score, kind="stable"), params["p"])
  elif method == "eta":
    eps = params["epsilon"]
    keep = p >= min(eps, math.sqrt(eps) * math.exp(-_entropy(p)))
  elif method == "mirostat":
    with np.errstate(divide="ignore"):
      keep = -np.log2(p) <= mu
  return _renormalize(p, keep | top)


CASES = [
  ("entropy", {"target_entropy": 1.1}),
  ("temperature", {"temperature": 0.7}),
  ("top_k", {"k": 4}),
  ("top_k", {"k": 6, "temperature": 1.6}),
  ("top_p", {"p": 0.8}),
  ("top_p", {"p": 0.6, "temperature": 0.8}),
  ("min_p", {"p": 0.15}),
  ("typical", {"p": 0.7}),
  ("eta", {"epsilon": 0.08}),
  ("mirostat", {"tau": 2.0}),
]


@functools.cache
def _jitted(method, static_items):
  """One compiled function per case: draws for a batch and the processed logits of one row."""
  static = dict(static_items)

  def f(key, z, where, params, state):
    batch = jnp.broadcast_to(z, (DRAWS, *z.shape))
    kw = dict(method=method, where=where, **params, **static)
    out = ens.sample(key, batch, state=None if state is None else state[0], **kw)
    return out, ens.process_logits(z, state=None if state is None else state[1], **kw)

  return jax.jit(f)


def _draw(key, z, where, method, params, state=None):
  """``(sample(key, [DRAWS] copies of z), process_logits(z))``."""
  static = tuple(sorted((k, v) for k, v in params.items() if k == "k"))
  dyn = {k: v for k, v in params.items() if k != "k"}
  return _jitted(method, static)(key, z, where, dyn, state)


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{sorted(p)}" for m, p in CASES])
def test_frequencies_match_defined_distribution(method, params, rng, key):
  z = (1.5 * rng.standard_normal(VOCAB)).astype(np.float32)
  z[VOCAB - 1] = -np.inf  # padded vocabulary
  banned = rng.choice(VOCAB - 1, size=2, replace=False)
  z[banned[0]] = 30.0  # banned even though the model prefers it
  where = np.ones(VOCAB, bool)
  where[banned] = False
  mu = 3.5
  expected = _reference(np.where(where, z, -np.inf), method, params, mu=mu)

  state = None
  if method == "mirostat":
    state = (ens.MirostatState(jnp.full((DRAWS,), mu)), ens.MirostatState(jnp.asarray(mu)))
  out, processed = _draw(key, jnp.asarray(z), jnp.asarray(where), method, params, state)
  tokens = out[0] if method == "mirostat" else out
  counts = np.bincount(np.asarray(tokens), minlength=VOCAB)

  support = expected > 0
  assert counts[~support].sum() == 0, (counts, expected)
  assert support.sum() >= 2  # a real test of frequencies, not a point mass
  chi2 = ((counts[support] - DRAWS * expected[support]) ** 2 / (DRAWS * expected[support])).sum()
  p_value = stats.chi2.sf(chi2, df=support.sum() - 1)
  assert p_value > 1e-3, (chi2, counts, DRAWS * expected)

  np.testing.assert_allclose(_softmax(np.asarray(processed)), expected, atol=2e-5)
  if method == "entropy":
    assert abs(_entropy(_softmax(np.asarray(processed))) - params["target_entropy"]) <= 2e-4


def test_wrong_distribution_is_detected(rng, key):
  """The chi-square check above can fail: top-p frequencies are far from the untruncated ones."""
  z = (1.5 * rng.standard_normal(VOCAB)).astype(np.float32)
  tokens, _ = _draw(key, jnp.asarray(z), None, "top_p", {"p": 0.8})
  counts = np.bincount(np.asarray(tokens), minlength=VOCAB)
  expected = DRAWS * _softmax(z)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert stats.chi2.sf(chi2, df=VOCAB - 1) < 1e-6


def test_entropy_hits_target_per_row(rng):
  n = 1000
  scales = rng.uniform(0.3, 6.0, size=(256, 1))
  z = (scales * rng.standard_normal((256, n))).astype(np.float32)
  where = rng.random((256, n)) > 0.2
  log_n = np.log(where.sum(-1))
  fraction = rng.uniform(0.05, 0.98, size=256)

  @jax.jit
  def spellings(z, where, fraction, log_n):
    relative = ens.process_logits(
      z, method="entropy", where=where, target_entropy=fraction, relative=True
    )
    nats = ens.entropy_logits(z, fraction * log_n, where=where)
    perplexity = ens.process_logits(z, where=where, perplexity=jnp.exp(fraction * log_n))
    ceiling = ens.process_logits(z, where=where, target_entropy=fraction * log_n, ceiling=True)
    return relative, nats, perplexity, ceiling

  out, nats, perplexity, ceiling = spellings(z, where, fraction, log_n)
  model_h = np.array([_entropy(_softmax(row)) for row in np.where(where, z, -np.inf)])
  ceiling_h = np.array([_entropy(_softmax(row)) for row in np.asarray(ceiling, np.float64)])
  np.testing.assert_allclose(ceiling_h, np.minimum(model_h, fraction * log_n), atol=2e-4)
  assert 20 < np.sum(model_h < fraction * log_n) < 236  # both kinds of rows are present
  np.testing.assert_allclose(nats, out, atol=1e-4)
  np.testing.assert_allclose(perplexity, out, atol=1e-4)
  out = np.asarray(out, np.float64)
  assert np.all(np.isneginf(out[~where]))
  h = np.array([_entropy(_softmax(row)) for row in out])
  np.testing.assert_allclose(h, fraction * log_n, atol=2e-4, rtol=0)
  # Nothing is truncated: the result is γ·(z - max z) with γ > 0 on every valid entry.
  shifted = np.where(where, z - np.max(np.where(where, z, -np.inf), -1, keepdims=True), 0.0)
  kept = np.where(where, out, 0.0)
  gamma = (kept * shifted).sum(-1, keepdims=True) / (shifted * shifted).sum(-1, keepdims=True)
  np.testing.assert_allclose(kept, gamma * shifted, rtol=1e-5, atol=1e-5 * np.abs(kept).max())
  assert np.all(gamma > 0)


def test_per_row_parameters_equal_row_by_row(rng):
  z = jnp.asarray(2.0 * rng.standard_normal((4, 30)), jnp.float32)
  p = jnp.array([0.3, 0.6, 0.9, 1.0])
  batched = ens.top_p_logits(z, p)
  for i in range(4):
    np.testing.assert_array_equal(batched[i], ens.top_p_logits(z[i], p[i]))


def test_bfloat16_logits(rng, key):
  dtype = jnp.bfloat16
  z = jnp.asarray(3.0 * rng.standard_normal((8, 64)), dtype)
  out = ens.entropy_logits(z, 1.5)
  assert out.dtype == dtype
  rows = np.asarray(out.astype(jnp.float32), np.float64)
  h = [_entropy(_softmax(r)) for r in rows]
  np.testing.assert_allclose(h, 1.5, atol=2e-2)  # bf16 rounding of γ·z
  tokens = ens.sample(key, z, method="top_p", p=0.9)
  assert tokens.shape == (8,) and tokens.dtype == jnp.int32


def test_greedy_is_argmax(rng, key):
  z = jnp.asarray(rng.standard_normal((16, 100)), jnp.float32)
  np.testing.assert_array_equal(ens.sample(key, z, method="greedy"), jnp.argmax(z, -1))


def test_jit_and_vmap(rng, key):
  z = jnp.asarray(rng.standard_normal((5, 70)), jnp.float32)
  p = jnp.array([0.02, 0.05, 0.1, 0.2, 0.5])
  eager = ens.sample(key, z, method="min_p", p=p)
  jitted = jax.jit(lambda k, x, p: ens.sample(k, x, method="min_p", p=p))(key, z, p)
  np.testing.assert_array_equal(eager, jitted)
  keys = jax.random.split(key, 3)
  many = jax.vmap(lambda k: ens.sample(k, z, method="min_p", p=p))(keys)
  assert many.shape == (3, 5)
  for i in range(3):
    np.testing.assert_array_equal(many[i], ens.sample(keys[i], z, method="min_p", p=p))


def test_mirostat_update_rule(rng, key):
  z = jnp.asarray(2.0 * rng.standard_normal((64, 30)), jnp.float32)
  mu = jnp.asarray(rng.uniform(1.0, 5.0, 64), jnp.float32)
  tokens, state = ens.sample(
    key, z, method="mirostat", tau=3.0, eta=0.2, state=ens.MirostatState(mu)
  )
  for i in range(64):
    q = _reference(np.asarray(z[i]), "mirostat", {}, mu=float(mu[i]))
    surprise = -np.log2(q[int(tokens[i])])
    np.testing.assert_allclose(state.mu[i], mu[i] - 0.2 * (surprise - 3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "method,params,error",
  [
    ("top_p", {"p": 0.0}, ValueError),
    ("top_p", {"p": 1.5}, ValueError),
    ("top_k", {"k": -3}, ValueError),
    ("top_k", {"k": 2.5}, TypeError),
    ("entropy", {"target_entropy": 1.0, "perplexity": 3.0}, ValueError),
    ("entropy", {}, ValueError),
    ("entropy", {"perplexity": 0.5}, ValueError),
    ("entropy", {"target_entropy": -0.1}, ValueError),
    ("temperature", {"temperature": 0.0}, ValueError),
    ("min_p", {"p": -0.1}, ValueError),
    ("typical", {"p": np.array([0.5, 1.2])}, ValueError),
    ("eta", {"epsilon": 1.0}, ValueError),
    ("mirostat", {"tau": -1.0}, ValueError),
    ("top_p", {"k": 3}, ValueError),
    ("nucleus", {"p": 0.9}, ValueError),
    ("top_p", {"p": np.full(3, 0.9)}, ValueError),  # does not broadcast to batch (2,)
  ],
)
def test_invalid_parameters_raise(method, params, error, key):
  with pytest.raises(error):
    ens.sample(key, jnp.ones((2, 10)), method=method, **params)


def test_bad_mask_shape_raises(key):
  with pytest.raises(ValueError, match="does not broadcast"):
    ens.sample(key, jnp.ones((2, 10)), perplexity=2.0, where=jnp.ones(7, bool))


# ----------------------------------------------------------------------------------- generate


def _bigram(table):
  def step(state, tokens):
    return table[tokens], state + 1

  return step


def test_generate_equals_a_loop_of_sample(rng, key):
  """Mirostat, the stateful method: μ must be carried through the scan."""
  table = jnp.asarray(2.0 * rng.standard_normal((VOCAB, VOCAB)), jnp.float32)
  prompt = jnp.asarray(rng.integers(0, VOCAB, (3, 4)), jnp.int32)
  steps = 6
  gen = jax.jit(
    lambda k: ens.generate(
      k, _bigram(table), jnp.int32(0), prompt, steps, method="mirostat", tau=2.5
    )
  )(key)
  assert gen.tokens.shape == gen.log_probs.shape == gen.entropies.shape == (3, steps)
  assert int(gen.state) == prompt.shape[1] + steps  # every token was fed

  keys = jax.random.split(key, steps)
  prev, state = prompt[:, -1], ens.mirostat_init(2.5, (3,))
  for t in range(steps):
    logits = table[prev]
    processed = ens.process_logits(logits, method="mirostat", state=state, tau=2.5)
    tok, state = ens.sample(keys[t], logits, method="mirostat", state=state, tau=2.5)
    np.testing.assert_array_equal(gen.tokens[:, t], tok)
    log_p = jax.nn.log_softmax(logits)[jnp.arange(3), tok]
    np.testing.assert_allclose(gen.log_probs[:, t], log_p, atol=1e-5)
    h = [_entropy(_softmax(r)) for r in np.asarray(processed)]
    np.testing.assert_allclose(gen.entropies[:, t], h, atol=1e-4)
    prev = tok
  np.testing.assert_allclose(gen.sampler_state.mu, state.mu, atol=1e-5)


def test_generate_entropy_method_masked(rng, key):
  table = jnp.asarray(2.0 * rng.standard_normal((VOCAB, VOCAB)), jnp.float32)
  where = jnp.arange(VOCAB) % 3 != 0
  prompt = jnp.ones((2, 1), jnp.int32)
  gen = ens.generate(key, _bigram(table), 0, prompt, 20, where=where, perplexity=3.0)
  assert np.all(np.asarray(gen.tokens) % 3 != 0)
  np.testing.assert_allclose(gen.entropies, np.log(3.0), atol=2e-4)
  prev = jnp.concatenate([prompt, gen.tokens[:, :-1]], axis=1)
  log_p = jax.nn.log_softmax(table[prev])
  np.testing.assert_allclose(
    gen.log_probs, jnp.take_along_axis(log_p, gen.tokens[..., None], -1)[..., 0], atol=1e-5
  )


def test_generate_validates(rng, key):
  table = jnp.asarray(rng.standard_normal((VOCAB, VOCAB)), jnp.float32)
  with pytest.raises(ValueError, match="prompt_tokens"):
    ens.generate(key, _bigram(table), 0, jnp.ones((4,), jnp.int32), 3, perplexity=3.0)
  with pytest.raises(ValueError, match="top_p"):
    ens.generate(key, _bigram(table), 0, jnp.ones((2, 1), jnp.int32), 3, method="top_p", p=2.0)

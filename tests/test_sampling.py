"""Tests of entnorm_jax.sampling against float64 NumPy references of each sampler."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_grads_each
from jax.test_util import check_grads
from references import entropy64, entropy_softmax64, softmax64
from scipy import stats

from entnorm_jax import sampling as ens

VOCAB = 12
DRAWS = 60_000


# ------------------------------------------------------------------ float64 NumPy references


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


def _reference(z, method, params, mu=None):
  """The distribution each method is defined to draw from, computed independently."""
  if method == "entropy":
    target = params.get("target_entropy", math.log(params.get("perplexity", 1.0)))
    return entropy_softmax64(z, target)
  p = softmax64(np.asarray(z, np.float64) / params.get("temperature", 1.0))
  top = p == p.max()
  if method == "temperature":
    return p
  if method == "top_k":
    keep = p >= np.sort(p)[-params["top_k"]]
  elif method == "top_p":
    keep = _smallest_set(p, np.argsort(-p, kind="stable"), params["top_p"])
  elif method == "min_p":
    keep = p >= params["min_p"] * p.max()
  elif method == "typical":  # Meister et al.: no argmax forced in
    with np.errstate(divide="ignore"):
      score = np.abs(-np.log(p) - entropy64(p))
    return _renormalize(p, _smallest_set(p, np.argsort(score, kind="stable"), params["typical_p"]))
  elif method == "eta":
    eps = params["eta_cutoff"]
    keep = p >= min(eps, math.sqrt(eps) * math.exp(-entropy64(p)))
  elif method == "mirostat":
    with np.errstate(divide="ignore"):
      keep = -np.log2(p) <= mu
  return _renormalize(p, keep | top)  # HF's min_tokens_to_keep=1, llama.cpp's mirostat: argmax


CASES = [
  ("entropy", {"target_entropy": 1.1}),
  ("temperature", {"temperature": 0.7}),
  ("top_k", {"top_k": 4}),
  ("top_k", {"top_k": 6, "temperature": 1.6}),
  ("top_p", {"top_p": 0.8}),
  ("top_p", {"top_p": 0.6, "temperature": 0.8}),
  ("min_p", {"min_p": 0.15}),
  ("typical", {"typical_p": 0.7}),
  ("typical", {"typical_p": 0.35}),
  ("eta", {"eta_cutoff": 0.08}),
  ("mirostat", {"mirostat_tau": 2.0}),
]


@functools.cache
def _jitted(method, static_items):
  """One compiled function per case: draws for a batch and the processed logits of one row."""
  static = dict(static_items)

  def f(key, z, where, params, state):
    batch = jnp.broadcast_to(z, (DRAWS, *z.shape))
    if method == "mirostat":
      tokens, _ = ens.sample_mirostat(key, batch, state[0], where=where, **params)
      return tokens, ens.process_logits(z, method=method, where=where, state=state[1], **params)
    kw = dict(method=method, where=where, **params, **static)
    return ens.sample(key, batch, **kw), ens.process_logits(z, **kw)

  return jax.jit(f)


def _draw(key, z, where, method, params, state=None):
  """``(sample(key, [DRAWS] copies of z), process_logits(z))``."""
  static = tuple(sorted((k, v) for k, v in params.items() if k == "top_k"))
  dyn = {k: v for k, v in params.items() if k != "top_k"}
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
  tokens, processed = _draw(key, jnp.asarray(z), jnp.asarray(where), method, params, state)
  counts = np.bincount(np.asarray(tokens), minlength=VOCAB)

  support = expected > 0
  assert counts[~support].sum() == 0, (counts, expected)
  assert support.sum() >= 2  # a real test of frequencies, not a point mass
  chi2 = ((counts[support] - DRAWS * expected[support]) ** 2 / (DRAWS * expected[support])).sum()
  p_value = stats.chi2.sf(chi2, df=support.sum() - 1)
  assert p_value > 1e-3, (chi2, counts, DRAWS * expected)

  np.testing.assert_allclose(softmax64(processed), expected, atol=2e-5)
  if method == "entropy":
    assert abs(entropy64(softmax64(processed)) - params["target_entropy"]) <= 2e-4


def test_wrong_distribution_is_detected(rng, key):
  """The chi-square check above can fail: top-p frequencies are far from the untruncated ones."""
  z = (1.5 * rng.standard_normal(VOCAB)).astype(np.float32)
  tokens, _ = _draw(key, jnp.asarray(z), None, "top_p", {"top_p": 0.8})
  counts = np.bincount(np.asarray(tokens), minlength=VOCAB)
  expected = DRAWS * softmax64(z)
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
    relative = ens.process_logits(z, method="entropy", where=where, target_fraction=fraction)
    nats = ens.entropy_logits(z, fraction * log_n, where=where)
    perplexity = ens.process_logits(z, where=where, perplexity=jnp.exp(fraction * log_n))
    ceiling = ens.process_logits(z, where=where, max_entropy=fraction * log_n)
    return relative, nats, perplexity, ceiling

  out, nats, perplexity, ceiling = spellings(z, where, fraction, log_n)
  model_h = entropy64(softmax64(np.where(where, z, -np.inf)))
  ceiling_h = entropy64(softmax64(ceiling))
  np.testing.assert_allclose(ceiling_h, np.minimum(model_h, fraction * log_n), atol=2e-4)
  assert 20 < np.sum(model_h < fraction * log_n) < 236  # both kinds of rows are present
  np.testing.assert_allclose(nats, out, atol=1e-4)
  np.testing.assert_allclose(perplexity, out, atol=1e-4)
  out = np.asarray(out, np.float64)
  assert np.all(np.isneginf(out[~where]))
  h = entropy64(softmax64(out))
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
  batched = ens.top_p_logits(z, top_p=p)
  for i in range(4):
    np.testing.assert_array_equal(batched[i], ens.top_p_logits(z[i], top_p=p[i]))


def test_bfloat16_logits(rng, key):
  dtype = jnp.bfloat16
  z = jnp.asarray(3.0 * rng.standard_normal((8, 64)), dtype)
  out = ens.entropy_logits(z, 1.5)
  assert out.dtype == dtype
  rows = np.asarray(out.astype(jnp.float32), np.float64)
  h = entropy64(softmax64(rows))
  np.testing.assert_allclose(h, 1.5, atol=2e-2)  # bf16 rounding of γ·z
  tokens = ens.sample(key, z, method="top_p", top_p=0.9)
  assert tokens.shape == (8,) and tokens.dtype == jnp.int32


def test_greedy_is_argmax(rng, key):
  z = jnp.asarray(rng.standard_normal((16, 100)), jnp.float32)
  np.testing.assert_array_equal(ens.sample(key, z, method="greedy"), jnp.argmax(z, -1))


def test_jit_and_vmap(rng, key):
  z = jnp.asarray(rng.standard_normal((5, 70)), jnp.float32)
  p = jnp.array([0.02, 0.05, 0.1, 0.2, 0.5])
  eager = ens.sample(key, z, method="min_p", min_p=p)
  jitted = jax.jit(lambda k, x, p: ens.sample(k, x, method="min_p", min_p=p))(key, z, p)
  np.testing.assert_array_equal(eager, jitted)
  keys = jax.random.split(key, 3)
  many = jax.vmap(lambda k: ens.sample(k, z, method="min_p", min_p=p))(keys)
  assert many.shape == (3, 5)
  for i in range(3):
    np.testing.assert_array_equal(many[i], ens.sample(keys[i], z, method="min_p", min_p=p))


def test_top_p_and_typical_under_vmap(rng):
  """vmap turns the candidate/bisection ``lax.cond`` into a select: same answers as a loop."""
  z = jnp.asarray(4.0 * rng.standard_normal((3, 2000)), jnp.float32)
  p = jnp.array([0.5, 0.99, 0.99999])  # the last rows need more than the top-k candidates
  f = jax.jit(jax.vmap(lambda z, p: (ens.top_p_logits(z, p), ens.typical_logits(z, p))))
  top_p, typical = f(z, p)
  for i in range(3):
    np.testing.assert_array_equal(top_p[i], ens.top_p_logits(z[i], top_p=p[i]))
    np.testing.assert_array_equal(typical[i], ens.typical_logits(z[i], typical_p=p[i]))


def test_mirostat_update_rule(rng, key):
  z = jnp.asarray(2.0 * rng.standard_normal((64, 30)), jnp.float32)
  mu = jnp.asarray(rng.uniform(1.0, 5.0, 64), jnp.float32)
  tokens, state = ens.sample_mirostat(
    key, z, ens.MirostatState(mu), mirostat_tau=3.0, mirostat_eta=0.2
  )
  for i in range(64):
    q = _reference(np.asarray(z[i]), "mirostat", {}, mu=float(mu[i]))
    surprise = -np.log2(q[int(tokens[i])])
    np.testing.assert_allclose(state.mu[i], mu[i] - 0.2 * (surprise - 3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "method,params,error",
  [
    ("top_p", {"top_p": 0.0}, ValueError),
    ("top_p", {"top_p": 1.5}, ValueError),
    ("top_k", {"top_k": -3}, ValueError),
    ("top_k", {"top_k": 2.5}, TypeError),
    ("entropy", {"target_entropy": 1.0, "perplexity": 3.0}, ValueError),
    ("entropy", {}, ValueError),
    ("entropy", {"perplexity": 0.5}, ValueError),
    ("entropy", {"target_entropy": -0.1}, ValueError),
    ("entropy", {"target_fraction": 1.5}, ValueError),
    ("entropy", {"target_entropy": 1.0, "relative": True}, ValueError),
    ("entropy", {"max_entropy": 1.0, "ceiling": True}, ValueError),
    ("entropy", {"target_entropy": 1.0, "max_entropy": 2.0}, ValueError),
    ("temperature", {"temperature": 0.0}, ValueError),
    ("min_p", {"min_p": -0.1}, ValueError),
    ("typical", {"typical_p": np.array([0.5, 1.2])}, ValueError),
    ("eta", {"eta_cutoff": 1.0}, ValueError),
    ("mirostat", {"mirostat_tau": -1.0}, ValueError),
    ("mirostat", {"mirostat_tau": 3.0, "mirostat_eta": -0.1}, ValueError),
    ("top_p", {"top_k": 3}, ValueError),
    ("nucleus", {"top_p": 0.9}, ValueError),
    ("top_p", {"top_p": np.full(3, 0.9)}, ValueError),  # does not broadcast to batch (2,)
  ],
)
def test_invalid_parameters_raise(method, params, error, key):
  z = jnp.ones((2, 10))
  with pytest.raises(error):
    if method == "mirostat":
      ens.sample_mirostat(key, z, None, **params)
    else:
      ens.sample(key, z, method=method, **params)


def test_bad_mask_shape_raises(key):
  with pytest.raises(ValueError, match="does not broadcast"):
    ens.sample(key, jnp.ones((2, 10)), perplexity=2.0, where=jnp.ones(7, bool))


# ------------------------------------------------------------------ familiar parameter names

# method -> (the Hugging Face / llama.cpp name, a value, the helper, the old short name)
FAMILIAR = {
  "top_k": ("top_k", 3, ens.top_k_logits, "k"),
  "top_p": ("top_p", 0.7, ens.top_p_logits, "p"),
  "min_p": ("min_p", 0.2, ens.min_p_logits, "p"),
  "typical": ("typical_p", 0.6, ens.typical_logits, "p"),
  "eta": ("eta_cutoff", 0.05, ens.eta_logits, "epsilon"),
}


@pytest.mark.parametrize("method", sorted(FAMILIAR))
def test_familiar_names_everywhere(method, rng, key):
  name, value, helper, _ = FAMILIAR[method]
  z = (1.5 * rng.standard_normal((2, VOCAB))).astype(np.float32)
  expected = np.stack([_reference(row, method, {name: value}) for row in z])
  for out in (
    helper(z, value),
    helper(z, **{name: value}),
    ens.process_logits(z, method=method, **{name: value}),
  ):
    np.testing.assert_allclose(_softmax_rows(out), expected, atol=2e-6)
  tokens = ens.sample(key, z, method=method, **{name: value})
  assert tokens.shape == (2,) and np.all(expected[np.arange(2), np.asarray(tokens)] > 0)
  table = jnp.asarray(z[np.arange(VOCAB) % 2])
  gen = ens.generate(
    key, _bigram(table), 0, jnp.zeros((2, 1), jnp.int32), 2, method=method, **{name: value}
  )
  assert gen.tokens.shape == (2, 2)


@pytest.mark.parametrize("method", sorted(FAMILIAR))
def test_old_short_names_raise_with_the_new_name(method, key):
  name, value, helper, old = FAMILIAR[method]
  z = jnp.ones((2, VOCAB))
  match = f"{name}="
  with pytest.raises(ValueError, match=match):
    helper(z, **{old: value})
  with pytest.raises(ValueError, match=match):
    ens.sample(key, z, method=method, **{old: value})
  with pytest.raises(ValueError, match=match):
    ens.process_logits(z, method=method, **{old: value})
  with pytest.raises(ValueError, match=match):
    ens.generate(key, _bigram(z), 0, jnp.zeros((2, 1), jnp.int32), 2, method=method, **{old: value})


def test_old_mirostat_names_raise(key):
  z = jnp.ones((2, VOCAB))
  with pytest.raises(ValueError, match="mirostat_tau="):
    ens.sample_mirostat(key, z, None, tau=3.0)
  with pytest.raises(ValueError, match="mirostat_eta="):
    ens.sample_mirostat(key, z, None, mirostat_tau=3.0, eta=0.2)
  with pytest.raises(ValueError, match="mirostat_tau="):
    ens.generate(key, _bigram(z), 0, jnp.zeros((2, 1), jnp.int32), 2, method="mirostat", tau=3.0)
  with pytest.raises(ValueError, match="method='top_p'"):  # a parameter of another method
    ens.sample(key, z, top_p=0.9)


def _softmax_rows(logits):
  return softmax64(np.reshape(logits, (-1, VOCAB)))


# ------------------------------------------------------------- top-p / typical in float32


def _tail_reference(z, order_key, mass):
  """float64 ``(tail, kept)``: entries by decreasing ``order_key``, T_i = mass from i to the end."""
  z = np.asarray(z, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  order = np.argsort(-order_key(p), axis=-1, kind="stable")
  p_sorted = np.take_along_axis(p, order, -1)
  tail_sorted = np.cumsum(p_sorted[:, ::-1], -1)[:, ::-1]
  tail = np.empty_like(tail_sorted)
  np.put_along_axis(tail, order, tail_sorted, -1)
  return tail, tail > 1.0 - mass


def _typical_key(p):
  with np.errstate(divide="ignore"):
    log_p = np.log(p)
  h = -np.sum(np.where(p > 0, p * log_p, 0.0), -1, keepdims=True)
  return -np.abs(-log_p - h)


@pytest.fixture(scope="module")
def big_logits():
  """[4, 50257] float32 logits of scale 6: 13k–20k tokens hold the last 1e-6 of the mass."""
  return 6.0 * np.random.default_rng(7).standard_normal((4, 50257)).astype(np.float32)


def test_top_p_one_keeps_every_token(big_logits):
  np.testing.assert_array_equal(ens.top_p_logits(jnp.array([0.0, -20.0]), 1.0), [0.0, -20.0])
  np.testing.assert_array_equal(ens.top_p_logits(jnp.array([0.0, -200.0]), 1.0), [0.0, -200.0])
  z = jnp.asarray(big_logits)
  for out in (ens.top_p_logits(z, 1.0), ens.typical_logits(z, 1.0)):
    np.testing.assert_array_equal(np.isfinite(out), True)
  where = np.random.default_rng(3).random(big_logits.shape) > 0.3
  out = ens.top_p_logits(z, 1.0, where=where)
  np.testing.assert_array_equal(np.isfinite(out), where)


@pytest.mark.parametrize("method", ["top_p", "typical"])
def test_smallest_set_is_exact_in_float32(method, big_logits):
  """The kept set is float64's "smallest set with mass >= p" up to ties with the cut (1e-4)."""
  from entnorm_jax._src import sampling as impl

  order_key = (lambda p: p) if method == "top_p" else _typical_key
  helper = ens.top_p_logits if method == "top_p" else ens.typical_logits
  masses = [0.3, 0.9, 0.99, 0.9999, 0.999999]
  counts = []
  for mass in masses:
    mass32 = float(np.float32(mass))  # the value the float32 computation is given
    tail, _ = _tail_reference(big_logits, order_key, mass32)
    kept = np.isfinite(np.asarray(helper(jnp.asarray(big_logits), mass)))
    limit = 1.0 - mass32
    surely_kept, surely_cut = tail > limit * (1 + 1e-4), tail <= limit * (1 - 1e-4)
    assert np.all(kept[surely_kept]), (mass, kept.sum(-1), surely_kept.sum(-1))
    assert not np.any(kept[surely_cut]), (mass, kept.sum(-1), surely_kept.sum(-1))
    counts.append(kept.sum(-1))
  counts = np.concatenate(counts)
  # Both ways to the cut are exercised: inside the top-k candidates and by bisection beyond them.
  assert counts.min() < impl._CANDIDATES < counts.max()


def test_top_p_float64(rng, x64):
  z = jnp.asarray(6.0 * rng.standard_normal((3, 5000)), jnp.float64)
  for mass in (0.5, 0.999, 1 - 1e-9):
    _, expected = _tail_reference(np.asarray(z), lambda p: p, mass)
    out = ens.top_p_logits(z, mass)
    assert out.dtype == jnp.float64
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), expected)


def test_typical_follows_the_paper():
  """Meister et al. / HF TypicalLogitsWarper: the argmax is not forced into the typical set."""
  p = np.array([0.30, 0.20, 0.19, 0.18, 0.13])
  z = jnp.log(jnp.asarray(p, jnp.float32))
  np.testing.assert_array_equal(np.isfinite(ens.typical_logits(z, 0.3)), [0, 1, 1, 0, 0])
  perm = np.array([3, 0, 4, 2, 1])  # the order of the vocabulary changes nothing
  np.testing.assert_array_equal(np.isfinite(ens.typical_logits(z[perm], 0.3)), [0, 0, 0, 1, 1])
  # A tiny mass keeps exactly the most typical token (HF's min_tokens_to_keep=1), not the argmax.
  np.testing.assert_array_equal(np.isfinite(ens.typical_logits(z, 1e-6)), [0, 1, 0, 0, 0])


def test_truncation_keeps_the_argmax_like_hugging_face(rng, key):
  """top-k/top-p/min-p (HF, min_tokens_to_keep=1) and mirostat (llama.cpp) keep the argmax.

  Eta needs no rule: its cut-off min(η, sqrt(η) e^{-H}) < e^{-H} <= max p never reaches the argmax.
  """
  z = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
  argmax = np.asarray(jnp.argmax(z, -1))
  only_argmax = np.arange(50) == argmax[:, None]
  for out in (
    ens.top_k_logits(z, 1),
    ens.top_p_logits(z, 1e-6),
    ens.min_p_logits(z, 1.0),
    ens.process_logits(
      z, method="mirostat", state=ens.MirostatState(jnp.zeros(4)), mirostat_tau=1.0
    ),
    ens.process_logits(z, method="greedy"),
  ):
    np.testing.assert_array_equal(np.isfinite(out), only_argmax)
  assert np.all(np.isfinite(np.asarray(ens.eta_logits(z, 0.999)))[only_argmax])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA CPU's compiled HLO")
def test_truncation_does_not_sort_the_vocabulary():
  """top-k, top-p and typical use a bounded top-k (plus bisection), never a sort of whole rows.

  XLA folds a slice taken at the end of top_k's output back into a full sort: this guards the
  speed of the samplers against that.
  """
  z = jnp.zeros((8, 50_000), jnp.float32)
  for method, params in [
    ("top_k", {"top_k": 50}),
    ("top_p", {"top_p": 0.9}),
    ("typical", {"typical_p": 0.9}),
  ]:
    f = lambda z, params=params, method=method: ens.process_logits(z, method=method, **params)
    hlo = jax.jit(f).lower(z).compile().as_text()
    assert " sort(" not in hlo, method


# -------------------------------------------------------------------- one return type, state


def test_sample_returns_tokens_for_every_method(rng, key):
  z = jnp.asarray(rng.standard_normal((3, VOCAB)), jnp.float32)
  params = {
    "entropy": {"perplexity": 3.0},
    "temperature": {"temperature": 0.8},
    "greedy": {},
    **{m: {name: value} for m, (name, value, _, _) in FAMILIAR.items()},
  }
  assert set(params) | {"mirostat"} == set(ens_methods())
  for method, kw in params.items():
    tokens = ens.sample(key, z, method=method, **kw)
    assert isinstance(tokens, jax.Array) and tokens.shape == (3,) and tokens.dtype == jnp.int32
  with pytest.raises(ValueError, match="sample_mirostat"):
    ens.sample(key, z, method="mirostat", mirostat_tau=3.0)
  tokens, state = ens.sample_mirostat(key, z, None, mirostat_tau=3.0)
  assert tokens.shape == (3,) and isinstance(state, ens.MirostatState) and state.mu.shape == (3,)
  with pytest.raises(ValueError, match="mirostat"):  # a state only goes with mirostat
    ens.process_logits(z, method="top_p", top_p=0.5, state=state)


def ens_methods():
  from entnorm_jax._src import sampling as impl

  return impl._METHODS


# ----------------------------------------------------------------------------------- gradients


def test_entropy_logits_check_grads(rng, x64):
  z = jnp.asarray(2.0 * rng.standard_normal((3, 7)), jnp.float64)
  target = jnp.array([0.4, 1.0, 1.6])
  where = jnp.asarray(rng.random((3, 7)) > 0.3).at[:, 0].set(True)
  functions = {  # one program for both (check_grads_each names the one that fails)
    "entropy_logits": lambda z: ens.entropy_logits(z, target),
    "masked": lambda z: jnp.where(where, ens.entropy_logits(z, 0.8, where=where), 0.0),
  }
  check_grads_each(functions, (z,), order=2, modes=("fwd", "rev"))


def test_shifted_logits_carry_the_shift_gradient(rng, x64):
  """out = z - max z on kept entries: ∂out_i/∂z_j = δ_ij - δ_ja (a the argmax), 0 where cut."""
  z = jnp.asarray(rng.standard_normal((2, 9)), jnp.float64)
  a = np.asarray(jnp.argmax(z, -1))
  for name, f in {
    "entropy": lambda z: ens.entropy_logits(z, 1.2),
    "temperature": lambda z: ens.process_logits(z, method="temperature", temperature=0.7),
    "top_k": lambda z: ens.top_k_logits(z, 4),
  }.items():
    jac = np.asarray(jax.jit(jax.jacrev(f))(z))  # [2, 9, 2, 9]
    np.testing.assert_allclose(jac, np.asarray(jax.jit(jax.jacfwd(f))(z)), atol=1e-12)
    for r in range(2):
      np.testing.assert_allclose(jac[r, a[r], r], 0.0, atol=1e-12, err_msg=name)  # out_a ≡ 0
      np.testing.assert_allclose(jac[r, :, 1 - r], 0.0, atol=1e-12, err_msg=name)
  jac = np.asarray(jax.jit(jax.jacrev(lambda z: ens.top_k_logits(z, 4)))(z))
  kept = np.isfinite(np.asarray(ens.top_k_logits(z, 4)))
  for r in range(2):
    expected = np.eye(9) - (np.arange(9) == a[r])[None, :]
    np.testing.assert_allclose(jac[r, :, r], np.where(kept[r][:, None], expected, 0.0))
  t = jax.jit(lambda z: ens.process_logits(z, method="temperature", temperature=0.7))
  check_grads(t, (z,), order=2, modes=("fwd", "rev"))


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
      k, _bigram(table), jnp.int32(0), prompt, steps, method="mirostat", mirostat_tau=2.5
    )
  )(key)
  assert gen.tokens.shape == gen.log_probs.shape == gen.entropies.shape == (3, steps)
  assert int(gen.state) == prompt.shape[1] + steps  # every token was fed

  keys = jax.random.split(key, steps)
  prev, state = prompt[:, -1], ens.mirostat_init(2.5, (3,))
  for t in range(steps):
    logits = table[prev]
    processed = ens.process_logits(logits, method="mirostat", state=state, mirostat_tau=2.5)
    tok, state = ens.sample_mirostat(keys[t], logits, state, mirostat_tau=2.5)
    np.testing.assert_array_equal(gen.tokens[:, t], tok)
    log_p = jax.nn.log_softmax(logits)[jnp.arange(3), tok]
    np.testing.assert_allclose(gen.log_probs[:, t], log_p, atol=1e-5)
    h = entropy64(softmax64(processed))
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
    prompt = jnp.ones((2, 1), jnp.int32)
    ens.generate(key, _bigram(table), 0, prompt, 3, method="top_p", top_p=2.0)

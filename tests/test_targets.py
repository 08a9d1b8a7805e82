"""Targets that say their unit, entropy bounds, the rules for targets out of range, and the
entropies the modules sow (issue 20, parts 1-3)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import check_grads_each, float64
from flax import linen as nn
from flax import nnx

import entnorm_jax as en
from entnorm_jax import attention as ena
from entnorm_jax import linen as enl
from entnorm_jax import nnx as ennx
from entnorm_jax import sampling as ens


def _rows(seed=0, shape=(6, 12), scale=2.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale


def _qkv(seed=0, shape=(2, 9, 2, 4)):
  return jax.random.normal(jax.random.key(seed), (3, *shape))


# ------------------------------------------------------------------------------ units and errors


CORE = {
  "entropy_softmax": lambda x, **kw: en.entropy_softmax(x, **kw),
  "entropy_log_softmax": lambda x, **kw: en.entropy_log_softmax(x, **kw),
  "solve_gamma": lambda x, **kw: en.solve_gamma(x, **kw),
  "entropy_normalize": lambda x, **kw: en.entropy_normalize(jax.nn.softmax(x), **kw),
  "cross_entropy": lambda x, **kw: en.entropy_softmax_cross_entropy(x, jax.nn.softmax(x), **kw),
  "integer_cross_entropy": lambda x, **kw: en.entropy_softmax_cross_entropy_with_integer_labels(
    x, jnp.zeros(x.shape[0], int), **kw
  ),
}

BAD = [
  (dict(target_fraction=2.0), r"target_fraction is a fraction of log\(n_valid\).*\[0, 1\].*"
   r"target_entropy="),
  (dict(target_entropy=-1.0), r"target_entropy is in nats and must be >= 0.*target_fraction="),
  (dict(min_fraction=-0.5), r"min_fraction is a fraction.*min_entropy="),
  (dict(max_entropy=-0.5), r"max_entropy is in nats.*max_fraction="),
  (dict(target_entropy=0.5, relative=True), r"relative= was removed.*target_fraction="),
  (dict(target_entropy=0.5, target_fraction=0.5), "exactly one"),
  (dict(target_entropy=0.5, max_entropy=1.0), "exactly one"),
  (dict(min_entropy=2.0, max_entropy=1.0), "lies above"),
  (dict(min_entropy=0.5, min_fraction=0.5), "at most one floor"),
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(CORE))
@pytest.mark.parametrize("kwargs, match", BAD)
def test_core_rejects_meaningless_targets(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    CORE[name](_rows(), **kwargs)


def test_core_needs_a_target():
  with pytest.raises(ValueError, match="needs a target"):
    en.entropy_softmax(_rows())


@pytest.mark.parametrize("kwargs, match", BAD)
@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_attention_rejects_meaningless_targets(kwargs, match, implementation):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=match):
    ena.entropy_attention(q, k, v, implementation=implementation, **kwargs)
  with pytest.raises(ValueError, match=match):
    enl.entropy_dot_product_attention(q, k, v, implementation=implementation, **kwargs)


@pytest.mark.parametrize("kwargs, match", BAD)
def test_modules_reject_meaningless_targets(kwargs, match):
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  with pytest.raises(ValueError, match=match):
    enl.EntropyMultiHeadAttention(num_heads=2, **kwargs).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=match):
    ennx.EntropyMultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize(
  "kwargs, match",
  BAD[:2] + [(dict(max_entropy=1.0, ceiling=True), "ceiling= was removed.*max_entropy=")],
)
def test_samplers_reject_meaningless_targets(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ens.sample(jax.random.key(0), _rows(), method="entropy", **kwargs)
  if "ceiling" not in kwargs:
    with pytest.raises(ValueError, match=match):
      ens.entropy_logits(_rows(), **kwargs)


@pytest.mark.parametrize("shape", [(3,), (4, 10), (2, 4), (6, 2)])
def test_target_shapes_get_our_message(shape):
  x = jnp.ones((6, 5, 7))  # batch (6, 5)
  for kw in ("target_entropy", "target_fraction", "min_entropy", "max_fraction"):
    with pytest.raises(ValueError, match=re.escape(f"{kw} of shape {shape} does not broadcast")):
      en.entropy_softmax(x, **{kw: jnp.full(shape, 0.5)})


def test_nan_target_gives_nan_rows():
  x = _rows()
  target = jnp.full(6, 1.0).at[2].set(jnp.nan)
  units = ("target_entropy", "target_fraction", "min_entropy", "max_fraction")
  # One program per implementation for every unit (one compile each, not one per unit).
  every_unit = lambda f, **kw: jax.jit(lambda x, t: {u: f(x, **kw, **{u: t}) for u in units})
  for impl in ("tiled", "xla", "pallas"):
    for kw, q in every_unit(en.entropy_softmax, implementation=impl)(x, target * 0.5).items():
      q = np.asarray(q)
      assert np.all(np.isnan(q[2])) and np.all(np.isfinite(np.delete(q, 2, axis=0))), (kw, impl)
  for kw, gamma in every_unit(en.solve_gamma)(x, target * 0.5).items():
    assert np.isnan(gamma[2]), kw
  q, k, v = _qkv()
  per_row = jnp.full((2, 2, 9), 0.5).at[0, 1, 3].set(jnp.nan)
  for impl in ("xla", "blockwise"):
    out = np.asarray(ena.entropy_attention(q, k, v, target_fraction=per_row, implementation=impl))
    assert np.all(np.isnan(out[0, 3, 1])) and np.isfinite(np.delete(out[0], 3, axis=0)).all()


def test_traced_meaningless_targets_give_nan_rows():
  x = _rows()
  f = jax.jit(lambda x, t: en.entropy_softmax(x, target_fraction=t))
  q = np.asarray(f(x, jnp.array([0.5, 2.0, -0.1, 0.5, 1.0, 0.0])))
  assert np.isnan(q[1:3]).all() and np.isfinite(q[[0, 3, 4, 5]]).all()
  g = jax.jit(lambda x, t: en.entropy_softmax(x, t))
  assert np.isnan(np.asarray(g(x, jnp.full(6, -1.0)))).all()
  # A floor above its ceiling is no error when traced: the ceiling wins.
  h = jax.jit(lambda x, lo, hi: en.entropy_softmax(x, min_entropy=lo, max_entropy=hi))
  np.testing.assert_allclose(h(x, 2.0, 1.0), en.entropy_softmax(x, 1.0), atol=1e-6)


def test_fractions_and_nats_agree_with_masks():
  x = _rows(1, (5, 16))
  mask = jnp.arange(16)[None, :] < jnp.array([16, 9, 4, 1, 12])[:, None]
  log_n = jnp.log(mask.sum(-1))
  f = jnp.array([0.2, 0.5, 0.8, 0.3, 1.0])
  want = en.entropy_softmax(x, f * log_n, where=mask)
  np.testing.assert_allclose(en.entropy_softmax(x, where=mask, target_fraction=f), want, atol=1e-6)
  lo, hi = 0.3 * log_n, 0.6 * log_n
  want = en.entropy_softmax(x, where=mask, min_entropy=lo, max_entropy=hi)
  got = en.entropy_softmax(x, where=mask, min_fraction=0.3, max_fraction=0.6)
  np.testing.assert_allclose(got, want, atol=1e-6)
  mixed = en.entropy_softmax(x, where=mask, min_fraction=0.3, max_entropy=hi)
  np.testing.assert_allclose(mixed, want, atol=1e-6)


# ------------------------------------------------------------------------------------ bounds


def _bound_rows():
  """Rows whose softmax entropies (about 0.55 ... 2.4 nats of log 12 = 2.48) straddle [1, 2]."""
  scales = jnp.array([0.2, 0.5, 1.0, 1.5, 2.5, 4.0])[:, None]
  return _rows(3, (6, 12), 1.0) * scales


@pytest.mark.parametrize("implementation", ["tiled", "xla", "pallas"])
def test_bounds_inside_is_softmax_outside_is_the_crossed_bound(implementation):
  x = _bound_rows()
  natural = np.asarray(en.entropy(x))
  below, above = natural < 1.0, natural > 2.0
  assert below.any() and above.any() and (~below & ~above).any()
  q = en.entropy_softmax(x, min_entropy=1.0, max_entropy=2.0, implementation=implementation)
  inside = ~below & ~above
  np.testing.assert_allclose(q[inside], jax.nn.softmax(x)[inside], atol=1e-6)
  np.testing.assert_allclose(q[below], en.entropy_softmax(x, 1.0)[below], atol=1e-6)
  np.testing.assert_allclose(q[above], en.entropy_softmax(x, 2.0)[above], atol=1e-6)
  gamma = en.solve_gamma(x, min_entropy=1.0, max_entropy=2.0, implementation=implementation)
  assert np.all(np.asarray(gamma)[inside] == 1.0)
  # A floor alone and a ceiling alone.
  np.testing.assert_allclose(en.entropy(jnp.log(en.entropy_softmax(x, min_entropy=1.0))),
                             np.maximum(natural, 1.0), atol=2e-5)  # fmt: skip
  np.testing.assert_allclose(en.entropy(jnp.log(en.entropy_softmax(x, max_fraction=0.5))),
                             np.minimum(natural, 0.5 * np.log(12)), atol=2e-5)  # fmt: skip


def test_bounds_inside_have_softmax_gradient():
  x = _bound_rows()
  w = jax.random.normal(jax.random.key(5), x.shape)
  inside = np.asarray((en.entropy(x) >= 1.0) & (en.entropy(x) <= 2.0))
  loss = lambda f: lambda x: jnp.sum(f(x)[inside] * w[inside])
  bounded = loss(lambda x: en.entropy_softmax(x, min_entropy=1.0, max_entropy=2.0))
  np.testing.assert_allclose(jax.grad(bounded)(x), jax.grad(loss(jax.nn.softmax))(x), atol=1e-6)
  lo_hi = jax.grad(
    lambda b: jnp.sum(en.entropy_softmax(x, min_entropy=b[0], max_entropy=b[1])[inside] * w[inside])
  )(jnp.array([1.0, 2.0]))
  assert np.all(lo_hi == 0)


BOUNDS = [
  dict(min_entropy=1.0, max_entropy=2.0),  # every kind of row
  dict(min_entropy=1.0),
  dict(max_entropy=2.0),
  dict(min_fraction=0.4, max_fraction=0.8),
  dict(min_fraction=0.4, max_entropy=2.0),
]


def test_bounds_check_grads():
  # Every combination of bounds in one program (check_grads_each names the ones that fail): the
  # derivatives with respect to the logits and to each bound, to second order.
  with float64():
    x = _bound_rows().astype(jnp.float64)
    mask = jnp.arange(12)[None, :] < jnp.array([12, 12, 9, 12, 7, 12])[:, None]

    def bounded(i):
      names = list(BOUNDS[i])
      return lambda x, *b: en.entropy_softmax(x, where=mask, **dict(zip(names, b[i], strict=True)))

    values = [tuple(jnp.asarray(v, jnp.float64) for v in b.values()) for b in BOUNDS]
    functions = {str(bounds): bounded(i) for i, bounds in enumerate(BOUNDS)}
    check_grads_each(functions, (x, *values), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_attention_bounds_match_dense_and_have_its_gradients():
  q, k, v = _qkv(2, (2, 13, 4, 8))
  k = k.reshape(2, 13, 2, 2, 8)[:, :, :, 0] * 2.0  # grouped-query, sharper rows
  v = v.reshape(2, 13, 2, 2, 8)[:, :, :, 0]
  lo = jnp.array([0.3, 0.5, 0.6, 0.4])  # per head

  def attend(impl, q, k, v, lo, hi):
    return ena.entropy_attention(
      q, k, v, min_fraction=lo, max_entropy=hi, is_causal=True, implementation=impl,
      block_q=8, block_k=8,
    )  # fmt: skip

  cot = jax.random.normal(jax.random.key(9), q.shape)
  results = {}
  for impl in ("xla", "blockwise"):
    f = jax.jit(functools.partial(attend, impl))
    out, pull = jax.vjp(f, q, k, v, lo, jnp.asarray(1.5))
    results[impl] = (out, *pull(cot))
  for a, b in zip(results["xla"], results["blockwise"], strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)
  assert np.any(results["xla"][4] != 0) and np.any(results["xla"][5] != 0)  # both bounds bind
  # Bounds that hold every row: plain softmax attention.
  plain = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(attend("blockwise", q, k, v, 0.0, 100.0), plain, atol=2e-6)


def test_pallas_attention_bounds_interpret():
  q, k, v = _qkv(4, (1, 16, 2, 16))
  kw = dict(min_fraction=0.5, max_fraction=0.7, is_causal=True)
  want = ena.entropy_attention(q, k, v, implementation="xla", **kw)
  got = ena.entropy_attention(q, k, v, implementation="pallas", block_q=16, block_k=16, **kw)
  np.testing.assert_allclose(got, want, atol=2e-5)


# ------------------------------------------------------------------------------------ modules


class _TinyLM(nn.Module):
  targets: dict

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8)(tokens)
    attn = enl.EntropyMultiHeadAttention(num_heads=2, qkv_features=8, learn_target=True,
                                         **self.targets)  # fmt: skip
    x = x + attn(x, mask=nn.make_causal_mask(tokens))
    return nn.Dense(11)(x)


@pytest.mark.parametrize(
  "targets, raw",
  [(dict(target_entropy=0.8), "target_raw"), (dict(max_entropy=1.0, min_fraction=0.1), "max_raw")],
)
def test_linen_learns_nats_targets(targets, raw):
  tokens = jax.random.randint(jax.random.key(0), (4, 10), 0, 11)
  model = _TinyLM(targets)
  params = model.init(jax.random.key(1), tokens[:, :-1])["params"]
  attn = params["EntropyMultiHeadAttention_0"]
  first = next(iter(targets.values()))
  np.testing.assert_allclose(jax.nn.softplus(attn[raw]), first, rtol=1e-6)
  opt = optax.adam(3e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = model.apply({"params": p}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, grads

  losses = []
  for _ in range(6):
    params, state, loss, grads = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert np.any(grads["EntropyMultiHeadAttention_0"][raw] != 0)
  assert np.all(params["EntropyMultiHeadAttention_0"][raw] != attn[raw])


@pytest.mark.parametrize("targets", [dict(target_entropy=0.8), dict(min_entropy=1.5)])
def test_nnx_learns_nats_targets(targets):
  x = jax.random.normal(jax.random.key(0), (4, 9, 8))
  labels = jax.random.randint(jax.random.key(2), (4, 9), 0, 3)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = ennx.EntropyMultiHeadAttention(2, 8, learn_target=True, decode=False,
                                                 rngs=rngs, **targets)  # fmt: skip
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(x + self.attn(x, is_causal=True))

  model = Model(nnx.Rngs(0))
  name = next(iter(targets))
  first = np.asarray(model.attn.targets()[name])
  np.testing.assert_allclose(first, next(iter(targets.values())), rtol=1e-6)
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(6)]
  assert losses[-1] < losses[0]
  assert np.all(np.asarray(model.attn.targets()[name]) != first)


def test_module_default_is_half_of_log_n():
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  layer = enl.EntropyMultiHeadAttention(num_heads=2, qkv_features=8, sow_entropies=True)
  variables = layer.init(jax.random.key(0), x)
  _, state = layer.apply(variables, x, mutable=["intermediates"])
  (after,) = state["intermediates"]["entropy_after"]
  np.testing.assert_allclose(after, 0.5 * np.log(5.0), atol=1e-4)


def _sown(flavour, x, **kw):
  """``(entropy_before, entropy_after, intermediates)`` of a module with ``sow_entropies``."""
  if flavour == "linen":
    layer = enl.EntropyMultiHeadAttention(num_heads=2, qkv_features=8, sow_entropies=True, **kw)
    variables = layer.init(jax.random.key(0), x)
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    inter = state["intermediates"]
  else:
    layer = ennx.EntropyMultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0),
                                           sow_entropies=True, **kw)  # fmt: skip
    _, inter = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(layer, x)
  (before,), (after,) = inter["entropy_before"], inter["entropy_after"]
  return np.asarray(before), np.asarray(after), inter


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_modules_sow_entropies_before_and_after(flavour):
  x = jax.random.normal(jax.random.key(1), (2, 6, 8)) * 2.0
  before, after, inter = _sown(flavour, x, target_entropy=1.0)
  assert before.shape == after.shape == (2, 2, 6)
  assert "attention_weights" not in inter  # the weights only with sow_weights
  np.testing.assert_allclose(after, 1.0, atol=1e-4)
  lo, hi = np.quantile(before, [0.3, 0.7])
  again, after, _ = _sown(flavour, x, min_entropy=lo, max_entropy=hi)
  np.testing.assert_allclose(again, before, atol=1e-6)  # the same parameters and logits
  np.testing.assert_allclose(after, np.clip(before, lo, hi), atol=1e-4)
  # Off by default: nothing sown.
  if flavour == "linen":
    plain = enl.EntropyMultiHeadAttention(num_heads=2, qkv_features=8, min_entropy=0.8)
    _, state = plain.apply(plain.init(jax.random.key(0), x), x, mutable=["intermediates"])
    assert not state.get("intermediates")

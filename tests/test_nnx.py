"""Tests for entnorm_jax.nnx: the NNX module (the shared function is tested in test_linen.py)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import float64, tolerance
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights
from references import entropy64

from entnorm_jax import nnx as ennx
from entnorm_jax._src.targets import KEYWORDS

B, L, F, H = 2, 6, 16, 4
TARGETS = (0.2, 0.45, 0.6, 0.85)


def natural_attention(query, key, value, mask=None, is_causal=False, **kwargs):
  """Entropy attention with the target plain softmax already has (γ* = 1)."""
  plain = dot_product_attention_weights(query, key, mask=mask, is_causal=is_causal)
  target = -jnp.sum(jax.scipy.special.xlogy(plain, plain), axis=-1)
  kwargs = {k: v for k, v in kwargs.items() if k not in KEYWORDS}  # the module's target
  kwargs.update(target_entropy=target)
  return ennx.entropy_dot_product_attention(
    query, key, value, mask=mask, is_causal=is_causal, **kwargs
  )


def flax_attention(query, key, value, mask=None, is_causal=False, **kwargs):
  """Flax's NNX attention on its explicit path (its default path does the softmax in float32)."""
  weights = dot_product_attention_weights(query, key, mask=mask, is_causal=is_causal)
  return jnp.einsum("...hqk,...khd->...qhd", weights, value)


def padding_mask(lengths) -> jax.Array:
  ok = jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]
  return nnx.make_attention_mask(ok, ok, dtype=bool)


@pytest.fixture
def x(key):
  return jax.random.normal(key, (B, L, F))


def test_parameters_are_flax_and_outputs_match_at_natural_entropy(x):
  kwargs = dict(num_heads=H, in_features=F, out_features=12, decode=False, normalize_qk=True)
  flax_mha = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
  ours = ennx.EntropyMultiHeadAttention(**kwargs, attention_fn=natural_attention, rngs=nnx.Rngs(1))
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.state(m, nnx.Param))
  assert shapes(ours) == shapes(flax_mha)
  learned = nnx.eval_shape(
    lambda: ennx.EntropyMultiHeadAttention(**kwargs, learn_target=True, rngs=nnx.Rngs(0))
  )
  learned_params = nnx.state(learned, nnx.Param)
  assert learned_params["target_raw"].shape == (H,)
  nnx.update(ours, nnx.state(flax_mha, nnx.Param))  # a Flax checkpoint loads
  call = nnx.jit(lambda m, x, mask: m(x, mask=mask, is_causal=True))
  mask = padding_mask([L, L])
  np.testing.assert_allclose(call(ours, x, mask), call(flax_mha, x, mask), atol=2e-5, rtol=2e-5)


def test_grouped_query_heads_causal_padding_rows_hit_targets(x):
  layer = ennx.EntropyMultiHeadAttention(
    H, F, num_kv_heads=2, target_fraction=TARGETS, decode=False, rngs=nnx.Rngs(0)
  )
  mask = padding_mask([L, 4])

  @nnx.jit
  def call(layer, x, mask):
    sowing = lambda m: m(x, mask=mask, is_causal=True, sow_weights=True)
    return nnx.capture(sowing, nnx.Intermediate)(layer)

  out, inter = call(layer, 3.0 * x, mask)
  (weights,) = inter["attention_weights"]
  assert weights.shape == (B, H, L, L) and np.all(np.isfinite(out))
  valid = np.broadcast_to(np.asarray(mask) & np.tri(L, dtype=bool), weights.shape)
  n_valid = valid.sum(-1)
  want = np.asarray(TARGETS)[None, :, None] * np.log(np.maximum(n_valid, 1))
  seen = n_valid > 0
  np.testing.assert_allclose(entropy64(weights)[seen], want[seen], atol=tolerance(jnp.float32))
  np.testing.assert_array_equal(np.asarray(weights)[~valid], 0.0)


def test_decode_cache_matches_the_causal_call(x):
  layer = ennx.EntropyMultiHeadAttention(H, F, target_fraction=0.6, decode=False, rngs=nnx.Rngs(0))
  full = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  layer.init_cache(x.shape)
  step = nnx.jit(lambda m, token: m(token, decode=True))
  outs = [step(layer, x[:, t : t + 1]) for t in range(L)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("x64", [False, True])
def test_decode_cache_matches_flax_decode_with_and_without_x64(key, x64):
  """Step-by-step decoding, at natural entropy, equals Flax's; under x64 the cache's start indices
  must share one integer type (Python ints become int64 there, the cache index is int32)."""
  with float64() if x64 else contextlib.nullcontext():
    dtype = jnp.float64 if x64 else jnp.float32
    x = jax.random.normal(key, (B, 4, F), dtype)
    flax_mha = nnx.MultiHeadAttention(
      H, F, decode=True, attention_fn=flax_attention, rngs=nnx.Rngs(0)
    )
    ours = ennx.EntropyMultiHeadAttention(
      H, F, decode=True, attention_fn=natural_attention, rngs=nnx.Rngs(1)
    )
    nnx.update(ours, nnx.state(flax_mha, nnx.Param))
    step = nnx.jit(lambda m, token: m(token))
    outs = {}
    for name, module in (("flax", flax_mha), ("ours", ours)):
      module.init_cache(x.shape, dtype=dtype)
      outs[name] = jnp.concatenate([step(module, x[:, t : t + 1]) for t in range(4)], axis=1)
    assert outs["ours"].dtype == outs["flax"].dtype == dtype
    assert ours.cache_index.dtype == jnp.int32 and int(ours.cache_index[...]) == 4
    atol = 1e-10 if x64 else 2e-5
    np.testing.assert_allclose(outs["ours"], outs["flax"], atol=atol, rtol=atol)
    np.testing.assert_allclose(ours.cached_key[...], flax_mha.cached_key[...], atol=atol, rtol=atol)


def test_nnx_jit_adamw_step_with_learned_target_and_dropout(x):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = ennx.EntropyMultiHeadAttention(
        H,
        F,
        learn_target=True,
        target_fraction=TARGETS,
        dropout_rate=0.2,
        decode=False,
        rngs=rngs,
      )
      self.head = nnx.Linear(F, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(x + self.attn(x, is_causal=True, deterministic=False))

  model = Model(nnx.Rngs(params=0, dropout=1))
  np.testing.assert_allclose(model.attn.target(), TARGETS, rtol=1e-6)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  labels = jax.random.randint(jax.random.key(2), (B, L), 0, 3)

  @nnx.jit
  def step(model, optimizer, x):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads.attn.target_raw[...]

  results = [step(model, optimizer, x) for _ in range(5)]
  losses = [float(loss) for loss, _ in results]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert np.any(results[0][1] != 0)  # the implicit gradient reaches the target
  assert np.all(np.asarray(model.attn.target()) != np.asarray(TARGETS, np.float32))


def test_works_as_the_attention_fn_of_flax_nnx_module(x):
  flax_mha = nnx.MultiHeadAttention(
    H, F, attention_fn=ennx.entropy_dot_product_attention, decode=False, rngs=nnx.Rngs(0)
  )
  ours = ennx.EntropyMultiHeadAttention(H, F, decode=False, rngs=nnx.Rngs(1))
  nnx.update(ours, nnx.state(flax_mha, nnx.Param))
  call = nnx.jit(lambda m, x: m(x, is_causal=True))  # Flax passes is_causal unfiltered
  np.testing.assert_allclose(call(flax_mha, x), call(ours, x), atol=1e-6)


def test_takes_the_attention_fns_of_flax_nnx_module(x):
  """NNX's keywords go to ``attention_fn`` unfiltered, as Flax's module passes them; the target
  keywords, ``num_iters`` and ``implementation`` only where its signature takes them (as in Linen),
  so Flax's own function works: the module is then plain attention."""
  kwargs = dict(attention_fn=nnx.dot_product_attention, decode=False, rngs=nnx.Rngs(0))
  flax_mha = nnx.MultiHeadAttention(H, F, **kwargs)
  ours = ennx.EntropyMultiHeadAttention(H, F, **kwargs)
  nnx.update(ours, nnx.state(flax_mha, nnx.Param))
  call = nnx.jit(lambda m, x: m(x, is_causal=True))
  np.testing.assert_allclose(call(ours, x), call(flax_mha, x), atol=1e-6)
  sowing = ennx.EntropyMultiHeadAttention(H, F, sow_entropies=True, **kwargs)
  with pytest.raises(ValueError, match="sow_entropies"):
    sowing(x)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(target_fraction=(0.1, 0.2)), "shape"),
    (dict(target_fraction=0.0, learn_target=True), r"in \(0, 1\)"),
    (dict(target_fraction=2.0), r"fraction of log\(n_valid\).*\[0, 1\].*target_entropy="),
    (dict(target_entropy=-1.0), r"in nats and must be >= 0.*target_fraction="),
    (dict(target_entropy=0.5, relative=True), "relative= was removed.*target_fraction="),
    (dict(implementation="triton"), "implementation"),
  ],
)
def test_static_misuse_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ennx.EntropyMultiHeadAttention(H, F, **kwargs, rngs=nnx.Rngs(0))

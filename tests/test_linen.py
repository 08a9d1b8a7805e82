"""Tests for entnorm_jax.linen: the attention function and the Linen module.

Every compiled program here contains the solver, whose compilation dominates the run time, so the
tests share one jitted ``apply`` (same shapes) wherever they can.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import float64, tolerance
from flax import linen as nn
from jax.test_util import check_grads
from references import entropy64

from entnorm_jax import linen as enn
from entnorm_jax._src.targets import KEYWORDS

B, L, F, H = 2, 7, 16, 4
TARGETS = (0.15, 0.4, 0.6, 0.9)  # fractions of log(n_valid), one per head
LAYER = enn.EntropyMultiHeadAttention(num_heads=H, qkv_features=F, target_fraction=TARGETS)


@jax.jit
def apply_layer(variables, x, mask):
  """The shared module call: output and sowed attention weights."""
  out, state = LAYER.apply(variables, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  return out, state["intermediates"]["attention_weights"][0]


def padding_causal_mask(lengths) -> jax.Array:
  """``[B, 1, L, L]``: causal, and keys/queries at or beyond each sequence's length masked."""
  ok = jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]
  return nn.combine_masks(nn.make_attention_mask(ok, ok), nn.make_causal_mask(ok), dtype=bool)


def natural_attention(query, key, value, bias=None, mask=None, **kwargs):
  """Entropy attention whose target is the entropy plain softmax already has (so γ* = 1)."""
  plain = nn.dot_product_attention_weights(query, key, bias, mask)
  target = -jnp.sum(jax.scipy.special.xlogy(plain, plain), axis=-1)
  kwargs = {k: v for k, v in kwargs.items() if k not in KEYWORDS}  # the module's target
  return enn.entropy_dot_product_attention(
    query, key, value, bias, mask, target_entropy=target, **kwargs
  )


@pytest.fixture
def setup(key):
  kx, kp = jax.random.split(key)
  x = jax.random.normal(kx, (B, L, F))
  # Flax's module makes the same parameters without compiling the solver
  return x, nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=F).init(kp, x), kp


def test_function_with_bias_and_mask_matches_flax_at_natural_entropy(key):
  q, k, v = 2.0 * jax.random.normal(key, (3, B, 5, H, 8))
  bias = jax.random.normal(jax.random.fold_in(key, 1), (B, H, 5, 5))
  mask = padding_causal_mask([L, 5])[:, :, :5, :5].at[1, :, 4, :].set(False)
  live = np.asarray(jnp.broadcast_to(jnp.any(mask, axis=-1), (B, H, 5)))  # rows with a key
  expected = jax.jit(nn.dot_product_attention)(q, k, v, bias, mask)
  got = jax.jit(natural_attention)(q, k, v, bias, mask)
  live = np.moveaxis(live, 1, 2)  # [B, q, H]
  np.testing.assert_allclose(got[live], expected[live], atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(got[~live], 0.0)  # Flax spreads these rows uniformly


def test_module_matches_flax_module_at_natural_entropy(setup):
  x, variables, _ = setup
  mask = padding_causal_mask([L, L])
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=F)
  ours = enn.EntropyMultiHeadAttention(num_heads=H, qkv_features=F, attention_fn=natural_attention)
  expected = jax.jit(flax_mha.apply)(variables, x, mask=mask)
  got = jax.jit(ours.apply)(variables, x, mask=mask)
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)


def test_parameter_tree_is_flax_and_checkpoints_move(setup):
  x, _, kp = setup
  kwargs = dict(num_heads=H, qkv_features=F, out_features=12, normalize_qk=True)
  flax_mha = nn.MultiHeadDotProductAttention(**kwargs)
  ours = enn.EntropyMultiHeadAttention(**kwargs, target_fraction=TARGETS)
  flax_vars = jax.eval_shape(flax_mha.init, kp, x)
  our_vars = jax.eval_shape(ours.init, kp, x)
  assert flax_vars == our_vars  # same tree, shapes and dtypes
  # each module takes the other's parameters
  assert jax.eval_shape(ours.apply, flax_vars, x) == jax.eval_shape(flax_mha.apply, our_vars, x)
  learned = enn.EntropyMultiHeadAttention(**kwargs, learn_target=True)
  learned_vars = jax.eval_shape(learned.init, kp, x)
  assert learned_vars["params"].pop("target_raw").shape == (H,)
  assert learned_vars == flax_vars


def test_every_row_hits_its_target_with_padding_and_causal_masks(setup):
  x, variables, _ = setup
  mask = padding_causal_mask([L, 4])
  out, weights = apply_layer(variables, 3.0 * x, mask)  # larger logits: far from natural entropy
  assert np.all(np.isfinite(out))
  valid = np.broadcast_to(np.asarray(mask), weights.shape)
  n_valid = valid.sum(-1)
  want = np.asarray(TARGETS)[None, :, None] * np.log(np.maximum(n_valid, 1))
  seen = n_valid > 0
  np.testing.assert_allclose(entropy64(weights)[seen], want[seen], atol=tolerance(jnp.float32))
  np.testing.assert_array_equal(np.asarray(weights)[~valid], 0.0)  # masked keys, masked rows
  np.testing.assert_allclose(np.asarray(weights).sum(-1)[seen], 1.0, atol=1e-6)


def test_masked_keys_equal_sliced_keys_and_masked_rows_have_zero_gradient(key):
  q, k, v = jax.random.normal(key, (3, 1, 6, 2, 4))
  keep = jnp.array([True, False, True, True, False, True])
  mask = jnp.broadcast_to(keep, (1, 2, 6, 6)).at[:, :, 2].set(False)  # query 2 sees nothing

  def loss(q, k, v, mask):
    out = enn.entropy_dot_product_attention(q, k, v, mask=mask, target_fraction=0.3)
    return jnp.sum(jnp.sin(out)), out

  grads, masked = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, mask)
  attend = jax.jit(enn.entropy_dot_product_attention)
  sliced = attend(q, k[:, keep], v[:, keep], target_fraction=0.3)
  rows = np.arange(6) != 2
  np.testing.assert_allclose(masked[:, rows], sliced[:, rows], atol=1e-6)
  np.testing.assert_array_equal(masked[:, 2], 0.0)
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(grads[0][:, 2], 0.0)  # the empty row's query gets no gradient
  np.testing.assert_array_equal(grads[1][:, ~np.asarray(keep)], 0.0)  # nor do masked keys


def test_gradients_match_finite_differences_float64(key):
  with float64():
    q, k, v = jax.random.normal(key, (3, 1, 4, 2, 3), jnp.float64)
    mask = jnp.tril(jnp.ones((4, 4), bool))
    target = jnp.array([0.4, 0.7], jnp.float64)
    f = jax.jit(enn.entropy_dot_product_attention)
    g = lambda q, k, v, target: f(q, k, v, mask=mask, target_fraction=target)
    check_grads(g, (q, k, v, target), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


class TinyLM(nn.Module):
  """One pre-LN block of causal entropy attention with a learned target, and an MLP."""

  vocab: int = 11

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, F)(tokens)
    attn = enn.EntropyMultiHeadAttention(
      num_heads=H, qkv_features=F, learn_target=True, target_fraction=TARGETS
    )
    x = x + attn(nn.LayerNorm()(x), mask=nn.make_causal_mask(tokens))
    x = x + nn.Dense(F)(nn.gelu(nn.Dense(2 * F)(nn.LayerNorm()(x))))
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def test_jitted_adamw_training_step_learns_the_targets(key):
  tokens = jax.random.randint(key, (4, L + 1), 0, 11)
  model = TinyLM()
  params = jax.jit(model.init)(key, tokens[:, :-1])["params"]
  raw0 = params["EntropyMultiHeadAttention_0"]["target_raw"]
  np.testing.assert_allclose(jax.nn.sigmoid(raw0), TARGETS, rtol=1e-6)
  opt = optax.adamw(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    def loss_fn(p):
      logits = model.apply({"params": p}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  losses = []
  for _ in range(6):
    params, opt_state, loss, grads = step(params, opt_state, tokens)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  target_grad = grads["EntropyMultiHeadAttention_0"]["target_raw"]
  assert np.all(np.isfinite(target_grad)) and np.any(target_grad != 0)
  assert np.all(params["EntropyMultiHeadAttention_0"]["target_raw"] != raw0)


def test_vmap_and_batch_sharding_match_the_batched_call(setup):
  x, variables, _ = setup
  mask = padding_causal_mask([L, 3])
  batched, _ = apply_layer(variables, x, mask)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  reps = len(jax.devices())

  @jax.jit
  def both(x, mask):
    per_example = jax.vmap(lambda x, m: LAYER.apply(variables, x[None], mask=m[None])[0])
    return LAYER.apply(variables, x, mask=mask), per_example(x, mask)

  tile = lambda a: jax.device_put(jnp.tile(a, (reps,) + (1,) * (a.ndim - 1)), sharding)
  sharded, vmapped = both(tile(x), tile(mask))
  assert sharded.sharding.is_equivalent_to(sharding, sharded.ndim)
  np.testing.assert_allclose(sharded, jnp.tile(batched, (reps, 1, 1)), atol=1e-5)
  np.testing.assert_allclose(vmapped, sharded, atol=1e-5)


def test_decode_cache_matches_the_causal_call(setup):
  x, variables, kp = setup
  full, _ = apply_layer(variables, x, nn.make_causal_mask(x[..., 0]).astype(bool))
  decoder = LAYER.clone(decode=True)
  shapes = jax.eval_shape(decoder.init, kp, x)["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  @jax.jit
  def step(cache, token):
    out, state = decoder.apply({**variables, "cache": cache}, token, mutable=["cache"])
    return state["cache"], out

  outs = []
  for t in range(L):
    cache, out = step(cache, x[:, t : t + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("x64", [False, True])
def test_decode_cache_matches_flax_decode_with_and_without_x64(key, x64):
  """Step-by-step decoding, at natural entropy, equals Flax's; under x64 the cache's start indices
  must share one integer type (Python ints become int64 there, the cache index is int32)."""
  with float64() if x64 else contextlib.nullcontext():
    dtype = jnp.float64 if x64 else jnp.float32
    x = jax.random.normal(key, (B, 4, F), dtype)
    kwargs = dict(num_heads=H, qkv_features=F, decode=True)
    flax_mha = nn.MultiHeadDotProductAttention(**kwargs)
    ours = enn.EntropyMultiHeadAttention(**kwargs, attention_fn=natural_attention)
    variables = flax_mha.init(key, x)  # Flax's init: no solver to compile
    assert jax.eval_shape(ours.init, key, x) == jax.eval_shape(flax_mha.init, key, x)
    assert variables["cache"]["cache_index"].dtype == jnp.int32

    def decode(module):
      step = jax.jit(
        lambda cache, token: module.apply(
          {"params": variables["params"], "cache": cache}, token, mutable=["cache"]
        )
      )
      cache, outs = variables["cache"], []
      for t in range(x.shape[1]):
        out, state = step(cache, x[:, t : t + 1])
        cache = state["cache"]
        outs.append(out)
      return jnp.concatenate(outs, axis=1), cache

    (expected, flax_cache), (got, cache) = decode(flax_mha), decode(ours)
    assert got.dtype == expected.dtype == dtype
    assert cache["cache_index"].dtype == jnp.int32 and int(cache["cache_index"]) == x.shape[1]
    # Float32: at t = 1 a row has two keys near the uniform end, where dH/dγ = -γ Var is small and
    # the solver's entropy tolerance (2e-6 nats) allows |Δq| ≈ 2e-5, |Δout| ≈ 5e-5; the cache
    # itself is exact.
    atol = 1e-10 if x64 else 1e-4
    np.testing.assert_allclose(got, expected, atol=atol, rtol=atol)
    for name in ("cached_key", "cached_value"):
      np.testing.assert_allclose(cache[name], flax_cache[name], atol=1e-10 if x64 else 1e-6)


def test_dropout_follows_the_dropout_rng(setup):
  x, variables, kp = setup
  layer = LAYER.clone(dropout_rate=0.5)
  run = jax.jit(lambda rng: layer.apply(variables, x, deterministic=False, dropout_rng=rng))
  k1, k2 = jax.random.split(kp)
  assert not np.allclose(run(k1), run(k2))
  np.testing.assert_array_equal(run(k1), run(k1))


def test_bfloat16_activations_solve_in_float32(setup):
  x, variables, _ = setup
  mask = padding_causal_mask([L, L])
  layer16 = LAYER.clone(dtype=jnp.bfloat16)
  out16, state = jax.jit(
    lambda v, x: layer16.apply(v, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  )(variables, x.astype(jnp.bfloat16))
  out32, _ = apply_layer(variables, x, mask)
  (w16,) = state["intermediates"]["attention_weights"]
  assert out16.dtype == w16.dtype == jnp.bfloat16
  np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=5e-2, rtol=5e-2)
  want = np.asarray(TARGETS)[:, None] * np.log(np.arange(1, L + 1))
  np.testing.assert_allclose(entropy64(w16), np.broadcast_to(want, w16.shape[:-1]), atol=3e-2)


def test_works_as_the_attention_fn_of_flax_modules(setup):
  x, variables, _ = setup
  flax_mha = nn.MultiHeadDotProductAttention(
    num_heads=H,
    qkv_features=F,
    attention_fn=functools.partial(enn.entropy_dot_product_attention, target_fraction=TARGETS),
  )
  mask = padding_causal_mask([L, 5])
  expected, _ = apply_layer(variables, x, mask)
  np.testing.assert_allclose(jax.jit(flax_mha.apply)(variables, x, mask=mask), expected, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(target_fraction=(0.1, 0.2)), "shape"),
    (dict(target_fraction=1.5), r"fraction of log\(n_valid\).*\[0, 1\].*target_entropy="),
    (dict(target_fraction=1.0, learn_target=True), r"in \(0, 1\)"),
    (dict(target_entropy=-0.1), r"in nats and must be >= 0.*target_fraction="),
    (dict(target_entropy=0.5, relative=True), "relative= was removed.*target_fraction="),
    (dict(target_entropy=0.5, target_fraction=0.5), "exactly one"),
    (dict(implementation="cuda"), "implementation"),
  ],
)
def test_static_misuse_raises(setup, kwargs, match):
  x, _, kp = setup
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(enn.EntropyMultiHeadAttention(num_heads=H, qkv_features=F, **kwargs).init, kp, x)


def test_kernel_implementations_match_the_dense_path(setup):
  pytest.importorskip("entnorm_jax.attention")
  x, variables, kp = setup
  mask = padding_causal_mask([L, 5])
  expected, _ = apply_layer(variables, x, mask)
  blockwise = LAYER.clone(implementation="blockwise")
  got = jax.jit(blockwise.apply)(variables, x, mask=mask)
  np.testing.assert_allclose(got, expected, atol=1e-4)
  for kwargs in (dict(dropout_rate=0.1, deterministic=False), dict()):
    with pytest.raises(ValueError, match="does not support"):
      jax.eval_shape(
        lambda v, kw=kwargs: blockwise.clone(**kw).apply(
          v, x, sow_weights=True, mutable=["intermediates"], rngs={"dropout": kp}
        ),
        variables,
      )

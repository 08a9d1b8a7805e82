"""Flax's attention interface, case by case: our functions and modules against Flax's own.

These are the interface cases of Flax's attention tests (Flax 0.12.8) that a drop-in replacement
must keep, written from Flax's documented behaviour: deprecation warnings and errors of the Linen
call, the ``attention_fn`` keywords (einsum overrides and their rules, ``einsum_dot_general``, NNX's
``promote_dtype``), shape errors, dtypes, and complex inputs (which we refuse with a clear error
where Flax computes). Most checks only trace (``jax.eval_shape``, ``jax.make_jaxpr``): the
failures they look for are static, and tracing skips the solver's compilation.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors, nnx
from flax import linen as nn
from flax.nnx.nn.attention import dot_product_attention_weights as nnx_attention_weights

from entnorm_jax import linen as enn
from entnorm_jax import nnx as ennx

H, D = 2, 4


def qkv(key, shape=(2, 5, H, D), dtype=jnp.float32):
  return tuple(jax.random.normal(k, shape, dtype) for k in jax.random.split(key, 3))


def plain_entropy(weights):
  return -jnp.sum(jax.scipy.special.xlogy(weights, weights), axis=-1)


def outcome(fn, *args, **kwargs):
  """``(exception type, message, [DeprecationWarning messages])`` of tracing ``fn``."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      jax.eval_shape(fn, *args, **kwargs)
      error = (None, None)
    except Exception as e:  # noqa: BLE001 - the type is compared with Flax's
      error = (type(e), str(e))
  deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
  return (*error, [m for m in deprecations if "inputs_" in m])


# --- Linen call: key/value inputs, deprecations ----------------------------------------------


def linen_pair(**kwargs):
  kwargs = dict(num_heads=1, kernel_init=jax.nn.initializers.ones, **kwargs)
  return nn.MultiHeadDotProductAttention(**kwargs), enn.EntropyMultiHeadAttention(**kwargs)


Q = jnp.linspace(-1.0, 1.0, 10).reshape(1, 10, 1)  # one feature, as in Flax's mask-warning case
MASK = nn.make_causal_mask(jnp.ones((1, 10)))  # [1, 1, 10, 10]: square, like a mask
SQUARE = jnp.ones((1, 4, 4))  # a legitimate value whose length equals its features


@pytest.mark.parametrize(
  "args, kwargs, warns",
  [
    ((Q, Q), dict(mask=MASK), False),  # the mask by keyword: no warning
    ((Q, Q, MASK), {}, True),  # the mask passed positionally as inputs_v: warns, then fails
    ((SQUARE, SQUARE, SQUARE), {}, True),  # Flax warns on any square inputs_v
    ((Q, Q, Q), {}, False),
    ((Q,), dict(inputs_kv=Q), True),  # inputs_kv is deprecated
    ((Q,), dict(inputs_kv=Q, inputs_v=Q), False),  # errors, as in Flax
    ((Q, Q, Q), dict(inputs_kv=Q), False),
    ((Q,), dict(inputs_v=Q), False),
  ],
)
def test_linen_input_warnings_and_errors_are_flaxs(key, args, kwargs, warns):
  flax_mha, ours = linen_pair()
  variables = jax.eval_shape(flax_mha.init, key, *args[:2])
  expected = outcome(flax_mha.apply, variables, *args, **kwargs)
  got = outcome(ours.apply, variables, *args, **kwargs)
  assert got == expected  # same exception type and message, same warnings
  assert bool(got[2]) == warns
  if args[-1] is MASK:  # the mask lands on the value projection, as in Flax
    assert got[0] is errors.ScopeParamShapeError
    assert "mask" in got[2][0] and "MultiHeadDotProductAttention" in got[2][0]


def test_linen_default_and_deprecated_inputs_are_the_same_computation(key):
  q, kv = jax.random.normal(key, (2, 3, 6, 4))
  flax_mha, ours = linen_pair(qkv_features=4)
  ours = ours.clone(num_heads=2)
  variables = flax_mha.clone(num_heads=2).init(key, q, kv)
  jaxpr = lambda f: str(jax.make_jaxpr(f)(variables, q, kv))
  full = jaxpr(lambda v, q, kv: ours.apply(v, q, kv, kv))
  assert jaxpr(lambda v, q, kv: ours.apply(v, q, kv)) == full
  with pytest.warns(DeprecationWarning, match="The inputs_kv arg will be deprecated soon"):
    assert jaxpr(lambda v, q, kv: ours.apply(v, q, inputs_kv=kv)) == full
  self_attention = jaxpr(lambda v, q, kv: ours.apply(v, q, q, q))
  assert jaxpr(lambda v, q, kv: ours.apply(v, q)) == self_attention != full


# --- attention_fn keywords: einsum overrides, einsum_dot_general, promote_dtype ----------------


def negated_einsum(*args, **kwargs):
  return -jnp.einsum(*args, **kwargs)


def doubled_einsum(*args, **kwargs):
  return 2.0 * jnp.einsum(*args, **kwargs)


def negated_dot_general(*args, **kwargs):
  return -jax.lax.dot_general(*args, **kwargs)


OVERRIDES = dict(qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(qk_attn_weights_einsum=jnp.einsum),  # the overrides come together
    dict(attn_weights_value_einsum=jnp.einsum),
    dict(precision=jax.lax.Precision.DEFAULT, **OVERRIDES),  # and exclude precision
    dict(einsum_dot_general=jax.lax.dot_general, **OVERRIDES),  # and einsum_dot_general
    dict(precision=jax.lax.Precision.HIGHEST, attn_weights_value_einsum=jnp.einsum),
  ],
)
def test_einsum_override_rules_and_messages_are_flaxs(kwargs):
  q = jnp.ones((1, 4, 2, 3))
  with pytest.raises(ValueError) as expected:
    nn.dot_product_attention(q, q, q, **kwargs)
  with pytest.raises(ValueError) as got:
    enn.entropy_dot_product_attention(q, q, q, **kwargs)
  assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(precision=jax.lax.Precision.HIGHEST, einsum=jnp.einsum),
    dict(einsum_dot_general=jax.lax.dot_general, einsum=jnp.einsum),
  ],
)
def test_weights_einsum_rule_and_message_are_flaxs(kwargs):
  q = jnp.ones((1, 4, 2, 3))
  with pytest.raises(ValueError) as expected:
    nn.dot_product_attention_weights(q, q, **kwargs)
  with pytest.raises(ValueError) as got:
    enn.entropy_attention_weights(q, q, **kwargs)
  assert str(got.value) == str(expected.value)


def natural_attention(query, key, value, bias=None, mask=None, **kwargs):
  """Our attention with the target Flax's softmax has under the same einsums (so γ* = 1)."""
  plain = nn.dot_product_attention_weights(
    query,
    key,
    bias,
    mask,
    precision=kwargs.get("precision"),
    einsum_dot_general=kwargs.get("einsum_dot_general"),
    einsum=kwargs.get("qk_attn_weights_einsum"),
  )
  return enn.entropy_dot_product_attention(
    query, key, value, bias, mask, target_entropy=plain_entropy(plain), **kwargs
  )


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(qk_attn_weights_einsum=negated_einsum, attn_weights_value_einsum=doubled_einsum),
    dict(einsum_dot_general=negated_dot_general),
  ],
  ids=["einsum_overrides", "einsum_dot_general"],
)
def test_einsum_hooks_are_used_as_flax_uses_them(key, kwargs):
  q, k, v = qkv(key)
  mask = nn.make_causal_mask(jnp.ones((2, 5)), dtype=bool)
  expected = jax.jit(functools.partial(nn.dot_product_attention, **kwargs))(q, k, v, mask=mask)
  plain = jax.jit(nn.dot_product_attention)(q, k, v, mask=mask)
  assert not np.allclose(expected, plain, atol=1e-2)  # the hooks change Flax's result
  got = jax.jit(functools.partial(natural_attention, **kwargs))(q, k, v, mask=mask)
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)


class RecordingEinsum:
  """An einsum class for ``*_einsum_cls`` that records the subscripts it is called with."""

  calls: list[str] = []

  def __call__(self, subscripts, *operands, **kwargs):
    RecordingEinsum.calls.append(subscripts)
    return jnp.einsum(subscripts, *operands, **kwargs)


def test_linen_module_passes_the_einsum_classes_as_flax_does(key):
  x = jax.random.normal(key, (2, 5, 8))
  cls = dict(
    qk_attn_weights_einsum_cls=RecordingEinsum, attn_weights_value_einsum_cls=RecordingEinsum
  )
  calls = {}
  for module in linen_pair(**cls, qkv_features=8):
    RecordingEinsum.calls = []
    jax.eval_shape(module.clone(num_heads=H).init, key, x)
    calls[type(module)] = RecordingEinsum.calls
  assert calls[enn.EntropyMultiHeadAttention] == calls[nn.MultiHeadDotProductAttention]
  assert len(calls[enn.EntropyMultiHeadAttention]) == 2  # query-key, then weights-value
  # and, as in Flax, a precision on the module excludes them
  flax_mha, ours = linen_pair(**cls, precision=jax.lax.Precision.HIGHEST)
  expected, got = (outcome(m.init, key, x) for m in (flax_mha, ours))
  assert got == expected and got[0] is ValueError and "mutually exclusive" in got[1]


def test_promote_dtype_is_called_as_flax_nnx_calls_it(key):
  q, k, v = qkv(key)
  calls = []

  def promote(arrays, *, dtype=None):
    calls.append((len(arrays), dtype))
    return tuple(jnp.asarray(a, jnp.float16) for a in arrays)

  for fn, args in (
    (nnx.dot_product_attention, (q, k, v)),
    (ennx.entropy_dot_product_attention, (q, k, v)),
    (nnx_attention_weights, (q, k)),
    (ennx.entropy_attention_weights, (q, k)),
  ):
    calls.clear()
    out = jax.eval_shape(functools.partial(fn, promote_dtype=promote, dtype=jnp.bfloat16), *args)
    assert out.dtype == jnp.float16  # the arrays promote_dtype returned set the dtype
    assert calls[0] == (len(args), jnp.bfloat16)  # called with the tuple and dtype=


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16, jnp.bfloat16])
def test_default_promotion_is_flaxs(dtype):
  q = jnp.ones((1, 4, H, D), dtype)
  for flax_fn, ours in (
    (nn.dot_product_attention, enn.entropy_dot_product_attention),
    (nnx.dot_product_attention, ennx.entropy_dot_product_attention),
  ):
    assert jax.eval_shape(ours, q, q, q).dtype == jax.eval_shape(flax_fn, q, q, q).dtype


@pytest.mark.parametrize("force_fp32", [True, False])
def test_linen_force_fp32_for_softmax_sets_the_weights_dtype_as_flax(key, force_fp32):
  x = jax.random.uniform(key, (2, 4))
  sowed = {}
  for module in linen_pair(qkv_features=4, dtype=jnp.bfloat16, force_fp32_for_softmax=force_fp32):
    module = module.clone(num_heads=2)
    variables = jax.eval_shape(module.init, key, x)
    apply = functools.partial(module.apply, sow_weights=True, mutable=["intermediates"])
    (weights,) = jax.eval_shape(apply, variables, x)[1]["intermediates"]["attention_weights"]
    sowed[type(module)] = weights.dtype
  assert sowed[enn.EntropyMultiHeadAttention] == sowed[nn.MultiHeadDotProductAttention]
  assert sowed[enn.EntropyMultiHeadAttention] == (jnp.float32 if force_fp32 else jnp.bfloat16)


def test_kernel_implementations_refuse_einsum_dot_general(key):
  q, k, v = qkv(key)
  fn = functools.partial(
    enn.entropy_dot_product_attention,
    implementation="blockwise",
    einsum_dot_general=jax.lax.dot_general,
  )
  with pytest.raises(ValueError, match="does not support einsum overrides"):
    jax.eval_shape(fn, q, k, v)


# --- shapes and dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize(
  "q_shape, k_shape, v_shape, match",
  [
    ((2, 16, 4, 8), (16, 4, 8), (16, 4, 8), "same rank"),
    ((2, 16, 4, 8), (3, 16, 4, 8), (3, 16, 4, 8), "batch dims"),
    ((2, 16, 4, 8), (2, 16, 4, 8), (2, 15, 4, 8), "lengths must match"),
    ((2, 16, 4, 8), (2, 16, 4, 7), (2, 16, 4, 8), "depths must match"),
    ((1, 4, 5, 8), (1, 4, 2, 8), (1, 4, 2, 8), "must be (a )?multiple"),
  ],
)
def test_shape_errors_say_what_flax_nnx_says(q_shape, k_shape, v_shape, match):
  q, k, v = jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape)
  dropout = dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))  # Flax's explicit path
  with pytest.raises(ValueError, match=match):
    nnx.dot_product_attention(q, k, v, **dropout)
  with pytest.raises(ValueError, match=match):
    ennx.entropy_dot_product_attention(q, k, v, **dropout)


REAL = "entropy normalization needs real attention scores"


@pytest.mark.parametrize("which", ["query", "key", "value", "bias", "dtype"])
def test_complex_inputs_raise_a_clear_type_error(key, which):
  q, k, v = qkv(key, (1, 4, H, D))
  inputs = dict(query=q, key=k, value=v, bias=jnp.zeros((1, H, 4, 4)))
  if which == "dtype":
    inputs["dtype"] = jnp.complex64
  else:
    inputs[which] = inputs[which].astype(jnp.complex64)
  with pytest.raises(TypeError, match=REAL):
    jax.eval_shape(functools.partial(enn.entropy_dot_product_attention, **inputs))
  if which != "value":
    del inputs["value"]
    with pytest.raises(TypeError, match=REAL):
      jax.eval_shape(functools.partial(enn.entropy_attention_weights, **inputs))


def test_complex_inputs_to_the_modules_raise_a_clear_type_error(key):
  x = jnp.ones((4, 6, 5), jnp.complex64)  # Flax computes here (complex64 out); we cannot
  flax_mha, ours = linen_pair(qkv_features=16)
  flax_mha, ours = flax_mha.clone(num_heads=8), ours.clone(num_heads=8)
  assert jax.eval_shape(flax_mha.init_with_output, key, x)[0].dtype == jnp.complex64
  with pytest.raises(TypeError, match=REAL + r".*complex64"):
    jax.eval_shape(ours.init, key, x)
  layer = ennx.EntropyMultiHeadAttention(8, 5, qkv_features=16, decode=False, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=REAL):
    jax.eval_shape(lambda x: layer(x), x)


# --- our Linen and NNX modules agree ------------------------------------------------------------


def test_linen_and_nnx_modules_agree(key):
  """Flax's Linen-vs-NNX consistency case for our modules: same parameters, same outputs."""
  x = jax.random.normal(key, (2, 5, 3))
  mask = nn.make_attention_mask(jnp.arange(5) < jnp.array([[5], [3]]), jnp.ones((2, 5)) > 0)
  kwargs = dict(
    qkv_features=6,
    out_features=6,
    normalize_qk=True,
    precision=jax.lax.Precision.HIGHEST,
    target_fraction=(0.3, 0.7),
  )
  linen_layer = enn.EntropyMultiHeadAttention(num_heads=2, **kwargs)
  nnx_layer = ennx.EntropyMultiHeadAttention(2, 3, **kwargs, decode=False, rngs=nnx.Rngs(0))
  variables = nn.MultiHeadDotProductAttention(num_heads=2, **kwargs_without_target(kwargs)).init(
    key, x
  )
  for name in ("query", "key", "value", "out"):
    getattr(nnx_layer, name).kernel[...] = variables["params"][name]["kernel"]
    getattr(nnx_layer, name).bias[...] = variables["params"][name]["bias"]
  expected = jax.jit(linen_layer.apply)(variables, x, mask=mask)
  got = nnx.jit(lambda m, x, mask: m(x, mask=mask))(nnx_layer, x, mask)
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def kwargs_without_target(kwargs):
  return {k: v for k, v in kwargs.items() if k != "target_fraction"}

"""Flax Linen attention with entropy-normalized rows.

Targets name their unit: ``EntropyMultiHeadAttention(num_heads=4, target_fraction=0.5)`` (the
default) gives every attention row ``0.5 · log(n_valid)`` nats (``log(n_valid)`` is the largest
entropy a row over ``n_valid`` visible keys can have), ``target_entropy=1.2`` gives every row 1.2
nats, and ``min_entropy`` / ``max_entropy`` (``min_fraction`` / ``max_fraction``) bound the
entropy instead, leaving rows inside the bounds as plain softmax.

:func:`entropy_dot_product_attention` is a drop-in ``attention_fn`` for Flax's attention modules,
and :class:`EntropyMultiHeadAttention` is a drop-in for ``flax.linen.MultiHeadDotProductAttention``
(same attributes, same parameter tree when the target is fixed) whose attention rows all have a
prescribed entropy: ``a_q = softmax(γ*_q · s_q)`` with ``H(a_q) = target`` for every query.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.module import merge_param

from entnorm_jax._src.flax_attention import (
  IMPLEMENTATIONS,
  RAW_NAMES,
  cache_step,
  flax_keywords,
  module_keywords,
  module_targets,
  raw_to_target,
  target_to_raw,
)
from entnorm_jax._src.flax_attention import (
  entropy_attention_weights as entropy_attention_weights,
)
from entnorm_jax._src.flax_attention import (
  entropy_dot_product_attention as entropy_dot_product_attention,
)
from entnorm_jax._src.targets import KEYWORDS

__all__ = [
  "EntropyMultiHeadAttention",
  "entropy_attention_weights",
  "entropy_dot_product_attention",
]


_DISCUSSION = "See https://github.com/google/flax/discussions/3389"


def _resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv):
  """Flax's defaults, errors and deprecation warnings for the key/value inputs.

  Same conditions, categories and messages as ``flax.linen.MultiHeadDotProductAttention``.
  """
  if inputs_kv is not None:
    if inputs_k is not None or inputs_v is not None:
      raise ValueError(
        "If either `inputs_k` or `inputs_v` is not None, `inputs_kv` must be None. If "
        "`inputs_kv` is not None, both `inputs_k` and `inputs_v` must be None. We recommend "
        "using `inputs_k` and `inputs_v` args, since `inputs_kv` will be deprecated soon. "
        f"{_DISCUSSION} for more information."
      )
    warnings.warn(
      "The inputs_kv arg will be deprecated soon. Use inputs_k and inputs_v instead. "
      f"{_DISCUSSION} for more information.",
      DeprecationWarning,
      stacklevel=2,
    )
    return inputs_kv, inputs_kv
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError(
        "`inputs_k` cannot be None if `inputs_v` is not None. To have both `inputs_k` and "
        "`inputs_v` be the same value, pass in the value to `inputs_k` and leave `inputs_v` as "
        "None."
      )
    inputs_k = inputs_q
  if inputs_v is None:
    inputs_v = inputs_k
  elif jnp.ndim(inputs_v) >= 2 and inputs_v.shape[-1] == inputs_v.shape[-2]:
    warnings.warn(
      f"You are passing an array of shape {inputs_v.shape} to the `inputs_v` arg, when you may "
      "have intended to pass it to the `mask` arg. As of Flax version 0.7.4, the function "
      "signature of MultiHeadDotProductAttention's `__call__` method has changed to "
      "`__call__(inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None, "
      f"deterministic=None)`. Use the kwarg `mask` instead. {_DISCUSSION} and read the "
      "docstring for more information.",
      DeprecationWarning,
      stacklevel=2,
    )
  return inputs_k, inputs_v


class EntropyMultiHeadAttention(nn.MultiHeadDotProductAttention):
  """Multi-head dot-product attention whose rows have a prescribed entropy (or bounded entropy).

  Targets name their unit: ``target_fraction=0.5`` (the default when no target is given) gives
  every row ``0.5 · log(n_valid)`` nats, ``target_entropy=1.2`` gives every row 1.2 nats, and the
  bounds ``min_entropy`` / ``max_entropy`` (``min_fraction`` / ``max_fraction``) keep rows whose
  softmax entropy lies inside them as plain softmax and normalize the others to the bound they
  cross.

  A drop-in for ``flax.linen.MultiHeadDotProductAttention``: the same attributes and call
  signature (masks, dropout, ``decode=True`` caching with or without ``jax_enable_x64``,
  ``normalize_qk``, ``sow_weights``, Flax's warnings for deprecated call patterns), and with a
  fixed target the same parameter tree, so checkpoints move between the two. Each attention row is
  ``softmax(γ*·s)`` with γ* chosen so its entropy is the target (see
  :func:`entropy_dot_product_attention`); the solve runs in float32 whatever ``dtype`` is.

  Attributes:
    target_entropy: the target in nats, a scalar or one value per head. With
      ``learn_target=True`` (this and every target below) it is the initial value.
    target_fraction: the target as a fraction of each row's largest entropy ``log(n_valid)``, so
      causal, padded and differently long rows get comparable targets; 0.5 when no target is
      given.
    min_entropy: a floor in nats (alone or with a ceiling), instead of an exact target.
    max_entropy: a ceiling in nats.
    min_fraction: a floor as a fraction of ``log(n_valid)``.
    max_fraction: a ceiling as a fraction of ``log(n_valid)``.
    learn_target: make each given target a per-head parameter of shape ``[num_heads]``
      (``'target_raw'`` for an exact target, ``'min_raw'`` / ``'max_raw'`` for bounds), mapped
      into its range by ``softplus`` (nats) or ``sigmoid`` (fractions); its gradient is the
      implicit derivative of the solve.
    num_iters: solver iterations (static); ``None`` for the core's default.
    implementation: ``"xla"`` (dense weights, every option) or ``"blockwise"`` / ``"pallas"``
      (:func:`entnorm_jax.attention.entropy_attention`; no dropout, bias or ``sow``).
    sow_entropies: sow each row's entropy before normalization (that of ``softmax(s)``) and after
      it into ``'intermediates'`` as ``'entropy_before'`` and ``'entropy_after'`` (``[batch...,
      num_heads, q_length]`` nats), to measure a trained model's heads and pick targets from
      them (``"xla"`` only).
    relative: removed; setting it raises a ``ValueError`` naming ``target_fraction``.
    attention_fn: the attention function, called with Flax's keywords as
      ``flax.linen.MultiHeadDotProductAttention`` calls it (those its signature names), plus the
      target keywords, ``num_iters`` and ``implementation`` (and ``sow_weights``,
      ``sow_entropies`` with ``sow_entropies``), each of these only when its signature names it
      or takes ``**kwargs`` (as in :mod:`entnorm_jax.nnx`).
    The other attributes are those of ``flax.linen.MultiHeadDotProductAttention``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from entnorm_jax.linen import EntropyMultiHeadAttention
    >>> layer = EntropyMultiHeadAttention(num_heads=2, qkv_features=8, target_fraction=0.5)
    >>> x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    >>> variables = layer.init(jax.random.key(1), x)
    >>> layer.apply(variables, x).shape
    (3, 5, 8)
    >>> out, state = layer.apply(variables, x, sow_weights=True, mutable=["intermediates"])
    >>> (w,) = state["intermediates"]["attention_weights"]  # [3, 2, 5, 5]
    >>> h = -jnp.sum(w * jnp.log(w), axis=-1)  # every row: 0.5 · log(5) nats
    >>> bool(jnp.allclose(h, 0.5 * jnp.log(5.0), atol=1e-4))
    True
  """

  target_entropy: float | Sequence[float] | None = None
  target_fraction: float | Sequence[float] | None = None
  min_entropy: float | Sequence[float] | None = None
  max_entropy: float | Sequence[float] | None = None
  min_fraction: float | Sequence[float] | None = None
  max_fraction: float | Sequence[float] | None = None
  learn_target: bool = False
  num_iters: int | None = None
  implementation: str = "xla"
  sow_entropies: bool = False
  relative: None = None  # removed: raises, naming target_fraction
  attention_fn: Callable[..., jax.Array] = entropy_dot_product_attention

  def _given_targets(self) -> dict:
    removed = {} if self.relative is None else {"relative": self.relative}
    given = {name: getattr(self, name) for name in KEYWORDS}
    return module_targets(
      num_heads=self.num_heads, learn=self.learn_target, removed=removed, **given
    )

  def targets(self) -> dict[str, jax.Array]:
    """The keywords of the rows' target (``{"target_fraction": 0.5}`` by default), each a scalar
    or ``[num_heads]``; parameters when ``learn_target``."""
    out = {}
    for name, value in self._given_targets().items():
      if not self.learn_target:
        out[name] = jnp.asarray(value)
        continue
      fraction = name.endswith("fraction")
      init = target_to_raw(value, num_heads=self.num_heads, fraction=fraction)
      raw = self.param(RAW_NAMES[name], lambda _, r=init: jnp.asarray(r, self.param_dtype))
      out[name] = raw_to_target(raw, fraction=fraction)
    return out

  def _cached_kv(self, query, key, value, mask):
    """Appends this step's key/value to the decode cache; returns them and the combined mask."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key, value, mask
    key, value, seen = cache_step(
      cached_key.value, cached_value.value, index.value, key, value, ("query", query)
    )
    cached_key.value, cached_value.value = key, value
    index.value = index.value + 1
    return key, value, nn.combine_masks(mask, seen, dtype=bool)

  @nn.compact
  def __call__(
    self,
    inputs_q: jax.Array,
    inputs_k: jax.Array | None = None,
    inputs_v: jax.Array | None = None,
    *,
    inputs_kv: jax.Array | None = None,
    mask: jax.Array | None = None,
    deterministic: bool | None = None,
    dropout_rng: jax.Array | None = None,
    sow_weights: bool = False,
  ) -> jax.Array:
    """Applies entropy-normalized multi-head attention.

    The rows' target is the module's (see the class docstring; ``target_fraction=0.5`` when
    none is given).

    Args:
      inputs_q: queries ``[batch..., q_length, features]``.
      inputs_k: keys ``[batch..., kv_length, features]`` (default: ``inputs_q``).
      inputs_v: values ``[batch..., kv_length, features]`` (default: ``inputs_k``). As in Flax, a
        square trailing shape (likely a mask passed positionally) warns with a
        ``DeprecationWarning``.
      inputs_kv: deprecated in Flax (a ``DeprecationWarning``, as there); keys and values at once.
      mask: boolean ``[batch..., num_heads, q_length, kv_length]``; False keys are excluded.
      deterministic: disables dropout (merged with the attribute as in Flax).
      dropout_rng: dropout key (default: ``self.make_rng('dropout')``).
      sow_weights: sow the attention weights into ``'intermediates'``.

    Returns:
      ``[batch..., q_length, out_features]``.

    Raises:
      ValueError: for inconsistent inputs, an unknown ``implementation``, or a bad target.
    """
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}"
      )
    inputs_k, inputs_v = _resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)

    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(
        f"qkv_features ({qkv_features}) must be divisible by num_heads ({self.num_heads})"
      )
    dense = functools.partial(
      nn.DenseGeneral,
      axis=-1,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      features=(self.num_heads, qkv_features // self.num_heads),
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      use_bias=self.use_bias,
      precision=self.precision,
      dot_general=self.qkv_dot_general,
      dot_general_cls=self.qkv_dot_general_cls,
    )
    query = dense(name="query")(inputs_q)
    key = dense(name="key")(inputs_k)
    value = dense(name="value")(inputs_v)
    if self.normalize_qk:
      norm = functools.partial(
        nn.LayerNorm, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
      )
      query = norm(name="query_ln")(query)
      key = norm(name="key_ln")(key)
    if self.decode:
      key, value, mask = self._cached_kv(query, key, value, mask)

    if self.dropout_rate > 0.0:
      deterministic = merge_param("deterministic", self.deterministic, deterministic)
      if not deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      deterministic = True

    kwargs = dict(
      flax_keywords(self, mask, dropout_rng, deterministic),
      force_fp32_for_softmax=self.force_fp32_for_softmax,
      qk_attn_weights_einsum=(
        self.qk_attn_weights_einsum_cls() if self.qk_attn_weights_einsum_cls else None
      ),
      attn_weights_value_einsum=(
        self.attn_weights_value_einsum_cls() if self.attn_weights_value_einsum_cls else None
      ),
    )
    # Flax's keywords filtered by signature, as Flax's module does
    accepted = inspect.signature(self.attention_fn).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    kwargs.update(module_keywords(self, sow_weights))
    if sow_weights or self.sow_entropies:
      kwargs["module"] = self
    x = self.attention_fn(query, key, value, **kwargs)
    return nn.DenseGeneral(
      features=self.out_features or inputs_q.shape[-1],
      axis=(-2, -1),
      kernel_init=self.out_kernel_init or self.kernel_init,
      bias_init=self.out_bias_init or self.bias_init,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      dot_general=self.out_dot_general,
      dot_general_cls=self.out_dot_general_cls,
      name="out",
    )(x)

"""Flax NNX attention with entropy-normalized rows.

Targets name their unit: ``EntropyMultiHeadAttention(4, 16, target_fraction=0.5, rngs=rngs)`` (the
default) gives every attention row ``0.5 · log(n_valid)`` nats (``log(n_valid)`` is the largest
entropy a row over ``n_valid`` visible keys can have), ``target_entropy=1.2`` gives every row 1.2
nats, and ``min_entropy`` / ``max_entropy`` (``min_fraction`` / ``max_fraction``) bound the
entropy instead, leaving rows inside the bounds as plain softmax.

:class:`EntropyMultiHeadAttention` is a drop-in for ``flax.nnx.MultiHeadAttention`` (same
constructor plus the target settings, same parameters when the target is fixed) whose attention rows
all have a prescribed entropy. :func:`entropy_dot_product_attention` is the same function as in
:mod:`entnorm_jax.linen` and works as the ``attention_fn`` of Flax's own NNX module too (it accepts
the ``is_causal`` keyword NNX passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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

__all__ = [
  "EntropyMultiHeadAttention",
  "entropy_attention_weights",
  "entropy_dot_product_attention",
]


class EntropyMultiHeadAttention(nnx.MultiHeadAttention):
  """Multi-head attention whose rows have a prescribed entropy (or bounded entropy), for Flax NNX.

  Targets name their unit: ``target_fraction=0.5`` (the default when no target is given) gives
  every row ``0.5 · log(n_valid)`` nats, ``target_entropy=1.2`` gives every row 1.2 nats, and the
  bounds ``min_entropy`` / ``max_entropy`` (``min_fraction`` / ``max_fraction``) keep rows whose
  softmax entropy lies inside them as plain softmax and normalize the others to the bound they
  cross.

  Constructed like ``flax.nnx.MultiHeadAttention`` (every argument is passed on) plus the target
  settings; masks, ``is_causal``, dropout, ``decode`` caching (``init_cache``; with or without
  ``jax_enable_x64``), grouped-query heads (``num_kv_heads``) and ``sow_weights`` behave as there.
  With a fixed target the parameters are exactly Flax's, so ``nnx.state(module, nnx.Param)`` moves
  between the two. Each attention row is ``softmax(γ*·s)`` with entropy equal to the target, solved
  in float32 whatever ``dtype`` is.

  Args:
    num_heads: number of query heads.
    in_features: input features.
    *args: the remaining positional arguments of ``flax.nnx.MultiHeadAttention``.
    target_entropy: the target in nats, a scalar or one value per head; the initial value when
      ``learn_target`` (as every target below).
    target_fraction: the target as a fraction of each row's largest entropy ``log(n_valid)``;
      0.5 when no target is given.
    min_entropy: a floor in nats (alone or with a ceiling), instead of an exact target.
    max_entropy: a ceiling in nats.
    min_fraction: a floor as a fraction of ``log(n_valid)``.
    max_fraction: a ceiling as a fraction of ``log(n_valid)``.
    learn_target: make each given target a per-head parameter (``[num_heads]``): ``target_raw``
      for an exact target, ``min_raw`` / ``max_raw`` for bounds, mapped into range by
      ``softplus`` (nats) or ``sigmoid`` (fractions).
    num_iters: solver iterations (static); ``None`` for the core's default.
    implementation: ``"xla"`` (dense weights) or ``"blockwise"`` / ``"pallas"``
      (:func:`entnorm_jax.attention.entropy_attention`; no dropout, bias or ``sow``).
    sow_entropies: sow each row's entropy before normalization (that of ``softmax(s)``) and after
      it as ``nnx.Intermediate`` ``'entropy_before'`` and ``'entropy_after'`` (``[batch...,
      num_heads, q_length]`` nats), to measure a trained model's heads (``"xla"`` only).
    attention_fn: called with NNX's keywords, all of them, as ``flax.nnx.MultiHeadAttention``
      calls it, plus the target keywords, ``num_iters`` and ``implementation`` (and
      ``sow_weights``, ``sow_entropies`` with ``sow_entropies``), each of these only when its
      signature names it or takes ``**kwargs`` (as in :mod:`entnorm_jax.linen`): Flax's own
      attention functions work unchanged.
    rngs: the ``nnx.Rngs`` for initialization (and dropout).
    **kwargs: the remaining keyword arguments of ``flax.nnx.MultiHeadAttention``.

  Raises:
    ValueError: for a target of the wrong shape or range (naming its unit), several targets, the
      removed ``relative=`` (naming ``target_fraction``), or an unknown ``implementation``.

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from entnorm_jax.nnx import EntropyMultiHeadAttention
    >>> layer = EntropyMultiHeadAttention(num_heads=2, in_features=8, target_fraction=0.5,
    ...                                   decode=False, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    >>> layer(x).shape
    (3, 5, 8)
    >>> _, inter = nnx.capture(lambda m, x: m(x, sow_weights=True), nnx.Intermediate)(layer, x)
    >>> (w,) = inter["attention_weights"]  # [3, 2, 5, 5]
    >>> h = -jax.numpy.sum(w * jax.numpy.log(w), axis=-1)  # 0.5 · log(5) nats
    >>> bool(jax.numpy.allclose(h, 0.5 * jax.numpy.log(5.0), atol=1e-4))
    True
  """

  def __init__(
    self,
    num_heads: int,
    in_features: int,
    *args,
    target_entropy: float | Sequence[float] | None = None,
    target_fraction: float | Sequence[float] | None = None,
    min_entropy: float | Sequence[float] | None = None,
    max_entropy: float | Sequence[float] | None = None,
    min_fraction: float | Sequence[float] | None = None,
    max_fraction: float | Sequence[float] | None = None,
    learn_target: bool = False,
    num_iters: int | None = None,
    implementation: str = "xla",
    sow_entropies: bool = False,
    attention_fn: Callable[..., jax.Array] = entropy_dot_product_attention,
    rngs: nnx.Rngs,
    **kwargs,
  ):
    given = module_targets(
      num_heads=num_heads,
      learn=learn_target,
      removed={n: kwargs.pop(n) for n in ("relative",) if n in kwargs},
      target_entropy=target_entropy,
      target_fraction=target_fraction,
      min_entropy=min_entropy,
      max_entropy=max_entropy,
      min_fraction=min_fraction,
      max_fraction=max_fraction,
    )
    super().__init__(num_heads, in_features, *args, attention_fn=attention_fn, rngs=rngs, **kwargs)
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    self.learn_target = learn_target
    self.num_iters = num_iters
    self.implementation = implementation
    self.sow_entropies = sow_entropies
    self.target_names = tuple(given)  # static: the keywords of the target
    # static (hashable) values: a float, or a tuple of floats (one per head); None when learned
    self.target_values = None
    if learn_target:
      for name, value in given.items():
        raw = target_to_raw(value, num_heads=num_heads, fraction=name.endswith("fraction"))
        setattr(self, RAW_NAMES[name], nnx.Param(jnp.asarray(raw, self.param_dtype)))
    else:
      self.target_values = tuple(v.tolist() if v.ndim else float(v) for v in given.values())
      self.target_values = tuple(tuple(v) if isinstance(v, list) else v for v in self.target_values)

  def targets(self) -> dict[str, jax.Array]:
    """The keywords of the rows' target (``{"target_fraction": 0.5}`` by default), each a scalar
    or ``[num_heads]``: the parameters' current values when ``learn_target``."""
    if self.learn_target:
      return {
        name: raw_to_target(getattr(self, RAW_NAMES[name])[...], fraction=name.endswith("fraction"))
        for name in self.target_names
      }
    return {n: jnp.asarray(v) for n, v in zip(self.target_names, self.target_values, strict=True)}

  def target(self) -> jax.Array:
    """The exact target (in the unit its keyword names), a scalar or ``[num_heads]``.

    Raises:
      ValueError: for a module with entropy bounds (see :meth:`targets`).
    """
    if len(self.target_names) != 1 or not self.target_names[0].startswith("target"):
      raise ValueError(f"the module has bounds {self.target_names}, not one target: use targets()")
    return self.targets()[self.target_names[0]]

  def _cached_kv(self, key, value, mask):
    """Appends this step's key/value to the decode cache; returns them and the combined mask."""
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError("autoregressive cache not initialized: call init_cache first")
    index = self.cache_index[...]
    key, value, seen = cache_step(
      self.cached_key[...], self.cached_value[...], index, key, value, ("key", key)
    )
    self.cached_key[...] = key
    self.cached_value[...] = value
    self.cache_index[...] = index + 1
    return key, value, nnx.combine_masks(mask, seen, dtype=bool)

  def __call__(
    self,
    inputs_q: jax.Array,
    inputs_k: jax.Array | None = None,
    inputs_v: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    deterministic: bool | None = None,
    rngs: nnx.Rngs | nnx.RngStream | None = None,
    sow_weights: bool = False,
    decode: bool | None = None,
    is_causal: bool = False,
    out_sharding=None,
    qkv_sharding=None,
  ) -> jax.Array:
    """Applies entropy-normalized multi-head attention.

    The rows' target is the module's (see the class docstring; ``target_fraction=0.5`` when
    none is given).

    Args:
      inputs_q: queries ``[batch..., q_length, in_features]``.
      inputs_k: keys (default: ``inputs_q``).
      inputs_v: values (default: ``inputs_k``).
      mask: boolean ``[batch..., num_heads, q_length, kv_length]``; False keys are excluded.
      deterministic: disables dropout (takes precedence over the attribute).
      rngs: dropout rngs (default: those kept at construction).
      sow_weights: sow the weights as ``nnx.Intermediate`` ``'attention_weights'``.
      decode: use the autoregressive cache (takes precedence over the attribute; default False).
      is_causal: also mask keys after each query position.
      out_sharding: sharding of the output projection's result, as in Flax (if given).
      qkv_sharding: sharding of the query/key/value projections' results (if given).

    Returns:
      ``[batch..., q_length, out_features]``.

    Raises:
      ValueError: for inconsistent inputs, a missing cache or missing dropout settings.
    """
    if inputs_k is None and inputs_v is not None:
      raise ValueError("inputs_k cannot be None when inputs_v is given")
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(
        f"inputs_q has {inputs_q.shape[-1]} features, the module expects {self.in_features}"
      )
    qkv = {} if qkv_sharding is None else {"out_sharding": qkv_sharding}
    out = {} if out_sharding is None else {"out_sharding": out_sharding}
    query = self.query(inputs_q, **qkv)
    key = self.key(inputs_k, **qkv)
    value = self.value(inputs_v, **qkv)
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)
    if decode if decode is not None else bool(self.decode):
      key, value, mask = self._cached_kv(key, value, mask)

    dropout_rng = None
    if self.dropout_rate > 0.0:
      deterministic = self.deterministic if deterministic is None else deterministic
      if deterministic is None:
        raise ValueError("dropout_rate > 0 needs `deterministic`, at construction or call")
      if not deterministic:
        rngs = self.rngs if rngs is None else rngs
        if rngs is None:
          raise ValueError("dropout needs `rngs` (at call, or kept at construction)")
        dropout_rng = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs()
    else:
      deterministic = True

    x = self.attention_fn(
      query,
      key,
      value,
      **flax_keywords(self, mask, dropout_rng, deterministic),
      module=self if sow_weights or self.sow_entropies else None,
      is_causal=is_causal,
      **module_keywords(self, sow_weights),
    )
    return self.out(x, **out)

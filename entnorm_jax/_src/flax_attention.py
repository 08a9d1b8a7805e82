"""Entropy-normalized dot-product attention shared by the Linen and NNX modules.

Targets name their unit, as in the core functions: ``target_fraction=f`` gives every row
``f · log(n_valid)`` nats (``log(n_valid)`` is the largest entropy a row over ``n_valid`` visible
keys can have), ``target_entropy=1.2`` gives every row 1.2 nats, and the bounds ``min_entropy`` /
``max_entropy`` (``min_fraction`` / ``max_fraction``) leave rows whose softmax entropy lies inside
them as plain softmax attention. With no target named, the default is ``target_fraction=0.5``.

Each query row of the attention matrix gets a prescribed Shannon entropy: with logits
``s_k = q·k_k / sqrt(d) + b_k`` over the keys the query may see (``mask`` True, causal),

    a = softmax(γ* · s),      γ* >= 0 such that H(a) = -Σ_k a_k log a_k = H_target,

and the output is ``Σ_k a_k v_k``. With ``target_fraction`` the target is a fraction ``r`` of the
largest entropy the row can have, ``H_target = r · log(n_valid)``, so causal rows, padded rows and
different sequence lengths all get a comparable target. γ* comes from the core solver
(:func:`entnorm_jax.entropy_softmax`) and is differentiated implicitly, so gradients reach the
logits and the target (``∂γ*/∂H_t = -1 / (γ* Var_a[s])``) without going through the iterations.
The weights and outputs are the dense computation of :mod:`entnorm_jax._src.dense_attention` (the
one the ``"xla"`` reference of :mod:`entnorm_jax.attention` runs), with Flax's options around it.

The functions accept the keyword arguments Flax passes to an ``attention_fn`` (Linen filters them
by signature, NNX passes ``mask, dropout_rng, dropout_rate, broadcast_dropout, deterministic, dtype,
precision, module, is_causal``) and those Flax's functions accept (``force_fp32_for_softmax``,
``einsum_dot_general``, the ``qk_attn_weights_einsum`` / ``attn_weights_value_einsum`` overrides
with Flax's rules and errors, NNX's ``promote_dtype``), so they are drop-in replacements for
``flax.linen.dot_product_attention`` and ``flax.nnx.dot_product_attention``. Scores must be real:
complex inputs raise a ``TypeError``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax.typing import ArrayLike

from entnorm_jax._src import targets
from entnorm_jax._src.attention import _entropy_attention
from entnorm_jax._src.dense_attention import entropy_weights, scores, visible, weighted_values
from entnorm_jax._src.functions import cross_entropy_of, entropy
from entnorm_jax._src.inputs import check_qkv, compute_dtype
from entnorm_jax._src.targets import Spec

IMPLEMENTATIONS = ("xla", "blockwise", "pallas")


def _einsum(einsum: Callable[..., jax.Array] | None, precision, einsum_dot_general=None):
  """``einsum`` if given, else ``jnp.einsum`` with ``precision`` and ``einsum_dot_general``."""
  if einsum is not None:
    return einsum
  dot_general = einsum_dot_general if einsum_dot_general else jax.lax.dot_general
  return functools.partial(jnp.einsum, precision=precision, _dot_general=dot_general)


def _check_einsum_overrides(precision, einsum_dot_general, qk_einsum, av_einsum) -> None:
  """Flax's rules for the einsum overrides of ``dot_product_attention``, with its messages."""
  if bool(qk_einsum) != bool(av_einsum):
    raise ValueError(
      "qk_attn_weights_einsum and attn_weights_value_einsum must be specified together."
    )
  if (precision or einsum_dot_general) and (qk_einsum or av_einsum):
    raise ValueError(
      "precision/einsum_dot_general and qk_attn_weights_einsum/attn_weights_value_einsum are "
      "mutually exclusive. Please specify only one of them."
    )


def _check_real(**arrays: jax.Array | None) -> None:
  """Raises ``TypeError`` if any of the arrays that make the attention scores is complex."""
  dtypes = {name: jnp.result_type(a) for name, a in arrays.items() if a is not None}
  complex_ = {name: d for name, d in dtypes.items() if jnp.issubdtype(d, jnp.complexfloating)}
  if complex_:
    got = ", ".join(f"{name} of dtype {dtype}" for name, dtype in complex_.items())
    raise TypeError(
      "entropy normalization needs real attention scores (the entropy of softmax(γ·s) is "
      f"defined for real s only), got {got}; use flax's dot_product_attention for complex inputs"
    )


def _promote(promote_dtype, arrays: tuple[ArrayLike, ...], dtype) -> tuple[jax.Array, ...]:
  """Applies an NNX-style ``promote_dtype(arrays, dtype=dtype)`` and checks the result."""
  promoted = tuple(promote_dtype(tuple(arrays), dtype=dtype))
  if len(promoted) != len(arrays):
    raise ValueError(
      f"promote_dtype must return as many arrays as it is given ({len(arrays)}), got "
      f"{len(promoted)}"
    )
  return tuple(jnp.asarray(a) for a in promoted)


def attention_spec(where: str, removed: dict, **keywords) -> tuple[object, Spec]:
  """The target of an attention call (``target_fraction=0.5`` when none is named)."""
  return targets.parse(where, "target_fraction", 0.5, removed=removed, **keywords)


def _keywords(target, spec: Spec) -> dict[str, object]:
  """The keywords that name ``target`` (the inverse of :func:`attention_spec`)."""
  values = target if spec.bounded else (target,)
  return dict(zip(spec.names, values, strict=True))


def _sow(module, name: str, value: jax.Array) -> None:
  if isinstance(module, linen.Module):
    module.sow("intermediates", name, value)
  else:
    module.sow(nnx.Intermediate, name, value)


def _sow_entropies(module, logits, valid, weights) -> None:
  """Sows each row's entropy (nats) before (``softmax(s)``) and after normalization, as
  ``'entropy_before'`` and ``'entropy_after'`` of shape ``[batch..., num_heads, q_length]``."""
  logits, weights = jax.lax.stop_gradient((logits, weights))
  logits = logits.astype(compute_dtype(logits.dtype))
  weights = weights.astype(logits.dtype)
  _sow(module, "entropy_before", entropy(logits, -1, valid))
  _sow(module, "entropy_after", cross_entropy_of(weights, jnp.log(weights)))


def entropy_attention_weights(
  query: ArrayLike,
  key: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  broadcast_dropout: bool = True,
  dropout_rng: jax.Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype=None,
  precision=None,
  module=None,
  *,
  force_fp32_for_softmax: bool = False,
  is_causal: bool = False,
  target_entropy: ArrayLike | None = None,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  einsum_dot_general: Callable[..., jax.Array] | None = None,
  einsum: Callable[..., jax.Array] | None = None,
  promote_dtype: Callable[..., tuple[jax.Array, ...]] = nnx_dtypes.promote_dtype,
  sow_weights: bool = True,
  sow_entropies: bool = False,
  **removed,
) -> jax.Array:
  """Entropy-normalized attention weights: every query row has a prescribed entropy.

  The target names its unit: ``target_fraction=f`` (the default, ``f = 0.5``) gives each row
  ``f · log(n_valid)`` nats (``n_valid``: the keys the query may see), ``target_entropy`` is in
  nats, and the bounds ``min_entropy`` / ``max_entropy`` (``min_fraction`` / ``max_fraction``)
  keep rows whose softmax entropy lies inside them as plain softmax.

  Like ``flax.linen.dot_product_attention_weights`` with the softmax replaced by
  ``softmax(γ*·s)`` (γ* per row, solved in float32 or float64) so that each row has the target
  entropy. Masked keys (``mask`` False, above the diagonal with ``is_causal``, or ``-inf`` logits)
  get weight exactly 0 and are excluded from ``n_valid`` and from the entropy; a query with no
  visible key gets all-zero weights (Flax's softmax would spread it uniformly). Grouped-query
  attention (fewer key heads than query heads) is supported.

  Args:
    query: ``[batch..., q_length, num_heads, depth]``; real (complex scores have no entropy
      normalization).
    key: ``[batch..., kv_length, num_kv_heads, depth]``; ``num_heads % num_kv_heads == 0``.
    bias: optional additive bias broadcastable to ``[batch..., num_heads, q_length, kv_length]``.
    mask: optional boolean mask broadcastable to ``[batch..., num_heads, q_length, kv_length]``.
    broadcast_dropout: share the dropout pattern across batch and heads.
    dropout_rng: PRNG key for dropout.
    dropout_rate: dropout probability on the weights (applied after normalization).
    deterministic: disables dropout.
    dtype: dtype of the computation (default: promoted from the inputs); the solve itself runs in
      at least float32.
    precision: ``jax.lax.Precision`` of the einsum.
    module: Linen or NNX module to ``sow`` into (``'intermediates'`` / ``nnx.Intermediate``), or
      ``None``: the weights as ``'attention_weights'`` (with ``sow_weights``), the entropies
      with ``sow_entropies``.
    force_fp32_for_softmax: return the weights in float32 instead of ``dtype``.
    is_causal: also mask keys after the query position (``tril``).
    target_entropy: the target in nats: a scalar, one value per head (``[num_heads]``) or an
      array broadcastable to ``[batch..., num_heads, q_length]``.
    target_fraction: the target as a fraction in [0, 1] of ``log(n_valid)``, shaped as
      ``target_entropy``; the default (0.5) when no target is named.
    min_entropy: a floor in nats (instead of an exact target; alone or with a ceiling).
    max_entropy: a ceiling in nats. Rows whose softmax entropy lies inside the bounds keep
      ``softmax(s)``; the others are normalized to the bound they cross.
    min_fraction: a floor as a fraction of ``log(n_valid)``.
    max_fraction: a ceiling as a fraction of ``log(n_valid)``.
    num_iters: solver iterations (static); ``None`` for the core's default.
    einsum_dot_general: the ``dot_general`` of the default einsum (as in Flax).
    einsum: replacement for ``jnp.einsum`` in the query-key product (AQT hook); as in Flax,
      exclusive with ``precision`` and ``einsum_dot_general``.
    promote_dtype: as in ``flax.nnx.dot_product_attention_weights``: called as
      ``promote_dtype((query, key), dtype=dtype)``, returns the arrays to compute with.
    sow_weights: with ``module``, sow the weights (``'attention_weights'``), as Flax does.
    sow_entropies: with ``module``, sow each row's entropy before normalization (that of
      ``softmax(s)``) and after, as ``'entropy_before'`` and ``'entropy_after'``
      (``[batch..., num_heads, q_length]``, nats): what a trained model's heads do, to pick
      targets from.

  Returns:
    Weights ``[batch..., num_heads, q_length, kv_length]``.

  Raises:
    ValueError: for inconsistent shapes, a per-head target of the wrong length, several targets,
      a concrete target with no meaning in its unit, the removed ``relative=``, or ``einsum``
      together with ``precision``/``einsum_dot_general``.
    TypeError: for complex query, key or bias.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from entnorm_jax.linen import entropy_attention_weights
    >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 5, 2, 8))
    >>> w = entropy_attention_weights(q, k, target_fraction=0.5)  # 0.5 · log(5) nats
    >>> h = -jnp.sum(w * jnp.log(w), axis=-1)
    >>> bool(jnp.allclose(h, 0.5 * jnp.log(5.0), atol=1e-4))
    True
    >>> w = entropy_attention_weights(q, k, target_entropy=1.2)  # nats
    >>> bool(jnp.allclose(-jnp.sum(w * jnp.log(w), axis=-1), 1.2, atol=1e-4))
    True
  """
  target, spec = attention_spec(
    "entropy_attention_weights", removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  if (precision or einsum_dot_general) and einsum:
    raise ValueError(
      "precision/einsum_dot_general and einsum are mutually exclusive. Please specify only one "
      "of them."
    )
  query, key = _promote(promote_dtype, (query, key), dtype)
  _check_real(query=query, key=key, bias=bias)
  check_qkv(query, key)
  dtype = query.dtype
  heads, depth = query.shape[-2:]
  query = query / jnp.sqrt(depth).astype(dtype)
  logits = scores(query, key, _einsum(einsum, precision, einsum_dot_general))
  if bias is not None:
    logits = logits + bias
  valid = visible(mask, is_causal, *logits.shape[-2:])
  solve_dtype = compute_dtype(logits.dtype)
  target = targets.per_row(target, spec, logits.shape[:-1], solve_dtype, heads=heads)
  weights = entropy_weights(logits, valid, target, spec, num_iters)
  if module is not None and sow_entropies:
    _sow_entropies(module, logits, valid, weights)
  if not force_fp32_for_softmax:
    weights = weights.astype(dtype)
  if module is not None and sow_weights:
    _sow(module, "attention_weights", weights)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = (1,) * (weights.ndim - 2) + weights.shape[-2:] if broadcast_dropout else weights.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype))
  return weights


def _kernel_attention(query, key, value, mask, is_causal, target, spec, num_iters, impl, precision):
  """Calls :func:`entnorm_jax.attention.entropy_attention` (one batch axis) on Flax's layout."""
  *batch, q_len, heads, _ = query.shape
  rows = math.prod(batch)
  solve_dtype = compute_dtype(query.dtype)
  target = targets.per_row(target, spec, (*batch, heads, q_len), solve_dtype, heads=heads)
  target = target.reshape(rows, heads, q_len, *target.shape[len(batch) + 2 :])
  per_row = (target[..., 0], target[..., 1]) if spec.bounded else target
  if mask is not None:
    mask = jnp.asarray(mask).astype(bool)
    if len(batch) != 1:
      full = (*batch, heads, q_len, key.shape[-3])
      mask = jnp.broadcast_to(mask, full).reshape(rows, *full[-3:])
  out = _entropy_attention(
    *(x.reshape(rows, *x.shape[-3:]) for x in (query, key, value)),
    per_row,
    spec=spec,
    mask=mask,
    is_causal=is_causal,
    scale=None,
    implementation=impl,
    block_q=None,
    block_k=None,
    interpret=None,
    num_iters=num_iters,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    precision=precision,
  )
  return out.reshape(*batch, q_len, heads, value.shape[-1])


def entropy_dot_product_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  broadcast_dropout: bool = True,
  dropout_rng: jax.Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype=None,
  precision=None,
  module=None,
  *,
  force_fp32_for_softmax: bool = False,
  is_causal: bool = False,
  einsum_dot_general: Callable[..., jax.Array] | None = None,
  qk_attn_weights_einsum: Callable[..., jax.Array] | None = None,
  attn_weights_value_einsum: Callable[..., jax.Array] | None = None,
  promote_dtype: Callable[..., tuple[jax.Array, ...]] = nnx_dtypes.promote_dtype,
  target_entropy: ArrayLike | None = None,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  implementation: str = "xla",
  sow_weights: bool = True,
  sow_entropies: bool = False,
  **removed,
) -> jax.Array:
  """Dot-product attention whose rows have a prescribed entropy; a drop-in ``attention_fn``.

  The target names its unit: ``target_fraction=0.5`` (the default) gives each row
  ``0.5 · log(n_valid)`` nats (``n_valid``: the keys the query may see), ``target_entropy=1.2``
  gives each row 1.2 nats, and bounds (``min_entropy`` / ``max_entropy``, ``min_fraction`` /
  ``max_fraction``) leave rows whose softmax entropy lies inside them as plain softmax.

  ``out[q] = Σ_k a_qk v_k`` with ``a_q = softmax(γ*_q · s_q)``, ``s_qk = q·k / sqrt(depth) + b_qk``
  and γ*_q >= 0 chosen so that ``H(a_q) = H_target`` (``target_fraction=r``: ``r · log(n_valid)``).
  See :func:`entropy_attention_weights` for masks, dropout, ``sow`` and grouped-query heads. Works
  as ``attention_fn`` of ``flax.linen.MultiHeadDotProductAttention`` (which filters keywords by
  signature) and of ``flax.nnx.MultiHeadAttention`` (which passes ``is_causal`` unfiltered), and
  takes every keyword of ``flax.linen.dot_product_attention`` and ``flax.nnx.dot_product_attention``
  with their meaning (keyword-only here after ``module``, where the two differ in position).

  Args:
    query: ``[batch..., q_length, num_heads, depth]``; real (see Raises).
    key: ``[batch..., kv_length, num_kv_heads, depth]``.
    value: ``[batch..., kv_length, num_kv_heads, v_depth]``.
    bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, dtype, precision,
    module, force_fp32_for_softmax, is_causal: as in Flax's ``dot_product_attention``.
    einsum_dot_general: the ``dot_general`` of the default einsums (as in Flax).
    qk_attn_weights_einsum: replacement for ``jnp.einsum`` in the query-key product.
    attn_weights_value_einsum: replacement for ``jnp.einsum`` in the weights-value product. As in
      Flax, the two overrides come together and exclude ``precision`` and ``einsum_dot_general``.
    promote_dtype: as in ``flax.nnx.dot_product_attention``: called as
      ``promote_dtype((query, key, value), dtype=dtype)``, returns the arrays to compute with.
    target_entropy, target_fraction, min_entropy, max_entropy, min_fraction, max_fraction: the
      target or bounds, as in :func:`entropy_attention_weights` (default ``target_fraction=0.5``).
    num_iters: solver iterations (static); ``None`` for the core's default.
    implementation: ``"xla"`` materializes the weights (all options supported); ``"blockwise"`` and
      ``"pallas"`` call :func:`entnorm_jax.attention.entropy_attention`, which never forms the
      full matrix (no bias, dropout, ``sow`` or einsum overrides there).
    sow_weights: with ``module``, sow the weights (as Flax does).
    sow_entropies: with ``module``, sow each row's entropy before and after normalization (see
      :func:`entropy_attention_weights`); ``"xla"`` only.

  Returns:
    ``[batch..., q_length, num_heads, v_depth]``.

  Raises:
    ValueError: for inconsistent shapes, an unknown ``implementation``, an option the chosen
      implementation does not support, only one of the two einsum overrides, or the overrides
      together with ``precision``/``einsum_dot_general`` (Flax's messages).
    TypeError: for complex inputs or bias: entropy normalization needs real scores.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from entnorm_jax.linen import entropy_dot_product_attention
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 4, 8))
    >>> entropy_dot_product_attention(q, k, v, target_fraction=0.5).shape  # 0.5 · log(5) nats
    (2, 5, 4, 8)
    >>> entropy_dot_product_attention(q, k, v, target_entropy=1.2).shape  # nats
    (2, 5, 4, 8)
  """
  target, spec = attention_spec(
    "entropy_dot_product_attention", removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  _check_einsum_overrides(
    precision, einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum
  )
  query, key, value = _promote(promote_dtype, (query, key, value), dtype)
  _check_real(query=query, key=key, value=value, bias=bias)
  check_qkv(query, key, value)
  if implementation != "xla":
    unsupported = {
      "bias": bias is not None,
      "dropout": not deterministic and dropout_rate > 0.0,
      "module (sow)": module is not None,
      "einsum overrides": bool(
        qk_attn_weights_einsum or attn_weights_value_einsum or einsum_dot_general
      ),
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
      raise ValueError(f"implementation={implementation!r} does not support {', '.join(used)}")
    return _kernel_attention(
      query, key, value, mask, is_causal, target, spec, num_iters, implementation, precision
    )
  weights = entropy_attention_weights(
    query,
    key,
    bias,
    mask,
    broadcast_dropout,
    dropout_rng,
    dropout_rate,
    deterministic,
    dtype,
    precision,
    module,
    force_fp32_for_softmax=force_fp32_for_softmax,
    is_causal=is_causal,
    num_iters=num_iters,
    einsum_dot_general=einsum_dot_general,
    einsum=qk_attn_weights_einsum,
    promote_dtype=promote_dtype,
    sow_weights=sow_weights,
    sow_entropies=sow_entropies,
    **_keywords(target, spec),
  )
  einsum = _einsum(attn_weights_value_einsum, precision, einsum_dot_general)
  return weighted_values(weights, value, einsum)


def flax_keywords(module, mask, dropout_rng, deterministic) -> dict[str, object]:
  """The keywords both of Flax's attention modules pass their ``attention_fn`` (each adds its own).

  Args:
    module: a Linen or NNX attention module (its dropout settings, ``dtype`` and ``precision``).
    mask: the call's mask (with the decode cache's, if any).
    dropout_rng: the dropout key, or ``None``.
    deterministic: whether dropout is off.

  Returns:
    ``mask``, ``dropout_rng``, ``dropout_rate``, ``broadcast_dropout``, ``deterministic``,
    ``dtype`` and ``precision``.
  """
  return dict(
    mask=mask,
    dropout_rng=dropout_rng,
    dropout_rate=module.dropout_rate,
    broadcast_dropout=module.broadcast_dropout,
    deterministic=deterministic,
    dtype=module.dtype,
    precision=module.precision,
  )


def module_keywords(module, sow_weights: bool) -> dict[str, object]:
  """The keywords an entropy attention module adds to Flax's when it calls its ``attention_fn``.

  Both modules pass Flax's own keywords exactly as Flax's module of their kind does (Linen keeps
  those the function's signature names, NNX passes them all), so any ``attention_fn`` of Flax's
  module works in ours; to these they add the target keywords, ``num_iters`` and
  ``implementation`` (and ``sow_weights``, ``sow_entropies`` with ``sow_entropies``), each only
  when the signature names it or takes ``**kwargs``.

  Args:
    module: a Linen or NNX ``EntropyMultiHeadAttention``.
    sow_weights: the call's ``sow_weights``.

  Returns:
    The keywords to add.

  Raises:
    ValueError: for ``sow_entropies=True`` with an ``attention_fn`` that does not take it.
  """
  ours = dict(module.targets(), num_iters=module.num_iters, implementation=module.implementation)
  if module.sow_entropies:
    ours.update(sow_entropies=True, sow_weights=sow_weights)
  accepted = inspect.signature(module.attention_fn).parameters
  takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
  if module.sow_entropies and not (takes_all or "sow_entropies" in accepted):
    raise ValueError("sow_entropies=True needs an attention_fn that takes sow_entropies")
  return {k: v for k, v in ours.items() if takes_all or k in accepted}


def cache_step(cached_key, cached_value, index, key, value, checked: tuple[str, jax.Array]):
  """One step of the autoregressive key/value cache, as Flax's attention modules take it.

  Args:
    cached_key: the cached keys ``[batch..., max_length, kv_heads, depth]``.
    cached_value: the cached values, of the same shape.
    index: the int scalar position this step's key and value go to.
    key: this step's key ``[batch..., 1, kv_heads, depth]``.
    value: this step's value, of the same shape.
    checked: ``(name, array)``, the input that must have the shape of one step (Linen checks the
      query, NNX the key, as Flax's modules do).

  Returns:
    ``(keys, values, seen)``: the cache with this step written at ``index``, and the boolean mask
    ``[batch..., 1, 1, max_length]`` of the positions filled so far.

  Raises:
    ValueError: for a ``checked`` array that is not one step.
  """
  *batch, max_length, heads, depth = cached_key.shape
  name, array = checked
  if array.shape != (*batch, 1, heads, depth):
    raise ValueError(
      f"autoregressive cache expects a {name} of shape {(*batch, 1, heads, depth)}, got "
      f"{array.shape}"
    )
  # all start indices in the cache index's dtype: Python ints would be int64 under x64
  zero = jnp.zeros((), index.dtype)
  start = (zero,) * len(batch) + (index, zero, zero)
  key = jax.lax.dynamic_update_slice(cached_key, key, start)
  value = jax.lax.dynamic_update_slice(cached_value, value, start)
  seen = jnp.broadcast_to(jnp.arange(max_length) <= index, (*batch, 1, 1, max_length))
  return key, value, seen


# Parameter names of learned targets; the exact target keeps the name it had before bounds.
RAW_NAMES = {
  "target_entropy": "target_raw",
  "target_fraction": "target_raw",
  "min_entropy": "min_raw",
  "min_fraction": "min_raw",
  "max_entropy": "max_raw",
  "max_fraction": "max_raw",
}


def module_targets(
  *, num_heads: int, learn: bool, removed: dict | None = None, **keywords
) -> dict[str, np.ndarray]:
  """Validates a module's target keywords; returns ``{keyword: float32 () or [num_heads]}``.

  The rules of :func:`entnorm_jax._src.targets.parse` (exactly one exact target, or bounds; units
  checked), ``target_fraction=0.5`` when none is given, and for a module: each value a scalar or
  one per head, not NaN, and strictly inside its range when learned (a fraction in (0, 1), nats
  ``> 0``: the parameterizations' images).

  Raises:
    ValueError: for a removed keyword (``relative=``), several targets, a value of the wrong shape
      or outside its unit's range.
  """
  if removed:
    targets.reject_removed(removed, "EntropyMultiHeadAttention")
  # one target or bounds, units checked
  targets.parse("EntropyMultiHeadAttention", "target_fraction", 0.5, **keywords)
  given = {n: v for n, v in keywords.items() if v is not None} or {"target_fraction": 0.5}
  out = {}
  for name, value in given.items():
    v = np.asarray(value, np.float32)
    if v.ndim > 1 or (v.ndim == 1 and v.shape[0] != num_heads):
      raise ValueError(
        f"{name} must be a scalar or have shape ({num_heads},) (one per head), got shape {v.shape}"
      )
    fraction = name.endswith("fraction")
    if learn:
      ok = (v > 0) & (v < 1) if fraction else (v > 0) & np.isfinite(v)
    else:
      ok = ~np.isnan(v)
    if not np.all(ok):
      unit = "a fraction of log(n_valid)" if fraction else "in nats"
      need = ("in (0, 1)" if fraction else "finite and > 0") if learn else "a number"
      other = targets.other_unit(name)
      raise ValueError(
        f"{name} is {unit} and must be {need}{' to be learned' if learn else ''}, got {value}; "
        f"for the other unit use {other}="
      )
    out[name] = v
  return out


def target_to_raw(target: np.ndarray, *, num_heads: int, fraction: bool) -> np.ndarray:
  """Inverse of :func:`raw_to_target`: the unconstrained per-head parameter for ``target``."""
  target = np.broadcast_to(np.asarray(target, np.float64), (num_heads,))
  raw = np.log(target) - np.log1p(-target) if fraction else np.log(np.expm1(target))
  return raw.astype(np.float32)


def raw_to_target(raw: jax.Array, *, fraction: bool) -> jax.Array:
  """Smooth map from the parameter to a valid target: sigmoid (a fraction) or softplus (nats)."""
  return jax.nn.sigmoid(raw) if fraction else jax.nn.softplus(raw)

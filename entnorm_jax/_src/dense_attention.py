"""Dense attention ("xla"): scores materialized, rows normalized by the core.

``o = softmax(γ* s) v`` with ``s = scale · q kᵀ`` of shape ``[..., heads, q_len, kv_len]``; γ* and
its implicit derivative come from :func:`entnorm_jax.entropy_softmax`. Memory is quadratic in the
sequence length. This is the one dense computation: :func:`dense_attention` (the reference the
blockwise and Pallas versions are tested against) and the Flax functions of
:mod:`entnorm_jax._src.flax_attention` are both built from its pieces: :func:`scores`,
:func:`visible` (the keys each query may see), :func:`entropy_weights` and :func:`weighted_values`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from entnorm_jax._src.functions import _entropy_softmax
from entnorm_jax._src.inputs import compute_dtype
from entnorm_jax._src.targets import Spec


def scores(query: jax.Array, key: jax.Array, einsum: Callable[..., jax.Array]) -> jax.Array:
  """``q·k`` of every query head against its key head (grouped-query attention).

  Args:
    query: ``[batch..., q_len, heads, depth]``.
    key: ``[batch..., kv_len, kv_heads, depth]``; ``heads`` a multiple of ``kv_heads`` (query head
      ``h`` uses key head ``h // (heads // kv_heads)``).
    einsum: the contraction (``jnp.einsum`` with a precision, or a Flax override).

  Returns:
    ``[batch..., heads, q_len, kv_len]``.
  """
  *batch, q_len, heads, depth = query.shape
  kv_heads = key.shape[-2]
  if heads == kv_heads:  # the grouped contraction lays the scores out slower for the solve on CPU
    return einsum("...qhd,...khd->...hqk", query, key)
  grouped = query.reshape(*batch, q_len, kv_heads, heads // kv_heads, depth)
  s = einsum("...qhgd,...khd->...hgqk", grouped, key)
  return s.reshape(*batch, heads, q_len, key.shape[-3])


def visible(mask, is_causal: bool, q_len: int, kv_len: int) -> jax.Array | None:
  """The keys each query may see.

  Args:
    mask: ``None`` or a mask broadcastable to ``[..., q_len, kv_len]``; True (nonzero) keeps a key.
    is_causal: also keep only keys at or before the query position (top-left aligned, as in
      ``jax.nn.dot_product_attention``).
    q_len: the number of queries.
    kv_len: the number of keys.

  Returns:
    A boolean mask broadcastable to the scores, or ``None`` when every key is visible.
  """
  valid = None if mask is None else jnp.asarray(mask).astype(bool)
  if is_causal:
    causal = jnp.tril(jnp.ones((q_len, kv_len), bool))
    valid = causal if valid is None else valid & causal
  return valid


def entropy_weights(
  s: jax.Array, valid: jax.Array | None, target: jax.Array, spec: Spec, num_iters: int | None
) -> jax.Array:
  """``softmax(γ* s)`` over the keys of every row, each row's entropy at its target.

  Args:
    s: scores ``[..., q_len, kv_len]``, solved in :func:`entnorm_jax._src.inputs.compute_dtype`.
    valid: ``None`` or a boolean mask broadcastable to ``s`` (see :func:`visible`).
    target: per-row targets of shape ``s.shape[:-1]`` (``[..., 2]`` for bounds), in the units
      ``spec`` names.
    spec: the target's keywords and units (:class:`entnorm_jax._src.targets.Spec`).
    num_iters: ``None`` (adaptive) or the number of solver steps (static).

  Returns:
    The weights, of the shape of ``s`` in the compute dtype; exactly 0 at invalid keys.
  """
  per_row = (target[..., 0], target[..., 1]) if spec.bounded else target
  s = s.astype(compute_dtype(s.dtype))
  return _entropy_softmax(
    s, per_row, -1, valid, spec=spec, num_iters=num_iters, implementation=None
  )


def weighted_values(
  weights: jax.Array, value: jax.Array, einsum: Callable[..., jax.Array]
) -> jax.Array:
  """``Σ_k w_qk v_k`` for every query head, from its key head's values (grouped-query attention).

  Args:
    weights: ``[batch..., heads, q_len, kv_len]``.
    value: ``[batch..., kv_len, kv_heads, v_depth]``.
    einsum: the contraction (``jnp.einsum`` with a precision, or a Flax override).

  Returns:
    ``[batch..., q_len, heads, v_depth]``.
  """
  *batch, heads, q_len, kv_len = weights.shape
  kv_heads = value.shape[-2]
  if kv_heads == heads:
    return einsum("...hqk,...khd->...qhd", weights, value)
  grouped = weights.reshape(*batch, kv_heads, heads // kv_heads, q_len, kv_len)
  out = einsum("...hgqk,...khd->...qhgd", grouped, value)
  return out.reshape(*batch, q_len, heads, value.shape[-1])


def dense_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  target: jax.Array,
  q_ok: jax.Array,
  k_ok: jax.Array,
  mask: jax.Array | None,
  *,
  is_causal: bool,
  scale: float,
  spec: Spec,
  num_iters: int | None,
  precision: jax.lax.Precision | None = None,
) -> jax.Array:
  """Dense entropy-normalized attention on checked inputs (see ``entnorm_jax.attention``).

  Args:
    q: ``[batch, q_len, heads, dim]``; k, v: ``[batch, kv_len, kv_heads, dim]``.
    target: ``[batch, heads, q_len]`` targets, ``[..., 2]`` (floor, ceiling) for bounds, in the
      units ``spec`` names.
    q_ok: ``[batch, q_len]`` valid query rows; k_ok: ``[batch, kv_len]`` valid keys.
    mask: ``None`` or a boolean ``[batch|1, heads|1, q_len|1, kv_len|1]``.
    spec: the target's keywords and units (:class:`entnorm_jax._src.targets.Spec`).
    is_causal, scale, num_iters, precision: as in ``entropy_attention``.

  Returns:
    ``[batch, q_len, heads, dim]`` in the dtype of ``q``.
  """
  dtype = compute_dtype(q.dtype)
  einsum = functools.partial(jnp.einsum, precision=precision)
  s = scores(q.astype(dtype), k.astype(dtype), einsum) * scale
  ok = q_ok[:, None, :, None] & k_ok[:, None, None, :]
  valid = visible(ok if mask is None else ok & mask, is_causal, *s.shape[-2:])
  p = entropy_weights(s, valid, target, spec, num_iters)
  return weighted_values(p, v.astype(dtype), einsum).astype(q.dtype)

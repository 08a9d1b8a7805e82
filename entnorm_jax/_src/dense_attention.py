"""The dense reference ("xla"): scores materialized, rows normalized by the core.

``o = softmax(γ* s) v`` with ``s = scale · q kᵀ`` of shape ``[batch, heads, q_len, kv_len]``; γ* and
its implicit derivative come from :func:`entnorm_jax.entropy_softmax`. Memory is quadratic in the
sequence length: this is the reference the blockwise and Pallas versions are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from entnorm_jax._src.blockwise_attention import block_valid, compute_dtype
from entnorm_jax._src.functions import _entropy_softmax
from entnorm_jax._src.targets import Spec


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
  num_iters: int,
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
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  dtype = compute_dtype(q.dtype)
  prec = precision
  qg = q.astype(dtype).reshape(batch, q_len, kv_heads, groups, dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(dtype), precision=prec) * scale
  s = s.reshape(batch, heads, q_len, kv_len)
  valid = block_valid(
    jnp.arange(q_len), jnp.arange(kv_len), q_ok[:, None, :], k_ok[:, None, :], mask, is_causal
  )
  valid = jnp.broadcast_to(valid, s.shape)
  per_row = (target[..., 0], target[..., 1]) if spec.bounded else target
  p = _entropy_softmax(s, per_row, -1, valid, spec=spec, num_iters=num_iters, implementation=None)
  p = p.reshape(batch, kv_heads, groups, q_len, kv_len)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(dtype), precision=prec)
  return out.reshape(batch, q_len, heads, dim).astype(q.dtype)

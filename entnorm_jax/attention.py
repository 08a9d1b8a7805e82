"""Entropy-normalized attention for long sequences.

Each query row attends with ``P = softmax(γ* s)``, ``s = scale · q·k`` over its valid keys, where
the per-row inverse temperature γ* sets the entropy of P to a target:

    o_i = Σ_j P_ij v_j,      H(P_i) = H_target  (nats, or a fraction of log n_i with ``relative``).

Three implementations share these semantics:

* ``"xla"``: the dense reference (materializes the ``[batch, heads, q_len, kv_len]`` scores);
* ``"blockwise"``: pure JAX over query and key blocks, memory linear in the sequence length;
* ``"pallas"``: ``jax.experimental.pallas`` kernels of the same blockwise algorithm (GPU through
  Triton; ``interpret=True`` runs them anywhere).

The blockwise and Pallas versions have a flash-attention-style backward pass that recomputes
score blocks and uses the implicit derivative of γ*.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from entnorm_jax._src.blockwise_attention import BLOCKWISE, Config, attention_vjp, compute_dtype
from entnorm_jax._src.dense_attention import dense_attention
from entnorm_jax._src.pallas_attention import PALLAS, pallas_block_size

__all__ = ["entropy_attention"]

_IMPLEMENTATIONS = ("xla", "blockwise", "pallas")
_DEFAULT_BLOCKS = {"blockwise": (256, 256), "pallas": (64, 64)}


def _check_qkv(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"q, k, v must be [batch, seq, heads, dim]; got shapes {q.shape}, {k.shape}, {v.shape}"
    )
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(
      f"k and v must have the same shape, and batch and dim must match q; got q {q.shape}, "
      f"k {k.shape}, v {v.shape}"
    )
  if q.shape[2] % k.shape[2]:
    raise ValueError(
      f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
    )


def _mask4(mask, full):
  """A boolean mask broadcastable to ``full`` as 4-D, each axis of size 1 or full."""
  mask = jnp.asarray(mask)
  if mask.ndim > 4 or mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean with at most 4 axes, got {mask.dtype}{mask.shape}")
  shape = (1,) * (4 - mask.ndim) + mask.shape
  if any(m not in (1, f) for m, f in zip(shape, full, strict=True)):
    raise ValueError(f"mask of shape {mask.shape} does not broadcast to {full}")
  return mask.reshape(shape)


def _targets(target_entropy, batch: int, heads: int, q_len: int, dtype):
  """Targets as ``[batch, heads, q_len]``: a scalar, ``[heads]``, or broadcastable to that."""
  target = jnp.asarray(target_entropy)
  if target.ndim == 1:
    if target.shape[0] not in (1, heads):
      raise ValueError(f"a 1-D target_entropy must have length heads={heads}, got {target.shape}")
    target = target[:, None]
  full = (batch, heads, q_len)
  if np.broadcast_shapes(target.shape, full) != full:
    raise ValueError(f"target_entropy of shape {target.shape} does not broadcast to {full}")
  return jnp.broadcast_to(target.astype(dtype), full)


def _valid_positions(lengths, batch: int, size: int, name: str):
  if lengths is None:
    return jnp.ones((batch, size), bool)
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
      f"{name} must be integers of shape ({batch},), got {lengths.dtype}{lengths.shape}"
    )
  return jnp.arange(size)[None, :] < lengths[:, None]


def _block_size(value, default: int, length: int, implementation: str, name: str) -> int:
  if value is not None and operator.index(value) <= 0:
    raise ValueError(f"{name} must be a positive int, got {value}")
  size = default if value is None else operator.index(value)
  if implementation == "pallas":
    return pallas_block_size(size, length, name)
  return min(size, length)


@functools.partial(
  jax.jit,
  static_argnames=(
    "relative",
    "is_causal",
    "scale",
    "implementation",
    "block_q",
    "block_k",
    "interpret",
    "num_iters",
  ),
)
def entropy_attention(
  q: ArrayLike,
  k: ArrayLike,
  v: ArrayLike,
  *,
  target_entropy: ArrayLike,
  relative: bool = True,
  mask: ArrayLike | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  implementation: str = "xla",
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: bool | None = None,
  num_iters: int | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
) -> jax.Array:
  """Attention whose every row has a prescribed entropy.

  With scores ``s_ij = scale · q_i·k_j`` over the valid keys of row i,

    o_i = Σ_j P_ij v_j,    P_i = softmax(γ*_i s_i),    H(P_i) = clip(H_i, log m_i, log n_i),

  n_i the number of valid keys and m_i the number tied at the maximum (see
  :func:`entnorm_jax.solve_gamma`). γ* is differentiable by the implicit function theorem
  (``∂γ*/∂s_ij = -γ* P_ij (s_ij - E_P s) / Var_P s``), so gradients flow to q, k, v and the
  target. The blockwise and Pallas implementations never form the ``q_len × kv_len`` matrix, in
  the forward or the backward pass.

  Args:
    q: queries ``[batch, q_len, heads, dim]``.
    k: keys ``[batch, kv_len, kv_heads, dim]``; ``heads`` must be a multiple of ``kv_heads``
      (grouped-query attention: query head ``h`` uses key head ``h // (heads // kv_heads)``).
    v: values, the shape of ``k``.
    target_entropy: target entropy per row: a scalar, ``[heads]``, or an array broadcastable to
      ``[batch, heads, q_len]``; nats, or a fraction of log(n_valid) with ``relative=True``.
    relative: read ``target_entropy`` as a fraction of each row's maximum entropy log(n_valid).
    mask: optional boolean mask broadcastable to ``[batch, heads, q_len, kv_len]``; True keeps
      a key. A padding mask ``[batch, 1, 1, kv_len]`` stays linear in memory in the blockwise
      and Pallas versions.
    is_causal: keep key j for query i only when j <= i (top-left aligned, as in
      ``jax.nn.dot_product_attention``).
    scale: score scale, default ``1/sqrt(dim)``.
    implementation: ``"xla"`` (dense reference), ``"blockwise"`` or ``"pallas"``.
    block_q: query block size (blockwise default 256, Pallas 64); lengths need not divide it.
    block_k: key block size (blockwise default 256, Pallas 64).
    interpret: run the Pallas kernels in interpret mode (default: when the backend is the CPU).
    num_iters: ``None`` (default) iterates until every row is on target; an int k runs exactly k
      Halley-type steps (static).
    query_seq_lengths: optional ``[batch]`` ints; query rows at or beyond it output zeros.
    key_value_seq_lengths: optional ``[batch]`` ints; keys at or beyond it are masked.

  Returns:
    ``[batch, q_len, heads, dim]`` in the dtype of ``q``. Rows with no valid key are zeros.
    Statistics are kept in float32 for 16-bit inputs (float64 for float64).

  Raises:
    ValueError: for inconsistent shapes, a mask or target that does not broadcast, or an unknown
      implementation.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from entnorm_jax import attention as ena
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 40, 2, 8))
    >>> o = ena.entropy_attention(q, k, v, target_entropy=0.5, is_causal=True,
    ...                           implementation="blockwise", block_q=16, block_k=16)
    >>> o.shape
    (1, 40, 2, 8)
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check_qkv(q, k, v)
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  dtype = compute_dtype(q.dtype)
  scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
  if num_iters is not None and operator.index(num_iters) < 0:
    raise ValueError(f"num_iters must be >= 0 or None, got {num_iters}")
  target = _targets(target_entropy, batch, heads, q_len, dtype)
  if mask is not None:
    mask = _mask4(mask, (batch, heads, q_len, kv_len))
  q_ok = _valid_positions(query_seq_lengths, batch, q_len, "query_seq_lengths")
  k_ok = _valid_positions(key_value_seq_lengths, batch, kv_len, "key_value_seq_lengths")
  if implementation == "xla":
    return dense_attention(
        q, k, v, target, q_ok, k_ok, mask,
        is_causal=is_causal, scale=scale, relative=relative, num_iters=num_iters,
    )  # fmt: skip
  default_q, default_k = _DEFAULT_BLOCKS[implementation]
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  cfg = Config(
    is_causal=is_causal,
    scale=scale,
    relative=relative,
    num_iters=num_iters,
    block_q=_block_size(block_q, default_q, q_len, implementation, "block_q"),
    block_k=_block_size(block_k, default_k, kv_len, implementation, "block_k"),
    interpret=bool(interpret),
  )
  engine = BLOCKWISE if implementation == "blockwise" else PALLAS
  return attention_vjp(engine, cfg, q, k, v, target, q_ok, k_ok, mask)

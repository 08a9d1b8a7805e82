"""Small pieces shared by the blockwise engine and the Pallas kernels of attention.

Block validity, padding, the integer division Triton lowers, and the guarded reciprocal of the
softmax denominator: the parts of :mod:`entnorm_jax._src.blockwise_attention` and
:mod:`entnorm_jax._src.pallas_attention` that are not the blockwise algorithm itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_valid(q_pos, k_pos, q_ok, k_ok, mask, is_causal: bool) -> jax.Array:
  """Validity of a ``[..., bq, bk]`` score block from row/column flags, a mask and causality.

  Args:
    q_pos: ``[bq]`` query positions; k_pos: ``[bk]`` key positions.
    q_ok: ``[..., bq]`` valid query rows; k_ok: ``[..., bk]`` valid keys.
    mask: ``None`` or a boolean block broadcastable to ``[..., bq, bk]``.
    is_causal: keep only keys at or before the query position (top-left aligned, as in
      ``jax.nn.dot_product_attention``).

  Returns:
    The boolean ``[..., bq, bk]`` block: True where query i may see key j.
  """
  valid = q_ok[..., :, None] & k_ok[..., None, :]
  if is_causal:
    valid = valid & (k_pos[None, :] <= q_pos[:, None])
  if mask is not None:
    valid = valid & mask
  return valid


def pad_axis(x, axis: int, size: int, value=0):
  """Pads ``x`` along ``axis`` to ``size`` (no-op for a broadcast axis of length 1).

  Args:
    x: the array.
    axis: the axis to pad at its end.
    size: the length to pad it to.
    value: the padding value.

  Returns:
    ``x`` padded, or ``x`` itself when the axis already has length ``size`` or 1.
  """
  if x.shape[axis] in (1, size):
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def int_div(a, b):
  """``a // b`` for non-negative integers in ``a``'s dtype (``b`` cast to it: under x64 a Python
  int would be int64). ``lax.div``, not ``//``: the Triton lowering has no floor division on
  program ids.

  Args:
    a: non-negative integers (an array or a program id).
    b: a positive int.

  Returns:
    The quotient, in ``a``'s dtype.
  """
  a = jnp.asarray(a)
  return jax.lax.div(a, jnp.asarray(b, a.dtype))


def inverse_denominator(denom: jax.Array) -> jax.Array:
  """``1 / denom`` where the softmax denominator is positive, 0 for a row with no valid key.

  Args:
    denom: per-row sums ``Σ_j exp(γ d_j)``.

  Returns:
    The reciprocals (no division by zero in either branch, so no NaN in a gradient either).
  """
  positive = denom > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, denom, 1.0), 0.0)

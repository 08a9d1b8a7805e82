"""The input layer: the static checks and dtype rules every entry point shares.

The public functions, the samplers, the t-SNE affinities and the attention layers check their
inputs here before anything is traced, with messages that name the shapes, axis or value:

* dtypes: :func:`compute_dtype` (what solves and statistics run in) and :func:`output_dtype` (what
  comes back: a floating input's own dtype; float32 for integer and boolean inputs);
* values: :func:`concrete` reads a value outside a trace (a traced value cannot be checked: it
  passes, and a meaningless one gives NaN rows instead of an error);
* shapes: :func:`canonicalize_axis`, :func:`broadcasts` and :func:`check_where` (a mask against the
  array it masks), :func:`check_qkv` (queries, keys and values of attention);
* settings: :func:`check_num_iters`.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype) -> np.dtype:
  """The dtype solves and statistics run in for inputs of ``dtype``.

  Args:
    dtype: the input's dtype.

  Returns:
    float64 for float64; float32 for every other dtype (16-bit floats, float32, integers, bool),
    also under ``jax_enable_x64``.
  """
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def output_dtype(dtype) -> np.dtype:
  """The dtype a result comes back in for inputs of ``dtype``.

  Args:
    dtype: the input's dtype.

  Returns:
    ``dtype`` itself for a floating dtype; :func:`compute_dtype` (float32) for integers and bool.
  """
  return np.dtype(dtype) if jnp.issubdtype(dtype, jnp.floating) else compute_dtype(dtype)


def concrete(value) -> np.ndarray | None:
  """The value to check, when it can be checked.

  Args:
    value: a number, an array or a tracer.

  Returns:
    ``value`` as a NumPy float64 array, or ``None`` under a trace (or for a value that is not a
    number): checks of values run outside ``jit`` only.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    return None


def canonicalize_axis(axis: int, ndim: int) -> int:
  """``axis`` as a non-negative int.

  Args:
    axis: an axis of an array of ``ndim`` dimensions, negative counting from the end.
    ndim: the array's number of dimensions.

  Returns:
    ``axis % ndim``.

  Raises:
    TypeError: for an axis that is not an int.
    ValueError: for an axis out of bounds (naming axis and ndim).
  """
  try:
    axis = operator.index(axis)
  except TypeError as e:
    raise TypeError(f"axis must be an int, got {axis!r}") from e
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of bounds for logits of ndim {ndim}")
  return axis % ndim


def broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
  """Whether an array of ``shape`` broadcasts to ``to`` (NumPy's rules) without growing it.

  Args:
    shape: the shape to broadcast.
    to: the shape it must become.

  Returns:
    True when broadcasting ``shape`` against ``to`` gives exactly ``to``.
  """
  try:
    return np.broadcast_shapes(tuple(shape), tuple(to)) == tuple(to)
  except ValueError:
    return False


def check_where(where, shape: tuple[int, ...], of: str = "logits") -> None:
  """Checks that a mask broadcasts to the array it masks.

  Args:
    where: ``None`` or a mask (array-like).
    shape: the shape of the masked array.
    of: the masked array's name, for the message.

  Raises:
    ValueError: for a mask that does not broadcast to ``shape``.
  """
  if where is not None and not broadcasts(np.shape(where), shape):
    raise ValueError(
      f"where of shape {np.shape(where)} does not broadcast to {of} of shape {tuple(shape)}"
    )


def check_num_iters(num_iters) -> None:
  """Checks a solver's ``num_iters``.

  Args:
    num_iters: ``None`` (iterate until every row is on target) or an int ``>= 0``.

  Raises:
    ValueError: for a negative count.
    TypeError: for a value that is not an int.
  """
  if num_iters is not None and operator.index(num_iters) < 0:
    raise ValueError(f"num_iters must be >= 0 or None, got {num_iters}")


def check_qkv(query: jax.Array, key: jax.Array, value: jax.Array | None = None) -> None:
  """Flax's static shape checks of attention inputs (its message phrases), plus grouped heads.

  Args:
    query: ``[batch..., q_length, num_heads, depth]``.
    key: ``[batch..., kv_length, num_kv_heads, depth]``.
    value: ``None`` or ``[batch..., kv_length, num_kv_heads, v_depth]``.

  Raises:
    ValueError: for different ranks or a rank below 3, different batch dims, query and key depths
      that differ, key and value lengths or heads that differ, or query heads that are not a
      multiple of the key heads.
  """
  arrays = (query, key) if value is None else (query, key, value)
  names = "query, key" if value is None else "query, key, value"
  shapes = ", ".join(str(a.shape) for a in arrays)
  if any(a.ndim != query.ndim for a in arrays) or query.ndim < 3:
    raise ValueError(f"{names} must have the same rank >= 3, got shapes {shapes}")
  if any(a.shape[:-3] != query.shape[:-3] for a in arrays):
    raise ValueError(f"{names} batch dims must match, got shapes {shapes}")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query and key depths must match, got shapes {shapes}")
  if value is not None and key.shape[-3] != value.shape[-3]:
    raise ValueError(f"key and value lengths must match, got shapes {shapes}")
  if value is not None and key.shape[-2] != value.shape[-2]:
    raise ValueError(f"key and value heads must match, got shapes {shapes}")
  if query.shape[-2] % key.shape[-2]:
    raise ValueError(
      f"query heads ({query.shape[-2]}) must be a multiple of key/value heads "
      f"({key.shape[-2]}) for grouped-query attention"
    )

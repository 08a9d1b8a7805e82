"""Backend workarounds: each piece of the solve written the way one compiler needs it.

Every other module writes the math plainly and calls these where a backend needs another form.
Each entry says which backend it serves and why; on the other backends it costs nothing or
computes the same thing.

* Pallas' Triton lowering (GPU kernels): :func:`log_phi` (no ``erf``/``erfc``: a Chebyshev fit of
  erfc), :func:`any_of` (no ``reduce_or``: an integer maximum).
* Pallas' Mosaic lowering (TPU kernels): :func:`flag` (no select between boolean vectors: per-row
  flags are int32).
* XLA's CPU backend: :func:`packed_counts` (every reduction is a pass over the data: two counts in
  one sum), :func:`row_max` (a ``where`` is written out as an array of its own before it is
  reduced: none when nothing is masked but ``-inf``), :func:`shift_to_max` (XLA may contract
  ``x - max`` into a fused multiply-add when it recomputes ``x`` in a consumer: the maximum must
  still shift to exactly 0), :data:`TILE_BYTES` (the tiled layout's block size, tuned on one
  machine).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Bytes of logits per block in the tiled layout (XLA:CPU): a block's passes then run from the cache.
# Measured on one machine only, a 2-core x86 VM (2 MiB L2, 32 MiB L3): 1-4 MiB blocks cost the
# same, 8 MiB twice as much.
TILE_BYTES = 2**21

# Chebyshev fit of erfc (Numerical Recipes' ``erfcc``, fractional error < 1.2e-7 everywhere):
# erfc(x) = t exp(-x² + P(t)), t = 1 / (1 + x/2), x >= 0; coefficients of P from t⁰ up.
_ERFC_POLY = (
  -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
  0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)  # fmt: skip


def log_phi(a):
  """log Φ(a) (the standard normal CDF), within 1e-7 of ``log_ndtr`` for a >= -4 (Triton).

  Φ(a) = erfc(x)/2 with x = -a/√2, and erfc(|x|)/2 = (t/2) exp(-x² + P(t)): Φ(a) itself for
  x >= 0, and 1 - Φ(a) for x < 0. One exponential and one logarithm, in plain arithmetic: one
  elementwise expression on every backend, Pallas' Triton lowering included (which has no
  ``erf``/``erfc``), where ``log_ndtr``'s three-branch form is a dozen fusions per call. For
  a >= -4 (x <= 2.83) the exponential cannot underflow, and ``log(1 - h)`` for a > 0 is off by
  at most one rounding of 1 - h (6e-8), where Φ(a) is within 1e-7 of 1.
  """
  x = -a * float(np.sqrt(0.5))
  t = 1.0 / (1.0 + 0.5 * jnp.abs(x))
  poly = functools.reduce(lambda acc, c: acc * t + c, _ERFC_POLY[::-1])
  half_erfc = 0.5 * t * jnp.exp(poly - x * x)  # erfc(|x|) / 2
  return jnp.log(jnp.where(x >= 0, half_erfc, 1.0 - half_erfc))


def any_of(mask: jax.Array) -> jax.Array:
  """``jnp.any(mask)`` as an integer maximum (Pallas' Triton lowering has no ``reduce_or``)."""
  return jnp.max(mask.astype(jnp.int32), initial=0) > 0


def flag(condition: jax.Array) -> jax.Array:
  """A boolean as the int32 0 or 1 that the solver's state holds: Mosaic (Pallas on TPUs) cannot
  select between boolean vectors, as ``jnp.where`` on boolean state and the loop's update would."""
  return condition.astype(jnp.int32)


def packed_counts(dm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Valid entries (``dm != -inf``) and entries at the maximum (``dm == 0``) of each row, as floats.

  Rows of fewer than 4096 entries count both in one float reduction (``valid + (n + 1)·tie``,
  exact while it stays below 2^24): on XLA's CPU backend every reduction is a pass over the data.
  """
  n = dm.shape[-1]
  ones = (dm != -jnp.inf).astype(dm.dtype)
  at_max = (dm == 0).astype(dm.dtype)
  if n < 4096:
    packed = jnp.sum(ones + (n + 1.0) * at_max, axis=-1).astype(jnp.int32)
    return (packed % (n + 1)).astype(dm.dtype), (packed // (n + 1)).astype(dm.dtype)
  return jnp.sum(ones, axis=-1), jnp.sum(at_max, axis=-1)


def row_max(x: jax.Array, where: jax.Array | None, valid: jax.Array) -> jax.Array:
  """The maximum of each row of ``x`` over its ``valid`` entries (``-inf`` for none).

  Without ``where`` the masked entries are the ``-inf`` ones: the plain maximum, one pass fewer
  (XLA's CPU backend writes a ``where`` out as an array of its own before reducing it).
  """
  return jnp.max(x if where is None else jnp.where(valid, x, -jnp.inf), axis=-1)


def shift_to_max(x: jax.Array, top: jax.Array) -> jax.Array:
  """``x - top``, exactly 0 where ``x`` is at the row maximum ``top``.

  Even when XLA recomputes ``x`` (say, scaled attention scores) inside each consumer and contracts
  ``x - top`` into a fused multiply-add: ties at the maximum are counted on the result.
  """
  return jnp.where(x >= top, 0.0, x - top)

"""What each row can reach and what it is solved for.

H(γ) falls strictly from log n (γ = 0) to log m (γ → ∞, m = ties at the maximum): a row's
:class:`Bounds` are that range and a finite γ past which the row is argmax-uniform in its precision.
A target is met within :func:`tolerance`; one within the tolerance of an edge is solved at that
edge (:func:`inside` says which rows the iteration moves). :func:`goal` turns an exact target or
entropy bounds (floor, ceiling) into the entropy each row is solved for, and says which target γ*
then moves with.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entnorm_jax._src.moments import RowStats

# exp(-x) underflows to 0 beyond these (float32 subnormals end near 103.3, float64 near 744.4):
# at γ = _ARGMAX_EXPONENT / gap the distribution is the argmax-uniform one in that precision.
_ARGMAX_EXPONENT = {np.dtype("float32"): 110.0, np.dtype("float64"): 750.0}

# A row is on target when |H - H_t| <= _TOLERANCE * max(1, log n).
_TOLERANCE = {np.dtype("float32"): 2e-6, np.dtype("float64"): 1e-12}


class Bounds(NamedTuple):
  """Reachable entropies and the γ bracket of each row."""

  log_n: jax.Array  # entropy at γ = 0
  log_m: jax.Array  # entropy as γ → ∞
  gamma_hi: jax.Array  # γ* <= gamma_hi (argmax-uniform in the working precision)


def entropy_bounds(stats: RowStats, dtype) -> Bounds:
  """The reachable entropy range [log m, log n] of each row and a finite upper bound on γ."""
  log_n = jnp.log(jnp.maximum(stats.n_valid, 1.0))
  log_m = jnp.log(jnp.maximum(stats.n_ties, 1.0))
  cap = _ARGMAX_EXPONENT[np.dtype(dtype)]
  gamma_hi = jnp.where(jnp.isfinite(stats.gap) & (stats.gap > 0), cap / stats.gap, 1.0)
  # Finite even for a gap below cap / max float, so that the bracket can be bisected.
  gamma_hi = jnp.minimum(gamma_hi, jnp.finfo(dtype).max)
  return Bounds(log_n, log_m, gamma_hi)


def tolerance(bounds: Bounds, dtype) -> jax.Array:
  """|H - H_t| (nats) below which a row counts as solved."""
  return _TOLERANCE[np.dtype(dtype)] * jnp.maximum(bounds.log_n, 1.0)


def inside(bounds: Bounds, target: jax.Array) -> jax.Array:
  """Rows whose target lies more than the tolerance inside (log m, log n): the rows the solve moves.

  A target within the tolerance of an edge is solved at that edge (γ = 0, or γ at the argmax end),
  whose entropy is then within the tolerance of the target; closer to log m than float's range the
  iteration itself would have nothing to measure (H - log m underflows).
  """
  tol = tolerance(bounds, target.dtype)
  return (target > bounds.log_m + tol) & (target < bounds.log_n - tol)


def in_bracket(gamma: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Where a proposed γ is finite and inside the bracket [lo, hi] that monotonicity gives."""
  return (gamma >= lo) & (gamma <= hi) & jnp.isfinite(gamma)


def bracketed(gamma: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """A proposed γ where it is :func:`in_bracket`, else the bracket bisected geometrically (halved
  while ``lo`` is 0): the safeguard of every step on γ."""
  bisect = jnp.where(lo > 0, jnp.sqrt(lo) * jnp.sqrt(hi), 0.5 * hi)
  return jnp.where(in_bracket(gamma, lo, hi), gamma, bisect)


class Goal(NamedTuple):
  """What each row is solved for, from its target or bounds (see :func:`goal`).

  Attributes:
    nats: the entropy to reach (unclamped): the target, or the bound the row crosses (the
      ceiling where a floor lies above it); NaN where the target has no meaning (NaN, a negative
      number of nats, a fraction outside [0, 1]).
    held: rows inside their bounds: γ = 1 is their answer (plain softmax), nothing is solved
      (``None`` for an exact target).
    which: int32, which target γ* moves with: 1 the exact target or the floor, 2 the ceiling, 0
      none (a held row, a target clamped to an edge, a NaN row).
    scale: ∂nats/∂(the target γ* moves with): ``log n`` for a fraction, 1 for nats, 0 where
      ``which`` is 0.
  """

  nats: jax.Array
  held: jax.Array
  which: jax.Array
  scale: jax.Array


def goal(target, relative, bounds: Bounds, natural: jax.Array | None = None) -> Goal:
  """The per-row :class:`Goal` of an exact target or of entropy bounds.

  Args:
    target: ``[...]`` exact targets, or ``[..., 2]`` (floor, ceiling) bounds (``natural`` given).
    relative: whether each value is a fraction of log(n_valid) (else nats): a boolean scalar, or
      ``[2]`` (or ``[..., 2]``) for bounds.
    bounds: the rows' :func:`entropy_bounds`.
    natural: with bounds, each row's entropy at γ = 1 (its plain softmax).
  """
  bounded = natural is not None
  log_n = bounds.log_n[..., None] if bounded else bounds.log_n
  unit = jnp.where(relative, log_n, 1.0)  # d(target in nats) / d(target)
  nats = target * unit
  bad = jnp.isnan(target) | (target < 0) | (relative & (target > 1))
  if bounded:
    floor, ceiling = nats[..., 0], nats[..., 1]
    bad = jnp.any(bad, axis=-1)
    below, above = natural < floor, natural > ceiling
    held = jnp.isfinite(natural) & ~below & ~above
    nats = jnp.where(above, ceiling, floor)
    unit = jnp.where(above, unit[..., 1], unit[..., 0])
    which = jnp.where(above, 2, 1)
    moves = inside(bounds, nats) & ~bad & ~held
    held = held & ~bad
  else:  # no constant boolean vectors: the Pallas kernel runs this (see pallas_core)
    which = jnp.ones(nats.shape, jnp.int32)
    moves = inside(bounds, nats) & ~bad
    held = None
  which = jnp.where(moves, which, 0).astype(jnp.int32)
  return Goal(jnp.where(bad, jnp.nan, nats), held, which, jnp.where(moves, unit, 0.0))

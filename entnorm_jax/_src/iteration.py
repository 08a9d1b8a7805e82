"""The iteration: solving H(softmax(γ·z)) = H_target for γ from the first guess.

The entropy H(γ) falls strictly from log n (γ = 0) to log m (γ → ∞, m = ties at the maximum).
Every step works in a coordinate in which H is nearly linear, chosen by the side of the target
the row is on when its derivatives are measured:

* H(γ) > H_t (γ too small): ``u = log(log n - H)`` as a function of ``τ = log γ``, close to linear
  near the uniform end (``log n - H ≈ γ² V_0 / 2``);
* H(γ) < H_t (γ too large): ``w = log(H - log m)`` as a function of ``τ = γ``, close to linear near
  the argmax end (``H - log m ≈ c γ e^{-γ δ}``).

An evaluation is a pass over the row (:func:`entnorm_jax._src.moments.evaluate`). A *full*
evaluation gives F, F' and F'' (F the coordinate minus its value at the target) at its point,
the *anchor*; the step from it is the third-order inverse-Taylor (Chebyshev) step. A *light*
evaluation gives only F at a new point; the step from it inverts the cubic through the anchor's
value and two derivatives and the new value (inverse Hermite interpolation). Light evaluations cost
half as much, and one is enough to confirm a row that the previous step brought within a few
hundredths of a nat of its target. Where every evaluation is a full one (the lanes layout of short
rows, ``every_full``), each is the anchor of its own step. A bracket on γ is kept from
monotonicity; a step that leaves it is replaced by geometric bisection.

Per-row work (the step algebra) is written as a loop whose body is compiled once: the first
evaluation (at the first guess, :mod:`entnorm_jax._src.first_guess`) is the loop's first pass. At
rows of a few dozen entries it costs as much as the passes over the rows, and every fusion of it
adds to the compile time of every solve site.

The loop stops when every row of the block is within ``tol`` nats of its target (``tol`` = 2e-6
nats in float32, 1e-12 in float64, times max(1, log n)), or after a fixed number of full
iterations when the caller asks for one. Its last evaluation is at the returned γ, so the caller
can reuse its weights as the output; except where the caller asks for a ``polish`` (the attention,
which computes its output from γ in a sweep of its own): there a row on target gets one more Newton
step from its last evaluation, free of any pass (:func:`_polish`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entnorm_jax._src.backends import any_of, flag
from entnorm_jax._src.bounds import Bounds, bracketed, in_bracket, tolerance
from entnorm_jax._src.first_guess import MAX_LOG_GROWTH, Start
from entnorm_jax._src.moments import Moments

# The most evaluations a block may take before it stops anyway (near-ties on long rows need ~10).
MAX_EVALUATIONS = {np.dtype("float32"): 32, np.dtype("float64"): 48}

# The next evaluation is light when every row still moving is this close to its target (nats):
# from there one third-order step lands within the tolerance on the test battery.
LIGHT_WITHIN = 0.03


class _State(NamedTuple):
  """Per-row solver state between evaluations (each of the batch shape)."""

  gamma: jax.Array  # where the last evaluation was made
  lo: jax.Array  # bracket: H(lo) > H_t (or lo = 0)
  hi: jax.Array  # bracket: H(hi) < H_t (or the argmax bound)
  center: jax.Array  # mean under q at gamma: the centre of the next evaluation's moments
  done: jax.Array  # flag: on target (or an edge row)
  error: jax.Array  # |H - H_t| at gamma
  wants_full: jax.Array  # flag: the next evaluation must give derivatives (a new anchor)
  high: jax.Array  # flag: the anchor's coordinate is u(log γ) if set, w(γ) if not
  tau_a: jax.Array  # anchor: coordinate, value and two derivatives there
  f_a: jax.Array
  f1_a: jax.Array
  f2_a: jax.Array
  f: jax.Array  # the value at gamma, in the anchor's coordinate
  evaluations: jax.Array | None  # int32: the passes over this row (None: not counted)


def _distance(high, mom: Moments, bounds: Bounds):
  """The side's distance of the entropy from its end: ``log n - H`` where ``high``, else
  ``H - log m`` (the coordinates take its logarithm, the derivatives divide by it)."""
  return jnp.where(high, bounds.log_n - mom.entropy, mom.excess)


def _coordinates(high, gamma, mom: Moments, target, bounds: Bounds):
  """``(τ, F)`` of the current point in the chosen coordinate (see the module docstring): one
  logarithm of the side's distance, and the target's in either coordinate, which do not change
  over the loop (XLA hoists them out of it)."""
  f = jnp.log(_distance(high, mom, bounds))
  goal = jnp.where(high, jnp.log(bounds.log_n - target), jnp.log(target - bounds.log_m))
  return jnp.where(high, jnp.log(gamma), gamma), f - goal


def _derivatives(high, gamma, mom: Moments, bounds: Bounds):
  """dF/dτ and d²F/dτ² from a full evaluation (H' = -γ V, H'' = -V - γ κ)."""
  h1 = -gamma * mom.var
  h2 = -mom.var - gamma * mom.third
  du = gamma * gamma * mom.var  # d(log n - H)/dτ, τ = log γ
  # u' = du / (log n - H), u'' = (du - γ² H'') / (log n - H) - u'²; w' = H' / (H - log m),
  # w'' = H'' / (H - log m) - w'²: one reciprocal for the side the row is on (per-row division is
  # most of a short row's step algebra).
  inverse = 1.0 / _distance(high, mom, bounds)
  f1 = jnp.where(high, du, h1) * inverse
  f2 = jnp.where(high, du - gamma * gamma * h2, h2) * inverse - f1 * f1
  return f1, f2


def _observe(
  state: _State, mom: Moments, full, target, bounds: Bounds, tol, fixed, counted, every_full=False
) -> _State:
  """Folds an evaluation at ``state.gamma`` into the state: bracket, convergence, anchor.

  ``counted`` (int32) is 0 for rows that are done (not evaluated again): their evaluation count
  stays, and the caller keeps the rest of what is read of them. With ``every_full`` (static: every
  evaluation is a full one) each evaluation is the next anchor, and no light one is asked for."""
  g = state.gamma
  too_high = mom.entropy > target  # γ too small
  error = jnp.abs(mom.entropy - target)
  done = flag(fixed | (error <= tol) | jnp.isnan(mom.entropy))
  lo = jnp.where(too_high, jnp.maximum(state.lo, g), state.lo)
  hi = jnp.where(too_high, state.hi, jnp.minimum(state.hi, g))
  # A full evaluation becomes the anchor (in the coordinate of the side the row is on now) of the
  # rows that asked for it, or have none yet. A row that did not ask keeps its anchor whatever
  # its block's evaluation was, so that its steps depend on its own values alone: a row's γ does
  # not depend on the rows it is solved with.
  renew = True if every_full else full & ((state.wants_full != 0) | jnp.isnan(state.f_a))
  # Derivatives are wanted far from the target, and where the last step did not halve the error
  # (a stale anchor).
  wants_full = state.wants_full
  if not every_full:
    wants_full = flag((error > LIGHT_WITHIN) | ~(error <= 0.5 * state.error))
  high = jnp.where(renew, flag(too_high), state.high)
  tau, f = _coordinates(high != 0, g, mom, target, bounds)
  f1, f2 = _derivatives(high != 0, g, mom, bounds)
  anchor = lambda new, old: jnp.where(renew, new, old)
  return _State(
    gamma=g,
    lo=lo,
    hi=hi,
    center=mom.mean,
    done=done,
    error=error,
    wants_full=wants_full,
    high=high,
    tau_a=anchor(tau, state.tau_a),
    f_a=anchor(f, state.f_a),
    f1_a=anchor(f1, state.f1_a),
    f2_a=anchor(f2, state.f2_a),
    f=f,
    evaluations=None if state.evaluations is None else state.evaluations + counted,
  )


def _step(state: _State, every_full: bool = False) -> jax.Array:
  """The next γ of every row that is not done (done rows keep theirs); with ``every_full`` (the
  last evaluation was the anchor) the step from the anchor alone."""
  b1 = 1.0 / state.f1_a
  b2 = -state.f2_a * b1 * b1 * b1 / 2.0
  dz = -state.f_a  # from the anchor's value to 0
  newton = b1 * dz
  # At the anchor: the inverse-Taylor step, between 1/2 and 2 Newton steps (the direction of a
  # monotone F's Newton step is right even where its curvature is large).
  factor = 1.0 + jnp.clip(b2 * dz / b1, -0.5, 1.0)
  tau = state.tau_a + newton * factor
  g = state.gamma
  # With every_full the anchor is the last evaluation: its coordinate is log γ where it is high.
  log_g = state.tau_a if every_full else jnp.log(g)
  if not every_full:
    # After a light evaluation: the inverse cubic through the anchor (value, 2 derivatives) and
    # the new point.
    here = jnp.where(state.high != 0, log_g, g)  # the coordinate at gamma
    dl = state.f - state.f_a
    safe_dl = jnp.where(dl != 0, dl, 1.0)
    b3 = (here - state.tau_a - b1 * dl - b2 * dl * dl) / (safe_dl * safe_dl * safe_dl)
    hermite = state.tau_a + newton + b2 * dz * dz + b3 * dz * dz * dz
    tau = jnp.where((here == state.tau_a) | (dl == 0), tau, hermite)
  # At most a factor 16 per step upwards: from a plateau (near-ties) the local slope predicts
  # far too much, and one-hot overshoots cancel V away, which would stall the next steps.
  proposal = jnp.where(state.high != 0, jnp.exp(jnp.minimum(tau, log_g + MAX_LOG_GROWTH)), tau)
  return jnp.where(state.done != 0, g, bracketed(proposal, state.lo, state.hi))


def _polish(state: _State) -> jax.Array:
  """γ after one more Newton step from the last evaluation (which ``every_full`` makes each row's
  anchor), where that step stays inside the bracket: free of any pass, and it leaves a converged
  row's entropy error at the square of what it was (to rounding) instead of anywhere within the
  tolerance. Rows that are not on target keep γ (see :func:`solve`)."""
  tau = state.tau_a - state.f_a / state.f1_a
  gamma = jnp.where(state.high != 0, jnp.exp(tau), tau)
  return jnp.where(in_bracket(gamma, state.lo, state.hi), gamma, state.gamma)


class SolveInfo(NamedTuple):
  """How each row's solve ended (each of the batch shape).

  Attributes:
    converged: where the row's entropy is within the tolerance of its (clamped) target, or the
      row was solved at an edge or held inside its bounds; not where the solve stopped first (the
      evaluation cap, a fixed ``num_iters``, a step that rounds to nothing) or the row holds a
      NaN. An int32 flag inside the solver (see :func:`entnorm_jax._src.backends.flag`); bool
      from ``solve_gamma``.
    evaluations: int32, the passes over the row (full or light), the first one included; 1 for
      rows solved at an edge or held.
  """

  converged: jax.Array
  evaluations: jax.Array


# Evaluation modes, per row: what the solver needs from the next pass over the row.
SKIP, LIGHT, FULL = 0, 1, 2

Evaluate = Callable[[jax.Array, jax.Array, jax.Array, object], tuple[Moments, jax.Array, object]]


def solve(
  bounds: Bounds,
  target: jax.Array,
  first: Start,
  evaluate: Evaluate,
  aux,
  *,
  num_iters,
  info=False,
  every_full=False,
  polish=False,
):
  """Solves every row; the loop runs until all are on target.

  Args:
    bounds: :func:`entnorm_jax._src.bounds.entropy_bounds` of the rows.
    target: target entropies in nats, clamped to [log m, log n] (see
      :func:`entnorm_jax._src.first_guess.start`).
    first: the rows' :class:`Start`.
    evaluate: ``(gamma, center, mode, aux) -> (moments, full, aux)``: a pass over the rows at γ,
      ``center`` the mean at each row's previous evaluation and ``mode`` per row :data:`SKIP`
      (done), :data:`LIGHT` (the entropy suffices) or :data:`FULL` (derivatives wanted). It may
      evaluate more than asked (a block of rows is evaluated in the most demanding mode of its
      rows); ``full`` says, per row, whether the moments include the variance and third moment.
      ``aux`` is the caller's carry (the output, written as blocks are evaluated). Moments of
      rows in :data:`SKIP` may be anything.
    aux: the initial carry.
    num_iters: ``None`` for the adaptive loop (light evaluations when they suffice, until every
      row is on target or after :data:`MAX_EVALUATIONS`); an int k for exactly k Halley-type
      steps (k + 1 full evaluations), converged rows keeping their γ.
    info: also count each row's evaluations and report the :class:`SolveInfo` (static; off, the
      loop carries no counter: at short rows every per-row value costs time).
    every_full: ``evaluate`` always gives the derivatives (static; the lanes layout, whose every
      pass yields all four sums, and the attention's sweeps): each evaluation anchors a
      third-order step of its own, and the per-row work of light evaluations (the inverse cubic,
      the choice of mode) is left out.
    polish: with ``every_full``, return the rows on target one Newton step past their last
      evaluation (:func:`_polish`; static). For callers that compute the output from γ afresh;
      the dense layouts do not (their outputs agree across layouts to rounding).

  Returns:
    ``(gamma, center, info, aux)``: γ of the last evaluation of each row (or past it, with
    ``polish``), with the edges applied
    (0 at or above log n, the argmax bound at or below log m, 0 for empty rows, NaN for rows
    holding a valid NaN), the mean of d there, the :class:`SolveInfo` (``None`` without
    ``info``), and the final carry.
  """
  dtype = target.dtype
  tol = tolerance(bounds, dtype)
  nan = jnp.full_like(target, jnp.nan)
  zero = jnp.zeros(target.shape, jnp.int32)
  state = _State(
    gamma=first.gamma,
    lo=jnp.zeros_like(target),
    hi=bounds.gamma_hi,
    center=first.center,
    done=zero,
    error=nan,
    wants_full=jnp.ones(target.shape, jnp.int32),
    high=zero,
    tau_a=nan,
    f_a=nan,
    f1_a=nan,
    f2_a=nan,
    f=nan,
    evaluations=zero if info else None,
  )
  adaptive = num_iters is None
  limit = MAX_EVALUATIONS[np.dtype(dtype)] if adaptive else num_iters + 1

  def visit(state, mode, stuck, aux):
    mom, full, aux = evaluate(state.gamma, state.center, mode, aux)
    keep = mode == SKIP
    seen = _observe(state, mom, full, target, bounds, tol, stuck, flag(~keep), every_full)
    # A done row's γ stays (see _step), but its moments may be anything (its block's pass may
    # skip it): what is read of it after the loop (done, error, centre) is kept; the rest of its
    # state is never read again.
    kept = lambda old, new: jnp.where(keep, old, new)
    seen = seen._replace(
      done=kept(state.done, seen.done),
      error=kept(state.error, seen.error),
      center=kept(state.center, seen.center),
    )
    return seen, aux

  def cond(carry):
    count, state, _ = carry
    going = count < limit
    return going & ((count == 0) | any_of(state.done == 0)) if adaptive else going

  def body(carry):
    # The first pass (count 0) evaluates every row at its first guess, in full; one loop body
    # compiled once instead of a first visit of its own.
    count, state, aux = carry
    first_pass = count == 0
    gamma = jnp.where(first_pass, state.gamma, _step(state, every_full))
    # A step that rounds to nothing leaves the row where this precision lets it be.
    stuck = (gamma == state.gamma) & ~first_pass
    wants_full = state.wants_full != 0 if adaptive and not every_full else True
    mode = jnp.where(state.done != 0, SKIP, jnp.where(wants_full, FULL, LIGHT)).astype(jnp.int32)
    state, aux = visit(state._replace(gamma=gamma), mode, first.fixed | stuck, aux)
    return count + 1, state, aux

  _, state, aux = jax.lax.while_loop(cond, body, (0, state, aux))
  if polish and every_full:
    on_target = (state.error <= tol) & ~first.fixed
    state = state._replace(gamma=jnp.where(on_target, _polish(state), state.gamma))
  # Converged: on target within the tolerance, or solved at an edge (or held) by construction.
  # Not: rows that met the evaluation cap or the iteration count, stalled, or hold a NaN.
  if not info:
    return state.gamma, state.center, None, aux
  converged = (state.error <= tol) | (first.fixed & ~jnp.isnan(state.gamma))
  return state.gamma, state.center, SolveInfo(flag(converged), state.evaluations), aux

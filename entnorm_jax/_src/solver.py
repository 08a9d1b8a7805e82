"""Solving H(softmax(γ·z)) = H_target for γ.

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
hundredths of a nat of its target. A bracket on γ is kept from monotonicity; a step that leaves
it is replaced by geometric bisection.

Per-row work (the step algebra, the first guess) is written as loops whose bodies are compiled
once: the first evaluation is the loop's first pass, the model's steps a ``fori_loop``. At rows of
a few dozen entries it costs as much as the passes over the rows, and every fusion of it adds to
the compile time of every solve site.

The loop stops when every row of the block is within ``tol`` nats of its target (``tol`` = 2e-6
nats in float32, 1e-12 in float64, times max(1, log n)), or after a fixed number of full
iterations when the caller asks for one. Its last evaluation is at the returned γ, so the caller
can reuse its weights as the output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entnorm_jax._src.moments import Moments, RowStats

# exp(-x) underflows to 0 beyond these (float32 subnormals end near 103.3, float64 near 744.4):
# at γ = _ARGMAX_EXPONENT / gap the distribution is the argmax-uniform one in that precision.
_ARGMAX_EXPONENT = {np.dtype("float32"): 110.0, np.dtype("float64"): 750.0}

# A row is on target when |H - H_t| <= _TOLERANCE * max(1, log n).
_TOLERANCE = {np.dtype("float32"): 2e-6, np.dtype("float64"): 1e-12}

# The most evaluations a block may take before it stops anyway (near-ties on long rows need ~10).
MAX_EVALUATIONS = {np.dtype("float32"): 32, np.dtype("float64"): 48}

# The next evaluation is light when every row still moving is this close to its target (nats):
# from there one third-order step lands within the tolerance on the test battery.
LIGHT_WITHIN = 0.03

_MAX_LOG_GROWTH = float(np.log(16.0))
_HALF_LOG_2PI = float(0.5 * np.log(2 * np.pi))


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


# Chebyshev fit of erfc (Numerical Recipes' ``erfcc``, fractional error < 1.2e-7 everywhere):
# erfc(w) = t exp(-w² + P(t)), t = 1 / (1 + w/2), w >= 0; coefficients of P from t⁰ up.
_ERFC_POLY = (
  -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
  0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)  # fmt: skip


def inside(bounds: Bounds, target: jax.Array) -> jax.Array:
  """Rows whose target lies more than the tolerance inside (log m, log n): the rows the solve moves.

  A target within the tolerance of an edge is solved at that edge (γ = 0, or γ at the argmax end),
  whose entropy is then within the tolerance of the target; closer to log m than float's range the
  iteration itself would have nothing to measure (H - log m underflows).
  """
  tol = tolerance(bounds, target.dtype)
  return (target > bounds.log_m + tol) & (target < bounds.log_n - tol)


def _log_phi(a):
  """log Φ(a) (the standard normal CDF), within 1e-7 of ``log_ndtr`` for a >= -_MODEL_DEPTH.

  Φ(a) = erfc(w)/2 with w = -a/√2; for w >= 0 its logarithm is ``log(t/2) - w² + P(t)`` (no
  exponential), and for w < 0 it is ``log1p(-erfc(|w|)/2)``. Plain arithmetic: one elementwise
  expression on every backend, Pallas' Triton lowering included (which has no ``erf``/``erfc``),
  where ``log_ndtr``'s three-branch form is a dozen fusions per call.
  """
  w = -a * float(np.sqrt(0.5))
  t = 1.0 / (1.0 + 0.5 * jnp.abs(w))
  poly = functools.reduce(lambda acc, c: acc * t + c, _ERFC_POLY[::-1])
  log_half_erfc = jnp.log(0.5 * t) - w * w + poly  # log(erfc(|w|) / 2)
  return jnp.where(w >= 0, log_half_erfc, jnp.log1p(-jnp.exp(log_half_erfc)))


def any_of(mask: jax.Array) -> jax.Array:
  """``jnp.any(mask)`` as an integer maximum (Pallas' Triton lowering has no ``reduce_or``)."""
  return jnp.max(mask.astype(jnp.int32), initial=0) > 0


class _Model(NamedTuple):
  """A two-part model of a row: its m maxima at 0, and n - m Gaussian values below the gap.

  The values below the maximum are taken as draws from N(μ, s²) (their mean and variance)
  conditioned on d <= -gap, the observed second value. At γ, with β = (-gap - μ)/s,
  a = β - γ s and λ = φ(a)/Φ(a) (the inverse Mills ratio), the tilted bulk has

      log E[e^{γ d}] = γ μ + (γ s)²/2 + log Φ(a) - log Φ(β),
      mean M = μ + γ s² - s λ,      variance W = s² (1 - a λ - λ²),

  and the mixture (weight w of the bulk, 1 - w at 0) has H - log m = log1p(S_b/m) - γ w M and
  V = w W + w (1 - w) M². It is exact for the infinite Gaussian and for m ties plus one value,
  and sees what both end-point models miss: a finite row runs out of large values.
  """

  log_m: jax.Array
  m: jax.Array
  rest: jax.Array  # n - m
  mu: jax.Array
  s: jax.Array
  beta: jax.Array
  log_phi_beta: jax.Array

  @classmethod
  def of(cls, stats: RowStats, bounds: Bounds):
    n, m = stats.n_valid, jnp.maximum(stats.n_ties, 1.0)
    rest = jnp.maximum(n - m, 1.0)
    mu = stats.mean * n / rest  # the maxima are 0
    # Σ_rest (d - μ)² = n V_0 + n (mean - μ)² - m μ² (the maxima's share removed).
    ss = n * stats.var + n * jnp.square(stats.mean - mu) - m * mu * mu
    s = jnp.sqrt(jnp.maximum(ss / rest, 0.0))
    s = jnp.where(s > 0, s, 1.0)
    gap = jnp.where(jnp.isfinite(stats.gap), stats.gap, 0.0)
    beta = (-gap - mu) / s
    return cls(bounds.log_m, m, rest, mu, s, beta, _log_phi(beta))

  def at(self, gamma):
    """``(H - log m, V, mean)`` of the model at γ."""
    a = self.beta - gamma * self.s
    log_phi_a = _log_phi(a)
    mills = jnp.exp(-0.5 * a * a - _HALF_LOG_2PI - log_phi_a)
    log_e = gamma * self.mu + 0.5 * jnp.square(gamma * self.s) + log_phi_a - self.log_phi_beta
    mean_b = self.mu + gamma * self.s * self.s - self.s * mills
    var_b = self.s * self.s * jnp.maximum(1.0 - a * mills - mills * mills, 1e-6)
    ratio = self.rest / self.m * jnp.exp(log_e)
    w = ratio / (1.0 + ratio)
    excess = jnp.log1p(ratio) - gamma * w * mean_b
    var = w * var_b + w * (1.0 - w) * mean_b * mean_b
    return excess, var, w * mean_b


def _binary_model_gamma(n_ties, gap, target, log_m):
  """γ at which m ties at 0 plus one entry at -gap have entropy ``target``.

  With x = γ·gap, r = e^{-x}, p = r / (m + r): H(x) - log m = log1p(r/m) + x p, falling from
  log(1 + 1/m) to 0. Newton on log(H - log m) in a loop (per-row work, independent of n), from the
  large-x solution of r (1 + x) = m (H_t - log m). Rows whose target is above log(m + 1) get 0.
  """
  m = jnp.maximum(n_ties, 1.0)
  excess = target - log_m
  reachable = (excess > 0) & (excess < jnp.log1p(1.0 / m))
  log_goal = jnp.log(jnp.where(reachable, excess, 1.0))
  x = jnp.maximum(-jnp.log(m) - log_goal, 1e-3)
  x = jnp.maximum(jnp.log1p(x) - jnp.log(m) - log_goal, 1e-3)

  def newton(_, x):
    r = jnp.exp(-x)
    p = r / (m + r)
    e = jnp.log1p(r / m) + x * p
    slope = -x * p * (1.0 - p) / e  # d log(e) / dx
    return jnp.clip(x - (jnp.log(e) - log_goal) / slope, 1e-3, 120.0)

  x = jax.lax.fori_loop(0, 4, newton, x)
  return jnp.where(reachable & jnp.isfinite(gap) & (gap > 0), x / gap, 0.0)


# The model is used while its tilted bulk is cut at most this many deviations above its mean
# (a >= -_MODEL_DEPTH); beyond, float32 loses its variance to cancellation and the row is in the
# argmax regime anyway.
_MODEL_DEPTH = 4.0


def _model_gamma(model: _Model, bounds: Bounds, target, gamma, steps: int = 1):
  """Solves the :class:`_Model` for ``target`` by safeguarded Newton steps (per-row work,
  independent of n), from ``gamma``: on ``log(log n - H)`` against ``log γ`` while the model's
  entropy is above the target, on ``log(H - log m)`` against ``γ`` below it.

  One step by default: three gave the same number of evaluations per block of rows (16 to 1024
  entries, ``benchmarks.core``), and at a few dozen entries a step of the model costs about as
  much as a pass over the row.

  Returns:
    ``(gamma, mean, reached)``: the model's γ, its mean of d before the last step (a centre for
    the first moments), and whether the target lies within the model's range (else γ is its
    upper end).
  """
  cap = jnp.minimum(bounds.gamma_hi, (model.beta + _MODEL_DEPTH) / model.s)
  goal_u = jnp.log(bounds.log_n - target)
  goal_w = jnp.log(target - bounds.log_m)

  def newton(i, carry):
    # Pass 0 measures the model at its upper end (is the target within its range?); the others
    # take a step from γ. One call of the model in the loop body: it is compiled once.
    gamma, lo, hi, reached, mean = carry
    at_cap = i == 0
    point = jnp.where(at_cap, cap, gamma)
    excess, var, mean = model.at(point)
    entropy = bounds.log_m + excess
    # An int32 flag, not a boolean: see _flag.
    reached = jnp.where(at_cap, (entropy < target).astype(jnp.int32), reached)
    high = entropy > target
    lo = jnp.where(high & ~at_cap, jnp.maximum(lo, gamma), lo)
    hi = jnp.where(high | at_cap, hi, jnp.minimum(hi, gamma))
    deficit = bounds.log_n - entropy
    step_u = (jnp.log(deficit) - goal_u) / (gamma * gamma * var / deficit)
    up = gamma * jnp.exp(jnp.clip(-step_u, -_MAX_LOG_GROWTH, _MAX_LOG_GROWTH))
    down = gamma + (jnp.log(excess) - goal_w) / (gamma * var / excess)
    new = jnp.where(high, up, down)
    inside = (new >= lo) & (new <= hi) & jnp.isfinite(new)
    new = jnp.where(inside, new, jnp.where(lo > 0, jnp.sqrt(lo) * jnp.sqrt(hi), 0.5 * hi))
    return jnp.where(at_cap, gamma, new), lo, hi, reached, mean

  gamma = jnp.clip(gamma, 0.0, cap)
  init = (
    gamma,
    jnp.zeros_like(gamma),
    cap,
    jnp.zeros(gamma.shape, jnp.int32),
    jnp.zeros_like(gamma),
  )
  gamma, _, _, reached, mean = jax.lax.fori_loop(0, steps + 1, newton, init)
  reached = reached != 0
  return jnp.where(reached, gamma, cap), mean, reached


class Start(NamedTuple):
  """The first iterate of each row: γ, the centre for its moments, and whether it is final."""

  gamma: jax.Array
  center: jax.Array
  fixed: jax.Array  # an edge row (clamped target, empty or NaN): γ is the answer, no steps


def initial_gamma(stats: RowStats, bounds: Bounds, target: jax.Array, lazy: bool = False) -> Start:
  """First guess for γ* from exponential-free statistics; edges get their final γ.

  Near the uniform end log n - H(γ) ≈ γ² V_0 / 2 (V_0 the plain variance); from there the guess
  solves the row's :class:`_Model`. The first moments are centred on the model's mean (a centre
  far from q's mean cancels the variance away in float32). ``target`` must already be clamped to
  [log m, log n]; ``lazy`` as in :func:`start`.
  """
  deficit = jnp.maximum(bounds.log_n - target, 0.0)
  gamma = jnp.sqrt(2.0 * deficit / jnp.where(stats.var > 0, stats.var, 1.0))
  gamma = jnp.minimum(gamma, bounds.gamma_hi)
  model_gamma, center, reached = _model_gamma(_Model.of(stats, bounds), bounds, target, gamma)
  ok = jnp.isfinite(model_gamma) & (model_gamma > 0) & jnp.isfinite(center)
  gamma = jnp.where(ok, model_gamma, gamma)
  # Beyond the model's range: the argmax regime, where m ties and the next value decide.
  argmax = ~(ok & reached)
  binary = lambda: _binary_model_gamma(stats.n_ties, stats.gap, target, bounds.log_m)
  if lazy:  # few blocks hold a row in the argmax regime: the others skip its model
    gamma_argmax = jax.lax.cond(any_of(argmax), binary, lambda: jnp.zeros_like(gamma))
  else:
    gamma_argmax = binary()
  gamma = jnp.where(argmax, jnp.minimum(jnp.maximum(gamma, gamma_argmax), bounds.gamma_hi), gamma)
  # q's mean rises with γ from the plain mean (γ = 0) to the maximum, 0 (γ → ∞).
  center = jnp.where(argmax, 0.0, jnp.where(ok, center, stats.mean))
  center = jnp.clip(center, stats.mean, 0.0)
  tol = tolerance(bounds, target.dtype)  # see inside()
  at_argmax = target <= bounds.log_m + tol
  at_uniform = target >= bounds.log_n - tol  # also empty and all-tied rows (log m = log n)
  gamma = jnp.where(at_argmax, bounds.gamma_hi, gamma)
  gamma = jnp.where(at_uniform, 0.0, gamma)
  # A valid NaN makes the row maximum NaN, and a NaN target has no solution: propagate either to
  # γ (and so to the row's output), never to a uniform row.
  nan = jnp.isnan(stats.mean) | jnp.isnan(target)
  gamma = jnp.where(nan, jnp.nan, gamma)
  fixed = at_argmax | at_uniform | nan
  return Start(gamma, center, fixed)


class _Rows(NamedTuple):
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


def _flag(condition: jax.Array) -> jax.Array:
  """A boolean as the int32 0 or 1 that the state holds: Mosaic (Pallas on TPUs) cannot select
  between boolean vectors, as ``jnp.where`` on boolean state and the loop's update would."""
  return condition.astype(jnp.int32)


def _coordinates(high, gamma, mom: Moments, target, bounds: Bounds):
  """``(τ, F)`` of the current point in the chosen coordinate (see the module docstring): one
  logarithm of the side's distance and one of the target's (XLA hoists the latter out of the
  loop; the Pallas kernels recompute it rather than hold it in registers)."""
  f = jnp.log(jnp.where(high, bounds.log_n - mom.entropy, mom.excess))
  goal = jnp.log(jnp.where(high, bounds.log_n - target, target - bounds.log_m))
  return jnp.where(high, jnp.log(gamma), gamma), f - goal


def _derivatives(high, gamma, mom: Moments, bounds: Bounds):
  """dF/dτ and d²F/dτ² from a full evaluation (H' = -γ V, H'' = -V - γ κ)."""
  h1 = -gamma * mom.var
  h2 = -mom.var - gamma * mom.third
  deficit = bounds.log_n - mom.entropy
  du = gamma * gamma * mom.var  # d(log n - H)/dτ, τ = log γ
  u1 = du / deficit
  u2 = (du - gamma * gamma * h2) / deficit - u1 * u1
  w1 = h1 / mom.excess
  w2 = h2 / mom.excess - w1 * w1
  return jnp.where(high, u1, w1), jnp.where(high, u2, w2)


def _observe(rows: _Rows, mom: Moments, full, target, bounds: Bounds, tol, fixed, counted) -> _Rows:
  """Folds an evaluation at ``rows.gamma`` into the state: bracket, convergence, anchor.

  ``counted`` (int32) is 0 for rows that are done (not evaluated again): their evaluation count
  stays, and the caller keeps the rest of what is read of them."""
  g = rows.gamma
  too_high = mom.entropy > target  # γ too small
  error = jnp.abs(mom.entropy - target)
  done = _flag(fixed | (error <= tol) | jnp.isnan(mom.entropy))
  lo = jnp.where(too_high, jnp.maximum(rows.lo, g), rows.lo)
  hi = jnp.where(too_high, rows.hi, jnp.minimum(rows.hi, g))
  # A full evaluation becomes the anchor (in the coordinate of the side the row is on now) of the
  # rows that asked for it, or have none yet. A row that did not ask keeps its anchor whatever
  # its block's evaluation was, so that its steps depend on its own values alone: a row's γ does
  # not depend on the rows it is solved with.
  renew = full & ((rows.wants_full != 0) | jnp.isnan(rows.f_a))
  # Derivatives are wanted far from the target, and where the last step did not halve the error
  # (a stale anchor).
  wants_full = _flag((error > LIGHT_WITHIN) | ~(error <= 0.5 * rows.error))
  high = jnp.where(renew, _flag(too_high), rows.high)
  tau, f = _coordinates(high != 0, g, mom, target, bounds)
  f1, f2 = _derivatives(high != 0, g, mom, bounds)
  anchor = lambda new, old: jnp.where(renew, new, old)
  return _Rows(
    gamma=g,
    lo=lo,
    hi=hi,
    center=mom.mean,
    done=done,
    error=error,
    wants_full=wants_full,
    high=high,
    tau_a=anchor(tau, rows.tau_a),
    f_a=anchor(f, rows.f_a),
    f1_a=anchor(f1, rows.f1_a),
    f2_a=anchor(f2, rows.f2_a),
    f=f,
    evaluations=None if rows.evaluations is None else rows.evaluations + counted,
  )


def _step(rows: _Rows) -> jax.Array:
  """The next γ of every row that is not done (done rows keep theirs)."""
  b1 = 1.0 / rows.f1_a
  b2 = -rows.f2_a * b1 * b1 * b1 / 2.0
  dz = -rows.f_a  # from the anchor's value to 0
  newton = b1 * dz
  # At the anchor: the inverse-Taylor step, between 1/2 and 2 Newton steps (the direction of a
  # monotone F's Newton step is right even where its curvature is large).
  factor = 1.0 + jnp.clip(b2 * dz / b1, -0.5, 1.0)
  at_anchor = rows.tau_a + newton * factor
  # After a light evaluation: the inverse cubic through the anchor (value, 2 derivatives) and the
  # new point.
  g = rows.gamma
  log_g = jnp.log(g)
  here = jnp.where(rows.high != 0, log_g, g)  # the coordinate at gamma
  dl = rows.f - rows.f_a
  safe_dl = jnp.where(dl != 0, dl, 1.0)
  b3 = (here - rows.tau_a - b1 * dl - b2 * dl * dl) / (safe_dl * safe_dl * safe_dl)
  hermite = rows.tau_a + newton + b2 * dz * dz + b3 * dz * dz * dz
  tau = jnp.where((here == rows.tau_a) | (dl == 0), at_anchor, hermite)
  # At most a factor 16 per step upwards: from a plateau (near-ties) the local slope predicts
  # far too much, and one-hot overshoots cancel V away, which would stall the next steps.
  proposal = jnp.where(rows.high != 0, jnp.exp(jnp.minimum(tau, log_g + _MAX_LOG_GROWTH)), tau)
  inside = (proposal >= rows.lo) & (proposal <= rows.hi) & jnp.isfinite(proposal)
  bisect = jnp.where(rows.lo > 0, jnp.sqrt(rows.lo) * jnp.sqrt(rows.hi), 0.5 * rows.hi)
  return jnp.where(rows.done != 0, g, jnp.where(inside, proposal, bisect))


class SolveInfo(NamedTuple):
  """How each row's solve ended (each of the batch shape).

  Attributes:
    converged: where the row's entropy is within the tolerance of its (clamped) target, or the
      row was solved at an edge or held inside its bounds; not where the solve stopped first (the
      evaluation cap, a fixed ``num_iters``, a step that rounds to nothing) or the row holds a
      NaN. An int32 flag inside the solver (see :func:`_flag`); bool from ``solve_gamma``.
    evaluations: int32, the passes over the row (full or light), the first one included; 1 for
      rows solved at an edge or held.
  """

  converged: jax.Array
  evaluations: jax.Array


# Evaluation modes, per row: what the solver needs from the next pass over the row.
SKIP, LIGHT, FULL = 0, 1, 2

Evaluate = Callable[[jax.Array, jax.Array, jax.Array, object], tuple[Moments, jax.Array, object]]


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


def start(
  stats: RowStats,
  bounds: Bounds,
  target: jax.Array,
  held: jax.Array | None = None,
  held_gamma=1.0,
  held_center=None,
  *,
  lazy: bool = False,
) -> tuple[jax.Array, Start]:
  """The target clamped to [log m, log n], and the :class:`Start` of each row.

  Rows flagged ``held`` (inside their entropy bounds) start, and stay, at ``held_gamma`` (γ = 1
  in the caller's units), centred on ``held_center`` (their mean there) when given. With
  ``lazy``, the argmax-regime model runs only in blocks that hold such a row (a ``cond``: not in
  the Pallas kernels, whose registers it would cost).
  """
  target = jnp.clip(target, bounds.log_m, bounds.log_n)
  first = initial_gamma(stats, bounds, target, lazy)
  if held is not None:
    center = first.center if held_center is None else jnp.where(held, held_center, first.center)
    first = Start(jnp.where(held, held_gamma, first.gamma), center, first.fixed | held)
  return target, first


def solve(
  bounds: Bounds, target: jax.Array, first: Start, evaluate: Evaluate, aux, *, num_iters, info=False
):
  """Solves every row; the loop runs until all are on target.

  Args:
    bounds: :func:`entropy_bounds` of the rows.
    target: target entropies in nats, clamped to [log m, log n] (see :func:`start`).
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

  Returns:
    ``(gamma, center, info, aux)``: γ of the last evaluation of each row, with the edges applied
    (0 at or above log n, the argmax bound at or below log m, 0 for empty rows, NaN for rows
    holding a valid NaN), the mean of d there, the :class:`SolveInfo` (``None`` without
    ``info``), and the final carry.
  """
  dtype = target.dtype
  tol = tolerance(bounds, dtype)
  nan = jnp.full_like(target, jnp.nan)
  zero = jnp.zeros(target.shape, jnp.int32)
  rows = _Rows(
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

  def visit(rows, mode, stuck, aux):
    mom, full, aux = evaluate(rows.gamma, rows.center, mode, aux)
    keep = mode == SKIP
    seen = _observe(rows, mom, full, target, bounds, tol, stuck, _flag(~keep))
    # A done row's γ stays (see _step), but its moments may be anything (its block's pass may
    # skip it): what is read of it after the loop (done, error, centre) is kept; the rest of its
    # state is never read again.
    kept = lambda old, new: jnp.where(keep, old, new)
    seen = seen._replace(
      done=kept(rows.done, seen.done),
      error=kept(rows.error, seen.error),
      center=kept(rows.center, seen.center),
    )
    return seen, aux

  def cond(carry):
    count, rows, _ = carry
    going = count < limit
    return going & ((count == 0) | any_of(rows.done == 0)) if adaptive else going

  def body(carry):
    # The first pass (count 0) evaluates every row at its first guess, in full; one loop body
    # compiled once instead of a first visit of its own.
    count, rows, aux = carry
    first_pass = count == 0
    gamma = jnp.where(first_pass, rows.gamma, _step(rows))
    # A step that rounds to nothing leaves the row where this precision lets it be.
    stuck = (gamma == rows.gamma) & ~first_pass
    wants_full = rows.wants_full != 0 if adaptive else True
    mode = jnp.where(rows.done != 0, SKIP, jnp.where(wants_full, FULL, LIGHT)).astype(jnp.int32)
    rows, aux = visit(rows._replace(gamma=gamma), mode, first.fixed | stuck, aux)
    return count + 1, rows, aux

  _, rows, aux = jax.lax.while_loop(cond, body, (0, rows, aux))
  # Converged: on target within the tolerance, or solved at an edge (or held) by construction.
  # Not: rows that met the evaluation cap or the iteration count, stalled, or hold a NaN.
  if not info:
    return rows.gamma, rows.center, None, aux
  converged = (rows.error <= tol) | (first.fixed & ~jnp.isnan(rows.gamma))
  return rows.gamma, rows.center, SolveInfo(_flag(converged), rows.evaluations), aux

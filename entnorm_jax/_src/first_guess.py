"""The first guess for γ*, from statistics that need no exponential.

Near the uniform end log n - H(γ) ≈ γ² V_0 / 2 (V_0 the plain variance of the row). From there the
guess solves a two-part model of the row (:class:`_Model`: its maxima, and a Gaussian bulk cut at
the gap below them) for the target; rows beyond the model's range are in the argmax regime, where
the m ties and the next value decide (:func:`_binary_model_gamma`). Rows whose target is at an edge
(or that are empty, or hold a NaN) get their final γ here and are never stepped.

Per-row work only, independent of the row length, in closed form (no loop): one evaluation of the
row model and one Newton step on it, and the argmax-regime model's fixed-point steps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entnorm_jax._src.backends import log_phi
from entnorm_jax._src.bounds import Bounds, bracketed, tolerance
from entnorm_jax._src.moments import RowStats

# At most a factor 16 per step upwards (the model's steps and the iteration's).
MAX_LOG_GROWTH = float(np.log(16.0))
_HALF_LOG_2PI = float(0.5 * np.log(2 * np.pi))


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
    return cls(bounds.log_m, m, rest, mu, s, beta, log_phi(beta))

  def at(self, gamma):
    """``(H - log m, V, mean)`` of the model at γ."""
    a = self.beta - gamma * self.s
    log_phi_a = log_phi(a)
    mills = jnp.exp(-0.5 * a * a - _HALF_LOG_2PI - log_phi_a)
    log_e = gamma * self.mu + 0.5 * jnp.square(gamma * self.s) + log_phi_a - self.log_phi_beta
    mean_b = self.mu + gamma * self.s * self.s - self.s * mills
    var_b = self.s * self.s * jnp.maximum(1.0 - a * mills - mills * mills, 1e-6)
    ratio = self.rest / self.m * jnp.exp(log_e)
    weight = ratio / (1.0 + ratio)  # of the bulk
    excess = jnp.log1p(ratio) - gamma * weight * mean_b
    var = weight * var_b + weight * (1.0 - weight) * mean_b * mean_b
    return excess, var, weight * mean_b


def _binary_model_gamma(n_ties, gap, target, log_m):
  """γ at which m ties at 0 plus one entry at -gap have entropy ``target``.

  With x = γ·gap, r = e^{-x}, p = r / (m + r): H(x) - log m = log1p(r/m) + x p, falling from
  log(1 + 1/m) to 0. For r << m it is r (1 + x) / m, whose solution is the fixed point of
  x = log(1 + x) - log m - log(H_t - log m); three steps from x = -log m - log(H_t - log m), in
  closed form (per-row work, independent of n). Rows whose target is above log(m + 1) get 0.

  It bounds every row's γ* from below, up to the r << m approximation: a row with the same m ties
  and gap and more entries below has at least this entropy at every γ (with R the weight of all
  entries off the maximum, relative to one tie: for R <= 1 grouping them raises the binary
  entropy, and for R > 1 the entropy exceeds -log max q = log(m + R) > log(m + 1)).

  Four Newton steps on the exact equation after them (a loop, run by blocks holding such rows)
  took as many passes at most on low-entropy targets and 0.13 fewer on average, for 15 compiled
  fusions more per solve site (on [64, 16], of 98).
  """
  m = jnp.maximum(n_ties, 1.0)
  excess = target - log_m
  reachable = (excess > 0) & (excess < jnp.log1p(1.0 / m))
  offset = -jnp.log(m) - jnp.log(jnp.where(reachable, excess, 1.0))
  x = jnp.maximum(offset, 1e-3)
  for _ in range(3):
    x = jnp.maximum(jnp.log1p(x) + offset, 1e-3)
  return jnp.where(reachable & jnp.isfinite(gap) & (gap > 0), x / gap, 0.0)


# The model is used while its tilted bulk is cut at most this many deviations above its mean
# (a >= -_MODEL_DEPTH); beyond, float32 loses its variance to cancellation and the row is in the
# argmax regime anyway.
_MODEL_DEPTH = 4.0


def _model_gamma(model: _Model, bounds: Bounds, target, gamma):
  """One safeguarded Newton step on the :class:`_Model` towards ``target`` from ``gamma`` (per-row
  work, independent of n): on ``log(log n - H)`` against ``log γ`` while the model's entropy is
  above the target, on ``log(H - log m)`` against ``γ`` below it.

  The model is evaluated once. Measured against a loop that first evaluated the model at its
  upper end (to tell whether the target lies within its range) and then stepped, on 3·N(0, 1)
  rows of 16 to 1024 entries: within 0.02 passes on average at targets of 0.3 log n and above, at
  most 0.15 more below (which the lower bound in :func:`initial_gamma` more than makes up for),
  14 compiled fusions fewer per solve site (a tenth of its compile time or more), and 2-13% less
  time per solve at 16-256 entries.

  Returns:
    ``(gamma, mean, reached)``: the model's γ, its mean of d at the given γ (a centre for the
    first moments), and whether the target lies within the model's range as far as the step
    sees (else γ is the model's upper end).
  """
  cap = jnp.minimum(bounds.gamma_hi, (model.beta + _MODEL_DEPTH) / model.s)
  gamma = jnp.clip(gamma, 0.0, cap)
  excess, var, mean = model.at(gamma)
  entropy = bounds.log_m + excess
  high = entropy > target
  deficit = bounds.log_n - entropy
  step_u = (jnp.log(deficit) - jnp.log(bounds.log_n - target)) / (gamma * gamma * var / deficit)
  up = gamma * jnp.exp(jnp.clip(-step_u, -MAX_LOG_GROWTH, MAX_LOG_GROWTH))
  down = gamma + (jnp.log(excess) - jnp.log(target - bounds.log_m)) / (gamma * var / excess)
  new = jnp.where(high, up, down)
  # The model's entropy falls with γ: the target lies above γ where it is high, below it if not.
  beyond = high & (new >= cap)
  lo, hi = jnp.where(high, gamma, 0.0), jnp.where(high, cap, gamma)
  return jnp.where(beyond, cap, bracketed(new, lo, hi)), mean, ~beyond


class Start(NamedTuple):
  """The first iterate of each row: γ, the centre for its moments, and whether it is final."""

  gamma: jax.Array
  center: jax.Array
  fixed: jax.Array  # an edge row (clamped target, empty or NaN): γ is the answer, no steps


def initial_gamma(stats: RowStats, bounds: Bounds, target: jax.Array) -> Start:
  """First guess for γ* from exponential-free statistics; edges get their final γ.

  Near the uniform end log n - H(γ) ≈ γ² V_0 / 2 (V_0 the plain variance); from there the guess
  solves the row's :class:`_Model`. The first moments are centred on the model's mean (a centre
  far from q's mean cancels the variance away in float32). ``target`` must already be clamped to
  [log m, log n].
  """
  deficit = jnp.maximum(bounds.log_n - target, 0.0)
  gamma = jnp.sqrt(2.0 * deficit / jnp.where(stats.var > 0, stats.var, 1.0))
  gamma = jnp.minimum(gamma, bounds.gamma_hi)
  model_gamma, center, reached = _model_gamma(_Model.of(stats, bounds), bounds, target, gamma)
  ok = jnp.isfinite(model_gamma) & (model_gamma > 0) & jnp.isfinite(center)
  gamma = jnp.where(ok, model_gamma, gamma)
  # Beyond the model's range: the argmax regime, where m ties and the next value decide. Their
  # γ is (close to) a lower bound on every row's γ*: it lifts the guesses of rows whose top few
  # values stand apart from a bulk the model describes (targets below 0.2 log n: 6-8 passes at
  # most without it, 4 with it).
  argmax = ~(ok & reached)
  gamma_argmax = _binary_model_gamma(stats.n_ties, stats.gap, target, bounds.log_m)
  gamma = jnp.minimum(jnp.maximum(gamma, gamma_argmax), bounds.gamma_hi)
  # q's mean rises with γ from the plain mean (γ = 0) to the maximum, 0 (γ → ∞).
  center = jnp.where(argmax, 0.0, jnp.where(ok, center, stats.mean))
  center = jnp.clip(center, stats.mean, 0.0)
  tol = tolerance(bounds, target.dtype)  # see bounds.inside()
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


def start(
  stats: RowStats,
  bounds: Bounds,
  target: jax.Array,
  held: jax.Array | None = None,
  held_gamma=1.0,
  held_center=None,
) -> tuple[jax.Array, Start]:
  """The target clamped to [log m, log n], and the :class:`Start` of each row.

  Rows flagged ``held`` (inside their entropy bounds) start, and stay, at ``held_gamma`` (γ = 1
  in the caller's units), centred on ``held_center`` (their mean there) when given.
  """
  target = jnp.clip(target, bounds.log_m, bounds.log_n)
  first = initial_gamma(stats, bounds, target)
  if held is not None:
    center = first.center if held_center is None else jnp.where(held, held_center, first.center)
    first = Start(jnp.where(held, held_gamma, first.gamma), center, first.fixed | held)
  return target, first

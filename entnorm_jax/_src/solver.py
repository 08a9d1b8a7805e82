"""Solving H(softmax(γ·z)) = H_target for γ, and its implicit derivative.

The entropy H(γ) falls strictly from log n (γ = 0) to log m (γ → ∞, m = ties at the maximum).
Each iteration takes one pass over the row (:func:`row_moments`) and a safeguarded Halley step
whose variable depends on the side of the target the iterate is on:

* H(γ) > H_t (γ too small): Halley on ``log(log n - H)`` as a function of ``log γ``, which is
  close to linear near the uniform end (``log n - H ≈ γ² V_0 / 2``);
* H(γ) < H_t (γ too large): Halley on ``log(H - log m)`` as a function of ``γ``, which is close to
  linear near the argmax end (``H - log m ≈ c γ e^{-γ δ}``).

A bracket on γ is kept from monotonicity; a step that leaves it is replaced by geometric
bisection. The iteration count is fixed (``lax.fori_loop``), so the solve is jit/vmap friendly.

The derivative never goes through the loop: γ* is defined by F(γ, z, H_t) = H(γ; z) - H_t = 0,
and the implicit function theorem gives (with q, m, V at γ*)

    ∂γ*/∂z_i = -γ* q_i (z_i - m) / V,        ∂γ*/∂H_t = -1 / (γ* V).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entnorm_jax._src.moments import Moments, RowStats, row_moments, row_stats

# exp(-x) underflows to 0 beyond these (float32 subnormals end near 103.3, float64 near 744.4):
# at γ = _ARGMAX_EXPONENT / gap the distribution is the argmax-uniform one in that precision.
_ARGMAX_EXPONENT = {np.dtype("float32"): 110.0, np.dtype("float64"): 750.0}

# Default iteration counts: enough for |H - H_t| <= 2e-4 nats (float32) and ~1e-12 (float64) on the
# accuracy battery in the tests and benchmarks.
DEFAULT_NUM_ITERS = {np.dtype("float32"): 8, np.dtype("float64"): 12}


_MAX_LOG_GROWTH = float(np.log(16.0))


def default_num_iters(dtype) -> int:
  """Iterations used when ``num_iters=None`` for a compute dtype (float32 or float64)."""
  return DEFAULT_NUM_ITERS[np.dtype(dtype)]


class Bounds(NamedTuple):
  """Reachable entropies and the γ bracket of each row."""

  log_n: jax.Array  # entropy at γ = 0
  log_m: jax.Array  # entropy as γ → ∞
  gamma_lo: jax.Array  # γ* >= gamma_lo
  gamma_hi: jax.Array  # γ* <= gamma_hi (argmax-uniform in the working precision)


def entropy_bounds(stats: RowStats, dtype) -> Bounds:
  """The reachable entropy range [log m, log n] of each row and a finite bracket on γ."""
  log_n = jnp.log(jnp.maximum(stats.n_valid, 1.0))
  log_m = jnp.log(jnp.maximum(stats.n_ties, 1.0))
  cap = _ARGMAX_EXPONENT[np.dtype(dtype)]
  gamma_hi = jnp.where(jnp.isfinite(stats.gap) & (stats.gap > 0), cap / stats.gap, 1.0)
  return Bounds(log_n, log_m, jnp.zeros_like(log_n), gamma_hi)


def _binary_model_gamma(n_ties, gap, target, log_m):
  """γ at which m ties at 0 plus one entry at -gap have entropy ``target`` (scalar bisection).

  With x = γ·gap, r = e^{-x}: H(x) = log(m + r) + x r / (m + r), falling from log(m + 1) to log m.
  Rows whose target is above log(m + 1) get 0. Work is per row, independent of the row length.
  """

  def model_entropy(x):
    r = jnp.exp(-x)
    return jnp.log(n_ties + r) + x * r / (n_ties + r)

  def body(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    above = model_entropy(mid) > target
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo = jnp.zeros_like(target)
  hi = jnp.full_like(target, 120.0)
  lo, hi = jax.lax.fori_loop(0, 40, body, (lo, hi))
  x = jnp.where(target > log_m, 0.5 * (lo + hi), 0.0)
  return jnp.where(jnp.isfinite(gap) & (gap > 0), x / gap, 0.0)


def _guesses(stats: RowStats, bounds: Bounds, target: jax.Array):
  deficit = jnp.maximum(bounds.log_n - target, 0.0)
  spread = jnp.where(stats.spread > 0, stats.spread, 1.0)
  gamma_lo = jnp.sqrt(8.0 * deficit) / spread
  var0 = jnp.where(stats.var > 0, stats.var, 1.0)
  gamma_uniform = jnp.sqrt(2.0 * deficit / var0)
  gamma_argmax = _binary_model_gamma(stats.n_ties, stats.gap, target, bounds.log_m)
  return gamma_uniform, gamma_argmax, gamma_lo


def initial_gamma(
  stats: RowStats, bounds: Bounds, target: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """First guess and lower bound for γ* from exponential-free statistics.

  Near the uniform end log n - H(γ) ≈ γ² V_0 / 2 (V_0 the plain variance), and since V <= R²/4
  (R the spread), γ* >= sqrt(8 (log n - H_t)) / R. Near the argmax end the two-level model of
  :func:`_binary_model_gamma` is a lower estimate too; the guess is the larger of the two.

  Returns:
    ``(gamma0, gamma_lo)``, both of the batch shape.
  """
  gamma_uniform, gamma_argmax, gamma_lo = _guesses(stats, bounds, target)
  gamma0 = jnp.clip(jnp.maximum(gamma_uniform, gamma_argmax), gamma_lo, bounds.gamma_hi)
  return gamma0, gamma_lo


def initial_center(stats: RowStats, bounds: Bounds, target: jax.Array) -> jax.Array:
  """Where to centre the first moments: where q's mass is expected at the first guess.

  On the maximum (0) when the argmax model sets the guess, on the plain mean otherwise; a centre
  far from q's mean cancels the variance away in float32.
  """
  gamma_uniform, gamma_argmax, _ = _guesses(stats, bounds, target)
  return jnp.where(gamma_argmax > gamma_uniform, 0.0, stats.mean)


class _State(NamedTuple):
  gamma: jax.Array
  lo: jax.Array
  hi: jax.Array
  center: jax.Array


def _halley(f, f1, f2):
  """Halley's correction -f/f' / (1 - f f'' / (2 f'^2)), its curvature factor kept in [1/2, 2].

  The factor keeps the Newton direction (which is right for a monotone f) when f'' is large.
  """
  newton = -f / f1
  half_l = jnp.clip(0.5 * f * f2 / (f1 * f1), -1.0, 0.5)
  return newton / (1.0 - half_l)


def halley_update(state: _State, mom, target, bounds: Bounds) -> _State:
  """One safeguarded Halley update of γ from the moments at the current γ (per-row scalars).

  Shared by the dense solver and the blockwise attention, which accumulates the same moments
  over key blocks.
  """
  g = state.gamma
  h1 = -g * mom.var  # H'(γ)
  h2 = -mom.var - g * mom.third  # H''(γ)
  too_high = mom.entropy > target  # γ too small
  lo = jnp.where(too_high, jnp.maximum(state.lo, g), state.lo)
  hi = jnp.where(too_high, state.hi, jnp.minimum(state.hi, g))

  # Low side (γ too large): w(γ) = log(H - log m), a step in γ.
  ex = mom.excess
  w = jnp.log(ex) - jnp.log(target - bounds.log_m)
  w1 = h1 / ex
  w2 = h2 / ex - w1 * w1
  g_low = g + _halley(w, w1, w2)

  # High side (γ too small): u(t) = log(log n - H), t = log γ.
  deficit = bounds.log_n - mom.entropy
  u = jnp.log(deficit) - jnp.log(bounds.log_n - target)
  du = -g * h1  # d(log n - H)/dt
  u1 = du / deficit
  u2 = (du - g * g * h2) / deficit - u1 * u1
  # At most a factor 16 per step: from a plateau (near-ties) the local slope predicts
  # far too much, and one-hot overshoots cancel V away, which would stall the next steps.
  g_high = g * jnp.exp(jnp.minimum(_halley(u, u1, u2), _MAX_LOG_GROWTH))

  # Near convergence the two transforms can disagree in sign at rounding level; a step against the
  # side the iterate is on is such noise, so the iterate stays.
  proposal = jnp.where(too_high, jnp.maximum(g_high, g), jnp.minimum(g_low, g))
  inside = (proposal >= lo) & (proposal <= hi) & jnp.isfinite(proposal)
  bisect = jnp.where(lo > 0, jnp.sqrt(lo * hi), 0.5 * hi)
  # A row on target to rounding keeps its γ: rounding noise must not bisect it away.
  eps = jnp.finfo(g.dtype).eps
  converged = jnp.abs(mom.entropy - target) <= 8.0 * eps * jnp.maximum(bounds.log_n, 1.0)
  gamma = jnp.where(converged, g, jnp.where(inside, proposal, bisect))
  return _State(gamma, lo, hi, mom.mean)


def normalized_exp(d: jax.Array, valid: jax.Array, gamma: jax.Array) -> jax.Array:
  """softmax(γ·d) over valid entries, exactly 0 elsewhere (all zeros for an all-masked row)."""
  e = jnp.where(valid, jnp.exp(gamma[..., None] * d), 0.0)
  s0 = jnp.sum(e, axis=-1, keepdims=True)  # >= 1 when the row has a valid entry (d_max = 0)
  return e / jnp.where(s0 > 0, s0, 1.0)


def iterate(
  stats: RowStats,
  bounds: Bounds,
  target: jax.Array,
  num_iters: int,
  moments_fn: Callable[[jax.Array, jax.Array], Moments],
) -> tuple[jax.Array, jax.Array]:
  """The fixed-count solve, for any way of computing the moments of a row.

  Args:
    stats: exponential-free statistics of the rows.
    bounds: :func:`entropy_bounds` of ``stats``.
    target: target entropies in nats (clamped here to [log m, log n]).
    num_iters: static number of Halley iterations (``lax.fori_loop``).
    moments_fn: ``(gamma, center) -> Moments`` at the current iterate (one pass over the data:
      :func:`row_moments` for dense rows, a sweep over key blocks for blockwise attention).

  Returns:
    ``(gamma, center)``: γ* with the edges applied (γ = 0 at or above log n, the argmax cap at or
    below log m, 0 for empty rows, NaN for rows holding a valid NaN), and the last iterate's mean.
  """
  target = jnp.clip(target, bounds.log_m, bounds.log_n)
  gamma0, gamma_lo = initial_gamma(stats, bounds, target)
  state = _State(gamma0, gamma_lo, bounds.gamma_hi, initial_center(stats, bounds, target))

  def body(_, state):
    return halley_update(state, moments_fn(state.gamma, state.center), target, bounds)

  state = jax.lax.fori_loop(0, num_iters, body, state)
  gamma = jnp.where(target <= bounds.log_m, bounds.gamma_hi, state.gamma)
  gamma = jnp.where(target >= bounds.log_n, 0.0, gamma)  # also all-tied rows (log m = log n)
  gamma = jnp.where(stats.n_valid > 0, gamma, 0.0)
  # A valid NaN makes the row maximum NaN; propagate it to γ (and so to the row's output).
  return jnp.where(jnp.isnan(stats.mean), jnp.nan, gamma), state.center


def _solve_loop(d, valid, target, num_iters):
  """The dense solve; returns γ (batch shape). No gradient flows through it."""
  d, target = jax.lax.stop_gradient((d, target))
  stats = row_stats(d, valid)
  bounds = entropy_bounds(stats, d.dtype)
  moments_fn = lambda gamma, center: row_moments(d, valid, gamma, center, stats.n_ties)
  return iterate(stats, bounds, target, num_iters, moments_fn)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def solve_shifted(d: jax.Array, valid: jax.Array, target: jax.Array, num_iters: int) -> jax.Array:
  """γ* >= 0 with H(softmax(γ*·d)) = clip(target, log m, log n), per row of ``d``.

  Args:
    d: shifted logits ``[..., n]`` (max 0 on valid entries, 0 at masked entries).
    valid: boolean mask ``[..., n]``.
    target: ``[...]`` target entropies in nats.
    num_iters: static number of iterations.

  Returns:
    γ* of shape ``[...]``.
  """
  return _solve_loop(d, valid, target, num_iters)


@solve_shifted.defjvp
def _solve_shifted_jvp(num_iters, primals, tangents):
  d, valid, target = primals
  d_dot, _, target_dot = tangents
  gamma = solve_shifted(d, valid, target, num_iters)
  # q, m, V at the solution, written with differentiable ops (second order comes for free).
  q = normalized_exp(d, valid, gamma)
  mean = jnp.sum(q * d, axis=-1)
  centred = jnp.where(valid, d - mean[..., None], 0.0)
  var = jnp.sum(q * centred * centred, axis=-1)
  stats_n = jnp.sum(valid, axis=-1)
  n_ties = jnp.sum(valid & (jax.lax.stop_gradient(d) == 0), axis=-1)
  log_n = jnp.log(jnp.maximum(stats_n, 1).astype(d.dtype))
  log_m = jnp.log(jnp.maximum(n_ties, 1).astype(d.dtype))
  # Clamped targets (and rows at γ = 0 or with zero variance) do not move: tangent 0.
  denom = gamma * var
  free = (target > log_m) & (target < log_n) & (denom > 0)
  safe_denom = jnp.where(free, denom, 1.0)
  numer = gamma * gamma * jnp.sum(q * centred * d_dot, axis=-1) + target_dot
  gamma_dot = jnp.where(free, -numer / safe_denom, 0.0)
  return gamma, gamma_dot

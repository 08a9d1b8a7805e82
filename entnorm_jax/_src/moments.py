"""Per-row statistics of softmax(γ·z): the one routine every solver calls.

For logits ``z`` shifted so that the row maximum is 0 (``d = z - max z``, so ``d <= 0`` on valid
entries) and ``e_i = exp(γ d_i)`` over the valid entries, the moments ``S_k = Σ e_i (d_i - c)^k``
(centred on a per-row ``c``) give everything Newton- and Halley-type steps on γ need:

    q_i = e_i / S_0,      m = E_q[d] = c + S_1/S_0,      V = Var_q[d],      κ = E_q[(d - m)^3],
    H(γ) = log S_0 - γ m,      H'(γ) = -γ V,      H''(γ) = -V - γ κ.

Centring on the previous iterate's mean keeps ``V`` and ``κ`` accurate when they are small.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RowStats(NamedTuple):
  """Statistics of the shifted logits of each row that need no exponential.

  Attributes:
    n_valid: number of valid entries (float, shape = batch).
    n_ties: number of valid entries equal to the row maximum.
    gap: distance from the maximum to the next smaller valid value (``inf`` if none).
    spread: distance from the maximum to the smallest valid value.
    mean: plain mean of the shifted logits over valid entries.
    var: plain variance of the shifted logits over valid entries.
  """

  n_valid: jax.Array
  n_ties: jax.Array
  gap: jax.Array
  spread: jax.Array
  mean: jax.Array
  var: jax.Array


class Moments(NamedTuple):
  """Moments of q = softmax(γ·d) over a row (shape = batch each).

  Attributes:
    entropy: H(γ) in nats.
    mean: E_q[d].
    var: Var_q[d] (= -H'(γ)/γ).
    third: third central moment E_q[(d - mean)^3] (= dVar/dγ).
    excess: H(γ) - log(n_ties), computed without cancellation (used near the argmax limit).
  """

  entropy: jax.Array
  mean: jax.Array
  var: jax.Array
  third: jax.Array
  excess: jax.Array


def shift_rows(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Shifts each row so its valid maximum is 0; masked entries become 0.

  Args:
    x: logits ``[..., n]`` in the compute dtype.
    valid: boolean mask of the same shape.

  Returns:
    ``(d, zmax)``: the shifted logits (exactly 0 at masked entries, NaN in rows holding a valid
    NaN) and the row maxima ``[..., 1]`` (0 for rows with no valid entry). The shift carries no
    gradient: every quantity computed from ``d`` is invariant to it.
  """
  zmax = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
  zmax = jnp.where(jnp.isneginf(zmax), 0.0, zmax)
  zmax = jax.lax.stop_gradient(zmax)
  d = jnp.where(valid, x - zmax, 0.0)
  return d, zmax


def row_stats(d: jax.Array, valid: jax.Array) -> RowStats:
  """Exponential-free statistics of shifted logits (see :class:`RowStats`)."""
  dtype = d.dtype
  n = jnp.sum(valid, axis=-1).astype(dtype)
  ties = jnp.sum(valid & (d == 0), axis=-1).astype(dtype)
  below = valid & (d < 0)
  gap = -jnp.max(jnp.where(below, d, -jnp.inf), axis=-1)
  spread = -jnp.min(jnp.where(valid, d, 0.0), axis=-1)
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(d, axis=-1) / safe_n  # masked entries of d are 0
  var = jnp.sum(jnp.where(valid, jnp.square(d - mean[..., None]), 0.0), axis=-1) / safe_n
  return RowStats(n, ties, gap, spread, mean, var)


def _weighted_sum(d, mask, gamma, center, power, k):
  """Σ_i exp(γ d_i) (d_i - c)^power over ``mask``: one reduction reading ``d`` and ``mask``.

  γ and c are nudged by (k + 1) times the smallest normal number (no change in value): a distinct
  k per sum keeps XLA from sharing exp(γ·d) or d - c between the sums, which on the CPU backend
  turns them into one multi-output fusion that runs about twice as slowly as separate fused
  reductions.
  """
  nudge = (k + 1) * jnp.finfo(d.dtype).tiny
  g = (gamma + nudge)[..., None]
  y = d - (center + nudge)[..., None]
  return jnp.sum(jnp.where(mask, jnp.exp(g * d) * y**power, 0.0), axis=-1)


def row_moments(
  d: jax.Array, valid: jax.Array, gamma: jax.Array, center: jax.Array, n_ties: jax.Array
) -> Moments:
  """Moments of softmax(γ·d) in one pass over the row.

  Args:
    d: shifted logits ``[..., n]`` (``d <= 0`` on valid entries, max exactly 0).
    valid: boolean mask ``[..., n]``.
    gamma: ``[...]`` inverse temperature, ``γ >= 0``.
    center: ``[...]`` centring point, ideally close to the mean under q.
    n_ties: ``[...]`` number of valid entries with ``d == 0``.

  Returns:
    :class:`Moments` of the row.
  """
  sums = [_weighted_sum(d, valid, gamma, center, k, k=k) for k in range(4)]
  # Mass off the argmax set, summed on its own so that H - log m keeps its digits near log m.
  rest = _weighted_sum(d, valid & (d < 0), gamma, center, 0, k=4)
  return moments_from_sums(*sums, rest, gamma, center, n_ties)


def moments_from_sums(s0, s1, s2, s3, rest, gamma, center, n_ties) -> Moments:
  """:class:`Moments` from the sums ``S_k = Σ e (d - c)^k`` (k = 0..3) and the off-argmax mass.

  Shared by :func:`row_moments` and the blockwise attention, which accumulates the same sums over
  key blocks.
  """
  a1 = s1 / s0
  a2 = s2 / s0
  a3 = s3 / s0
  mean = center + a1
  var = jnp.maximum(a2 - a1 * a1, 0.0)
  third = a3 - 3.0 * a1 * a2 + 2.0 * a1 * a1 * a1
  entropy = jnp.log(s0) - gamma * mean
  excess = jnp.log1p(rest / jnp.maximum(n_ties, 1.0)) - gamma * mean
  return Moments(entropy, mean, var, third, excess)

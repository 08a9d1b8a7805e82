"""Per-row statistics of softmax(γ·z): the routines every solver calls.

For logits ``z`` shifted so that the row maximum is 0 (``d = z - max z``, so ``d <= 0`` on valid
entries and ``d = -inf`` on masked ones) and ``e_i = exp(γ d_i)``, the sums
``S_k = Σ e_i (d_i - c)^k`` (centred on a per-row ``c``) give everything Newton- and Halley-type
steps on γ need:

    q_i = e_i / S_0,      m = E_q[d] = c + S_1/S_0,      V = Var_q[d],      κ = E_q[(d - m)^3],
    H(γ) = log S_0 - γ m,      H'(γ) = -γ V,      H''(γ) = -V - γ κ.

The blockwise attention centres its sums on the previous iterate's mean
(:func:`moments_from_sums`), which keeps ``V`` and ``κ`` accurate when they are small; the dense
rows take theirs about the maximum (``c = 0``, see :func:`evaluate`).

On XLA's CPU backend every reduction over a ``[rows, n]`` array is a separate pass that costs about
as much as reading the array, whatever arithmetic it does; so an evaluation computes ``e`` once
and asks only for the sums its caller needs: two for the entropy (a "light" evaluation, enough to
check convergence), four for a Halley step (a "full" one). Rows held in the lanes layout
(:func:`lane_shape`) are the exception: there every per-row quantity is one variadic reduction,
and four sums cost little more than two (one pass either way).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from entnorm_jax._src.backends import packed_counts, row_max, shift_to_max


class RowStats(NamedTuple):
  """Statistics of the shifted logits of each row that need no exponential.

  Attributes:
    n_valid: number of valid entries (float, shape = batch).
    n_ties: number of valid entries equal to the row maximum.
    gap: distance from the maximum to the next smaller valid value (``inf`` if none).
    mean: plain mean of the shifted logits over valid entries.
    var: plain variance of the shifted logits over valid entries.
  """

  n_valid: jax.Array
  n_ties: jax.Array
  gap: jax.Array
  mean: jax.Array
  var: jax.Array


class Moments(NamedTuple):
  """Moments of q = softmax(γ·d) over a row (shape = batch each).

  Attributes:
    entropy: H(γ) in nats.
    mean: E_q[d].
    var: Var_q[d] (= -H'(γ)/γ); NaN after a light evaluation.
    third: third central moment E_q[(d - mean)^3] (= dVar/dγ); NaN after a light evaluation.
    excess: H(γ) - log(n_ties), for the argmax end.
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


class Shifted(NamedTuple):
  """A block of rows shifted to maximum 0, in the two forms evaluations read.

  Attributes:
    zmax: ``[...]`` maxima over valid entries (0 for a row with none, NaN for a row with a
      valid NaN).
    d: ``[..., n]`` the shifted logits ``x - max``, 0 at masked entries (for moments).
    dm: the same with ``-inf`` at masked entries (for exponentials: ``exp(γ dm) = 0`` there).
  """

  zmax: jax.Array
  d: jax.Array
  dm: jax.Array


def lane_shape(n: int) -> tuple[int, int]:
  """``(sublanes, lanes)``: the lanes layout of a row of ``n`` entries (padded to their product).

  A row is held as ``[sublanes, lanes]`` and every per-row quantity is one variadic reduction:
  first across the sublanes (vectorized over the lanes), then across the lanes. XLA's CPU backend
  emits such a reduction as one loop that computes each exponential once for all its sums, and
  vectorizes it when the axis it runs along first is short. Measured per row length (see
  ``benchmarks.core``): up to 512 entries, at most 16 sublanes of at most 32 lanes; beyond, lanes
  of 8 (the 8 reduced first).
  """
  if n <= 512:
    sublanes = min(16, -(-n // 8))
    return sublanes, -(-n // sublanes)
  return -(-n // 8), 8


def _lanes(a: jax.Array, fill) -> jax.Array:
  """``[..., n]`` as ``[..., sublanes, lanes]`` (:func:`lane_shape`), padded with ``fill``."""
  n = a.shape[-1]
  sublanes, lanes = lane_shape(n)
  pad = [(0, 0)] * (a.ndim - 1) + [(0, sublanes * lanes - n)]
  return jnp.pad(a, pad, constant_values=fill).reshape(*a.shape[:-1], sublanes, lanes)


def from_lanes(a: jax.Array, n: int) -> jax.Array:
  """The inverse of the lanes layout: ``[..., sublanes, lanes]`` back to ``[..., n]``."""
  return a.reshape(*a.shape[:-2], -1)[..., :n]


def _row_reduce(terms, inits, ops) -> tuple[jax.Array, ...]:
  """Reductions of each row of the lanes-layout ``terms``: one variadic pass (``ops[k]`` combines
  the k-th term, from ``inits[k]``), across the sublanes first when they are few, else across the
  lanes first."""
  terms = tuple(terms)
  inits = tuple(jnp.asarray(v, terms[0].dtype) for v in inits)
  combine = lambda a, b: tuple(op(u, v) for op, u, v in zip(ops, a, b, strict=True))
  sublanes = terms[0].shape[-2]
  first = terms[0].ndim - (2 if sublanes <= 16 else 1)
  partial = jax.lax.reduce(terms, inits, combine, (first,))
  return jax.lax.reduce(partial, inits, combine, (partial[0].ndim - 1,))


def _finite_part(dm: jax.Array) -> jax.Array:
  """``d`` from ``dm`` (0 where masked), computed inside the pass that reads ``dm``: in the lanes
  layout a pass then reads one array, not two."""
  return jnp.where(dm != -jnp.inf, dm, 0.0)


def _in_lanes(logits: Shifted) -> bool:
  """Whether ``logits`` are held in the lanes layout, ``[..., sublanes, lanes]``
  (:func:`shifted`)."""
  return logits.dm.ndim > logits.zmax.ndim + 1


def _row_sums(terms) -> tuple[jax.Array, ...]:
  return _row_reduce(terms, (0.0,) * len(terms), (jax.lax.add,) * len(terms))


def shifted(
  x: jax.Array, where: jax.Array | None, zmax: jax.Array | None = None, *, lanes: bool = False
) -> Shifted:
  """:class:`Shifted` rows of ``x`` ``[..., n]`` (``-inf`` entries and ``where`` False are masked).

  ``zmax``, the row maxima over valid entries, is computed unless given. With ``lanes`` the rows
  are held in the lanes layout (:func:`lane_shape`), ``[..., sublanes, lanes]``, padded with
  masked entries; every per-row quantity of them is then one variadic pass.
  """
  valid = x != -jnp.inf  # a NaN is valid: it makes its row NaN
  if where is not None:
    valid = valid & where
  if lanes:
    x = _lanes(x if where is None else jnp.where(valid, x, -jnp.inf), -jnp.inf)
    valid = x != -jnp.inf
    if zmax is None:
      (zmax,) = _row_reduce((x,), (-jnp.inf,), (jax.lax.max,))
  elif zmax is None:
    zmax = row_max(x, where, valid)
  zmax = jnp.where(jnp.isneginf(zmax), 0.0, zmax)
  top = zmax.reshape(zmax.shape + (1,) * (x.ndim - zmax.ndim))
  dm = jnp.where(valid, shift_to_max(x, top), -jnp.inf)
  return Shifted(zmax, jnp.where(valid, dm, 0.0), dm)


def row_stats(logits: Shifted) -> RowStats:
  """The exponential-free :class:`RowStats` of shifted logits.

  The variance is taken about the maximum (``E[d²] - E[d]²``): it only seeds the first guess, and
  one pass fewer matters more than its digits when the row's spread is tiny next to its mean.
  """
  if _in_lanes(logits):  # one variadic pass
    dm, d = logits.dm, _finite_part(logits.dm)
    n, ties, neg_gap, s1, s2 = _row_reduce(
      (
        (dm != -jnp.inf).astype(d.dtype),
        (dm == 0).astype(d.dtype),
        jnp.where(dm < 0, dm, -jnp.inf),
        d,
        d * d,
      ),
      (0.0, 0.0, -jnp.inf, 0.0, 0.0),
      (jax.lax.add, jax.lax.add, jax.lax.max, jax.lax.add, jax.lax.add),
    )
    safe_n = jnp.maximum(n, 1.0)
    mean = s1 / safe_n
    return RowStats(n, ties, -neg_gap, mean, jnp.maximum(s2 / safe_n - mean * mean, 0.0))
  n, ties = packed_counts(logits.dm)
  gap = -jnp.max(jnp.where(logits.dm < 0, logits.dm, -jnp.inf), axis=-1)
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(logits.d, axis=-1) / safe_n
  var = jnp.maximum(jnp.sum(logits.d * logits.d, axis=-1) / safe_n - mean * mean, 0.0)
  return RowStats(n, ties, gap, mean, var)


def count_near_max(logits: Shifted, distance: jax.Array) -> jax.Array:
  """Valid entries within ``distance`` (per row) of each row's maximum, the maximum included, as
  floats (one pass)."""
  distance = distance.reshape(distance.shape + (1,) * (logits.dm.ndim - distance.ndim))
  near = ((logits.dm >= -distance) & (logits.dm != -jnp.inf)).astype(logits.d.dtype)
  if _in_lanes(logits):
    return _row_sums((near,))[0]
  return jnp.sum(near, axis=-1)


def evaluate(
  logits: Shifted, gamma: jax.Array, n_ties: jax.Array, *, full: bool
) -> tuple[Moments, jax.Array, jax.Array]:
  """Moments of softmax(γ·d) from one exponential per entry.

  All sums are taken about the maximum (``S_k = Σ e d^k``). For the mean this is what the entropy
  needs: ``log S_0 - γ m`` with γ times the rounding of m below eps·log n even when γ is large.
  The variance ``S_2/S_0 - m²`` would cancel only for a tight cluster far below the maximum, which
  q never is (its largest weight is at the maximum).

  Args:
    logits: the :class:`Shifted` rows.
    gamma: ``[...]`` inverse temperature, ``γ >= 0``.
    n_ties: ``[...]`` number of valid entries at the maximum.
    full: also compute the variance and third moment (two more passes).

  Returns:
    ``(moments, e, s0)``: the :class:`Moments` (variance and third moment NaN unless ``full``),
    the unnormalized weights ``e = exp(γ d)`` (0 where masked) and their sum per row, so that
    ``e / s0`` is the distribution.
  """
  # γ = 0 (the uniform edge) as a tiny γ: exp(γ·-inf) must be 0 at masked entries, not NaN.
  g = jnp.maximum(gamma, jnp.finfo(logits.d.dtype).tiny)
  g = g.reshape(g.shape + (1,) * (logits.d.ndim - g.ndim))
  e = jnp.exp(g * logits.dm)
  if _in_lanes(logits):  # one variadic pass, e not written out
    d = _finite_part(logits.dm)
    sums = _row_sums((e, e * d, e * d * d, e * d * d * d)[: 4 if full else 2])
    e = None
  else:
    d = logits.d
    terms = (e, e * d, e * jax.lax.integer_pow(d, 2), e * jax.lax.integer_pow(d, 3))
    sums = [jnp.sum(t, axis=-1) for t in terms[: 4 if full else 2]]
  s0 = sums[0]
  inverse = 1.0 / s0
  mean = sums[1] * inverse
  if full:
    a2, a3 = sums[2] * inverse, sums[3] * inverse
    var = jnp.maximum(a2 - mean * mean, 0.0)
    third = a3 - 3.0 * mean * a2 + 2.0 * mean * mean * mean
  else:
    var = third = jnp.full_like(s0, jnp.nan)
  entropy, excess = _entropies(s0, mean, gamma, n_ties)
  return Moments(entropy, mean, var, third, excess), e, s0


def distribution(logits: Shifted, gamma: jax.Array, n: int) -> jax.Array:
  """softmax(γ·d) ``[..., n]`` of rows in the lanes layout: the weights ``e = exp(γ d)`` over the
  sum of these same weights, in the ``[..., n]`` layout (an elementwise pass and a row sum cost a
  third of what they do over ``[..., sublanes, lanes]``). Not over an evaluation's ``S_0``: XLA
  may round the exponentials inside a reduction differently (2 ulp of ``S_0`` measured), and the
  implicit derivative needs Σ q = 1 to the last bits (on sharp rows γ multiplies the difference).
  """
  g = jnp.maximum(gamma, jnp.finfo(logits.d.dtype).tiny)
  e = jnp.exp(g[..., None] * from_lanes(logits.dm, n))
  s0 = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(s0 > 0, s0, 1.0)


def _entropies(s0, mean, gamma, n_ties):
  """``H - log m_ties`` and ``H = log S_0 - γ m`` (one logarithm: ``log m_ties`` is constant over a
  solve). The mass off the argmax set is ``S_0 - m`` (each tie contributes exactly 1): its rounding
  is at the level of eps · m, far below what a target in (log m, log n) needs."""
  m = jnp.maximum(n_ties, 1.0)
  excess = jnp.log1p(jnp.maximum(s0 - m, 0.0) * (1.0 / m)) - gamma * mean  # 1/m: out of the loop
  return jnp.log(m) + excess, excess


def moments_from_sums(s0, s1, s2, s3, gamma, center, n_ties) -> Moments:
  """:class:`Moments` from the sums ``S_k = Σ e (d - c)^k`` (k = 0..3), for callers that accumulate
  them in one sweep (the blockwise attention, over key blocks)."""
  a1 = s1 / s0
  a2 = s2 / s0
  a3 = s3 / s0
  mean = center + a1
  var = jnp.maximum(a2 - a1 * a1, 0.0)
  third = a3 - 3.0 * a1 * a2 + 2.0 * a1 * a1 * a1
  entropy, excess = _entropies(s0, mean, gamma, n_ties)
  return Moments(entropy, mean, var, third, excess)

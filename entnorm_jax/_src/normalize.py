"""The entropy-normalized softmax of a ``[rows, n]`` array: the solve laid out for the platform,
and its implicit derivative.

Layouts (``implementation``):

* ``"tiled"`` (the CPU default): rows are solved in blocks of about 2 MiB, one after another
  (``lax.map``), so that every pass of a block's solve reads memory that is already in cache,
  and each block stops as soon as its own rows are on target; rows of up to
  :data:`LANES_MAX_LENGTH` entries are held in the lanes layout, each pass one variadic
  reduction (see :func:`entnorm_jax._src.moments.lane_shape`);
* ``"xla"`` (the TPU default): every pass covers the whole array, and the loop stops when every
  row is on target;
* ``"pallas"`` (the CUDA default): one fused Pallas kernel whose programs each load a block of rows
  once and run the whole solve on it (:mod:`entnorm_jax._src.pallas_core`); compiled by Triton on
  CUDA and ROCm, by Mosaic on TPUs, interpreted on CPUs, and the ``"xla"`` layout for rows longer
  than :data:`entnorm_jax._src.pallas_core.MAX_LENGTH`. On TPUs it runs only when asked for: the
  Mosaic kernel compiles, but it has not been timed on a TPU against the ``"xla"`` layout, whose
  passes XLA already fuses, so the default there stays ``"xla"``.

All run the same per-block solve (:func:`entnorm_jax._src.iteration.solve`) and give the same
answers. The output is ``e / S_0`` from the solve's last evaluation: no extra exponential.

The derivative never goes through the loop. γ* is defined by F(γ, z, H_t) = H(γ; z) - H_t = 0, and
the implicit function theorem gives, with q, m = E_q[z] and V = Var_q[z] at γ*,

    ∂γ*/∂z_i = -γ* q_i (z_i - m) / V,        ∂γ*/∂H_t = -1 / (γ* V),
    dq = q ⊙ (γ* (dz - E_q[dz]) + (z - m) dγ*).

The rule is written from the solution (q, γ*) with differentiable operations, so it can itself be
differentiated (second order), and in reverse mode it costs two reductions more than softmax's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entnorm_jax._src import pallas_core
from entnorm_jax._src.backends import TILE_BYTES, any_of
from entnorm_jax._src.bounds import entropy_bounds, goal
from entnorm_jax._src.first_guess import start
from entnorm_jax._src.iteration import FULL, solve
from entnorm_jax._src.moments import (
  Shifted,
  count_near_max,
  distribution,
  evaluate,
  row_stats,
  shifted,
)

IMPLEMENTATIONS = ("tiled", "xla", "pallas")

# Rows up to this length are solved in the lanes layout of the tiled solve (see
# ``moments.lane_shape``): every pass over them is one variadic reduction, an evaluation 1.5-5x
# cheaper (``benchmarks.core``). Longer rows keep one reduction per sum (YNNPACK's): there the lanes
# layout adds up each lane in sequence, whose float32 rounding grows with the length (1e-3 nats at
# 262144 entries).
LANES_MAX_LENGTH = 1024


class SolveConfig(NamedTuple):
  """Static settings of a solve (hashable)."""

  num_iters: int | None  # None: adaptive
  implementation: str | None  # None: by platform
  info: bool = False  # report each row's convergence (Solution.converged / .evaluations)


class Solution(NamedTuple):
  """Per-row results: ``probs`` ``[rows, n]``, the others ``[rows]``.

  Attributes:
    probs: q = softmax(γ*·z), exactly 0 where masked; a row with nothing valid is all zeros.
    gamma: γ*.
    target_scale: ∂(target in nats)/∂target where the target is inside (log m, log n)
      (``log n`` with ``relative``, else 1), and 0 where it was clamped to an edge. With bounds
      it is ``[rows, 2]``: that of the bound the row was normalized to, 0 for the other one
      (and for both where the row was inside its bounds, or clamped).
    converged: int32 1 where the row is on target (see
      :class:`entnorm_jax._src.iteration.SolveInfo`); ``None`` unless :attr:`SolveConfig.info`.
    evaluations: int32, the passes over the row; ``None`` unless :attr:`SolveConfig.info`.
  """

  probs: jax.Array
  gamma: jax.Array
  target_scale: jax.Array
  converged: jax.Array | None = None
  evaluations: jax.Array | None = None


def tile_rows(num_rows: int, n: int, itemsize: int) -> int:
  """Rows per block of the tiled layout: about ``TILE_BYTES`` (:mod:`entnorm_jax._src.backends`),
  dividing ``num_rows`` if it can."""
  cap = max(1, min(num_rows, TILE_BYTES // max(1, n * itemsize)))
  for t in range(cap, (cap + 1) // 2 - 1, -1):
    if num_rows % t == 0:
      return t
  return cap


def _solve_block(x, where, target, relative, num_iters, info=False, lanes=False) -> Solution:
  """Solves ``[T, n]`` rows (any T): the body of every layout (in the Pallas kernel, with a
  per-row ``relative``).

  With ``lanes`` the rows are held in the lanes layout: every evaluation gives all four sums (in
  the one pass that two would take), and the output is computed once more at the last γ
  (:func:`entnorm_jax._src.moments.distribution`) instead of kept from the loop.

  ``target`` is ``[T]`` exact targets, or ``[T, 2]`` (floor, ceiling) entropy bounds with
  ``relative`` of shape ``[2]``: then one light evaluation at γ = 1 gives each row's own entropy,
  rows inside their bounds keep γ = 1 (plain softmax, and with ``target_scale`` 0 softmax's
  derivative), and the others are solved for the bound they cross.
  """
  logits = shifted(x, where, lanes=lanes)
  stats = row_stats(logits)
  bounds = entropy_bounds(stats, x.dtype)  # the goal needs its entropies, which scaling keeps
  natural = None
  if target.ndim == 2:  # the entropy alone needs no products of d: no row is rescaled for it
    natural = evaluate(logits, jnp.ones_like(stats.mean), stats.n_ties, full=False)[0].entropy
  aim = goal(target, relative, bounds, natural)
  logits, stats, unit = _rescale_tiny_rows(logits, stats, aim.nats)
  bounds = entropy_bounds(stats, x.dtype)  # and γ's upper end, in the rescaled rows' units
  one = 1.0 / unit  # γ = 1 in the rescaled rows' units
  scale = aim.scale
  if target.ndim == 2:
    scale = jnp.stack([jnp.where(aim.which == k, aim.scale, 0.0) for k in (1, 2)], axis=-1)

  def evaluate_rows(gamma, center, mode, aux):
    # The block is evaluated in the most demanding mode of its rows that are not done; dense rows
    # take their moments about the maximum (see moments.evaluate), not about ``center``.
    del center, aux
    if lanes:  # all four sums in the one pass that the entropy's two take
      mom, _, _ = evaluate(logits, gamma, stats.n_ties, full=True)
      return mom, jnp.ones(gamma.shape, bool), ()

    def run(full: bool):
      mom, e, s0 = evaluate(logits, gamma, stats.n_ties, full=full)
      return mom, (e, s0)

    # ``full`` is broadcast outside the cond: Mosaic cannot select between the boolean vectors that
    # a cond returning a constant per branch becomes.
    full = any_of(mode == FULL)
    mom, aux = jax.lax.cond(full, lambda: run(True), lambda: run(False))
    return mom, jnp.broadcast_to(full, gamma.shape), aux

  held = () if natural is None else (aim.held, one)
  first = start(stats, bounds, aim.nats, *held)
  aux = () if lanes else (logits.d, stats.n_valid)
  gamma, _, report, aux = solve(
    bounds, *first, evaluate_rows, aux, num_iters=num_iters, info=info, every_full=lanes
  )
  if lanes:  # the weights at the last γ, once more
    probs = distribution(logits, gamma, x.shape[-1])
  else:
    e, s0 = aux
    probs = e / jnp.where(s0 > 0, s0, 1.0)[..., None]
  return Solution(probs, gamma * unit, scale, *(report or ()))


# A row rescaled for a target it can reach without telling its near-ties apart spans at most
# 2**_MAX_SPREAD_EXPONENT below its maximum; entries within 2**-_NEAR_EXPONENT of the maximum at
# that scale count as its near-ties (see _rescale_tiny_rows).
_MAX_SPREAD_EXPONENT = 32
_NEAR_EXPONENT = 20


def _rescale_tiny_rows(logits: Shifted, stats, target):
  """Rows whose values lie closer together than about sqrt(tiny) (1e-19 in float32) would lose
  their products to underflow: they are solved on ``d`` times a power of two (exact), and their γ
  is scaled back. Returns ``(logits, stats, unit)`` with γ_true = γ_solved · unit. A block
  without such rows costs one comparison.

  The power brings the gap below the maximum near 1, unless the row's spread (bounded by
  sqrt(n E[d²]) >= max |d|) would then exceed 2^32: a near-tie far closer than the rest of the
  row (a gap of 1e-38 beside values at -1) cannot have both in float32's range. Such a row is
  scaled by the gap only where its target (``target``, nats) lies below the log of its near-ties'
  count, the entropies that tell them apart; for higher targets it is scaled to a spread of 2^32,
  where its near-ties are ties for every γ the target needs. Scaled by the gap for every target,
  such rows missed high targets by 0.03-0.35 nats (γ underflowed, and the third sums overflowed);
  scaled by the spread for every target, low ones took 14 passes to the cap of 32, some without
  converging.
  """
  dtype = logits.d.dtype
  tiny = (stats.gap < np.sqrt(jnp.finfo(dtype).tiny) * 1e3) & (stats.gap > 0)

  def rescale():
    by_gap = -jnp.floor(jnp.log2(stats.gap))
    spread = jnp.sqrt(stats.n_valid * (stats.var + stats.mean * stats.mean))
    by_spread = _MAX_SPREAD_EXPONENT - jnp.ceil(jnp.log2(spread))
    near = count_near_max(logits, jnp.exp2(-(by_spread + _NEAR_EXPONENT)))
    resolve = target < jnp.log(jnp.maximum(near, 1.0)) + 1e-4
    exponent = jnp.where(resolve, by_gap, jnp.minimum(by_gap, by_spread))
    exponent = jnp.where(tiny & (exponent > 0), exponent, 0.0)
    factor = jnp.exp2(exponent)
    factor = factor.reshape(factor.shape + (1,) * (logits.d.ndim - factor.ndim))
    scaled = Shifted(logits.zmax, logits.d * factor, logits.dm * factor)
    return scaled, row_stats(scaled), exponent

  none = jnp.zeros_like(stats.gap)
  logits, stats, exponent = jax.lax.cond(any_of(tiny), rescale, lambda: (logits, stats, none))
  return logits, stats, jnp.exp2(exponent)


def _tiled(block, x, where, target, relative, *, info=False) -> Solution:
  """Runs ``block`` over blocks of :func:`tile_rows` rows, one after another.

  The output is written block by block into a copy of ``x`` (no zero fill); when the blocks do
  not divide the rows, the last one overlaps its predecessor (those rows are solved twice, with
  the same result: a row's solution does not depend on the rows solved with it).
  """
  num_rows, n = x.shape
  t = tile_rows(num_rows, n, x.dtype.itemsize)
  if t >= num_rows:
    return block(x, where, target, relative)

  def body(i, out: Solution) -> Solution:
    start = jnp.minimum(i * t, num_rows - t)
    cut = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, start, t)
    sol = block(cut(x), cut(where), cut(target), relative)
    put = lambda buf, a: jax.lax.dynamic_update_slice_in_dim(buf, a, start, 0)
    return jax.tree.map(put, out, sol)

  counts = (jnp.zeros(num_rows, jnp.int32),) * 2 if info else ()
  init = Solution(x, jnp.zeros(num_rows, x.dtype), jnp.zeros_like(target), *counts)
  return jax.lax.fori_loop(0, -(-num_rows // t), body, init)


def _pallas(
  block, x, where, target, relative, *, interpret: bool, tpu: bool = False, info=False
) -> Solution:
  """``block`` run by the fused kernel of :mod:`entnorm_jax._src.pallas_core` (laid out for TPUs
  and compiled by Mosaic with ``tpu``, else for GPUs and compiled by Triton). The kernel takes
  exact targets only (one value per row): bounds run ``block`` unfused."""
  if target.ndim == 2:
    return block(x, where, target, relative)
  solution = pallas_core.solve_in_kernel(
    block, x, where, target, relative, interpret=interpret, tpu=tpu, info=info
  )
  return Solution(*solution)


def traces_accelerators() -> bool:
  """Whether the default layout traces the accelerators' branches: not on a machine whose default
  backend is the CPU (see :func:`_layout`)."""
  return jax.default_backend() != "cpu"


def _tiled_only(implementation: str | None) -> bool:
  """Whether the solve, and its tangents, are traced in the tiled layout alone: asked for, or the
  default on a machine that does not trace the accelerators' branches."""
  return implementation == "tiled" or (implementation is None and not traces_accelerators())


def _layout(x, where, target, relative, cfg: SolveConfig) -> Solution:
  """The solve in the layout of ``cfg.implementation``, or the platform's.

  The choice between branches is made per platform when the computation is lowered
  (``platform_dependent``), so that a computation traced on a machine with an accelerator and
  lowered for its CPU (or exported) gets each platform's layout. Every branch is traced, and the
  kernel's trace was most of a solve site's tracing time (0.7 s of 1 s): on a machine whose
  default backend is the CPU, the tiled layout is the only one traced, and a computation exported
  from there for an accelerator runs it there too (name ``implementation="pallas"`` or ``"xla"``
  to export those).
  """
  block = functools.partial(_solve_block, num_iters=cfg.num_iters, info=cfg.info)
  lanes = x.shape[-1] <= LANES_MAX_LENGTH
  tiled = functools.partial(_tiled, functools.partial(block, lanes=lanes), info=cfg.info)
  pallas = functools.partial(_pallas, block, info=cfg.info)
  compiled = functools.partial(pallas, interpret=False)
  if _tiled_only(cfg.implementation):
    return tiled(x, where, target, relative)
  if cfg.implementation == "xla":
    return block(x, where, target, relative)
  args = (x, where, target, relative)
  if cfg.implementation == "pallas":
    interpreted = functools.partial(pallas, interpret=True)
    mosaic = functools.partial(pallas, interpret=False, tpu=True)
    return jax.lax.platform_dependent(
      *args, cpu=interpreted, cuda=compiled, rocm=compiled, tpu=mosaic, default=block
    )
  return jax.lax.platform_dependent(*args, cpu=tiled, cuda=compiled, default=block)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def solve_rows(
  x: jax.Array, where: jax.Array | None, target: jax.Array, relative: jax.Array, cfg: SolveConfig
) -> Solution:
  """Entropy-normalized softmax of every row of ``x``.

  Args:
    x: logits ``[rows, n]`` in the compute dtype (float32 or float64); ``-inf`` is masked.
    where: ``None`` or a boolean mask ``[rows, n]``.
    target: ``[rows]`` targets, or ``[rows, 2]`` (floor, ceiling) entropy bounds: nats, or
      fractions of log n_valid where ``relative``.
    relative: boolean scalar (may be traced), or ``[2]`` (one per bound) with bounds.
    cfg: static :class:`SolveConfig`.

  Returns:
    The :class:`Solution`.
  """
  x, target = jax.lax.stop_gradient((x, target))
  return _layout(x, where, target, relative, cfg)


def _tangents(q, x, gamma, scale, dx, dt):
  """The tangents ``(dq, dγ)`` of a block of rows (see the module docstring), linear in
  ``(dx, dt)``; written from the solution alone, so that it can itself be differentiated.

  In terms of ``u = γ (x - m)`` (dimensionless, so nothing over- or underflows whatever the
  logits' scale) and ``W = E_q[u²] = γ² V``:  dγ = -γ (γ E_q[u dx] + ∂H_t) / W  and
  dq = q (γ (dx - E_q[dx]) - u (γ E_q[u dx] + ∂H_t) / W).
  """
  on = q > 0  # the support (masked entries may hold -inf logits)
  # A one-hot row (the argmax edge of a row without ties, where γ may even be inf when 110 / gap
  # overflows) is locally constant: its tangents are those of γ = 0, exactly 0. Written out, the
  # two terms of dq would cancel only up to rounding, which γ multiplies.
  one_hot = jnp.sum(on, axis=-1) <= 1
  gamma = jnp.where(one_hot | jnp.isinf(gamma), 0.0, gamma)
  # Masked entries zeroed before any arithmetic: a -inf there would make second derivatives NaN.
  dx, x = jnp.where(on, dx, 0.0), jnp.where(on, x, 0.0)
  # Centred on the row maximum (exactly: every u is invariant to the shift). Near the argmax edge
  # the two terms of dq are large and cancel, and γ multiplies the rounding of m: rounded about
  # the maximum it is that of the values below it, not of the maximum's size (float32 gradients
  # there were 1e-2 off float64's, absolutely, for logits of a few units).
  top = jnp.max(jnp.where(on, x, -jnp.inf), axis=-1, keepdims=True)
  x = jnp.where(on, x - jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  mean = jnp.sum(q * x, axis=-1, keepdims=True)
  u = jnp.where(on, gamma[..., None] * (x - mean), 0.0)
  u2 = jnp.sum(q * u * u, axis=-1)  # W
  drive = scale * dt
  if drive.ndim == u2.ndim + 1:  # bounds: at most one of the two moves the row
    drive, scale = jnp.sum(drive, axis=-1), jnp.sum(jnp.abs(scale), axis=-1)
  moves = (scale != 0) & (u2 > 0)
  pull = (gamma * jnp.sum(q * u * dx, axis=-1) + drive) / jnp.where(moves, u2, 1.0)
  pull = jnp.where(moves, pull, 0.0)
  du = gamma[..., None] * (dx - jnp.sum(q * dx, axis=-1, keepdims=True))
  return q * (du - u * pull[..., None]), -gamma * pull


def _tiled_tangents(q, x, gamma, scale, dx, dt):
  """:func:`_tangents` over blocks of :func:`tile_rows` rows (``lax.map``), each recomputing its
  moments (``jax.checkpoint``): reverse mode then also runs block by block from the cache,
  instead of as whole-array passes with whole-array temporaries."""
  num_rows, n = x.shape
  t = tile_rows(num_rows, n, x.dtype.itemsize)
  args = (q, x, gamma, scale, dx, dt)
  if t >= num_rows:
    return _tangents(*args)
  whole = num_rows - num_rows % t
  blocks = lambda a: a[:whole].reshape(whole // t, t, *a.shape[1:])
  body = jax.checkpoint(lambda a: _tangents(*a))
  dq, dgamma = jax.tree.map(
    lambda a: a.reshape(whole, *a.shape[2:]), jax.lax.map(body, tuple(map(blocks, args)))
  )
  if whole == num_rows:
    return dq, dgamma
  dq_tail, dgamma_tail = _tangents(*(a[whole:] for a in args))
  return jnp.concatenate([dq, dq_tail]), jnp.concatenate([dgamma, dgamma_tail])


@solve_rows.defjvp
def _solve_rows_jvp(cfg, primals, tangents):
  x, where, target, relative = primals
  dx, _, dt, _ = tangents
  sol = solve_rows(x, where, target, relative, cfg)
  args = (sol.probs, x, sol.gamma, sol.target_scale, dx, dt)
  if _tiled_only(cfg.implementation):
    dq, dgamma = _tiled_tangents(*args)
  elif cfg.implementation in ("xla", "pallas"):
    dq, dgamma = _tangents(*args)
  else:
    dq, dgamma = jax.lax.platform_dependent(*args, cpu=_tiled_tangents, default=_tangents)
  # The integer outputs (with SolveConfig.info) are constant: float0 tangents.
  constant = lambda a: None if a is None else np.zeros(a.shape, jax.dtypes.float0)
  info = (constant(sol.converged), constant(sol.evaluations))
  return sol, Solution(dq, dgamma, jnp.zeros_like(sol.target_scale), *info)

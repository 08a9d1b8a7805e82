"""Entropy-normalized attention over key blocks, without the N×N score matrix.

For a query row with scaled scores ``s_j`` over its valid keys, the output is

    o = Σ_j P_j v_j,      P = softmax(γ* s),      H(P) = H_target,

and a per-row γ* is the same as scaling that query row by γ*, so once γ* is known the output is
ordinary online-softmax attention. Every statistic the solver needs can be accumulated over key
blocks at a fixed shift (the row maximum, found in the first pass):

1. one pass for the row maximum and the exponential-free :class:`RowStats` (count, ties at the
   maximum, gap below it, plain mean and variance merged with Chan's formula);
2. per solver evaluation one pass accumulating ``S_k = Σ e_j y_j^k`` (k = 0..3, ``e = exp(γ d)``,
   ``d = s - max s``, ``y = d - c``) exactly as :func:`entnorm_jax._src.moments.evaluate` does
   for a whole row, driven by the core's :func:`entnorm_jax._src.iteration.solve`;
3. a final pass accumulating ``o``, the mean ``m`` and variance ``V`` of ``d`` under P, and
   ``w = Σ_j P_j (d_j - m) v_j``.

The backward pass recomputes score blocks as flash attention does. With ``u = γ s``,
``du_j = P_j (dO·v_j - dO·o)`` is the plain softmax cotangent; the implicit derivative of γ*
(``∂γ*/∂s_j = -γ* P_j (d_j - m) / V``, ``∂γ*/∂H_t = -1 / (γ* V)``) adds a rank-one term whose
row coefficient ``dγ = Σ_j du_j d_j = dO·w`` is known before the pass, so

    ds_j = γ* (du_j - (dγ / V) P_j (d_j - m)),       dH_t = -dγ / (γ* V).

The block updates below are shared by the pure-JAX engine in this module and the Pallas kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from entnorm_jax._src.attention_common import block_valid, int_div, inverse_denominator, pad_axis
from entnorm_jax._src.backends import shift_to_max
from entnorm_jax._src.bounds import entropy_bounds, goal
from entnorm_jax._src.first_guess import start
from entnorm_jax._src.inputs import compute_dtype
from entnorm_jax._src.iteration import solve
from entnorm_jax._src.moments import Moments, RowStats, moments_from_sums


class AttentionConfig(NamedTuple):
  """Static settings of one attention call (hashable: used as a jit/custom_vjp static)."""

  is_causal: bool
  scale: float
  # Whether the target is a fraction of log(n_valid) (else nats): one flag for an exact target, a
  # (floor, ceiling) pair for entropy bounds (targets are then ``[..., 2]``).
  relative: bool | tuple[bool, bool]
  num_iters: int | None  # None: adaptive
  block_q: int
  block_k: int
  interpret: bool | None = None  # Pallas: None interprets on CPUs only (decided at lowering)
  # Context parallelism: the name of the mesh axis the keys and values are sharded over (along the
  # sequence), inside ``shard_map``; per-row sums are combined over it. None: one device.
  axis_name: str | None = None
  # Of the score and output matmuls: None is JAX's default (on GPUs, float32 products on TF32
  # tensor cores; on CPUs, full float32), ``Precision.HIGHEST`` full float32 everywhere.
  precision: jax.lax.Precision | None = None
  # Of the Pallas kernels' Triton programs (see pallas_attention.GPU_SHAPES).
  num_warps: int = 4
  num_stages: int = 2


class RowResiduals(NamedTuple):
  """Per-query-row results of the forward pass, each ``[batch, heads, q_len]``.

  Attributes:
    zmax: row maximum of the valid scores (0 for a row with no valid key).
    gamma: γ* of the row.
    denom: ``l = Σ_j exp(γ* d_j)``, the softmax denominator at the fixed shift.
    mean: ``m = E_P[d]``.
    var: ``V = Var_P[d]``.
    free: int32, which target γ* moves with (:attr:`entnorm_jax._src.bounds.Goal.which`): 1 the
      exact target or the floor, 2 the ceiling, 0 none (a row inside its bounds, a target clamped
      to an edge, a NaN target).
    log_n: log of the number of valid keys (the scale of a relative target).
  """

  zmax: jax.Array
  gamma: jax.Array
  denom: jax.Array
  mean: jax.Array
  var: jax.Array
  free: jax.Array
  log_n: jax.Array


# ----------------------------------------------------------------------------------------------
# Pass 1: row maximum and exponential-free statistics.


class StatsAcc(NamedTuple):
  """Running exponential-free statistics of the raw scores of each row."""

  top: jax.Array  # running maximum
  ties: jax.Array  # count equal to it
  below: jax.Array  # largest valid value below it
  count: jax.Array
  mean: jax.Array
  m2: jax.Array  # Σ (s - mean)^2


def stats_init(shape, dtype) -> StatsAcc:
  zeros = jnp.zeros(shape, dtype)
  return StatsAcc(zeros - jnp.inf, zeros, zeros - jnp.inf, zeros, zeros, zeros)


def stats_update(acc: StatsAcc, s: jax.Array, valid: jax.Array) -> StatsAcc:
  """Merges a ``[..., bk]`` block of scores into the running statistics (Chan's update)."""
  masked = jnp.where(valid, s, -jnp.inf)
  top = jnp.maximum(acc.top, jnp.max(masked, axis=-1))
  at_top = valid & (s == top[..., None])
  ties = jnp.where(acc.top == top, acc.ties, 0.0) + jnp.sum(at_top.astype(s.dtype), axis=-1)
  block_below = jnp.max(jnp.where(valid & ~at_top, s, -jnp.inf), axis=-1)
  below = jnp.maximum(
    jnp.maximum(acc.below, block_below), jnp.where(acc.top < top, acc.top, -jnp.inf)
  )
  n_b = jnp.sum(valid.astype(s.dtype), axis=-1)
  mean_b = jnp.sum(jnp.where(valid, s, 0.0), axis=-1) / jnp.maximum(n_b, 1.0)
  m2_b = jnp.sum(jnp.where(valid, jnp.square(s - mean_b[..., None]), 0.0), axis=-1)
  count = acc.count + n_b
  frac = n_b / jnp.maximum(count, 1.0)
  delta = mean_b - acc.mean
  mean = acc.mean + delta * frac
  m2 = acc.m2 + m2_b + delta * delta * acc.count * frac
  return StatsAcc(top, ties, below, count, mean, m2)


def stats_finalize(acc: StatsAcc) -> tuple[jax.Array, RowStats]:
  """Row maxima and the core's :class:`RowStats` of ``d = s - max s`` (as ``row_stats``)."""
  has = acc.count > 0
  zmax = jnp.where(has, acc.top, 0.0)
  gap = jnp.where(has & jnp.isfinite(acc.below), acc.top - acc.below, jnp.inf)
  mean = jnp.where(has, acc.mean - zmax, 0.0)
  var = acc.m2 / jnp.maximum(acc.count, 1.0)
  return zmax, RowStats(acc.count, acc.ties, gap, mean, var)


# ----------------------------------------------------------------------------------------------
# Solver passes: the sums S_0..S_3 of moments.evaluate, accumulated over key blocks.


class MomentAcc(NamedTuple):
  s0: jax.Array
  s1: jax.Array
  s2: jax.Array
  s3: jax.Array


def moments_init(shape, dtype) -> MomentAcc:
  zeros = jnp.zeros(shape, dtype)
  return MomentAcc(zeros, zeros, zeros, zeros)


def _weights(s, valid, zmax, gamma, center):
  """``(e, y)`` of a block of scores: ``e = exp(γ d)`` and ``y = d - c`` (0 where not valid), with
  ``d = s - max`` exactly 0 at (or above, if a recomputed block rounds differently from pass 1)
  the maximum: the off-argmax mass is S_0 minus the number of ties."""
  d = shift_to_max(s, zmax[..., None])
  e = jnp.where(valid, jnp.exp(gamma[..., None] * d), 0.0)
  return e, jnp.where(valid, d - center[..., None], 0.0)


def moments_update(acc: MomentAcc, s, valid, zmax, gamma, center) -> MomentAcc:
  """Adds a block's ``S_k = Σ e y^k`` (``e = exp(γ d)``, ``y = d - c``) to the running sums."""
  e, y = _weights(s, valid, zmax, gamma, center)
  ey = e * y
  return MomentAcc(
    acc.s0 + jnp.sum(e, axis=-1),
    acc.s1 + jnp.sum(ey, axis=-1),
    acc.s2 + jnp.sum(ey * y, axis=-1),
    acc.s3 + jnp.sum(ey * y * y, axis=-1),
  )


def moments_finalize(acc: MomentAcc, gamma, center, n_ties) -> Moments:
  """:class:`Moments` from accumulated sums (the core's closing formulas)."""
  return moments_from_sums(acc.s0, acc.s1, acc.s2, acc.s3, gamma, center, n_ties)


def solve_attention_rows(stats_pass: Callable, moments_pass: Callable, target, relative, num_iters):
  """The core's solve (:func:`entnorm_jax._src.iteration.solve`) driven by blockwise passes.

  Args:
    stats_pass: ``() -> (zmax, RowStats)``.
    moments_pass: ``(gamma, center, zmax, n_ties) -> Moments`` (all four sums: every evaluation
      here is a full one, since a sweep over key blocks costs the same either way).
    target: per-row target (nats, or a fraction of log n with ``relative``), or ``[..., 2]``
      (floor, ceiling) entropy bounds: then one more moments pass at γ = 1 gives each row's own
      entropy, and rows inside their bounds keep γ = 1 (plain softmax attention).
    relative: read ``target`` as a fraction of log(n_valid): a bool, or a (floor, ceiling) pair.
    num_iters: ``None`` (adaptive) or the number of Halley-type steps.

  Returns:
    ``(zmax, gamma, center, free, log_n)`` per row; γ is polished (one Newton step past its last
    sweep, which the output's sweep then uses: see ``iteration._polish``); ``center`` is the mean
    at the last sweep, a good centring point for the final pass; ``free`` as
    :attr:`RowResiduals.free`.
  """
  zmax, stats = stats_pass()
  target = jax.lax.stop_gradient(target)
  bounds = entropy_bounds(stats, zmax.dtype)
  relative = jnp.asarray(relative)
  bounded = relative.ndim == 1
  natural = held = None
  if bounded:
    one = jnp.ones_like(zmax)
    natural = moments_pass(one, stats.mean, zmax, stats.n_ties)
  aim = goal(target, relative, bounds, None if natural is None else natural.entropy)
  if bounded:
    held = (aim.held, 1.0, natural.mean)
  every = jnp.ones(zmax.shape, bool)

  def evaluate(gamma, center, mode, aux):
    return moments_pass(gamma, center, zmax, stats.n_ties), every, aux

  first = start(stats, bounds, aim.nats, *(held or ()))
  gamma, center, _, _ = solve(
    bounds, *first, evaluate, None, num_iters=num_iters, every_full=True, polish=True
  )
  center = jnp.where(jnp.isfinite(center), center, 0.0)
  return zmax, gamma, center, aim.which, bounds.log_n


# ----------------------------------------------------------------------------------------------
# Final pass: online-softmax attention at the solved γ, plus the moments the backward pass needs.


class OutAcc(NamedTuple):
  denom: jax.Array
  s1: jax.Array
  s2: jax.Array
  out: jax.Array  # Σ p v
  cov: jax.Array  # Σ p y v


def out_init(shape, dim, dtype) -> OutAcc:
  zeros = jnp.zeros(shape, dtype)
  vec = jnp.zeros((*shape, dim), dtype)
  return OutAcc(zeros, zeros, zeros, vec, vec)


def out_update(acc: OutAcc, s, valid, zmax, gamma, center, pv: Callable) -> OutAcc:
  """Adds a block to the output sums; ``pv(weights)`` contracts ``[..., bq, bk]`` weights with
  the block's values into ``[..., bq, dim]``."""
  p, y = _weights(s, valid, zmax, gamma, center)
  py = p * y
  return OutAcc(
    acc.denom + jnp.sum(p, axis=-1),
    acc.s1 + jnp.sum(py, axis=-1),
    acc.s2 + jnp.sum(py * y, axis=-1),
    acc.out + pv(p),
    acc.cov + pv(py),
  )


def out_finalize(acc: OutAcc, center):
  """``(o, w, mean, var)``: output, ``w = Σ P (d - m) v``, and the mean/variance of d under P."""
  inv = inverse_denominator(acc.denom)
  a1 = acc.s1 * inv
  out = acc.out * inv[..., None]
  cov = acc.cov * inv[..., None] - a1[..., None] * out
  var = jnp.maximum(acc.s2 * inv - a1 * a1, 0.0)
  return out, cov, jnp.where(acc.denom > 0, center + a1, 0.0), var


def grad_block(s, valid, zmax, gamma, inv_denom, mean, coef, delta, dp):
  """``(ds, P)`` of a block: ``ds = γ (du - coef P (d - m))``, ``du = P (dp - delta)``.

  ``dp = dO·v_j`` of the block, ``delta = dO·o`` and ``coef = dγ / V`` per row.
  """
  d = shift_to_max(s, zmax[..., None])
  p = jnp.where(valid, jnp.exp(gamma[..., None] * d), 0.0) * inv_denom[..., None]
  du = p * (dp - delta[..., None])
  ds = gamma[..., None] * (du - coef[..., None] * p * (d - mean[..., None]))
  return ds, p


# ----------------------------------------------------------------------------------------------
# The custom_vjp shared by the blockwise and Pallas engines.


class Engine(NamedTuple):
  """``forward(cfg, q, k, v, target, q_ok, k_ok, mask) -> (o, w, Rows)`` (``o``, ``w`` as
  ``[batch, q_len, heads, dim]`` in the compute dtype, RowResiduals ``[batch, heads, q_len]``) and
  ``backward(cfg, q, k, v, q_ok, k_ok, mask, rows, coef, delta, do) -> (dq, dk, dv)``."""

  forward: Callable
  backward: Callable


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def attention_vjp(engine: Engine, cfg: AttentionConfig, q, k, v, target, q_ok, k_ok, mask):
  """Entropy-normalized attention with a flash-style backward pass (see the module docstring)."""
  out, _, _ = engine.forward(cfg, q, k, v, target, q_ok, k_ok, mask)
  return out.astype(q.dtype)


def _attention_fwd(engine, cfg, q, k, v, target, q_ok, k_ok, mask):
  out, cov, rows = engine.forward(cfg, q, k, v, target, q_ok, k_ok, mask)
  return out.astype(q.dtype), (q, k, v, target, q_ok, k_ok, mask, out, cov, rows)


def _attention_bwd(engine, cfg, res, d_out):
  q, k, v, target, q_ok, k_ok, mask, out, cov, rows = res
  d_out = d_out.astype(out.dtype)
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out)
  d_gamma = jnp.einsum("bqhd,bqhd->bhq", d_out, cov)
  denom = rows.gamma * rows.var
  free = (rows.free != 0) & (denom > 0)
  coef = jnp.where(free, d_gamma / jnp.where(free, rows.var, 1.0), 0.0)
  d_nats = jnp.where(free, -d_gamma / jnp.where(free, denom, 1.0), 0.0)
  if isinstance(cfg.relative, tuple):  # bounds: the cotangent goes to the bound the row follows
    per_bound = zip((1, 2), cfg.relative, strict=True)
    d_target = jnp.stack(
      [
        jnp.where(rows.free == k, d_nats, 0.0) * (rows.log_n if unit else 1.0)
        for k, unit in per_bound
      ],
      axis=-1,
    )
  else:
    d_target = d_nats * rows.log_n if cfg.relative else d_nats
  dq, dk, dv = engine.backward(cfg, q, k, v, q_ok, k_ok, mask, rows, coef, delta, d_out)
  return (
    dq.astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    d_target.astype(target.dtype),
    None,
    None,
    None,
  )


attention_vjp.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------
# The pure-JAX engine: lax.map over query blocks, fori_loop over key blocks.


def num_key_blocks(cfg: AttentionConfig, q_start, n_k: int, k_offset=0):
  """Key blocks a query block starting at ``q_start`` sees (a traced count when causal), for keys
  whose positions start at ``k_offset`` (their shard's place in the sequence)."""
  if not cfg.is_causal:
    return n_k
  seen = int_div(q_start + cfg.block_q + cfg.block_k - 1 - k_offset, cfg.block_k)
  return jnp.clip(seen, 0, n_k)


def key_offset(cfg: AttentionConfig, kv_len: int):
  """Position of this device's first key in the sequence (0 without context parallelism)."""
  return 0 if cfg.axis_name is None else jax.lax.axis_index(cfg.axis_name) * kv_len


def combine(cfg: AttentionConfig, acc):
  """Sums of a pass added up over the context-parallel axis (unchanged on one device)."""
  return acc if cfg.axis_name is None else jax.lax.psum(acc, cfg.axis_name)


def combine_stats(cfg: AttentionConfig, acc: StatsAcc) -> StatsAcc:
  """Running statistics of every key shard merged (Chan's update across devices)."""
  if cfg.axis_name is None:
    return acc
  name = cfg.axis_name
  top = jax.lax.pmax(acc.top, name)
  ties = jax.lax.psum(jnp.where(acc.top == top, acc.ties, 0.0), name)
  below = jax.lax.pmax(jnp.maximum(acc.below, jnp.where(acc.top < top, acc.top, -jnp.inf)), name)
  count = jax.lax.psum(acc.count, name)
  mean = jax.lax.psum(acc.count * acc.mean, name) / jnp.maximum(count, 1.0)
  m2 = jax.lax.psum(acc.m2 + acc.count * jnp.square(acc.mean - mean), name)
  return StatsAcc(top, ties, below, count, mean, m2)


class _Padded(NamedTuple):
  q: jax.Array  # [B, nq*bq, Hk, G, D]
  k: jax.Array  # [B, nk*bk, Hk, D]
  v: jax.Array
  q_ok: jax.Array  # [B, nq*bq]
  k_ok: jax.Array  # [B, nk*bk]
  mask: jax.Array | None  # [Bm, Hk|1, G|1, nq*bq|1, nk*bk|1]


def _pad_inputs(cfg: AttentionConfig, q, k, v, q_ok, k_ok, mask) -> _Padded:
  batch, q_len, heads, dim = q.shape
  kv_heads = k.shape[2]
  tq = -(-q_len // cfg.block_q) * cfg.block_q
  tk = -(-k.shape[1] // cfg.block_k) * cfg.block_k
  dtype = compute_dtype(q.dtype)
  q = pad_axis(q.astype(dtype), 1, tq).reshape(batch, tq, kv_heads, heads // kv_heads, dim)
  k = pad_axis(k.astype(dtype), 1, tk)
  v = pad_axis(v.astype(dtype), 1, tk)
  if mask is not None:
    m_heads = mask.shape[1]
    groups = (kv_heads, heads // kv_heads) if m_heads == heads else (1, 1)
    mask = pad_axis(pad_axis(mask, 2, tq, False), 3, tk, False)
    mask = mask.reshape(mask.shape[0], *groups, *mask.shape[2:])
  return _Padded(q, k, v, pad_axis(q_ok, 1, tq, False), pad_axis(k_ok, 1, tk, False), mask)


def _query_block(cfg: AttentionConfig, x: _Padded, start, k_offset=0):
  """Closures over one query block: its scores per key block, and its slices (keys at positions
  from ``k_offset``)."""
  bq, bk = cfg.block_q, cfg.block_k
  qb = jax.lax.dynamic_slice_in_dim(x.q, start, bq, axis=1)
  q_ok = jax.lax.dynamic_slice_in_dim(x.q_ok, start, bq, axis=1)[:, None, None, :]
  q_pos = start + jnp.arange(bq)
  mask = x.mask
  if mask is not None and mask.shape[3] > 1:
    mask = jax.lax.dynamic_slice_in_dim(mask, start, bq, axis=3)
  prec = cfg.precision

  def scores(j):
    k_start = j * bk
    kb = jax.lax.dynamic_slice_in_dim(x.k, k_start, bk, axis=1)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb, precision=prec) * cfg.scale
    k_ok = jax.lax.dynamic_slice_in_dim(x.k_ok, k_start, bk, axis=1)[:, None, None, :]
    m = mask
    if m is not None and m.shape[4] > 1:
      m = jax.lax.dynamic_slice_in_dim(m, k_start, bk, axis=4)
    k_pos = k_offset + k_start + jnp.arange(bk)
    return s, block_valid(q_pos, k_pos, q_ok, k_ok, m, cfg.is_causal), kb

  return qb, scores


def _rows_to_bhq(x, batch, heads):
  """``[nq, B, Hk, G, bq]`` stacked blocks to ``[B, H, nq*bq]``."""
  return jnp.moveaxis(x, 0, 3).reshape(batch, heads, -1)


def _vec_to_bqhd(x, batch, heads):
  """``[nq, B, Hk, G, bq, D]`` stacked blocks to ``[B, nq*bq, H, D]``."""
  x = jnp.moveaxis(x, 0, 3)  # B, Hk, G, nq, bq, D
  x = x.reshape(batch, heads, -1, x.shape[-1])
  return jnp.swapaxes(x, 1, 2)


def _blockwise_forward(cfg: AttentionConfig, q, k, v, target, q_ok, k_ok, mask):
  batch, q_len, heads, dim = q.shape
  x = _pad_inputs(cfg, q, k, v, q_ok, k_ok, mask)
  kv_heads, groups = x.q.shape[2], x.q.shape[3]
  n_q, n_k = x.q.shape[1] // cfg.block_q, x.k.shape[1] // cfg.block_k
  dtype = x.q.dtype
  target = pad_axis(jnp.asarray(target, dtype), 2, n_q * cfg.block_q)
  target = target.reshape(batch, kv_heads, groups, *target.shape[2:])  # [..., 2] for bounds
  row_shape = (batch, kv_heads, groups, cfg.block_q)
  prec = cfg.precision
  offset = key_offset(cfg, k.shape[1])

  def one_block(i):
    start = i * cfg.block_q
    _, scores = _query_block(cfg, x, start, offset)
    hi = num_key_blocks(cfg, start, n_k, offset)
    tgt = jax.lax.dynamic_slice_in_dim(target, start, cfg.block_q, axis=3)

    def stats_pass():
      def body(j, acc):
        s, valid, _ = scores(j)
        return stats_update(acc, s, valid)

      acc = jax.lax.fori_loop(0, hi, body, stats_init(row_shape, dtype))
      return stats_finalize(combine_stats(cfg, acc))

    def moments_pass(gamma, center, zmax, n_ties):
      def body(j, acc):
        s, valid, _ = scores(j)
        return moments_update(acc, s, valid, zmax, gamma, center)

      acc = jax.lax.fori_loop(0, hi, body, moments_init(row_shape, dtype))
      return moments_finalize(combine(cfg, acc), gamma, center, n_ties)

    zmax, gamma, center, free, log_n = solve_attention_rows(
      stats_pass, moments_pass, tgt, cfg.relative, cfg.num_iters
    )

    def out_body(j, acc):
      s, valid, _ = scores(j)
      vb = jax.lax.dynamic_slice_in_dim(x.v, j * cfg.block_k, cfg.block_k, axis=1)
      pv = lambda w: jnp.einsum("bhgqk,bkhd->bhgqd", w, vb, precision=prec)
      return out_update(acc, s, valid, zmax, gamma, center, pv)

    acc = combine(cfg, jax.lax.fori_loop(0, hi, out_body, out_init(row_shape, dim, dtype)))
    out, cov, mean, var = out_finalize(acc, center)
    return (
      out,
      cov,
      RowResiduals(
        zmax=zmax, gamma=gamma, denom=acc.denom, mean=mean, var=var, free=free, log_n=log_n
      ),
    )

  out, cov, rows = jax.lax.map(one_block, jnp.arange(n_q))
  rows = RowResiduals(*(_rows_to_bhq(r, batch, heads)[:, :, :q_len] for r in rows))
  out = _vec_to_bqhd(out, batch, heads)[:, :q_len]
  cov = _vec_to_bqhd(cov, batch, heads)[:, :q_len]
  return out, cov, rows


def _blockwise_backward(
  cfg: AttentionConfig, q, k, v, q_ok, k_ok, mask, rows: RowResiduals, coef, delta, d_out
):
  batch, q_len, heads, dim = q.shape
  x = _pad_inputs(cfg, q, k, v, q_ok, k_ok, mask)
  kv_heads, groups = x.q.shape[2], x.q.shape[3]
  n_q, n_k = x.q.shape[1] // cfg.block_q, x.k.shape[1] // cfg.block_k
  tq, bq, bk = n_q * cfg.block_q, cfg.block_q, cfg.block_k
  dtype = x.q.dtype
  prec = cfg.precision
  d_out = pad_axis(d_out.astype(dtype), 1, tq).reshape(x.q.shape)
  inv_denom = inverse_denominator(rows.denom)
  per_row = (rows.zmax, rows.gamma, inv_denom, rows.mean, coef, delta)
  per_row = [pad_axis(r.astype(dtype), 2, tq).reshape(batch, kv_heads, groups, tq) for r in per_row]
  offset = key_offset(cfg, k.shape[1])

  def one_block(carry, i):
    start = i * bq
    qb, scores = _query_block(cfg, x, start, offset)
    dob = jax.lax.dynamic_slice_in_dim(d_out, start, bq, axis=1)
    row = [jax.lax.dynamic_slice_in_dim(r, start, bq, axis=3) for r in per_row]

    def body(j, state):
      dq, dk, dv = state
      s, valid, kb = scores(j)
      vb = jax.lax.dynamic_slice_in_dim(x.v, j * bk, bk, axis=1)
      dp = jnp.einsum("bqhgd,bkhd->bhgqk", dob, vb, precision=prec)
      ds, p = grad_block(s, valid, *row, dp)
      dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds, kb, precision=prec) * cfg.scale
      dk_j = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qb, precision=prec) * cfg.scale
      dv_j = jnp.einsum("bhgqk,bqhgd->bkhd", p, dob, precision=prec)
      add = lambda acc, upd: jax.lax.dynamic_update_slice_in_dim(
        acc, jax.lax.dynamic_slice_in_dim(acc, j * bk, bk, axis=1) + upd, j * bk, axis=1
      )
      return dq, add(dk, dk_j), add(dv, dv_j)

    hi = num_key_blocks(cfg, start, n_k, offset)
    dq, dk, dv = jax.lax.fori_loop(0, hi, body, (jnp.zeros_like(qb), *carry))
    return (dk, dv), dq

  (dk, dv), dq = jax.lax.scan(
    one_block, (jnp.zeros_like(x.k), jnp.zeros_like(x.v)), jnp.arange(n_q)
  )
  dq = jnp.moveaxis(dq, 0, 1).reshape(batch, tq, heads, dim)[:, :q_len]
  kv_len = k.shape[1]
  return combine(cfg, dq), dk[:, :kv_len], dv[:, :kv_len]


BLOCKWISE = Engine(_blockwise_forward, _blockwise_backward)

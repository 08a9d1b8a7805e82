"""Entropy-normalized attention as ``jax.experimental.pallas`` kernels.

The algorithm is the blockwise one of :mod:`entnorm_jax._src.blockwise_attention` (same block
updates, same solver driver); here every pass over the keys is a kernel whose grid runs over
``(batch, heads, query blocks)`` and whose body loops over key blocks, flash-attention style:

* ``stats``: row maximum and the exponential-free :class:`RowStats`;
* ``moments`` (once per solver iteration): the sums ``S_0..S_3`` at the current γ; the
  per-row step runs between kernels in plain JAX (the core's ``iteration.solve``);
* ``output``: online-softmax attention at the solved γ, plus ``w``, mean and variance for the
  backward pass;
* backward: a ``dq`` kernel (grid over query blocks) and a ``dk, dv`` kernel (grid over key
  blocks, per query head, summed over the group afterwards).

Written for the Triton lowering on GPUs (power-of-two blocks of at least 16, the head dimension
padded to a power of two); ``interpret=True`` runs the same kernels on any backend.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from entnorm_jax._src.attention_common import block_valid, int_div, inverse_denominator, pad_axis
from entnorm_jax._src.blockwise_attention import (
  AttentionConfig,
  Engine,
  MomentAcc,
  RowResiduals,
  grad_block,
  moments_finalize,
  moments_init,
  moments_update,
  num_key_blocks,
  out_finalize,
  out_init,
  out_update,
  solve_attention_rows,
  stats_finalize,
  stats_init,
  stats_update,
)
from entnorm_jax._src.inputs import compute_dtype
from entnorm_jax._src.moments import RowStats

_MIN_BLOCK = 16  # the smallest tile Triton's dot accepts


class KernelShape(NamedTuple):
  """Default blocks of the Pallas kernels and the Triton program's warps and pipeline stages."""

  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


# (bytes per input entry, full float32 products, padded head dim) -> the kernels' shape: the
# largest blocks (then the fewest registers) whose five kernels (stats, moments, output, dq, dkv)
# all compile without spilling for sm_80 and sm_90, measured by ``python -m benchmarks.kernels
# --sweep`` (``benchmarks/results/kernels_sweep.md``; most registers per thread over the kernels
# beside each entry). 64-row query blocks let sm_90 use ``wgmma``; smaller ones use ``mma``.
# Full-precision float32 (``Precision.HIGHEST``: IEEE ``dot``s, no tensor cores) spills in every
# shape tried, down to 16x16 blocks at head dim 64 (888 B per thread in dkv): it has no entry,
# and such calls run the blockwise engine.
GPU_SHAPES: dict[tuple[int, bool, int], KernelShape] = {
  (2, False, 64): KernelShape(64, 64, 8, 2),  # 255 registers; 4 warps: 88 B of spill (dkv)
  (2, False, 128): KernelShape(64, 32, 8, 2),  # 254; 64x64 at 8 warps: 428 B (dkv)
  (2, False, 256): KernelShape(32, 32, 8, 2),  # 242; 64x16 at 8 warps: 176 B (output, dkv)
  (4, False, 64): KernelShape(64, 32, 8, 2),  # 248; 64x64 at 8 warps: 632 B (dkv, dq, output)
  (4, False, 128): KernelShape(64, 16, 8, 2),  # 255; 64x32 at 8 warps: 524 B (dkv, dq, output)
  (4, False, 256): KernelShape(16, 16, 4, 2),  # 253; 32x32 at 8 warps: 24 B (output)
}
_MIN_DIM = 64  # smaller head dims use the entries of 64 (fewer registers)


def gpu_shape(dtype, dim: int, precision) -> KernelShape | None:
  """The :data:`GPU_SHAPES` entry for inputs of ``dtype`` (float64 uses float32's: unmeasured),
  head dim ``dim`` and ``precision``; ``None`` where no shape of the kernels compiles without
  spilling (full-precision float32, head dims above 256)."""
  size = min(jnp.dtype(dtype).itemsize, 4)
  highest = precision == jax.lax.Precision.HIGHEST and size == 4
  return GPU_SHAPES.get((size, highest, max(_MIN_DIM, pl.next_power_of_2(dim))))


def pallas_block_size(size: int, length: int, name: str) -> int:
  """A power-of-two block of at least 16, no larger than the padded sequence needs."""
  if size < _MIN_BLOCK or size & (size - 1):
    raise ValueError(f"{name} for the Pallas kernels must be a power of two >= 16, got {size}")
  return min(size, max(_MIN_BLOCK, pl.next_power_of_2(length)))


class _Layout:
  """Padded inputs and the BlockSpecs that slice them."""

  def __init__(self, cfg: AttentionConfig, q, k, v, q_ok, k_ok, mask):
    batch, q_len, heads, dim = q.shape
    self.heads, self.groups = heads, heads // k.shape[2]
    self.dim = max(_MIN_BLOCK, pl.next_power_of_2(dim))
    self.tq = -(-q_len // cfg.block_q) * cfg.block_q
    self.tk = -(-k.shape[1] // cfg.block_k) * cfg.block_k
    self.grid_q = (batch, heads, self.tq // cfg.block_q)
    self.grid_k = (batch, heads, self.tk // cfg.block_k)
    self.cfg = cfg
    self.dtype = compute_dtype(q.dtype)
    self.q = pad_axis(pad_axis(q, 3, self.dim), 1, self.tq)
    self.k = pad_axis(pad_axis(k, 3, self.dim), 1, self.tk)
    self.v = pad_axis(pad_axis(v, 3, self.dim), 1, self.tk)
    self.q_ok = pad_axis(q_ok, 1, self.tq, False).astype(jnp.int32)
    self.k_ok = pad_axis(k_ok, 1, self.tk, False).astype(jnp.int32)
    self.mask = None
    if mask is not None:
      self.mask = pad_axis(pad_axis(mask, 2, self.tq, False), 3, self.tk, False).astype(jnp.int8)

  # BlockSpecs on the query-block grid (b, h, i).
  def q_block(self):
    return pl.BlockSpec((None, self.cfg.block_q, None, self.dim), lambda b, h, i: (b, i, h, 0))

  def kv_full(self):
    g = self.groups
    return pl.BlockSpec((None, self.tk, None, self.dim), lambda b, h, i: (b, 0, int_div(h, g), 0))

  def row_block(self):
    return pl.BlockSpec((None, None, self.cfg.block_q), lambda b, h, i: (b, h, i))

  def mask_spec(self, by_key: bool):
    """The mask, blocked along queries (grid over query blocks) or keys (grid over key blocks)."""
    bm, hm, tqm, tkm = self.mask.shape
    bq = self.cfg.block_q if tqm > 1 else 1
    bk = self.cfg.block_k if tkm > 1 else 1
    if by_key:
      shape = (None, None, tqm, bk)
      index = lambda b, h, j: (b if bm > 1 else 0, h if hm > 1 else 0, 0, j if tkm > 1 else 0)
    else:
      shape = (None, None, bq, tkm)
      index = lambda b, h, i: (b if bm > 1 else 0, h if hm > 1 else 0, i if tqm > 1 else 0, 0)
    return pl.BlockSpec(shape, index)

  def rows(self, n):
    return [jax.ShapeDtypeStruct(self.grid_q[:2] + (self.tq,), self.dtype)] * n

  def call(self, kernel, grid, in_specs, out_specs, out_shape, *args):
    """The kernel as a ``pallas_call``: compiled by Triton (with the configured warps and stages)
    when lowered for CUDA or ROCm, interpreted when asked (``cfg.interpret``) or, by default, on
    CPUs. The choice is made per platform when the computation is lowered, so that exporting for
    a GPU from a CPU gets the compiled kernels."""

    def build(interpret: bool, params):
      return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=params,
      )

    if self.cfg.interpret:
      return build(True, None)(*args)
    params = plgpu.CompilerParams(num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)
    triton = build(False, params)
    branches = dict(cuda=triton, rocm=triton, default=build(False, None))
    if self.cfg.interpret is None:
      branches["cpu"] = build(True, None)
    return jax.lax.platform_dependent(*args, **branches)


def _mm(a, b, contract, like, prec):
  """``dot_general`` of 2-D tiles in ``like``'s dtype, accumulated in float32 (or float64)."""
  out = compute_dtype(like.dtype)
  dims = ((contract[0],), (contract[1],)), ((), ())
  return jax.lax.dot_general(
    a.astype(like.dtype), b.astype(like.dtype), dims, precision=prec, preferred_element_type=out
  )


def _key_scores(cfg: AttentionConfig, q, k_ref, k_ok_ref, mask_ref, q_ok, q_pos, j, dtype):
  """Scores ``[bq, bk]`` of a query tile against key block j, its validity and the key tile."""
  bk = cfg.block_k
  sl = pl.ds(j * bk, bk)
  k = k_ref[sl, :]
  s = _mm(q, k, (1, 1), q, cfg.precision).astype(dtype) * cfg.scale
  mask = None
  if mask_ref is not None:
    mask = (mask_ref[:, sl] if mask_ref.shape[1] > 1 else mask_ref[...]) != 0
  k_pos = j * bk + jnp.arange(bk)
  return s, block_valid(q_pos, k_pos, q_ok, k_ok_ref[sl] != 0, mask, cfg.is_causal), sl


def _query_tile(cfg: AttentionConfig, q_ref, q_ok_ref):
  start = pl.program_id(2) * cfg.block_q
  return q_ref[...], q_ok_ref[...] != 0, start + jnp.arange(cfg.block_q), start


def _split(refs, n_in, has_mask):
  mask_ref = refs[n_in] if has_mask else None
  return refs[:n_in], mask_ref, refs[n_in + has_mask :]


def _stats_kernel(cfg, n_k, dtype, has_mask, *refs):
  (q_ref, k_ref, q_ok_ref, k_ok_ref), mask_ref, outs = _split(refs, 4, has_mask)
  q, q_ok, q_pos, start = _query_tile(cfg, q_ref, q_ok_ref)

  def body(j, acc):
    s, valid, _ = _key_scores(cfg, q, k_ref, k_ok_ref, mask_ref, q_ok, q_pos, j, dtype)
    return stats_update(acc, s, valid)

  acc = jax.lax.fori_loop(0, num_key_blocks(cfg, start, n_k), body, stats_init(q_pos.shape, dtype))
  zmax, stats = stats_finalize(acc)
  for ref, x in zip(outs, (zmax, *stats), strict=True):
    ref[...] = x


def _moments_kernel(cfg, n_k, dtype, has_mask, *refs):
  ins, mask_ref, outs = _split(refs, 7, has_mask)
  q_ref, k_ref, q_ok_ref, k_ok_ref, zmax_ref, gamma_ref, center_ref = ins
  q, q_ok, q_pos, start = _query_tile(cfg, q_ref, q_ok_ref)
  zmax, gamma, center = zmax_ref[...], gamma_ref[...], center_ref[...]

  def body(j, acc):
    s, valid, _ = _key_scores(cfg, q, k_ref, k_ok_ref, mask_ref, q_ok, q_pos, j, dtype)
    return moments_update(acc, s, valid, zmax, gamma, center)

  acc = jax.lax.fori_loop(
    0, num_key_blocks(cfg, start, n_k), body, moments_init(q_pos.shape, dtype)
  )
  for ref, x in zip(outs, acc, strict=True):
    ref[...] = x


def _output_kernel(cfg, n_k, dtype, has_mask, *refs):
  ins, mask_ref, outs = _split(refs, 8, has_mask)
  q_ref, k_ref, v_ref, q_ok_ref, k_ok_ref, zmax_ref, gamma_ref, center_ref = ins
  q, q_ok, q_pos, start = _query_tile(cfg, q_ref, q_ok_ref)
  zmax, gamma, center = zmax_ref[...], gamma_ref[...], center_ref[...]
  prec = cfg.precision

  def body(j, acc):
    s, valid, sl = _key_scores(cfg, q, k_ref, k_ok_ref, mask_ref, q_ok, q_pos, j, dtype)
    v = v_ref[sl, :]
    return out_update(acc, s, valid, zmax, gamma, center, lambda w: _mm(w, v, (1, 0), v, prec))

  init = out_init(q_pos.shape, q.shape[-1], dtype)
  acc = jax.lax.fori_loop(0, num_key_blocks(cfg, start, n_k), body, init)
  out, cov, mean, var = out_finalize(acc, center)
  for ref, x in zip(outs, (out, cov, acc.denom, mean, var), strict=True):
    ref[...] = x.astype(ref.dtype)


def _pallas_forward(cfg: AttentionConfig, q, k, v, target, q_ok, k_ok, mask):
  lay = _Layout(cfg, q, k, v, q_ok, k_ok, mask)
  n_k, dtype, has_mask = lay.tk // cfg.block_k, lay.dtype, mask is not None
  extra_in = [lay.mask_spec(by_key=False)] if has_mask else []
  extra = [lay.mask] if has_mask else []
  base_specs = [lay.q_block(), lay.kv_full()]
  ok_specs = [
    pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
    pl.BlockSpec((None, lay.tk), lambda b, h, i: (b, 0)),
  ]
  statics = (cfg, n_k, dtype, has_mask)

  def stats_pass():
    outs = lay.call(
        functools.partial(_stats_kernel, *statics),
        lay.grid_q,
        base_specs + ok_specs + extra_in,
        [lay.row_block()] * (1 + len(RowStats._fields)),
        lay.rows(1 + len(RowStats._fields)),
        lay.q, lay.k, lay.q_ok, lay.k_ok, *extra,
    )  # fmt: skip
    return outs[0], RowStats(*outs[1:])

  def moments_pass(gamma, center, zmax, n_ties):
    sums = lay.call(
        functools.partial(_moments_kernel, *statics),
        lay.grid_q,
        base_specs + ok_specs + [lay.row_block()] * 3 + extra_in,
        [lay.row_block()] * len(MomentAcc._fields),
        lay.rows(len(MomentAcc._fields)),
        lay.q, lay.k, lay.q_ok, lay.k_ok, zmax, gamma, center, *extra,
    )  # fmt: skip
    return moments_finalize(MomentAcc(*sums), gamma, center, n_ties)

  target = pad_axis(jnp.asarray(target, dtype), 2, lay.tq)
  zmax, gamma, center, free, log_n = solve_attention_rows(
    stats_pass, moments_pass, target, cfg.relative, cfg.num_iters
  )
  vec = jax.ShapeDtypeStruct(lay.q.shape, dtype)
  out, cov, denom, mean, var = lay.call(
      functools.partial(_output_kernel, *statics),
      lay.grid_q,
      base_specs + [lay.kv_full()] + ok_specs + [lay.row_block()] * 3 + extra_in,
      [lay.q_block(), lay.q_block()] + [lay.row_block()] * 3,
      [vec, vec] + lay.rows(3),
      lay.q, lay.k, lay.v, lay.q_ok, lay.k_ok, zmax, gamma, center, *extra,
  )  # fmt: skip
  q_len, dim = q.shape[1], q.shape[3]
  rows = RowResiduals(
    zmax=zmax, gamma=gamma, denom=denom, mean=mean, var=var, free=free, log_n=log_n
  )
  rows = RowResiduals(*(r[:, :, :q_len] for r in rows))
  return out[:, :q_len, :, :dim], cov[:, :q_len, :, :dim], rows


def _dq_kernel(cfg, n_k, dtype, has_mask, *refs):
  ins, mask_ref, (dq_ref,) = _split(refs, 12, has_mask)
  q_ref, k_ref, v_ref, do_ref, q_ok_ref, k_ok_ref, *row_refs = ins
  q, q_ok, q_pos, start = _query_tile(cfg, q_ref, q_ok_ref)
  do = do_ref[...]
  row = [r[...] for r in row_refs]
  prec = cfg.precision

  def body(j, dq):
    s, valid, sl = _key_scores(cfg, q, k_ref, k_ok_ref, mask_ref, q_ok, q_pos, j, dtype)
    k, v = k_ref[sl, :], v_ref[sl, :]
    ds, _ = grad_block(s, valid, *row, _mm(do, v, (1, 1), v, prec).astype(dtype))
    return dq + _mm(ds, k, (1, 0), k, prec).astype(dtype)

  dq = jax.lax.fori_loop(0, num_key_blocks(cfg, start, n_k), body, jnp.zeros(q.shape, dtype))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(cfg, n_q, dtype, has_mask, *refs):
  ins, mask_ref, (dk_ref, dv_ref) = _split(refs, 12, has_mask)
  q_ref, k_ref, v_ref, do_ref, q_ok_ref, k_ok_ref, *row_refs = ins
  bq, bk = cfg.block_q, cfg.block_k
  k_start = pl.program_id(2) * bk
  k, v, k_ok = k_ref[...], v_ref[...], k_ok_ref[...] != 0
  k_pos = k_start + jnp.arange(bk)
  prec = cfg.precision

  def body(i, carry):
    dk, dv = carry
    sl = pl.ds(i * bq, bq)
    q, do = q_ref[sl, :], do_ref[sl, :]
    s = _mm(q, k, (1, 1), q, prec).astype(dtype) * cfg.scale
    mask = None
    if mask_ref is not None:
      mask = (mask_ref[sl, :] if mask_ref.shape[0] > 1 else mask_ref[...]) != 0
    q_pos = i * bq + jnp.arange(bq)
    valid = block_valid(q_pos, k_pos, q_ok_ref[sl] != 0, k_ok, mask, cfg.is_causal)
    row = [r[sl] for r in row_refs]
    ds, p = grad_block(s, valid, *row, _mm(do, v, (1, 1), v, prec).astype(dtype))
    dk = dk + _mm(ds, q, (0, 0), q, prec).astype(dtype)
    dv = dv + _mm(p, do, (0, 0), do, prec).astype(dtype)
    return dk, dv

  first = int_div(k_start, bq) if cfg.is_causal else 0
  zeros = jnp.zeros(k.shape, dtype)
  dk, dv = jax.lax.fori_loop(first, n_q, body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _pallas_backward(
  cfg: AttentionConfig, q, k, v, q_ok, k_ok, mask, rows: RowResiduals, coef, delta, d_out
):
  lay = _Layout(cfg, q, k, v, q_ok, k_ok, mask)
  dtype, has_mask = lay.dtype, mask is not None
  d_out = pad_axis(pad_axis(d_out.astype(q.dtype), 3, lay.dim), 1, lay.tq)
  inv = inverse_denominator(rows.denom)
  per_row = [pad_axis(r.astype(dtype), 2, lay.tq) for r in (rows.zmax, rows.gamma, inv)]
  per_row += [pad_axis(r.astype(dtype), 2, lay.tq) for r in (rows.mean, coef, delta)]
  extra = [lay.mask] if has_mask else []
  n_q, n_k = lay.tq // cfg.block_q, lay.tk // cfg.block_k

  ok_q = [
    pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
    pl.BlockSpec((None, lay.tk), lambda b, h, i: (b, 0)),
  ]
  dq = lay.call(
      functools.partial(_dq_kernel, cfg, n_k, dtype, has_mask),
      lay.grid_q,
      [lay.q_block(), lay.kv_full(), lay.kv_full(), lay.q_block()] + ok_q
      + [lay.row_block()] * 6 + ([lay.mask_spec(by_key=False)] if has_mask else []),
      lay.q_block(),
      jax.ShapeDtypeStruct(lay.q.shape, dtype),
      lay.q, lay.k, lay.v, d_out, lay.q_ok, lay.k_ok, *per_row, *extra,
  )  # fmt: skip

  g, bk, dim = lay.groups, cfg.block_k, lay.dim
  q_full = pl.BlockSpec((None, lay.tq, None, dim), lambda b, h, j: (b, 0, h, 0))
  kv_block = pl.BlockSpec((None, bk, None, dim), lambda b, h, j: (b, j, int_div(h, g), 0))
  ok_k = [
    pl.BlockSpec((None, lay.tq), lambda b, h, j: (b, 0)),
    pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
  ]
  row_full = pl.BlockSpec((None, None, lay.tq), lambda b, h, j: (b, h, 0))
  per_head = pl.BlockSpec((None, bk, None, dim), lambda b, h, j: (b, j, h, 0))
  batch, kv_heads = k.shape[0], k.shape[2]
  grad_shape = jax.ShapeDtypeStruct((batch, lay.tk, lay.heads, dim), dtype)
  dk, dv = lay.call(
      functools.partial(_dkv_kernel, cfg, n_q, dtype, has_mask),
      lay.grid_k,
      [q_full, kv_block, kv_block, q_full] + ok_k + [row_full] * 6
      + ([lay.mask_spec(by_key=True)] if has_mask else []),
      [per_head, per_head],
      [grad_shape, grad_shape],
      lay.q, lay.k, lay.v, d_out, lay.q_ok, lay.k_ok, *per_row, *extra,
  )  # fmt: skip
  q_len, kv_len, d = q.shape[1], k.shape[1], q.shape[3]
  fold = lambda x: x[:, :kv_len, :, :d].reshape(batch, kv_len, kv_heads, g, d).sum(3)
  return dq[:, :q_len, :, :d], fold(dk), fold(dv)


PALLAS = Engine(_pallas_forward, _pallas_backward)

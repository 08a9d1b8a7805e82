"""The core solve as one fused ``jax.experimental.pallas`` kernel (``implementation="pallas"``).

The grid runs over blocks of rows. Each program loads its block ``[block_rows, n_pad]`` once, runs
the whole solve on it (the per-block solve of the other layouts, passed in as ``block``: the same
statistics, first guess, iteration and convergence rule, so the same answers) and writes the
probabilities, γ and the target scale once. Every pass of every iteration then reads the block
from registers or shared memory instead of global memory, and each block stops as soon as its own
rows are on target.

For GPUs shapes are powers of two, as Triton needs: the row length is padded to ``n_pad =
next_power_of_2(n)`` and the rows to a multiple of :func:`block_rows`. For TPUs blocks are whole
(8, 128) register tiles, as Mosaic needs: the row length is padded to a multiple of 128, the rows
to a multiple of :func:`tpu_block_rows` (itself a multiple of 8), and per-row values travel as
``[rows, 1]`` columns. Padding (and the ``where`` mask, folded into the logits beforehand) is
``-inf``, which the solve treats as masked, so padded entries get probability 0 and padded rows are
empty rows, fixed before the first step and sliced off. Rows longer than :data:`MAX_LENGTH` do not
fit a program and are solved by the ``"xla"`` layout instead.

Where it runs (decided when the computation is lowered, so that exporting for a GPU or TPU from a
CPU works): compiled by Triton for CUDA and ROCm (the default there); compiled by Mosaic for TPUs
only when ``implementation="pallas"`` is forced, since the default on TPUs stays the ``"xla"``
layout until the kernel is measured faster on a real TPU (XLA already fuses each pass there, and
the kernel is only known to compile); interpreted (``interpret=True``) on CPUs, where there is no
Pallas compiler, so that tests run the same kernel, in either layout.

What Mosaic needs of the solve, kept neutral for the other layouts: no selects between boolean
vectors (the solver's per-row flags are int32, and a ``cond`` returns no constant boolean), and no
rank-1 blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu


class GpuConfig(NamedTuple):
  """A Triton program's shape: about ``elements`` entries (at least one row) over ``num_warps``."""

  elements: int
  num_warps: int


# Padded row length -> the block each Triton program solves: the largest block whose kernel
# compiles without spilling registers for both sm_80 and sm_90 (``python -m benchmarks.kernels
# --sweep``, ``benchmarks/results/kernels_sweep.md``; registers per thread sm_80/sm_90 beside each
# entry). The whole solve keeps about a dozen block-sized values per entry and a few dozen per row
# alive, and a thread holds at most 255 registers (128 at 16 warps), so blocks are small: 4K
# entries, at most 256 rows (512 rows of 16 spill 156 B per thread, whatever the warps). With the
# convergence report (``solve_gamma(..., return_info=True)``) the kernel carries two more per-row
# values: then the 16-warp entries at lengths 16-128 and 2048 spill 4 B per thread (sm_90; 2048
# also sm_80), 8 warps would not; the default kernel, the one that matters for speed, does not.
GPU_CONFIGS: dict[int, GpuConfig] = {
  1: GpuConfig(256, 8),  # 66/62
  2: GpuConfig(512, 8),  # 70/64
  4: GpuConfig(1024, 8),  # 73/74
  8: GpuConfig(2048, 8),  # 105/107
  16: GpuConfig(4096, 16),  # 128/128 (8192 entries: 156 B of spill)
  32: GpuConfig(4096, 16),  # 128/128
  64: GpuConfig(4096, 16),  # 128/128
  128: GpuConfig(4096, 16),  # 128/128
  256: GpuConfig(4096, 8),  # 252/241 (16 warps: 8 B of spill on sm_90)
  512: GpuConfig(4096, 8),  # 250/243
  1024: GpuConfig(4096, 8),  # 249/243
  2048: GpuConfig(4096, 16),  # 128/128
  4096: GpuConfig(4096, 16),  # 93/96
  8192: GpuConfig(8192, 8),  # 254/251 (16 warps: 36 B of spill on sm_80 since issue 17's loop)
}

# The longest (padded) row a program holds; longer rows use the "xla" layout. A row of 16,384
# entries spills at 4, 8 and 16 warps (1.1-55 KB per thread).
MAX_LENGTH = 2**13

Block = Callable[..., tuple[jax.Array, ...]]


def gpu_config(n_pad: int) -> GpuConfig:
  """The :data:`GPU_CONFIGS` entry for rows of padded length ``n_pad`` (<= :data:`MAX_LENGTH`)."""
  return GPU_CONFIGS[n_pad]


def block_rows(rows: int, n_pad: int) -> int:
  """Rows per Triton program: a power of two, about ``gpu_config(n_pad).elements / n_pad``, at
  most the rows there are (rounded up to a power of two), and at least 1."""
  return max(1, min(gpu_config(n_pad).elements // n_pad, pl.next_power_of_2(rows)))


# TPU (Mosaic) blocks: the last two dimensions of a block must be multiples of (8, 128), the
# sublanes and lanes of a vector register, or the whole array's. Rows are taken 8 at a time or more
# and padded to a multiple of 128 (not a power of two: a block is a whole number of registers
# either way), and per-row values travel as ``[rows, 1]`` columns. A program's block lives in VMEM
# (16 MiB or more), not in registers, so it may be larger than on GPUs: 2^16 float32 entries are
# 256 KiB per block-sized array. But the solve's per-row values (a few dozen) are held as columns
# that take a register per 8 rows, as much VMEM as a block of 128 entries a row: 512 rows of 128
# ran out of v5e's 16 MiB of scoped VMEM, so a block holds at most TPU_MAX_ROWS rows. Guesses,
# not measured on a TPU.
TPU_BLOCK_ELEMENTS = 2**16
TPU_MAX_ROWS = 128
_SUBLANES, _LANES = 8, 128


def tpu_block_rows(rows: int, n_pad: int) -> int:
  """Rows per TPU program: a multiple of 8, about ``TPU_BLOCK_ELEMENTS / n_pad`` and at most
  ``TPU_MAX_ROWS``, at most the rows there are (rounded up to a multiple of 8)."""
  fits = max(_SUBLANES, min(TPU_BLOCK_ELEMENTS // n_pad, TPU_MAX_ROWS) // _SUBLANES * _SUBLANES)
  return min(fits, -(-rows // _SUBLANES) * _SUBLANES)


def _kernel(block: Block, x_ref, target_ref, relative_ref, probs_ref, *per_row_refs):
  """One block of rows: load, solve, store. Per-row values come as ``[t]`` (GPU) or ``[t, 1]``
  (TPU) blocks; the solve sees ``[t]``."""
  per_row = target_ref.shape
  load = lambda ref: ref[...].reshape(-1)
  probs, *per_row_out = block(x_ref[...], None, load(target_ref), load(relative_ref) != 0)
  probs_ref[...] = probs
  per_row_out = [value for value in per_row_out if value is not None]
  for ref, value in zip(per_row_refs, per_row_out, strict=True):
    ref[...] = value.reshape(per_row)


def solve_in_kernel(
  block: Block, x, where, target, relative, *, interpret: bool, tpu: bool = False, info=False
):
  """Solves ``[rows, n]`` with ``block`` run inside one Pallas program per block of rows.

  Args:
    block: ``(x, where, target, relative) -> (probs, gamma, target_scale, converged,
      evaluations)``, the per-block solve (the last two ``None`` unless it reports convergence);
      inside the kernel it gets ``where=None`` and a per-row boolean ``relative``.
    x: logits ``[rows, n]`` in the compute dtype; ``-inf`` is masked.
    where: ``None`` or a boolean mask ``[rows, n]``.
    target: ``[rows]`` targets.
    relative: boolean scalar (may be traced).
    interpret: run the kernel in Pallas' interpreter (any backend) instead of compiling it.
    tpu: lay the blocks out for TPUs and compile with Mosaic (else for GPUs, with Triton).
    info: ``block`` reports convergence: two more per-row outputs.

  Returns:
    ``(probs [rows, n], gamma, target_scale, converged, evaluations)`` (the others ``[rows]``;
    the last two ``None`` where ``block`` does not report them), as ``block`` computes them.
  """
  rows, n = x.shape
  n_pad = -(-n // _LANES) * _LANES if tpu else pl.next_power_of_2(n)
  if n_pad > MAX_LENGTH:
    return block(x, where, target, relative)
  t = tpu_block_rows(rows, n_pad) if tpu else block_rows(rows, n_pad)
  rows_pad = -(-rows // t) * t
  if where is not None:
    x = jnp.where(where, x, -jnp.inf)  # the solve masks -inf exactly as it masks where=False
  x = jnp.pad(x, ((0, rows_pad - rows), (0, n_pad - n)), constant_values=-jnp.inf)
  pad_rows = lambda a: jnp.pad(a, (0, rows_pad - rows))
  target = pad_rows(target)
  relative = pad_rows(jnp.broadcast_to(relative, (rows,)).astype(jnp.int32))

  row_block = pl.BlockSpec((t, n_pad), lambda i: (i, 0))
  if tpu:  # columns: a rank-1 block breaks the (8, 128) rule
    target, relative = target[:, None], relative[:, None]
    per_row = pl.BlockSpec((t, 1), lambda i: (i, 0))
  else:
    per_row = pl.BlockSpec((t,), lambda i: (i,))
  vector = jax.ShapeDtypeStruct(target.shape, x.dtype)
  counts = [jax.ShapeDtypeStruct(target.shape, jnp.int32)] * 2 if info else []
  if interpret:
    params = None
  elif tpu:
    params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  else:
    params = plgpu.CompilerParams(num_warps=gpu_config(n_pad).num_warps, num_stages=1)
  probs, *per_row_out = pl.pallas_call(
    functools.partial(_kernel, block),
    grid=(rows_pad // t,),
    in_specs=[row_block, per_row, per_row],
    out_specs=[row_block, *[per_row] * (2 + len(counts))],
    out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector, *counts],
    interpret=interpret,
    compiler_params=params,
    name="entropy_softmax_rows",
  )(x, target, relative)
  gamma, scale, *reported = (a.reshape(-1)[:rows] for a in per_row_out)
  return probs[:rows, :n], gamma, scale, *(reported or (None, None))

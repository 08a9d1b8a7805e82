"""The core solve as one fused ``jax.experimental.pallas`` kernel (``implementation="pallas"``).

The grid runs over blocks of rows. Each program loads its block ``[block_rows, n_pad]`` once, runs
the whole solve on it (the per-block solve of the other layouts, passed in as ``block``: the same
statistics, first guess, iteration and convergence rule, so the same answers) and writes the
probabilities, γ and the target scale once. Every pass of every iteration then reads the block
from registers or shared memory instead of global memory, and each block stops as soon as its own
rows are on target.

Shapes are powers of two, as Triton needs: the row length is padded to ``n_pad =
next_power_of_2(n)`` and the rows to a multiple of ``block_rows``; padding (and the ``where``
mask, folded into the logits beforehand) is ``-inf``, which the solve treats as masked, so padded
entries get probability 0 and padded rows are empty rows, fixed before the first step and sliced
off. A block holds about :data:`BLOCK_ELEMENTS` entries (at least one row); rows longer than
:data:`MAX_LENGTH` do not fit a program and are solved by the ``"xla"`` layout instead.

Where it runs (decided when the computation is lowered, so that exporting for a GPU from a CPU
works): compiled by Triton for CUDA and ROCm; interpreted (``interpret=True``) on CPUs, where
there is no Pallas compiler, so that tests run the same kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Entries of a program's block (float32: 32 KiB). The solve keeps about four block-sized arrays
# alive (the shifted logits twice, the weights, a sum's terms), which should stay in registers:
# 8K entries over 16 warps is 16 values per thread and array. A guess, not measured.
BLOCK_ELEMENTS = 2**13

# The longest (padded) row a program holds; longer rows use the "xla" layout. At 16K float32
# entries (32 values per thread and array over 16 warps) four block-sized arrays already fill an
# SM's 256 KiB of registers; longer rows would spill to memory.
MAX_LENGTH = 2**14

Block = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def block_rows(rows: int, n_pad: int) -> int:
  """Rows per program: a power of two, about ``BLOCK_ELEMENTS / n_pad``, at most the rows there
  are (rounded up to a power of two), and at least 1."""
  return max(1, min(BLOCK_ELEMENTS // n_pad, pl.next_power_of_2(rows)))


def _num_warps(elements: int) -> int:
  """Triton warps for a block: 4 up to 2K entries, doubling up to 16 (as Triton's softmax)."""
  return int(min(16, max(4, elements // 512)))


def _kernel(block: Block, x_ref, target_ref, relative_ref, probs_ref, gamma_ref, scale_ref):
  """One block of rows: load, solve, store."""
  probs, gamma, scale = block(x_ref[...], None, target_ref[...], relative_ref[...] != 0)
  probs_ref[...] = probs
  gamma_ref[...] = gamma
  scale_ref[...] = scale


def solve_rows(block: Block, x, where, target, relative, *, interpret: bool):
  """Solves ``[rows, n]`` with ``block`` run inside one Pallas program per block of rows.

  Args:
    block: ``(x, where, target, relative) -> (probs, gamma, target_scale)``, the per-block solve;
      inside the kernel it gets ``where=None`` and a per-row boolean ``relative``.
    x: logits ``[rows, n]`` in the compute dtype; ``-inf`` is masked.
    where: ``None`` or a boolean mask ``[rows, n]``.
    target: ``[rows]`` targets.
    relative: boolean scalar (may be traced).
    interpret: run the kernel in Pallas' interpreter (any backend) instead of compiling it with
      Triton.

  Returns:
    ``(probs [rows, n], gamma [rows], target_scale [rows])``, as ``block`` computes them.
  """
  rows, n = x.shape
  n_pad = pl.next_power_of_2(n)
  if n_pad > MAX_LENGTH:
    return block(x, where, target, relative)
  t = block_rows(rows, n_pad)
  rows_pad = -(-rows // t) * t
  if where is not None:
    x = jnp.where(where, x, -jnp.inf)  # the solve masks -inf exactly as it masks where=False
  x = jnp.pad(x, ((0, rows_pad - rows), (0, n_pad - n)), constant_values=-jnp.inf)
  pad_rows = lambda a: jnp.pad(a, (0, rows_pad - rows))
  target = pad_rows(target)
  relative = pad_rows(jnp.broadcast_to(relative, (rows,)).astype(jnp.int32))

  row_block = pl.BlockSpec((t, n_pad), lambda i: (i, 0))
  per_row = pl.BlockSpec((t,), lambda i: (i,))
  vector = jax.ShapeDtypeStruct((rows_pad,), x.dtype)
  params = None
  if not interpret:
    params = plgpu.CompilerParams(num_warps=_num_warps(t * n_pad), num_stages=1)
  probs, gamma, scale = pl.pallas_call(
    functools.partial(_kernel, block),
    grid=(rows_pad // t,),
    in_specs=[row_block, per_row, per_row],
    out_specs=[row_block, per_row, per_row],
    out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector],
    interpret=interpret,
    compiler_params=params,
    name="entropy_softmax_rows",
  )(x, target, relative)
  return probs[:rows, :n], gamma[:rows], scale[:rows]

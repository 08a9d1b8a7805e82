"""The one door from ``benchmarks/`` into the internals (not public API: it changes with them).

Benchmarks use the public API, and this module for what the public API does not show:

* :func:`first_iterate` and :func:`statistics_pass`: the solve's first pass and first guess alone,
  so that peers (plain Newton, optimistix) start where the library does and the cost of a pass
  can be read apart from the iteration;
* :func:`as_on_an_accelerator`: a function traced as on a machine with an accelerator, so that
  lowering for CUDA or a TPU from a CPU-only machine builds what those machines build;
* the kernel modules (:mod:`~entnorm_jax._src.pallas_core`,
  :mod:`~entnorm_jax._src.pallas_attention`) and :data:`IMPLEMENTATIONS`, whose tables
  (``GPU_CONFIGS``, ``gpu_shape``, ``MAX_LENGTH``) the kernel builders read and vary.
"""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp

from entnorm_jax._src import normalize, pallas_attention, pallas_core
from entnorm_jax._src.bounds import Bounds, entropy_bounds
from entnorm_jax._src.first_guess import start
from entnorm_jax._src.moments import row_stats, shifted
from entnorm_jax._src.normalize import IMPLEMENTATIONS, LANES_MAX_LENGTH, tile_rows

__all__ = [
  "IMPLEMENTATIONS",
  "as_on_an_accelerator",
  "first_iterate",
  "pallas_attention",
  "pallas_core",
  "statistics_pass",
]


def first_iterate(
  x: jax.Array, target: jax.Array
) -> tuple[jax.Array, Bounds, jax.Array, jax.Array]:
  """The core's shifted rows, bounds and first iterate of ``[rows, n]`` logits (all valid).

  Args:
    x: ``[rows, n]`` float logits, no masked entries.
    target: ``[rows]`` target entropies in nats.

  Returns:
    ``(d, bounds, target, gamma)``: the rows shifted to maximum 0, their
    :class:`~entnorm_jax._src.bounds.Bounds`, the target clamped to [log m, log n], and the first
    guess for γ (no gradient).
  """
  logits = shifted(x, None)
  stats = row_stats(logits)
  bounds = entropy_bounds(stats, x.dtype)
  target, first = start(stats, bounds, target)
  return logits.d, bounds, target, jax.lax.stop_gradient(first.gamma)


def statistics_pass(x: jax.Array) -> jax.Array:
  """The core's exponential-free statistics pass alone over ``[rows, n]`` logits, in its CPU
  layout (row blocks, in the lanes layout up to ``LANES_MAX_LENGTH`` entries); returns a per-row
  value that depends on every statistic, so that none is left out of the timing."""
  num_rows, n = x.shape
  t = tile_rows(num_rows, n, x.dtype.itemsize)
  lanes = n <= LANES_MAX_LENGTH

  def body(i, out):
    block = shifted(jax.lax.dynamic_slice_in_dim(x, i * t, t), None, lanes=lanes)
    stats = row_stats(block)
    return jax.lax.dynamic_update_slice_in_dim(out, stats.var + stats.gap, i * t, 0)

  return jax.lax.fori_loop(0, num_rows // t, body, jnp.zeros(num_rows, x.dtype))


def as_on_an_accelerator(fn: Callable) -> Callable:
  """``fn``, traced as on a machine with an accelerator: the default layout then traces the
  accelerators' branches (on a machine whose default backend is the CPU it traces the CPU's
  alone), so that lowering for CUDA or a TPU from here builds what those machines build."""

  def traced(*args):
    with mock.patch.object(normalize, "traces_accelerators", lambda: True):
      return fn(*args)

  return traced

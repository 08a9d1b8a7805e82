"""The GPU kernels' shapes come from the measured tables, and ``benchmarks.kernels`` can capture
what the library emits for CUDA (the capture needs no GPU and no Triton; compiling does, and is a
benchmark, not a test)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import entnorm_jax as en
from entnorm_jax import attention as ena
from entnorm_jax._src import pallas_attention, pallas_core

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import kernels  # noqa: E402


def test_core_table_covers_every_length_up_to_the_maximum():
  n = 1
  while n <= pallas_core.MAX_LENGTH:
    config = pallas_core.gpu_config(n)
    assert config.num_warps in (1, 2, 4, 8, 16), n
    assert config.elements >= n and config.elements & (config.elements - 1) == 0, n
    n *= 2


@pytest.mark.parametrize("n", [100, 1000])
def test_core_kernel_is_built_as_the_table_says(n):
  x = jax.ShapeDtypeStruct((300, n), jnp.float32)
  f = lambda x: en.entropy_softmax(x, 1.0, implementation="pallas")
  (kernel,) = kernels.capture(f, x)
  config = pallas_core.gpu_config(pl.next_power_of_2(n))
  assert kernel.name == "entropy_softmax_rows"
  assert (kernel.num_warps, kernel.num_stages) == (config.num_warps, 1)
  assert "tt.func" in kernel.ttir


def _attention_grad(precision):
  def loss(q, k, v):
    out = ena.entropy_attention(
      q, k, v, target_entropy=0.5, is_causal=True, implementation="pallas", precision=precision
    )
    return jnp.sum(out.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize(
  "dtype, dim", [(jnp.bfloat16, 64), (jnp.bfloat16, 128), (jnp.float32, 32), (jnp.float32, 256)]
)
def test_attention_kernels_are_built_as_the_table_says(dtype, dim):
  shape = pallas_attention.gpu_shape(dtype, dim, None)
  q = jax.ShapeDtypeStruct((1, 256, 2, dim), dtype)
  found = kernels.capture(_attention_grad(None), q, q, q)
  names = {"_stats_kernel", "_moments_kernel", "_output_kernel", "_dq_kernel", "_dkv_kernel"}
  assert {k.name for k in found} == names
  assert {(k.num_warps, k.num_stages) for k in found} == {(shape.num_warps, shape.num_stages)}
  # The default blocks are the table's: the score tile of the stats kernel is [block_q, block_k].
  assert f"tensor<{shape.block_q}x{shape.block_k}xf32>" in found[0].ttir
  # At JAX's default precision the Triton dots ask for TF32 tensor cores (for float32 tiles; 16-bit
  # tiles use their own).
  assert "inputPrecision = tf32" in found[0].ttir


@pytest.mark.parametrize("precision", [jax.lax.Precision.HIGHEST, "highest"])
def test_full_precision_float32_attention_runs_blockwise(precision):
  """No shape of the kernels with IEEE float32 dots compiles without spilling: a forced
  ``"pallas"`` runs the blockwise engine (no Pallas kernel), with the same results."""
  assert pallas_attention.gpu_shape(jnp.float32, 64, jax.lax.Precision.HIGHEST) is None
  assert pallas_attention.gpu_shape(jnp.bfloat16, 64, jax.lax.Precision.HIGHEST) is not None
  q = jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.float32)
  assert kernels.capture(_attention_grad(precision), q, q, q) == []
  x = jax.random.normal(jax.random.key(0), (3, 1, 40, 2, 16))
  run = lambda impl: ena.entropy_attention(
    *x, target_entropy=0.5, is_causal=True, implementation=impl, precision=precision
  )
  np.testing.assert_allclose(run("pallas"), run("blockwise"), atol=1e-6)


def test_tables_summarize_spills_and_failures():
  rows = [
    {"case": "a", "kernel": "k", "key": "1", "arch": "sm_80", "spill_store_bytes": 8,
     "spill_load_bytes": 4, "shared_bytes": 1024},
    {"case": "a", "kernel": "k", "key": "1", "arch": "sm_90", "spill_store_bytes": 0,
     "spill_load_bytes": 0, "shared_bytes": 300 * 1024},
    {"case": "b", "kernel": "j", "key": "2", "arch": "sm_90", "error": "boom"},
    {"case": "c", "kernel": None},
  ]  # fmt: skip
  s = kernels.summary(rows)
  assert (s["builds"], s["distinct_kernels"], s["failed"], s["spilling"]) == (3, 2, 1, 1)
  assert s["worst_spill_bytes"] == 12 and s["shared_over_limit"] == 1
  assert s["max_shared_bytes"] == {"sm_80": 1024, "sm_90": 300 * 1024}

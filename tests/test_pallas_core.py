"""The fused Pallas kernel of the core solve (``implementation="pallas"``): interpreted on the CPU
it gives the ``"xla"`` layout's outputs and gradients, and it lowers to a Triton kernel for GPUs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl
from jax.sharding import AbstractDevice, AbstractMesh

import entnorm_jax as en
from entnorm_jax._src import normalize, pallas_core

_N = 100  # not a power of two: padded to 128 inside the kernel
_BLOCK = 512  # entries per program in these tests: 4 rows of 128, so 23 rows make 6 blocks


def _small_blocks(patch: pytest.MonkeyPatch):
  """GPU-layout blocks of :data:`_BLOCK` entries (the interpreter runs that layout on CPUs)."""
  small = pallas_core.GpuConfig(_BLOCK, pallas_core.gpu_config(128).num_warps)
  patch.setitem(pallas_core.GPU_CONFIGS, 128, small)


def _battery(rng):
  """23 rows of 100 logits with a mask and per-row targets (nats): random rows and edge rows."""
  rows = 23
  x = rng.normal(size=(rows, _N)) * rng.uniform(0.1, 5.0, size=(rows, 1))
  where = rng.uniform(size=(rows, _N)) > 0.3
  target = rng.uniform(0.2, 3.5, size=rows)
  where[0] = False  # all masked
  where[1] = False
  where[1, 7] = True  # one valid entry
  x[2, [3, 50, 90]] = x[2].max() + 1.0  # ties at the maximum
  where[2] = True
  x[3] = 0.7  # uniform
  x[4] = -1e4  # one-hot-like: a huge gap below the maximum
  x[4, 11] = 0.0
  where[4] = True
  x[5] = 1e-22 * rng.normal(size=_N)  # a spread too small for float32 products: rescaled
  x[6] = 4.0 * np.eye(_N)[2] + 0.01 * rng.normal(size=_N)  # one large value, the rest close
  target[6] = 0.3
  target[7] = 0.0  # at or beyond the edges: clamped
  target[8] = 10.0
  target[2] = np.log(3.0)  # exactly the tie row's argmax edge
  target[9] = np.log(where[9].sum()) - 1e-3  # just below the uniform edge
  return x.astype(np.float32), where, target.astype(np.float32)


def _outputs(implementation: str, bfloat16: bool = True):
  """A jitted function of the battery: probabilities, gradients of a weighted sum with respect to
  the logits and the target, and (with ``bfloat16``) the probabilities of bfloat16 logits."""

  def probs(x, where, target, relative):
    unit = "target_fraction" if relative else "target_entropy"
    return en.entropy_softmax(x, where=where, implementation=implementation, **{unit: target})

  def loss(x, where, target, relative, weights):
    return jnp.sum(probs(x, where, target, relative) * weights)

  def run(x, where, target, relative, weights):
    grads = jax.grad(loss, argnums=(0, 2))(x, where, target, relative, weights)
    unit = "target_fraction" if relative else "target_entropy"
    gamma = en.solve_gamma(x, where=where, implementation=implementation, **{unit: target})
    out = (probs(x, where, target, relative), *grads, gamma)
    return (*out, probs(x.astype(jnp.bfloat16), where, target, relative)) if bfloat16 else out

  return jax.jit(run, static_argnums=3)  # relative: which keyword names the target


@pytest.fixture(scope="module")
def results():
  """Both implementations on the battery, in nats and relative (one compile per implementation)."""
  rng = np.random.default_rng(7)
  x, where, target = _battery(rng)
  weights = rng.normal(size=x.shape).astype(np.float32)
  fraction = np.clip(target / np.log(_N), 0.0, 1.0).astype(np.float32)
  fraction[7], fraction[8] = 0.0, 1.0
  out = {"weights": weights}
  with pytest.MonkeyPatch.context() as patch:
    _small_blocks(patch)
    for impl in ("pallas", "xla"):
      run = _outputs(impl)
      both = jax.jit(lambda t, f, run=run: [run(x, where, t, False, weights),
                                            run(x, where, f, True, weights)])  # fmt: skip
      out[impl, False], out[impl, True] = jax.device_get(both(target, fraction))
  return out


@pytest.mark.parametrize("relative", [False, True])
def test_probabilities_match_xla(results, relative):
  got, want = results["pallas", relative][0], results["xla", relative][0]
  assert got.dtype == np.float32 and got.shape == (23, _N)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  assert np.all(got[0] == 0) and got[1, 7] == 1.0


@pytest.mark.parametrize("relative", [False, True])
def test_gradients_match_xla(results, relative):
  pairs = zip(results["pallas", relative][1:3], results["xla", relative][1:3], strict=True)
  # The logits' gradient is a sum of terms of size γ*·|w| per entry, which can cancel: on a row
  # with γ* = 52 and two near-tied maxima the exact gradient is 0 (two entries with a fixed entropy
  # are a fixed distribution) and float32 leaves 1e-3 of each path's terms of size 50. The
  # tolerance is float32's relative to those terms.
  gamma = results["xla", relative][3]
  terms = np.maximum(1.0, gamma * np.max(np.abs(results["weights"]), axis=-1))
  for (got, want), scale in zip(pairs, (terms[:, None], terms), strict=True):
    assert np.all(np.isfinite(got))
    np.testing.assert_array_less(np.abs(got - want), 1e-4 * scale + 1e-3 * np.abs(want))


def test_bfloat16_logits_match_xla(results):
  got, want = results["pallas", False][4], results["xla", False][4]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=1e-2)


def test_float64_matches_xla(x64):
  x, where, target = _battery(np.random.default_rng(8))
  x, target = x.astype(np.float64), target.astype(np.float64)
  weights = np.random.default_rng(9).normal(size=x.shape)
  relative = False
  with pytest.MonkeyPatch.context() as patch:
    _small_blocks(patch)
    run = lambda impl: _outputs(impl, bfloat16=False)(x, where, target, relative, weights)
    got, want = run("pallas"), run("xla")
  assert got[0].dtype == jnp.float64
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-9, rtol=1e-8)


def test_block_rows():
  for rows, n_pad in ((1, 1), (5, 128), (1000, 128), (3, pallas_core.MAX_LENGTH), (10**6, 2)):
    t = pallas_core.block_rows(rows, n_pad)
    assert t >= 1 and t & (t - 1) == 0
    assert t * n_pad <= max(pallas_core.gpu_config(n_pad).elements, n_pad)
    assert t <= pl.next_power_of_2(rows)


def test_tpu_block_rows():
  """TPU blocks are whole (8, 128) tiles: a multiple of 8 rows, at most TPU_MAX_ROWS."""
  for rows, n_pad in ((1, 128), (5, 128), (1000, 128), (3, 2**14), (10**6, 1024), (37, 384)):
    t = pallas_core.tpu_block_rows(rows, n_pad)
    assert t % 8 == 0 and 8 <= t <= pallas_core.TPU_MAX_ROWS
    assert t * n_pad <= max(pallas_core.TPU_BLOCK_ELEMENTS, 8 * n_pad)
    assert t <= -(-rows // 8) * 8


# With the convergence report: its two per-row outputs travel through the kernel too.
_BLOCK_SOLVE = functools.partial(normalize._solve_block, num_iters=None, info=True)
_TPU_SOLVE = functools.partial(
  pallas_core.solve_in_kernel, _BLOCK_SOLVE, interpret=True, tpu=True, info=True
)
# One compile of each for both parametrizations (``relative`` is an array argument).
_TPU_SOLVE_JIT, _BLOCK_SOLVE_JIT = jax.jit(_TPU_SOLVE), jax.jit(_BLOCK_SOLVE)


@pytest.mark.parametrize("relative", [False, True])
def test_tpu_layout_matches_xla(relative):
  """The kernel's TPU layout (8-row blocks here, rows padded to 128, per-row values as [rows, 1]
  columns), interpreted, gives the ``"xla"`` layout's solution."""
  x, where, target = _battery(np.random.default_rng(10))
  if relative:
    target = np.clip(target / np.log(_N), 0.0, 1.0).astype(np.float32)
  args = (x, where, target, jnp.asarray(relative))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pallas_core, "TPU_MAX_ROWS", 8)  # read when the kernel is traced
    assert "grid=(3,)" in str(jax.make_jaxpr(_TPU_SOLVE)(*args))  # 23 rows in blocks of 8
    got = jax.device_get(_TPU_SOLVE_JIT(*args))
  want = jax.device_get(_BLOCK_SOLVE_JIT(*args))
  assert len(got) == 5 and np.all(got[3] == 1)  # every row of the battery converged
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_long_rows_use_xla_layout():
  """Rows longer than MAX_LENGTH are solved without the kernel (traced only, not compiled)."""

  def jaxpr(n):
    fn = lambda x: en.entropy_softmax(x, 1.0, implementation="pallas")
    return str(jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((2, n), jnp.float32)))

  assert "pallas_call" in jaxpr(pallas_core.MAX_LENGTH)
  assert "pallas_call" not in jaxpr(pallas_core.MAX_LENGTH + 1)


def _export(fn, platform: str, *args):
  triton = "__gpu$xla.gpu.triton"
  checks = [export.DisabledSafetyCheck.custom_call(triton)]
  return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
    *args
  ).mlir_module()


@pytest.mark.parametrize("implementation", ["pallas", None])
def test_lowers_to_triton_for_cuda(implementation):
  """Forced, the solve is one Triton kernel (compiled, not interpreted): lowering for CUDA runs on
  any machine and goes through Pallas' Triton lowering of the solve. By default, on a machine
  whose default backend is the CPU (this one), only the CPU's tiled layout is traced: the
  kernel's trace was most of each solve site's tracing time."""
  assert jax.default_backend() == "cpu"

  def loss(x, where, target):
    out = en.entropy_softmax(x, target, where=where, implementation=implementation)
    return jnp.sum(out * jnp.arange(x.shape[-1]))

  args = (
    jax.ShapeDtypeStruct((37, _N), jnp.float32),
    jax.ShapeDtypeStruct((37, _N), jnp.bool_),
    jax.ShapeDtypeStruct((37,), jnp.float32),
  )
  text = _export(jax.grad(loss, argnums=(0, 2)), "cuda", *args)
  kernel = implementation == "pallas"
  assert ('name = "entropy_softmax_rows"' in text) == kernel
  assert ("__gpu$xla.gpu.triton" in text) == kernel


@pytest.mark.parametrize("implementation", ["pallas", None])
def test_lowers_for_tpu(implementation):
  """On TPUs the default is the ``"xla"`` layout (no kernel) and a forced ``"pallas"`` is one
  Mosaic kernel, forward and backward. Pallas' Mosaic lowering asks the device kind for the
  chip's registers: an abstract mesh of a TPU v5e supplies it on a machine without one (compiling
  the kernel needs libtpu: ``benchmarks/kernels_tpu.py``)."""

  def loss(x, target):
    out = en.entropy_softmax(x, target, implementation=implementation)
    return jnp.sum(out * jnp.arange(x.shape[-1]))

  args = (jax.ShapeDtypeStruct((37, _N), jnp.float32), jax.ShapeDtypeStruct((37,), jnp.float32))
  device = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
    text = _export(jax.grad(loss, argnums=(0, 1)), "tpu", *args)
  kernel = implementation == "pallas"
  assert ("tpu_custom_call" in text) == kernel
  assert ('name = "entropy_softmax_rows"' in text) == kernel

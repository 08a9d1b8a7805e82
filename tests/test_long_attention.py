"""Blockwise and Pallas entropy attention against the dense reference (outputs and gradients)."""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_figures, float64, float64_arrays, tolerance

import entnorm_jax as en
from entnorm_jax import attention as ena


def _rel(a, b) -> float:
  """Relative error in the Frobenius norm, ``|a - b| / |b|``."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.partial(jax.jit, static_argnames=("kw",))
def _out_and_grads(q, k, v, target, cotangent, mask, q_lengths, kv_lengths, kw):
  """Output and the vjp of a random cotangent w.r.t. q, k, v and the target, in one compile."""
  kw = dict(kw)
  unit = "target_fraction" if kw.pop("fraction") else "target_entropy"

  def f(q, k, v, target):
    return ena.entropy_attention(
        q, k, v, mask=mask, query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
        **kw, **{unit: target},
    )  # fmt: skip

  out, pull = jax.vjp(f, q, k, v, target)
  return out, pull(cotangent)


def _inputs(rng, batch, q_len, kv_len, heads, kv_heads, dim, dtype=np.float32):
  q = rng.normal(size=(batch, q_len, heads, dim))
  k = rng.normal(size=(batch, kv_len, kv_heads, dim)) * 1.5
  v = rng.normal(size=(batch, kv_len, kv_heads, dim))
  cot = rng.normal(size=(batch, q_len, heads, dim))
  return [jnp.asarray(x, dtype) for x in (q, k, v, cot)]


# (batch, q_len, kv_len, heads, kv_heads, dim), options. Lengths are chosen so that no block size
# below divides them; case "gqa" has a batch with no valid key at all, case "mask" a fully masked
# query row and a per-row absolute target.
_CASES = {
  "gqa": ((3, 37, 37, 4, 2, 8), dict(is_causal=True, fraction=True)),
  "mask": ((1, 23, 41, 2, 1, 16), dict(is_causal=False, fraction=False)),
}


def _case(rng, name, dtype=np.float32):
  (batch, q_len, kv_len, heads, kv_heads, dim), opts = _CASES[name]
  q, k, v, cot = _inputs(rng, batch, q_len, kv_len, heads, kv_heads, dim, dtype)
  if name == "gqa":
    target = jnp.asarray(rng.uniform(0.2, 0.9, size=(heads,)), dtype)
    mask, q_lengths, kv_lengths = None, jnp.array([37, 30, 37]), jnp.array([37, 25, 0])
  else:
    target = jnp.asarray(rng.uniform(0.3, 2.5, size=(batch, heads, q_len)), dtype)
    mask = jnp.asarray(rng.uniform(size=(batch, heads, q_len, kv_len)) < 0.7)
    mask = mask.at[0, 1, 5].set(False)
    q_lengths = kv_lengths = None
  return (q, k, v, target, cot, mask, q_lengths, kv_lengths), opts


def _reference(args, opts):
  """The dense implementation in float64 on the same input values: outputs and gradients."""
  with float64():
    wide = [jnp.asarray(np.asarray(a, np.float64)) for a in args[:5]]
    out, grads = _out_and_grads(*wide, *args[5:], kw=tuple(opts.items()))
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.parametrize(
  "name, implementation, block_q, block_k, precision",
  [
    ("gqa", "blockwise", 8, 16, None),
    ("mask", "blockwise", 16, 8, "highest"),
    ("gqa", "pallas", 16, 16, None),
    ("mask", "pallas", 16, 16, None),
  ],
)
def test_matches_dense_reference(rng, name, implementation, block_q, block_k, precision):
  """float32 outputs and gradients (q, k, v, target) within 1e-5 of the dense reference.

  The reference runs in float64, so the comparison measures the implementation rather than the
  float32 rounding of the reference (the float32 dense path sits a few 1e-6 from it too). On CPUs
  JAX's default matmul precision is full float32, as ``"highest"`` is everywhere.
  """
  args, opts = _case(rng, name)
  want_out, want_grads = _reference(args, opts)
  kw = dict(opts, implementation=implementation, block_q=block_q, block_k=block_k)
  kw["precision"] = precision
  out, grads = _out_and_grads(*args, kw=tuple(kw.items()))
  assert out.dtype == args[0].dtype
  assert _rel(out, want_out) < 1e-5
  for got, want in zip(grads, want_grads, strict=True):
    assert np.all(np.isfinite(got))
    assert _rel(got, want) < 1e-5
  if name == "gqa":  # batch 2 has no valid key; rows beyond a query length are masked
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(out[1, 30:], 0.0)
    np.testing.assert_array_equal(grads[1][2], 0.0)
  else:
    np.testing.assert_array_equal(out[0, 5, 1], 0.0)


def test_rows_have_the_target_entropy(rng):
  """The blockwise attention weights P = softmax(γ* s) have the requested entropy."""
  q, k, v, _ = _inputs(rng, 1, 29, 29, 2, 2, 8)
  target = jnp.array([0.3, 0.7])
  # With v = identity over keys, the output rows are the attention weights themselves.
  eye = jnp.broadcast_to(jnp.eye(29)[None, :, None, :], (1, 29, 2, 29))
  k = jnp.concatenate([k, jnp.zeros((1, 29, 2, 21))], axis=-1)
  q = jnp.concatenate([q, jnp.zeros((1, 29, 2, 21))], axis=-1)
  f = jax.jit(
    functools.partial(
      ena.entropy_attention,
      target_fraction=target,
      is_causal=True,
      implementation="blockwise",
      block_q=8,
      block_k=8,
    )  # fmt: skip
  )
  p = f(q, k, eye)  # [1, q, heads, keys]
  n_valid = jnp.arange(1, 30)[:, None]
  got = en.entropy(jnp.log(p[0]), where=p[0] > 0)
  want = target[None, :] * jnp.log(n_valid)
  np.testing.assert_allclose(
    got[1:], jnp.broadcast_to(want, got.shape)[1:], atol=tolerance(p.dtype)
  )


def test_float64_and_target_derivative(rng):
  """In float64 the blockwise path matches the dense one to 1e-9, and its target derivative
  matches central finite differences."""
  with float64():
    args, opts = _case(rng, "gqa", np.float64)
    kw = tuple(dict(opts, implementation="blockwise", block_q=16, block_k=8).items())
    want_out, want_grads = _reference(args, opts)
    out, grads = _out_and_grads(*args, kw=kw)
    assert out.dtype == jnp.float64
    assert _rel(out, want_out) < 1e-9
    for got, want in zip(grads, want_grads, strict=True):
      assert _rel(got, want) < 1e-8
    q, k, v, target, cot = args[:5]
    direction = jnp.asarray(rng.normal(size=target.shape))
    eps = 1e-6
    plus, _ = _out_and_grads(q, k, v, target + eps * direction, *args[4:], kw=kw)
    minus, _ = _out_and_grads(q, k, v, target - eps * direction, *args[4:], kw=kw)
    numeric = jnp.sum((plus - minus) * cot) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(grads[3] * direction), numeric, rtol=1e-6)


def test_bfloat16_inputs(rng):
  args, opts = _case(rng, "mask", jnp.bfloat16)
  want, _ = _reference(args, opts)
  kw = tuple(dict(opts, implementation="blockwise", block_q=8, block_k=16).items())
  out, grads = _out_and_grads(*args, kw=kw)
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tolerance(jnp.bfloat16)
  )
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_pallas_kernels_lower_to_triton():
  """The kernels compile for GPUs, not just interpret: lowering for CUDA runs on any machine and
  goes through Pallas' Triton lowering of every primitive in the five kernels. By default
  (``interpret=None``) the choice is the lowering platform's, so a CPU exports compiled kernels."""
  from jax import export

  q = jax.ShapeDtypeStruct((1, 100, 4, 32), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 100, 2, 32), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((1, 1, 100, 100), jnp.bool_)

  def loss(q, k, v, mask):
    out = ena.entropy_attention(
      q, k, v, target_fraction=0.5, mask=mask, is_causal=True, implementation="pallas",
      query_seq_lengths=jnp.array([90]),
    )  # fmt: skip
    return jnp.sum(out.astype(jnp.float32))

  triton = "__gpu$xla.gpu.triton"
  exported = export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
    platforms=["cuda"],
    disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)],
  )(q, k, k, mask)
  text = exported.mlir_module()
  for kernel in ("_stats_kernel", "_moments_kernel", "_output_kernel", "_dq_kernel", "_dkv_kernel"):
    assert f'name = "{kernel}"' in text


def _largest_intermediate(closed_jaxpr) -> int:
  """Size of the largest array in a jaxpr, its sub-jaxprs (loops, custom rules) included."""
  largest = 0

  def visit(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      for var in (*eqn.invars, *eqn.outvars):
        largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(closed_jaxpr.jaxpr)
  return largest


def test_blockwise_never_forms_the_score_matrix():
  """Forward and backward hold nothing near q_len × kv_len (traced only, not compiled)."""
  n, block = 2048, 128
  shape = jax.ShapeDtypeStruct((1, n, 1, 16), jnp.float32)

  def loss(q, k, v):
    out = ena.entropy_attention(
        q, k, v, target_fraction=0.5, is_causal=True, implementation="blockwise",
        block_q=block, block_k=block,
    )  # fmt: skip
    return jnp.sum(out)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(shape, shape, shape)
  assert _largest_intermediate(jaxpr) <= max(block * block, n * 16)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(implementation="flash"), "implementation"),
    (dict(mask=jnp.ones((2, 5), bool)), "mask"),
    (dict(target_entropy=jnp.ones(3)), r"target_entropy.*\(3,\)"),
    (dict(target_entropy=jnp.ones((4, 10))), "target_entropy of shape"),
    (dict(target_fraction=2.0), r"fraction of log\(n_valid\).*\[0, 1\].*target_entropy="),
    (dict(target_entropy=-1.0), r"in nats.*>= 0.*target_fraction="),
    (dict(target_entropy=0.5, relative=True), "relative= was removed.*target_fraction="),
    (dict(implementation="pallas", block_q=24), "power of two"),
    (dict(key_value_seq_lengths=jnp.ones(3, int)), "key_value_seq_lengths"),
  ],
)
def test_static_misuse_raises(kwargs, match):
  q = jnp.ones((1, 6, 2, 4))
  kw = (dict(target_entropy=0.5) | kwargs) if "target_fraction" not in kwargs else kwargs
  with pytest.raises(ValueError, match=match):
    ena.entropy_attention(q, q, q, **kw)
  kv = jnp.ones((1, 6, 3, 4))
  with pytest.raises(ValueError, match="multiple"):
    ena.entropy_attention(q, kv, kv, target_entropy=0.5)


def test_benchmark_runs_tiny(tmp_path, figures):
  """The CPU benchmark's pieces run end to end at a toy size (so the module cannot go stale)."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
  from benchmarks import long_attention as bench

  memory = [bench.measure_here("blockwise", 64, causal=True)]
  assert memory[0]["peak_rss_bytes"] > 0
  timing = bench.time_forward([(64, False)], repeats=1, budget_s=1.0)
  assert timing[0]["ratio"] > 0
  result = {
    "config": {"batch": 1, "heads": 1, "dim": bench.DIM, "dtype": "float32",
               "target_entropy": bench.TARGET, **bench.BLOCKS["blockwise"]},
    "memory": memory,
    "timing": timing,
    "bars": {"memory_length": 64, "memory_peak_bytes": memory[0]["peak_rss_bytes"],
             "memory_met": False, "time_ratio_4096": None, "time_met": None},
    "environment": {"cpu_model": "test", "cpu_count": 1, "backend": "cpu"},
    "notes": "tiny",
  }  # fmt: skip
  assert "| blockwise | 64 |" in bench.markdown(result)
  assert bench.plot(result, tmp_path) == tmp_path / "long_attention.png"
  check_figures(figures, ["long_attention.png"])


@pytest.mark.parametrize("implementation", ["xla", "blockwise", "pallas"])
def test_float32_stays_float32_under_x64(implementation):
  q = jnp.ones((1, 16, 2, 8), jnp.float32)
  attend = lambda q: ena.entropy_attention(
    q, q, q, target_fraction=0.5, implementation=implementation, is_causal=True
  )
  with float64():
    assert float64_arrays(attend, q) == []
    assert float64_arrays(jax.grad(lambda q: jnp.sum(attend(q))), q) == []


def test_rows_are_polished_past_the_stopping_tolerance(rng):
  """The attention's γ is one Newton step past its last sweep (``iteration._polish``), free of any
  pass: in float64 its rows' entropies land within 1e-14 nats of the target, where the stopping
  tolerance alone allows 1e-12·log n (and the dense layouts, which do not polish, use it)."""
  with float64():
    q, k, _, _ = _inputs(rng, 1, 29, 29, 2, 2, 8, np.float64)
    eye = jnp.broadcast_to(jnp.eye(29)[None, :, None, :], (1, 29, 2, 29))
    k = jnp.concatenate([k, jnp.zeros((1, 29, 2, 21))], axis=-1)
    q = jnp.concatenate([q, jnp.zeros((1, 29, 2, 21))], axis=-1)
    target = jnp.array([0.3, 0.7])
    p = ena.entropy_attention(
      q, k, eye, target_fraction=target, is_causal=True, implementation="blockwise", block_q=8
    )
    assert p.dtype == jnp.float64
    got = en.entropy(jnp.log(p[0]), where=p[0] > 0)[1:]
    want = target[None, :] * jnp.log(jnp.arange(2, 30))[:, None]
    assert np.max(np.abs(got - want)) < 1e-14

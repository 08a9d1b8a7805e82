"""Derivatives: implicit (custom_jvp) against finite differences and unrolled autodiff."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_grads_each, float64, sharding_env

import entnorm_jax as en


@pytest.fixture
def logits64(x64, rng):
  return jnp.asarray(rng.normal(size=(3, 7)))


def test_central_differences_on_target(logits64):
  loss = jax.jit(lambda t: jnp.sum(en.entropy_softmax(logits64, t) ** 2 * jnp.arange(7.0)))
  for t in (0.3, 1.0, 1.7):
    eps = 1e-5
    fd = (loss(t + eps) - loss(t - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(loss)(t), fd, rtol=1e-6)


def _unrolled_gamma(x, target, gamma0, iters):
  """Plain Newton on H(γ) = target, differentiated by autodiff through every iteration."""
  d = x - jnp.max(x, axis=-1, keepdims=True)
  gamma = gamma0
  for _ in range(iters):
    e = jnp.exp(gamma[:, None] * d)
    q = e / jnp.sum(e, axis=-1, keepdims=True)
    mean = jnp.sum(q * d, axis=-1)
    var = jnp.sum(q * jnp.square(d - mean[:, None]), axis=-1)
    entropy = jnp.log(jnp.sum(e, axis=-1)) - gamma * mean
    gamma = gamma + (entropy - target) / (gamma * var)
  return gamma


def test_implicit_matches_unrolled_autodiff(logits64):
  target = jnp.array([0.8, 1.2, 1.5])
  gamma0 = jax.lax.stop_gradient(en.solve_gamma(logits64, target)) * 0.97
  loss_unrolled = lambda x, t: jnp.sum(jnp.sin(_unrolled_gamma(x, t, gamma0, 30)))
  loss_implicit = lambda x, t: jnp.sum(jnp.sin(en.solve_gamma(x, t)))
  for argnum in (0, 1):
    g_imp = jax.grad(loss_implicit, argnum)(logits64, target)
    g_unr = jax.grad(loss_unrolled, argnum)(logits64, target)
    np.testing.assert_allclose(g_imp, g_unr, rtol=1e-8, atol=1e-10)


def test_jacobians_and_hessian(logits64):
  x = logits64[0]
  f = lambda x: en.entropy_softmax(x, 1.2)
  jf, jr = jax.jacfwd(f)(x), jax.jacrev(f)(x)
  np.testing.assert_allclose(jf, jr, atol=1e-12)
  np.testing.assert_allclose(jf.sum(0), 0.0, atol=1e-12)  # outputs always sum to 1
  np.testing.assert_allclose(jf.sum(1), 0.0, atol=1e-12)  # shift invariance
  hess = jax.hessian(lambda x: en.entropy_softmax(x, 1.2)[0])(x)
  np.testing.assert_allclose(hess, hess.T, atol=1e-10)
  assert np.all(np.isfinite(hess))


def test_masked_and_edge_gradients_are_zero_not_nan(x64):
  x = jnp.array(
    [
      [0.5, -1.0, 2.0, 0.1],
      [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf],  # all masked
      [1.0, 1.0, 1.0, 1.0],  # constant
      [0.3, -0.2, 1.1, 0.4],  # target clamped above log n
    ]
  )
  targets = jnp.array([0.7, 0.5, 0.5, 3.0])
  where = jnp.array([True, True, False, True])
  weights = jnp.arange(1.0, 5.0)
  loss = lambda x, t: jnp.sum(en.entropy_softmax(x, t, where=where) * weights)
  gx, gt = jax.grad(loss, (0, 1))(x, targets)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gt))
  np.testing.assert_array_equal(gx[:, 2], 0.0)  # masked column
  np.testing.assert_array_equal(gx[1:], 0.0)  # empty, constant and clamped rows do not move
  np.testing.assert_array_equal(gt[1:], 0.0)
  # Probabilities: zeros in, zero gradient out (no 0 * inf).
  p = jnp.array([0.5, 0.0, 0.3, 0.2])
  gp = jax.grad(lambda p: en.entropy_normalize(p, 0.6)[0])(p)
  assert np.all(np.isfinite(gp)) and gp[1] == 0.0


def test_argmax_edge_gradient_finite(x64):
  x = jnp.array([2.0, 0.5, -1.0])
  g = jax.grad(lambda x, t: en.entropy_softmax(x, t)[0], (0, 1))(x, 0.0)
  assert all(np.all(np.isfinite(a)) for a in g)
  np.testing.assert_allclose(g[0], 0.0, atol=1e-12)


@pytest.mark.parametrize("implementation", ["xla", "tiled"])
def test_argmax_edge_gradient_is_exactly_zero(implementation):
  # Regression: at a target at log m (0 nats for distinct logits; lower values are rejected) the
  # rows are one-hot and locally constant, but the two terms of the tangent cancelled only up to
  # rounding times γ = 110 / gap (|∂/∂z| reached 1e-6 in float32, 1e-4 at larger γ).
  z = 2 * jax.random.normal(jax.random.key(0), (16, 10))
  w = jax.random.normal(jax.random.key(1), (16, 10))
  targets = jnp.zeros(16).at[::2].set(1e-7)  # within the tolerance of the edge: solved there

  @jax.jit
  def loss(z, t):
    return jnp.sum(w * en.entropy_softmax(z, t, implementation=implementation))

  gz, gt = jax.grad(loss, (0, 1))(z, targets)
  np.testing.assert_array_equal(gz, 0.0)
  np.testing.assert_array_equal(gt, 0.0)
  # Just inside the edge the row moves again, with a finite gradient.
  gz = jax.grad(loss)(z, jnp.full(16, 1e-2))
  assert np.all(np.isfinite(gz)) and np.abs(gz).max() > 0


def test_bf16_gradient_runs():
  x = jax.random.normal(jax.random.key(3), (4, 32), jnp.bfloat16)
  g = jax.jit(jax.grad(lambda x: jnp.sum(en.entropy_softmax(x, 1.5)[:, 0].astype(jnp.float32))))(x)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


_SHARDING_SCRIPT = textwrap.dedent(
  """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import entnorm_jax as en
    assert jax.device_count() == 8, jax.devices()
    x = jax.random.normal(jax.random.key(0), (16, 256))
    t = jnp.linspace(0.5, 5.0, 16)
    loss = lambda x, t: jnp.sum(en.entropy_softmax(x, t) ** 2)
    ref_q = en.entropy_softmax(x, t)
    ref_g = jax.grad(loss)(x, t)
    with jax.enable_x64():
      wide = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, t)]
      g64 = np.asarray(jax.grad(loss)(*wide))
    # float32 gradients of sharp rows carry ~1e-4 of the row's scale of rounding: every float32
    # result is held to that against float64, and the sharded one to the same as the unsharded.
    scale = np.abs(g64).max(axis=-1, keepdims=True)
    assert np.max(np.abs(np.asarray(ref_g) - g64) / scale) < 3e-4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "model"))
    for spec in (P("batch", None), P(None, "model"), P("batch", "model")):
      xs = jax.device_put(x, NamedSharding(mesh, spec))
      ts = jax.device_put(t, NamedSharding(mesh, P(spec[0])))
      q, g = jax.jit(lambda x, t: (en.entropy_softmax(x, t), jax.grad(loss)(x, t)))(xs, ts)
      np.testing.assert_allclose(q, ref_q, atol=1e-6)
      assert np.max(np.abs(np.asarray(g) - g64) / scale) < 3e-4, spec
    print("sharding ok")
    """
)


def test_sharded_inputs_match_one_device():
  env = sharding_env()
  out = subprocess.run(
    [sys.executable, "-c", _SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sharding ok" in out.stdout


def test_check_grads_every_differentiable_output(logits64):
  # Every differentiable output, with respect to the logits and the target, to second order in
  # both modes. One program holds them all (check_grads_each, which names the outputs that fail):
  # the solver compiles once per derivative program, not once per output.
  targets = jnp.array([0.4, 1.0, 1.6])
  masked_targets = jnp.array([0.4, 0.9, 1.3])  # five entries left: log 5 = 1.61
  weights = jnp.arange(1.0, 8.0)
  labels = jax.nn.softmax(jnp.sin(jnp.arange(21.0)).reshape(3, 7))
  keep = jnp.arange(7) % 3 != 1

  def minus_inf(x, t):
    # -inf marks masked entries; no derivative of any order may see it (0 · inf is NaN).
    x = jnp.where(keep, x, -jnp.inf)
    return en.solve_gamma(x, t), en.entropy_softmax(x, t) * weights

  outputs = {
    "entropy_softmax": lambda x, t, _: en.entropy_softmax(x, t) * weights,
    "solve_gamma": lambda x, t, _: en.solve_gamma(x, t),
    "entropy_log_softmax, where": lambda x, t, _: en.entropy_log_softmax(
      x, t, where=jnp.arange(7) != 3
    ),
    "entropy": lambda x, t, _: en.entropy(x),
    "entropy_log_softmax": lambda x, t, _: en.entropy_log_softmax(x, t) * weights,
    "cross_entropy": lambda x, t, _: en.entropy_softmax_cross_entropy(x, labels, t),
    "integer_labels": lambda x, t, _: en.entropy_softmax_cross_entropy_with_integer_labels(
      x, jnp.array([0, 4, 6]), t
    ),
    "-inf logits": lambda x, _, t: minus_inf(x, t),
  }
  args = (logits64, targets, masked_targets)
  check_grads_each(outputs, args, order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_float32_gradients_near_the_argmax_edge():
  """Rows of 13 whose targets lie a few hundredths of log n above log 1: q is nearly two-valued,
  so the two terms of its tangent are large and cancel, and γ (30 to 2000 here) multiplies the
  rounding of q's mean. Taken about the row maximum, float32 gradients stay within 1e-3 of
  float64's (absolute; 8e-3 about the logits' mean, as before), and ∂/∂target within 3e-3
  (relative; 1.3e-2 before)."""
  grad = jax.jit(
    jax.grad(lambda x, t, w: jnp.sum(w * en.entropy_softmax(x, target_fraction=t)), (0, 1))
  )
  rng = np.random.default_rng(0)
  rows, n = 400, 13
  x = rng.normal(size=(rows, n)) * rng.choice([0.5, 2.0, 5.0], size=(rows, 1))
  frac = rng.uniform(0.0, 0.15, size=rows)
  w = rng.normal(size=(rows, n))
  dx32, dt32 = grad(*(jnp.asarray(a, jnp.float32) for a in (x, frac, w)))
  with float64():
    dx64, dt64 = grad(*(jnp.asarray(a, jnp.float64) for a in (x, frac, w)))
  dx32, dt32, dx64, dt64 = map(np.asarray, (dx32, dt32, dx64, dt64))
  assert np.max(np.abs(dx32 - dx64)) <= 1e-3
  assert np.max(np.abs(dt32 - dt64) / np.maximum(np.abs(dt64), 1e-3)) <= 3e-3

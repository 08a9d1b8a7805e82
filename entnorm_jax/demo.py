"""The main demo: the seed's example, solved and differentiated (``python -m entnorm_jax.demo``).

Reproduces Su Jianlin's example (a random 100-way distribution normalized to entropy log 30),
shows the convergence per pass over the data of this library's solver next to the seed's plain
Newton iteration from γ = 1, both in float64 (like with like), and differentiates through the
solve.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import entnorm_jax as en


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def seed_newton(p: np.ndarray, target: float, iters: int) -> list[float]:
  """The seed's NumPy iteration; returns |H - target| after each iteration."""
  errors = []
  for _ in range(iters):
    h = -(p * np.log(p)).sum()
    gamma = 1 + (target - h) / (h**2 - (p * np.log(p) ** 2).sum())
    p = p**gamma
    p /= p.sum()
    errors.append(abs(_entropy(p) - target))
  return errors


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--n", type=int, default=100)
  parser.add_argument("--perplexity", type=float, default=30.0)
  args = parser.parse_args(argv)

  p = np.random.default_rng(args.seed).random(args.n)
  p /= p.sum()
  target = float(np.log(args.perplexity))
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; entnorm_jax {en.__version__}")
  print(f"p: random {args.n}-way distribution, H(p) = {_entropy(p):.6f} nats")
  print(f"target: log {args.perplexity:g} = {target:.6f} nats\n")

  q = np.asarray(en.entropy_normalize(jnp.asarray(p, jnp.float32), target), np.float64)
  gamma = float(en.solve_gamma(jnp.log(jnp.asarray(p, jnp.float32)), target))
  print(
    f"entropy_normalize: γ* = {gamma:.6f}, H(q) = {_entropy(q):.6f} "
    f"(error {_entropy(q) - target:+.1e})"
  )
  print(f"order kept: {bool(np.all(np.argsort(p) == np.argsort(q)))}, sum(q) = {q.sum():.6f}\n")

  # Like with like: both iterations in float64 (the library's float32 default stops at 2e-6 nats
  # per nat of log n, the rounding floor of float32 sums).
  print("convergence: |H - target| after k passes over the data (both float64)")
  print(f"{'k':>3}  {'entnorm_jax':>12}  {'seed Newton (γ=1 start)':>24}")
  seed = seed_newton(p.copy(), target, 8)
  with jax.enable_x64():
    logits64 = jnp.log(jnp.asarray(p, jnp.float64))
    # k passes: one exponential-free statistics pass, then k - 1 evaluations (k - 2 steps).
    ours = [np.nan] + [
      abs(_entropy(np.asarray(en.entropy_softmax(logits64, target, num_iters=k - 2))) - target)
      for k in range(2, 9)
    ]
  for k in range(1, 9):
    cell = "(statistics)" if k == 1 else f"{ours[k - 1]:.2e}"
    print(f"{k:>3}  {cell:>12}  {seed[k - 1]:>24.2e}")

  logits = jnp.log(jnp.asarray(p, jnp.float32))
  grad_t = jax.grad(lambda t: en.entropy_softmax(logits, t)[jnp.argmax(logits)])(target)
  print(f"\nd q_max / d target = {float(grad_t):+.6f} (implicit derivative, no unrolled loop)")
  h = 1e-3
  fd = (
    en.entropy_softmax(logits, target + h)[jnp.argmax(logits)]
    - en.entropy_softmax(logits, target - h)[jnp.argmax(logits)]
  ) / (2 * h)
  print(f"central difference   = {float(fd):+.6f}")


if __name__ == "__main__":
  main()

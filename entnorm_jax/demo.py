"""The main demo: the seed's example, solved and differentiated (``python -m entnorm_jax.demo``).

The seed is Su Jianlin's 2022 post on entropy normalization, which gives the transform, a random
100-way distribution normalized to entropy log 30 as its example, and a NumPy Newton iteration
from γ = 1. The demo reproduces the example, then compares, in float64 for both (like with like),
how far each solve is from the target after k *passes* over the data.

A pass reads every entry of the row once. Each pass of either method at a γ measures the entropy
there (and the moments for the next step), so the table gives, after k passes, the error measured
by the k-th pass: for Su's Newton its k-th iteration, at γ_(k-1) (γ_0 = 1, the given distribution,
so it needs no other pass); for entnorm_jax the statistics pass counts as pass 1 (it reads the
row's maximum, mean, spread and gap, with no exponential, to make the first guess, and measures
no entropy), then passes 2, 3, ... are the solver's evaluations, counted by
``solve_gamma(..., return_info=True)`` (``info.evaluations``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import entnorm_jax as en

SEED = "Su's Newton (2022)"  # the seed's iteration, by its author (as in notebook 01)


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def seed_newton(p: np.ndarray, target: float, passes: int) -> list[float]:
  """The seed's NumPy iteration from γ = 1; |H - target| measured by each of ``passes`` passes
  (its k-th iteration reads the distribution at γ_(k-1) once: H and Σ p log² p)."""
  errors = []
  for _ in range(passes):
    h = -(p * np.log(p)).sum()
    errors.append(abs(h - target))
    gamma = 1 + (target - h) / (h**2 - (p * np.log(p) ** 2).sum())
    p = p**gamma
    p /= p.sum()
  return errors


def entnorm_passes(logits: jax.Array, target: float, passes: int) -> dict[int, tuple[float, bool]]:
  """entnorm_jax's solve stopped after each number of steps: passes -> (|H - target|, converged),
  passes = 1 (statistics) + the evaluations ``solve_gamma`` reports; up to ``passes`` or until
  the solve converges."""
  out = {}
  z = np.asarray(logits, np.float64)
  for steps in range(passes):
    gamma, info = en.solve_gamma(logits, target, num_iters=steps, return_info=True)
    q = np.exp(float(gamma) * (z - z.max()))
    count = 1 + int(info.evaluations)
    out[count] = (abs(_entropy(q / q.sum()) - target), bool(info.converged))
    if info.converged or count >= passes:
      break
  return out


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

  logits = jnp.log(jnp.asarray(p, jnp.float32))
  q = np.asarray(en.entropy_normalize(jnp.asarray(p, jnp.float32), target), np.float64)
  gamma, info = en.solve_gamma(logits, target, return_info=True)
  print(
    f"entropy_normalize: γ* = {float(gamma):.6f}, H(q) = {_entropy(q):.6f} "
    f"(error {_entropy(q) - target:+.1e})"
  )
  print(
    f"solved in float32 in {1 + int(info.evaluations)} passes (the statistics pass, then "
    f"{int(info.evaluations)} evaluations), converged: {bool(info.converged)}"
  )
  print(f"order kept: {bool(np.all(np.argsort(p) == np.argsort(q)))}, sum(q) = {q.sum():.6f}\n")

  # Like with like: both iterations in float64 (the library's float32 default stops at 2e-6 nats
  # per nat of log n, the rounding floor of float32 sums).
  passes = 8
  print("convergence, both in float64: |H - target| as measured by pass k, where a pass reads")
  print("the row once. entnorm_jax: pass 1 reads exponential-free statistics for its first guess,")
  print(f"each later pass is one evaluation. {SEED}, the seed's method: one pass per iteration.")
  print(f"{'k':>3}  {'entnorm_jax':>18}  {SEED + ', γ = 1':>26}")
  seed = seed_newton(p.copy(), target, passes)
  with jax.enable_x64():
    ours = entnorm_passes(jnp.log(jnp.asarray(p, jnp.float64)), target, passes)
  last = max(ours)
  for k in range(1, passes + 1):
    if k == 1:
      cell = "(statistics)"
    elif k in ours:
      err, converged = ours[k]
      cell = f"{err:.2e}" + (" converged" if converged else "")
    else:
      cell = "(stopped)" if k > last else "–"
    print(f"{k:>3}  {cell:>18}  {seed[k - 1]:>26.2e}")

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

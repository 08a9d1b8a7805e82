"""Benchmarks and experiments for entnorm_jax (run from the repository root)."""

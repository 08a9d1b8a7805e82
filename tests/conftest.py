"""Shared fixtures: rng keys, a float64 switch and dtype tolerances."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@contextlib.contextmanager
def float64():
  """Runs the block with ``jax_enable_x64`` on (restored afterwards)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
  with float64():
    yield


def tolerance(dtype) -> float:
  """Absolute tolerance on probabilities / entropies for results stored in ``dtype``."""
  return {
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 2e-3,
    jnp.dtype(jnp.float32): 2e-4,
    jnp.dtype(jnp.float64): 1e-10,
  }[jnp.dtype(dtype)]

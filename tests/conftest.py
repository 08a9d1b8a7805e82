"""Shared fixtures: rng keys, a float64 switch and dtype tolerances."""

from __future__ import annotations

import contextlib
import os
import re

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


def float64_arrays(fn, *args) -> list[str]:
  """Equations of ``fn``'s jaxpr that make float64 arrays (run it with x64 on, float32 inputs).

  A float64 constant (a NumPy scalar, say) silently promotes float32 work to float64 under
  ``jax_enable_x64``: twice the memory traffic and a different result than without x64.
  """
  text = str(jax.make_jaxpr(fn)(*args))
  return [line.strip() for line in text.splitlines() if re.search(r"f64\[\d", line)]


def sharding_env() -> dict[str, str]:
  """The environment of a subprocess with 8 host devices (on the CPU), keeping the caller's
  XLA_FLAGS."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")

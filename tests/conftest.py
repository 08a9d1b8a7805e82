"""Shared fixtures and checks: rng keys, a float64 switch, dtype tolerances, gradient checks of
many functions in one program, checks of the figures the benchmarks write, and the long tests
first (float64 NumPy references are in ``references.py``)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from references import png_size

# Tests of a minute or more on a 2-core machine (subprocesses, notebooks, the benchmarks' tiny
# runs) are collected first: pytest-xdist's worksteal gives each worker a contiguous share of the
# list and idle workers steal from the end of the others', so a long test at the front never runs
# last, alone, while the other workers wait.
_LONG_FIRST = (
  "tests/test_sharding.py::",
  "tests/test_notebooks.py::",
  "tests/test_experiments.py::test_extrapolation_run_tiny",
  "tests/test_experiments.py::test_attention_collapse_run_tiny",
  "tests/test_benchmarks.py::test_core_run_tiny",
  "tests/test_gradients.py::test_check_grads_every_differentiable_output",
  "tests/test_gradients.py::test_sharded_inputs_match_one_device",
)


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: not item.nodeid.startswith(_LONG_FIRST))  # stable: order kept


@pytest.fixture(autouse=True)
def _keep_compiled(monkeypatch):
  """``jax.clear_caches`` does nothing in the suite.

  The benchmarks time compiles from empty caches; their tiny runs here check that they run, not
  their figures, and emptying a worker's caches made every later test on it compile again what
  it had compiled (13 s in 221 s of one process running the benchmarks' tiny runs first).
  """
  monkeypatch.setattr(jax, "clear_caches", lambda: None)


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


def check_grads_each(functions: dict, args, **kwargs) -> None:
  """``jax.test_util.check_grads`` of every function in ``functions`` (name -> f(*args)), in one
  jitted program that returns them all: each derivative program holds every function and compiles
  once (most of a check's time is XLA compiling the solver), not once per function. On a failure
  each function is checked alone, and the error names the ones that fail."""
  merged = jax.jit(lambda *a: {name: f(*a) for name, f in functions.items()})
  try:
    check_grads(merged, args, **kwargs)
  except AssertionError as merged_error:
    failed = []
    for name, f in functions.items():
      try:
        check_grads(jax.jit(f), args, **kwargs)
      except AssertionError as error:
        failed.append(f"{name}: {error}")
    raise AssertionError("\n".join(failed) or str(merged_error)) from None


FIGURE_DPI = 110  # benchmarks.common.write_figure's resolution


@pytest.fixture
def figures(monkeypatch):
  """Records every figure the benchmarks write (through ``benchmarks.common.write_figure``): a
  list of ``(path, (width, height) in inches)``, for :func:`check_figures`."""
  from benchmarks import common

  written = []
  write = common.write_figure

  def recording(fig, path):
    written.append((pathlib.Path(path), tuple(float(s) for s in fig.get_size_inches())))
    return write(fig, path)

  monkeypatch.setattr(common, "write_figure", recording)
  return written


def check_figures(figures, names) -> None:
  """Each figure in ``figures`` (from the fixture) was written, once, under the expected file
  name: a non-empty PNG whose pixel size is its figure's inches at ``FIGURE_DPI``, give or take the
  tight bounding box (which trims blank margins and adds a 0.1 in pad)."""
  assert sorted(path.name for path, _ in figures) == sorted(names), figures
  for path, inches in figures:
    assert path.is_file() and path.stat().st_size > 0, path
    width, height = png_size(path)
    for got, size in ((width, inches[0]), (height, inches[1])):
      nominal = size * FIGURE_DPI
      assert 0.8 * nominal <= got <= 1.1 * nominal, (path.name, (width, height), inches)


def sharding_env() -> dict[str, str]:
  """The environment of a subprocess with 8 host devices (on the CPU), keeping the caller's
  XLA_FLAGS."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")

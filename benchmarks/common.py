"""Timing and reporting helpers shared by every benchmark module.

Timing protocol (the same for every figure in the suite):

* each function is compiled ahead, ``jax.jit(f).lower(*args).compile()``, so no sample includes
  tracing or compilation;
* it is run once to warm up, and every sample ends with ``jax.block_until_ready``;
* a sample times ``number`` back-to-back calls (calibrated so a sample lasts at least
  ``min_sample_s``) and reports the time per call;
* the functions being compared are sampled *interleaved*, round after round in a rotating order,
  so that load from other processes falls on all of them alike;
* the median is reported with the interquartile range as the spread, and ratios are formed from
  medians measured in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "compile_ahead",
  "environment",
  "float64",
  "fmt_time",
  "markdown_table",
  "quick_from_env",
  "random_logits",
  "save_json",
  "time_calls",
  "write_figure",
]


@contextlib.contextmanager
def _config(name: str, value):
  """Runs the block with JAX's option ``name`` set to ``value`` (restored afterwards)."""
  previous = getattr(jax.config, name)
  jax.config.update(name, value)
  try:
    yield
  finally:
    jax.config.update(name, previous)


def float64():
  """Runs the block with ``jax_enable_x64`` on (restored afterwards)."""
  return _config("jax_enable_x64", True)


def quick_from_env() -> bool:
  """True when ``ENTNORM_QUICK`` is set to a non-empty value other than ``0``."""
  return os.environ.get("ENTNORM_QUICK", "0") not in ("", "0")


def compile_ahead(fn: Callable, *args) -> Callable:
  """``jax.jit(fn)`` lowered and compiled for ``args`` (no tracing or compiling when timed)."""
  return jax.jit(fn).lower(*args).compile()


def as_on_an_accelerator(fn: Callable) -> Callable:
  """``fn``, traced as on a machine with an accelerator: the default layout then traces the
  accelerators' branches (on a machine whose default backend is the CPU it traces the CPU's
  alone), so that lowering for CUDA or a TPU from here builds what those machines build."""
  from unittest import mock

  from entnorm_jax._src import normalize

  def traced(*args):
    with mock.patch.object(normalize, "traces_accelerators", lambda: True):
      return fn(*args)

  return traced


def no_persistent_cache():
  """Switches JAX's persistent compilation cache off for the block (restored afterwards)."""
  return _config("jax_enable_compilation_cache", False)


def compile_once(step, args: tuple) -> tuple[dict[str, float], object]:
  """Traces, lowers and compiles ``jax.jit(step)`` from empty caches; seconds and the executable."""
  jax.clear_caches()
  start = time.perf_counter()
  traced = jax.jit(step).trace(*args)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  seconds = {
    "trace_s": traced_at - start,
    "lower_s": lowered_at - traced_at,
    "compile_s": end - lowered_at,
  }
  seconds["trace_lower_s"] = seconds["trace_s"] + seconds["lower_s"]
  seconds["total_s"] = seconds["trace_lower_s"] + seconds["compile_s"]
  return seconds, compiled


def least_of(samples: list[dict[str, float]]) -> dict:
  """Per phase, the least of the repeats (``total_s``: the least total of one repeat)."""
  best = {key: min(s[key] for s in samples) for key in samples[0]}
  return {**best, "repeats": samples}


def random_logits(seed: int, shape: Sequence[int], scale: float = 1.0) -> jax.Array:
  """Standard-normal logits times ``scale``, float32 (random, never zeros)."""
  return scale * jax.random.normal(jax.random.key(seed), tuple(shape), jnp.float32)


def _sample(fn: Callable, args: tuple, number: int) -> float:
  start = time.perf_counter()
  for _ in range(number):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / number


def time_calls(
  fns: dict[str, tuple[Callable, tuple]],
  *,
  repeats: int = 15,
  min_sample_s: float = 2e-3,
  max_total_s: float | None = None,
) -> dict[str, dict[str, float]]:
  """Times compiled functions side by side, with their repeats interleaved.

  Args:
    fns: name -> ``(compiled function, args)``.
    repeats: samples per function (fewer if ``max_total_s`` runs out first; at least 3).
    min_sample_s: a sample repeats a call until it lasts at least this long.
    max_total_s: optional wall-clock budget for the whole comparison.

  Returns:
    name -> ``{"median_s", "q25_s", "q75_s", "min_s", "samples", "calls_per_sample"}``
    (seconds per call).

  Raises:
    ValueError: if ``fns`` is empty or ``repeats < 1``.
  """
  if not fns or repeats < 1:
    raise ValueError(f"need at least one function and repeats >= 1, got {len(fns)}, {repeats}")
  names = list(fns)
  number = {}
  for name in names:  # warm up, then calibrate the calls per sample
    fn, args = fns[name]
    jax.block_until_ready(fn(*args))
    once = _sample(fn, args, 1)
    number[name] = max(1, int(np.ceil(min_sample_s / max(once, 1e-9))))
  samples: dict[str, list[float]] = {name: [] for name in names}
  start = time.perf_counter()
  for r in range(repeats):
    order = names[r % len(names) :] + names[: r % len(names)]
    for name in order:
      fn, args = fns[name]
      samples[name].append(_sample(fn, args, number[name]))
    if max_total_s is not None and r >= 2 and time.perf_counter() - start > max_total_s:
      break
  stats = {}
  for name in names:
    s = np.asarray(samples[name])
    stats[name] = {
      "median_s": float(np.median(s)),
      "q25_s": float(np.percentile(s, 25)),
      "q75_s": float(np.percentile(s, 75)),
      "min_s": float(np.min(s)),
      "samples": len(s),
      "calls_per_sample": number[name],
    }
  return stats


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """Versions, backend and hardware the figures were measured on."""
  import jaxlib

  device = jax.devices()[0]
  return {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "cpu_model": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "numpy": np.__version__,
    "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
  }


def fmt_time(seconds: float) -> str:
  """Seconds as a short human string (ns/µs/ms/s)."""
  for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds / 1e-9:.3g} ns"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table."""
  lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
  return "\n".join(lines)


def save_json(obj: Any, path: str | os.PathLike) -> pathlib.Path:
  """Writes ``obj`` as indented JSON (creating the folder)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1, default=float) + "\n")
  return path


def write_figure(fig, path: str | os.PathLike) -> pathlib.Path:
  """Saves a matplotlib figure as a PNG readable at a glance (110 dpi) and closes it."""
  import matplotlib.pyplot as plt

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


RESULTS_DIR = pathlib.Path(__file__).parent / "results"


def report(name: str, result: dict, markdown: Callable, plot: Callable, out_dir) -> None:
  """Adds the environment to ``result``, prints its Markdown and writes NAME.json/.md/.png."""
  result["environment"] = environment()
  text = markdown(result)
  print(text)
  out = pathlib.Path(out_dir)
  save_json(result, out / f"{name}.json")
  (out / f"{name}.md").write_text(text)
  plot(result, out)


def module_main(name: str, doc: str, run: Callable, markdown: Callable, plot: Callable, argv=None):
  """The command line of a benchmark module: ``python -m benchmarks.NAME [--quick] [--out DIR]``."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
  parser.add_argument("--out", default=str(RESULTS_DIR), help=f"folder for {name}.json/.md/.png")
  args = parser.parse_args(argv)
  report(name, run(quick=args.quick), markdown, plot, args.out)


def snapshot_main(
  name: str, doc: str, run: Callable, markdown: Callable, plot: Callable, argv=None
):
  """Command line of an experiment whose committed snapshot is its full run.

  ``--quick`` (or ``ENTNORM_QUICK=1``) only prints the table; a full run also writes NAME.json,
  NAME.md and NAME.png (``plot(result, path)``) into :data:`RESULTS_DIR`.
  """
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a smoke run: print, write nothing")
  quick = parser.parse_args(argv).quick or quick_from_env()
  result = run(quick)
  table = markdown(result)
  print(table)
  if quick:
    return
  save_json(result, RESULTS_DIR / f"{name}.json")
  (RESULTS_DIR / f"{name}.md").write_text(table)
  plot(result, RESULTS_DIR / f"{name}.png")

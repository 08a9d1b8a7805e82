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
import inspect
import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "compile_ahead",
  "entropy64",
  "environment",
  "float64",
  "fmt_time",
  "markdown_table",
  "module_main",
  "out_dir",
  "quick_from_env",
  "random_logits",
  "save_json",
  "time_calls",
  "warmup_s",
  "write_figure",
  "write_results",
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


def warmup_s(quick: bool) -> float:
  """Seconds of warm-up calls per timed function (:func:`time_calls`): a second, or next to none in
  a smoke run (whose figures mean nothing)."""
  return 0.02 if quick else 1.0


def compile_ahead(fn: Callable, *args) -> Callable:
  """``jax.jit(fn)`` lowered and compiled for ``args`` (no tracing or compiling when timed)."""
  return jax.jit(fn).lower(*args).compile()


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


def entropy64(p, axis: int = -1) -> np.ndarray:
  """Entropy (nats) of the probabilities ``p`` along ``axis``, in float64 (``0 log 0 = 0``).

  The one reference entropy of the benchmarks: errors |H - target| are measured with it.
  """
  p = np.asarray(p, np.float64)
  positive = p > 0
  return -np.sum(np.where(positive, p * np.log(np.where(positive, p, 1.0)), 0.0), axis=axis)


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
  warmup_s: float = 1.0,
) -> dict[str, dict[str, float]]:
  """Times compiled functions side by side, with their repeats interleaved.

  Each function is first called over and over for ``warmup_s`` seconds (at least once): on the
  2-core AMD EPYC a fresh process ran the first 5-60 calls of a [65536, 16] solve 2.5x slower
  than the rest, which a single warm-up call left in the samples.

  Args:
    fns: name -> ``(compiled function, args)``.
    repeats: samples per function (fewer if ``max_total_s`` runs out first; at least 3).
    min_sample_s: a sample repeats a call until it lasts at least this long.
    max_total_s: optional wall-clock budget for the whole comparison (the warm-up not included).
    warmup_s: seconds of calls to each function before it is timed.

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
    warm = time.perf_counter()
    jax.block_until_ready(fn(*args))
    while time.perf_counter() - warm < warmup_s:
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


# Where results go: one rule for every command (``python -m benchmarks.NAME`` and
# ``python -m benchmarks.run``). A full run writes NAME.json, NAME.md and NAME.png into RESULTS_DIR,
# the committed snapshots; a smoke run (--quick, --smoke, ENTNORM_QUICK=1) writes into QUICK_DIR,
# so that it never overwrites a snapshot; --out DIR writes into DIR instead of either.
RESULTS_DIR = pathlib.Path(__file__).parent / "results"
QUICK_DIR = pathlib.Path(tempfile.gettempdir()) / "entnorm_benchmarks_quick"


def out_dir(out: str | os.PathLike | None, quick: bool) -> pathlib.Path:
  """The folder a run writes into: ``out`` if given, else :data:`RESULTS_DIR` for a full run and
  :data:`QUICK_DIR` for a smoke run (see the rule above)."""
  if out is not None:
    return pathlib.Path(out)
  return QUICK_DIR if quick else RESULTS_DIR


def draw(plot: Callable, name: str, result: dict, out) -> list[pathlib.Path]:
  """Calls a module's ``plot`` and returns the paths it wrote: ``plot(result, out_dir)`` (which
  returns them), or ``plot(result, path)`` (second parameter named ``path``), given
  ``<out>/<name>.png``."""
  out = pathlib.Path(out)
  params = list(inspect.signature(plot).parameters)
  if len(params) > 1 and params[1] == "path":
    plot(result, out / f"{name}.png")
    return [out / f"{name}.png"]
  drawn = plot(result, out) or []
  drawn = [drawn] if isinstance(drawn, (str, os.PathLike)) else drawn
  return [pathlib.Path(p) for p in drawn]


def write_results(
  name: str, result: dict, text: str, plot: Callable | None, out
) -> list[pathlib.Path]:
  """Writes ``out``/NAME.json, NAME.md (``text``) and the figures of ``plot`` (if any); returns
  the figures' paths."""
  out = pathlib.Path(out)
  save_json(result, out / f"{name}.json")
  (out / f"{name}.md").write_text(text)
  return draw(plot, name, result, out) if plot is not None else []


def replot(name: str, plot: Callable, out=None) -> list[pathlib.Path]:
  """Draws NAME's figures again from its saved ``NAME.json`` (in ``out``, default
  :data:`RESULTS_DIR`), without running the benchmark."""
  folder = pathlib.Path(out) if out is not None else RESULTS_DIR
  result = json.loads((folder / f"{name}.json").read_text())
  return draw(plot, name, result, folder)


def report(name: str, result: dict, markdown: Callable, plot: Callable | None, out_dir) -> None:
  """Adds the environment to ``result`` (unless it has one), prints its Markdown and writes
  NAME.json/.md/.png into ``out_dir``."""
  result.setdefault("environment", environment())
  text = markdown(result)
  print(text)
  written = write_results(name, result, text, plot, out_dir)
  print(f"wrote {pathlib.Path(out_dir) / name}.json, .md" + "".join(f", {p.name}" for p in written))


def module_parser(name: str, doc: str, plot: Callable | None) -> argparse.ArgumentParser:
  """The command line of a benchmark module:
  ``python -m benchmarks.NAME [--quick] [--out DIR] [--plot-only]`` (a module may add arguments of
  its own, as the ones that measure in a child process do)."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
  parser.add_argument(
    "--out",
    help=f"folder for {name}.json/.md/.png (default: benchmarks/results/; with --quick, "
    f"{QUICK_DIR})",
  )
  if plot is not None:
    parser.add_argument(
      "--plot-only", action="store_true", help=f"redraw {name}.png from the saved {name}.json"
    )
  return parser


def module_run(name: str, args: argparse.Namespace, run: Callable, markdown: Callable, plot):
  """Runs a benchmark module as :func:`module_parser`'s ``args`` ask: results go where
  :func:`out_dir` says; ``--plot-only`` redraws the figures from the saved NAME.json in that folder
  (default :data:`RESULTS_DIR`) without running anything."""
  if getattr(args, "plot_only", False):
    for path in replot(name, plot, args.out):
      print(f"wrote {path}")
    return
  quick = args.quick or quick_from_env()
  report(name, run(quick=quick), markdown, plot, out_dir(args.out, quick))


def module_main(
  name: str, doc: str, run: Callable, markdown: Callable, plot: Callable | None, argv=None
):
  """``python -m benchmarks.NAME [--quick] [--out DIR] [--plot-only]``: :func:`module_parser`,
  then :func:`module_run`."""
  args = module_parser(name, doc, plot).parse_args(argv)
  module_run(name, args, run, markdown, plot)

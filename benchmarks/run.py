"""The whole benchmark suite in one command, on whatever device JAX sees.

    python -m benchmarks.run [--quick] [--out DIR] [--only NAME ...]

Runs every benchmark module's ``run(quick)`` in turn (with a progress bar) and writes, by the
rule every benchmark command follows (:func:`benchmarks.common.out_dir`), into
``benchmarks/results/`` for a full run, a temporary folder for ``--quick``, or ``--out DIR``:

* ``NAME.json``, ``NAME.md`` and ``NAME.png`` of each module, as ``python -m benchmarks.NAME``
  writes them (the plots of the modules that have a ``plot(result, out_dir)`` or
  ``plot(result, path)``; a module's ``markdown(result)`` renders its tables when it has one);
* ``run.json``: every figure of every module, the environment (jax/jaxlib versions, backend,
  device kind, CPU model) and each module's wall time; ``run.md``: all the tables.

Modules written for other parts of the library (attention, sampling) are included when they are
present. A module that fails is recorded in the JSON and Markdown with its traceback, the others
still run, and the command exits with status 1. ``--quick`` is meant to finish in under two
minutes on a 2-core CPU, the full suite in under twenty.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time
import traceback

from tqdm import tqdm

from benchmarks import common

# Always present, then optional (skipped when the module does not exist).
CORE_MODULES = ("core", "accuracy", "scaling", "peers", "memory")
OPTIONAL_MODULES = ("attention_cost", "long_attention", "sampling_speed", "tsne")


def load_modules(only=None) -> dict:
  """name -> imported ``benchmarks.<name>`` module (optional ones only if present)."""
  names = list(CORE_MODULES) + list(OPTIONAL_MODULES)
  if only:
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise ValueError(f"unknown benchmark(s) {unknown}; known: {names}")
    names = [n for n in names if n in only]
  modules = {}
  for name in names:
    try:
      modules[name] = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
      if name in CORE_MODULES or e.name != f"benchmarks.{name}":
        raise
  return modules


def _generic_markdown(name: str, result: dict) -> str:
  """Table of a result without its own ``markdown``: timings if any, then scalar figures."""
  parts = [f"## {name}\n"]
  times = result.get("times")
  if isinstance(times, dict) and all(isinstance(v, dict) for v in times.values()):
    rows = [
      [
        k,
        common.fmt_time(v["median_s"]),
        f"{common.fmt_time(v['q25_s'])} – {common.fmt_time(v['q75_s'])}",
      ]
      for k, v in times.items()
      if "median_s" in v
    ]
    parts.append(common.markdown_table(["function", "median", "IQR"], rows) + "\n")
  scalars = [
    [k, f"{v:.4g}" if isinstance(v, float) else str(v)]
    for k, v in result.items()
    if isinstance(v, (int, float, str, bool)) and k != "name"
  ]
  if scalars:
    parts.append(common.markdown_table(["figure", "value"], scalars) + "\n")
  return "\n".join(parts)


def run_suite(quick: bool, out: pathlib.Path, only=None) -> dict:
  """Runs the modules, writes the results folder and returns the combined figures."""
  modules = load_modules(only)
  out.mkdir(parents=True, exist_ok=True)
  env = common.environment()
  suite = {"quick": quick, "environment": env, "modules": {}, "wall_s": {}, "failed": {}}
  sections, plots = [], []
  bar = tqdm(modules.items(), desc="benchmarks", unit="module", file=sys.stderr)
  for name, module in bar:
    bar.set_postfix_str(name)
    start = time.perf_counter()
    try:
      result = module.run(quick=quick)
      suite["modules"][name] = result
      result.setdefault("environment", env)
      render = getattr(module, "markdown", None)
      text = render(result) if render else _generic_markdown(name, result)
      sections.append(text)
      drawn = common.write_results(name, result, text, getattr(module, "plot", None), out)
      plots += [p.name for p in drawn]
    except Exception:  # record and keep going; the exit status reports the failure
      suite["failed"][name] = traceback.format_exc()
      sections.append(f"## {name}\n\nFAILED:\n\n```\n{suite['failed'][name]}```\n")
    suite["wall_s"][name] = time.perf_counter() - start
  suite["plots"] = plots
  common.save_json(suite, out / "run.json")
  (out / "run.md").write_text(_header(suite) + "\n".join(sections))
  return suite


def _header(suite: dict) -> str:
  env = suite["environment"]
  walls = ", ".join(f"{k} {v:.0f} s" for k, v in suite["wall_s"].items())
  plots = " ".join(f"![{p}]({p})" for p in suite["plots"])
  return (
    f"# entnorm_jax benchmarks{' (quick)' if suite['quick'] else ''}\n\n"
    f"{env['backend']} / {env['device_kind']} ({env['cpu_model']}, {env['cpu_count']} CPUs), "
    f"jax {env['jax']}, jaxlib {env['jaxlib']}, {env['date_utc']} UTC.\n"
    f"Medians of interleaved repeats (IQR as spread), compiled ahead, float32 unless noted.\n"
    f"Wall time per module: {walls}.\n\n{plots}\n\n"
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Run the entnorm_jax benchmark suite.")
  parser.add_argument("--quick", action="store_true", help="small sizes (under 2 min on 2 CPUs)")
  parser.add_argument(
    "--out",
    help=f"results folder (default: benchmarks/results/; with --quick, {common.QUICK_DIR})",
  )
  parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these modules")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  out = common.out_dir(args.out, args.quick)
  suite = run_suite(args.quick, out, args.only)
  print(
    f"wrote {out}/run.json, run.md, each module's json and md, {len(suite['plots'])} plots "
    f"in {time.perf_counter() - start:.0f} s"
  )
  for name, tb in suite["failed"].items():
    print(f"FAILED {name}:\n{tb}", file=sys.stderr)
  return 1 if suite["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())

"""Memory (issue 5, item 4): forward+backward peak memory, implicit gradient vs unrolled autodiff.

For ``k`` solver iterations, the reverse-mode gradient of ``sum(w * entropy_softmax(x, t))`` is
taken two ways: the core's implicit derivative (memory independent of ``k``) and autodiff
through ``k`` unrolled iterations (saves every iteration's residuals). Each configuration runs in
a fresh subprocess, which reports

* ``peak_bytes``: on GPU/TPU the device's ``peak_bytes_in_use``; on the CPU the growth of the
  process's peak resident set during one call (``VmHWM`` after the call minus ``VmRSS`` before,
  with the peak reset through ``/proc/self/clear_refs``). The call measured is the first one after
  compiling, so that no buffer freed by an earlier call is reused unseen;
* ``xla_temp_bytes``: the compiled program's temporary buffers (``memory_analysis``), a
  deterministic cross-check.

Run ``python -m benchmarks.memory [--quick] [--out DIR] [--plot-only]`` (results where
:func:`benchmarks.common.out_dir` says).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp

import entnorm_jax as en
from benchmarks import common
from benchmarks.core import random_problem, unrolled_entropy_softmax

METHODS = ("implicit", "unrolled")
# quick -> (shape, iteration counts)
SIZES = {True: ((64, 8192), (1, 16)), False: ((128, 16384), (1, 2, 4, 8, 16, 32))}


def _proc_status_kib(field: str) -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def measure_here(method: str, num_iters: int, shape: tuple[int, int]) -> dict:
  """Peak memory of one gradient call in this process (see the module docstring)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  x, t, w = random_problem(2, shape)
  if method == "implicit":
    f = lambda x, t: en.entropy_softmax(x, t, num_iters=num_iters)
  else:
    f = lambda x, t: unrolled_entropy_softmax(x, t, num_iters)
  grad = common.compile_ahead(jax.grad(lambda x, t, w: jnp.sum(w * f(x, t))), x, t, w)
  analysis = grad.memory_analysis()
  temp = int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1
  jax.block_until_ready((x, t, w))
  device = jax.devices()[0]
  stats = device.memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    before = stats.get("bytes_in_use", 0)
    jax.block_until_ready(grad(x, t, w))
    peak = device.memory_stats()["peak_bytes_in_use"] - before
    source = "device peak_bytes_in_use"
  else:
    before = _proc_status_kib("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    jax.block_until_ready(grad(x, t, w))
    peak = (_proc_status_kib("VmHWM") - before) * 1024
    source = "process RSS growth (VmHWM - VmRSS)"
  return {
    "method": method,
    "num_iters": num_iters,
    "peak_bytes": int(peak),
    "xla_temp_bytes": temp,
    "source": source,
  }


def measure_subprocess(method: str, num_iters: int, shape: tuple[int, int]) -> dict:
  """:func:`measure_here` in a fresh Python process (so earlier runs leave no footprint)."""
  cmd = [sys.executable, "-m", "benchmarks.memory", "--child", method, str(num_iters)]
  cmd += ["--shape", *map(str, shape)]
  root = pathlib.Path(__file__).resolve().parent.parent
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
  """Peak memory for both methods as the iteration count grows."""
  shape, iters = SIZES[quick]
  rows = [measure_subprocess(m, k, shape) for k in iters for m in METHODS]
  return {
    "name": "memory",
    "quick": quick,
    "shape": list(shape),
    "input_bytes": 4 * shape[0] * shape[1],
    "rows": rows,
  }


def markdown(result: dict) -> str:
  """Peak memory per method and iteration count, in MiB and in multiples of the input."""
  by = {(r["method"], r["num_iters"]): r for r in result["rows"]}
  iters = sorted({r["num_iters"] for r in result["rows"]})
  mib = 2.0**20
  size = result["input_bytes"]
  rows = []
  for k in iters:
    row = [k]
    for m in METHODS:
      r = by[(m, k)]
      row += [f"{r['peak_bytes'] / mib:.0f} ({r['peak_bytes'] / size:.1f}×)"]
      row += [f"{r['xla_temp_bytes'] / mib:.0f}"]
    rows.append(row)
  headers = [
    "iterations",
    "implicit peak",
    "implicit XLA temp",
    "unrolled peak",
    "unrolled XLA temp",
  ]
  shape = "×".join(map(str, result["shape"]))
  source = result["rows"][0]["source"]
  return (
    f"## Memory of forward+backward on [{shape}] float32 (MiB; × input size)\n\n"
    f"peak = {source}; XLA temp = compiled temporaries.\n\n"
    + common.markdown_table(headers, rows)
    + "\n"
  )


def plot(result: dict, out_dir) -> list[pathlib.Path]:
  """Peak memory vs iterations for both methods."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.2))
  for m, color in zip(METHODS, ("tab:blue", "tab:red"), strict=True):
    rows = sorted((r for r in result["rows"] if r["method"] == m), key=lambda r: r["num_iters"])
    ks = [r["num_iters"] for r in rows]
    ax.plot(ks, [r["peak_bytes"] / 2**20 for r in rows], "-o", color=color, label=f"{m} peak")
    ax.plot(
      ks, [r["xla_temp_bytes"] / 2**20 for r in rows], ":", color=color, label=f"{m} XLA temp"
    )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("solver iterations", fontsize=8)
  ax.set_ylabel("MiB", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=7)
  ax.set_title(f"grad memory, {'×'.join(map(str, result['shape']))} float32", fontsize=9)
  return [common.write_figure(fig, pathlib.Path(out_dir) / "memory.png")]


def main(argv=None) -> None:
  parser = common.module_parser("memory", __doc__, plot)
  parser.add_argument("--child", nargs=2, metavar=("METHOD", "ITERS"), help=argparse.SUPPRESS)
  parser.add_argument("--shape", nargs=2, type=int, default=(64, 8192), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    method, iters = args.child
    print(json.dumps(measure_here(method, int(iters), tuple(args.shape))))
    return
  common.module_run("memory", args, run, markdown, plot)


if __name__ == "__main__":
  main()

"""Long-sequence entropy attention on the CPU: peak memory and forward time, dense vs blockwise.

Two figures (batch 1, one head, head dim 64, float32, relative target 0.5):

* memory: each (implementation, length) runs causal forward+backward (``jax.grad`` of a random
  projection of the output w.r.t. q, k, v) once in a fresh subprocess, which reports its peak
  resident set (``VmHWM``: the whole process, JAX runtime included) and the growth of the peak
  during the call (peak reset through ``/proc/self/clear_refs`` after compiling). The dense
  reference holds the [q_len, kv_len] scores (4 GiB per head in float32 at 32,768 tokens) and is
  run up to 8,192 tokens; beyond that the table gives its score size only. The bar: blockwise at
  32,768 tokens under 2 GiB peak.
* time: forward of dense vs blockwise at 4,096 tokens (non-causal, so the blockwise version
  skips no block; causal too) and shorter, compiled ahead, warmed up,
  repeats interleaved (``benchmarks.common.time_calls``), medians with the interquartile range.
  The bar: blockwise <= 1.5x dense. The machine is shared with other jobs while these figures
  are taken: expect noise; ratios come from the same process.

Run ``python -m benchmarks.long_attention [--quick] [--out DIR] [--plot-only]``; a full run writes
``benchmarks/results/long_attention.*`` (see :func:`benchmarks.common.out_dir`).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from entnorm_jax import attention as ena

DIM = 64
TARGET = 0.5
BLOCKS = {"blockwise": dict(block_q=256, block_k=256)}
MEMORY_BAR_BYTES = 2 * 1024**3
TIME_BAR = 1.5


def _attention(implementation: str, causal: bool):
  kw = BLOCKS.get(implementation, {})

  def f(q, k, v):
    return ena.entropy_attention(
      q, k, v, target_fraction=TARGET, is_causal=causal, implementation=implementation, **kw
    )

  return f


def _inputs(n: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(kk, (1, n, 1, DIM), jnp.float32) for kk in keys]


def _status_kib(field: str) -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise KeyError(field)


def measure_here(implementation: str, n: int, causal: bool) -> dict:
  """Forward+backward once at length ``n`` in this process; peak memory and time."""
  q, k, v, w = _inputs(n)
  attend = _attention(implementation, causal)

  def loss(q, k, v):
    return jnp.sum(attend(q, k, v) * w)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  start = time.perf_counter()
  compiled = grad.lower(q, k, v).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis()
  before = _status_kib("VmRSS")
  pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
  start = time.perf_counter()
  jax.block_until_ready(compiled(q, k, v))
  run_s = time.perf_counter() - start
  peak = _status_kib("VmHWM")
  return {
    "implementation": implementation,
    "length": n,
    "causal": causal,
    "peak_rss_bytes": peak * 1024,
    "call_growth_bytes": (peak - before) * 1024,
    "xla_temp_bytes": None if temp is None else int(temp.temp_size_in_bytes),
    "compile_s": compile_s,
    "fwd_bwd_s": run_s,
  }


def measure_subprocess(implementation: str, n: int, causal: bool = True) -> dict:
  """:func:`measure_here` in a fresh Python process (so peaks do not mix)."""
  cmd = [sys.executable, "-m", "benchmarks.long_attention", "--child", implementation, str(n)]
  if not causal:
    cmd.append("--full")
  root = pathlib.Path(__file__).resolve().parent.parent
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
  return json.loads(out.stdout.strip().splitlines()[-1])


def time_forward(cases, *, repeats: int, budget_s: float, warmup_s: float = 1.0) -> list[dict]:
  """Dense vs blockwise forward time per ``(length, causal)`` (interleaved repeats, one process)."""
  rows = []
  for n, causal in cases:
    q, k, v, _ = _inputs(n, seed=1)
    fns = {
      impl: (common.compile_ahead(_attention(impl, causal), q, k, v), (q, k, v))
      for impl in ("xla", "blockwise")
    }
    stats = common.time_calls(fns, repeats=repeats, max_total_s=budget_s, warmup_s=warmup_s)
    ratio = stats["blockwise"]["median_s"] / stats["xla"]["median_s"]
    rows.append({"length": n, "causal": causal, "dense": stats["xla"],
                 "blockwise": stats["blockwise"], "ratio": ratio})  # fmt: skip
  return rows


def run(quick: bool = False) -> dict:
  """Memory vs length (subprocesses) and forward time (this process); JSON-serializable."""
  if quick:
    dense_lengths, block_lengths = [1024], [1024]
    time_cases = [(1024, False)]
  else:
    dense_lengths = [1024, 2048, 4096, 8192]
    block_lengths = [1024, 2048, 4096, 8192, 16384, 32768]
    time_cases = [(1024, False), (2048, False), (4096, False), (4096, True)]
  memory = [measure_subprocess("xla", n) for n in dense_lengths]
  memory += [measure_subprocess("blockwise", n) for n in block_lengths]
  timing = time_forward(
    time_cases,
    repeats=3 if quick else 9,
    budget_s=10 if quick else 150,
    warmup_s=common.warmup_s(quick),
  )
  longest = max(block_lengths)
  blockwise = [r for r in memory if r["implementation"] == "blockwise"]
  at_longest = next(r for r in blockwise if r["length"] == longest)
  at_4096 = next((r for r in timing if r["length"] == 4096 and not r["causal"]), None)
  return {
    "config": {
      "batch": 1,
      "heads": 1,
      "dim": DIM,
      "dtype": "float32",
      "target_entropy": TARGET,
      "relative": True,
      **BLOCKS["blockwise"],
    },  # fmt: skip
    "memory": memory,
    "timing": timing,
    "bars": {
      "memory_length": longest,
      "memory_peak_bytes": at_longest["peak_rss_bytes"],
      "memory_met": longest == 32768 and at_longest["peak_rss_bytes"] < MEMORY_BAR_BYTES,
      "time_ratio_4096": None if at_4096 is None else at_4096["ratio"],
      "time_met": None if at_4096 is None else at_4096["ratio"] <= TIME_BAR,
    },
    "environment": common.environment(),
    "notes": "CPU shared with other jobs while measured; times are medians of interleaved repeats.",
  }


def _spread(stats: dict) -> str:
  t = common.fmt_time
  return f"{t(stats['median_s'])} ({t(stats['q25_s'])}–{t(stats['q75_s'])})"


def _mib(x) -> str:
  return "—" if x is None else f"{x / 2**20:,.0f} MiB"


def markdown(result: dict) -> str:
  cfg = result["config"]
  lines = [
    "## Long-sequence entropy attention (CPU)",
    "",
    f"batch {cfg['batch']}, {cfg['heads']} head, dim {cfg['dim']}, {cfg['dtype']}, "
    f"relative target {cfg['target_entropy']}; blockwise blocks {cfg['block_q']}x{cfg['block_k']}."
    f" Device: {result['environment']['cpu_model']} ({result['environment']['cpu_count']} cores).",
    "",
    "### Peak memory, causal forward + backward (one fresh process each)",
    "",
  ]
  rows = []
  for r in result["memory"]:
    rows.append([
      "dense (xla)" if r["implementation"] == "xla" else "blockwise", r["length"],
      _mib(r["peak_rss_bytes"]), _mib(r["call_growth_bytes"]), _mib(r["xla_temp_bytes"]),
      f"{r['fwd_bwd_s']:.2f} s",
    ])  # fmt: skip
  lines.append(common.markdown_table(
    ["implementation", "tokens", "peak RSS", "growth in call", "XLA temp", "fwd+bwd"], rows
  ))  # fmt: skip
  lines += ["", "### Forward time (medians, IQR)", ""]
  rows = []
  for r in result["timing"]:
    d, b = r["dense"], r["blockwise"]
    rows.append([
      r["length"], "yes" if r["causal"] else "no", _spread(d), _spread(b), f"{r['ratio']:.2f}x",
    ])  # fmt: skip
  headers = ["tokens", "causal", "dense", "blockwise", "blockwise / dense"]
  lines.append(common.markdown_table(headers, rows))
  bars = result["bars"]
  lines += [
    "",
    f"- Memory bar (blockwise fwd+bwd at 32,768 tokens < 2 GiB peak): measured at "
    f"{bars['memory_length']} tokens, {_mib(bars['memory_peak_bytes'])} -> "
    f"{'met' if bars['memory_met'] else 'not met / not measured'}.",
    "- Time bar (blockwise forward <= 1.5x dense at 4,096 tokens, non-causal): "
    + (
      "not measured"
      if bars["time_ratio_4096"] is None
      else f"{bars['time_ratio_4096']:.2f}x -> {'met' if bars['time_met'] else 'not met'}"
    ),  # fmt: skip
    f"- {result['notes']}",
  ]
  if result["environment"]["backend"] == "cpu":
    lines.append(
      "- GPU: `python -m benchmarks.gpu_attention --out DIR` checks the Pallas kernel against the "
      "dense reference on a GPU and times it against `jax.nn.dot_product_attention`; no GPU was "
      "available for these figures (its `--smoke` mode, interpreted kernels, runs on the CPU)."
    )
  return "\n".join(lines) + "\n"


def plot(result: dict, out_dir) -> pathlib.Path:
  """Two panels: peak memory of forward+backward vs length (dense and blockwise), and the
  blockwise forward time over the dense one per length."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, at) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
  styles = (("xla", "dense (xla)", "o", "tab:red"), ("blockwise", "blockwise", "s", "tab:blue"))
  for impl, label, marker, color in styles:
    rows = [r for r in result["memory"] if r["implementation"] == impl]
    ax.plot([r["length"] for r in rows], [r["peak_rss_bytes"] / 2**30 for r in rows],
            marker=marker, ms=7, lw=2, color=color, label=label)  # fmt: skip
  lengths = np.array(sorted({r["length"] for r in result["memory"]}))
  peak = {r["length"]: r["peak_rss_bytes"] / 2**30 for r in result["memory"]
          if r["implementation"] == "xla"}  # fmt: skip
  dense = list(peak)
  if dense and max(dense) < lengths.max():
    n, top = max(dense), lengths.max()
    ax.annotate(
      f"dense not run beyond {n:,} tokens\n(N×N scores: {4 * top**2 / 2**30:.0f} GiB at {top:,})",
      xy=(n, peak[n]), xytext=(n * 1.4, 0.08), fontsize=10, color="tab:red",
      arrowprops=dict(arrowstyle="->", color="tab:red"),
    )  # fmt: skip
  # The N×N line is drawn over the whole axis, so it shows whatever lengths were measured.
  span = np.geomspace(min(lengths.min(), 1024), max(lengths.max(), 65536), 32)
  ax.plot(span, 4.0 * span**2 / 2**30, "k:", label="one head's N×N float32 scores")
  ax.axhline(MEMORY_BAR_BYTES / 2**30, color="0.3", lw=1, ls="--", label="2 GiB target")
  ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="peak RSS, forward + backward (GiB)")
  ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
  ax.xaxis.set_minor_locator(plt.NullLocator())
  ax.set_ylim(0.05, 40)
  ax.legend(fontsize=10, loc="upper left")
  ax.set_title("peak memory, causal, 1 head, dim 64, float32", fontsize=11)

  timing = result.get("timing", [])
  for causal, label, marker, color in ((False, "non-causal", "o", "tab:blue"),
                                       (True, "causal", "D", "tab:green")):  # fmt: skip
    rows = [r for r in timing if r["causal"] == causal and r.get("ratio") is not None]
    if rows:
      at.plot([r["length"] for r in rows], [r["ratio"] for r in rows], marker=marker, ms=8,
              lw=2, ls="-" if len(rows) > 1 else "none", color=color, label=label)  # fmt: skip
  at.axhline(TIME_BAR, color="0.3", lw=1, ls="--", label=f"{TIME_BAR:g}× target")
  at.axhline(1.0, color="k", lw=0.8)
  timed = sorted({r["length"] for r in timing})
  at.set(xscale="log", xlabel="tokens", ylabel="blockwise time / dense time")
  if timed:
    at.set_xticks(timed, [f"{n:,}" for n in timed])
  at.xaxis.set_minor_locator(plt.NullLocator())
  at.set_ylim(0, max([TIME_BAR * 1.2] + [r["ratio"] * 1.15 for r in timing if r.get("ratio")]))
  at.legend(fontsize=10, loc="lower right")
  at.set_title("forward time, medians (below 1: blockwise faster)", fontsize=11)
  for a in (ax, at):
    a.tick_params(labelsize=10)
    a.xaxis.label.set_size(11)
    a.yaxis.label.set_size(11)
  fig.suptitle("Entropy attention at long lengths on the CPU: dense vs blockwise", fontsize=12)
  fig.tight_layout()
  return common.write_figure(fig, pathlib.Path(out_dir) / "long_attention.png")


def main(argv=None) -> None:
  parser = common.module_parser("long_attention", __doc__, plot)
  parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "LENGTH"))
  parser.add_argument("--full", action="store_true", help="(child) non-causal attention")
  args = parser.parse_args(argv)
  if args.child:
    impl, n = args.child
    print(json.dumps(measure_here(impl, int(n), causal=not args.full)))
    return
  common.module_run("long_attention", args, run, markdown, plot)


if __name__ == "__main__":
  main()

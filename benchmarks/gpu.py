"""The GPU benchmark: the card, the core's accuracy and speed, and entropy attention's speed.

One command, on whatever accelerator JAX sees, sized to finish in under eight minutes on an
H100/H200-class GPU::

    python -m benchmarks.gpu [--out DIR] [--smoke]

Steps (each guarded: a failure is recorded with its traceback and the next step runs; ``gpu.json``
and ``gpu.md`` are rewritten after every step, so a run cut short still leaves what it measured;
after :data:`BUDGET_S` seconds the remaining sizes and steps are skipped, and recorded as such):

1. ``device``: the card (``device_kind``, platform, jax/jaxlib and plugin versions, driver);
2. ``core_accuracy``: ``entropy_softmax(x, target_fraction=0.5, implementation=impl)`` for
   ``"pallas"`` and ``"xla"``, float32, against a float64 reference solved on the host with numpy
   (bisection on γ): max |H(q) - target|, max |q - q_ref|, the gradient of ``sum(w * q)``
   against the implicit-function formula in float64, and the two implementations against each
   other; dense rows, ragged + masked rows (an empty row and a one-entry row included), and the
   longest row the Pallas kernel holds;
3. ``core_timing``: float32, logits ``3 * normal``, target 0.5 relative, at [4096, 1024],
   [256, 32768] and [65536, 128]: forward, and the gradient of ``sum(w * f(x))``, of
   ``entropy_softmax`` (``"pallas"``, ``"xla"``) and ``jax.nn.softmax``, with the ratios.
   Target: the fused core's forward <= 1.5x softmax's;
   ``kernel_registers``: the registers and spills of the timed Pallas kernels, read from
   ``benchmarks/results/kernels.json`` (``python -m benchmarks.kernels``, made on a CPU with the
   real Triton compiler) by matching each kernel's Triton IR, so a timing reads beside them;
4. ``attention_accuracy``: the Pallas entropy-attention kernel against the dense reference
   (:func:`benchmarks.gpu_attention.check_accuracy`, ``check_bf16``);
5. ``attention_timing``: a block-size sweep at 8k tokens, then entropy attention (Pallas) against
   ``jax.nn.dot_product_attention`` (cuDNN where it runs, else XLA), bfloat16, batch 1, 8 heads,
   head dim 64, causal, 1k to 32k tokens, forward and forward+backward
   (:func:`benchmarks.gpu_attention.time_lengths`). Target: forward+backward <= 3x flash
   attention at 8k.

``--smoke`` runs every step at toy sizes (on a CPU, with the Pallas kernels interpreted), to check
the script; its speed figures mean nothing. A run on a CPU is always a smoke run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import subprocess
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import entnorm_jax as en
from benchmarks import common, gpu_attention, kernels
from entnorm_jax._src import hooks

# Remaining sizes and steps are skipped after this many seconds (the whole run stays under 8 min).
BUDGET_S = 420.0
TARGET = 0.5  # relative: a fraction of log(n_valid)
IMPLEMENTATIONS = ("pallas", "xla")
CORE_SHAPES = ((4096, 1024), (256, 32768), (65536, 128))
SMOKE_CORE_SHAPES = ((64, 48),)
ATTENTION_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
CORE_FORWARD_BAR = 1.5  # fused core forward / softmax forward
ATTENTION_FWD_BWD_BAR = 3.0  # entropy attention / flash attention, forward+backward at 8k
ATTENTION_BAR_LENGTH = 8192
# Smoke runs time nothing that matters, so XLA:CPU may compile without optimizing (2-3x faster).
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ---------------------------------------------------------------------------------------------
# 1. The device


def _driver() -> str | None:
  """The GPU driver's version, from the kernel module or ``nvidia-smi``/``rocm-smi``."""
  try:
    return pathlib.Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
  except (OSError, IndexError):
    pass
  commands = (
    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
    ["rocm-smi", "--showdriverversion"],
  )
  for cmd in commands:
    try:
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
      return done.stdout.strip()[:500]
    except (OSError, subprocess.SubprocessError):
      continue
  return None


def device() -> dict:
  """The accelerator and the software that drives it."""
  env = common.environment()
  dev = jax.devices()[0]
  plugins = {
    d.metadata["Name"]: d.version
    for d in importlib.metadata.distributions()
    if (d.metadata["Name"] or "").lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm"))
  }
  memory = None
  try:
    memory = (dev.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 - not every backend reports memory
    pass
  env.update(
    platform=dev.platform,
    compute_capability=getattr(dev, "compute_capability", None),
    memory_bytes=memory,
    plugins=plugins,
    driver=_driver(),
    core_implementations=list(hooks.IMPLEMENTATIONS),
    pallas_max_length=hooks.pallas_core.MAX_LENGTH,
  )
  return env


# ---------------------------------------------------------------------------------------------
# 2. Core accuracy against float64


def reference(x: np.ndarray, valid: np.ndarray, w: np.ndarray) -> dict:
  """float64 solution on the host: q = softmax(γ z) with H(q) = TARGET·log(n_valid) per row.

  γ is found by bisection (H decreases in γ >= 0); the gradient of ``sum(w * q)`` w.r.t. z is the
  implicit-function formula: with u = w q, m = E_q[z], V = Var_q[z] and c = Σ u (z - m),
  ``grad = γ (u - q Σu) - (c γ / V) q (z - m)``.

  Returns:
    ``q``, ``grad`` (like ``x``, 0 where masked) and ``target`` (nats, per row).
  """
  z = np.asarray(x, np.float64)
  n_valid = valid.sum(-1)
  target = TARGET * np.log(np.maximum(n_valid, 1))
  z = np.where(
    valid, z - np.max(np.where(valid, z, -np.inf), -1, keepdims=True, initial=-np.inf), 0
  )

  def solve(gamma):
    logits = np.where(valid, gamma[:, None] * z, -np.inf)
    top = np.max(logits, -1, keepdims=True, initial=-np.inf)
    logits = np.where(valid, logits - np.where(np.isfinite(top), top, 0.0), -np.inf)
    e = np.where(valid, np.exp(logits), 0.0)
    q = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    h = common.entropy64(q)
    return q, h

  lo, hi = np.zeros(len(z)), np.ones(len(z))
  for _ in range(64):  # bracket: H(hi) <= target (z <= 0 with a 0 entry, so H -> 0)
    _, h = solve(hi)
    if not np.any(h > target):
      break
    hi = np.where(h > target, 2 * hi, hi)
  for _ in range(80):
    mid = 0.5 * (lo + hi)
    _, h = solve(mid)
    lo, hi = np.where(h > target, mid, lo), np.where(h > target, hi, mid)
  gamma = 0.5 * (lo + hi)
  q, _ = solve(gamma)
  m = np.sum(q * z, -1, keepdims=True)
  var = np.sum(q * (z - m) ** 2, -1, keepdims=True)
  u = np.asarray(w, np.float64) * q
  c = np.sum(u * (z - m), -1, keepdims=True)
  g = gamma[:, None]
  shift = np.where(var > 0, c * g / np.where(var > 0, var, 1.0), 0.0)
  grad = g * (u - q * u.sum(-1, keepdims=True)) - shift * q * (z - m)
  return {"q": q, "grad": np.where(valid, grad, 0.0), "target": target}


def _core_cases(smoke: bool) -> dict:
  """name -> (logits, valid mask or None, cotangent w), float32 logits = 3 * normal. Smoke runs
  skip the longest row (a GPU concern) and give both other cases one shape (fewer compiles)."""
  rng = np.random.default_rng(0)
  dense, ragged = ((16, 40), (16, 40)) if smoke else ((512, 1000), (256, 3000))
  longest = (16, hooks.pallas_core.MAX_LENGTH)

  def logits(shape):
    return (3 * rng.standard_normal(shape)).astype(np.float32)

  rows, n = ragged
  lengths = rng.integers(2, n + 1, rows)
  lengths[:3] = (0, 1, 2)  # an empty row, a one-entry row, a two-entry row
  valid = (np.arange(n) < lengths[:, None]) & (rng.uniform(size=ragged) > 0.1)
  valid[1, 0] = True
  valid[2, :2] = True
  cases = {
    f"dense {list(dense)}": (logits(dense), None, logits(dense)),
    f"ragged+masked {list(ragged)}": (logits(ragged), valid, logits(ragged)),
  }
  if not smoke:
    cases[f"longest Pallas row {list(longest)}"] = (logits(longest), None, logits(longest))
  return cases


def _core_fn(impl: str):
  return lambda x, where=None: en.entropy_softmax(
    x, where=where, target_fraction=TARGET, implementation=impl
  )


def _value_and_grad(impl: str):
  """A jitted ``(x, w, where) -> (q, d sum(w q) / dx)``."""
  f = _core_fn(impl)
  return jax.jit(lambda x, w, where: (f(x, where), jax.grad(lambda x: jnp.sum(w * f(x, where)))(x)))


def core_accuracy(smoke: bool) -> list[dict]:
  """Each implementation against the float64 reference and against the other."""
  jitted = {impl: _value_and_grad(impl) for impl in IMPLEMENTATIONS}
  rows = []
  for name, (x, valid, w) in _core_cases(smoke).items():
    mask = np.ones(x.shape, bool) if valid is None else valid
    ref = reference(x, mask, w)
    row = {"case": name, "shape": list(x.shape)}
    got = {}
    for impl in IMPLEMENTATIONS:
      try:
        where = None if valid is None else jnp.asarray(valid)
        q, g = (np.asarray(a, np.float64) for a in jitted[impl](x, w, where))
        got[impl] = (q, g)
        nonempty = mask.sum(-1) >= 2
        scale = max(np.max(np.abs(ref["grad"])), 1e-30)
        entropy_error = np.abs(common.entropy64(q) - ref["target"])[nonempty]
        row[impl] = {
          "max_abs_entropy_error": float(np.max(entropy_error)),
          "max_abs_q_error": float(np.max(np.abs(q - ref["q"]))),
          "max_grad_error_rel": float(np.max(np.abs(g - ref["grad"])) / scale),
          "masked_exactly_zero": bool(np.all(q[~mask] == 0) and np.all(g[~mask] == 0)),
          "finite": bool(np.all(np.isfinite(q)) and np.all(np.isfinite(g))),
        }
        e = row[impl]
        e["ok"] = bool(
          e["max_abs_entropy_error"] < 1e-4 * np.log(x.shape[-1])
          and e["max_abs_q_error"] < 1e-4
          and e["max_grad_error_rel"] < 1e-3
          and e["masked_exactly_zero"]
          and e["finite"]
        )
      except Exception:  # noqa: BLE001 - recorded; the other implementation still runs
        row[impl] = {"error": traceback.format_exc(limit=4)[-2000:]}
    if len(got) == 2:
      (qa, ga), (qb, gb) = got.values()
      row["pallas_vs_xla"] = {
        "max_abs_q_diff": float(np.max(np.abs(qa - qb))),
        "max_grad_diff_rel": float(np.max(np.abs(ga - gb)) / max(np.max(np.abs(gb)), 1e-30)),
      }
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------------------------
# 3. Core timing


def core_timing(smoke: bool, deadline: float) -> list[dict]:
  """Forward and gradient medians of the core's implementations and of ``jax.nn.softmax``."""
  fns = {f"entropy_softmax[{impl}]": _core_fn(impl) for impl in IMPLEMENTATIONS}
  fns["softmax"] = jax.nn.softmax
  max_length = hooks.pallas_core.MAX_LENGTH
  rows = []
  for i, shape in enumerate(SMOKE_CORE_SHAPES if smoke else CORE_SHAPES):
    row = {"shape": list(shape)}
    rows.append(row)
    if shape[-1] > max_length:
      row["note"] = f"rows longer than {max_length}: the Pallas path runs the XLA layout"
    if time.perf_counter() > deadline:
      row["skipped"] = "time budget"
      continue
    try:
      x = common.random_logits(10 + i, shape, 3.0)
      w = jax.random.normal(jax.random.key(20 + i), shape, jnp.float32)
      forward = {name: (common.compile_ahead(f, x), (x,)) for name, f in fns.items()}
      grad = {
        name: (common.compile_ahead(jax.grad(lambda x, w, f=f: jnp.sum(w * f(x))), x, w), (x, w))
        for name, f in fns.items()
      }
      budget = 2 if smoke else 15
      timing = dict(repeats=5 if smoke else 15, max_total_s=budget, warmup_s=common.warmup_s(smoke))
      fwd = common.time_calls(forward, **timing)
      bwd = common.time_calls(grad, **timing)
      row["forward_s"] = {name: s["median_s"] for name, s in fwd.items()}
      row["grad_s"] = {name: s["median_s"] for name, s in bwd.items()}
      soft_f, soft_g = row["forward_s"]["softmax"], row["grad_s"]["softmax"]
      row["forward_over_softmax"] = {
        name: t / soft_f for name, t in row["forward_s"].items() if name != "softmax"
      }
      row["grad_over_softmax"] = {
        name: t / soft_g for name, t in row["grad_s"].items() if name != "softmax"
      }
      n = shape[-1]
      row["max_abs_entropy_error"] = {
        name: float(jnp.max(jnp.abs(_entropy_f32(forward[name][0](x)) - TARGET * np.log(n))))
        for name in fns
        if name != "softmax"
      }
    except Exception:  # noqa: BLE001 - recorded; the next shape still runs
      row["error"] = traceback.format_exc(limit=4)[-2000:]
  return rows


@jax.jit
def _entropy_f32(q):
  return -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0), -1)


def kernel_registers(smoke: bool) -> dict:
  """Registers and spills of the core kernels that ``core_timing`` runs (forward and gradient),
  read from ``benchmarks/results/kernels.json`` (``python -m benchmarks.kernels``) by matching
  their Triton IR; kernels the table lacks are listed as such."""
  path = pathlib.Path(kernels.RESULTS) / "kernels.json"
  table = json.loads(path.read_text())["gpu"] if path.exists() else []
  out = {}
  for shape in SMOKE_CORE_SHAPES if smoke else CORE_SHAPES:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    f = _core_fn("pallas")
    grad = jax.grad(lambda x, f=f: jnp.sum(jnp.arange(x.shape[-1]) * f(x)))
    out[f"{list(shape)} forward"] = kernels.lookup(f, (x,), table)
    out[f"{list(shape)} gradient"] = kernels.lookup(grad, (x,), table)
  return out


def _registers_markdown(result: dict) -> list[str]:
  rows = result.get("kernel_registers")
  if not rows:
    return []
  lines = ["", "### Registers of the timed core kernels (benchmarks/results/kernels.json)", ""]
  for label, found in rows.items():
    for r in found:
      if not r.get("in_table", True):
        lines.append(f"- {label}: {r['kernel']} not in the table (rerun benchmarks.kernels)")
      else:
        lines.append(
          f"- {label}: {r['kernel']} {r['arch']}: {r.get('registers')} registers, "
          f"{kernels.spills(r)} B spilled, {r.get('num_warps')} warps"
        )
  if not any(rows.values()):
    lines.append("- no Pallas kernel at these shapes (the XLA layout)")
  return lines


# ---------------------------------------------------------------------------------------------
# 4-5. Attention (the steps of benchmarks.gpu_attention at this script's sizes)


def attention_accuracy(smoke: bool, interpret: bool) -> dict:
  """Pallas entropy attention vs the dense reference: float32 outputs and gradients, bfloat16."""
  cases = ("gqa+causal+lengths",) if smoke else None  # interpreted kernels compile slowly
  result = {"accuracy": gpu_attention.check_accuracy(smoke, interpret, cases)}
  if not smoke:
    result["bf16"] = gpu_attention.check_bf16(smoke, interpret)
  return result


def attention_timing(smoke: bool, interpret: bool, deadline: float) -> dict:
  """The block sweep (full runs), then forward and forward+backward at every length."""
  result = {}
  blocks = "16x16" if smoke else "64x64"
  if not smoke and deadline - time.perf_counter() > 240:
    result["sweep"] = gpu_attention.sweep_blocks(smoke, interpret, deadline - 200)
    blocks = result["sweep"]["best"]
  result["blocks"] = blocks
  result["timing"] = gpu_attention.time_lengths(
    smoke,
    interpret,
    blocks,
    deadline,
    lengths=(64,) if smoke else ATTENTION_LENGTHS,
    grad_up_to=max(ATTENTION_LENGTHS),
    extras=False,
  )
  return result


# ---------------------------------------------------------------------------------------------
# Targets and report


def bars(result: dict) -> list[dict]:
  """The speed targets, met or not (None where unmeasured, and in smoke runs)."""
  out = []
  for row in result.get("core_timing") or []:
    ratio = row.get("forward_over_softmax", {}).get("entropy_softmax[pallas]")
    out.append({
      "target": f"entropy_softmax[pallas] forward <= {CORE_FORWARD_BAR}x softmax at {row['shape']}",
      "ratio": ratio,
      "met": None if ratio is None else bool(ratio <= CORE_FORWARD_BAR),
    })  # fmt: skip
  timing = (result.get("attention_timing") or {}).get("timing") or []
  at = [r for r in timing if r["length"] == ATTENTION_BAR_LENGTH]
  ratio = at[0].get("fwd_bwd_pallas_over_flash") if at else None
  out.append({
    "target": f"entropy attention fwd+bwd <= {ATTENTION_FWD_BWD_BAR}x flash at "
              f"{ATTENTION_BAR_LENGTH} tokens",
    "ratio": ratio,
    "met": None if ratio is None else bool(ratio <= ATTENTION_FWD_BWD_BAR),
  })  # fmt: skip
  if result.get("smoke"):
    out = [dict(b, met=None) for b in out]
  return out


def _cell(value, fmt=".1e") -> str:
  return "—" if value is None else format(value, fmt)


def _core_markdown(result: dict) -> list[str]:
  lines = []
  acc = result.get("core_accuracy")
  if acc:
    rows = []
    for r in acc:
      for impl in IMPLEMENTATIONS:
        e = r.get(impl)
        if not isinstance(e, dict) or "error" in e:
          rows.append([r["case"], impl, "error" if isinstance(e, dict) else e, "", "", "", ""])
          continue
        rows.append([
          r["case"], impl, _cell(e["max_abs_entropy_error"]), _cell(e["max_abs_q_error"]),
          _cell(e["max_grad_error_rel"]), "yes" if e["masked_exactly_zero"] else "NO",
          "ok" if e["ok"] else "CHECK",
        ])  # fmt: skip
      if "pallas_vs_xla" in r:
        d = r["pallas_vs_xla"]
        rows.append([r["case"], "pallas vs xla", "", _cell(d["max_abs_q_diff"]),
                     _cell(d["max_grad_diff_rel"]), "", ""])  # fmt: skip
    lines += ["", "### Core accuracy (float32 vs float64 reference, target 0.5 relative)", ""]
    lines.append(common.markdown_table(
      ["case", "implementation", "max abs H - target", "max abs q err", "grad err / max grad",
       "masked = 0", ""], rows))  # fmt: skip
  timing = result.get("core_timing")
  if timing:
    rows = []
    for r in timing:
      if "forward_s" not in r:
        rows.append([r["shape"], r.get("skipped") or "error"] + [""] * 5)
        continue
      for name, t in r["forward_s"].items():
        rows.append([
          r["shape"], name, common.fmt_time(t), common.fmt_time(r["grad_s"][name]),
          _cell(r["forward_over_softmax"].get(name), ".2f"),
          _cell(r["grad_over_softmax"].get(name), ".2f"),
          _cell(r["max_abs_entropy_error"].get(name)),
        ])  # fmt: skip
      if "note" in r:
        rows.append([r["shape"], r["note"]] + [""] * 5)
    lines += ["", "### Core speed (float32, logits 3·normal, medians)", ""]
    lines.append(common.markdown_table(
      ["shape", "function", "forward", "grad of sum(w·f)", "fwd / softmax", "grad / softmax",
       "max abs H - target"], rows))  # fmt: skip
  return lines


def markdown(result: dict) -> str:
  env = result.get("device") or {}
  lines = [
    "## GPU benchmark: entropy-normalized softmax and attention",
    "",
    f"Device: {env.get('device_kind')} ({env.get('platform')}), driver {env.get('driver')}; "
    f"jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, plugins {env.get('plugins')}; "
    f"smoke={result['smoke']}, Pallas interpreted={result['interpret']}; "
    f"wall {result.get('wall_s', 0):.0f} s.",
  ]
  if result["smoke"]:
    lines += ["", "Smoke run (toy sizes): the speed figures mean nothing."]
  lines += _core_markdown(result)
  lines += _registers_markdown(result)
  attention = {**(result.get("attention_accuracy") or {}), **(result.get("attention_timing") or {})}
  if attention:
    blocks = attention.get("blocks")
    lines += ["", "### Entropy attention (Pallas) vs jax.nn.dot_product_attention", ""]
    dim = 16 if result["smoke"] else 64
    lines += [f"bfloat16, batch 1, 8 heads, head dim {dim}, causal; Pallas blocks {blocks}.", ""]
    lines += gpu_attention.markdown_lines(attention)
  lines += ["", "### Targets (H100/H200-class)", ""]
  for b in bars(result):
    if b["ratio"] is None:
      lines.append(f"- {b['target']}: unmeasured")
      continue
    met = {None: "smoke run, not a measurement", True: "met", False: "NOT met"}[b["met"]]
    lines.append(f"- {b['target']}: {b['ratio']:.2f}x -> {met}")
  for name, why in result["skipped"].items():
    lines.append(f"- step {name} skipped: {why}")
  for name, err in result["errors"].items():
    lines.append(f"- step {name} failed: `{err.strip().splitlines()[-1]}`")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="folder for gpu.json and gpu.md (default: benchmarks/results, "
                      "or a temporary folder for smoke runs)")  # fmt: skip
  parser.add_argument("--smoke", action="store_true", help="toy sizes, interpreted kernels")
  args = parser.parse_args(argv)
  if args.smoke:  # read when the backends start, so only before any computation has run
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
  smoke = args.smoke or jax.default_backend() == "cpu"
  interpret = jax.default_backend() != "gpu"
  out = common.out_dir(args.out, smoke)
  start = time.perf_counter()
  deadline = start + BUDGET_S
  result = {"smoke": smoke, "interpret": interpret, "budget_s": BUDGET_S,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "errors": {}, "skipped": {}}  # fmt: skip

  def save():
    result["wall_s"] = time.perf_counter() - start
    result["bars"] = bars(result)
    common.save_json(result, out / "gpu.json")
    (out / "gpu.md").write_text(markdown(result))

  steps = {
    "device": device,
    "core_accuracy": lambda: core_accuracy(smoke),
    "core_timing": lambda: core_timing(smoke, deadline),
    "kernel_registers": lambda: kernel_registers(smoke),
    "attention_accuracy": lambda: attention_accuracy(smoke, interpret),
    "attention_timing": lambda: attention_timing(smoke, interpret, deadline),
  }
  gpu_attention.run_steps(result, steps.items(), save, start, deadline, always=("device",))
  print(markdown(result))
  print(f"written: {out / 'gpu.json'}, {out / 'gpu.md'}")
  return result


if __name__ == "__main__":
  main()

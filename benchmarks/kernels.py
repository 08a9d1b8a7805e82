"""What the real accelerator compilers make of every Pallas kernel: registers, spills, memory, MMA.

    python -m benchmarks.kernels [--out DIR] [--quick] [--no-tpu] [--sweep-core]

No accelerator is needed. Needs the ``kernels`` extra (``pip install -e ".[kernels]"``: Triton,
which bundles ``ptxas``, and ``jax[tpu]``, whose ``libtpu`` compiles for TPUs without one); keep
it out of the test environment (Triton alone is over 1 GB installed).

GPU (NVIDIA): every computation in :func:`gpu_cases` is lowered for ``cuda``; each Pallas kernel
is captured where jax's Triton lowering makes it (the Triton IR, with the ``num_warps`` and
``num_stages`` of the call), compiled by Triton to PTX for sm_80 (A100) and sm_90 (H100), and
assembled by ``ptxas -v``. Recorded per kernel and architecture: registers per thread, spill
stores and loads, stack frame, shared memory, the MMA instructions in the PTX (``wgmma``, ``mma``
or none), warps and stages. The counts are a real compiler's answer, but not exactly the build
XLA's own Triton makes on a GPU machine (another Triton version): a guide for choosing block
sizes, re-run whenever a kernel or its block sizes change.

TPU: ``benchmarks.kernels_tpu`` runs in a subprocess (libtpu wants its own environment
variables) and compiles the core and attention for v5e and v6e topologies without a TPU.

``--sweep`` builds the core kernel at every padded row length for every block in
:data:`SWEEP_CORE`, and the attention kernels for every dtype, precision, head dim and kernel shape
in :data:`SWEEP_ATTENTION_VARIANTS` x :data:`SWEEP_ATTENTION_DIMS` x :data:`SWEEP_ATTENTION_SHAPES`:
the measurements behind the tables :data:`entnorm_jax._src.pallas_core.GPU_CONFIGS` and
:data:`entnorm_jax._src.pallas_attention.GPU_SHAPES` (written to ``kernels_sweep.{json,md}``;
about 25 minutes on 2 cores).

Writes ``kernels.json`` and ``kernels.md`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import inspect
import io
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import entnorm_jax as en
from benchmarks import common
from entnorm_jax import attention as ena
from entnorm_jax._src import hooks
from entnorm_jax._src.hooks import pallas_core

ARCHS = (80, 90)  # sm_80 (A100), sm_90 (H100/H200)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory a block may use
CORE_SHAPES = ((4096, 128), (4096, 1000), (512, 4096), (64, 16384))
# Core: (warps, block entries per thread); a thread holds at most 255 registers (128 at 16 warps).
SWEEP_CORE = ((4, 8), (4, 16), (8, 8), (8, 16), (16, 8), (16, 16))
SWEEP_CORE_MAX_ROWS = 256
# Attention: (dtype, precision) variants, head dims, and (block_q, block_k, warps, stages).
SWEEP_ATTENTION_VARIANTS = ((jnp.bfloat16, None), (jnp.float32, None), (jnp.float32, "highest"))
SWEEP_ATTENTION_DIMS = (64, 128, 256)
SWEEP_ATTENTION_SHAPES = (
  (16, 16, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (64, 16, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2),
  (64, 64, 8, 2),
)  # fmt: skip
RESULTS = common.RESULTS_DIR  # where kernels.json is read from (benchmarks.gpu)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One Triton kernel as jax's Pallas lowering makes it."""

  name: str
  num_warps: int
  num_stages: int
  ttir: str  # the Triton module's text

  @property
  def key(self) -> str:
    text = f"{self.num_warps}/{self.num_stages}/{self.ttir}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def capture(fn, *args) -> list[Kernel]:
  """The Triton kernels of ``jax.jit(fn)`` lowered for CUDA (the computation is not compiled).

  The capture wraps ``lower_jaxpr_to_triton_module`` of jax's Pallas Triton lowering; its caller
  holds the kernel's name and the call's ``num_warps``/``num_stages``.
  """
  from jax._src.pallas.triton import lowering

  kernels = []
  original = lowering.lower_jaxpr_to_triton_module

  def recording(*a, **k):
    result = original(*a, **k)
    call = inspect.currentframe().f_back.f_locals
    text = result.module.operation.get_asm(enable_debug_info=False)
    kernels.append(Kernel(call["name"], call["num_warps"], call["num_stages"], text))
    return result

  lowering.lower_jaxpr_to_triton_module = recording
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  return kernels


_PTXAS_PATTERNS = {
  "registers": r"Used (\d+) registers",
  "stack_bytes": r"(\d+) bytes stack frame",
  "spill_store_bytes": r"(\d+) bytes spill stores",
  "spill_load_bytes": r"(\d+) bytes spill loads",
}


def build(ttir: str, num_warps: int, num_stages: int, cc: int) -> dict:
  """Compiles a Triton module for ``sm_<cc>`` and reads ``ptxas -v``'s report.

  Returns a dict of the report's numbers (``registers``, ``spill_store_bytes``,
  ``spill_load_bytes``, ``stack_bytes``), ``shared_bytes`` (Triton's allocation), ``mma``
  (``"wgmma"``, ``"mma"`` or ``"none"``, from the PTX) and ``compile_s``; or ``{"error": ...}``.
  """
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud
  os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton's own ptxas run prints its -v report
  from triton.backends.compiler import GPUTarget
  from triton.compiler import compile as triton_compile

  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["TRITON_CACHE_DIR"] = tmp
    path = pathlib.Path(tmp, "kernel.ttir")
    path.write_text(ttir)
    options = dict(num_warps=num_warps, num_stages=num_stages, num_ctas=1)
    log = io.StringIO()
    try:
      with contextlib.redirect_stdout(log):
        compiled = triton_compile(str(path), target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # noqa: BLE001 - a failed build is a measurement
      return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
  ptx, report = compiled.asm["ptx"], log.getvalue()
  if "Used" not in report:
    return {"error": f"no ptxas report in Triton's output: {report[-300:]!r}"}
  out = {
    k: int(m.group(1)) if (m := re.search(p, report)) else 0 for k, p in _PTXAS_PATTERNS.items()
  }
  out["shared_bytes"] = int(compiled.metadata.shared)
  out["mma"] = "wgmma" if "wgmma" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
  out["compile_s"] = round(time.perf_counter() - start, 2)
  return out


def _build_job(job):
  kernel, cc = job
  return build(kernel.ttir, kernel.num_warps, kernel.num_stages, cc)


def build_all(kernels: list[Kernel], jobs: int, log: pathlib.Path | None = None) -> dict:
  """``{(kernel.key, cc): build(...)}`` for every distinct kernel and :data:`ARCHS`, in ``jobs``
  processes; each result is also appended to ``log`` (JSON lines) as it comes."""
  unique = {k.key: k for k in kernels}
  work = [(k, cc) for k in unique.values() for cc in ARCHS]
  spawn = multiprocessing.get_context("spawn")  # jax's threads do not survive a fork
  results = {}
  with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
    futures = {pool.submit(_build_job, job): job for job in work}
    for done in concurrent.futures.as_completed(futures):
      k, cc = futures[done]
      results[k.key, cc] = done.result()
      if log is not None:
        with log.open("a") as f:
          f.write(json.dumps({"kernel": k.name, "key": k.key, "arch": cc, **results[k.key, cc]}))
          f.write("\n")
  return results


def built_rows(labelled: list[tuple[dict, Kernel]], jobs: int, log=None) -> list[dict]:
  """Builds the kernels of ``(fields, kernel)`` pairs (:func:`build_all`) and returns one row per
  pair and arch: the fields, the kernel's name, key, warps and stages, and its :func:`build`
  report."""
  builds = build_all([k for _, k in labelled], jobs, log)
  return [
    {**fields, "kernel": k.name, "key": k.key, "arch": f"sm_{cc}", "num_warps": k.num_warps,
     "num_stages": k.num_stages, **builds[k.key, cc]}
    for fields, k in labelled
    for cc in ARCHS
  ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# What the library emits


def _core_case(shape, dtype, implementation, direction):
  x = jax.ShapeDtypeStruct(shape, dtype)
  f = lambda x: en.entropy_softmax(x, target_fraction=0.5, implementation=implementation)
  if direction == "backward":
    g = jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * jnp.arange(shape[-1])))
    return hooks.as_on_an_accelerator(g), (x,)
  return hooks.as_on_an_accelerator(f), (x,)


def _attention_case(
  dtype, dim, is_causal, length, heads=8, kv_heads=8, direction="forward", precision=None
):
  q = jax.ShapeDtypeStruct((2, length, heads, dim), dtype)
  kv = jax.ShapeDtypeStruct((2, length, kv_heads, dim), dtype)

  def f(q, k, v):
    return ena.entropy_attention(
      q, k, v, target_fraction=0.5, is_causal=is_causal, implementation="pallas",
      precision=precision,
    )  # fmt: skip

  if direction == "backward":
    g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    return g, (q, kv, kv)
  return f, (q, kv, kv)


def gpu_cases(quick: bool = False) -> dict[str, tuple]:
  """label -> ``(fn, args)``: the core (default and forced ``"pallas"``, forward and backward,
  at :data:`CORE_SHAPES` float32, [4096, 1000] in 16-bit floats, and the longest row the kernel
  holds) and Pallas attention (forward and backward: bf16/f16/f32, head dims 64/128/256, causal
  and full, grouped-query heads)."""
  core = [(s, jnp.float32) for s in CORE_SHAPES]
  core += [((4096, 1000), jnp.bfloat16), ((4096, 1000), jnp.float16)]
  core += [((16, pallas_core.MAX_LENGTH), jnp.float32)]
  attention = [  # (dtype, dim, causal, length, heads, kv_heads, precision)
    (jnp.bfloat16, 64, True, 1024, 8, 8, None),
    (jnp.bfloat16, 64, False, 1024, 8, 8, None),
    (jnp.bfloat16, 128, True, 1024, 8, 8, None),
    (jnp.float32, 64, False, 1000, 8, 8, None),
    (jnp.float32, 128, True, 1000, 8, 8, None),
    (jnp.float16, 64, True, 1024, 8, 8, None),
    (jnp.bfloat16, 64, True, 1024, 8, 2, None),
    (jnp.bfloat16, 256, True, 1024, 8, 8, None),
    (jnp.float32, 64, False, 1000, 8, 8, "highest"),
  ]
  if quick:
    core, attention = core[1:2], attention[:1]
  cases = {}
  for shape, dtype in core:
    for impl in (None, "pallas"):
      for direction in ("forward", "backward"):
        label = f"core {jnp.dtype(dtype).name}{list(shape)} {impl or 'default'} {direction}"
        cases[label] = _core_case(shape, dtype, impl, direction)
  for dtype, dim, causal, length, heads, kv_heads, precision in attention:
    for direction in ("forward", "backward"):
      kind = "causal" if causal else "full"
      gqa = f" gqa {heads}/{kv_heads}" if kv_heads != heads else ""
      highest = f" {precision}" if precision else ""
      label = f"attention {jnp.dtype(dtype).name}{highest} d{dim} {kind} L{length}{gqa} {direction}"
      args = (dtype, dim, causal, length, heads, kv_heads, direction, precision)
      cases[label] = _attention_case(*args)
  return cases


def measure_gpu(cases: dict, jobs: int, log: pathlib.Path | None = None) -> list[dict]:
  """One row per (case, kernel, arch): the case's label, the kernel's name, warps and stages, and
  its :func:`build` report. A case that emits no kernel (the XLA layout, or the blockwise engine)
  gets one row saying so."""
  captured = {label: capture(fn, *args) for label, (fn, args) in cases.items()}
  labelled = [({"case": label}, k) for label, kernels in captured.items() for k in kernels]
  empty = [{"case": label, "kernel": None} for label, kernels in captured.items() if not kernels]
  order = {label: i for i, label in enumerate(captured)}
  return sorted(built_rows(labelled, jobs, log) + empty, key=lambda r: order[r["case"]])


def _core(x):
  return en.entropy_softmax(x, 1.0, implementation="pallas")


def _with_config(module, name, config, fn, *args):
  """``fn(*args)`` with ``module.name`` (a table look-up) answering ``config`` whatever it is
  asked (jax's caches cleared before and after: a cached trace would hold another one)."""
  original = getattr(module, name)
  setattr(module, name, lambda *a: config)
  jax.clear_caches()
  try:
    return fn(*args)
  finally:
    setattr(module, name, original)
    jax.clear_caches()


def sweep_core(jobs: int, log: pathlib.Path | None = None) -> list[dict]:
  """The core kernel at every padded row length up to ``2 · pallas_core.MAX_LENGTH`` (the next
  length up shows why it is the maximum) for each (warps, entries per thread) in
  :data:`SWEEP_CORE` (a block of ``warps · 32 · entries`` elements, at least one row and at most
  :data:`SWEEP_CORE_MAX_ROWS`: the solver keeps a few dozen values per row): one row per (length,
  block, warps, arch)."""
  labelled = []
  n = 1
  while n <= 2 * pallas_core.MAX_LENGTH:
    blocks = {(min(max(32 * w * e, n), SWEEP_CORE_MAX_ROWS * n), w) for w, e in SWEEP_CORE}
    for elements, warps in sorted(blocks):
      x = jax.ShapeDtypeStruct((4 * (elements // n), n), jnp.float32)
      config = pallas_core.GpuConfig(elements, warps)
      (kernel,) = _with_config(pallas_core, "gpu_config", config, capture, _core, x)
      labelled.append(({"n_pad": n, "block_rows": elements // n}, kernel))
    n *= 2
  return built_rows(labelled, jobs, log)


def sweep_attention(jobs: int, log: pathlib.Path | None = None) -> list[dict]:
  """Pallas attention (forward and backward: five kernels, causal, L = 1024) for every variant
  in :data:`SWEEP_ATTENTION_VARIANTS`, head dim in :data:`SWEEP_ATTENTION_DIMS` and kernel shape
  in :data:`SWEEP_ATTENTION_SHAPES`: one row per (variant, dim, shape, kernel, arch)."""
  from entnorm_jax._src.hooks import pallas_attention

  labelled = []
  for dtype, precision in SWEEP_ATTENTION_VARIANTS:
    for dim in SWEEP_ATTENTION_DIMS:
      for shape in SWEEP_ATTENTION_SHAPES:
        fn, args = _attention_case(
          dtype, dim, True, 1024, direction="backward", precision=precision
        )
        config = pallas_attention.KernelShape(*shape)
        fields = {"dtype": jnp.dtype(dtype).name, "precision": precision or "default",
                  "dim": dim, "block_q": shape[0], "block_k": shape[1]}  # fmt: skip
        for k in _with_config(pallas_attention, "gpu_shape", config, capture, fn, *args):
          labelled.append((fields, k))
  return built_rows(labelled, jobs, log)


def lookup(fn, args, table: list[dict]) -> list[dict]:
  """The rows of a ``kernels.json`` GPU table for the kernels ``fn(*args)`` emits on CUDA, matched
  by the kernel's Triton IR (so that a timing can be read beside the registers of exactly what ran):
  one row per kernel and arch, ``{"kernel", "arch", "in_table": False}`` where the table does not
  hold it (the kernel changed since the table was made, or another compute capability)."""
  rows = []
  for k in capture(fn, *args):
    found = {(r["key"], r["arch"]): r for r in table if r.get("key") == k.key}
    rows += list(found.values()) or [{"kernel": k.name, "key": k.key, "in_table": False}]
  return rows


# ---------------------------------------------------------------------------------------------
# Tables


def spills(row: dict) -> int:
  return row.get("spill_store_bytes", 0) + row.get("spill_load_bytes", 0)


def summary(rows: list[dict]) -> dict:
  """Builds, failures, kernels that spill, the worst spill, shared memory over each arch's limit,
  and float32 attention kernels with a matmul but no tensor-core MMA."""
  built = [r for r in rows if r.get("kernel")]
  failed = [r for r in built if "error" in r]
  ok = [r for r in built if "error" not in r]
  spilling = [r for r in ok if spills(r) > 0]
  over = [r for r in ok if r["shared_bytes"] > SHARED_LIMIT[int(r["arch"][3:])]]
  return {
    "builds": len(built),
    "distinct_kernels": len({r["key"] for r in built}),
    "failed": len(failed),
    "spilling": len(spilling),
    "worst_spill_bytes": max((spills(r) for r in ok), default=0),
    "shared_over_limit": len(over),
    "max_shared_bytes": {a: max((r["shared_bytes"] for r in ok if r["arch"] == a), default=0)
                         for a in (f"sm_{cc}" for cc in ARCHS)},
  }  # fmt: skip


def _gpu_markdown(rows: list[dict]) -> list[str]:
  lines = [
    "| case | kernel | arch | warps | stages | registers | spill st/ld (B) | stack (B) "
    "| shared (KiB) | MMA |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if not r.get("kernel"):
      lines.append(f"| {r['case']} | (no Pallas kernel: XLA layout or blockwise) | | | | | | | | |")
    elif "error" in r:
      lines.append(
        f"| {r['case']} | {r['kernel']} | {r['arch']} | | | failed: {r['error']} | | | | |"
      )
    else:
      lines.append(
        f"| {r['case']} | {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} "
        f"| {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} "
        f"| {r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['mma']} |"
      )
  return lines


def _tpu_markdown(rows: list[dict]) -> list[str]:
  lines = [
    "| topology | what | implementation | direction | dtype | shape | compiles | Mosaic kernel "
    "| compile (s) | temp (MiB) | error |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    temp = (r.get("memory") or {}).get("temp_size_in_bytes")
    temp = "" if temp is None else f"{temp / 2**20:.1f}"
    lines.append(
      f"| {r.get('topology')} | {r.get('what')} | {r.get('implementation')} | "
      f"{r.get('direction')} | {r.get('dtype')} | {r.get('shape')} | "
      f"{'yes' if r.get('ok') else 'no'} | {'yes' if r.get('mosaic') else 'no'} | "
      f"{r.get('compile_s', '')} | {temp} | {(r.get('error') or '')[:120]} |"
    )
  return lines


def markdown(result: dict) -> str:
  env = result["environment"]
  s = result["gpu_summary"]
  parts = [
    "# Kernels as the real compilers build them\n",
    f"`python -m benchmarks.kernels` on {env['cpu_model']} (no accelerator), jax {env['jax']}, "
    f"Triton {env['triton']}, libtpu {env['libtpu']}; {result['wall_s']:.0f} s.\n",
    "## GPU (Triton → PTX → ptxas), sm_80 and sm_90\n",
    f"{s['builds']} builds of {s['distinct_kernels']} distinct kernels: {s['failed']} failed, "
    f"{s['spilling']} spill (worst {s['worst_spill_bytes']} B of spill traffic per thread), "
    f"{s['shared_over_limit']} over the shared-memory limit (max "
    + ", ".join(f"{a}: {b / 1024:.1f} KiB" for a, b in s["max_shared_bytes"].items())
    + ").\n",
    *_gpu_markdown(result["gpu"]),
  ]
  if result.get("tpu") is not None:
    parts += ["", "## TPU (libtpu, deviceless)\n", *_tpu_markdown(result["tpu"])]
  elif result.get("tpu_error"):
    parts += ["", "## TPU\n", f"Not measured: {result['tpu_error']}"]
  return "\n".join(parts) + "\n"


def _pair(archs: dict, key: str) -> str:
  """``"sm_80/sm_90"`` values of ``key`` (``-`` for a failed build)."""
  cell = lambda r: (
    "-" if r is None or "error" in r else str(spills(r) if key == "spill" else r[key])
  )
  return "/".join(cell(archs.get(a)) for a in ("sm_80", "sm_90"))


def sweep_markdown(sweep: dict) -> str:
  env = sweep["environment"]
  wall = f"; {sweep['wall_s'] / 60:.0f} min" if sweep.get("wall_s") else ""
  lines = [
    "# The sweeps behind the kernels' tables\n",
    f"`python -m benchmarks.kernels --sweep` on {env['cpu_model']}, jax {env['jax']}, Triton "
    f"{env['triton']}{wall}. Spill = bytes of spill stores + loads per thread; `-` = failed to "
    "build.\n",
    *([sweep["note"] + "\n"] if sweep.get("note") else []),
    "## Core kernel (forward; the gradient runs the same kernel)\n",
    "| n_pad | rows/block | elements | warps | registers sm_80/sm_90 | spill sm_80/sm_90 |",
    "|---|---|---|---|---|---|",
  ]
  by = {}
  for r in sweep["core"]:
    by.setdefault((r["n_pad"], r["block_rows"], r["num_warps"]), {})[r["arch"]] = r
  for (n, t, w), archs in sorted(by.items()):
    lines.append(
      f"| {n} | {t} | {n * t} | {w} | {_pair(archs, 'registers')} | {_pair(archs, 'spill')} |"
    )
  lines += [
    "",
    "## Attention kernels (causal, L = 1024, forward and backward)\n",
    "Worst over the five kernels (stats, moments, output, dq, dkv); shared memory in KiB.\n",
    "| dtype | precision | dim | block_q | block_k | warps | stages | max registers sm_80/sm_90 "
    "| spill sm_80/sm_90 | max shared sm_80/sm_90 | spilling kernels |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  groups = {}
  for r in sweep["attention"]:
    key = tuple(r[k] for k in ("dtype", "precision", "dim", "block_q", "block_k", "num_warps",
                               "num_stages"))  # fmt: skip
    groups.setdefault(key, []).append(r)
  for key, rows in groups.items():
    cells = []
    for field in ("registers", "spill", "shared_bytes"):
      per_arch = []
      for a in ("sm_80", "sm_90"):
        ok = [r for r in rows if r["arch"] == a and "error" not in r]
        if len(ok) < len([r for r in rows if r["arch"] == a]):
          per_arch.append("-")
          continue
        values = [spills(r) if field == "spill" else r[field] for r in ok]
        top = max(values, default=0)
        per_arch.append(f"{top / 1024:.0f}" if field == "shared_bytes" else str(top))
      cells.append("/".join(per_arch))
    bad = sorted({r["kernel"] for r in rows if "error" in r or spills(r) > 0})
    lines.append(
      "| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + f" | {', '.join(bad)} |"
    )
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Running


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def environment() -> dict:

  env = common.environment()
  return {**env, "triton": _version("triton"), "libtpu": _version("libtpu")}


def measure_tpu(quick: bool) -> tuple[list[dict] | None, str | None]:
  """``benchmarks.kernels_tpu`` in a subprocess: ``(rows, None)`` or ``(None, why not)``."""
  if _version("libtpu") == "not installed":
    return None, "libtpu is not installed (pip install -e '.[kernels]')"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"}
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # this process may hold libtpu's lock file
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp, "tpu.json")
    command = [sys.executable, "-m", "benchmarks.kernels_tpu", "--out", str(out)]
    if quick:
      command.append("--quick")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
      return None, f"benchmarks.kernels_tpu failed ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(out.read_text()), None


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, help="default: common.out_dir's rule")
  parser.add_argument("--quick", action="store_true", help="one core and one attention case")
  parser.add_argument("--no-tpu", action="store_true", help="skip the TPU compilation")
  parser.add_argument("--sweep", action="store_true", help="the sweeps behind the tables only")
  parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  if not os.environ.get("JAX_PLATFORMS"):  # built for accelerators, run on none (nor libtpu)
    jax.config.update("jax_platforms", "cpu")
  args.out = common.out_dir(args.out, args.quick)
  args.out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  log = pathlib.Path(tempfile.gettempdir(), "entnorm_kernel_builds.jsonl")  # builds as they end
  log.unlink(missing_ok=True)
  if args.sweep:
    sweep = {"core": sweep_core(args.jobs, log), "attention": sweep_attention(args.jobs, log)}
    sweep["environment"] = environment()
    sweep["wall_s"] = time.perf_counter() - start
    (args.out / "kernels_sweep.json").write_text(json.dumps(sweep, indent=1) + "\n")
    (args.out / "kernels_sweep.md").write_text(sweep_markdown(sweep))
    print(sweep_markdown(sweep))
    return sweep
  gpu = measure_gpu(gpu_cases(args.quick), args.jobs, log)
  tpu, tpu_error = (None, "skipped (--no-tpu)") if args.no_tpu else measure_tpu(args.quick)
  result = {
    "environment": environment(),
    "gpu_summary": summary(gpu),
    "gpu": gpu,
    "tpu": tpu,
    "tpu_error": tpu_error,
    "wall_s": time.perf_counter() - start,
  }
  (args.out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
  (args.out / "kernels.md").write_text(markdown(result))
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()

"""Compiles the core and the attention for TPUs without one (libtpu's deviceless compiler).

    python -m benchmarks.kernels_tpu --out FILE.json [--quick] [--topology v5e:2x2 ...]

For each topology (default v5e and v6e) it compiles, deviceless, on the host's CPUs:

* the core (``entropy_softmax``) in its default layout on TPUs (``"xla"``) and with the fused
  kernel forced (``implementation="pallas"``, a Mosaic kernel), forward and gradient (a weighted
  sum, with respect to the logits and the target), float32 and bfloat16, at [4096, 128],
  [4096, 1000], [512, 4096] and [64, 16384];
* the attention (``entropy_attention``), ``"blockwise"`` and ``"pallas"``, forward and gradient
  (with respect to q, k and v), bfloat16 and float32, batch 2, 1024 queries and keys, 8 heads of
  64, causal.

Each entry records whether it compiled (else the first line of the error), whether the compiled
HLO holds a Mosaic kernel (a ``tpu_custom_call``), the seconds to lower and compile, and the
executable's ``memory_analysis()`` and ``cost_analysis()``. Nothing runs: there is no TPU. The
computation is placed on one chip of the topology (a mesh of one device), since XLA cannot
partition a Mosaic kernel over several.

Needs ``jax[tpu]`` (libtpu). The variables below are set before JAX is imported: CPU as the only
runtime platform, no metadata-server query for the (absent) TPU, and libtpu allowed to load in a
process while another holds its lock file.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import entnorm_jax as en  # noqa: E402
from entnorm_jax import attention  # noqa: E402
from entnorm_jax._src import hooks  # noqa: E402

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")
CORE_SHAPES = ((4096, 128), (4096, 1000), (512, 4096), (64, 16384))
ATTENTION_SHAPE = (2, 1024, 8, 64)  # batch, length, heads, head dim
DTYPES = (jnp.float32, jnp.bfloat16)
MEMORY_FIELDS = (
  "argument_size_in_bytes",
  "output_size_in_bytes",
  "temp_size_in_bytes",
  "generated_code_size_in_bytes",
  "alias_size_in_bytes",
)

# libtpu's start-up chatter on a machine without a TPU (it looks for one, and logs before its
# logging is set up); everything else on stderr is kept.
_NOISE = re.compile(
  r"^([WIE]\d{4} |WARNING: Logging before InitGoogle|=== Source Location Trace|"
  r"learning/|Failed to find host bounds|.*could not determine TPU accelerator type)"
)


@contextlib.contextmanager
def _quiet_stderr():
  """Sends file descriptor 2 to a temporary file for the block, then writes back the lines that
  are not libtpu noise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      for line in tmp.read().decode(errors="replace").splitlines():
        if line.strip() and not _NOISE.match(line):
          print(line, file=sys.stderr)


def _core(implementation, direction):
  """The core on ``(logits, target)``: forward, or the gradient of a weighted sum."""

  def forward(x, target):
    return en.entropy_softmax(x, target, implementation=implementation)

  def gradient(x, target):
    weights = jnp.cos(jnp.arange(x.shape[-1], dtype=jnp.float32))
    loss = lambda x, t: jnp.sum(forward(x, t).astype(jnp.float32) * weights)
    return jax.grad(loss, argnums=(0, 1))(x, target)

  return hooks.as_on_an_accelerator(forward if direction == "forward" else gradient)


def _attention(implementation, direction):
  """Causal entropy attention on ``(q, k, v)``: forward, or the gradient of a weighted sum."""

  def forward(q, k, v):
    return attention.entropy_attention(
      q, k, v, target_fraction=0.5, is_causal=True, implementation=implementation
    )

  def gradient(q, k, v):
    weights = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
    loss = lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32) * weights)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return forward if direction == "forward" else gradient


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {key: float(cost[key]) for key in ("flops", "bytes accessed") if key in cost}


def _memory(compiled) -> dict:
  try:
    memory = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return {}
  if memory is None:
    return {}
  return {key: int(getattr(memory, key)) for key in MEMORY_FIELDS if hasattr(memory, key)}


def compile_entry(device, fn, shapes, dtype, **record) -> dict:
  """Lowers and compiles ``fn`` on ``shapes`` (``dtype``) for ``device``'s chip; the record."""
  sharding = NamedSharding(Mesh(np.array([device]), ("chip",)), PartitionSpec())
  args = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
  record = {**record, "dtype": jnp.dtype(dtype).name, "ok": False, "mosaic": False, "error": None}
  start = time.perf_counter()
  try:
    with jax.default_device(device), _quiet_stderr():
      compiled = jax.jit(fn).trace(*args).lower().compile()
  except Exception as error:  # noqa: BLE001 - recorded, the run goes on
    record.update(error=_first_line(error), error_detail=str(error)[:2000])
    record["compile_s"] = round(time.perf_counter() - start, 2)
    return record
  record["compile_s"] = round(time.perf_counter() - start, 2)
  record.update(ok=True, mosaic="tpu_custom_call" in compiled.as_text())
  record.update(memory=_memory(compiled), cost=_cost(compiled))
  return record


def cases(quick: bool):
  """``(what, implementation, direction, dtype, shape, fn, arg shapes)`` of every entry."""
  core_shapes = CORE_SHAPES[1:2] if quick else CORE_SHAPES
  dtypes = DTYPES[:1] if quick else DTYPES
  directions = ("forward",) if quick else ("forward", "gradient")
  for shape in core_shapes:
    for dtype in dtypes:
      for direction in directions:
        for implementation in (None, "pallas"):
          fn = _core(implementation, direction)
          yield "core", implementation or "default", direction, dtype, shape, fn, [shape, shape[:1]]
  for implementation in ("blockwise",) if quick else ("blockwise", "pallas"):
    for dtype in (jnp.bfloat16, jnp.float32)[: len(dtypes)]:
      for direction in directions:
        fn = _attention(implementation, direction)
        shapes = [ATTENTION_SHAPE] * 3
        yield "attention", implementation, direction, dtype, ATTENTION_SHAPE, fn, shapes


def run(topologies_: tuple[str, ...], quick: bool, log=print) -> list[dict]:
  rows = []
  for name in topologies_:
    with _quiet_stderr():
      topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
    device = topology.devices[0]
    for what, implementation, direction, dtype, shape, fn, shapes in cases(quick):
      row = compile_entry(
        device,
        fn,
        shapes,
        dtype,
        topology=name,
        device_kind=device.device_kind,
        what=what,
        implementation=implementation,
        direction=direction,
        shape=list(shape),
      )
      rows.append(row)
      status = ("mosaic" if row["mosaic"] else "ok") if row["ok"] else f"FAILED {row['error']}"
      log(
        f"{name} {what} {implementation} {direction} {row['dtype']} {shape}: "
        f"{row['compile_s']:.1f} s, {status}"[:240]
      )
  return rows


def run_parallel(topologies_: tuple[str, ...], quick: bool, jobs: int) -> list[dict]:
  """:func:`run`, one process per topology, ``jobs`` at a time (compiling is single-threaded)."""
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for first in range(0, len(topologies_), jobs):
      procs = []
      for name in topologies_[first : first + jobs]:
        out = pathlib.Path(tmp, f"{len(procs)}.json")
        command = [sys.executable, "-m", "benchmarks.kernels_tpu", "--out", str(out), "--jobs", "1"]
        command += ["--topology", name] + (["--quick"] if quick else [])
        procs.append((out, subprocess.Popen(command, stdout=subprocess.PIPE, text=True)))
      for out, proc in procs:
        log, _ = proc.communicate()
        print(log, end="", flush=True)
        if proc.returncode != 0:
          raise RuntimeError(f"{proc.args} failed ({proc.returncode})")
        rows += json.loads(out.read_text())
  return rows


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="the JSON file to write")
  parser.add_argument("--quick", action="store_true", help="one core and one attention entry")
  parser.add_argument("--topology", nargs="+", default=list(TOPOLOGIES), help="e.g. v5e:2x2")
  parser.add_argument("--jobs", type=int, default=2, help="topologies compiled at once")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  topologies_ = tuple(args.topology)
  if args.jobs > 1 and len(topologies_) > 1:
    rows = run_parallel(topologies_, args.quick, args.jobs)
  else:
    rows = run(topologies_, args.quick, log=lambda s: print(s, flush=True))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(rows, indent=1) + "\n")
  print(f"{len(rows)} entries in {time.perf_counter() - start:.0f} s -> {args.out}")
  return rows


if __name__ == "__main__":
  main()

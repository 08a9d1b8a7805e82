"""Entropy attention on a GPU: the Pallas kernel checked against the dense reference and timed
against ``jax.nn.dot_product_attention`` (cuDNN flash attention where available).

One command, meant to finish in under five minutes on one GPU::

    python -m benchmarks.gpu_attention --out /some/dir

Steps (each guarded: a failure is recorded with its traceback and the next step runs; results are
rewritten after every step, so a run cut short still leaves what it measured):

1. accuracy, float32: Pallas (compiled for the GPU, not interpreted) vs the dense reference,
   outputs and gradients w.r.t. q, k, v and the target, GQA + causal + ragged lengths + block
   sizes that do not divide the length, and a 4-D mask case;
2. accuracy, bfloat16 at 4,096 tokens vs the dense reference in float32;
3. block-size sweep of the Pallas forward at 8,192 tokens;
4. forward time, bfloat16, batch 1, 8 heads, head dim 64, causal, 1k to 32k tokens: Pallas
   entropy attention (best blocks from 3), the blockwise pure-JAX version, and standard
   attention ``jax.nn.dot_product_attention`` (``implementation="cudnn"`` when it runs, else
   XLA); up to 8k also Pallas with 3 solver iterations (rough entropy control) and
   forward+backward. Goal: Pallas forward <= 3x flash attention at 8k.

Writes ``gpu_attention.json`` and ``gpu_attention.md`` (with the card's name) into ``--out``.
``--smoke`` runs the same steps at toy sizes with the kernels interpreted, so the script can be
checked on a CPU. :mod:`benchmarks.gpu` (the one GPU command: the core and attention together)
reuses these steps with its own sizes.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from entnorm_jax import attention as ena

TARGET = 0.5
BUDGET_S = 270.0


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _qkv(seed, batch, n, heads, kv_heads, dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, n, heads, dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, n, kv_heads, dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, n, kv_heads, dim), jnp.float32)
  cot = jax.random.normal(keys[3], (batch, n, heads, dim), jnp.float32)
  return [x.astype(dtype) for x in (q, k, v)] + [cot.astype(dtype)]


def _out_and_grads(implementation, interpret, **kw):
  """A jitted ``(q, k, v, target, cotangent, mask, q_len, kv_len) -> (out, grads)``."""
  if implementation == "pallas":
    kw = dict(kw, interpret=interpret)

  def f(q, k, v, target, cot, mask, q_len, kv_len):
    def attend(q, k, v, target):
      return ena.entropy_attention(
        q, k, v, target_fraction=target, mask=mask, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, implementation=implementation, **kw,
      )  # fmt: skip

    out, pull = jax.vjp(attend, q, k, v, target)
    return out, pull(cot)

  return jax.jit(f)


def check_accuracy(
  smoke: bool, interpret: bool, cases: tuple[str, ...] | None = None
) -> list[dict]:
  """Pallas vs dense, float32, outputs and gradients (norm-relative errors).

  Args:
    smoke: toy sizes.
    interpret: run the Pallas kernels interpreted (no GPU).
    cases: names of the cases to run (``"gqa+causal+lengths"``, ``"4-D mask"``); None: all.
  """
  n, dim = (37, 16) if smoke else (1000, 64)
  batch, heads, kv_heads = 2, 4, 2
  rows = []
  q, k, v, cot = _qkv(0, batch, n, heads, kv_heads, dim, jnp.float32)
  target = jnp.array([0.3, 0.5, 0.7, 0.9], jnp.float32)
  rng = np.random.default_rng(0)
  all_cases = {
    "gqa+causal+lengths": dict(
      mask=None, q_len=jnp.array([n, n - 7]), kv_len=jnp.array([n, n // 2]), is_causal=True
    ),
    "4-D mask": dict(
      mask=jnp.asarray(rng.uniform(size=(batch, heads, n, n)) < 0.8),
      q_len=None, kv_len=None, is_causal=False,
    ),
  }  # fmt: skip
  blocks = dict(block_q=16, block_k=16) if smoke else dict(block_q=64, block_k=32)
  for name, c in all_cases.items():
    if cases is not None and name not in cases:
      continue
    args = (q, k, v, target, cot, c["mask"], c["q_len"], c["kv_len"])
    want = _out_and_grads("xla", interpret, is_causal=c["is_causal"])(*args)
    got = _out_and_grads("pallas", interpret, is_causal=c["is_causal"], **blocks)(*args)
    errors = {"out": _rel(got[0], want[0])}
    errors.update({f"d{x}": _rel(g, w) for x, g, w in zip("qkvt", got[1], want[1], strict=True)})
    rows.append({"case": name, "length": n, "dtype": "float32", "rel_errors": errors,
                 "ok": all(e < 1e-4 for e in errors.values())})  # fmt: skip
  return rows


def check_bf16(smoke: bool, interpret: bool) -> dict:
  n = 64 if smoke else 4096
  q, k, v, _ = _qkv(1, 1, n, 8, 8, 16 if smoke else 64, jnp.bfloat16)
  f = lambda impl, **kw: jax.jit(
    lambda q, k, v: ena.entropy_attention(
      q, k, v, target_fraction=TARGET, is_causal=True, implementation=impl, **kw
    )
  )
  want = f("xla")(*(x.astype(jnp.float32) for x in (q, k, v)))
  got = f("pallas", interpret=interpret)(q, k, v)
  err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
  return {"length": n, "dtype": "bfloat16", "max_abs_error": err, "ok": err < 3e-2}


def _forward(impl: str, interpret: bool, **kw):
  if impl == "flash":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, **kw)
  if impl == "pallas":
    kw = dict(kw, interpret=interpret)
  return lambda q, k, v: ena.entropy_attention(
    q, k, v, target_fraction=TARGET, is_causal=True, implementation=impl, **kw
  )


def _flash_kwargs(q) -> dict:
  """``implementation="cudnn"`` if it compiles and runs here, else XLA's attention."""
  try:
    f = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True,
                                                       implementation="cudnn"))  # fmt: skip
    jax.block_until_ready(f(q[:, :256]))
    return {"implementation": "cudnn"}
  except Exception:  # noqa: BLE001 - any failure means cuDNN is not usable here
    return {}


def sweep_blocks(smoke: bool, interpret: bool, deadline: float, options=None) -> dict:
  """Median Pallas forward time per ``(block_q, block_k)`` at 8k tokens (64 in smoke runs)."""
  n = 64 if smoke else 8192
  q, k, v, _ = _qkv(2, 1, n, 8, 8, 16 if smoke else 64, jnp.bfloat16)
  if options is None:
    options = [(16, 16), (32, 16)] if smoke else [(64, 64), (128, 64), (64, 128), (128, 128)]
  timings = {}
  for bq, bk in options:
    if time.perf_counter() > deadline:
      break
    try:
      f = common.compile_ahead(_forward("pallas", interpret, block_q=bq, block_k=bk), q, k, v)
      times = common.time_calls({"p": (f, (q, k, v))}, repeats=5, warmup_s=common.warmup_s(smoke))
      timings[f"{bq}x{bk}"] = times["p"]["median_s"]
    except Exception as e:  # noqa: BLE001 - a tile size Triton rejects is skipped
      timings[f"{bq}x{bk}"] = f"failed: {type(e).__name__}: {e}"[:300]
  valid = {name: t for name, t in timings.items() if isinstance(t, float)}
  best = min(valid, key=valid.get) if valid else "64x64"
  return {"length": n, "median_s": timings, "best": best}


def time_lengths(
  smoke: bool,
  interpret: bool,
  blocks: str,
  deadline: float,
  *,
  lengths=None,
  grad_up_to: int = 8192,
  extras: bool = True,
) -> list[dict]:
  """Forward (and up to ``grad_up_to`` tokens, forward+backward) times, bfloat16, causal.

  Args:
    smoke: toy sizes (head dim 16).
    interpret: run the Pallas kernels interpreted (no GPU).
    blocks: Pallas ``"block_qxblock_k"``, e.g. ``"64x64"``.
    deadline: ``time.perf_counter()`` after which the remaining lengths are skipped (recorded).
    lengths: token counts; None: 1k to 32k (64 and 128 in smoke runs).
    grad_up_to: longest length also timed forward+backward.
    extras: up to 8k, also the blockwise pure-JAX version and Pallas with 3 solver iterations.

  Returns:
    One row per length: medians in seconds and the Pallas / flash ratios.
  """
  bq, bk = (int(b) for b in blocks.split("x"))
  if lengths is None:
    lengths = [64, 128] if smoke else [1024, 2048, 4096, 8192, 16384, 32768]
  rows = []
  for n in lengths:
    if time.perf_counter() > deadline:
      rows.append({"length": n, "skipped": "time budget"})
      continue
    q, k, v, cot = _qkv(3, 1, n, 8, 8, 16 if smoke else 64, jnp.bfloat16)
    flash_kw = _flash_kwargs(q)
    fns = {
      "pallas": _forward("pallas", interpret, block_q=bq, block_k=bk),
      "flash": _forward("flash", interpret, **flash_kw),
    }
    if extras and n <= 8192:
      fns["blockwise"] = _forward("blockwise", interpret)
      # Rough entropy control: 3 solver iterations instead of the float32 default of 8.
      fns["pallas_3it"] = _forward("pallas", interpret, block_q=bq, block_k=bk, num_iters=3)
    row = {"length": n, "flash_impl": flash_kw.get("implementation", "xla")}
    try:
      compiled = {name: (common.compile_ahead(f, q, k, v), (q, k, v)) for name, f in fns.items()}
      fwd = common.time_calls(compiled, repeats=7, max_total_s=20, warmup_s=common.warmup_s(smoke))
      row["forward_s"] = {name: s["median_s"] for name, s in fwd.items()}
      row["forward_iqr_s"] = {name: [s["q25_s"], s["q75_s"]] for name, s in fwd.items()}
      row["pallas_over_flash"] = fwd["pallas"]["median_s"] / fwd["flash"]["median_s"]
      if n <= grad_up_to:
        grads = {}
        for name in ("pallas", "flash"):
          loss = lambda q, k, v, f=fns[name], c=cot: jnp.vdot(f(q, k, v).astype(c.dtype), c)
          g = jax.grad(loss, argnums=(0, 1, 2))
          grads[name] = (common.compile_ahead(g, q, k, v), (q, k, v))
        both = common.time_calls(grads, repeats=5, max_total_s=20, warmup_s=common.warmup_s(smoke))
        row["fwd_bwd_s"] = {name: s["median_s"] for name, s in both.items()}
        row["fwd_bwd_pallas_over_flash"] = both["pallas"]["median_s"] / both["flash"]["median_s"]
    except Exception:  # noqa: BLE001 - recorded, the next length still runs
      row["error"] = traceback.format_exc(limit=4)[-2000:]
    rows.append(row)
  return rows


def _fwd_bwd_cell(row: dict) -> str:
  if "fwd_bwd_s" not in row:
    return "—"
  times = " / ".join(common.fmt_time(x) for x in row["fwd_bwd_s"].values())
  ratio = row.get("fwd_bwd_pallas_over_flash")
  return times if ratio is None else f"{times} ({ratio:.2f}x)"


def markdown_lines(result: dict) -> list[str]:
  """Markdown lines for the steps' results in ``result`` (``accuracy``, ``bf16``, ``sweep``,
  ``timing``; each optional)."""
  lines = []
  for row in result.get("accuracy", []):
    errs = ", ".join(f"{k} {v:.1e}" for k, v in row["rel_errors"].items())
    lines.append(f"- accuracy {row['case']} (float32, n={row['length']}): {errs} -> "
                 f"{'ok' if row['ok'] else 'CHECK'}")  # fmt: skip
  if "bf16" in result:
    b = result["bf16"]
    lines.append(f"- bfloat16 n={b['length']}: max abs error {b['max_abs_error']:.2e} vs dense "
                 f"float32 -> {'ok' if b['ok'] else 'CHECK'}")  # fmt: skip
  if "sweep" in result:
    lines.append(f"- block sweep at {result['sweep']['length']}: {result['sweep']['median_s']}, "
                 f"best {result['sweep']['best']}")  # fmt: skip
  rows = []
  for r in result.get("timing", []):
    if "forward_s" not in r:
      rows.append([r["length"], r.get("skipped") or "error", "", "", "", "", ""])
      continue
    f = r["forward_s"]
    rows.append([
      r["length"], common.fmt_time(f["pallas"]),
      common.fmt_time(f["flash"]) + f" ({r['flash_impl']})",
      f"{r['pallas_over_flash']:.2f}x",
      common.fmt_time(f["pallas_3it"]) if "pallas_3it" in f else "—",
      common.fmt_time(f["blockwise"]) if "blockwise" in f else "—",
      _fwd_bwd_cell(r),
    ])  # fmt: skip
  if rows:
    lines += ["", common.markdown_table(
      ["tokens", "Pallas fwd", "flash fwd", "Pallas / flash", "Pallas 3 iters", "blockwise fwd",
       "fwd+bwd Pallas / flash"], rows)]  # fmt: skip
  return lines


def markdown(result: dict) -> str:
  env = result["environment"]
  lines = [
    "## Entropy attention on the GPU (Pallas)",
    "",
    f"Device: {env.get('device_kind')} ({env.get('backend')}), jax {env.get('jax')}; "
    f"interpret={result['interpret']}; wall {result.get('wall_s', 0):.0f} s.",
    "",
    *markdown_lines(result),
  ]
  for name, err in result.get("errors", {}).items():
    lines += ["", f"- step {name} failed: `{err.splitlines()[-1]}`"]
  return "\n".join(lines) + "\n"


def run_steps(result: dict, steps, save, start: float, deadline=float("inf"), always=()) -> None:
  """Runs each ``(name, fn)`` of ``steps`` into ``result[name]``, each guarded: a failure records
  its traceback in ``result["errors"]`` and the next step runs; ``save()`` after every step. Steps
  reached after ``deadline`` (those in ``always`` excepted) are recorded in ``result["skipped"]``.
  """
  for step, fn in steps:
    if step not in always and time.perf_counter() > deadline:
      result.setdefault("skipped", {})[step] = "time budget spent"
    else:
      try:
        result[step] = fn()
      except Exception:  # noqa: BLE001 - recorded; later steps still run
        result["errors"][step] = traceback.format_exc(limit=6)[-3000:]
    save()
    print(f"[{time.perf_counter() - start:6.1f} s] {step} done", flush=True)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="default: benchmarks/results/, smoke runs a temporary folder")
  parser.add_argument("--smoke", action="store_true", help="toy sizes, interpreted kernels")
  args = parser.parse_args(argv)
  smoke = args.smoke or jax.default_backend() == "cpu"
  interpret = jax.default_backend() != "gpu"
  out = common.out_dir(args.out, smoke)
  start = time.perf_counter()
  deadline = start + BUDGET_S
  result = {"environment": common.environment(), "interpret": interpret, "smoke": smoke,
            "errors": {}}  # fmt: skip
  name = "gpu_attention_smoke" if smoke else "gpu_attention"

  def save():
    result["wall_s"] = time.perf_counter() - start
    common.save_json(result, out / f"{name}.json")
    (out / f"{name}.md").write_text(markdown(result))

  steps = [
    ("accuracy", lambda: check_accuracy(smoke, interpret)),
    ("bf16", lambda: check_bf16(smoke, interpret)),
    ("sweep", lambda: sweep_blocks(smoke, interpret, deadline - 150)),
    (
      "timing",
      lambda: time_lengths(
        smoke, interpret, result.get("sweep", {}).get("best", "64x64"), deadline
      ),
    ),  # fmt: skip
  ]
  run_steps(result, steps, save, start)
  print(markdown(result))
  print(json.dumps({"written": str(out / f"{name}.json")}))
  return result


if __name__ == "__main__":
  main()

"""Cost of entropy-normalized attention: the Linen module against Flax's own, and a training step.

Measured side by side in one process (float32, jit, compiled ahead, interleaved repeats; see
:mod:`benchmarks.common`):

* the module: :class:`entnorm_jax.linen.EntropyMultiHeadAttention` (relative target 0.5, the
  core's default iterations) vs ``flax.linen.MultiHeadDotProductAttention`` with the same
  parameters, causal mask, batch 1, 256 features, 4 heads of 64, at sequence lengths 128 to 4096:
  forward, and forward+backward (gradient of ``sum(out * cotangent)`` w.r.t. parameters and input).
  Bar: forward+backward at length 1024 <= 2x Flax's module on the CPU;
* a training step: one jitted ``optax.adamw`` step of the small character transformer of
  :mod:`benchmarks.attention_collapse` (2 layers, 128 features, 4 heads, batch 16, context 64)
  with standard vs entropy-normalized attention.

Run ``python -m benchmarks.attention_cost [--quick] [--out DIR] [--plot-only]``: prints a table
and writes ``attention_cost.{json,md,png}`` where :func:`benchmarks.common.out_dir` says
(``benchmarks/results/`` for a full run).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from benchmarks import common
from benchmarks.attention_collapse import CharTransformer
from entnorm_jax import linen as enn

FEATURES, HEADS = 256, 4
BAR = {"length": 1024, "fwd_bwd_ratio": 2.0}


def module_functions(length: int) -> dict:
  """name -> (compiled function, args) for both modules, forward and forward+backward."""
  kx, kp, kc = jax.random.split(jax.random.key(length), 3)
  x = jax.random.normal(kx, (1, length, FEATURES), jnp.float32)
  cot = jax.random.normal(kc, x.shape, jnp.float32)
  mask = nn.make_causal_mask(jnp.ones((1, length))).astype(bool)
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEATURES)
  ours = enn.EntropyMultiHeadAttention(num_heads=HEADS, qkv_features=FEATURES, target_fraction=0.5)
  params = jax.jit(flax_mha.init)(kp, x)
  fns = {}
  for name, module in (("flax", flax_mha), ("entropy", ours)):
    fwd = lambda p, x, m, module=module: module.apply(p, x, mask=m)
    loss = lambda p, x, m, c, module=module: jnp.sum(module.apply(p, x, mask=m) * c)
    grad = jax.grad(loss, argnums=(0, 1))
    fns[f"{name}/fwd"] = (common.compile_ahead(fwd, params, x, mask), (params, x, mask))
    fns[f"{name}/fwd_bwd"] = (
      common.compile_ahead(grad, params, x, mask, cot),
      (params, x, mask, cot),
    )
  return fns


def training_step_functions(batch: int = 16, length: int = 64) -> dict:
  """name -> (compiled adamw step, args) for the char transformer, standard vs entropy."""
  tokens = jax.random.randint(jax.random.key(0), (batch, length + 1), 0, 96)
  fns = {}
  for variant in ("standard", "entropy_fixed"):
    model = CharTransformer(96, length, variant)
    params = jax.jit(model.init)(jax.random.key(1), tokens[:, :-1])["params"]
    opt = optax.adamw(1e-3)

    def step(params, opt_state, tokens, model=model, opt=opt):
      def loss_fn(p):
        logits, _ = model.apply({"params": p}, tokens[:, :-1], mutable=["intermediates"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    args = (params, opt.init(params), tokens)
    fns[f"train_step/{variant}"] = (common.compile_ahead(step, *args), args)
  return fns


def run(quick: bool = False) -> dict:
  """Times the modules at each length and the training step; returns JSON-ready figures."""
  lengths = (128, 256) if quick else (128, 256, 512, 1024, 2048, 4096)
  rows = []
  for length in lengths:
    repeats = 3 if quick or length >= 2048 else 9
    times = common.time_calls(
      module_functions(length), repeats=repeats, max_total_s=120, warmup_s=common.warmup_s(quick)
    )
    row = {"length": length}
    for name, t in times.items():
      row[name] = t
    for kind in ("fwd", "fwd_bwd"):
      row[f"ratio/{kind}"] = (
        times[f"entropy/{kind}"]["median_s"] / times[f"flax/{kind}"]["median_s"]
      )
    rows.append(row)
    print(f"L={length}: fwd {row['ratio/fwd']:.2f}x, fwd+bwd {row['ratio/fwd_bwd']:.2f}x")
  step_times = common.time_calls(
    training_step_functions(), repeats=3 if quick else 9, warmup_s=common.warmup_s(quick)
  )
  step_ratio = (
    step_times["train_step/entropy_fixed"]["median_s"]
    / step_times["train_step/standard"]["median_s"]
  )
  at_bar = [r for r in rows if r["length"] == BAR["length"]]
  bar = None
  if at_bar:
    ratio = at_bar[0]["ratio/fwd_bwd"]
    bar = {**BAR, "measured": ratio, "met": ratio <= BAR["fwd_bwd_ratio"]}
  return {
    "config": {
      "batch": 1,
      "features": FEATURES,
      "heads": HEADS,
      "mask": "causal",
      "target": "relative 0.5",
      "quick": quick,
    },
    "modules": rows,
    "training_step": {**step_times, "ratio": step_ratio},
    "bar": bar,
    "environment": common.environment(),
    "notes": "Shared machine: other processes were running; repeats are interleaved.",
  }


def markdown(result: dict) -> str:
  fmt = common.fmt_time
  rows = []
  for r in result["modules"]:
    rows.append(
      [
        r["length"],
        fmt(r["flax/fwd"]["median_s"]),
        fmt(r["entropy/fwd"]["median_s"]),
        f"{r['ratio/fwd']:.2f}x",
        fmt(r["flax/fwd_bwd"]["median_s"]),
        fmt(r["entropy/fwd_bwd"]["median_s"]),
        f"{r['ratio/fwd_bwd']:.2f}x",
      ]
    )
  headers = [
    "length",
    "Flax fwd",
    "entropy fwd",
    "ratio",
    "Flax fwd+bwd",
    "entropy fwd+bwd",
    "ratio",
  ]
  step = result["training_step"]
  text = common.markdown_table(headers, rows)
  text += (
    f"\n\nTraining step (char transformer, adamw): standard "
    f"{fmt(step['train_step/standard']['median_s'])}, entropy "
    f"{fmt(step['train_step/entropy_fixed']['median_s'])} ({step['ratio']:.2f}x).\n"
  )
  if result["bar"]:
    b = result["bar"]
    text += (
      f"\nBar: fwd+bwd at length {b['length']} <= {b['fwd_bwd_ratio']}x Flax: measured "
      f"{b['measured']:.2f}x ({'met' if b['met'] else 'not met'}).\n"
    )
  return text


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt

  lengths = [r["length"] for r in result["modules"]]
  fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(10, 3.8))
  # Line style and marker say forward vs forward+backward; colour says which module.
  kinds = (("fwd", "forward", ":", "s"), ("fwd_bwd", "forward+backward", "-", "o"))
  for kind, label, style, marker in kinds:
    for name, color in (("flax", "tab:red"), ("entropy", "tab:blue")):
      t = [r[f"{name}/{kind}"]["median_s"] for r in result["modules"]]
      ax.loglog(lengths, t, linestyle=style, marker=marker, color=color, label=f"{name}, {label}")
    ratio = [r[f"ratio/{kind}"] for r in result["modules"]]
    ax_ratio.semilogx(lengths, ratio, linestyle=style, marker=marker, color="black", label=label)
  ax_ratio.axhline(BAR["fwd_bwd_ratio"], color="gray", lw=0.8, label="target (forward+backward)")
  ax.set(xlabel="sequence length (tokens)", ylabel="seconds per call", title="module time")
  ax_ratio.set(xlabel="sequence length (tokens)", ylabel="entropy / Flax (time)", title="ratio")
  for a in (ax, ax_ratio):
    a.set_xticks(lengths, [str(n) for n in lengths], minor=False)
    a.xaxis.set_minor_locator(plt.NullLocator())
    a.legend(fontsize=8, handlelength=3)
  fig.tight_layout()
  common.write_figure(fig, path)


def main(argv=None) -> None:
  common.module_main("attention_cost", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

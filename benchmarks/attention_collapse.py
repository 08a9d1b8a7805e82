"""Attention entropy collapse: standard vs entropy-normalized attention in a small char-level LM.

The same pre-LN decoder-only transformer (learned positions, causal attention, GELU MLP) is trained
on :class:`benchmarks.corpus.CharCorpus` (the Python help topics, shipped with CPython) with
``optax.adamw`` in two settings:

* ``warmup``: peak learning rate 1e-3 with linear warm-up and cosine decay (a normal recipe);
* ``no_warmup``: a constant large learning rate (1e-2) from the first step, the regime where the
  attention logits grow fast and attention entropy collapses (Zhai et al. 2023).

Three attention variants: Flax's ``MultiHeadDotProductAttention`` (``standard``),
:class:`entnorm_jax.linen.EntropyMultiHeadAttention` with a fixed relative target 0.5 for every
head (``entropy_fixed``), and the same with a learned per-head target initialized at 0.5
(``entropy_learned``). Reported over training: training loss, validation loss, and for each layer
the mean relative attention entropy ``H(a_q) / log(n_valid)`` over query rows (1 = uniform, 0 = one
key), measured on a fixed validation batch (the same for every run).

Every setting/variant is trained with three seeds (``SIZES``; the seed sets the initialization
and the order of the training batches); the tables and plots give the mean ± sample standard
deviation over seeds, and the Markdown lists which differences are larger than the seed spread
(the mean ± std intervals do not overlap: a heuristic for three seeds, not a significance test).
The run's wall time is recorded in the JSON and the Markdown.

Run ``python -m benchmarks.attention_collapse [--quick]``: prints a table and writes
``attention_collapse.{json,md,png}`` into ``benchmarks/results/``.
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from benchmarks import common
from benchmarks.corpus import CharCorpus
from entnorm_jax import linen as enn

VARIANTS = ("standard", "entropy_fixed", "entropy_learned")
SETTINGS = {"warmup": 1e-3, "no_warmup": 1e-2}
VALID_SEED = 1  # the validation batch, shared by every run (seed 0's in the one-seed version)
SIZES = {
  False: dict(steps=300, batch=16, length=64, layers=2, eval_every=20, seeds=3),
  True: dict(steps=40, batch=8, length=32, layers=2, eval_every=10, seeds=2),
}


class Block(nn.Module):
  """Pre-LN transformer block."""

  features: int
  heads: int
  variant: str

  @nn.compact
  def __call__(self, x, mask):
    kwargs = dict(num_heads=self.heads, qkv_features=self.features)
    if self.variant == "standard":
      attn = nn.MultiHeadDotProductAttention(**kwargs)
    else:
      learn = self.variant == "entropy_learned"
      attn = enn.EntropyMultiHeadAttention(**kwargs, target_fraction=0.5, learn_target=learn)
    x = x + attn(nn.LayerNorm()(x), mask=mask, sow_weights=True)
    h = nn.Dense(4 * self.features)(nn.LayerNorm()(x))
    return x + nn.Dense(self.features)(nn.gelu(h))


class CharTransformer(nn.Module):
  """Decoder-only character language model."""

  vocab: int
  length: int
  variant: str
  features: int = 128
  heads: int = 4
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    pos = self.param("pos", nn.initializers.normal(0.02), (self.length, self.features))
    x = nn.Embed(self.vocab, self.features)(tokens) + pos[: tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      x = Block(self.features, self.heads, self.variant)(x, mask)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def relative_entropy(weights: jax.Array) -> jax.Array:
  """Mean over query rows of H(a_q) / log(n_valid) for causal weights ``[b, h, q, k]``."""
  h = -jnp.sum(jax.scipy.special.xlogy(weights, weights), axis=-1)
  n = jnp.arange(1, weights.shape[-1] + 1, dtype=weights.dtype)
  return jnp.mean(h[..., 1:] / jnp.log(n[1:]))  # the first row has a single key


def schedule(setting: str, steps: int):
  peak = SETTINGS[setting]
  if setting == "warmup":
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps, peak / 10)
  return optax.constant_schedule(peak)


@functools.cache
def _compiled(variant: str, vocab: int, length: int, layers: int):
  """Model, optimizer and jitted step/evaluation of a variant, shared by its settings and seeds.

  The optimizer is adamw at learning rate 1 and the step multiplies its updates by the scheduled
  rate (an argument): adamw scales its whole update (Adam plus weight decay) by the rate, so this
  is adamw with that schedule, compiled once for every schedule.
  """
  model = CharTransformer(vocab, length, variant, layers=layers)
  decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # kernels/embeddings only
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0, weight_decay=0.1, mask=decay))

  def loss_fn(params, x, y):
    logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, state["intermediates"]

  @jax.jit
  def step(params, opt_state, x, y, lr):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, y):
    loss, inter = loss_fn(params, x, y)
    blocks = sorted(k for k in inter if k.startswith("Block"))
    ent = [relative_entropy(jax.tree.leaves(inter[b])[0]) for b in blocks]
    return loss, jnp.stack(ent)

  return model, opt, step, evaluate


def train(
  variant: str,
  setting: str,
  corpus: CharCorpus,
  *,
  steps: int,
  batch: int,
  length: int,
  layers: int,
  eval_every: int,
  seed: int = 0,
) -> dict:
  """Trains one model; returns its curves (lists, JSON-ready)."""
  model, opt, step, evaluate = _compiled(variant, corpus.vocab_size, length, layers)
  lr = schedule(setting, steps)
  train_batches = corpus.batches(seed, batch, length)
  valid_x, valid_y = next(corpus.batches(VALID_SEED, 4 * batch, length, split="valid"))
  params = model.init(jax.random.key(seed), valid_x[:1])["params"]
  opt_state = opt.init(params)

  curves = {"step": [], "train_loss": [], "valid_loss": [], "entropy": []}
  window = []
  start = time.perf_counter()
  for i in range(steps + 1):
    if i % eval_every == 0 or i == steps:
      vloss, ent = evaluate(params, valid_x, valid_y)
      curves["step"].append(i)
      curves["train_loss"].append(float(np.mean(window)) if window else float(vloss))
      curves["valid_loss"].append(float(vloss))
      curves["entropy"].append(np.asarray(ent).tolist())
      window = []
    if i < steps:
      x, y = next(train_batches)
      params, opt_state, loss = step(params, opt_state, x, y, jnp.float32(lr(i)))
      window.append(float(loss))
  curves["seconds"] = time.perf_counter() - start
  curves["diverged"] = not np.isfinite(curves["valid_loss"][-1])
  if variant == "entropy_learned":
    raws = [
      params[b]["EntropyMultiHeadAttention_0"]["target_raw"]
      for b in sorted(params)
      if b.startswith("Block")
    ]
    curves["learned_targets"] = [np.asarray(jax.nn.sigmoid(r)).tolist() for r in raws]
  return curves


def _mean_std(values) -> dict:
  """Mean and sample standard deviation (ddof=1) over seeds, elementwise; lists for JSON."""
  v = np.asarray(values, dtype=np.float64)
  std = np.std(v, axis=0, ddof=1) if v.shape[0] > 1 else np.zeros(v.shape[1:])
  return {"mean": np.mean(v, axis=0).tolist(), "std": std.tolist()}


def summarize(seed_curves: list[dict]) -> dict:
  """Mean ± std over seeds of the figures of one setting/variant."""
  final = [c["valid_loss"][-1] for c in seed_curves]
  out = {
    "final_valid_loss": _mean_std(final),
    "best_valid_loss": _mean_std([np.nanmin(c["valid_loss"]) for c in seed_curves]),
    "final_entropy_per_layer": _mean_std([c["entropy"][-1] for c in seed_curves]),
    "min_entropy_per_layer": _mean_std([np.min(c["entropy"], axis=0) for c in seed_curves]),
    "final_valid_loss_per_seed": final,
    "diverged": sum(c["diverged"] for c in seed_curves),
  }
  if "learned_targets" in seed_curves[0]:
    out["learned_targets"] = _mean_std([c["learned_targets"] for c in seed_curves])
  return out


def run(quick: bool = False) -> dict:
  """Trains every variant in every setting with every seed; returns the curves and a summary."""
  wall = time.perf_counter()
  corpus = CharCorpus()
  size = dict(SIZES[quick])
  seeds = size.pop("seeds")
  runs = {}
  for seed in range(seeds):
    for setting in SETTINGS:
      for variant in VARIANTS:
        curves = train(variant, setting, corpus, **size, seed=seed)
        runs.setdefault(f"{setting}/{variant}", []).append(curves)
        print(
          f"seed {seed} {setting:>9} {variant:>16}: valid loss {curves['valid_loss'][-1]:.3f}, "
          f"entropy {np.round(curves['entropy'][-1], 3).tolist()}, {curves['seconds']:.0f} s"
        )
  summary = {name: summarize(c) for name, c in runs.items()}
  return {
    "config": {
      **size,
      "features": 128,
      "heads": 4,
      "settings": SETTINGS,
      "seeds": seeds,
      "quick": quick,
      "std": "sample standard deviation over seeds (ddof=1)",
    },
    "summary": summary,
    "runs": runs,
    "wall_s": time.perf_counter() - wall,
    "environment": common.environment(),
  }


COLORS = dict(zip(VARIANTS, ("tab:red", "tab:blue", "tab:green"), strict=True))


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt

  settings = list(result["config"]["settings"])
  seeds = result["config"]["seeds"]
  fig, axes = plt.subplots(2, len(settings), figsize=(10, 6.5), sharex=True)
  for col, setting in enumerate(settings):
    for variant in VARIANTS:
      curves = result["runs"][f"{setting}/{variant}"]
      color = COLORS[variant]
      step = curves[0]["step"]
      loss = np.asarray([c["valid_loss"] for c in curves])
      mean, std = loss.mean(axis=0), loss.std(axis=0, ddof=1) if len(curves) > 1 else 0 * loss[0]
      axes[0, col].plot(step, mean, color=color, label=variant)
      axes[0, col].fill_between(step, mean - std, mean + std, color=color, alpha=0.2, lw=0)
      ent = np.asarray([c["entropy"] for c in curves])  # [seeds, evals, layers]
      for layer in range(ent.shape[2]):
        e = ent[:, :, layer]
        mean = e.mean(axis=0)
        std = e.std(axis=0, ddof=1) if len(curves) > 1 else 0 * mean
        style = "-" if layer == 0 else "--"
        label = f"{variant} L{layer}"
        axes[1, col].plot(step, mean, style, color=color, label=label)
        axes[1, col].fill_between(step, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    lr = result["config"]["settings"][setting]
    axes[0, col].set_title(f"{setting} (peak lr {lr:g}), mean ± std of {seeds} seeds")
    axes[0, col].set_ylabel("validation loss (nats/char)")
    axes[1, col].set_ylabel("attention entropy / log n")
    axes[1, col].set_xlabel("training step")
    axes[1, col].set_ylim(0, 1)
  axes[0, 0].legend(fontsize=7)
  axes[1, 0].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  common.write_figure(fig, path)


def _pm(s: dict, i: int | None = None, digits: int = 3) -> str:
  m, d = (s["mean"], s["std"]) if i is None else (s["mean"][i], s["std"][i])
  return f"{m:.{digits}f} ± {d:.{digits}f}"


def _beyond_spread(a: dict, b: dict, i: int | None = None) -> bool:
  """True when the mean ± std intervals of ``a`` and ``b`` do not overlap."""
  ma, sa, mb, sb = a["mean"], a["std"], b["mean"], b["std"]
  if i is not None:
    ma, sa, mb, sb = ma[i], sa[i], mb[i], sb[i]
  return abs(ma - mb) > sa + sb


def comparisons(summary: dict, settings) -> list[str]:
  """Sentences on the differences of final loss and entropy, each marked against the spread."""
  lines = []

  def say(what, name_a, a, name_b, b, i=None, digits=3):
    ma, mb = (a["mean"], b["mean"]) if i is None else (a["mean"][i], b["mean"][i])
    verdict = "larger than" if _beyond_spread(a, b, i) else "within"
    lines.append(
      f"- {what}: {name_a} {_pm(a, i, digits)} vs {name_b} {_pm(b, i, digits)} "
      f"(difference {ma - mb:+.{digits}f}): **{verdict}** the seed spread."
    )

  for setting in settings:
    for i, a in enumerate(VARIANTS):
      for b in VARIANTS[i + 1 :]:
        sa, sb = summary[f"{setting}/{a}"], summary[f"{setting}/{b}"]
        say(f"{setting}, final valid loss", a, sa["final_valid_loss"], b, sb["final_valid_loss"])
  for variant in VARIANTS:
    sa, sb = summary[f"no_warmup/{variant}"], summary[f"warmup/{variant}"]
    say(
      f"{variant}, final valid loss",
      "no_warmup",
      sa["final_valid_loss"],
      "warmup",
      sb["final_valid_loss"],
    )
  layers = len(summary[f"{settings[0]}/standard"]["final_entropy_per_layer"]["mean"])
  for setting in settings:
    for layer in range(layers):
      sa, sb = summary[f"{setting}/standard"], summary[f"{setting}/entropy_fixed"]
      say(
        f"{setting}, final entropy/log n of layer {layer}",
        "standard",
        sa["final_entropy_per_layer"],
        "entropy_fixed",
        sb["final_entropy_per_layer"],
        layer,
        2,
      )
  return lines


def markdown(result: dict) -> str:
  rows = []
  for name, s in result["summary"].items():
    layers = range(len(s["final_entropy_per_layer"]["mean"]))
    rows.append(
      [
        name,
        _pm(s["final_valid_loss"]),
        _pm(s["best_valid_loss"]),
        " / ".join(_pm(s["final_entropy_per_layer"], i, 2) for i in layers),
        " / ".join(_pm(s["min_entropy_per_layer"], i, 2) for i in layers),
      ]
    )
  headers = [
    "setting/variant",
    "final valid loss",
    "best valid loss",
    "final entropy/log n per layer",
    "min entropy/log n per layer",
  ]
  cfg = result["config"]
  env = result["environment"]
  wall = result.get("wall_s")
  timing = (
    f" Wall time {wall / 60:.1f} min for the {len(result['runs']) * cfg['seeds']} runs on "
    f"{env['cpu_count']} CPUs ({env['cpu_model']}), jax {env['jax']}."
    if wall is not None
    else ""
  )
  note = (
    f"Char-level LM on the CPython help topics; {cfg['layers']} layers, {cfg['features']} "
    f"features, {cfg['heads']} heads, context {cfg['length']}, batch {cfg['batch']}, "
    f"{cfg['steps']} steps of adamw (weight decay 0.1 on matrices only, clip 1.0), "
    f"{cfg['seeds']} seeds (mean ± sample std). Entropy is the mean over query rows of "
    f"H/log(n_valid) on a fixed validation batch.{timing}"
  )
  parts = [note, common.markdown_table(headers, rows)]
  targets = [
    (name, s["learned_targets"]) for name, s in result["summary"].items() if "learned_targets" in s
  ]
  if targets:
    lines = []
    for name, t in targets:
      per_layer = [
        ", ".join(f"{m:.2f}±{d:.2f}" for m, d in zip(mu, sd, strict=True))
        for mu, sd in zip(t["mean"], t["std"], strict=True)
      ]
      lines.append(f"{name}: " + "; ".join(f"L{i} [{p}]" for i, p in enumerate(per_layer)))
    parts.append("Learned relative targets per head (mean ± std over seeds): " + " | ".join(lines))
  parts.append(
    "Differences against the seed spread (larger = the mean ± std intervals do not overlap; "
    "a heuristic, not a significance test):\n\n"
    + "\n".join(comparisons(result["summary"], list(cfg["settings"])))
  )
  return "\n\n".join(parts) + "\n"


def main(argv=None) -> None:
  common.snapshot_main("attention_collapse", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

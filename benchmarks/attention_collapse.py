"""Attention entropy collapse: standard vs entropy-normalized attention in a small char-level LM.

The same pre-LN decoder-only transformer (learned positions, causal attention, GELU MLP) is trained
on :class:`benchmarks.corpus.CharCorpus` (the Python help topics, shipped with CPython) with
``optax.adamw`` in two settings:

* ``warmup``: peak learning rate 1e-3 with linear warm-up and cosine decay (a normal recipe);
* ``no_warmup``: a constant large learning rate (1e-2) from the first step, the regime where the
  attention logits grow fast and attention entropy collapses (Zhai et al. 2023).

Five attention variants:

* ``standard``: Flax's ``MultiHeadDotProductAttention``;
* ``entropy_fixed``: :class:`entnorm_jax.linen.EntropyMultiHeadAttention` with the exact relative
  target 0.5 for every head (every row has entropy ``0.5 · log(n_valid)``);
* ``entropy_learned``: the same with a learned per-head target initialized at 0.5;
* ``entropy_floor``: the same module with a fixed floor ``min_fraction=0.5`` instead of the exact
  target: rows whose softmax entropy is at least ``0.5 · log(n_valid)`` stay plain softmax (γ = 1)
  and only rows below it are normalized to it. The floor sits at the exact target's level, so
  ``entropy_floor`` vs ``entropy_fixed`` isolates "exact target" vs "lower bound only";
* ``entropy_floor_low``: a floor ``min_fraction=0.25``, well below where healthy heads sit
  (``standard`` under ``warmup`` ends near 0.7) and far above the collapsed ``no_warmup`` heads
  (near 0.03): a guard rail that should only catch collapsing rows.

Reported over training: training loss, validation loss, and for each layer the mean relative
attention entropy ``H(a_q) / log(n_valid)`` over query rows (1 = uniform, 0 = one key), measured
on a fixed validation batch (the same for every run). For the floor variants the evaluation also
sows each row's softmax entropy before the floor (``sow_entropies=True``, evaluation only) and
reports the fraction of query rows the floor touched (softmax entropy below the floor) and their
mean relative softmax entropy, which tell whether the floor is active or the heads sit above it.

Every setting/variant is trained with three seeds (``SIZES``; the seed sets the initialization
and the order of the training batches); the tables and plots give the mean ± sample standard
deviation over seeds, and the Markdown lists which differences are larger than the seed spread
(the mean ± std intervals do not overlap: a heuristic for three seeds, not a significance test).
The run's wall time is recorded in the JSON and the Markdown.

Run ``python -m benchmarks.attention_collapse [--quick] [--out DIR] [--plot-only]``: prints a
table and writes ``attention_collapse.{json,md,png}`` where :func:`benchmarks.common.out_dir` says
(``benchmarks/results/`` for a full run).
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

VARIANTS = ("standard", "entropy_fixed", "entropy_learned", "entropy_floor", "entropy_floor_low")
FLOORS = {"entropy_floor": 0.5, "entropy_floor_low": 0.25}  # min_fraction of the floor variants
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
  sow_entropies: bool = False  # the floor variants' evaluation: sow the entropies before/after

  @nn.compact
  def __call__(self, x, mask):
    kwargs = dict(num_heads=self.heads, qkv_features=self.features)
    if self.variant == "standard":
      attn = nn.MultiHeadDotProductAttention(**kwargs)
    elif self.variant in FLOORS:
      attn = enn.EntropyMultiHeadAttention(
        **kwargs, min_fraction=FLOORS[self.variant], sow_entropies=self.sow_entropies
      )
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
  sow_entropies: bool = False

  @nn.compact
  def __call__(self, tokens):
    pos = self.param("pos", nn.initializers.normal(0.02), (self.length, self.features))
    x = nn.Embed(self.vocab, self.features)(tokens) + pos[: tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      x = Block(self.features, self.heads, self.variant, self.sow_entropies)(x, mask)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def relative_entropy(weights: jax.Array) -> jax.Array:
  """Mean over query rows of H(a_q) / log(n_valid) for causal weights ``[b, h, q, k]``."""
  h = -jnp.sum(jax.scipy.special.xlogy(weights, weights), axis=-1)
  n = jnp.arange(1, weights.shape[-1] + 1, dtype=weights.dtype)
  return jnp.mean(h[..., 1:] / jnp.log(n[1:]))  # the first row has a single key


def floor_statistics(before: jax.Array, fraction: float) -> tuple[jax.Array, jax.Array]:
  """Fraction of causal query rows below a floor, and their mean relative softmax entropy.

  ``before`` is the sown softmax entropy ``[b, h, q]`` (nats) of rows over ``1..q`` keys; a row
  is touched when its entropy is below ``fraction · log(n_valid)`` (the first row, one key, is
  left out as in :func:`relative_entropy`).
  """
  n = jnp.arange(1, before.shape[-1] + 1, dtype=before.dtype)
  rel = before[..., 1:] / jnp.log(n[1:])
  return jnp.mean(rel < fraction), jnp.mean(rel)


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

  ``evaluate`` returns the validation loss, the relative entropy per layer and, for the floor
  variants, per layer the fraction of rows below the floor and their mean relative softmax
  entropy (empty otherwise); it applies the same parameters to a copy of the model that sows the
  entropies, so training is untouched.
  """
  model = CharTransformer(vocab, length, variant, layers=layers)
  probe = CharTransformer(vocab, length, variant, layers=layers, sow_entropies=variant in FLOORS)
  decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # kernels/embeddings only
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0, weight_decay=0.1, mask=decay))

  def loss_fn(params, x, y, net=model):
    logits, state = net.apply({"params": params}, x, mutable=["intermediates"])
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
    loss, inter = loss_fn(params, x, y, probe)
    # each block's one attention module: {"attention_weights": (w,), maybe the entropies}
    attns = [
      next(iter(inter[b].values())) for b in sorted(k for k in inter if k.startswith("Block"))
    ]
    ent = jnp.stack([relative_entropy(a["attention_weights"][0]) for a in attns])
    if variant not in FLOORS:
      return loss, ent, jnp.zeros((0, 2))
    floor = [jnp.stack(floor_statistics(a["entropy_before"][0], FLOORS[variant])) for a in attns]
    return loss, ent, jnp.stack(floor)  # [layers, (touched, softmax entropy)]

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
  if variant in FLOORS:
    curves.update(floor_touched=[], softmax_entropy=[])
  window = []
  start = time.perf_counter()
  for i in range(steps + 1):
    if i % eval_every == 0 or i == steps:
      vloss, ent, floor = evaluate(params, valid_x, valid_y)
      curves["step"].append(i)
      curves["train_loss"].append(float(np.mean(window)) if window else float(vloss))
      curves["valid_loss"].append(float(vloss))
      curves["entropy"].append(np.asarray(ent).tolist())
      if variant in FLOORS:
        curves["floor_touched"].append(np.asarray(floor[:, 0]).tolist())
        curves["softmax_entropy"].append(np.asarray(floor[:, 1]).tolist())
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
  if "floor_touched" in seed_curves[0]:
    out["final_floor_touched_per_layer"] = _mean_std([c["floor_touched"][-1] for c in seed_curves])
    out["final_softmax_entropy_per_layer"] = _mean_std(
      [c["softmax_entropy"][-1] for c in seed_curves]
    )
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
      "floors": FLOORS,
      "seeds": seeds,
      "quick": quick,
      "std": "sample standard deviation over seeds (ddof=1)",
    },
    "summary": summary,
    "runs": runs,
    "wall_s": time.perf_counter() - wall,
    "environment": common.environment(),
  }


COLORS = dict(
  zip(VARIANTS, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"), strict=True)
)
MARKERS = dict(zip(VARIANTS, ("o", "s", "^", "D", "v"), strict=True))
LAYER_STYLES = ("-", "--")


def _band(ax, step, values, variant, style="-", alpha=0.15) -> None:
  """Mean over seeds (axis 0) as a line with markers, ± the sample std as a band."""
  values = np.asarray(values)
  mean = values.mean(axis=0)
  std = values.std(axis=0, ddof=1) if len(values) > 1 else 0 * mean
  color = COLORS[variant]
  every = max(len(step) // 5, 1)
  marks = (VARIANTS.index(variant) % every, every)  # staggered, so overlapping curves show each
  ax.plot(step, mean, style, color=color, marker=MARKERS[variant], ms=4, markevery=marks, lw=1.4)
  ax.fill_between(step, mean - std, mean + std, color=color, alpha=alpha, lw=0)


def plot(result: dict, path: pathlib.Path) -> None:
  """Validation loss, entropy per layer and the floors' touched rows over training, per setting.

  The loss axis leaves out the first evaluations (the loss at initialization, about 5 nats) so the
  differences between the variants at the end stay visible; the legend sits below the panels.
  """
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  settings = list(result["config"]["settings"])
  floors = result["config"].get("floors", FLOORS)
  seeds = result["config"]["seeds"]
  fig, axes = plt.subplots(3, len(settings), figsize=(11, 10), sharex=True, squeeze=False)
  for col, setting in enumerate(settings):
    low, high = np.inf, -np.inf
    for variant in VARIANTS:
      curves = result["runs"][f"{setting}/{variant}"]
      step = curves[0]["step"]
      loss = np.asarray([c["valid_loss"] for c in curves])
      _band(axes[0, col], step, loss, variant, alpha=0.2)
      tail = loss.mean(axis=0)[min(2, len(step) - 1) :]
      low, high = min(low, np.nanmin(tail)), max(high, np.nanmax(tail))
      ent = np.asarray([c["entropy"] for c in curves])  # [seeds, evals, layers]
      for layer in range(ent.shape[2]):
        _band(axes[1, col], step, ent[:, :, layer], variant, LAYER_STYLES[layer % 2])
      if variant in floors:
        axes[1, col].axhline(floors[variant], color=COLORS[variant], lw=0.8, ls=":")
        touched = np.asarray([c["floor_touched"] for c in curves])
        for layer in range(touched.shape[2]):
          _band(axes[2, col], step, touched[:, :, layer], variant, LAYER_STYLES[layer % 2])
    if np.isfinite(low) and np.isfinite(high):
      pad = 0.05 * (high - low) + 0.02
      axes[0, col].set_ylim(low - pad, high + pad)
    lr = result["config"]["settings"][setting]
    axes[0, col].set_title(f"{setting} (peak lr {lr:g}), mean ± std of {seeds} seeds")
    axes[0, col].set_ylabel("validation loss (nats/char, zoomed)")
    axes[1, col].set_ylabel("attention entropy / log n")
    axes[1, col].set_ylim(0, 1)
    axes[2, col].set_ylabel("rows below the floor")
    axes[2, col].set_ylim(-0.02, 1.02)
    axes[2, col].set_xlabel("training step")
    for ax in axes[:, col]:
      ax.grid(alpha=0.3)
  names = {v: f"{v} (floor {floors[v]:g})" if v in floors else v for v in VARIANTS}
  variants = [
    Line2D([], [], color=COLORS[v], marker=MARKERS[v], ms=5, label=names[v]) for v in VARIANTS
  ]
  styles = [Line2D([], [], color="black", ls=LAYER_STYLES[i], label=f"layer {i}") for i in (0, 1)]
  styles.append(Line2D([], [], color="gray", ls=":", lw=0.8, label="floor level (its colour)"))
  legend = dict(ncol=len(VARIANTS), fontsize=9, frameon=False, loc="lower center")
  fig.legend(handles=variants, bbox_to_anchor=(0.5, 0.025), **legend)
  fig.legend(handles=styles, bbox_to_anchor=(0.5, -0.005), **legend)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
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


# the pairs whose final validation loss is compared in each setting: the exact targets against
# standard and each other, then each floor against standard and the exact fixed target
LOSS_PAIRS = (
  ("standard", "entropy_fixed"),
  ("standard", "entropy_learned"),
  ("entropy_fixed", "entropy_learned"),
  *((a, b) for b in FLOORS for a in ("standard", "entropy_fixed")),
  ("entropy_floor", "entropy_floor_low"),
)


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
    for a, b in LOSS_PAIRS:
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
    for other in ("entropy_fixed", *FLOORS):
      for layer in range(layers):
        sa, sb = summary[f"{setting}/standard"], summary[f"{setting}/{other}"]
        say(
          f"{setting}, final entropy/log n of layer {layer}",
          "standard",
          sa["final_entropy_per_layer"],
          other,
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
  floor_rows = []
  for name, s in result["summary"].items():
    if "final_floor_touched_per_layer" not in s:
      continue
    layers = range(len(s["final_floor_touched_per_layer"]["mean"]))
    floor_rows.append(
      [
        name,
        f"{cfg.get('floors', FLOORS)[name.split('/')[1]]:g}",
        " / ".join(_pm(s["final_floor_touched_per_layer"], i, 2) for i in layers),
        " / ".join(_pm(s["final_softmax_entropy_per_layer"], i, 2) for i in layers),
        " / ".join(_pm(s["final_entropy_per_layer"], i, 2) for i in layers),
      ]
    )
  if floor_rows:
    floor_headers = [
      "setting/variant",
      "floor (fraction of log n)",
      "rows below the floor per layer",
      "softmax entropy/log n per layer (before the floor)",
      "entropy/log n per layer (after)",
    ]
    parts.append(
      "Is the floor active? At the end of training, on the validation batch, the fraction of "
      "query rows (all heads, the single-key first row left out) whose softmax entropy "
      "H(softmax(s))/log(n_valid) lies below the floor (those rows are normalized to the floor, "
      "the others are plain softmax), the mean relative softmax entropy before the floor, and "
      "the mean after it (mean ± std over seeds):\n\n"
      + common.markdown_table(floor_headers, floor_rows)
    )
  parts.append(
    "Differences against the seed spread (larger = the mean ± std intervals do not overlap; "
    "a heuristic, not a significance test):\n\n"
    + "\n".join(comparisons(result["summary"], list(cfg["settings"])))
  )
  return "\n\n".join(parts) + "\n"


def main(argv=None) -> None:
  common.module_main("attention_collapse", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

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
key), measured on a fixed validation batch.

Run ``python -m benchmarks.attention_collapse [--quick]``: prints a table and writes
``attention_collapse.{json,md,png}`` into ``benchmarks/results/``.
"""

from __future__ import annotations

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
      attn = enn.EntropyMultiHeadAttention(**kwargs, target_entropy=0.5, learn_target=learn)
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
  model = CharTransformer(corpus.vocab_size, length, variant, layers=layers)
  train_batches = corpus.batches(seed, batch, length)
  valid_x, valid_y = next(corpus.batches(seed + 1, 4 * batch, length, split="valid"))
  params = model.init(jax.random.key(seed), valid_x[:1])["params"]
  decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # kernels/embeddings only
  adamw = optax.adamw(schedule(setting, steps), weight_decay=0.1, mask=decay)
  opt = optax.chain(optax.clip_by_global_norm(1.0), adamw)
  opt_state = opt.init(params)

  def loss_fn(params, x, y):
    logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, state["intermediates"]

  @jax.jit
  def step(params, opt_state, x, y):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, y):
    loss, inter = loss_fn(params, x, y)
    blocks = sorted(k for k in inter if k.startswith("Block"))
    ent = [relative_entropy(jax.tree.leaves(inter[b])[0]) for b in blocks]
    return loss, jnp.stack(ent)

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
      params, opt_state, loss = step(params, opt_state, x, y)
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


def run(quick: bool = False) -> dict:
  """Trains every variant in every setting; returns the curves and a summary."""
  corpus = CharCorpus()
  size = (
    dict(steps=40, batch=8, length=32, layers=2, eval_every=10)
    if quick
    else dict(steps=300, batch=16, length=64, layers=2, eval_every=20)
  )
  runs = {}
  for setting in SETTINGS:
    for variant in VARIANTS:
      curves = train(variant, setting, corpus, **size)
      runs[f"{setting}/{variant}"] = curves
      print(
        f"{setting:>9} {variant:>16}: valid loss {curves['valid_loss'][-1]:.3f}, "
        f"entropy {np.round(curves['entropy'][-1], 3).tolist()}, {curves['seconds']:.0f} s"
      )
  summary = {
    name: {
      "final_valid_loss": c["valid_loss"][-1],
      "best_valid_loss": float(np.nanmin(c["valid_loss"])),
      "final_entropy_per_layer": c["entropy"][-1],
      "min_entropy_per_layer": np.min(np.asarray(c["entropy"]), axis=0).tolist(),
    }
    for name, c in runs.items()
  }
  return {
    "config": {**size, "features": 128, "heads": 4, "settings": SETTINGS, "quick": quick},
    "summary": summary,
    "runs": runs,
    "environment": common.environment(),
  }


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt

  settings = list(result["config"]["settings"])
  fig, axes = plt.subplots(2, len(settings), figsize=(10, 6), sharex=True)
  colors = dict(zip(VARIANTS, ("tab:red", "tab:blue", "tab:green"), strict=True))
  for col, setting in enumerate(settings):
    for variant in VARIANTS:
      c = result["runs"][f"{setting}/{variant}"]
      axes[0, col].plot(c["step"], c["valid_loss"], color=colors[variant], label=variant)
      ent = np.asarray(c["entropy"])
      for layer in range(ent.shape[1]):
        style = "-" if layer == 0 else "--"
        label = f"{variant} L{layer}"
        axes[1, col].plot(c["step"], ent[:, layer], style, color=colors[variant], label=label)
    lr = result["config"]["settings"][setting]
    axes[0, col].set_title(f"{setting} (peak lr {lr:g})")
    axes[0, col].set_ylabel("validation loss (nats/char)")
    axes[1, col].set_ylabel("attention entropy / log n")
    axes[1, col].set_xlabel("step")
    axes[1, col].set_ylim(0, 1)
  axes[0, 0].legend(fontsize=7)
  axes[1, 0].legend(fontsize=6, ncol=2)
  common.write_figure(fig, path)


def markdown(result: dict) -> str:
  rows = []
  for name, s in result["summary"].items():
    rows.append(
      [
        name,
        f"{s['final_valid_loss']:.3f}",
        f"{s['best_valid_loss']:.3f}",
        " / ".join(f"{e:.2f}" for e in s["final_entropy_per_layer"]),
        " / ".join(f"{e:.2f}" for e in s["min_entropy_per_layer"]),
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
  note = (
    f"Char-level LM on the CPython help topics; {cfg['layers']} layers, {cfg['features']} "
    f"features, {cfg['heads']} heads, context {cfg['length']}, batch {cfg['batch']}, "
    f"{cfg['steps']} steps of adamw (weight decay 0.1 on matrices only, clip 1.0), one seed. "
    "Entropy is the mean "
    "over query rows of H/log(n_valid) on a fixed validation batch."
  )
  return note + "\n\n" + common.markdown_table(headers, rows) + "\n"


def main(argv=None) -> None:
  common.snapshot_main("attention_collapse", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

"""Length extrapolation: train a char-level LM at 128 tokens, evaluate it at up to 1024.

Which entropy should attention rows have when a model reads inputs longer than those it was trained
on? Entropy normalization comes out of the study of attention's *entropy invariance* (Su 2021,
"从熵不变性看Attention的Scale操作"): a row's entropy should be insensitive to the number of keys
``n``. Su's quick derivation gives ``H ≈ log n − λ(s_max − s̄)`` for a row with logit scale ``λ``,
so a fixed scale lets the entropy grow like ``log n`` (the row is diluted over the new keys), and a
scale ``λ ∝ log n`` holds it (roughly) in place. Entropy normalization can hold it exactly, in nats.
This experiment tests that hypothesis as stated, with the targets in nats, against the scales and
against a fixed fraction of ``log n`` (which grows with ``n``: the dilution the scale was built to
stop).

Setup. The same small pre-LN causal character transformer (2 layers, 128 features, 4 heads of 32,
GELU MLP) is trained on :class:`benchmarks.corpus.CharCorpus` (the CPython help topics) at 128
tokens with ``optax.adamw`` (linear warm-up over 10% of the steps, cosine decay to a tenth, weight
decay 0.1 on matrices only, global-norm clip 1.0). Only the attention normalization differs:

* ``standard``: ``softmax(q·k / sqrt(d))``;
* ``log_n``: Su's scale, the logits of query row ``i`` times ``log(n_valid) / log(128)``
  (``n_valid = i + 1`` under the causal mask);
* ``ssmax``: Scalable-Softmax (Nakanishi 2025): ``softmax((s · log n_valid) · z)`` with ``s``
  learned per (layer, head), the learned peer of ``log_n``; ``s`` starts at ``1 / log 128`` (our
  choice: the model starts as the standard one at the training length);
* ``nats_fixed``: :class:`entnorm_jax.linen.EntropyMultiHeadAttention` with ``target_entropy`` per
  head held at the **reference level**: the seed-matched standard model's mean entropy, in nats,
  of that (layer, head) over the rows at the training length (rows whose ``n_valid`` lies in
  ``(64, 128]``: the rows with the most keys seen in training; rows with few keys are bounded by
  ``log n_valid`` and would pull a mean over all rows down);
* ``nats_learned``: the same target learned per head (``learn_target=True``), starting there;
* ``ceiling``: ``max_entropy`` per head at the reference level (fixed): rows whose softmax entropy
  is below it are plain softmax, rows above are normalized down to it;
* ``fraction_learned``: ``target_fraction`` learned per head from 0.5 (the link to the earlier
  table, whose ``entropy_learned`` it is).

Training-free variants, evaluated on the trained ``standard`` model with no retraining, changing
only the rows with more keys than in training (``n_valid > 128``; the others are untouched):

* ``log_n_eval``: Su's scale at evaluation only, ``max(1, log n_valid / log 128)``;
* ``cap_eval``: those rows capped at the head's reference level (``max_entropy``);
* ``hold_eval``: those rows held at the head's reference level (``target_entropy``).

InfoScale (Li et al. 2025, training-free entropy-invariant scaling) is not included: its formula
is not in the text we can consult offline (the abstract says only that it "preserves focus on
original tokens during length extrapolation by ensuring consistent entropy"), and a paraphrase
would test our reading, not the paper.

Positions: rotary embeddings (RoPE) applied to the queries and keys inside a custom
``attention_fn``, so every variant has the same architecture; the parameter trees differ only by
the variant's own parameters (``ssmax_s``, the targets). The main arm uses the *critical base*
:func:`critical_rope_base`, the largest base whose slowest rotation completes a full turn within
the training length (about 25 for 128 tokens and heads of 32): every rotary dimension has seen all
its angles in training, so what changes past 128 tokens is mostly the number of keys, which is what
the normalizations act on. With the usual base 10000 the slow dimensions turn through angles never
seen in training (Liu et al. 2023); a control arm (``CONTROL_TRAINED``: standard, log_n, nats_fixed,
ceiling, and the training-free variants) runs with that base and three seeds.

Learning rate: a small grid (``lr_grid``, the peak of the schedule) for the *standard* model alone,
one run each with a seed not used afterwards, chosen by its validation loss at the training length.
The chosen rate is reused for every variant, so the tuning favours the baseline if it favours
anyone.

Evaluation: ``eval_windows`` windows of 1024+1 characters evenly spaced over the validation split
(the same for every run). Attention is causal, so the outputs at the first ``L`` positions of a
1024-token window are exactly those of the ``L``-token window: one pass at 1024 gives the
evaluation at 128, 256, 512 and 1024. Reported, as mean ± sample standard deviation over seeds:

* validation loss (nats/char) per position bucket [0,128), [128,256), [256,512), [512,1024), over
  all positions of each evaluation length, and minus the standard model's, paired by seed;
* attention entropy in nats (and relative to ``log n_valid``) per layer at each evaluation length,
  and per (layer, head) by ``n_valid`` in octaves (2, 3–4, 5–8, ..., 513–1024 keys): how each
  head's entropy moves as keys are added.

Run ``python -m benchmarks.extrapolation [--quick] [--out DIR] [--plot-only]``: the full run writes
``extrapolation.{json,md,png}`` into ``benchmarks/results/``; ``--quick`` (or ``ENTNORM_QUICK=1``)
is a tiny smoke run, written into a temporary folder (:func:`benchmarks.common.out_dir`). The
full run is sized to finish in under 45 minutes on a 2-core CPU; its wall time is recorded in the
JSON.
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

TRAINED = (
  "standard",
  "log_n",
  "ssmax",
  "nats_fixed",
  "nats_learned",
  "ceiling",
  "fraction_learned",
)
TRAINING_FREE = ("log_n_eval", "cap_eval", "hold_eval")  # on the trained standard model
VARIANTS = TRAINED + TRAINING_FREE
# The target keyword of each entropy variant and whether it is trained.
ENTROPY = {
  "nats_fixed": ("target_entropy", False),
  "nats_learned": ("target_entropy", True),
  "ceiling": ("max_entropy", False),
  "fraction_learned": ("target_fraction", True),
  "cap_eval": ("max_entropy", False),
  "hold_eval": ("target_entropy", False),
}
# The variants whose targets are the standard model's reference levels (nats).
MEASURED = tuple(v for v, (keyword, _) in ENTROPY.items() if keyword != "target_fraction")
RAW = {"target_entropy": "target_raw", "target_fraction": "target_raw", "max_entropy": "max_raw"}
FRACTION = 0.5  # initial target of fraction_learned
LR_GRID = (1e-3, 3e-3, 1e-2)
CONTROL_ROPE_BASE = 10000.0  # the usual base, for the control arm
CONTROL_TRAINED = ("standard", "log_n", "nats_fixed", "ceiling")

# Model, budget and evaluation; eval lengths are train_length × (1, 2, 4, 8).
SIZES = {
  False: dict(
    features=128,
    heads=4,
    layers=2,
    train_length=128,
    batch=16,
    steps=400,
    seeds=3,
    sweep_seed=100,
    lr_grid=LR_GRID,
    eval_windows=32,
    eval_batch=8,
    control_seeds=3,
  ),
  True: dict(
    features=32,
    heads=2,
    layers=1,
    train_length=16,
    batch=8,
    steps=12,
    seeds=2,
    sweep_seed=100,
    lr_grid=(1e-3, 3e-3),
    eval_windows=4,
    eval_batch=4,
    control_seeds=1,
  ),
}


def critical_rope_base(train_length: int, head_dim: int) -> float:
  """Largest RoPE base whose slowest rotation completes a full turn within ``train_length``.

  The rotary frequencies are ``base ** (-j / half)``, ``j < half = head_dim // 2``; the slowest
  has period ``2π · base ** ((half - 1) / half)``, which equals ``train_length`` at this base.
  """
  half = head_dim // 2
  return float((train_length / (2 * np.pi)) ** (half / (half - 1)))


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding of ``x`` ``[batch..., length, heads, depth]`` (halves rotated)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None] * freq  # [length, half]
  cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


def logit_scale(variant: str, n_valid: jax.Array, train_length: int, ssmax_s=None):
  """The factor on row ``i``'s logits (``n_valid = i + 1``) of a scaled variant: ``[q, heads]``
  (``[q, 1]`` unless SSMax)."""
  log_n = jnp.log(n_valid)[:, None]
  if variant == "log_n":
    return log_n / np.log(train_length)
  if variant == "log_n_eval":
    return jnp.maximum(1.0, log_n / np.log(train_length))
  if variant == "ssmax":
    return log_n * ssmax_s[None, :]
  return jnp.ones_like(log_n)


def make_attention_fn(variant: str, train_length: int, rope_base: float | None, ssmax_s=None):
  """The ``attention_fn`` of ``variant``: RoPE on q and k, then the variant's normalization.

  Self-attention only (queries and keys share positions ``0..length-1``; under the causal mask row
  ``i`` sees ``n_valid = i + 1`` keys). Entropy variants take their target from the module's
  keywords; the training-free ones keep softmax on the rows with ``n_valid <= train_length``.
  ``ssmax_s`` is the SSMax parameter ``[heads]`` (only for ``ssmax``).
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")

  def attention_fn(
    query,
    key,
    value,
    mask=None,
    module=None,
    dtype=None,
    target_entropy=None,
    target_fraction=None,
    max_entropy=None,
  ):
    positions = jnp.arange(query.shape[-3])
    if rope_base is not None:
      query, key = rope(query, positions, rope_base), rope(key, positions, rope_base)
    if variant in ENTROPY:
      targets = dict(
        target_entropy=target_entropy, target_fraction=target_fraction, max_entropy=max_entropy
      )
      targets = {k: v for k, v in targets.items() if v is not None}
      weights = enn.entropy_attention_weights(query, key, mask=mask, dtype=dtype, **targets)
      if variant in TRAINING_FREE:
        softmax = nn.dot_product_attention_weights(query, key, mask=mask, dtype=dtype)
        beyond = (positions >= train_length)[:, None]  # [q, 1]: rows with more keys than trained
        weights = jnp.where(beyond, weights, softmax)
    else:
      scale = logit_scale(variant, (positions + 1).astype(jnp.float32), train_length, ssmax_s)
      query = query * scale[..., None].astype(query.dtype)
      weights = nn.dot_product_attention_weights(query, key, mask=mask, dtype=dtype)
    if module is not None:
      module.sow("intermediates", "attention_weights", weights)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)

  return attention_fn


class Block(nn.Module):
  """Pre-LN transformer block with RoPE attention normalized as ``variant``."""

  features: int
  heads: int
  variant: str
  train_length: int
  rope_base: float | None

  @nn.compact
  def __call__(self, x, mask, sow_weights=False):
    ssmax_s = None
    if self.variant == "ssmax":
      init = nn.initializers.constant(1.0 / np.log(self.train_length))
      ssmax_s = self.param("ssmax_s", init, (self.heads,))
    fn = make_attention_fn(self.variant, self.train_length, self.rope_base, ssmax_s)
    kwargs = dict(num_heads=self.heads, qkv_features=self.features, attention_fn=fn)
    if self.variant in ENTROPY:
      keyword, _ = ENTROPY[self.variant]
      # Targets are per-head parameters: measured levels are written in after init
      # (with_targets), fixed ones are left out of the optimizer (Experiment.frozen).
      initial = FRACTION if keyword == "target_fraction" else 1.0
      attn = enn.EntropyMultiHeadAttention(
        **kwargs, **{keyword: initial}, learn_target=True, name="attention"
      )
    else:
      attn = nn.MultiHeadDotProductAttention(**kwargs, name="attention")
    x = x + attn(nn.LayerNorm()(x), mask=mask, sow_weights=sow_weights)
    h = nn.Dense(4 * self.features)(nn.LayerNorm()(x))
    return x + nn.Dense(self.features)(nn.gelu(h))


class RopeCharTransformer(nn.Module):
  """Decoder-only character LM with rotary positions (any input length)."""

  vocab: int
  variant: str
  train_length: int
  features: int = 128
  heads: int = 4
  layers: int = 2
  rope_base: float | None = None

  @nn.compact
  def __call__(self, tokens, sow_weights=False):
    x = nn.Embed(self.vocab, self.features)(tokens)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      block = Block(self.features, self.heads, self.variant, self.train_length, self.rope_base)
      x = block(x, mask, sow_weights)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _blocks(tree) -> list[str]:
  return sorted((k for k in tree if k.startswith("Block")), key=lambda k: int(k.split("_")[1]))


def with_targets(params: dict, keyword: str, levels) -> dict:
  """``params`` with each block's target parameter set to ``levels`` ``[layers, heads]`` (nats).

  The module maps its parameter to nats by ``softplus``; this writes ``softplus⁻¹(levels)``.
  """
  levels = np.asarray(levels, np.float64)
  raw = np.log(np.expm1(levels)).astype(np.float32)
  params = jax.tree.map(lambda x: x, params)  # new containers, shared leaves
  for i, block in enumerate(_blocks(params)):
    params[block]["attention"][RAW[keyword]] = jnp.asarray(raw[i])
  return params


def learned_parameters(variant: str, params) -> list[list[float]] | None:
  """Per (layer, head): a learned target (nats, or fraction of log n) or SSMax's ``s``."""
  if variant == "ssmax":
    return [np.asarray(params[b]["ssmax_s"]).tolist() for b in _blocks(params)]
  if variant not in ENTROPY or not ENTROPY[variant][1]:
    return None
  keyword = ENTROPY[variant][0]
  to_target = jax.nn.sigmoid if keyword == "target_fraction" else jax.nn.softplus
  raws = [params[b]["attention"][RAW[keyword]] for b in _blocks(params)]
  return [np.asarray(to_target(r)).tolist() for r in raws]


def head_entropy(weights: jax.Array) -> jax.Array:
  """Entropy (nats) of each causal row of ``[b, h, q, k]``, summed over the batch: ``[h, q]``."""
  return -jnp.sum(jax.scipy.special.xlogy(weights, weights), axis=(0, -1))


def octaves(length: int) -> list[tuple[int, int]]:
  """Row positions ``[2^j, 2^(j+1))`` for ``j ≥ 0``: the rows with ``n_valid`` in
  ``(2^j, 2^(j+1)]`` keys (row 0, one key, has entropy 0 whatever the variant). The octaves from
  ``train_length / 2`` on are the position buckets of the loss tables."""
  edges = [2**j for j in range(int(np.log2(length)) + 1)]
  return list(zip(edges[:-1], edges[1:], strict=True))


def octave_labels(length: int) -> list[str]:
  """``n_valid`` of each octave: ``2``, ``3-4``, ``5-8``, ..."""
  return [f"{b}" if b == a + 1 else f"{a + 1}-{b}" for a, b in octaves(length)]


class Experiment:
  """Compiled training step and evaluation of one variant, shared by its runs (seeds, rates)."""

  def __init__(self, variant: str, vocab: int, cfg: dict, rope_base: float | None):
    self.variant = variant
    self.cfg = cfg
    self.model = RopeCharTransformer(
      vocab,
      variant,
      cfg["train_length"],
      features=cfg["features"],
      heads=cfg["heads"],
      layers=cfg["layers"],
      rope_base=rope_base,
    )
    # A fixed target is a parameter the optimizer never moves (its gradient is zeroed).
    self.frozen = (
      RAW[ENTROPY[variant][0]] if variant in ENTROPY and not ENTROPY[variant][1] else None
    )
    steps = cfg["steps"]
    # Peak 1 here; the step multiplies the updates by the peak rate (a traced argument), which is
    # adamw with the schedule times the peak, and lets every rate share one compilation.
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(steps // 10, 1), steps, 0.1)
    decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # kernels/embeddings only
    self.opt = optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(unit, weight_decay=0.1, mask=decay)
    )
    self.step = jax.jit(self._step)
    self.evaluate = jax.jit(self._evaluate)

  def init(self, seed: int, levels=None):
    """Parameters and optimizer state of seed ``seed``; ``levels`` ``[layers, heads]`` (nats) are
    the reference levels of a measured variant."""
    tokens = jnp.zeros((1, self.cfg["train_length"]), jnp.int32)
    params = self.model.init(jax.random.key(seed), tokens)["params"]
    if self.variant in MEASURED:
      params = with_targets(params, ENTROPY[self.variant][0], levels)
    return params, self.opt.init(params)

  def _loss(self, params, x, y):
    logits = self.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def _step(self, params, opt_state, x, y, peak_lr):
    loss, grads = jax.value_and_grad(self._loss)(params, x, y)
    if self.frozen:
      keep = lambda path, g: jnp.zeros_like(g) if path[-1].key == self.frozen else g
      grads = jax.tree_util.tree_map_with_path(keep, grads)
    updates, opt_state = self.opt.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: peak_lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss

  def _evaluate(self, params, x, y):
    """Per-position loss summed over the batch ``[L]``; row entropies summed over the batch
    ``[layers, heads, L]`` (nats). The weights are sown at every length: evaluation only."""
    logits, state = self.model.apply(
      {"params": params}, x, sow_weights=True, mutable=["intermediates"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(axis=0)
    inter = state["intermediates"]
    ent = [head_entropy(jax.tree.leaves(inter[b])[0]) for b in _blocks(inter)]
    return loss, jnp.stack(ent)


def eval_windows(corpus: CharCorpus, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """``count`` windows of ``length + 1`` characters evenly spaced over the validation split."""
  data = corpus.valid
  starts = np.linspace(0, len(data) - length - 1, count).astype(int)
  window = np.stack([data[s : s + length + 1] for s in starts])
  return window[:, :-1], window[:, 1:]


def train(exp: Experiment, corpus: CharCorpus, seed: int, peak_lr: float, levels=None):
  """Trains one model (data order and init from ``seed``); returns its params and loss record."""
  cfg = exp.cfg
  start = time.perf_counter()
  params, opt_state = exp.init(seed, levels)
  batches = corpus.batches(seed, cfg["batch"], cfg["train_length"])
  losses = []
  for _ in range(cfg["steps"]):
    x, y = next(batches)
    params, opt_state, loss = exp.step(params, opt_state, x, y, jnp.float32(peak_lr))
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), dtype=np.float64)
  record = {
    "seed": seed,
    "peak_lr": peak_lr,
    "train_loss_curve": [float(np.mean(c)) for c in np.array_split(losses, min(10, len(losses)))],
    "final_train_loss": float(np.mean(losses[-max(len(losses) // 10, 1) :])),
    "train_s": time.perf_counter() - start,
  }
  return params, record


def evaluate(exp: Experiment, params, windows, length: int | None = None) -> dict:
  """Mean loss per position ``[L]`` and row entropy (nats) per layer, head and position."""
  wx, wy = windows
  if length is not None:
    wx, wy = wx[:, :length], wy[:, :length]
  cfg = exp.cfg
  loss_sum = np.zeros(wx.shape[1])
  ent_sum = np.zeros((cfg["layers"], cfg["heads"], wx.shape[1]))
  b = cfg["eval_batch"]
  for i in range(0, len(wx), b):
    loss, ent = exp.evaluate(params, wx[i : i + b], wy[i : i + b])
    loss_sum += np.asarray(loss)
    ent_sum += np.asarray(ent)
  return {"position_loss": loss_sum / len(wx), "entropy": ent_sum / len(wx)}


def record_evaluation(exp: Experiment, params, windows, record: dict) -> dict:
  """``record`` plus the evaluation figures the summaries use (rounded for the JSON)."""
  start = time.perf_counter()
  ev = evaluate(exp, params, windows)
  ent = ev["entropy"]  # [layers, heads, L]
  out = dict(record)
  out["position_loss"] = np.round(ev["position_loss"], 5).tolist()
  out["layer_entropy"] = np.round(ent.mean(axis=1), 5).tolist()  # [layers, L], nats
  out["head_entropy"] = [  # [layers, heads, octaves], nats
    [[float(np.round(h[a:b].mean(), 5)) for a, b in octaves(ent.shape[-1])] for h in layer]
    for layer in ent
  ]
  learned = learned_parameters(exp.variant, params)
  if learned is not None:
    out["learned"] = learned
  out["seconds"] = out.get("train_s", 0.0) + time.perf_counter() - start
  return out


def reference_levels(standard_run: dict, train_length: int) -> np.ndarray:
  """Each (layer, head)'s mean entropy (nats) over the rows at the training length, those with
  ``n_valid`` in ``(train_length / 2, train_length]``: ``[layers, heads]``."""
  octave = int(np.log2(train_length)) - 1  # rows [L/2, L)
  return np.asarray(standard_run["head_entropy"])[:, :, octave]


def eval_lengths(train_length: int) -> list[int]:
  return [train_length * m for m in (1, 2, 4, 8)]


def buckets(train_length: int) -> list[tuple[int, int]]:
  lengths = eval_lengths(train_length)
  return list(zip([0, *lengths[:-1]], lengths, strict=True))


def _mean_std(values) -> dict:
  v = np.asarray(values, dtype=np.float64)
  std = float(np.std(v, axis=0, ddof=1)) if v.shape[0] > 1 else 0.0
  return {"mean": float(np.mean(v)), "std": std, "values": v.tolist()}


def _array_mean_std(values) -> dict:
  v = np.asarray(values, dtype=np.float64)
  std = np.std(v, axis=0, ddof=1) if v.shape[0] > 1 else np.zeros_like(v[0])
  return {"mean": np.round(v.mean(axis=0), 5).tolist(), "std": np.round(std, 5).tolist()}


def summarize(runs: list[dict], train_length: int) -> dict:
  """Per-run figures (buckets, eval lengths, entropies), then mean ± std over the runs."""
  per_run = []
  for r in runs:
    loss = np.asarray(r["position_loss"])
    ent = np.asarray(r["layer_entropy"])  # [layers, L] nats
    rel = ent[:, 1:] / np.log(np.arange(2, ent.shape[1] + 1))  # rows 1.. (row 0 has log 1 = 0)
    lengths = eval_lengths(train_length)
    per_run.append(
      {
        "bucket_loss": [float(loss[a:b].mean()) for a, b in buckets(train_length)],
        "length_loss": [float(loss[:n].mean()) for n in lengths],
        "length_entropy": [ent[:, 1:n].mean(axis=1).tolist() for n in lengths],
        "length_relative": [rel[:, : n - 1].mean(axis=1).tolist() for n in lengths],
      }
    )
  out = {}
  for key in ("bucket_loss", "length_loss"):
    cols = np.asarray([p[key] for p in per_run])  # [seeds, 4]
    out[key] = [_mean_std(cols[:, j]) for j in range(cols.shape[1])]
  for key in ("length_entropy", "length_relative"):
    cols = np.asarray([p[key] for p in per_run])  # [seeds, 4, layers]
    out[key] = [
      [_mean_std(cols[:, j, layer]) for layer in range(cols.shape[2])] for j in range(cols.shape[1])
    ]
  out["head_entropy"] = _array_mean_std([r["head_entropy"] for r in runs])
  if "final_train_loss" in runs[0]:
    out["final_train_loss"] = _mean_std([r["final_train_loss"] for r in runs])
  if "learned" in runs[0]:
    out["learned"] = _array_mean_std([r["learned"] for r in runs])
  if "reference_levels" in runs[0]:
    out["reference_levels"] = _array_mean_std([r["reference_levels"] for r in runs])
  return out


def paired_differences(summary: dict, variant: str, key: str = "bucket_loss") -> list[dict]:
  """``variant``'s loss minus the standard model's, per bucket, paired by seed: mean, sample std
  and how many seeds ``variant`` is better (lower) in."""
  out = []
  for s, b in zip(summary[variant][key], summary["standard"][key], strict=True):
    diff = np.asarray(s["values"]) - np.asarray(b["values"])
    std = float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
    out.append({"mean": float(diff.mean()), "std": std, "better": int(np.sum(diff < 0))})
  return out


def _log_run(label: str, variant: str, run: dict, lengths: list[int]) -> None:
  pos = np.asarray(run["position_loss"])
  print(
    f"{label} seed {run['seed']} {variant:>16}: loss [0,{lengths[0]}) "
    f"{pos[: lengths[0]].mean():.3f}, [{lengths[-2]},{lengths[-1]}) "
    f"{pos[lengths[-2] :].mean():.3f}, {run['seconds']:.0f} s",
    flush=True,
  )


def run_arm(corpus, cfg, windows, peak_lr, rope_base, trained, seeds, label) -> dict:
  """Trains ``trained`` (standard first) for each seed, then the training-free variants on the
  seed's standard model; the measured variants take the seed's standard reference levels."""
  lengths = eval_lengths(cfg["train_length"])
  variants = (*trained, *TRAINING_FREE)
  experiments = {v: Experiment(v, corpus.vocab_size, cfg, rope_base) for v in variants}
  runs = {v: [] for v in variants}
  for seed in seeds:
    standard_params, record = train(experiments["standard"], corpus, seed, peak_lr)
    run = record_evaluation(experiments["standard"], standard_params, windows, record)
    levels = reference_levels(run, cfg["train_length"])
    run["reference_levels"] = np.round(levels, 5).tolist()
    runs["standard"].append(run)
    _log_run(label, "standard", run, lengths)
    for v in variants[1:]:
      exp = experiments[v]
      levels_v = levels if v in MEASURED else None
      if v in TRAINING_FREE:
        params = standard_params
        if v in MEASURED:
          params = with_targets(standard_params, ENTROPY[v][0], levels)
        record = {"seed": seed}
      else:
        params, record = train(exp, corpus, seed, peak_lr, levels_v)
      runs[v].append(record_evaluation(exp, params, windows, record))
      _log_run(label, v, runs[v][-1], lengths)
  return runs


def run(quick: bool = False) -> dict:
  """LR sweep for the standard model, every variant over the seeds, the control arm."""
  wall = time.perf_counter()
  cfg = dict(SIZES[quick])
  corpus = CharCorpus()
  lengths = eval_lengths(cfg["train_length"])
  windows = eval_windows(corpus, cfg["eval_windows"], lengths[-1])
  base = critical_rope_base(cfg["train_length"], cfg["features"] // cfg["heads"])

  standard = Experiment("standard", corpus.vocab_size, cfg, base)
  sweep = []
  for lr in cfg["lr_grid"]:
    params, _ = train(standard, corpus, cfg["sweep_seed"], lr)
    loss = evaluate(standard, params, windows, cfg["train_length"])["position_loss"]
    sweep.append({"peak_lr": lr, "valid_loss": float(np.mean(loss))})
    print(f"lr sweep (standard, seed {cfg['sweep_seed']}): {lr:g} -> {sweep[-1]['valid_loss']:.4f}")
  peak_lr = sweep[int(np.nanargmin([s["valid_loss"] for s in sweep]))]["peak_lr"]

  seeds = range(cfg["seeds"])
  runs = run_arm(corpus, cfg, windows, peak_lr, base, TRAINED, seeds, "main")
  main_s = time.perf_counter() - wall
  control = None
  if cfg["control_seeds"]:
    seeds = range(cfg["control_seeds"])
    control_runs = run_arm(
      corpus, cfg, windows, peak_lr, CONTROL_ROPE_BASE, CONTROL_TRAINED, seeds, "control"
    )
    control = {
      "rope_base": CONTROL_ROPE_BASE,
      "seeds": cfg["control_seeds"],
      "variants": list(control_runs),
      "summary": {v: summarize(r, cfg["train_length"]) for v, r in control_runs.items()},
      "runs": control_runs,
    }
  return {
    "config": {
      **cfg,
      "quick": quick,
      "variants": list(VARIANTS),
      "trained": list(TRAINED),
      "training_free": list(TRAINING_FREE),
      "targets": {v: {"keyword": k, "learned": learned} for v, (k, learned) in ENTROPY.items()},
      "reference_levels": "standard model's mean row entropy (nats) per (layer, head) over rows "
      "with n_valid in (train_length/2, train_length], same seed",
      "fraction_initial": FRACTION,
      "ssmax_initial_s": 1.0 / float(np.log(cfg["train_length"])),
      "rope_base": base,
      "eval_lengths": lengths,
      "buckets": buckets(cfg["train_length"]),
      "octaves": octaves(lengths[-1]),
      "schedule": "adamw, warmup 10% then cosine to peak/10, weight decay 0.1 (matrices), clip 1",
      "std": "sample standard deviation over seeds (ddof=1)",
    },
    "lr_sweep": {
      "runs": sweep,
      "chosen_peak_lr": peak_lr,
      "criterion": "valid loss at train length",
    },
    "summary": {v: summarize(runs[v], cfg["train_length"]) for v in VARIANTS},
    "runs": runs,
    "control": control,
    "main_wall_s": main_s,
    "wall_s": time.perf_counter() - wall,
    "environment": common.environment(),
  }


LABELS = {
  "standard": "standard",
  "log_n": "log-n scale",
  "ssmax": "SSMax (s learned)",
  "nats_fixed": "entropy, nats fixed",
  "nats_learned": "entropy, nats learned",
  "ceiling": "ceiling (max_entropy)",
  "fraction_learned": "entropy, fraction learned",
  "log_n_eval": "log-n at eval only",
  "cap_eval": "cap at eval only",
  "hold_eval": "hold at eval only",
}


def _pm(s: dict, digits: int = 3) -> str:
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _differences_table(summary: dict, variants, bks: list[str]) -> str:
  rows = []
  for v in variants:
    if v == "standard":
      continue
    seeds = len(summary[v]["bucket_loss"][0]["values"])
    cells = [
      f"{d['mean']:+.3f} ± {d['std']:.3f} ({d['better']}/{seeds})"
      for d in paired_differences(summary, v)
    ]
    rows.append([v, *cells])
  return common.markdown_table(["variant", *bks], rows)


def _head_lines(stats: dict, digits: int = 2) -> str:
  return "; ".join(
    f"L{i}: " + ", ".join(f"{m:.{digits}f}±{s:.{digits}f}" for m, s in zip(mu, sd, strict=True))
    for i, (mu, sd) in enumerate(zip(stats["mean"], stats["std"], strict=True))
  )


def markdown(result: dict) -> str:
  cfg = result["config"]
  summ = result["summary"]
  variants = cfg["variants"]
  bks = [f"[{a},{b})" for a, b in cfg["buckets"]]
  heads = [f"L={n}" for n in cfg["eval_lengths"]]
  parts = []
  sweep = ", ".join(f"{s['peak_lr']:g}: {s['valid_loss']:.3f}" for s in result["lr_sweep"]["runs"])
  env = result["environment"]
  wall = f"{result['wall_s'] / 60:.1f} min"
  if result.get("control"):
    wall += f" ({result['main_wall_s'] / 60:.1f} min without the control arm)"
  parts.append(
    f"Char-level LM on the CPython help topics, RoPE (base {cfg['rope_base']:.1f}, the critical "
    f"base for {cfg['train_length']} tokens), {cfg['layers']} layers, {cfg['features']} "
    f"features, {cfg['heads']} heads; trained at {cfg['train_length']} tokens, batch "
    f"{cfg['batch']}, {cfg['steps']} steps ({cfg['schedule']}), peak lr "
    f"{result['lr_sweep']['chosen_peak_lr']:g} chosen for the standard model (validation loss at "
    f"{cfg['train_length']} tokens, seed {cfg['sweep_seed']}: {sweep}) and reused for every "
    f"variant. Reference levels (the nats targets and ceilings): {cfg['reference_levels']}. "
    f"Training-free variants (`*_eval`) reuse the trained standard model and change only rows with "
    f"more than {cfg['train_length']} keys. {cfg['seeds']} seeds (0..{cfg['seeds'] - 1}), mean ± "
    f"sample std; evaluated on {cfg['eval_windows']} validation windows of "
    f"{cfg['eval_lengths'][-1]} characters. Wall time {wall} on {env['cpu_count']} CPUs "
    f"({env['cpu_model']}), jax {env['jax']}."
  )
  rows = [[v, *(_pm(s) for s in summ[v]["bucket_loss"])] for v in variants]
  parts.append(
    "Validation loss (nats/char) per position bucket:\n\n"
    + common.markdown_table(["variant", *bks], rows)
  )
  rows = [[v, *(_pm(s) for s in summ[v]["length_loss"])] for v in variants]
  parts.append(
    "Validation loss (nats/char) over all positions of an evaluation length L:\n\n"
    + common.markdown_table(["variant", *heads], rows)
  )
  parts.append(
    "Loss minus the standard model's per bucket (negative: better), mean ± std of the "
    "differences paired by seed (same initialization and data order), and in how many seeds the "
    "variant is better:\n\n" + _differences_table(summ, variants, bks)
  )
  rows = []
  for v in variants:
    cells = [
      " / ".join(f"{e['mean']:.2f}±{e['std']:.2f}" for e in per)
      for per in summ[v]["length_entropy"]
    ]
    rows.append([v, *cells])
  parts.append(
    "Attention entropy in nats (mean over query rows < L, per layer L0 / L1 ...):\n\n"
    + common.markdown_table(["variant", *heads], rows)
  )
  rows = []
  for v in variants:
    cells = [" / ".join(f"{e['mean']:.2f}" for e in per) for per in summ[v]["length_relative"]]
    rows.append([v, *cells])
  parts.append(
    "The same relative to log n_valid (the earlier table's unit):\n\n"
    + common.markdown_table(["variant", *heads], rows)
  )
  labels = octave_labels(cfg["eval_lengths"][-1])
  rows = []
  for v in variants:
    mean = np.asarray(summ[v]["head_entropy"]["mean"])  # [layers, heads, octaves]
    for layer, per_head in enumerate(mean):
      rows.append([f"{v} L{layer}", *(f"{x:.2f}" for x in per_head.mean(axis=0))])
  parts.append(
    "Entropy (nats) by key count n_valid, mean over the layer's heads and the seeds; each head's "
    "own curve is in the JSON (`summary.<variant>.head_entropy`) and the figure:\n\n"
    + common.markdown_table(["variant, layer", *labels], rows)
  )
  ref = summ["standard"]["reference_levels"]
  octave = len(labels) - 1
  growth = np.asarray(summ["standard"]["head_entropy"]["mean"])[:, :, octave]
  parts.append(
    "Reference levels per head (the standard model's entropy at the training length, nats, mean ± "
    f"std over seeds): {_head_lines(ref)}. The standard model's heads at {labels[-1]} keys: "
    + "; ".join(f"L{i}: " + ", ".join(f"{x:.2f}" for x in layer) for i, layer in enumerate(growth))
    + "."
  )
  names = {
    "ssmax": "SSMax s",
    "nats_learned": "learned nats",
    "fraction_learned": "learned fraction",
  }
  lines = [
    f"{names[v]}: {_head_lines(summ[v]['learned'])}" for v in names if "learned" in summ.get(v, {})
  ]
  if lines:
    parts.append(
      "Learned parameters per (layer, head), mean ± std over seeds: " + " | ".join(lines) + "."
    )
  rows = [[v, _pm(summ[v]["final_train_loss"])] for v in variants if "final_train_loss" in summ[v]]
  parts.append(
    "Training loss (mean of the last 10% of steps):\n\n"
    + common.markdown_table(["variant", "train loss"], rows)
  )
  control = result.get("control")
  if control:
    cs = control["summary"]
    cv = control["variants"]
    rows = [[v, *(_pm(s) for s in cs[v]["bucket_loss"])] for v in cv]
    parts.append(
      f"Control arm, RoPE base {control['rope_base']:g}, {control['seeds']} seed(s), same learning "
      "rate: validation loss (nats/char) per position bucket:\n\n"
      + common.markdown_table(["variant", *bks], rows)
    )
    parts.append(
      "Control arm: loss minus its standard model's, paired by seed:\n\n"
      + _differences_table(cs, cv, bks)
    )
    rows = []
    for v in cv:
      cells = [" / ".join(f"{e['mean']:.2f}" for e in per) for per in cs[v]["length_entropy"]]
      rows.append([v, *cells])
    parts.append(
      "Control arm: attention entropy (nats) per layer at each evaluation length:\n\n"
      + common.markdown_table(["variant", *heads], rows)
    )
  return "\n\n".join(parts) + "\n"


STYLE = {  # colour, marker, line style (training-free variants dashed)
  "standard": ("tab:red", "o", "-"),
  "log_n": ("tab:orange", "s", "-"),
  "ssmax": ("tab:brown", "v", "-"),
  "nats_fixed": ("tab:blue", "^", "-"),
  "nats_learned": ("tab:cyan", "D", "-"),
  "ceiling": ("tab:purple", "P", "-"),
  "fraction_learned": ("tab:green", "X", "-"),
  "log_n_eval": ("tab:orange", "s", "--"),
  "cap_eval": ("tab:purple", "P", "--"),
  "hold_eval": ("tab:blue", "^", "--"),
}


def _differences_panel(ax, summary, cfg, variants, title):
  x = np.arange(len(cfg["buckets"]))
  others = [v for v in variants if v != "standard"]
  width = 0.6 / len(others)
  for i, v in enumerate(others):
    d = paired_differences(summary, v)
    color, marker, ls = STYLE[v]
    ax.errorbar(
      x + (i - (len(others) - 1) / 2) * width,
      [e["mean"] for e in d],
      yerr=[e["std"] for e in d],
      fmt=marker,
      color=color,
      mfc="white" if ls == "--" else color,
      label=LABELS[v],
      capsize=2,
      ms=5,
    )
  ax.axhline(0, color="tab:red", lw=1)
  ax.axvspan(-0.5, 0.5, color="0.92", zorder=0)
  ax.set_xticks(x, [f"[{a},{b})" for a, b in cfg["buckets"]])
  ax.set_xlim(-0.5, len(x) - 0.5)
  ax.set_xlabel("position bucket (tokens; grey: trained length)")
  ax.set_ylabel("loss − standard's (nats/char), paired by seed")
  ax.set_title(title, fontsize=10)


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt

  cfg = result["config"]
  summ = result["summary"]
  variants = cfg["variants"]
  layers = cfg["layers"]
  control = result.get("control")
  labels = octave_labels(cfg["eval_lengths"][-1])
  x = np.arange(len(labels))
  fig, axes = plt.subplots(2, 2 + layers // 2, figsize=(17, 10), squeeze=False)
  axes = axes.ravel()
  title = f"RoPE base {cfg['rope_base']:.0f}: loss vs standard\n(mean ± std, {cfg['seeds']} seeds)"
  _differences_panel(axes[0], summ, cfg, variants, title)
  if control:
    seeds = f"{control['seeds']} seed{'s' if control['seeds'] > 1 else ''}"
    title = f"Control, RoPE base {control['rope_base']:g}: loss vs standard\n(mean ± std, {seeds})"
    _differences_panel(axes[1], control["summary"], cfg, control["variants"], title)
  for layer in range(layers):
    ax = axes[2 + layer]
    top = 0.0
    for v in variants:
      mean = np.asarray(summ[v]["head_entropy"]["mean"])[layer].mean(axis=0)
      top = max(top, mean.max())
      color, marker, ls = STYLE[v]
      mfc = "white" if ls == "--" else color
      ax.plot(x, mean, ls=ls, marker=marker, color=color, mfc=mfc, ms=5, label=LABELS[v])
    ax.plot(x, np.log([int(s.split("-")[-1]) for s in labels]), ":", color="0.5", label="log n")
    ax.set_ylim(0, 1.1 * top)  # log n (the ceiling of every row) runs off the top
    ax.set_xticks(x, labels, rotation=45, fontsize=7)
    ax.set_xlabel("keys per row n_valid")
    ax.set_ylabel("attention entropy (nats)")
    ax.set_title(f"Layer {layer}: entropy by key count (mean over heads)", fontsize=10)
    ax.axvline(np.log2(cfg["train_length"]) - 1, color="0.6", ls=":", lw=1)
  ax = axes[2 + layers]
  std = np.asarray(summ["standard"]["head_entropy"]["mean"])  # [layers, heads, octaves]
  for layer in range(layers):
    for h in range(std.shape[1]):
      ax.plot(x, std[layer, h], ["-", "--"][layer % 2], color=f"C{h}", lw=1.2,
              label=f"L{layer} head {h}")  # fmt: skip
  ax.axvline(np.log2(cfg["train_length"]) - 1, color="0.6", ls=":", lw=1)
  ax.set_xticks(x, labels, rotation=45, fontsize=7)
  ax.set_xlabel("keys per row n_valid")
  ax.set_ylabel("attention entropy (nats)")
  ax.set_title("Standard model: each head's entropy by key count\n(the reference is the octave "
               "ending at the trained length)", fontsize=10)  # fmt: skip
  ax.legend(fontsize=7, ncol=2)
  for ax in axes[3 + layers :]:
    ax.axis("off")
  # One legend for every panel (the same colours and markers; training-free variants hollow).
  handles, names = axes[2].get_legend_handles_labels()
  legend_ax = axes[-1] if len(axes) > 3 + layers else axes[0]
  legend_ax.legend(handles, names, fontsize=9, loc="center", title="variant")
  fig.tight_layout()
  common.write_figure(fig, path)


def main(argv=None) -> None:
  common.module_main("extrapolation", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

"""Length extrapolation: train a char-level LM at 128 tokens, evaluate it at up to 1024.

Does entropy normalization help a model read inputs longer than those it was trained on? The study
of attention's entropy invariance (Su 2021, "Entropy invariance and the scale of attention") says an
attention row should keep its entropy, relative to ``log n``, as the number of keys ``n`` grows:
with a fixed logit scale the entropy of a row over ``n`` keys is about ``log n - c``, so rows spread
out as inputs get longer; multiplying the logits by ``log n / log n_train`` keeps
``H / log n`` roughly constant, which is why that scale helps models extrapolate.
:class:`entnorm_jax.linen.EntropyMultiHeadAttention` with a relative target makes it exact:
every row has ``H = r · log(n_valid)``.

Setup. The same small pre-LN causal character transformer (2 layers, 128 features, 4 heads of 32,
GELU MLP) is trained on :class:`benchmarks.corpus.CharCorpus` (the CPython help topics) at 128
tokens with ``optax.adamw`` (linear warm-up over 10% of the steps, cosine decay to a tenth, weight
decay 0.1 on matrices only, global-norm clip 1.0), with four attention normalizations and nothing
else different:

* ``standard``: ``softmax(q·k / sqrt(d))`` (Flax's ``MultiHeadDotProductAttention``);
* ``log_n``: Su's entropy-invariance scale, the logits of query row ``i`` multiplied by
  ``log(n_valid) / log(128)`` with ``n_valid = i + 1`` its visible keys (the same module, the
  queries scaled per row, no clipping: rows shorter than 128 are softened during training too);
* ``entropy_fixed``: ``EntropyMultiHeadAttention`` with the fixed relative target 0.5 in every head
  (as in :mod:`benchmarks.attention_collapse`);
* ``entropy_learned``: the same with one learned target per head (``learn_target=True``, initial
  value 0.5).

Positions: rotary embeddings (RoPE) applied to the queries and keys inside a custom
``attention_fn`` (then Flax's ``dot_product_attention`` or
:func:`entnorm_jax.linen.entropy_dot_product_attention`), so all four variants have the same
parameters and the same architecture apart from the normalization. Learned absolute positions
cannot be evaluated past 128 at all. No positional encoding (NoPE) extrapolates, but a two-layer
causal NoPE model can only find the previous characters through the causal mask (by counting),
and in a pilot at this budget it reached 2.10 nats/char at positions below 128 against 1.50 with
RoPE, too weak a character model to say much; with NoPE the first layer's logits are also tied
for repeated characters, so low entropy targets cannot be met there. RoPE with the usual base 10000
fails past the training length for a reason no normalization touches: its slow rotary dimensions
turn through angles never seen in training (Liu et al. 2023, "Scaling laws of RoPE-based
extrapolation"). The main experiment therefore uses the *critical base*
:func:`critical_rope_base`, the largest base whose slowest rotation completes a full turn within
the training length (about 25 for 128 tokens and heads of 32), so that every rotary dimension has
seen all its angles in training and what changes past 128 tokens is mostly the number of keys,
which is what the normalizations act on. A control arm trains the four variants once (seed 0,
same learning rate) with base 10000 and reports the same figures.

Learning rate: a small grid (``LR_GRID``, the peak of the schedule) for the *standard* model alone,
one run each with a seed not used afterwards, chosen by its validation loss at the training length
(128 tokens, in distribution). The chosen rate is reused for every variant, so the tuning favours
the baseline if it favours anyone.

Evaluation: ``EVAL_WINDOWS`` windows of 1024+1 characters evenly spaced over the validation split
(the same for every run). Attention is causal, so the outputs at the first ``L`` positions of a
1024-token window are exactly those of the ``L``-token window: one pass at 1024 gives the
evaluation at 128, 256, 512 and 1024. Reported, as mean ± sample standard deviation over seeds:

* validation loss (nats/char) per position bucket [0,128), [128,256), [256,512), [512,1024) and
  over all positions of each evaluation length;
* the mean attention entropy per layer relative to ``log n``: ``H(a_q) / log(n_valid)`` averaged
  over the query rows (the first row, a single key, left out), heads and windows, at each
  evaluation length.

Run ``python -m benchmarks.extrapolation [--quick]``: the full run writes
``extrapolation.{json,md,png}`` into ``benchmarks/results/``; ``--quick`` (or ``ENTNORM_QUICK=1``)
is a tiny smoke run that only prints. The full run is sized to finish in under 30 minutes on a
2-core CPU; its wall time is recorded in the JSON.
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

VARIANTS = ("standard", "log_n", "entropy_fixed", "entropy_learned")
LR_GRID = (1e-3, 3e-3, 1e-2)
TARGET = 0.5  # the relative target of the entropy variants (initial value when learned)
CONTROL_ROPE_BASE = 10000.0  # the usual base, for the control arm

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
    control_seeds=1,
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


def make_attention_fn(variant: str, train_length: int, rope_base: float | None):
  """The ``attention_fn`` of ``variant``: RoPE on q and k, then the variant's normalization.

  Self-attention only (queries and keys share positions ``0..length-1``). With ``log_n`` the
  query of row ``i`` is multiplied by ``log(i + 1) / log(train_length)``: under the causal mask
  ``n_valid = i + 1``, so its logits are scaled by ``log(n_valid) / log(n_train)``.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")

  def attention_fn(query, key, value, mask=None, module=None, dtype=None, target_fraction=TARGET):
    positions = jnp.arange(query.shape[-3])
    if rope_base is not None:  # None: no positional encoding (NoPE)
      query, key = rope(query, positions, rope_base), rope(key, positions, rope_base)
    if variant.startswith("entropy"):
      return enn.entropy_dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        module=module,
        dtype=dtype,
        target_fraction=target_fraction,
      )
    if variant == "log_n":
      scale = jnp.log1p(positions.astype(jnp.float32)) / np.log(train_length)
      query = query * scale[:, None, None].astype(query.dtype)
    return nn.dot_product_attention(query, key, value, mask=mask, module=module, dtype=dtype)

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
    kwargs = dict(
      num_heads=self.heads,
      qkv_features=self.features,
      attention_fn=make_attention_fn(self.variant, self.train_length, self.rope_base),
    )
    if self.variant.startswith("entropy"):
      learn = self.variant == "entropy_learned"
      attn = enn.EntropyMultiHeadAttention(**kwargs, target_fraction=TARGET, learn_target=learn)
    else:
      attn = nn.MultiHeadDotProductAttention(**kwargs)
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


def row_relative_entropy(weights: jax.Array) -> jax.Array:
  """``H(a_q) / log(n_valid)`` per causal row of ``[b, h, q, k]``, summed over b and h: ``[q]``.

  Row 0 (one key, ``log 1 = 0``) is returned as 0 and left out of every average.
  """
  h = -jnp.sum(jax.scipy.special.xlogy(weights, weights), axis=-1)  # [b, h, q]
  n = jnp.arange(1, weights.shape[-2] + 1, dtype=jnp.float32)
  rel = h / jnp.log(jnp.maximum(n, 2.0))
  return jnp.sum(rel, axis=(0, 1)).at[0].set(0.0)


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

  def init(self, seed: int):
    tokens = jnp.zeros((1, self.cfg["train_length"]), jnp.int32)
    params = self.model.init(jax.random.key(seed), tokens)["params"]
    return params, self.opt.init(params)

  def _loss(self, params, x, y):
    logits = self.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def _step(self, params, opt_state, x, y, peak_lr):
    loss, grads = jax.value_and_grad(self._loss)(params, x, y)
    updates, opt_state = self.opt.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: peak_lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss

  def _evaluate(self, params, x, y):
    """Per-position loss summed over the batch ``[L]``; per-layer row-entropy sums ``[layers, L]``.

    The weights are sown at every length, so this is the evaluation path only.
    """
    logits, state = self.model.apply(
      {"params": params}, x, sow_weights=True, mutable=["intermediates"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(axis=0)
    inter = state["intermediates"]
    blocks = sorted((k for k in inter if k.startswith("Block")), key=lambda k: int(k.split("_")[1]))
    ent = [row_relative_entropy(jax.tree.leaves(inter[b])[0]) for b in blocks]
    return loss, jnp.stack(ent)

  def learned_targets(self, params) -> list[list[float]] | None:
    if self.variant != "entropy_learned":
      return None
    blocks = sorted(
      (b for b in params if b.startswith("Block")), key=lambda k: int(k.split("_")[1])
    )
    raws = [params[b]["EntropyMultiHeadAttention_0"]["target_raw"] for b in blocks]
    return [np.asarray(jax.nn.sigmoid(r)).tolist() for r in raws]


def eval_windows(corpus: CharCorpus, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """``count`` windows of ``length + 1`` characters evenly spaced over the validation split."""
  data = corpus.valid
  starts = np.linspace(0, len(data) - length - 1, count).astype(int)
  window = np.stack([data[s : s + length + 1] for s in starts])
  return window[:, :-1], window[:, 1:]


def train_and_evaluate(
  exp: Experiment, corpus: CharCorpus, seed: int, peak_lr: float, windows, *, full_eval=True
) -> dict:
  """Trains one model (data order and init from ``seed``) and evaluates it on ``windows``."""
  cfg = exp.cfg
  start = time.perf_counter()
  params, opt_state = exp.init(seed)
  batches = corpus.batches(seed, cfg["batch"], cfg["train_length"])
  losses = []
  for _ in range(cfg["steps"]):
    x, y = next(batches)
    params, opt_state, loss = exp.step(params, opt_state, x, y, jnp.float32(peak_lr))
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), dtype=np.float64)
  train_s = time.perf_counter() - start
  wx, wy = windows
  if not full_eval:  # the learning-rate sweep: loss at the training length only
    wx, wy = wx[:, : cfg["train_length"]], wy[:, : cfg["train_length"]]
  loss_sum = np.zeros(wx.shape[1])
  ent_sum = np.zeros((cfg["layers"], wx.shape[1]))
  b = cfg["eval_batch"]
  for i in range(0, len(wx), b):
    loss, ent = exp.evaluate(params, wx[i : i + b], wy[i : i + b])
    loss_sum += np.asarray(loss)
    ent_sum += np.asarray(ent)
  run = {
    "seed": seed,
    "peak_lr": peak_lr,
    "train_loss_curve": [float(np.mean(c)) for c in np.array_split(losses, min(10, len(losses)))],
    "final_train_loss": float(np.mean(losses[-max(len(losses) // 10, 1) :])),
    "position_loss": (loss_sum / len(wx)).tolist(),
    "row_entropy": (ent_sum / (len(wx) * cfg["heads"])).tolist(),
    "train_s": train_s,
    "seconds": time.perf_counter() - start,
  }
  targets = exp.learned_targets(params)
  if targets is not None:
    run["learned_targets"] = targets
  return run


def eval_lengths(train_length: int) -> list[int]:
  return [train_length * m for m in (1, 2, 4, 8)]


def buckets(train_length: int) -> list[tuple[int, int]]:
  lengths = eval_lengths(train_length)
  return list(zip([0, *lengths[:-1]], lengths, strict=True))


def _mean_std(values) -> dict:
  v = np.asarray(values, dtype=np.float64)
  std = float(np.std(v, axis=0, ddof=1)) if v.shape[0] > 1 else 0.0
  return {"mean": float(np.mean(v)), "std": std, "values": v.tolist()}


def summarize(runs: list[dict], train_length: int) -> dict:
  """Per-run figures (buckets, eval lengths, entropies), then mean ± std over the runs."""
  per_run = []
  for r in runs:
    loss = np.asarray(r["position_loss"])
    ent = np.asarray(r["row_entropy"])  # [layers, L]
    per_run.append(
      {
        "bucket_loss": [float(loss[a:b].mean()) for a, b in buckets(train_length)],
        "length_loss": [float(loss[:n].mean()) for n in eval_lengths(train_length)],
        "length_entropy": [ent[:, 1:n].mean(axis=1).tolist() for n in eval_lengths(train_length)],
        "bucket_entropy": [
          ent[:, max(a, 1) : b].mean(axis=1).tolist() for a, b in buckets(train_length)
        ],
      }
    )
  out = {}
  for key in ("bucket_loss", "length_loss"):
    cols = np.asarray([p[key] for p in per_run])  # [seeds, 4]
    out[key] = [_mean_std(cols[:, j]) for j in range(cols.shape[1])]
  for key in ("length_entropy", "bucket_entropy"):
    cols = np.asarray([p[key] for p in per_run])  # [seeds, 4, layers]
    out[key] = [
      [_mean_std(cols[:, j, layer]) for layer in range(cols.shape[2])] for j in range(cols.shape[1])
    ]
  out["final_train_loss"] = _mean_std([r["final_train_loss"] for r in runs])
  if "learned_targets" in runs[0]:
    t = np.asarray([r["learned_targets"] for r in runs])  # [seeds, layers, heads]
    out["learned_targets"] = {
      "mean": t.mean(axis=0).tolist(),
      "std": (t.std(axis=0, ddof=1) if len(t) > 1 else np.zeros_like(t[0])).tolist(),
    }
  return out


def _train_variants(experiments, corpus, seeds, peak_lr, windows, lengths, label) -> dict:
  runs = {v: [] for v in experiments}
  for seed in seeds:
    for variant, exp in experiments.items():
      r = train_and_evaluate(exp, corpus, seed, peak_lr, windows)
      runs[variant].append(r)
      pos = np.asarray(r["position_loss"])
      print(
        f"{label} seed {seed} {variant:>16}: loss [0,{lengths[0]}) "
        f"{pos[: lengths[0]].mean():.3f}, [{lengths[-2]},{lengths[-1]}) "
        f"{pos[lengths[-2] :].mean():.3f}, {r['seconds']:.0f} s"
      )
  return runs


def run(quick: bool = False) -> dict:
  """LR sweep for the standard model, every variant over the seeds, the control arm."""
  wall = time.perf_counter()
  cfg = dict(SIZES[quick])
  corpus = CharCorpus()
  lengths = eval_lengths(cfg["train_length"])
  windows = eval_windows(corpus, cfg["eval_windows"], lengths[-1])
  base = critical_rope_base(cfg["train_length"], cfg["features"] // cfg["heads"])
  experiments = {v: Experiment(v, corpus.vocab_size, cfg, base) for v in VARIANTS}

  sweep = []
  for lr in cfg["lr_grid"]:
    r = train_and_evaluate(
      experiments["standard"], corpus, cfg["sweep_seed"], lr, windows, full_eval=False
    )
    sweep.append({"peak_lr": lr, "valid_loss": float(np.mean(r["position_loss"]))})
    print(f"lr sweep (standard, seed {cfg['sweep_seed']}): {lr:g} -> {sweep[-1]['valid_loss']:.4f}")
  peak_lr = sweep[int(np.nanargmin([s["valid_loss"] for s in sweep]))]["peak_lr"]

  seeds = range(cfg["seeds"])
  runs = _train_variants(experiments, corpus, seeds, peak_lr, windows, lengths, "main")
  main_s = time.perf_counter() - wall
  control = None
  if cfg["control_seeds"]:
    experiments = {v: Experiment(v, corpus.vocab_size, cfg, CONTROL_ROPE_BASE) for v in VARIANTS}
    seeds = range(cfg["control_seeds"])
    control_runs = _train_variants(experiments, corpus, seeds, peak_lr, windows, lengths, "control")
    control = {
      "rope_base": CONTROL_ROPE_BASE,
      "seeds": cfg["control_seeds"],
      "summary": {v: summarize(control_runs[v], cfg["train_length"]) for v in VARIANTS},
      "runs": control_runs,
    }
  return {
    "config": {
      **cfg,
      "quick": quick,
      "variants": list(VARIANTS),
      "target_entropy": TARGET,
      "rope_base": base,
      "eval_lengths": lengths,
      "buckets": buckets(cfg["train_length"]),
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


def _pm(s: dict, digits: int = 3) -> str:
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _beyond_spread(a: dict, b: dict) -> bool:
  """True when the mean ± std intervals of ``a`` and ``b`` do not overlap."""
  return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def markdown(result: dict) -> str:
  cfg = result["config"]
  summ = result["summary"]
  variants = cfg["variants"]
  bks = [f"[{a},{b})" for a, b in cfg["buckets"]]
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
    f"variant. Entropy targets: relative {cfg['target_entropy']} (fixed, or the initial value "
    f"when learned). {cfg['seeds']} seeds (0..{cfg['seeds'] - 1}), mean ± sample std; evaluated "
    f"on {cfg['eval_windows']} validation windows of {cfg['eval_lengths'][-1]} characters. Wall "
    f"time {wall} on {env['cpu_count']} CPUs ({env['cpu_model']}), jax {env['jax']}."
  )
  rows = [[v, *(_pm(s) for s in summ[v]["bucket_loss"])] for v in variants]
  parts.append(
    "Validation loss (nats/char) per position bucket:\n\n"
    + common.markdown_table(["variant", *bks], rows)
  )
  rows = [[v, *(_pm(s) for s in summ[v]["length_loss"])] for v in variants]
  heads = [f"L={n}" for n in cfg["eval_lengths"]]
  parts.append(
    "Validation loss (nats/char) over all positions of an evaluation length L:\n\n"
    + common.markdown_table(["variant", *heads], rows)
  )
  rows = []
  for v in variants:
    cells = [
      " / ".join(f"{e['mean']:.2f}±{e['std']:.2f}" for e in per)
      for per in summ[v]["length_entropy"]
    ]
    rows.append([v, *cells])
  parts.append(
    "Attention entropy / log n (mean over query rows, per layer L0 / L1 ...) at each evaluation "
    "length:\n\n" + common.markdown_table(["variant", *heads], rows)
  )
  # Differences to the standard model, per bucket: paired by seed (same data order).
  rows = []
  base = summ["standard"]["bucket_loss"]
  for v in variants[1:]:
    cells = []
    for s, b in zip(summ[v]["bucket_loss"], base, strict=True):
      diff = np.asarray(s["values"]) - np.asarray(b["values"])
      spread = np.std(diff, ddof=1) if len(diff) > 1 else 0.0
      mark = " *" if _beyond_spread(s, b) else ""
      cells.append(f"{diff.mean():+.3f} ± {spread:.3f}{mark}")
    rows.append([v, *cells])
  parts.append(
    "Loss minus the standard model's per bucket (negative: better), mean ± std of the "
    "differences paired by seed; * where the two variants' mean ± std intervals do not overlap "
    "(larger than the seed spread; a heuristic, not a test):\n\n"
    + common.markdown_table(["variant", *bks], rows)
  )
  if "learned_targets" in summ.get("entropy_learned", {}):
    t = summ["entropy_learned"]["learned_targets"]
    lines = [
      f"layer {i}: " + ", ".join(f"{m:.2f}±{s:.2f}" for m, s in zip(mu, sd, strict=True))
      for i, (mu, sd) in enumerate(zip(t["mean"], t["std"], strict=True))
    ]
    parts.append(
      "Learned relative targets per head (mean ± std over seeds): " + "; ".join(lines) + "."
    )
  rows = [[v, _pm(summ[v]["final_train_loss"])] for v in variants]
  parts.append(
    "Training loss (mean of the last 10% of steps):\n\n"
    + common.markdown_table(["variant", "train loss"], rows)
  )
  control = result.get("control")
  if control:
    cs = control["summary"]
    rows = [[v, *(_pm(s) for s in cs[v]["bucket_loss"])] for v in variants]
    parts.append(
      f"Control arm, RoPE base {control['rope_base']:g}, {control['seeds']} seed(s) (std 0 with "
      "one seed), same learning rate: validation loss (nats/char) per position bucket:\n\n"
      + common.markdown_table(["variant", *bks], rows)
    )
    rows = []
    for v in variants:
      cells = [" / ".join(f"{e['mean']:.2f}" for e in per) for per in cs[v]["length_entropy"]]
      rows.append([v, *cells])
    parts.append(
      "Control arm: attention entropy / log n per layer at each evaluation length:\n\n"
      + common.markdown_table(["variant", *heads], rows)
    )
  return "\n\n".join(parts) + "\n"


COLORS = {
  "standard": "tab:red",
  "log_n": "tab:orange",
  "entropy_fixed": "tab:blue",
  "entropy_learned": "tab:green",
}
MARKERS = {"standard": "o", "log_n": "s", "entropy_fixed": "^", "entropy_learned": "D"}


def _errorbar(ax, x, stats: list[dict], variant: str) -> None:
  """One variant's ``_mean_std`` entries at ``x`` (mean, ± std bars) in its marker and colour."""
  ax.errorbar(
    x,
    [e["mean"] for e in stats],
    yerr=[e["std"] for e in stats],
    fmt=MARKERS[variant] + "-",
    color=COLORS[variant],
    label=variant,
    capsize=3,
    ms=5,
  )


def _bucket_panel(ax, summary, cfg, variants, title):
  x = np.arange(len(cfg["buckets"]))
  width = 0.3 / len(variants)
  for i, v in enumerate(variants):
    _errorbar(ax, x + (i - (len(variants) - 1) / 2) * width, summary[v]["bucket_loss"], v)
  ax.axvspan(-0.5, 0.5, color="0.92", zorder=0, label=f"trained length ({cfg['train_length']})")
  ax.set_xticks(x, [f"[{a},{b})" for a, b in cfg["buckets"]])
  ax.set_xlim(-0.5, len(x) - 0.5)
  ax.set_xlabel("position bucket (tokens)")
  ax.set_ylabel("validation loss (nats/char)")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt

  cfg = result["config"]
  summ = result["summary"]
  variants = cfg["variants"]
  layers = cfg["layers"]
  control = result.get("control")
  panels = 1 + layers + (1 if control else 0)
  fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.4))
  title = f"RoPE base {cfg['rope_base']:.0f}: loss by position\n(mean ± std, {cfg['seeds']} seeds)"
  _bucket_panel(axes[0], summ, cfg, variants, title)
  lengths = cfg["eval_lengths"]
  for layer in range(layers):
    ax = axes[1 + layer]
    for v in variants:
      _errorbar(ax, lengths, [per[layer] for per in summ[v]["length_entropy"]], v)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(cfg["train_length"], color="0.6", ls=":", lw=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("evaluation length L (tokens)")
    ax.set_ylabel("attention entropy / log n_valid")
    ax.set_title(f"Layer {layer}: H / log n over query rows < L\n(mean ± std)", fontsize=10)
    ax.legend(fontsize=8)
  if control:
    title = (
      f"Control, RoPE base {control['rope_base']:g}: loss by position\n"
      f"({control['seeds']} seed{'s' if control['seeds'] > 1 else ''})"
    )
    _bucket_panel(axes[-1], control["summary"], cfg, variants, title)
  fig.tight_layout()
  common.write_figure(fig, path)


def main(argv=None) -> None:
  common.snapshot_main("extrapolation", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

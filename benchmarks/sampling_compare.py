"""Entropy-targeted sampling against the samplers people use, on a real character-level LM.

A one-layer LSTM (pure JAX + optax) is trained on the Python help topics that ship with CPython
(:class:`benchmarks.corpus.CharCorpus`); its parameters are cached in
``benchmarks/results/sampling_lm.npz`` (about 1.4 MB) so later runs and the notebook skip training.
From prompts cut out of the validation split, every method generates continuations over a sweep
of its parameter, and each run is scored on

* ``entropy``: mean entropy (nats) of the distributions the tokens were drawn from;
* ``entropy_spread``: standard deviation of that per-step entropy within a sequence;
* ``log_lik``: the model's own mean log-probability (nats/char, temperature 1) of the text;
* ``repetition``: fraction of generated 16-character windows (whitespace runs collapsed) already
  seen earlier in the same continuation (the "boredom trap": loops);
* ``non_words``: fraction of generated words (letters only, 2+ chars) never seen in the training
  text (the "confusion trap": incoherent spelling);
* ``distinct_2``: distinct word bigrams / word bigrams within a continuation.

The same scores of the real continuations of the prompts give the human reference. Methods are
compared at equal mean entropy by interpolating each sweep.

Run: ``python -m benchmarks.sampling_compare [--quick] [--out DIR] [--plot-only]`` (writes
``benchmarks/results/sampling_compare.*`` on a full run; see :func:`benchmarks.common.out_dir`).
"""

from __future__ import annotations

import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.corpus import CharCorpus
from entnorm_jax import sampling as ens

RESULTS = common.RESULTS_DIR
PARAMS_PATH = RESULTS / "sampling_lm.npz"
EMBED, HIDDEN = 48, 256
WINDOW = 16  # characters in a repetition window

# label -> (method, swept parameter, values, fixed parameters)
SWEEPS: dict[str, tuple[str, str, list, dict]] = {
  "entropy": ("entropy", "target_entropy", [0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3], {}),
  "entropy_ceiling": ("entropy", "max_entropy", [0.3, 0.6, 0.9, 1.2, 1.6, 2.0, 2.6], {}),
  "temperature": ("temperature", "temperature", [0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.15], {}),
  "top_k": ("top_k", "top_k", [2, 3, 5, 8, 13, 25], {}),
  "top_p": ("top_p", "top_p", [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99], {}),
  "min_p": ("min_p", "min_p", [0.6, 0.4, 0.25, 0.15, 0.08, 0.04, 0.01], {}),
  "typical": ("typical", "typical_p", [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99], {}),
  "eta": ("eta", "eta_cutoff", [0.3, 0.15, 0.08, 0.04, 0.02, 0.008, 0.002], {}),
  "mirostat": ("mirostat", "mirostat_tau", [0.3, 0.6, 1.0, 1.5, 2.0, 2.5, 3.0], {}),
}
LEVELS = (0.4, 0.8, 1.2)  # mean entropies (nats) at which methods are compared


# ------------------------------------------------------------------------------------- the LM


def init_params(key: jax.Array, vocab: int) -> dict[str, jax.Array]:
  """Random LSTM parameters (embedding, fused gate matrix, output layer)."""
  k_emb, k_w, k_out = jax.random.split(key, 3)
  fan_in = EMBED + HIDDEN
  return {
    "embed": 0.1 * jax.random.normal(k_emb, (vocab, EMBED)),
    "w": jax.random.normal(k_w, (fan_in, 4 * HIDDEN)) / np.sqrt(fan_in),
    "b": jnp.zeros(4 * HIDDEN).at[HIDDEN : 2 * HIDDEN].set(1.0),  # forget-gate bias 1
    "out": jax.random.normal(k_out, (HIDDEN, vocab)) / np.sqrt(HIDDEN),
    "out_b": jnp.zeros(vocab),
  }


def lstm_step(params, carry, tokens):
  """One LSTM step: ``(carry, tokens [B]) -> (logits [B, V], carry)``."""
  h, c = carry
  x = jnp.concatenate([params["embed"][tokens], h], axis=-1) @ params["w"] + params["b"]
  i, f, g, o = jnp.split(x, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return h @ params["out"] + params["out_b"], (h, c)


def zero_carry(batch: int):
  return jnp.zeros((batch, HIDDEN)), jnp.zeros((batch, HIDDEN))


def sequence_loss(params, inputs, targets):
  """Mean next-character cross-entropy (nats) of ``[B, L]`` windows."""

  def body(carry, tokens):
    logits, carry = lstm_step(params, carry, tokens)
    return carry, logits

  _, logits = jax.lax.scan(body, zero_carry(inputs.shape[0]), inputs.T)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets.T).mean()


def train(corpus: CharCorpus, *, steps: int, seed: int = 0, batch: int = 64, length: int = 128):
  """Adam on random windows; returns ``(params, validation loss in nats/char, seconds)``."""
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
  params = init_params(jax.random.key(seed), corpus.vocab_size)
  state = opt.init(params)

  @jax.jit
  def update(params, state, x, y):
    loss, grads = jax.value_and_grad(sequence_loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = time.perf_counter()
  windows = corpus.batches(seed, batch, length)
  for _ in range(steps):
    params, state, _ = update(params, state, *next(windows))
  valid_x, valid_y = next(corpus.batches(seed + 1, 256, length, split="valid"))
  valid_loss = float(jax.jit(sequence_loss)(params, valid_x, valid_y))
  return params, valid_loss, time.perf_counter() - start


def load_or_train(corpus: CharCorpus, *, steps: int = 600, save: bool = True):
  """The cached LM (``sampling_lm.npz``) if present and matching the corpus, else a fresh one.

  A freshly trained LM is cached only with ``save=True`` (quick runs train a toy and keep it).
  """
  if PARAMS_PATH.exists():
    data = np.load(PARAMS_PATH)
    if int(data["vocab_size"]) == corpus.vocab_size:
      params = {k: jnp.asarray(data[k], jnp.float32) for k in init_params(jax.random.key(0), 1)}
      return params, {
        "valid_loss": float(data["valid_loss"]),
        "train_s": float(data["train_s"]),
        "steps": int(data["steps"]),
        "cached": True,
      }
  params, valid_loss, seconds = train(corpus, steps=steps)
  if not save:
    return params, {"valid_loss": valid_loss, "train_s": seconds, "steps": steps, "cached": False}
  PARAMS_PATH.parent.mkdir(parents=True, exist_ok=True)
  np.savez(
    PARAMS_PATH,
    vocab_size=corpus.vocab_size,
    valid_loss=valid_loss,
    train_s=seconds,
    steps=steps,
    **{k: np.asarray(v, np.float32) for k, v in params.items()},
  )
  return params, {"valid_loss": valid_loss, "train_s": seconds, "steps": steps, "cached": False}


# ------------------------------------------------------------------------------------ scoring


def _words(text: str) -> list[str]:
  return re.findall(r"[A-Za-z]+", text)


def text_scores(texts: list[str], known_words: set[str]) -> dict[str, float]:
  """Repetition, non-word rate and distinct-2 of each text, averaged over the texts.

  Repetition is measured after collapsing runs of whitespace, so that indentation (most of the
  help text's repeated windows) does not count as a loop.
  """
  repetition, non_words, distinct = [], [], []
  for text in texts:
    flat = re.sub(r"\s+", " ", text)
    windows = [flat[i : i + WINDOW] for i in range(len(flat) - WINDOW + 1)]
    seen: set[str] = set()
    repeats = 0
    for w in windows:
      repeats += w in seen
      seen.add(w)
    repetition.append(repeats / max(len(windows), 1))
    words = [w.lower() for w in _words(text) if len(w) >= 2]
    non_words.append(np.mean([w not in known_words for w in words]) if words else 0.0)
    bigrams = list(zip(words, words[1:], strict=False))
    distinct.append(len(set(bigrams)) / len(bigrams) if bigrams else 1.0)
  return {
    "repetition": float(np.mean(repetition)),
    "non_words": float(np.mean(non_words)),
    "distinct_2": float(np.mean(distinct)),
  }


def _model_scores(log_probs, entropies) -> dict[str, float]:
  return {
    "entropy": float(np.mean(entropies)),
    "entropy_spread": float(np.mean(np.std(entropies, axis=1))),
    "log_lik": float(np.mean(log_probs)),
  }


def _reference(params, corpus, prompts, continuations, known_words):
  """Scores of the real continuations (human text) under the same model."""
  tokens = np.concatenate([prompts, continuations], axis=1)

  @jax.jit
  def score(tokens):
    def body(carry, tok):
      logits, carry = lstm_step(params, carry, tok)
      return carry, jax.nn.log_softmax(logits)

    _, log_p = jax.lax.scan(body, zero_carry(tokens.shape[0]), tokens[:, :-1].T)
    return jnp.swapaxes(log_p, 0, 1)[:, prompts.shape[1] - 1 :]

  log_p = np.asarray(score(tokens))
  chosen = np.take_along_axis(log_p, continuations[..., None], -1)[..., 0]
  entropies = -(np.exp(log_p) * log_p).sum(-1)
  texts = [corpus.decode(row) for row in continuations]
  return {**_model_scores(chosen, entropies), **text_scores(texts, known_words)}


def _interpolate(points: list[dict], level: float, metric: str) -> float | None:
  xs = np.array([p["entropy"] for p in points])
  ys = np.array([p[metric] for p in points])
  order = np.argsort(xs)
  xs, ys = xs[order], ys[order]
  if not xs[0] <= level <= xs[-1]:
    return None
  return float(np.interp(level, xs, ys))


# -------------------------------------------------------------------------------------- run


def run(quick: bool = False) -> dict:
  """Trains (or loads) the LM, sweeps every sampler, and scores the generations.

  Args:
    quick: fewer and shorter continuations and a shorter sweep (and, if no cached LM exists, a
      much shorter training run) for a smoke test.

  Returns:
    JSON-serializable results: the LM's figures, the human reference, every run's scores, and
    the scores interpolated at equal mean entropy.
  """
  corpus = CharCorpus()
  params, lm = load_or_train(corpus, steps=60 if quick else 600, save=not quick)
  known_words = {w.lower() for w in _words(corpus.decode(corpus.train))}
  batch, prompt_len, new = (16, 32, 96) if quick else (64, 64, 256)
  rng = np.random.default_rng(0)
  starts = rng.integers(0, len(corpus.valid) - prompt_len - new - 1, size=batch)
  windows = np.stack([corpus.valid[s : s + prompt_len + new] for s in starts])
  prompts, continuations = windows[:, :prompt_len], windows[:, prompt_len:]
  reference = _reference(params, corpus, prompts, continuations, known_words)

  step = lambda carry, tokens: lstm_step(
    params, carry, tokens
  )  # one object: one compile per method
  runs = []
  start = time.perf_counter()
  for label, (method, name, values, fixed) in SWEEPS.items():
    values = values[1::2] if quick else values
    for value in values:
      gen = ens.generate(
        jax.random.key(1),
        step,
        zero_carry(batch),
        prompts,
        new,
        method=method,
        **{name: value},
        **fixed,
      )
      texts = [corpus.decode(row) for row in np.asarray(gen.tokens)]
      runs.append(
        {
          "method": label,
          "param": name,
          "value": value,
          **_model_scores(np.asarray(gen.log_probs), np.asarray(gen.entropies)),
          **text_scores(texts, known_words),
          "sample": texts[0][:160],
        }
      )
  greedy = ens.generate(jax.random.key(1), step, zero_carry(batch), prompts, new, method="greedy")
  greedy_texts = [corpus.decode(row) for row in np.asarray(greedy.tokens)]
  greedy_scores = {
    **_model_scores(np.asarray(greedy.log_probs), np.asarray(greedy.entropies)),
    **text_scores(greedy_texts, known_words),
    "sample": greedy_texts[0][:160],
  }
  metrics = ("log_lik", "repetition", "non_words", "distinct_2", "entropy_spread")
  at_levels = {
    str(level): {
      method: {
        m: _interpolate([r for r in runs if r["method"] == method], level, m) for m in metrics
      }
      for method in SWEEPS
    }
    for level in LEVELS
  }
  return {
    "lm": {**lm, "hidden": HIDDEN, "vocab_size": corpus.vocab_size},
    "setup": {
      "batch": batch,
      "prompt_len": prompt_len,
      "new_tokens": new,
      "prompt_source": "validation split",
      "quick": quick,
    },
    "reference": reference,
    "greedy": greedy_scores,
    "runs": runs,
    "at_equal_entropy": at_levels,
    "generate_s": time.perf_counter() - start,
    "prompt_example": corpus.decode(prompts[0]),
    "environment": common.environment(),
  }


# --------------------------------------------------------------------------------- reporting


# One look per method, the same in every panel: ours thick and dark, the others a colour each
# (tab10 less its grey) with their own marker and dash, so that no two lines are told apart by
# colour alone.
_STYLE = {
  "entropy": dict(color="k", marker="o", ls="-", lw=2.8),
  "entropy_ceiling": dict(color="0.5", marker="s", ls="-", lw=2.8),
  "temperature": dict(color="tab:blue", marker="^", ls="-"),
  "top_k": dict(color="tab:orange", marker="v", ls="--"),
  "top_p": dict(color="tab:green", marker="D", ls="-."),
  "min_p": dict(color="tab:red", marker="P", ls=":"),
  "typical": dict(color="tab:purple", marker="X", ls="-"),
  "eta": dict(color="tab:brown", marker="*", ls="--"),
  "mirostat": dict(color="tab:pink", marker="h", ls="-."),
}


def plot(result: dict, path: pathlib.Path) -> None:
  """Four panels of score vs mean entropy, one line per method, human text as a dashed line;
  one legend for all four."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [
    ("repetition", "repeated 16-char windows (boredom)"),
    ("non_words", "non-word rate (confusion)"),
    ("log_lik", "model log-likelihood (nats/char)"),
    ("entropy_spread", "std of the per-step entropy (nats)"),
  ]
  fig, axes = plt.subplots(2, 2, figsize=(12, 9.6), layout="constrained")
  methods = [m for m in SWEEPS if any(r["method"] == m for r in result["runs"])]
  for ax, (metric, title) in zip(axes.flat, panels, strict=True):
    for method in methods:
      pts = sorted((r["entropy"], r[metric]) for r in result["runs"] if r["method"] == method)
      style = {"lw": 1.6, **_STYLE.get(method, {})}
      style["ms"] = 7 if style["lw"] > 2 else 6
      ax.plot(*zip(*pts, strict=True), label=method, **style)
    ax.axhline(result["reference"][metric], ls=(0, (6, 3)), color="tab:cyan", lw=2,
               label="human text (reference)")  # fmt: skip
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("mean entropy of the sampling distribution (nats)", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=10, frameon=False)
  fig.suptitle("Samplers compared on a character-level LSTM (one line per method, all panels)",
               fontsize=12)  # fmt: skip
  common.write_figure(fig, path)


def _fmt(x: float | None, digits: int = 3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
  lm, ref = result["lm"], result["reference"]
  lines = [
    "# Samplers compared on a character-level LSTM\n",
    f"LSTM ({lm['hidden']} units, {lm['vocab_size']} chars), trained {lm['steps']} steps "
    f"({lm['train_s']:.0f} s), validation loss {lm['valid_loss']:.3f} nats/char. "
    f"{result['setup']['batch']} prompts of {result['setup']['prompt_len']} chars from the "
    f"validation split, {result['setup']['new_tokens']} new chars each.\n",
    f"Human continuation: entropy {ref['entropy']:.2f}, log-lik {ref['log_lik']:.2f}, "
    f"repetition {ref['repetition']:.3f}, non-words {ref['non_words']:.3f}, distinct-2 "
    f"{ref['distinct_2']:.3f}. Greedy: repetition {result['greedy']['repetition']:.3f}.\n",
  ]
  metrics = [
    ("repetition", 3),
    ("non_words", 3),
    ("log_lik", 2),
    ("distinct_2", 3),
    ("entropy_spread", 2),
  ]
  for level, by_method in result["at_equal_entropy"].items():
    lines.append(f"\n## At mean entropy {level} nats\n")
    rows = [[method] + [_fmt(v[m], d) for m, d in metrics] for method, v in by_method.items()]
    lines.append(common.markdown_table(["method", *[m for m, _ in metrics]], rows))
  lines.append("\n## Every run\n")
  rows = [
    [r["method"], f"{r['param']}={r['value']}", _fmt(r["entropy"], 2)]
    + [_fmt(r[m], d) for m, d in metrics]
    for r in result["runs"]
  ]
  lines.append(
    common.markdown_table(["method", "param", "entropy", *[m for m, _ in metrics]], rows)
  )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  common.module_main("sampling_compare", __doc__, run, markdown, plot, argv)


if __name__ == "__main__":
  main()

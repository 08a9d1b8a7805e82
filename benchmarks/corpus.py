"""Offline English text for the language-model experiments: the Python help topics.

The text ships with every CPython installation (``pydoc_data.topics``, about 465k characters),
so the experiments need no download.
"""

from __future__ import annotations

import numpy as np


def load_text() -> str:
  """The concatenated help topics of the running Python (deterministic order)."""
  from pydoc_data import topics

  return "\n".join(topics.topics[k] for k in sorted(topics.topics))


class CharCorpus:
  """Character-level encoding of :func:`load_text`, split 90/10 into train and validation.

  Attributes:
    vocab: the sorted characters.
    train: int32 token ids of the first 90%.
    valid: int32 token ids of the last 10%.
  """

  def __init__(self, text: str | None = None):
    text = load_text() if text is None else text
    self.vocab = sorted(set(text))
    self._index = {c: i for i, c in enumerate(self.vocab)}
    ids = self.encode(text)
    cut = int(0.9 * len(ids))
    self.train, self.valid = ids[:cut], ids[cut:]

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, s: str) -> np.ndarray:
    return np.array([self._index[c] for c in s], dtype=np.int32)

  def decode(self, ids) -> str:
    return "".join(self.vocab[int(i)] for i in ids)

  def batches(self, seed: int, batch: int, length: int, split: str = "train"):
    """Endless random windows ``(inputs, targets)`` of shape ``[batch, length]``."""
    data = self.train if split == "train" else self.valid
    rng = np.random.default_rng(seed)
    while True:
      starts = rng.integers(0, len(data) - length - 1, size=batch)
      window = np.stack([data[s : s + length + 1] for s in starts])
      yield window[:, :-1], window[:, 1:]

"""Float64 NumPy references the tests compare against, in one place.

Written from the definitions, with NumPy and SciPy only (nothing from ``entnorm_jax``), so a test
that holds the library to them checks it against an independent computation:

- :func:`entropy64`: the entropy of probabilities, ``H(p) = -Σ p log p`` with ``0 log 0 = 0``.
- :func:`softmax64`: softmax of logits, ``-inf`` entries (masked) get probability 0.
- :func:`entropy_softmax64`: the entropy-normalized distribution ``softmax(γ* · log p)`` with
  ``H = target``, γ* found by Brent's method.
- :func:`seed_reference`: the seed's NumPy iteration (``method.md``), verbatim.
- :func:`png_size`: the pixel size a PNG file declares in its header.
"""

from __future__ import annotations

import pathlib
import struct

import numpy as np
from scipy import optimize


def entropy64(p, axis: int = -1) -> np.ndarray:
  """Entropy (nats) of the probabilities ``p`` along ``axis``, in float64 (``0 log 0 = 0``)."""
  p = np.asarray(p, np.float64)
  positive = p > 0
  return -np.sum(np.where(positive, p * np.log(np.where(positive, p, 1.0)), 0.0), axis=axis)


def softmax64(z, axis: int = -1) -> np.ndarray:
  """Softmax of the logits ``z`` along ``axis``, in float64; ``-inf`` entries get exactly 0."""
  z = np.asarray(z, np.float64)
  finite = np.isfinite(z)
  top = np.max(np.where(finite, z, -np.inf), axis=axis, keepdims=True)
  with np.errstate(invalid="ignore"):  # a row with no finite entry: 0 / 0 (NaN), as it should be
    e = np.where(finite, np.exp(np.where(finite, z - top, 0.0)), 0.0)
    return e / e.sum(axis=axis, keepdims=True)


def entropy_softmax64(z, target: float) -> np.ndarray:
  """The entropy-normalized distribution of the 1-D logits ``z``: ``softmax(γ* · log p)`` with
  ``p = softmax(z)`` and γ* the root of ``H(γ) = target`` (Brent's method, to 1e-14 in γ)."""
  with np.errstate(divide="ignore"):
    logp = np.log(softmax64(z))
  valid = np.isfinite(logp)
  at = lambda gamma: softmax64(np.where(valid, gamma * logp, -np.inf))
  gamma = optimize.brentq(lambda g: entropy64(at(g)) - target, 1e-9, 1e3, xtol=1e-14)
  return at(gamma)


def seed_reference(p, target: float, iters: int = 10) -> np.ndarray:
  """The seed's NumPy iteration (``method.md``), verbatim in float64: ``iters`` Newton steps on
  ``H(p^γ) = target`` from the probabilities ``p``."""
  p = np.array(p, np.float64)
  for _ in range(iters):
    h = -(p * np.log(p)).sum()
    gamma = 1 + (target - h) / (h**2 - (p * np.log(p) ** 2).sum())
    p = p**gamma
    p /= p.sum()
  return p


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
  """``(width, height)`` in pixels of the PNG at ``path``, read from its IHDR chunk.

  Raises:
    AssertionError: if the file is not a PNG (wrong signature or no IHDR chunk first).
  """
  head = pathlib.Path(path).read_bytes()[:24]
  assert head[:8] == _PNG_SIGNATURE, f"{path} is not a PNG: {head[:8]!r}"
  assert head[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
  return struct.unpack(">II", head[16:24])

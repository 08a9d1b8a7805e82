"""Public entropy-normalization functions.

Entropy normalization maps logits ``z`` (or a distribution ``p = softmax(z)``) to

    q = softmax(γ* · z) = p^γ* / Σ p^γ*,      γ* >= 0 such that H(q) = H_target,

which keeps the order of the entries, keeps zeros at zero, and sets the Shannon entropy to any
target between log m (m = number of entries tied at the maximum) and log n (n = number of valid
entries). Targets outside that range are clamped to it.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from entnorm_jax._src.moments import shift_rows
from entnorm_jax._src.normalize import IMPLEMENTATIONS, Config, Solution, solve_rows

__all__ = [
  "entropy",
  "entropy_log_softmax",
  "entropy_normalize",
  "entropy_softmax",
  "entropy_softmax_cross_entropy",
  "entropy_softmax_cross_entropy_with_integer_labels",
  "solve_gamma",
]

# Shape the computation, so static under jit; ``relative`` is arithmetic and may be traced.
_STATIC = ("axis", "num_iters", "implementation")


def canonicalize_axis(axis: int, ndim: int) -> int:
  """Returns ``axis`` as a non-negative int, or raises ``ValueError`` naming axis and ndim."""
  try:
    axis = operator.index(axis)
  except TypeError as e:
    raise TypeError(f"axis must be an int, got {axis!r}") from e
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of bounds for logits of ndim {ndim}")
  return axis % ndim


def _compute_dtype(dtype) -> np.dtype:
  """float16/bfloat16/float32 (and ints) solve in float32; float64 in float64."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _output_dtype(dtype) -> np.dtype:
  return np.dtype(dtype) if jnp.issubdtype(dtype, jnp.floating) else _compute_dtype(dtype)


def _mask(where: ArrayLike | None, shape, axis: int) -> jax.Array | None:
  """``where`` broadcast to the logits and moved like them, or ``None``."""
  if where is None:
    return None
  where = jnp.asarray(where)
  try:
    where = jnp.broadcast_to(where, shape)
  except ValueError as e:
    raise ValueError(
      f"where of shape {where.shape} does not broadcast to logits of shape {shape}"
    ) from e
  return jnp.moveaxis(where.astype(bool), axis, -1)


def _config(num_iters, implementation) -> Config:
  if num_iters is not None and operator.index(num_iters) < 0:
    raise ValueError(f"num_iters must be >= 0 or None, got {num_iters}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}"
    )
  return Config(num_iters, implementation)


def _solve(x, where, target_entropy, relative, cfg: Config):
  """Solves the rows of ``x`` (normalized axis last); returns the :class:`Solution` in its shape."""
  batch = x.shape[:-1]
  target = jnp.asarray(target_entropy)
  if np.broadcast_shapes(target.shape, batch) != tuple(batch):
    raise ValueError(
      f"target_entropy of shape {target.shape} does not broadcast to the batch shape "
      f"{tuple(batch)} (logits' shape without the normalized axis)"
    )
  relative = jnp.asarray(relative)
  if relative.shape != () or relative.dtype != bool:
    raise TypeError(
      f"relative must be a boolean scalar, got {relative.dtype}{list(relative.shape)}"
    )
  n = x.shape[-1]
  target = jnp.broadcast_to(target.astype(x.dtype), batch)
  if n == 0:  # an empty distribution: nothing to solve (softmax over it is empty too)
    return Solution(x, jnp.zeros(batch, x.dtype), jnp.zeros(batch, x.dtype))
  # The solve sees plain [rows, n]: XLA's CPU reductions are markedly slower on higher-rank rows.
  rows = lambda a: None if a is None else a.reshape(-1, n)
  sol = solve_rows(rows(x), rows(where), target.reshape(-1), relative, cfg)
  return Solution(sol.probs.reshape(x.shape), *(a.reshape(batch) for a in sol[1:]))


def _from_logits(logits, where, axis, target_entropy, relative, num_iters, implementation):
  """``(x, where, solution, axis, dtype)`` with the normalized axis last."""
  logits = jnp.asarray(logits)
  if jnp.issubdtype(logits.dtype, jnp.complexfloating):
    raise TypeError(f"entropy normalization needs real logits, got {logits.dtype}")
  axis = canonicalize_axis(axis, logits.ndim)
  where = _mask(where, logits.shape, axis)
  x = jnp.moveaxis(logits, axis, -1).astype(_compute_dtype(logits.dtype))
  sol = _solve(x, where, target_entropy, relative, _config(num_iters, implementation))
  return x, where, sol, axis, _output_dtype(logits.dtype)


def _log_probs(x, where, gamma):
  """log softmax(γ·x) over valid entries: finite there, -inf on masked ones."""
  if x.shape[-1] == 0:
    return x
  valid = x != -jnp.inf
  if where is not None:
    valid = valid & where
  d, _ = shift_rows(x, valid)
  scaled = gamma[..., None] * d
  e = jnp.where(valid, jnp.exp(scaled), 0.0)
  s0 = jnp.sum(e, axis=-1, keepdims=True)
  log_s0 = jnp.log(jnp.where(s0 > 0, s0, 1.0))
  return jnp.where(valid, scaled - log_s0, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("axis",))
def entropy(logits: ArrayLike, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
  """Shannon entropy (nats) of ``softmax(logits)`` along ``axis``.

  Masked entries (``where`` False, or ``-inf`` logits) are excluded; an all-masked row has
  entropy 0.

  Args:
    logits: array of logits.
    axis: the axis holding the distribution.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    H = -Σ_i q_i log q_i with q = softmax(logits), shape ``logits.shape`` without ``axis``.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> float(en.entropy(jnp.zeros(4)))  # log 4
    1.386...
  """
  logits = jnp.asarray(logits)
  axis = canonicalize_axis(axis, logits.ndim)
  where = _mask(where, logits.shape, axis)
  x = jnp.moveaxis(logits, axis, -1).astype(_compute_dtype(logits.dtype))
  log_q = _log_probs(x, where, jnp.ones(x.shape[:-1], x.dtype))
  finite = log_q > -jnp.inf
  h = -jnp.sum(jnp.where(finite, jnp.exp(log_q) * log_q, 0.0), axis=-1)
  return h.astype(_output_dtype(logits.dtype))


@functools.partial(jax.jit, static_argnames=_STATIC)
def solve_gamma(
  logits: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """The inverse temperature γ* >= 0 with H(softmax(γ*·logits)) = target_entropy.

  ``target_entropy`` is in nats (``relative=False``, the default) or, with ``relative=True``, a
  fraction of each row's maximum entropy log(n_valid): ``solve_gamma(z, 0.5, relative=True)``.

  Targets at or above log(n_valid) give γ* = 0 (uniform). Targets at or below log(m), m the number
  of entries tied at the maximum, give the smallest γ at which softmax(γ·logits) is the uniform
  distribution over the argmax set in the working precision (float32: ``110 / gap``, float64:
  ``750 / gap``, gap the distance from the maximum to the next value). Rows with no valid entry
  give 0; rows with a valid NaN give NaN.

  γ* is differentiable by the implicit function theorem (never through the iterations):

    ∂γ*/∂z_i = -γ* q_i (z_i - m) / V,     ∂γ*/∂H_t = -1 / (γ* V),

  with q = softmax(γ*·z), m and V the mean and variance of z under q; the derivative is 0 where
  the target is clamped.

  Args:
    logits: array of logits; ``-inf`` entries are masked.
    target_entropy: target in nats (or a fraction of log(n_valid) with ``relative=True``), a
      scalar or an array broadcastable to the batch shape (``logits.shape`` without ``axis``).
    axis: the axis holding each distribution.
    where: optional boolean mask broadcastable to ``logits``; False entries are excluded.
    relative: read ``target_entropy`` as a fraction of each row's maximum entropy log(n_valid)
      (default ``False``: nats); a boolean, which may be traced.
    num_iters: ``None`` (default) iterates each block of rows until every row is within
      2e-6·max(1, log n) nats of its target (1e-12 in float64); an int k runs exactly k
      Halley-type steps (static).
    implementation: ``None`` picks by platform: ``"tiled"`` on CPUs (rows solved in cache-sized
      blocks), ``"pallas"`` on CUDA GPUs (one fused kernel solving each block of rows on chip),
      ``"xla"`` elsewhere (whole-array passes). A forced ``"pallas"`` is compiled by Triton on
      GPUs, interpreted on CPUs (slow: for tests), and falls back to ``"xla"`` on TPUs and for
      rows longer than 16384. All give the same answers.

  Returns:
    γ*, of shape ``logits.shape`` without ``axis``, in the dtype of ``logits``.

  Raises:
    ValueError: for a bad axis, ``num_iters`` or ``implementation``, or a mask or target that
      does not broadcast.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> z = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    >>> g = en.solve_gamma(z, 0.5)
    >>> round(float(en.entropy(g * z)), 4)
    0.5
  """
  _, _, sol, _, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters, implementation
  )
  return sol.gamma.astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_softmax(
  logits: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Entropy-normalized softmax: ``softmax(γ*·logits)`` with entropy ``target_entropy``.

  ``target_entropy`` is in nats (``relative=False``, the default) or, with ``relative=True``, a
  fraction of each row's maximum entropy log(n_valid) (see the second example).

  γ* is found by :func:`solve_gamma`; the result keeps the order of the logits (ties stay ties)
  and is exactly 0 at masked entries. Differentiable w.r.t. ``logits`` and ``target_entropy``
  (forward, reverse and higher order) through the implicit derivative of γ*:

    dq = q ⊙ (u - Σ_j q_j u_j),     u = γ* dz + z dγ*.

  Args:
    logits: array of logits; ``-inf`` entries are masked.
    target_entropy: target in nats, or a fraction of log(n_valid) with ``relative=True``; a scalar
      or an array broadcastable to ``logits.shape`` without ``axis``.
    axis: the axis holding each distribution.
    where: optional boolean mask broadcastable to ``logits``.
    relative: read ``target_entropy`` as a fraction of each row's maximum entropy log(n_valid)
      (default ``False``: nats); a boolean, which may be traced.
    num_iters: ``None`` (default) iterates each block of rows until every row is within
      2e-6·max(1, log n) nats of its target (1e-12 in float64); an int k runs exactly k
      Halley-type steps (static).
    implementation: ``None`` picks by platform: ``"tiled"`` on CPUs (rows solved in cache-sized
      blocks), ``"pallas"`` on CUDA GPUs (one fused kernel solving each block of rows on chip),
      ``"xla"`` elsewhere (whole-array passes). A forced ``"pallas"`` is compiled by Triton on
      GPUs, interpreted on CPUs (slow: for tests), and falls back to ``"xla"`` on TPUs and for
      rows longer than 16384. All give the same answers.

  Returns:
    Probabilities of the shape and dtype of ``logits``. A row with no valid entry is all zeros.

  Raises:
    ValueError: for a bad axis, ``num_iters`` or ``implementation``, or a mask or target that
      does not broadcast.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> q = en.entropy_softmax(jnp.array([2.0, 1.0, 0.0, -1.0]), 0.8)
    >>> round(float(en.entropy(jnp.log(q))), 4)
    0.8
    >>> q = en.entropy_softmax(jnp.array([2.0, 1.0, 0.0, -1.0]), 0.5, relative=True)
    >>> round(float(en.entropy(jnp.log(q)) / jnp.log(4.0)), 4)  # half of the maximum, log 4
    0.5
  """
  _, _, sol, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters, implementation
  )
  return jnp.moveaxis(sol.probs, -1, axis).astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_log_softmax(
  logits: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Logarithm of :func:`entropy_softmax`, computed stably: ``γ*·z - logsumexp(γ*·z)``.

  ``target_entropy`` is in nats (``relative=False``, the default) or, with ``relative=True``, a
  fraction of log(n_valid): ``entropy_log_softmax(z, 0.5, relative=True)``.

  Args:
    logits, target_entropy, axis, where, relative, num_iters, implementation: as in
      :func:`entropy_softmax`.

  Returns:
    Log-probabilities of the shape and dtype of ``logits``; ``-inf`` at masked entries.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> lq = en.entropy_log_softmax(jnp.array([2.0, 1.0, 0.0]), 0.5)
    >>> round(float(-(jnp.exp(lq) * lq).sum()), 4)
    0.5
  """
  x, where, sol, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters, implementation
  )
  return jnp.moveaxis(_log_probs(x, where, sol.gamma), -1, axis).astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_normalize(
  probs: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """The power transform ``p^γ* / Σ p^γ*`` of a distribution, with entropy ``target_entropy``.

  ``target_entropy`` is in nats (``relative=False``, the default) or, with ``relative=True``, a
  fraction of log(number of nonzero entries): ``entropy_normalize(p, 0.5, relative=True)``.

  This is the seed's interface: a distribution in, a distribution out. Zero probabilities are
  masked and stay exactly zero; ``probs`` need not be normalized (only ratios matter).

  Args:
    probs: non-negative array; each slice along ``axis`` is a (possibly unnormalized) distribution.
    target_entropy, axis, where, relative, num_iters, implementation: as in
      :func:`entropy_softmax`.

  Returns:
    The normalized distribution, with the shape and dtype of ``probs``.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> q = en.entropy_normalize(jnp.array([0.5, 0.3, 0.2, 0.0]), jnp.log(2.0))
    >>> q[3].item(), round(float(en.entropy(jnp.log(q))), 4)
    (0.0, 0.6931)
  """
  probs = jnp.asarray(probs)
  # Zero probabilities become -inf logits (masked); NaN stays valid so that it propagates.
  nonzero = probs != 0
  logits = jnp.where(nonzero, jnp.log(jnp.where(nonzero, probs, 1.0)), -jnp.inf)
  _, _, sol, axis, _ = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters, implementation
  )
  return jnp.moveaxis(sol.probs, -1, axis).astype(_output_dtype(probs.dtype))


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_softmax_cross_entropy(
  logits: ArrayLike,
  labels: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Cross-entropy of ``labels`` against the entropy-normalized distribution of ``logits``.

  ``target_entropy`` is in nats (``relative=False``, the default) or, with ``relative=True``, a
  fraction of log(n_valid).

  Like ``optax.losses.softmax_cross_entropy`` (labels are probabilities), with
  ``q = entropy_softmax(logits, target_entropy)``:  loss = -Σ_i labels_i log q_i over the valid
  entries (masked entries are left out of the sum).

  Args:
    logits: array of logits.
    labels: probabilities broadcastable to ``logits``.
    target_entropy, axis, where, relative, num_iters, implementation: as in
      :func:`entropy_softmax`.

  Returns:
    The loss, of shape ``logits.shape`` without ``axis``.

  Raises:
    TypeError: for integer labels (see :func:`entropy_softmax_cross_entropy_with_integer_labels`).

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> loss = en.entropy_softmax_cross_entropy(jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0]), 0.3)
    >>> loss.shape
    ()
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.inexact):
    raise TypeError(
      f"labels are {labels.dtype}: this loss takes probabilities (e.g. one-hot); for class "
      "indices use entropy_softmax_cross_entropy_with_integer_labels"
    )
  x, where, sol, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters, implementation
  )
  labels = jnp.moveaxis(jnp.broadcast_to(labels, jnp.shape(logits)), axis, -1)
  log_q = _log_probs(x, where, sol.gamma)
  finite = log_q > -jnp.inf
  return (-jnp.sum(jnp.where(finite, labels * log_q, 0.0), axis=-1)).astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_softmax_cross_entropy_with_integer_labels(
  logits: ArrayLike,
  labels: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Cross-entropy of class indices against the entropy-normalized distribution of ``logits``.

  Like ``optax.losses.softmax_cross_entropy_with_integer_labels``, with
  ``q = entropy_softmax(logits, target_entropy)``:  loss = -log q[label]. ``target_entropy`` is in
  nats unless ``relative=True`` (a fraction of log(n_valid)). A label on a masked entry gives
  ``inf``; a label out of range gives NaN (as ``jnp.take_along_axis`` fills it).

  Args:
    logits: array of logits.
    labels: integer class indices, of the shape of ``logits`` without ``axis``.
    target_entropy, axis, where, relative, num_iters, implementation: as in
      :func:`entropy_softmax`.

  Returns:
    The loss, of shape ``logits.shape`` without ``axis``.

  Raises:
    TypeError: for labels that are not integers.
    ValueError: for labels of the wrong shape (and as :func:`entropy_softmax`).

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> z = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.1, 0.2]])
    >>> en.entropy_softmax_cross_entropy_with_integer_labels(z, jnp.array([0, 2]), 0.3).shape
    (2,)
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
  batch = np.delete(np.shape(logits), canonicalize_axis(axis, np.ndim(logits)))
  if labels.shape != tuple(batch):
    raise ValueError(
      f"labels of shape {labels.shape} do not match the logits' shape without the normalized "
      f"axis, {tuple(batch)}"
    )
  x, where, sol, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters, implementation
  )
  log_q = _log_probs(x, where, sol.gamma)
  picked = jnp.take_along_axis(log_q, labels[..., None], axis=-1, mode="fill")[..., 0]
  return (-picked).astype(dtype)

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
from entnorm_jax._src.solver import default_num_iters, normalized_exp, solve_shifted

__all__ = [
  "entropy",
  "entropy_log_softmax",
  "entropy_normalize",
  "entropy_softmax",
  "entropy_softmax_cross_entropy",
  "solve_gamma",
]

_STATIC = ("axis", "relative", "num_iters")


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


def _rows(x: jax.Array, where: ArrayLike | None, axis: int, valid: jax.Array):
  """Moves ``axis`` last, casts to the compute dtype and combines the masks."""
  if where is not None:
    where = jnp.asarray(where)
    try:
      where = jnp.broadcast_to(where, x.shape)
    except ValueError as e:
      raise ValueError(
        f"where of shape {where.shape} does not broadcast to logits of shape {x.shape}"
      ) from e
    valid = valid & where.astype(bool)
  x = jnp.moveaxis(x, axis, -1).astype(_compute_dtype(x.dtype))
  valid = jnp.moveaxis(valid, axis, -1)
  return x, valid


def _target(target_entropy: ArrayLike, batch_shape, n_valid, dtype, relative: bool) -> jax.Array:
  target = jnp.asarray(target_entropy)
  if np.broadcast_shapes(target.shape, batch_shape) != tuple(batch_shape):
    raise ValueError(
      f"target_entropy of shape {target.shape} does not broadcast to the batch shape "
      f"{tuple(batch_shape)} (logits' shape without the normalized axis)"
    )
  target = jnp.broadcast_to(target.astype(dtype), batch_shape)
  if relative:
    target = target * jnp.log(jnp.maximum(n_valid, 1).astype(dtype))
  return target


def _solve(x, valid, target_entropy, relative, num_iters):
  """Shared body: returns (d, valid, gamma) with rows along the last axis."""
  d, _ = shift_rows(x, valid)
  n_valid = jnp.sum(valid, axis=-1)
  target = _target(target_entropy, d.shape[:-1], n_valid, d.dtype, relative)
  if num_iters is None:
    num_iters = default_num_iters(d.dtype)
  elif operator.index(num_iters) < 0:
    raise ValueError(f"num_iters must be >= 0, got {num_iters}")
  # The solve sees plain [rows, n]: XLA's CPU reductions are markedly slower on higher-rank rows.
  n = d.shape[-1]
  gamma = solve_shifted(d.reshape(-1, n), valid.reshape(-1, n), target.reshape(-1), num_iters)
  return d, valid, gamma.reshape(target.shape)


def _from_logits(logits, where, axis, target_entropy, relative, num_iters):
  logits = jnp.asarray(logits)
  axis = canonicalize_axis(axis, logits.ndim)
  x, valid = _rows(logits, where, axis, logits != -jnp.inf)
  d, valid, gamma = _solve(x, valid, target_entropy, relative, num_iters)
  return d, valid, gamma, axis, _output_dtype(logits.dtype)


def _log_probs(d, valid, gamma):
  """log softmax(γ·d): finite on valid entries, -inf on masked ones."""
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
  x, valid = _rows(logits, where, axis, logits != -jnp.inf)
  d, _ = shift_rows(x, valid)
  one = jnp.ones(d.shape[:-1], d.dtype)
  q = normalized_exp(d, valid, one)
  log_q = jnp.where(valid, _log_probs(d, valid, one), 0.0)
  return (-jnp.sum(q * log_q, axis=-1)).astype(_output_dtype(logits.dtype))


@functools.partial(jax.jit, static_argnames=_STATIC)
def solve_gamma(
  logits: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
) -> jax.Array:
  """The inverse temperature γ* >= 0 with H(softmax(γ*·logits)) = target_entropy.

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
    relative: read ``target_entropy`` as a fraction of each row's maximum entropy log(n_valid).
    num_iters: number of solver iterations (static); ``None`` for the dtype's default.

  Returns:
    γ*, of shape ``logits.shape`` without ``axis``, in the dtype of ``logits``.

  Raises:
    ValueError: for a bad axis, or a mask or target that does not broadcast.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> z = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    >>> g = en.solve_gamma(z, 0.5)
    >>> round(float(en.entropy(g * z)), 4)
    0.5
  """
  d, valid, gamma, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters
  )
  return gamma.astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_softmax(
  logits: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
) -> jax.Array:
  """Entropy-normalized softmax: ``softmax(γ*·logits)`` with entropy ``target_entropy``.

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
    relative: read ``target_entropy`` as a fraction of log(n_valid) of each row.
    num_iters: solver iterations (static); ``None`` for the dtype's default.

  Returns:
    Probabilities of the shape and dtype of ``logits``. A row with no valid entry is all zeros.

  Raises:
    ValueError: for a bad axis, or a mask or target that does not broadcast.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> q = en.entropy_softmax(jnp.array([2.0, 1.0, 0.0, -1.0]), 0.8)
    >>> round(float(en.entropy(jnp.log(q))), 4)
    0.8
  """
  d, valid, gamma, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters
  )
  return jnp.moveaxis(normalized_exp(d, valid, gamma), -1, axis).astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_log_softmax(
  logits: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
) -> jax.Array:
  """Logarithm of :func:`entropy_softmax`, computed stably: ``γ*·z - logsumexp(γ*·z)``.

  Args:
    logits, target_entropy, axis, where, relative, num_iters: as in :func:`entropy_softmax`.

  Returns:
    Log-probabilities of the shape and dtype of ``logits``; ``-inf`` at masked entries.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> lq = en.entropy_log_softmax(jnp.array([2.0, 1.0, 0.0]), 0.5)
    >>> round(float(-(jnp.exp(lq) * lq).sum()), 4)
    0.5
  """
  d, valid, gamma, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters
  )
  return jnp.moveaxis(_log_probs(d, valid, gamma), -1, axis).astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def entropy_normalize(
  probs: ArrayLike,
  target_entropy: ArrayLike,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  relative: bool = False,
  num_iters: int | None = None,
) -> jax.Array:
  """The power transform ``p^γ* / Σ p^γ*`` of a distribution, with entropy ``target_entropy``.

  This is the seed's interface: a distribution in, a distribution out. Zero probabilities are
  masked and stay exactly zero; ``probs`` need not be normalized (only ratios matter).

  Args:
    probs: non-negative array; each slice along ``axis`` is a (possibly unnormalized) distribution.
    target_entropy, axis, where, relative, num_iters: as in :func:`entropy_softmax`.

  Returns:
    The normalized distribution, with the shape and dtype of ``probs``.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> q = en.entropy_normalize(jnp.array([0.5, 0.3, 0.2, 0.0]), jnp.log(2.0))
    >>> q[3].item(), round(float(en.entropy(jnp.log(q))), 4)
    (0.0, 0.6931)
  """
  probs = jnp.asarray(probs)
  axis = canonicalize_axis(axis, probs.ndim)
  nonzero = probs != 0  # NaN counts as valid so that it propagates
  logits = jnp.log(jnp.where(nonzero, probs, 1.0))
  x, valid = _rows(logits, where, axis, nonzero)
  d, valid, gamma = _solve(x, valid, target_entropy, relative, num_iters)
  return jnp.moveaxis(normalized_exp(d, valid, gamma), -1, axis).astype(_output_dtype(probs.dtype))


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
) -> jax.Array:
  """Cross-entropy of ``labels`` against the entropy-normalized distribution of ``logits``.

  Like ``optax.losses.softmax_cross_entropy`` (labels are probabilities), with
  ``q = entropy_softmax(logits, target_entropy)``:  loss = -Σ_i labels_i log q_i over the valid
  entries (masked entries are left out of the sum).

  Args:
    logits: array of logits.
    labels: probabilities broadcastable to ``logits``.
    target_entropy, axis, where, relative, num_iters: as in :func:`entropy_softmax`.

  Returns:
    The loss, of shape ``logits.shape`` without ``axis``.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> loss = en.entropy_softmax_cross_entropy(jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0]), 0.3)
    >>> loss.shape
    ()
  """
  d, valid, gamma, axis, dtype = _from_logits(
    logits, where, axis, target_entropy, relative, num_iters
  )
  labels = jnp.moveaxis(jnp.broadcast_to(jnp.asarray(labels), jnp.shape(logits)), axis, -1)
  log_q = jnp.where(valid, _log_probs(d, valid, gamma), 0.0)
  return (-jnp.sum(jnp.where(valid, labels * log_q, 0.0), axis=-1)).astype(dtype)

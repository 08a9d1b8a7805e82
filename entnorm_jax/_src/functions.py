"""Public entropy-normalization functions.

Entropy normalization maps logits ``z`` (or a distribution ``p = softmax(z)``) to

    q = softmax(γ* · z) = p^γ* / Σ p^γ*,      γ* >= 0 such that H(q) = H_target,

which keeps the order of the entries, keeps zeros at zero, and sets the Shannon entropy to any
target between log m (m = number of entries tied at the maximum) and log n (n = number of valid
entries). Targets outside that range are clamped to it. Every target says its unit (see
:mod:`entnorm_jax._src.targets`): ``target_entropy`` in nats, ``target_fraction`` a fraction of
log(n_valid), or entropy bounds (``min_entropy`` / ``max_entropy``, ``min_fraction`` /
``max_fraction``) that leave a row inside them as its plain softmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from entnorm_jax._src import targets
from entnorm_jax._src.inputs import (
  canonicalize_axis,
  check_num_iters,
  check_where,
  compute_dtype,
  output_dtype,
)
from entnorm_jax._src.iteration import SolveInfo
from entnorm_jax._src.moments import shift_rows
from entnorm_jax._src.normalize import IMPLEMENTATIONS, Solution, SolveConfig, solve_rows
from entnorm_jax._src.targets import Spec

# Shape the computation, so static under jit; the target's values may be traced, its unit (the
# keyword it came by) is static.
_STATIC = ("axis", "spec", "num_iters", "implementation")


def _mask(where: ArrayLike | None, shape, axis: int) -> jax.Array | None:
  """``where`` broadcast to the logits and moved like them, or ``None``."""
  if where is None:
    return None
  check_where(where, shape)
  return jnp.moveaxis(jnp.broadcast_to(jnp.asarray(where), shape).astype(bool), axis, -1)


def _config(num_iters, implementation, info=False) -> SolveConfig:
  check_num_iters(num_iters)
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}"
    )
  return SolveConfig(num_iters, implementation, info)


def _solve(x, where, target, spec: Spec, cfg: SolveConfig):
  """Solves the rows of ``x`` (normalized axis last); returns the :class:`Solution` in its shape
  (``target_scale`` with a trailing axis of 2 for bounds)."""
  batch = x.shape[:-1]
  target = targets.per_row(target, spec, batch, x.dtype)
  n = x.shape[-1]
  if n == 0:  # an empty distribution: nothing to solve (softmax over it is empty too)
    zeros = jnp.zeros(batch, jnp.int32)
    info = (zeros + 1, zeros) if cfg.info else ()
    return Solution(x, jnp.zeros(batch, x.dtype), jnp.zeros(target.shape, x.dtype), *info)
  # The solve sees plain [rows, n]: XLA's CPU reductions are markedly slower on higher-rank rows.
  rows = lambda a: None if a is None else a.reshape(-1, n)
  per_row = target.reshape(-1, *target.shape[len(batch) :])
  sol = solve_rows(rows(x), rows(where), per_row, spec.relative(), cfg)
  info = () if sol.converged is None else (sol.converged, sol.evaluations)
  return Solution(
    sol.probs.reshape(x.shape),
    sol.gamma.reshape(batch),
    sol.target_scale.reshape(target.shape),
    *(a.reshape(batch) for a in info),
  )


def _rows_last(logits, where, axis):
  """``(x, where, axis, dtype)``: the real logits in the compute dtype with the normalized axis
  last, the mask moved like them (or ``None``), the axis as a non-negative int, and the dtype of
  the result (see :func:`entnorm_jax._src.inputs.output_dtype`)."""
  logits = jnp.asarray(logits)
  if jnp.issubdtype(logits.dtype, jnp.complexfloating):
    raise TypeError(f"entropy normalization needs real logits, got {logits.dtype}")
  axis = canonicalize_axis(axis, logits.ndim)
  where = _mask(where, logits.shape, axis)
  x = jnp.moveaxis(logits, axis, -1).astype(compute_dtype(logits.dtype))
  return x, where, axis, output_dtype(logits.dtype)


def _from_logits(logits, where, axis, target, spec, num_iters, implementation, info=False):
  """``(x, where, solution, axis, dtype)``: :func:`_rows_last` and the solve."""
  x, where, axis, dtype = _rows_last(logits, where, axis)
  sol = _solve(x, where, target, spec, _config(num_iters, implementation, info))
  return x, where, sol, axis, dtype


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


def cross_entropy_of(labels: jax.Array, log_q: jax.Array) -> jax.Array:
  """``-Σ_i labels_i log q_i`` over the last axis, the masked entries (``log q_i = -inf``) left out.

  Args:
    labels: weights ``[..., n]``; ``exp(log_q)`` gives the entropy of q.
    log_q: log-probabilities ``[..., n]``, ``-inf`` at masked entries.

  Returns:
    ``[...]``, in the dtype of the product.
  """
  return -jnp.sum(jnp.where(log_q > -jnp.inf, labels * log_q, 0.0), axis=-1)


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
    H = -Σ_i q_i log q_i with q = softmax(logits), shape ``logits.shape`` without ``axis``, in
    the dtype of ``logits`` (float32 for integer or boolean logits).

  Raises:
    TypeError: for complex logits.
    ValueError: for a bad axis or a mask that does not broadcast.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> float(en.entropy(jnp.zeros(4)))  # log 4
    1.386...
  """
  x, where, _, dtype = _rows_last(logits, where, axis)
  log_q = _log_probs(x, where, jnp.ones(x.shape[:-1], x.dtype))
  return cross_entropy_of(jnp.exp(log_q), log_q).astype(dtype)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "info"))
def _solve_gamma(logits, target, axis, where, *, spec, num_iters, implementation, info=False):
  """γ* in the dtype of ``logits``; with ``info``, ``(γ*, SolveInfo)``."""
  _, _, sol, _, dtype = _from_logits(
    logits, where, axis, target, spec, num_iters, implementation, info
  )
  gamma = sol.gamma.astype(dtype)
  return (gamma, SolveInfo(sol.converged != 0, sol.evaluations)) if info else gamma


def solve_gamma(
  logits: ArrayLike,
  target_entropy: ArrayLike | None = None,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  implementation: str | None = None,
  return_info: bool = False,
  **removed,
) -> jax.Array | tuple[jax.Array, SolveInfo]:
  """The inverse temperature γ* >= 0 with H(softmax(γ*·logits)) = H_t.

  ``target_entropy`` is in nats; ``target_fraction=f`` asks for ``H_t = f · log(n_valid)``; the
  bounds ``min_entropy`` / ``max_entropy`` (``min_fraction`` / ``max_fraction``) give γ* = 1 for
  rows already inside them. Name exactly one target (or bounds).

  Targets at or above log(n_valid) give γ* = 0 (uniform). Targets at or below log(m), m the number
  of entries tied at the maximum, give the smallest γ at which softmax(γ·logits) is the uniform
  distribution over the argmax set in the working precision (float32: ``110 / gap``, float64:
  ``750 / gap``, gap the distance from the maximum to the next value). Rows with no valid entry
  give 0; rows with a valid NaN, or a NaN target, give NaN.

  γ* is differentiable by the implicit function theorem (never through the iterations):

    ∂γ*/∂z_i = -γ* q_i (z_i - m) / V,     ∂γ*/∂H_t = -1 / (γ* V),

  with q = softmax(γ*·z), m and V the mean and variance of z under q; the derivative is 0 where
  the target is clamped, and for rows inside their bounds.

  Args:
    logits: array of logits; ``-inf`` entries are masked.
    target_entropy, axis, where, target_fraction, min_entropy, max_entropy, min_fraction,
      max_fraction, num_iters, implementation: as in :func:`entropy_softmax`.
    return_info: also return how each row's solve ended (static).

  Returns:
    γ*, of shape ``logits.shape`` without ``axis``, in the dtype of ``logits`` (float32 for
    integer or boolean logits); with ``return_info``, ``(γ*, info)``: a :class:`SolveInfo` whose
    ``converged`` (bool) says where a row is within the tolerance of its clamped target (or
    solved at an edge, or held inside its bounds), False where the solve stopped first (the
    evaluation cap, a fixed ``num_iters``, a step that rounds to nothing) or the row holds a NaN,
    and whose ``evaluations`` (int32) counts the passes over each row. Both of γ*'s shape.

  Raises:
    ValueError: as :func:`entropy_softmax`.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> z = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    >>> g = en.solve_gamma(z, 0.5)
    >>> round(float(en.entropy(g * z)), 4)
    0.5
    >>> float(en.solve_gamma(z, max_entropy=2.0))  # already below the ceiling: untouched
    1.0
    >>> g, info = en.solve_gamma(z, 0.5, return_info=True)
    >>> bool(info.converged), int(info.evaluations) <= 8
    (True, True)
  """
  target, spec = targets.parse(
    "solve_gamma", removed=removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  return _solve_gamma(
    logits, target, axis, where, spec=spec, num_iters=num_iters, implementation=implementation,
    info=bool(return_info),
  )  # fmt: skip


@functools.partial(jax.jit, static_argnames=_STATIC)
def _entropy_softmax(logits, target, axis, where, *, spec, num_iters, implementation):
  _, _, sol, axis, dtype = _from_logits(
    logits, where, axis, target, spec, num_iters, implementation
  )
  return jnp.moveaxis(sol.probs, -1, axis).astype(dtype)


def entropy_softmax(
  logits: ArrayLike,
  target_entropy: ArrayLike | None = None,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  implementation: str | None = None,
  **removed,
) -> jax.Array:
  """Entropy-normalized softmax: ``softmax(γ*·logits)`` with a prescribed entropy per row.

  The target names its unit: ``target_entropy`` (nats) or ``target_fraction`` (a fraction f of
  each row's largest entropy, ``H_t = f · log(n_valid)``); or, instead of an exact target,
  entropy bounds ``min_entropy`` / ``max_entropy`` (``min_fraction`` / ``max_fraction``):

    q = softmax(γ* z),   H(q) = clip(H_t, log m, log n_valid)          (exact target)
    q = softmax(z)              if lo <= H(softmax(z)) <= hi            (bounds)
      = softmax(γ* z),   H(q) = clip(lo or hi, log m, log n_valid)     otherwise (the bound crossed)

  with n_valid the unmasked entries and m those tied at the maximum. A floor guards against
  collapse (and vanishing gradients), a ceiling against dilution.

  γ* is found by :func:`solve_gamma`; the result keeps the order of the logits (ties stay ties)
  and is exactly 0 at masked entries. Differentiable w.r.t. ``logits`` and the target (forward,
  reverse and higher order) through the implicit derivative of γ*:

    dq = q ⊙ (u - Σ_j q_j u_j),     u = γ* dz + z dγ*;

  rows inside their bounds have softmax's derivative. Targets a row cannot reach are clamped;
  values with no meaning raise when concrete and give NaN rows when traced; a NaN target gives a
  NaN row.

  Args:
    logits: array of logits; ``-inf`` entries are masked.
    target_entropy: the target in nats: a scalar or an array broadcastable to ``logits.shape``
      without ``axis`` (one value per row).
    axis: the axis holding each distribution.
    where: optional boolean mask broadcastable to ``logits``; False entries are excluded.
    target_fraction: the target as a fraction f in [0, 1] of each row's largest entropy,
      ``H_t = f · log(n_valid)`` (so masks are honoured); instead of ``target_entropy``.
    min_entropy: a floor in nats instead of an exact target (alone or with a ceiling).
    max_entropy: a ceiling in nats (alone or with a floor).
    min_fraction: a floor as a fraction of log(n_valid) (instead of ``min_entropy``).
    max_fraction: a ceiling as a fraction of log(n_valid) (instead of ``max_entropy``).
    num_iters: ``None`` (default) iterates each block of rows until every row is within
      2e-6·max(1, log n) nats of its target (1e-12 in float64); an int k runs exactly k
      Halley-type steps (static).
    implementation: ``None`` picks by platform: ``"tiled"`` on CPUs (rows solved in cache-sized
      blocks), ``"pallas"`` on CUDA GPUs (one fused kernel solving each block of rows on chip),
      ``"xla"`` elsewhere (whole-array passes). A forced ``"pallas"`` is compiled by Triton on
      GPUs, interpreted on CPUs (slow: for tests), and falls back to ``"xla"`` on TPUs, for
      rows longer than 8192 and for entropy bounds. All give the same answers.

  Returns:
    Probabilities of the shape and dtype of ``logits`` (float32 for integer or boolean logits,
    which are solved in float32 as 16-bit floats are). A row with no valid entry is all zeros.

  Raises:
    ValueError: for a bad axis, ``num_iters`` or ``implementation``; a mask or target that does
      not broadcast; none or several targets; a concrete target with no meaning in its unit (a
      fraction outside [0, 1], negative nats, a floor above a ceiling of the same unit); or the
      removed ``relative=`` (the message names ``target_fraction=``).

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> q = en.entropy_softmax(jnp.array([2.0, 1.0, 0.0, -1.0]), 0.8)
    >>> round(float(en.entropy(jnp.log(q))), 4)
    0.8
    >>> q = en.entropy_softmax(jnp.array([2.0, 1.0, 0.0, -1.0]), target_fraction=0.5)
    >>> round(float(en.entropy(jnp.log(q)) / jnp.log(4.0)), 4)  # half of the maximum, log 4
    0.5
    >>> z = jnp.array([[8.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0]])
    >>> q = en.entropy_softmax(z, min_fraction=0.25, max_fraction=0.75)
    >>> (en.entropy(jnp.log(q)) / jnp.log(4.0)).round(4).tolist()  # raised / lowered to a bound
    [0.25, 0.75]
  """
  target, spec = targets.parse(
    "entropy_softmax", removed=removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  return _entropy_softmax(
    logits, target, axis, where, spec=spec, num_iters=num_iters, implementation=implementation
  )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _entropy_log_softmax(logits, target, axis, where, *, spec, num_iters, implementation):
  x, where, sol, axis, dtype = _from_logits(
    logits, where, axis, target, spec, num_iters, implementation
  )
  return jnp.moveaxis(_log_probs(x, where, sol.gamma), -1, axis).astype(dtype)


def entropy_log_softmax(
  logits: ArrayLike,
  target_entropy: ArrayLike | None = None,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  implementation: str | None = None,
  **removed,
) -> jax.Array:
  """Logarithm of :func:`entropy_softmax`, computed stably: ``γ*·z - logsumexp(γ*·z)``.

  Args:
    logits, target_entropy, axis, where, target_fraction, min_entropy, max_entropy,
      min_fraction, max_fraction, num_iters, implementation: as in :func:`entropy_softmax`.

  Returns:
    Log-probabilities of the shape and dtype of ``logits`` (float32 for integer or boolean
    logits); ``-inf`` at masked entries.

  Raises:
    ValueError: as :func:`entropy_softmax`.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> lq = en.entropy_log_softmax(jnp.array([2.0, 1.0, 0.0]), 0.5)
    >>> round(float(-(jnp.exp(lq) * lq).sum()), 4)
    0.5
  """
  target, spec = targets.parse(
    "entropy_log_softmax", removed=removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  return _entropy_log_softmax(
    logits, target, axis, where, spec=spec, num_iters=num_iters, implementation=implementation
  )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _entropy_normalize(probs, target, axis, where, *, spec, num_iters, implementation):
  probs = jnp.asarray(probs)
  # Zero probabilities become -inf logits (masked); NaN stays valid so that it propagates.
  nonzero = probs != 0
  logits = jnp.where(nonzero, jnp.log(jnp.where(nonzero, probs, 1.0)), -jnp.inf)
  _, _, sol, axis, _ = _from_logits(logits, where, axis, target, spec, num_iters, implementation)
  return jnp.moveaxis(sol.probs, -1, axis).astype(output_dtype(probs.dtype))


def entropy_normalize(
  probs: ArrayLike,
  target_entropy: ArrayLike | None = None,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  implementation: str | None = None,
  **removed,
) -> jax.Array:
  """The power transform ``p^γ* / Σ p^γ*`` of a distribution, with a prescribed entropy.

  This is the seed's interface: a distribution in, a distribution out. Zero probabilities are
  masked and stay exactly zero (so ``target_fraction`` is a fraction of log(number of nonzero
  entries)); ``probs`` need not be normalized (only ratios matter).

  Args:
    probs: non-negative array; each slice along ``axis`` is a (possibly unnormalized) distribution.
    target_entropy, axis, where, target_fraction, min_entropy, max_entropy, min_fraction,
      max_fraction, num_iters, implementation: as in :func:`entropy_softmax`.

  Returns:
    The normalized distribution, with the shape and dtype of ``probs`` (float32 for integer or
    boolean ``probs``).

  Raises:
    ValueError: as :func:`entropy_softmax`.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> q = en.entropy_normalize(jnp.array([0.5, 0.3, 0.2, 0.0]), jnp.log(2.0))
    >>> q[3].item(), round(float(en.entropy(jnp.log(q))), 4)
    (0.0, 0.6931)
  """
  target, spec = targets.parse(
    "entropy_normalize", removed=removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  return _entropy_normalize(
    probs, target, axis, where, spec=spec, num_iters=num_iters, implementation=implementation
  )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _cross_entropy(logits, labels, target, axis, where, *, spec, num_iters, implementation):
  x, where, sol, axis, dtype = _from_logits(
    logits, where, axis, target, spec, num_iters, implementation
  )
  labels = jnp.moveaxis(jnp.broadcast_to(labels, jnp.shape(logits)), axis, -1)
  return cross_entropy_of(labels, _log_probs(x, where, sol.gamma)).astype(dtype)


def entropy_softmax_cross_entropy(
  logits: ArrayLike,
  labels: ArrayLike,
  target_entropy: ArrayLike | None = None,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  implementation: str | None = None,
  **removed,
) -> jax.Array:
  """Cross-entropy of ``labels`` against the entropy-normalized distribution of ``logits``.

  Like ``optax.losses.softmax_cross_entropy`` (labels are probabilities), with ``q`` the
  :func:`entropy_softmax` of ``logits``:  loss = -Σ_i labels_i log q_i over the valid entries
  (masked entries are left out of the sum).

  Args:
    logits: array of logits.
    labels: probabilities broadcastable to ``logits``.
    target_entropy, axis, where, target_fraction, min_entropy, max_entropy, min_fraction,
      max_fraction, num_iters, implementation: as in :func:`entropy_softmax`.

  Returns:
    The loss, of shape ``logits.shape`` without ``axis``, in the dtype of ``logits`` (float32 for
    integer or boolean logits).

  Raises:
    TypeError: for integer labels (see :func:`entropy_softmax_cross_entropy_with_integer_labels`).
    ValueError: as :func:`entropy_softmax`.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> loss = en.entropy_softmax_cross_entropy(jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0]), 0.3)
    >>> loss.shape
    ()
  """
  target, spec = targets.parse(
    "entropy_softmax_cross_entropy", removed=removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.inexact):
    raise TypeError(
      f"labels are {labels.dtype}: this loss takes probabilities (e.g. one-hot); for class "
      "indices use entropy_softmax_cross_entropy_with_integer_labels"
    )
  return _cross_entropy(
    logits, labels, target, axis, where, spec=spec, num_iters=num_iters,
    implementation=implementation,
  )  # fmt: skip


@functools.partial(jax.jit, static_argnames=_STATIC)
def _integer_cross_entropy(logits, labels, target, axis, where, *, spec, num_iters, implementation):
  x, where, sol, axis, dtype = _from_logits(
    logits, where, axis, target, spec, num_iters, implementation
  )
  log_q = _log_probs(x, where, sol.gamma)
  picked = jnp.take_along_axis(log_q, labels[..., None], axis=-1, mode="fill")[..., 0]
  return (-picked).astype(dtype)


def entropy_softmax_cross_entropy_with_integer_labels(
  logits: ArrayLike,
  labels: ArrayLike,
  target_entropy: ArrayLike | None = None,
  axis: int = -1,
  where: ArrayLike | None = None,
  *,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  num_iters: int | None = None,
  implementation: str | None = None,
  **removed,
) -> jax.Array:
  """Cross-entropy of class indices against the entropy-normalized distribution of ``logits``.

  Like ``optax.losses.softmax_cross_entropy_with_integer_labels``, with ``q`` the
  :func:`entropy_softmax` of ``logits``:  loss = -log q[label]. A label on a masked entry gives
  ``inf``; a label out of range gives NaN (as ``jnp.take_along_axis`` fills it).

  Args:
    logits: array of logits.
    labels: integer class indices, of the shape of ``logits`` without ``axis``.
    target_entropy, axis, where, target_fraction, min_entropy, max_entropy, min_fraction,
      max_fraction, num_iters, implementation: as in :func:`entropy_softmax`.

  Returns:
    The loss, of shape ``logits.shape`` without ``axis``, in the dtype of ``logits`` (float32 for
    integer or boolean logits).

  Raises:
    TypeError: for labels that are not integers.
    ValueError: for labels of the wrong shape (and as :func:`entropy_softmax`).

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> z = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.1, 0.2]])
    >>> en.entropy_softmax_cross_entropy_with_integer_labels(z, jnp.array([0, 2]), 0.3).shape
    (2,)
  """
  target, spec = targets.parse(
    "entropy_softmax_cross_entropy_with_integer_labels", removed=removed,
    target_entropy=target_entropy, target_fraction=target_fraction, min_entropy=min_entropy,
    max_entropy=max_entropy, min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
  batch = np.delete(np.shape(logits), canonicalize_axis(axis, np.ndim(logits)))
  if labels.shape != tuple(batch):
    raise ValueError(
      f"labels of shape {labels.shape} do not match the logits' shape without the normalized "
      f"axis, {tuple(batch)}"
    )
  return _integer_cross_entropy(
    logits, labels, target, axis, where, spec=spec, num_iters=num_iters,
    implementation=implementation,
  )  # fmt: skip

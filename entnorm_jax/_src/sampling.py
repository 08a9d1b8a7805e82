"""Next-token sampling: entropy normalization and the samplers people use, over a batch of rows.

Every method maps a row of logits ``z`` (last axis, ``n`` entries, masked entries excluded) to the
logits of the distribution a token is drawn from; :func:`sample` draws from it, :func:`generate`
runs the decoding loop. With ``p = softmax(z / temperature)`` and ``H(p)`` its entropy, the
methods and their parameters, named as in Hugging Face's ``GenerationConfig`` and llama.cpp, are:

* ``"entropy"``: ``softmax(γ*·z)`` with ``H = target_entropy`` nats (``target_fraction=f``:
  ``f · log n_valid``; ``perplexity=k``: ``log k``), γ* from the core solver: no truncation, the
  same entropy at every step. With the bounds ``max_entropy`` / ``max_fraction`` (a ceiling) and
  ``min_entropy`` / ``min_fraction`` (a floor) instead, rows whose entropy already lies inside them
  keep temperature 1 and the others are normalized to the bound they cross: a ceiling leaves
  confident rows as they are.
* ``"temperature"``: ``softmax(z / temperature)``;  ``"greedy"``: the argmax.
* ``"top_k"``: the ``top_k`` largest logits.
* ``"top_p"``: the smallest set of the most likely entries holding mass ``>= top_p`` (Holtzman et
  al., 2020). An entry is cut exactly when the entries more likely than it already hold ``top_p``,
  which is decided from the mass of the entries *at most* as likely as it (summed from the small
  end, so it stays exact in float32 where a running sum from the top reaches 1 early):
  ``top_p = 1`` keeps every token.
* ``"min_p"``: the entries with ``p_i >= min_p · max p``.
* ``"typical"``: the entries closest to ``-log p_i = H(p)``, taken in that order up to mass
  ``>= typical_p`` (Meister et al., 2023); the most likely token is *not* forced in.
* ``"eta"``: the entries with ``p_i >= min(η, sqrt(η) e^{-H(p)})``, ``η = eta_cutoff`` (Hewitt et
  al., 2022).
* ``"mirostat"`` (v2, Basu et al., 2021): the entries with surprise ``-log2 p_i <= μ``; after
  drawing x, ``μ ← μ - mirostat_eta (-log2 q(x) - mirostat_tau)`` with q the truncated
  distribution. μ lives in an explicit :class:`MirostatState`: :func:`sample_mirostat` takes and
  returns it, :func:`generate` carries it through its ``lax.scan``.

``temperature`` (default 1) is applied before any truncation, and what is kept is renormalized.
As in Hugging Face's warpers (``min_tokens_to_keep=1``) and llama.cpp, top-k, top-p, min-p, eta
and mirostat always keep the most likely token, typical keeps the most typical one. Ties at a
cut-off are kept together (a top-k row with ties may keep more than ``top_k`` entries).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from entnorm_jax._src import targets
from entnorm_jax._src.functions import _solve_gamma, cross_entropy_of
from entnorm_jax._src.inputs import broadcasts, check_where, compute_dtype, concrete, output_dtype
from entnorm_jax._src.targets import Spec

# method -> (required parameters, optional parameters with defaults)
_METHODS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
  "entropy": (
    (),
    {
      "target_entropy": None,
      "target_fraction": None,
      "perplexity": None,
      "min_entropy": None,
      "max_entropy": None,
      "min_fraction": None,
      "max_fraction": None,
      "num_iters": None,
    },
  ),
  "temperature": (("temperature",), {}),
  "greedy": ((), {}),
  "top_k": (("top_k",), {"temperature": 1.0}),
  "top_p": (("top_p",), {"temperature": 1.0}),
  "min_p": (("min_p",), {"temperature": 1.0}),
  "typical": (("typical_p",), {"temperature": 1.0}),
  "eta": (("eta_cutoff",), {"temperature": 1.0}),
  "mirostat": (("mirostat_tau",), {"mirostat_eta": 0.1, "temperature": 1.0}),
}
# Names this module used before it took the Hugging Face / llama.cpp ones: rejected, with a pointer.
_RENAMED: dict[str, dict[str, str]] = {
  "top_k": {"k": "top_k"},
  "top_p": {"p": "top_p"},
  "min_p": {"p": "min_p"},
  "typical": {"p": "typical_p", "mass": "typical_p"},
  "eta": {"epsilon": "eta_cutoff", "eta": "eta_cutoff"},
  "mirostat": {"tau": "mirostat_tau", "eta": "mirostat_eta"},
}
_STATIC_PARAMS = ("top_k", "spec", "num_iters")
_LN2 = math.log(2.0)
_CANDIDATES = 256  # top-p / typical: entries tried by lax.top_k before the exact threshold search


class MirostatState(NamedTuple):
  """Running state of Mirostat v2.

  Attributes:
    mu: ``[batch]`` surprise threshold in bits; tokens with ``-log2 p > mu`` are cut.
  """

  mu: jax.Array


class Generation(NamedTuple):
  """Output of :func:`generate` (``T = max_new_tokens``).

  Attributes:
    tokens: ``[batch, T]`` int32 generated tokens.
    log_probs: ``[batch, T]`` the model's own log-probability of each token (raw logits, T = 1).
    entropies: ``[batch, T]`` entropy (nats) of the distribution each token was drawn from.
    state: the model state after the last step.
    sampler_state: the final :class:`MirostatState` for ``"mirostat"``, else ``None``.
  """

  tokens: jax.Array
  log_probs: jax.Array
  entropies: jax.Array
  state: Any
  sampler_state: MirostatState | None


def mirostat_init(mirostat_tau: ArrayLike, batch_shape: tuple[int, ...] = ()) -> MirostatState:
  """The usual initial Mirostat state, ``μ = 2·mirostat_tau`` (bits), broadcast to ``batch_shape``.

  Args:
    mirostat_tau: the target surprise in bits, a scalar or an array broadcastable to
      ``batch_shape``.
    batch_shape: the shape of the batch of rows (``logits.shape[:-1]``).

  Returns:
    A :class:`MirostatState` with float32 ``mu`` of shape ``batch_shape``.
  """
  tau = jnp.asarray(mirostat_tau, jnp.float32)
  return MirostatState(jnp.broadcast_to(2.0 * tau, batch_shape))


# ----------------------------------------------------------------------------------- validation


def _check_range(
  method: str, name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool
) -> None:
  v = concrete(value)
  if v is None:
    return
  low_bad = v <= lo if lo_open else v < lo
  high_bad = v >= hi if hi_open else v > hi
  if np.any(low_bad | high_bad | np.isnan(v)):
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"method {method!r}: {name} must lie in {interval}, got {value!r}")


def _reject_renamed(method: str, names) -> None:
  """Raises for a parameter name that ``method`` took before it used the familiar names."""
  if method == "entropy":
    for name in sorted(set(names) & set(targets.REMOVED)):
      raise ValueError(f"method 'entropy': {targets.REMOVED[name]}")
  renamed = _RENAMED.get(method, {})
  old = sorted(set(names) & set(renamed))
  if old:
    new = [renamed[name] for name in old]
    raise ValueError(
      f"method {method!r}: parameter(s) {old} are called {new} (the names Hugging Face's "
      f"GenerationConfig and llama.cpp use); pass {', '.join(f'{n}=' for n in new)} instead"
    )


def _entropy_target(params: dict[str, Any]) -> dict[str, Any]:
  """Method "entropy": the target keywords (or ``perplexity``) folded into ``target`` and a
  static ``spec`` (see :mod:`entnorm_jax._src.targets`)."""
  keywords = {n: params.pop(n) for n in targets.KEYWORDS}
  perplexity = params.pop("perplexity")
  named = [n for n, v in keywords.items() if v is not None]
  if perplexity is not None:
    if named:
      raise ValueError(
        f"method 'entropy' takes perplexity= (= exp(target_entropy)) or a target, not both; got "
        f"perplexity and {named}"
      )
    _check_range("entropy", "perplexity", perplexity, 1.0, math.inf, False, True)
    return {
      **params,
      "target": jnp.log(jnp.asarray(perplexity)),
      "spec": Spec(("target_entropy",), (False,)),
    }
  if not named:
    raise ValueError(
      "method 'entropy' needs a target: target_entropy= (nats), target_fraction= (a fraction "
      "of log n_valid) or perplexity= (= exp(target)), or bounds min_entropy= / max_entropy= "
      "(min_fraction= / max_fraction=)"
    )
  target, spec = targets.parse("method 'entropy'", **keywords)
  return {**params, "target": target, "spec": spec}


def _validate(method: str, params: dict[str, Any], batch_shape: tuple[int, ...]) -> dict[str, Any]:
  """Checks names and (concrete) values of the parameters; returns them with defaults filled in."""
  if method not in _METHODS:
    raise ValueError(f"unknown sampling method {method!r}; choose one of {sorted(_METHODS)}")
  _reject_renamed(method, params)
  required, optional = _METHODS[method]
  allowed = set(required) | set(optional)
  unknown = sorted(set(params) - allowed)
  if unknown:
    owners = [
      f"{n}= belongs to method={m!r}" for n in unknown for m in _METHODS if (n,) == _METHODS[m][0]
    ]
    hint = f" ({'; '.join(owners)})" if owners else ""
    raise ValueError(
      f"method {method!r} got unexpected parameter(s) {unknown}; it accepts {sorted(allowed)}"
      + hint
    )
  missing = [name for name in required if name not in params]
  if missing:
    raise ValueError(f"method {method!r} needs parameter(s) {missing}")
  params = {**optional, **params}
  for name, value in params.items():
    if name in _STATIC_PARAMS or value is None:
      continue
    shape = np.shape(value)
    if not broadcasts(shape, batch_shape):
      raise ValueError(
        f"{name} of shape {shape} does not broadcast to the batch shape {tuple(batch_shape)} "
        "(logits' shape without the vocabulary axis)"
      )
  if method == "entropy":
    params = _entropy_target(params)
  if "temperature" in params:
    _check_range(method, "temperature", params["temperature"], 0.0, math.inf, True, True)
  if method == "top_k":
    k = params["top_k"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise TypeError(f"top_k must be a Python int (it sets a static shape), got {k!r}")
    if k < 1:
      raise ValueError(f"method 'top_k': top_k must be >= 1, got {k}")
  if method == "top_p":
    _check_range(method, "top_p", params["top_p"], 0.0, 1.0, True, False)
  if method == "typical":
    _check_range(method, "typical_p", params["typical_p"], 0.0, 1.0, True, False)
  if method == "min_p":
    _check_range(method, "min_p", params["min_p"], 0.0, 1.0, False, False)
  if method == "eta":
    _check_range(method, "eta_cutoff", params["eta_cutoff"], 0.0, 1.0, True, True)
  if method == "mirostat":
    _check_range(method, "mirostat_tau", params["mirostat_tau"], 0.0, math.inf, True, True)
    _check_range(method, "mirostat_eta", params["mirostat_eta"], 0.0, math.inf, False, True)
  return params


# ------------------------------------------------------------------------------ row transforms


def _batch_shape(logits: ArrayLike, where: ArrayLike | None) -> tuple[int, ...]:
  """The batch shape ``logits.shape[:-1]``, after checking the shapes of logits and mask."""
  shape = np.shape(logits)
  if len(shape) < 1:
    raise ValueError(f"logits must have a vocabulary axis, got shape {shape}")
  check_where(where, shape)
  return tuple(shape[:-1])


def _rows(logits: ArrayLike, where: ArrayLike | None) -> tuple[jax.Array, jax.Array]:
  """Shifted logits ``d = z - max z`` (float32 or float64; ``-inf`` where masked) and the mask.

  The maximum keeps its gradient: ``d`` is returned to the caller, so ``∂d_i/∂z_j = δ_ij - δ_ja``
  (a the argmax); in particular ``d_a = 0`` whatever ``z``.
  """
  z = jnp.asarray(logits)
  z = z.astype(compute_dtype(z.dtype))
  valid = z != -jnp.inf  # a NaN is valid: it makes its row NaN
  if where is not None:
    valid = valid & jnp.broadcast_to(jnp.asarray(where), z.shape).astype(bool)
  zmax = jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1, keepdims=True)
  zmax = jnp.where(jnp.isneginf(zmax), 0.0, zmax)  # a row with no valid entry
  return jnp.where(valid, z - zmax, -jnp.inf), valid


def _param(value, d: jax.Array) -> jax.Array:
  """A per-row parameter as ``[..., 1]`` in the compute dtype."""
  return jnp.broadcast_to(jnp.asarray(value, d.dtype), d.shape[:-1])[..., None]


def _log_softmax(d: jax.Array) -> jax.Array:
  return d - jax.nn.logsumexp(d, axis=-1, keepdims=True)


def _entropy(d: jax.Array) -> jax.Array:
  """Entropy (nats) of softmax(d) over the finite entries of each row."""
  log_p = _log_softmax(d)
  return cross_entropy_of(jnp.exp(log_p), log_p)


def _keep(d: jax.Array, keep: jax.Array) -> jax.Array:
  return jnp.where(keep | (d == 0), d, -jnp.inf)  # d == 0 is the argmax: always kept


def _entropy_d(d, valid, target, spec: Spec, num_iters):
  # Masked entries as 0 plus the mask, never -inf: a tangent or cotangent times -inf is NaN.
  finite_d = jnp.where(valid, d, 0.0)
  gamma = _solve_gamma(
    finite_d, target, -1, valid, spec=spec, num_iters=num_iters, implementation=None
  )
  return jnp.where(valid, gamma[..., None] * finite_d, -jnp.inf)


def _top_k_d(d, top_k):
  # min, not [..., -1:]: XLA folds a slice at the end into the sort behind top_k (a full sort)
  kth = jnp.min(jax.lax.top_k(d, min(top_k, d.shape[-1]))[0], axis=-1, keepdims=True)
  return _keep(d, d >= kth)


def _bisect_cut(key, p, limit, start):
  """The smallest ``c <= start`` with ``Σ_{key_i <= c} p_i > limit``, by bisection on float bits.

  For ``key <= 0`` the cut ``-c`` is a non-negative float, and those are ordered like their bit
  patterns read as integers: 31 (float32) or 63 (float64) halvings of ``[-start, inf)`` find it
  exactly, each one a single masked sum over the row.
  """
  dtype = key.dtype
  itype, steps = (jnp.int64, 63) if dtype == jnp.float64 else (jnp.int32, 31)
  lo = jax.lax.bitcast_convert_type(jnp.abs(start), itype)
  hi = jnp.full_like(lo, jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, dtype), itype))

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    cut = -jax.lax.bitcast_convert_type(mid, dtype)
    above = jnp.sum(jnp.where(key <= cut, p, 0.0), axis=-1, keepdims=True) > limit
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, _ = jax.lax.fori_loop(0, steps, halve, (lo, hi))
  return -jax.lax.bitcast_convert_type(lo, dtype)


def _smallest_set(key, log_p, mass):
  """Keeps the entries of largest ``key`` whose probability mass first reaches ``mass``.

  Entry i is cut exactly when the entries of larger key already hold ``mass``, i.e. when the tail
  ``T_i = Σ_{key_j <= key_i} p_j`` (i and its ties included) is ``<= 1 - mass``. Tails are summed
  from the small end, so they stay accurate in float32 (a running sum from the top reaches 1
  early), and ``mass >= 1`` keeps every valid entry. The cut is looked for among the
  ``_CANDIDATES`` largest keys (``lax.top_k``); only rows whose cut lies beyond them take an exact
  bisection on the threshold. No full sort.

  Args:
    key: ``[..., n]`` keys ``<= 0``, ``-inf`` exactly where masked.
    log_p: ``[..., n]`` log-probabilities, ``-inf`` where masked.
    mass: ``[..., 1]`` the mass to reach, in ``(0, 1]``.

  Returns:
    ``[..., n]`` boolean mask of the kept entries (at least the entry of largest key).
  """
  key, log_p = jax.lax.stop_gradient((key, log_p))  # only a mask comes out
  p = jnp.exp(log_p)
  limit = 1.0 - mass
  keep_all = mass >= 1.0
  candidates, index = jax.lax.top_k(key, min(key.shape[-1], _CANDIDATES))  # descending
  # The smallest candidate. Not `candidates[..., -1:]`: XLA folds that slice into the sort behind
  # top_k, and a sort whose result is sliced at the end is no longer a top-k: it sorts the row.
  last = jnp.min(candidates, axis=-1, keepdims=True)
  beyond = jnp.sum(jnp.where(key <= last, p, 0.0), axis=-1, keepdims=True)
  inside = jnp.where(candidates > last, jnp.exp(jnp.take_along_axis(log_p, index, axis=-1)), 0.0)
  tail = beyond + jax.lax.cumsum(inside, axis=inside.ndim - 1, reverse=True)  # non-increasing
  count = jnp.sum(tail > limit, axis=-1, keepdims=True)
  cut = jnp.take_along_axis(candidates, jnp.maximum(count, 1) - 1, axis=-1)
  found = (beyond <= limit) | keep_all  # everything from `last` down is cut: the cut is inside
  cut = jax.lax.cond(
    jnp.all(found),
    lambda: cut,
    lambda: jnp.where(found, cut, _bisect_cut(key, p, limit, last)),
  )
  return (key >= cut) | (keep_all & (key > -jnp.inf))


def _top_p_d(d, top_p):
  keep = _smallest_set(d, _log_softmax(d), _param(top_p, d))
  return _keep(d, keep)


def _typical_d(d, typical_p):
  log_p = _log_softmax(d)
  score = jnp.abs(-log_p - _entropy(d)[..., None])
  key = jnp.where(d > -jnp.inf, -score, -jnp.inf)
  keep = _smallest_set(key, log_p, _param(typical_p, d))
  return jnp.where(keep, d, -jnp.inf)  # the most typical entry is kept, not the argmax


def _min_p_d(d, min_p):
  return _keep(d, d >= jnp.log(_param(min_p, d)))  # d = log(p_i / max p)


def _eta_d(d, eta_cutoff):
  log_eps = jnp.log(_param(eta_cutoff, d))
  log_eta = jnp.minimum(log_eps, 0.5 * log_eps - _entropy(d)[..., None])
  return _keep(d, _log_softmax(d) >= log_eta)


def _mirostat_d(d, mu):
  surprise_bits = -_log_softmax(d) / _LN2
  return _keep(d, surprise_bits <= mu.astype(d.dtype)[..., None])


def _process(d, valid, method, params, state):
  """The logits each token is drawn from (``-inf`` where cut), in the compute dtype."""
  if method == "entropy":
    return _entropy_d(d, valid, params["target"], params["spec"], params["num_iters"])
  if method == "greedy":
    return _keep(d, jnp.zeros(d.shape, bool))
  # d / T with no -inf in the product, so a gradient in T is not 0·inf = NaN at masked entries
  d = jnp.where(valid, jnp.where(valid, d, 0.0) / _param(params["temperature"], d), -jnp.inf)
  if method == "temperature":
    return d
  if method == "mirostat":
    return _mirostat_d(d, state.mu)
  transform = {
    "top_k": _top_k_d,
    "top_p": _top_p_d,
    "min_p": _min_p_d,
    "typical": _typical_d,
    "eta": _eta_d,
  }[method]
  (value,) = [params[n] for n in _METHODS[method][0]]
  return transform(d, value)


def _mirostat_update(state, processed, tokens, params):
  """μ ← μ - η (s - τ), s = -log2 q(x) the observed surprise under the truncated distribution."""
  log_q = jnp.take_along_axis(_log_softmax(processed), tokens[..., None], axis=-1)[..., 0]
  error = -log_q / _LN2 - jnp.asarray(params["mirostat_tau"], log_q.dtype)
  return MirostatState(state.mu - jnp.asarray(params["mirostat_eta"], log_q.dtype) * error)


def _prepare_state(method, params, state, batch_shape):
  if method != "mirostat":
    if state is not None:
      raise ValueError(f"a sampler state is only used by method='mirostat', not {method!r}")
    return None
  if state is None:
    return mirostat_init(params["mirostat_tau"], batch_shape)
  return MirostatState(jnp.broadcast_to(jnp.asarray(state.mu, jnp.float32), batch_shape))


def _split_static(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  static = {n: params.pop(n) for n in _STATIC_PARAMS if n in params}
  return params, static


# ---------------------------------------------------------------------------------- public API


def process_logits(
  logits: ArrayLike,
  *,
  method: str = "entropy",
  where: ArrayLike | None = None,
  state: MirostatState | None = None,
  **params,
) -> jax.Array:
  """The logits of the distribution :func:`sample` draws from, for any method.

  Args:
    logits: ``[..., n]`` logits (any float dtype, bf16 included); ``-inf`` entries are masked.
    method: one of ``"entropy"``, ``"temperature"``, ``"greedy"``, ``"top_k"``, ``"top_p"``,
      ``"min_p"``, ``"typical"``, ``"eta"``, ``"mirostat"``.
    where: optional boolean mask broadcastable to ``logits``; False entries are never drawn.
    state: the :class:`MirostatState` for ``"mirostat"`` (``None``: ``μ = 2·mirostat_tau``);
      must be ``None`` for the other methods.
    **params: the method's parameters (see :func:`sample`), scalars or per-row arrays.

  Returns:
    ``[..., n]`` logits ``z - max z`` (over valid entries; scaled by γ* or ``1/temperature`` as
    the method says), ``-inf`` where an entry is masked or cut, in float32 (float64 for float64
    input). The shift carries its gradient: the result is differentiable in ``logits`` wherever
    the kept set does not change.

  Raises:
    ValueError: for an unknown method or parameter, an old parameter name (the message names the
      new one), a value out of range, a ``state`` for a method other than mirostat, or shapes that
      do not broadcast.
  """
  batch_shape = _batch_shape(logits, where)
  params, static = _split_static(_validate(method, params, batch_shape))
  state = _prepare_state(method, params, state, batch_shape)
  return _process_jit(logits, where, state, params, method=method, **static)


@functools.partial(jax.jit, static_argnames=("method", *_STATIC_PARAMS))
def _process_jit(logits, where, state, params, *, method, **static):
  d, valid = _rows(logits, where)
  return _process(d, valid, method, params | static, state)


def _renamed_guard(method: str):
  """Makes a helper answer an old parameter name with a ValueError that gives the new one."""

  def decorate(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      _reject_renamed(method, kwargs)
      return fn(*args, **kwargs)

    return wrapper

  return decorate


def entropy_logits(
  logits: ArrayLike,
  target_entropy: ArrayLike | None = None,
  *,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  where: ArrayLike | None = None,
  **removed,
) -> jax.Array:
  """Logits ``γ*·(z - max z)`` whose softmax has a prescribed entropy, for any sampler.

  γ* solves ``H(softmax(γ·z)) = target`` (:func:`entnorm_jax.solve_gamma`): the order of the logits
  is kept and nothing is truncated; only the temperature ``1/γ*`` of each row changes. Targets
  outside ``[log m, log n]`` (m ties at the maximum, n valid entries) are clamped. The result is
  differentiable: ``∂out_i/∂z_j = γ*(δ_ij - δ_ja) + (z_i - z_a) ∂γ*/∂z_j`` (a the argmax).

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    target_entropy: the target in nats; a scalar or per-row ``[...]`` array.
    target_fraction: the target as a fraction of each row's maximum entropy ``log n_valid``.
    min_entropy: a floor in nats (instead of an exact target; alone or with a ceiling).
    max_entropy: a ceiling in nats: rows already below it keep temperature 1.
    min_fraction: a floor as a fraction of ``log n_valid``.
    max_fraction: a ceiling as a fraction of ``log n_valid``.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits`` (float32 for integer or boolean logits), row
    max 0, ``-inf`` at masked entries.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> from entnorm_jax import sampling as ens
    >>> z = jnp.array([3.0, 1.0, 0.5, -2.0])
    >>> round(float(en.entropy(ens.entropy_logits(z, 1.0))), 4)
    1.0
  """
  targets.reject_removed(removed, "entropy_logits")
  return _helper_logits(
    logits, where, "entropy", target_entropy=target_entropy, target_fraction=target_fraction,
    min_entropy=min_entropy, max_entropy=max_entropy, min_fraction=min_fraction,
    max_fraction=max_fraction,
  )  # fmt: skip


def _helper_logits(logits, where, method, **params):
  """:func:`process_logits` in the dtype of ``logits`` (float32 for integer or boolean logits)."""
  out = process_logits(logits, method=method, where=where, **params)
  return out.astype(output_dtype(jnp.result_type(logits)))


@_renamed_guard("top_k")
def top_k_logits(
  logits: ArrayLike, top_k: int, *, temperature: ArrayLike = 1.0, where: ArrayLike | None = None
) -> jax.Array:
  """Logits after ``method="top_k"``: the ``top_k`` largest entries of each row (ties kept).

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    top_k: number of entries kept, a Python int ``>= 1`` (as Hugging Face's ``top_k``).
    temperature: divides the logits first; a scalar or per-row ``[...]`` array.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits`` (float32 for integer or boolean logits): row
    max 0, ``-inf`` where masked or cut.

  Raises:
    ValueError: for ``top_k < 1``, the old name ``k=``, or shapes that do not broadcast.
    TypeError: for a ``top_k`` that is not an int.
  """
  return _helper_logits(logits, where, "top_k", top_k=top_k, temperature=temperature)


@_renamed_guard("top_p")
def top_p_logits(
  logits: ArrayLike,
  top_p: ArrayLike,
  *,
  temperature: ArrayLike = 1.0,
  where: ArrayLike | None = None,
) -> jax.Array:
  """Logits after ``method="top_p"`` (nucleus): the fewest likeliest entries with mass ``>= top_p``.

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    top_p: the mass to keep, in ``(0, 1]`` (``1`` keeps every token); scalar or per-row ``[...]``.
    temperature: divides the logits first; a scalar or per-row ``[...]`` array.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits`` (float32 for integer or boolean logits): row
    max 0, ``-inf`` where masked or cut.

  Raises:
    ValueError: for a value out of range, the old name ``p=``, or shapes that do not broadcast.

  Examples:
    >>> import jax.numpy as jnp
    >>> from entnorm_jax import sampling as ens
    >>> ens.top_p_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), top_p=0.8) > -jnp.inf
    Array([ True,  True, False], dtype=bool)
  """
  return _helper_logits(logits, where, "top_p", top_p=top_p, temperature=temperature)


@_renamed_guard("min_p")
def min_p_logits(
  logits: ArrayLike,
  min_p: ArrayLike,
  *,
  temperature: ArrayLike = 1.0,
  where: ArrayLike | None = None,
) -> jax.Array:
  """Logits after ``method="min_p"``: the entries with ``p_i >= min_p · max p``.

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    min_p: in ``[0, 1]``; a scalar or per-row ``[...]`` array.
    temperature: divides the logits first; a scalar or per-row ``[...]`` array.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits`` (float32 for integer or boolean logits): row
    max 0, ``-inf`` where masked or cut.

  Raises:
    ValueError: for a value out of range, the old name ``p=``, or shapes that do not broadcast.
  """
  return _helper_logits(logits, where, "min_p", min_p=min_p, temperature=temperature)


@_renamed_guard("typical")
def typical_logits(
  logits: ArrayLike,
  typical_p: ArrayLike,
  *,
  temperature: ArrayLike = 1.0,
  where: ArrayLike | None = None,
) -> jax.Array:
  """Logits after ``method="typical"``: the entries nearest ``-log p_i = H(p)`` up to ``typical_p``.

  Entries are taken by increasing ``|-log p_i - H(p)|`` until their mass reaches ``typical_p``
  (Meister et al., 2023; Hugging Face's ``TypicalLogitsWarper``); the argmax is not forced in.

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    typical_p: the mass to keep, in ``(0, 1]``; a scalar or per-row ``[...]`` array.
    temperature: divides the logits first; a scalar or per-row ``[...]`` array.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits`` (float32 for integer or boolean logits):
    shifted so the row's largest *logit* is 0 (even if cut), ``-inf`` where masked or cut.

  Raises:
    ValueError: for a value out of range, the old name ``p=``, or shapes that do not broadcast.
  """
  return _helper_logits(logits, where, "typical", typical_p=typical_p, temperature=temperature)


@_renamed_guard("eta")
def eta_logits(
  logits: ArrayLike,
  eta_cutoff: ArrayLike,
  *,
  temperature: ArrayLike = 1.0,
  where: ArrayLike | None = None,
) -> jax.Array:
  """Logits after ``method="eta"``: entries with ``p_i >= min(η, sqrt(η) e^{-H(p)})``.

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    eta_cutoff: η in ``(0, 1)`` (Hugging Face's ``eta_cutoff``); scalar or per-row ``[...]``.
    temperature: divides the logits first; a scalar or per-row ``[...]`` array.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits`` (float32 for integer or boolean logits): row
    max 0, ``-inf`` where masked or cut.

  Raises:
    ValueError: for a value out of range, the old name ``epsilon=``, or shapes that do not
      broadcast.
  """
  return _helper_logits(logits, where, "eta", eta_cutoff=eta_cutoff, temperature=temperature)


def sample(
  key: jax.Array,
  logits: ArrayLike,
  *,
  method: str = "entropy",
  where: ArrayLike | None = None,
  **params,
) -> jax.Array:
  """Draws one token per row of ``logits`` with the chosen sampler; pure and jit-able.

  Parameters by method (scalars, or per-row arrays broadcastable to ``logits.shape[:-1]``), named
  as in Hugging Face's ``GenerationConfig`` and llama.cpp:

  * ``"entropy"``: ``target_entropy`` (nats), ``target_fraction`` (a fraction of log n_valid) or
    ``perplexity`` (``= e^target``, "as if choosing among k equally likely tokens"); or bounds
    instead: ``max_entropy`` / ``max_fraction`` (a ceiling: only ever lower the entropy, rows
    already below it keep temperature 1), ``min_entropy`` / ``min_fraction`` (a floor); and
    ``num_iters`` (solver iterations; ``None`` for the core's default).
  * ``"temperature"``: ``temperature > 0``.  ``"greedy"``: none.
  * ``"top_k"``: int ``top_k >= 1``;  ``"top_p"``: ``top_p`` in (0, 1];  ``"min_p"``: ``min_p``
    in [0, 1];  ``"typical"``: ``typical_p`` in (0, 1];  ``"eta"``: ``eta_cutoff`` in (0, 1);
    each with an optional ``temperature`` (default 1) applied first.
  * ``"mirostat"`` is stateful: use :func:`sample_mirostat` (or :func:`generate`).

  The names this module used before (``k``, ``p``, ``epsilon``, ``tau``, ``eta``, and the entropy
  method's ``relative`` and ``ceiling``) are rejected with a ValueError that gives the new one.

  Args:
    key: a PRNG key (one for the whole batch).
    logits: ``[..., n]`` logits (bf16/f16/f32/f64); ``-inf`` entries are never drawn.
    method: the sampler (see above).
    where: optional boolean mask broadcastable to ``logits`` (banned tokens, padded vocabulary).
    **params: the method's parameters.

  Returns:
    int32 tokens of shape ``logits.shape[:-1]``, for every method.

  Raises:
    ValueError: for an unknown method or parameter, an old parameter name, ``"mirostat"``, both
      or neither of ``target_entropy`` and ``perplexity``, a value out of range (checked when not
      traced), or bad shapes.
    TypeError: for a non-integer ``top_k``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from entnorm_jax import sampling as ens
    >>> z = jax.random.normal(jax.random.key(0), (4, 100))
    >>> ens.sample(jax.random.key(1), z, method="top_p", top_p=0.9, temperature=0.7).shape
    (4,)
  """
  if method == "mirostat":
    raise ValueError(
      "method 'mirostat' carries a state from step to step: call "
      "sample_mirostat(key, logits, state, mirostat_tau=...), which returns (tokens, state), "
      "or generate(..., method='mirostat')"
    )
  batch_shape = _batch_shape(logits, where)
  params, static = _split_static(_validate(method, params, batch_shape))
  tokens, _ = _sample_jit(key, logits, where, None, params, method=method, **static)
  return tokens


@_renamed_guard("mirostat")
def sample_mirostat(
  key: jax.Array,
  logits: ArrayLike,
  state: MirostatState | None,
  *,
  mirostat_tau: ArrayLike,
  mirostat_eta: ArrayLike = 0.1,
  temperature: ArrayLike = 1.0,
  where: ArrayLike | None = None,
) -> tuple[jax.Array, MirostatState]:
  """One step of Mirostat v2: draws a token per row and returns the updated state.

  The entries with surprise ``-log2 p_i > μ`` are cut (the most likely one is always kept, as in
  llama.cpp), a token x is drawn from the renormalized rest q, and
  ``μ ← μ - mirostat_eta·(-log2 q(x) - mirostat_tau)``.

  Args:
    key: a PRNG key (one for the whole batch).
    logits: ``[..., n]`` logits; ``-inf`` entries are never drawn.
    state: the :class:`MirostatState` of the previous step, or ``None`` to start at
      ``μ = 2·mirostat_tau`` (:func:`mirostat_init`).
    mirostat_tau: target surprise τ in bits, ``> 0``; scalar or per-row ``[...]``.
    mirostat_eta: learning rate η ``>= 0`` (default 0.1); scalar or per-row ``[...]``.
    temperature: divides the logits first; scalar or per-row ``[...]``.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``(tokens, state)``: int32 tokens of shape ``logits.shape[:-1]`` and the new
    :class:`MirostatState`.

  Raises:
    ValueError: for a value out of range, the old names ``tau=``/``eta=``, or bad shapes.

  Examples:
    >>> import jax
    >>> from entnorm_jax import sampling as ens
    >>> z = jax.random.normal(jax.random.key(0), (4, 100))
    >>> tokens, state = ens.sample_mirostat(jax.random.key(1), z, None, mirostat_tau=3.0)
    >>> tokens.shape, state.mu.shape
    ((4,), (4,))
  """
  batch_shape = _batch_shape(logits, where)
  params = dict(mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, temperature=temperature)
  params = _validate("mirostat", params, batch_shape)
  state = _prepare_state("mirostat", params, state, batch_shape)
  return _sample_jit(key, logits, where, state, params, method="mirostat")


def _draw(key, d, valid, state, params, method):
  """One step: (tokens, processed logits, entropy of the sampled distribution, new state)."""
  processed = _process(d, valid, method, params, state)
  tokens = jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
  if method == "mirostat":
    state = _mirostat_update(state, processed, tokens, params)
  return tokens, processed, _entropy(processed), state


@functools.partial(jax.jit, static_argnames=("method", *_STATIC_PARAMS))
def _sample_jit(key, logits, where, state, params, *, method, **static):
  d, valid = _rows(logits, where)
  tokens, _, _, state = _draw(key, d, valid, state, params | static, method)
  return tokens, state


def generate(
  key: jax.Array,
  step_fn: Callable[[Any, jax.Array], tuple[ArrayLike, Any]],
  init_state: Any,
  prompt_tokens: ArrayLike,
  max_new_tokens: int,
  *,
  method: str = "entropy",
  where: ArrayLike | None = None,
  sampler_state: MirostatState | None = None,
  **params,
) -> Generation:
  """Autoregressive decoding as one ``lax.scan`` around a model step function.

  ``step_fn(state, tokens) -> (logits, state)`` feeds one token per row (``tokens``: int32
  ``[batch]``) and returns the next-token logits ``[batch, n]``; ``state`` is any pytree (an RNN
  carry, a KV cache). The prompt is fed token by token; then each step draws a token with
  ``method`` (any of :func:`sample`'s, and ``"mirostat"``, whose state is carried through the
  scan) and feeds it back. Jit the call (``jax.jit`` over a closure) to reuse the compiled loop.

  Args:
    key: PRNG key; step t uses the t-th of ``jax.random.split(key, max_new_tokens)``.
    step_fn: the model step (a pure function).
    init_state: the model state before the prompt.
    prompt_tokens: int ``[batch, P]`` with ``P >= 1``.
    max_new_tokens: number of tokens to generate (static).
    method: the sampler (see :func:`sample`; ``"mirostat"`` as in :func:`sample_mirostat`).
    where: optional mask broadcastable to ``[batch, n]`` applied at every step.
    sampler_state: initial :class:`MirostatState` (``"mirostat"`` only; default
      ``μ = 2·mirostat_tau``).
    **params: the sampler's parameters (``top_p=``, ``mirostat_tau=``, ...; see :func:`sample`).

  Returns:
    A :class:`Generation` with the tokens, the model's log-probabilities of them, the entropy of
    each sampling distribution, and the final model and sampler states.

  Raises:
    ValueError: for a prompt that is not ``[batch, P]`` with P >= 1, a negative
      ``max_new_tokens``, or bad sampler parameters.
  """
  prompt = jnp.asarray(prompt_tokens)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens must have shape [batch, P] with P >= 1, got {prompt.shape}")
  if operator.index(max_new_tokens) < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  batch_shape = prompt.shape[:1]
  params, static = _split_static(_validate(method, params, batch_shape))
  sampler_state = _prepare_state(method, params, sampler_state, batch_shape)
  return _generate_jit(
    key,
    init_state,
    prompt,
    where,
    sampler_state,
    params,
    step_fn=step_fn,
    max_new_tokens=max_new_tokens,
    method=method,
    **static,
  )


@functools.partial(
  jax.jit, static_argnames=("step_fn", "max_new_tokens", "method", *_STATIC_PARAMS)
)
def _generate_jit(
  key,
  init_state,
  prompt,
  where,
  sampler_state,
  params,
  *,
  step_fn,
  max_new_tokens,
  method,
  **static,
):
  def feed(state, tokens):
    _, state = step_fn(state, tokens)
    return state, None

  state, _ = jax.lax.scan(feed, init_state, prompt[:, :-1].T.astype(jnp.int32))
  logits, state = step_fn(state, prompt[:, -1].astype(jnp.int32))
  logits = jnp.asarray(logits)
  if logits.shape[:-1] != prompt.shape[:1]:
    raise ValueError(f"step_fn returned logits of shape {logits.shape}; expected [batch, n]")
  if where is not None:
    where = jnp.broadcast_to(jnp.asarray(where, bool), logits.shape)

  def body(carry, step_key):
    logits, state, sampler_state = carry
    d, valid = _rows(logits, where)
    tokens, _, entropy, sampler_state = _draw(
      step_key, d, valid, sampler_state, params | static, method
    )
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], axis=-1)[:, 0]
    logits, state = step_fn(state, tokens)
    return (jnp.asarray(logits, d.dtype), state, sampler_state), (tokens, log_p, entropy)

  keys = jax.random.split(key, max_new_tokens)
  carry = (logits.astype(compute_dtype(logits.dtype)), state, sampler_state)
  (_, state, sampler_state), (tokens, log_probs, entropies) = jax.lax.scan(body, carry, keys)
  return Generation(tokens.T, log_probs.T, entropies.T, state, sampler_state)

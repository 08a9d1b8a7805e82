"""Next-token sampling: entropy normalization and the samplers people use, over a batch of rows.

Every method maps a row of logits ``z`` (last axis, ``n`` entries, masked entries excluded) to the
logits of the distribution a token is drawn from; :func:`sample` draws from it and :func:`generate`
runs the decoding loop. With ``p = softmax(z)``, ``H(p)`` its entropy and ``d = z - max z``:

* ``"entropy"``: ``softmax(γ*·z)`` with ``H = target`` (``perplexity=k`` means ``target = log k``),
  γ* from the core solver: no truncation, the same entropy at every step. With ``ceiling=True`` the
  target is an upper bound, ``softmax(max(γ*, 1)·z)``: confident rows are left as they are.
* ``"temperature"``: ``softmax(z / T)``;  ``"greedy"``: the argmax.
* ``"top_k"``: the ``k`` largest logits;  ``"top_p"``: the smallest prefix of the sorted
  distribution holding mass ``>= p`` (Holtzman et al., 2020);  ``"min_p"``: entries with
  ``p_i >= p · max p``;  ``"typical"``: the entries closest to ``-log p_i = H(p)`` up to mass
  ``>= p`` (Meister et al., 2023);  ``"eta"``: entries with ``p_i >= min(ε, sqrt(ε) e^{-H(p)})``
  (Hewitt et al., 2022). Each keeps the argmax and is renormalized; ``temperature`` (default 1) is
  applied before the truncation.
* ``"mirostat"`` (v2, Basu et al., 2021): entries with surprise ``-log2 p_i <= μ``; after drawing
  x, ``μ ← μ - η (-log2 q(x) - τ)`` with q the truncated distribution. μ is carried explicitly in a
  :class:`MirostatState`, so the loop stays a pure ``lax.scan``.

Ties at a cut-off are kept together (a top-k row with ties may keep more than k entries).
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

from entnorm_jax._src.functions import solve_gamma
from entnorm_jax._src.moments import shift_rows

# method -> (required parameters, optional parameters with defaults)
_METHODS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
  "entropy": (
    (),
    {
      "target_entropy": None,
      "perplexity": None,
      "relative": False,
      "ceiling": False,
      "num_iters": None,
    },
  ),
  "temperature": (("temperature",), {}),
  "greedy": ((), {}),
  "top_k": (("k",), {"temperature": 1.0}),
  "top_p": (("p",), {"temperature": 1.0}),
  "min_p": (("p",), {"temperature": 1.0}),
  "typical": (("p",), {"temperature": 1.0}),
  "eta": (("epsilon",), {"temperature": 1.0}),
  "mirostat": (("tau",), {"eta": 0.1, "temperature": 1.0}),
}
_STATIC_PARAMS = ("k", "relative", "ceiling", "num_iters")
_LN2 = math.log(2.0)


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


def mirostat_init(tau: ArrayLike, batch_shape: tuple[int, ...] = ()) -> MirostatState:
  """The usual initial Mirostat state, ``μ = 2τ`` (τ in bits), broadcast to ``batch_shape``."""
  tau = jnp.asarray(tau, jnp.float32)
  return MirostatState(jnp.broadcast_to(2.0 * tau, batch_shape))


# ----------------------------------------------------------------------------------- validation


def _concrete(x) -> np.ndarray | None:
  """The value of ``x`` as NumPy, or ``None`` under a trace (values are checked outside jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x, dtype=np.float64)


def _check_range(
  method: str, name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool
) -> None:
  v = _concrete(value)
  if v is None:
    return
  low_bad = v <= lo if lo_open else v < lo
  high_bad = v >= hi if hi_open else v > hi
  if np.any(low_bad | high_bad | np.isnan(v)):
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"method {method!r}: {name} must lie in {interval}, got {value!r}")


def _validate(method: str, params: dict[str, Any], batch_shape: tuple[int, ...]) -> dict[str, Any]:
  """Checks names and (concrete) values of the parameters; returns them with defaults filled in."""
  if method not in _METHODS:
    raise ValueError(f"unknown sampling method {method!r}; choose one of {sorted(_METHODS)}")
  required, optional = _METHODS[method]
  allowed = set(required) | set(optional)
  unknown = sorted(set(params) - allowed)
  if unknown:
    raise ValueError(
      f"method {method!r} got unexpected parameter(s) {unknown}; it accepts {sorted(allowed)}"
    )
  missing = [name for name in required if name not in params]
  if missing:
    raise ValueError(f"method {method!r} needs parameter(s) {missing}")
  params = {**optional, **params}
  for name, value in params.items():
    if name in _STATIC_PARAMS or value is None:
      continue
    shape = np.shape(value)
    if np.broadcast_shapes(shape, batch_shape) != tuple(batch_shape):
      raise ValueError(
        f"{name} of shape {shape} does not broadcast to the batch shape {tuple(batch_shape)} "
        "(logits' shape without the vocabulary axis)"
      )
  if method == "entropy":
    given = [n for n in ("target_entropy", "perplexity") if params[n] is not None]
    if len(given) != 1:
      raise ValueError(
        "method 'entropy' needs exactly one of target_entropy= (nats) or perplexity= "
        f"(= exp(target)), got {given or 'neither'}"
      )
    if params["perplexity"] is not None:
      _check_range(method, "perplexity", params["perplexity"], 1.0, math.inf, False, True)
    elif params["relative"]:
      _check_range(
        method, "target_entropy (relative)", params["target_entropy"], 0.0, 1.0, False, False
      )
    else:
      _check_range(method, "target_entropy", params["target_entropy"], 0.0, math.inf, False, True)
  if "temperature" in params:
    _check_range(method, "temperature", params["temperature"], 0.0, math.inf, True, True)
  if method == "top_k":
    k = params["k"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise TypeError(f"k must be a Python int (it sets a static shape), got {k!r}")
    if k < 1:
      raise ValueError(f"method 'top_k': k must be >= 1, got {k}")
  if method in ("top_p", "typical"):
    _check_range(method, "p", params["p"], 0.0, 1.0, True, False)
  if method == "min_p":
    _check_range(method, "p", params["p"], 0.0, 1.0, False, False)
  if method == "eta":
    _check_range(method, "epsilon", params["epsilon"], 0.0, 1.0, True, True)
  if method == "mirostat":
    _check_range(method, "tau", params["tau"], 0.0, math.inf, True, True)
    _check_range(method, "eta", params["eta"], 0.0, math.inf, False, True)
  return params


# ------------------------------------------------------------------------------ row transforms


def _batch_shape(logits: ArrayLike, where: ArrayLike | None) -> tuple[int, ...]:
  """The batch shape ``logits.shape[:-1]``, after checking the shapes of logits and mask."""
  shape = np.shape(logits)
  if len(shape) < 1:
    raise ValueError(f"logits must have a vocabulary axis, got shape {shape}")
  if where is not None:
    mask_shape = np.shape(where)
    try:
      broadcast = np.broadcast_shapes(mask_shape, shape)
    except ValueError:
      broadcast = None
    if broadcast != tuple(shape):
      raise ValueError(f"where of shape {mask_shape} does not broadcast to logits of shape {shape}")
  return tuple(shape[:-1])


def _rows(logits: ArrayLike, where: ArrayLike | None) -> tuple[jax.Array, jax.Array]:
  """Shifted logits ``d = z - max z`` (float32 or float64; ``-inf`` where masked) and the mask."""
  z = jnp.asarray(logits)
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  valid = z != -jnp.inf
  if where is not None:
    valid = valid & jnp.broadcast_to(jnp.asarray(where), z.shape).astype(bool)
  d, _ = shift_rows(z, valid)
  return jnp.where(valid, d, -jnp.inf), valid


def _param(value, d: jax.Array) -> jax.Array:
  """A per-row parameter as ``[..., 1]`` in the compute dtype."""
  return jnp.broadcast_to(jnp.asarray(value, d.dtype), d.shape[:-1])[..., None]


def _log_softmax(d: jax.Array) -> jax.Array:
  return d - jax.nn.logsumexp(d, axis=-1, keepdims=True)


def _entropy(d: jax.Array) -> jax.Array:
  """Entropy (nats) of softmax(d) over the finite entries of each row."""
  log_p = _log_softmax(d)
  finite = jnp.isfinite(log_p)
  return -jnp.sum(jnp.where(finite, jnp.exp(log_p) * log_p, 0.0), axis=-1)


def _keep(d: jax.Array, keep: jax.Array) -> jax.Array:
  return jnp.where(keep | (d == 0), d, -jnp.inf)  # d == 0 is the argmax: always kept


def _entropy_d(d, valid, target_entropy, perplexity, relative, ceiling, num_iters):
  target = jnp.log(perplexity) if perplexity is not None else target_entropy
  gamma = solve_gamma(d, target, where=valid, relative=relative, num_iters=num_iters)
  if ceiling:  # H falls with γ: γ* < 1 exactly when the row is already below the target
    gamma = jnp.maximum(gamma, 1.0)
  return jnp.where(valid, gamma[..., None] * d, -jnp.inf)


def _top_k_d(d, k):
  kth = jax.lax.top_k(d, min(k, d.shape[-1]))[0][..., -1:]
  return _keep(d, d >= kth)


def _smallest_set(score, d, mass):
  """Keeps the entries of smallest ``score`` whose probability mass first reaches ``mass``."""
  p = jnp.exp(_log_softmax(d))
  score = jnp.where(jnp.isfinite(d), score, jnp.inf)
  sorted_score, sorted_p = jax.lax.sort((score, p), dimension=-1, num_keys=1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each sorted entry
  count = jnp.sum(before < mass, axis=-1, keepdims=True)
  cut = jnp.take_along_axis(sorted_score, jnp.maximum(count, 1) - 1, axis=-1)
  return _keep(d, score <= cut)


def _top_p_d(d, p):
  return _smallest_set(-d, d, _param(p, d))


def _typical_d(d, p):
  surprise = -_log_softmax(d)
  score = jnp.abs(surprise - _entropy(d)[..., None])
  return _smallest_set(score, d, _param(p, d))


def _min_p_d(d, p):
  return _keep(d, d >= jnp.log(_param(p, d)))  # d = log(p_i / max p)


def _eta_d(d, epsilon):
  log_eps = jnp.log(_param(epsilon, d))
  log_eta = jnp.minimum(log_eps, 0.5 * log_eps - _entropy(d)[..., None])
  return _keep(d, _log_softmax(d) >= log_eta)


def _mirostat_d(d, mu):
  surprise_bits = -_log_softmax(d) / _LN2
  return _keep(d, surprise_bits <= mu.astype(d.dtype)[..., None])


def _process(d, valid, method, params, state):
  """The logits each token is drawn from (``-inf`` where cut), in the compute dtype."""
  if method == "entropy":
    return _entropy_d(
      d,
      valid,
      params["target_entropy"],
      params["perplexity"],
      params["relative"],
      params["ceiling"],
      params["num_iters"],
    )
  if method == "greedy":
    return _keep(d, jnp.zeros(d.shape, bool))
  d = d / _param(params["temperature"], d)
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
  error = -log_q / _LN2 - jnp.asarray(params["tau"], log_q.dtype)
  return MirostatState(state.mu - jnp.asarray(params["eta"], log_q.dtype) * error)


def _prepare_state(method, params, state, batch_shape):
  if method != "mirostat":
    return None
  if state is None:
    return mirostat_init(params["tau"], batch_shape)
  return MirostatState(jnp.broadcast_to(jnp.asarray(state.mu, jnp.float32), batch_shape))


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
    state: the :class:`MirostatState` for ``"mirostat"`` (``None``: ``μ = 2τ``).
    **params: the method's parameters (see :func:`sample`), scalars or per-row arrays.

  Returns:
    ``[..., n]`` logits shifted so each row's maximum is 0, ``-inf`` where an entry is masked or
    cut, in float32 (float64 for float64 input).

  Raises:
    ValueError: for an unknown method or parameter, a value out of range, or shapes that do not
      broadcast.
  """
  batch_shape = _batch_shape(logits, where)
  params = _validate(method, params, batch_shape)
  static = {n: params.pop(n) for n in _STATIC_PARAMS if n in params}
  state = _prepare_state(method, params, state, batch_shape)
  return _process_jit(logits, where, state, params, method=method, **static)


@functools.partial(jax.jit, static_argnames=("method", *_STATIC_PARAMS))
def _process_jit(logits, where, state, params, *, method, **static):
  d, valid = _rows(logits, where)
  return _process(d, valid, method, params | static, state)


def entropy_logits(
  logits: ArrayLike,
  target_entropy: ArrayLike,
  *,
  relative: bool = False,
  where: ArrayLike | None = None,
) -> jax.Array:
  """Logits ``γ*·(z - max z)`` whose softmax has entropy ``target_entropy``, for any sampler.

  γ* solves ``H(softmax(γ·z)) = target`` (:func:`entnorm_jax.solve_gamma`): the order of the logits
  is kept and nothing is truncated; only the temperature ``1/γ*`` of each row changes. Targets
  outside ``[log m, log n]`` (m ties at the maximum, n valid entries) are clamped.

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    target_entropy: nats (or a fraction of ``log n_valid`` with ``relative=True``); a scalar or
      per-row ``[...]`` array.
    relative: read the target as a fraction of each row's maximum entropy.
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits`` (row max 0, ``-inf`` at masked entries).

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> from entnorm_jax import sampling as ens
    >>> z = jnp.array([3.0, 1.0, 0.5, -2.0])
    >>> round(float(en.entropy(ens.entropy_logits(z, 1.0))), 4)
    1.0
  """
  out = process_logits(
    logits, method="entropy", where=where, target_entropy=target_entropy, relative=relative
  )
  return out.astype(_output_dtype(logits))


def _output_dtype(logits):
  dtype = jnp.result_type(logits)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _helper(method: str, name: str):
  def helper(logits: ArrayLike, value, *, where: ArrayLike | None = None) -> jax.Array:
    out = process_logits(logits, method=method, where=where, **{name: value})
    return out.astype(_output_dtype(logits))

  helper.__name__ = helper.__qualname__ = f"{method}_logits"
  helper.__doc__ = f"""Logits after ``method={method!r}`` with ``{name}=value`` (temperature 1).

  Args:
    logits: ``[..., n]`` logits; ``-inf`` entries are masked.
    value: ``{name}``, a scalar or per-row ``[...]`` array (see :func:`sample`).
    where: optional boolean mask broadcastable to ``logits``.

  Returns:
    ``[..., n]`` logits in the dtype of ``logits``: row max 0, ``-inf`` where masked or cut.

  Raises:
    ValueError: for a value out of range or shapes that do not broadcast.
  """
  return helper


top_k_logits = _helper("top_k", "k")
top_p_logits = _helper("top_p", "p")
min_p_logits = _helper("min_p", "p")
typical_logits = _helper("typical", "p")
eta_logits = _helper("eta", "epsilon")


def sample(
  key: jax.Array,
  logits: ArrayLike,
  *,
  method: str = "entropy",
  where: ArrayLike | None = None,
  state: MirostatState | None = None,
  **params,
):
  """Draws one token per row of ``logits`` with the chosen sampler; pure and jit-able.

  Parameters by method (scalars, or per-row arrays broadcastable to ``logits.shape[:-1]``):

  * ``"entropy"``: ``target_entropy`` (nats) or ``perplexity`` (``= e^target``, "as if choosing
    among k equally likely tokens"), optional ``relative`` (target as a fraction of log n_valid),
    ``ceiling`` (only ever lower the entropy: rows already below the target keep temperature 1)
    and ``num_iters`` (solver iterations; ``None`` for the core's default).
  * ``"temperature"``: ``temperature > 0``.  ``"greedy"``: none.
  * ``"top_k"``: int ``k >= 1``;  ``"top_p"``: ``p`` in (0, 1];  ``"min_p"``: ``p`` in [0, 1];
    ``"typical"``: ``p`` in (0, 1];  ``"eta"``: ``epsilon`` in (0, 1); each with an optional
    ``temperature`` applied first.
  * ``"mirostat"``: ``tau`` (target surprise, bits), ``eta`` (learning rate, default 0.1),
    optional ``temperature``; pass the running ``state`` (``None`` starts at ``μ = 2τ``).

  Args:
    key: a PRNG key (one for the whole batch).
    logits: ``[..., n]`` logits (bf16/f16/f32/f64); ``-inf`` entries are never drawn.
    method: the sampler (see above).
    where: optional boolean mask broadcastable to ``logits`` (banned tokens, padded vocabulary).
    state: :class:`MirostatState` for ``"mirostat"``; ignored otherwise.
    **params: the method's parameters.

  Returns:
    int32 tokens of shape ``logits.shape[:-1]``; for ``"mirostat"`` the pair
    ``(tokens, new_state)``.

  Raises:
    ValueError: for an unknown method or parameter, both or neither of ``target_entropy`` and
      ``perplexity``, a value out of range (checked when not traced), or bad shapes.
    TypeError: for a non-integer ``k``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from entnorm_jax import sampling as ens
    >>> z = jax.random.normal(jax.random.key(0), (4, 100))
    >>> ens.sample(jax.random.key(1), z, method="min_p", p=0.1).shape
    (4,)
  """
  batch_shape = _batch_shape(logits, where)
  params = _validate(method, params, batch_shape)
  static = {n: params.pop(n) for n in _STATIC_PARAMS if n in params}
  state = _prepare_state(method, params, state, batch_shape)
  tokens, new_state = _sample_jit(key, logits, where, state, params, method=method, **static)
  return (tokens, new_state) if method == "mirostat" else tokens


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
  :func:`sample`'s ``method`` and feeds it back. Jit the call (``jax.jit`` over a closure) to
  reuse the compiled loop.

  Args:
    key: PRNG key; step t uses the t-th of ``jax.random.split(key, max_new_tokens)``.
    step_fn: the model step (a pure function).
    init_state: the model state before the prompt.
    prompt_tokens: int ``[batch, P]`` with ``P >= 1``.
    max_new_tokens: number of tokens to generate (static).
    method: the sampler (see :func:`sample`).
    where: optional mask broadcastable to ``[batch, n]`` applied at every step.
    sampler_state: initial :class:`MirostatState` (``"mirostat"`` only; default ``μ = 2τ``).
    **params: the sampler's parameters (see :func:`sample`).

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
  params = _validate(method, params, batch_shape)
  static = {n: params.pop(n) for n in _STATIC_PARAMS if n in params}
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
  carry = (logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), state, sampler_state)
  (_, state, sampler_state), (tokens, log_probs, entropies) = jax.lax.scan(body, carry, keys)
  return Generation(tokens.T, log_probs.T, entropies.T, state, sampler_state)

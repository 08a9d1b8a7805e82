"""The implementation of :mod:`entnorm_jax.attention` (see its docstring for the semantics).

``entropy_attention`` checks its inputs and picks one of three engines: the dense reference
(:mod:`entnorm_jax._src.dense_attention`), the blockwise engine
(:mod:`entnorm_jax._src.blockwise_attention`) or the Pallas kernels
(:mod:`entnorm_jax._src.pallas_attention`); ``context_parallel_attention`` runs the blockwise engine
under ``shard_map`` with keys and values split over a mesh axis. ``_entropy_attention`` is the
jitted entry the Flax modules call for their kernel path.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from entnorm_jax._src import pallas_attention, targets
from entnorm_jax._src.blockwise_attention import (
  BLOCKWISE,
  AttentionConfig,
  Engine,
  RowResiduals,
  attention_vjp,
)
from entnorm_jax._src.dense_attention import dense_attention
from entnorm_jax._src.inputs import broadcasts, check_num_iters, check_qkv, compute_dtype
from entnorm_jax._src.pallas_attention import PALLAS, pallas_block_size
from entnorm_jax._src.targets import Spec

_IMPLEMENTATIONS = ("xla", "blockwise", "pallas")
_BLOCKWISE_BLOCKS = (256, 256)


def _check_qkv(q, k, v):
  """:func:`entnorm_jax._src.inputs.check_qkv` for ``[batch, seq, heads, dim]`` inputs whose
  values have the depth of the queries."""
  if q.ndim != 4 or v.shape[-1:] != q.shape[-1:]:
    raise ValueError(
      f"q, k, v must be [batch, seq, heads, dim], v with the dim of q; got shapes {q.shape}, "
      f"{k.shape}, {v.shape}"
    )
  check_qkv(q, k, v)


def _mask4(mask, full):
  """A boolean mask broadcastable to ``full`` as 4-D, each axis of size 1 or full."""
  mask = jnp.asarray(mask)
  if mask.ndim > 4 or mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean with at most 4 axes, got {mask.dtype}{mask.shape}")
  if not broadcasts(mask.shape, full):
    raise ValueError(f"mask of shape {mask.shape} does not broadcast to {full}")
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _valid_positions(lengths, batch: int, size: int, name: str):
  if lengths is None:
    return jnp.ones((batch, size), bool)
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
      f"{name} must be integers of shape ({batch},), got {lengths.dtype}{lengths.shape}"
    )
  return jnp.arange(size)[None, :] < lengths[:, None]


def _prepare(q, k, v, target, spec, mask, scale, num_iters, q_lengths, kv_lengths):
  """Checked inputs: ``(q, k, v, target [B, H, Q], q_ok [B, Q], k_ok [B, K], mask, scale)``."""
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check_qkv(q, k, v)
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
  check_num_iters(num_iters)
  # each a scalar, [heads], or broadcastable to [batch, heads, q_len] ([..., 2] for bounds)
  dtype = compute_dtype(q.dtype)
  target = targets.per_row(target, spec, (batch, heads, q_len), dtype, heads=heads)
  if mask is not None:
    mask = _mask4(mask, (batch, heads, q_len, kv_len))
  q_ok = _valid_positions(q_lengths, batch, q_len, "query_seq_lengths")
  k_ok = _valid_positions(kv_lengths, batch, kv_len, "key_value_seq_lengths")
  return q, k, v, target, q_ok, k_ok, mask, scale


def _precision(precision) -> jax.lax.Precision | None:
  """``None`` (JAX's default) or a ``jax.lax.Precision`` (from one, or a name such as
  ``"highest"``)."""
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  try:
    return jax.lax.Precision(precision)
  except (ValueError, TypeError) as e:
    raise ValueError(f"precision must be None or a jax.lax.Precision, got {precision!r}") from e


def _block_size(value, default: int, length: int, implementation: str, name: str) -> int:
  if value is not None and operator.index(value) <= 0:
    raise ValueError(f"{name} must be a positive int, got {value}")
  size = default if value is None else operator.index(value)
  if implementation == "pallas":
    return pallas_block_size(size, length, name)
  return min(size, length)


def _config(spec: Spec, lengths, implementation: str, defaults, *, block_q, block_k, **settings):
  """The engines' static :class:`AttentionConfig`: the unit flag(s) of ``spec`` (one, or a (floor,
  ceiling) pair for bounds), the block sizes checked and fitted to ``lengths`` (``(q_len,
  kv_len)``; ``defaults`` where ``None``), and the other ``settings`` as given."""
  (q_len, kv_len), (default_q, default_k) = lengths, defaults
  return AttentionConfig(
    relative=spec.fraction if spec.bounded else spec.fraction[0],
    block_q=_block_size(block_q, default_q, q_len, implementation, "block_q"),
    block_k=_block_size(block_k, default_k, kv_len, implementation, "block_k"),
    **settings,
  )


# The statics both entry points share (shape and settings of the computation).
_STATIC = ("spec", "is_causal", "scale", "block_q", "block_k", "num_iters", "precision")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "implementation", "interpret"))
def _entropy_attention(
  q, k, v, target, *, spec, mask, is_causal, scale, implementation, block_q, block_k, interpret,
  num_iters, query_seq_lengths, key_value_seq_lengths, precision,
):  # fmt: skip
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
  q, k, v, target, q_ok, k_ok, mask, scale = _prepare(
    q, k, v, target, spec, mask, scale, num_iters, query_seq_lengths, key_value_seq_lengths
  )
  q_len, kv_len = q.shape[1], k.shape[1]
  precision = _precision(precision)
  if implementation == "xla":
    return dense_attention(
        q, k, v, target, q_ok, k_ok, mask,
        is_causal=is_causal, scale=scale, spec=spec, num_iters=num_iters,
        precision=precision,
    )  # fmt: skip
  default_q, default_k, warps, stages = _BLOCKWISE_BLOCKS + (4, 2)
  if implementation == "pallas":
    shape = pallas_attention.gpu_shape(q.dtype, q.shape[3], precision)
    if shape is None:  # no shape of the kernels compiles without spilling: the blockwise engine
      implementation = "blockwise"
    else:
      default_q, default_k, warps, stages = shape
  cfg = _config(
    spec, (q_len, kv_len), implementation, (default_q, default_k), block_q=block_q,
    block_k=block_k, is_causal=is_causal, scale=scale, num_iters=num_iters, precision=precision,
    interpret=None if interpret is None else bool(interpret), num_warps=warps, num_stages=stages,
  )  # fmt: skip
  engine = BLOCKWISE if implementation == "blockwise" else PALLAS
  return attention_vjp(engine, cfg, q, k, v, target, q_ok, k_ok, mask)


def entropy_attention(
  q: ArrayLike,
  k: ArrayLike,
  v: ArrayLike,
  *,
  target_entropy: ArrayLike | None = None,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  implementation: str = "xla",
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: bool | None = None,
  num_iters: int | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  precision: jax.lax.Precision | str | None = None,
  **removed,
) -> jax.Array:
  r"""Attention whose every row has a prescribed entropy (or an entropy within bounds).

  With scores ``s_ij = scale · q_i·k_j`` over the valid keys of row i,

    o_i = Σ_j P_ij v_j,    P_i = softmax(γ*_i s_i),    H(P_i) = clip(H_i, log m_i, log n_i),

  n_i the number of valid keys and m_i the number tied at the maximum (see
  :func:`entnorm_jax.solve_gamma`); ``H_i`` is ``target_entropy`` (nats) or ``target_fraction ·
  log n_i``. With bounds instead, a row whose ``H(softmax(s_i))`` lies inside them keeps
  ``P_i = softmax(s_i)`` (γ* = 1) and the others take the bound they cross as their target. γ* is
  differentiable by the implicit function theorem
  (``∂γ*/∂s_ij = -γ* P_ij (s_ij - E_P s) / Var_P s``), so gradients flow to q, k, v and the
  target. The blockwise and Pallas implementations never form the ``q_len × kv_len`` matrix, in
  the forward or the backward pass.

  Args:
    q: queries ``[batch, q_len, heads, dim]``.
    k: keys ``[batch, kv_len, kv_heads, dim]``; ``heads`` must be a multiple of ``kv_heads``
      (grouped-query attention: query head ``h`` uses key head ``h // (heads // kv_heads)``).
    v: values, the shape of ``k``.
    target_entropy: target entropy per row in nats: a scalar, ``[heads]``, or an array
      broadcastable to ``[batch, heads, q_len]``.
    target_fraction: the target as a fraction f in [0, 1] of each row's largest entropy,
      ``f · log(n_valid)``, shaped as ``target_entropy`` (instead of it). Name exactly one
      target, or bounds.
    min_entropy: a floor in nats, instead of an exact target (alone or with a ceiling).
    max_entropy: a ceiling in nats. Rows whose softmax entropy lies inside the bounds are plain
      softmax attention (with its gradient); the others are normalized to the bound they cross.
    min_fraction: a floor as a fraction of log(n_valid) (instead of ``min_entropy``).
    max_fraction: a ceiling as a fraction of log(n_valid) (instead of ``max_entropy``).
    mask: optional boolean mask broadcastable to ``[batch, heads, q_len, kv_len]``; True keeps
      a key. A padding mask ``[batch, 1, 1, kv_len]`` stays linear in memory in the blockwise
      and Pallas versions.
    is_causal: keep key j for query i only when j <= i (top-left aligned, as in
      ``jax.nn.dot_product_attention``).
    scale: score scale, default ``1/sqrt(dim)``.
    implementation: ``"xla"`` (dense reference), ``"blockwise"`` or ``"pallas"``.
    block_q: query block size; lengths need not divide it. Blockwise default 256; the Pallas
      default is chosen per dtype, head dim and precision from the kernels' measured registers
      (the largest blocks that compile without spilling: see the README's kernel table).
    block_k: key block size (defaults as ``block_q``).
    interpret: run the Pallas kernels in interpret mode; ``None`` (default) interprets them when
      the computation is lowered for a CPU and compiles them (Triton) when lowered for a GPU.
    num_iters: ``None`` (default) iterates until every row is on target; an int k runs exactly k
      Halley-type steps (static).
    query_seq_lengths: optional ``[batch]`` ints; query rows at or beyond it output zeros.
    key_value_seq_lengths: optional ``[batch]`` ints; keys at or beyond it are masked.
    precision: of the score and output matmuls (static). ``None`` follows JAX's default matmul
      precision, as ``jax.nn.dot_product_attention`` and XLA do: on NVIDIA GPUs float32 products
      run on TF32 tensor cores (10-bit mantissas: scores carry a relative error of about 1e-3,
      so outputs differ from float64 by ~1e-3 instead of ~1e-6), on CPUs they are full float32.
      ``jax.lax.Precision.HIGHEST`` (or ``"highest"``) asks for full float32 products. With
      ``implementation="pallas"``, full-precision float32 inputs, and head dims above 256, run
      the blockwise engine instead: no shape of the kernels with IEEE float32 ``dot``\ s compiles
      without spilling registers (see :data:`entnorm_jax._src.pallas_attention.GPU_SHAPES`).

  Returns:
    ``[batch, q_len, heads, dim]`` in the dtype of ``q``. Rows with no valid key are zeros.
    Statistics are kept in float32 for 16-bit inputs (float64 for float64).

  Raises:
    ValueError: for inconsistent shapes, a mask or target that does not broadcast, an unknown
      implementation, none or several targets, a concrete target with no meaning in its unit (a
      fraction outside [0, 1], negative nats; traced ones give NaN rows), or the removed
      ``relative=`` (the message names ``target_fraction=``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from entnorm_jax import attention as ena
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 40, 2, 8))
    >>> o = ena.entropy_attention(q, k, v, target_fraction=0.5, is_causal=True,
    ...                           implementation="blockwise", block_q=16, block_k=16)
    >>> o.shape
    (1, 40, 2, 8)
  """
  target, spec = targets.parse(
    "entropy_attention", removed=removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  return _entropy_attention(
    q, k, v, target, spec=spec, mask=mask, is_causal=is_causal, scale=scale,
    implementation=implementation, block_q=block_q, block_k=block_k, interpret=interpret,
    num_iters=num_iters, query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths, precision=precision,
  )  # fmt: skip


def _shard_map(body, mesh: Mesh, in_specs, out_specs):
  """``jax.shard_map`` of ``body``; on a mesh with ``Explicit`` axes (``jax.make_mesh``'s default)
  the arguments are first resharded to ``in_specs``, as ``shard_map`` requires there."""
  run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  explicit = jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ())
  if not explicit:
    return run

  def resharded(*args):
    put = lambda a, spec: jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, spec))
    return run(*jax.tree.map(put, args, tuple(in_specs[: len(args)])))

  return resharded


def _sharded_engine(mesh: Mesh, axis_name: str, mask_sharded: bool | None) -> Engine:
  """The blockwise engine with keys and values sharded along the sequence over ``axis_name``.

  Both passes run under ``shard_map``: queries, targets and per-row results are replicated, keys
  and values (and their validity and mask columns) are split along the sequence; inside, every
  per-row sum of the solver and of the output is combined with one ``psum`` (see
  :func:`entnorm_jax._src.blockwise_attention.combine`). The custom VJP sits outside the
  ``shard_map``, so nothing is differentiated through the collectives.
  """
  rep, seq = P(), P(None, axis_name)
  mask_spec = (
    () if mask_sharded is None else (P(None, None, None, axis_name) if mask_sharded else rep,)
  )

  def forward(cfg, q, k, v, target, q_ok, k_ok, mask):
    masks = () if mask is None else (mask,)
    body = lambda q, k, v, t, qo, ko, *m: BLOCKWISE.forward(
      cfg, q, k, v, t, qo, ko, *(m or (None,))
    )
    out_specs = (rep, rep, RowResiduals(*(rep for _ in RowResiduals._fields)))
    in_specs = (rep, seq, seq, rep, rep, seq, *mask_spec)
    return _shard_map(body, mesh, in_specs, out_specs)(q, k, v, target, q_ok, k_ok, *masks)

  def backward(cfg, q, k, v, q_ok, k_ok, mask, rows, coef, delta, d_out):
    masks = () if mask is None else (mask,)

    def body(q, k, v, qo, ko, rows, coef, delta, d_out, *m):
      return BLOCKWISE.backward(cfg, q, k, v, qo, ko, *(m or (None,)), rows, coef, delta, d_out)

    rows_spec = RowResiduals(*(rep for _ in RowResiduals._fields))
    in_specs = (rep, seq, seq, rep, seq, rows_spec, rep, rep, rep, *mask_spec)
    run = _shard_map(body, mesh, in_specs, (rep, seq, seq))
    return run(q, k, v, q_ok, k_ok, rows, coef, delta, d_out, *masks)

  return Engine(forward, backward)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "mesh", "axis_name"))
def _context_parallel_attention(
  q, k, v, target, *, mesh, axis_name, spec, mask, is_causal, scale, block_q, block_k,
  num_iters, query_seq_lengths, key_value_seq_lengths, precision,
):  # fmt: skip
  if axis_name not in mesh.shape:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
  q, k, v, target, q_ok, k_ok, mask, scale = _prepare(
    q, k, v, target, spec, mask, scale, num_iters, query_seq_lengths, key_value_seq_lengths
  )
  q_len, kv_len = q.shape[1], k.shape[1]
  shards = mesh.shape[axis_name]
  if kv_len % shards:
    raise ValueError(f"kv_len {kv_len} is not a multiple of the {shards} devices of {axis_name!r}")
  cfg = _config(
    spec, (q_len, kv_len // shards), "blockwise", _BLOCKWISE_BLOCKS, block_q=block_q,
    block_k=block_k, is_causal=is_causal, scale=scale, num_iters=num_iters,
    precision=_precision(precision), axis_name=axis_name,
  )  # fmt: skip
  mask_sharded = None if mask is None else mask.shape[3] > 1
  engine = _sharded_engine(mesh, axis_name, mask_sharded)
  return attention_vjp(engine, cfg, q, k, v, target, q_ok, k_ok, mask)


def context_parallel_attention(
  q: ArrayLike,
  k: ArrayLike,
  v: ArrayLike,
  *,
  mesh: Mesh,
  axis_name: str,
  target_entropy: ArrayLike | None = None,
  target_fraction: ArrayLike | None = None,
  min_entropy: ArrayLike | None = None,
  max_entropy: ArrayLike | None = None,
  min_fraction: ArrayLike | None = None,
  max_fraction: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  block_q: int | None = None,
  block_k: int | None = None,
  num_iters: int | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  precision: jax.lax.Precision | str | None = None,
  **removed,
) -> jax.Array:
  """:func:`entropy_attention` (blockwise) with the keys and values split along the sequence.

  Context parallelism for long sequences: the keys and values are sharded along their sequence
  axis over the mesh axis ``axis_name`` (with ``shard_map``), the queries are replicated. Each
  device accumulates the per-row sums of every solver pass over its share of the keys, and one
  ``psum`` per pass adds them up, so every query row gets the exact γ* of the whole sequence, and
  the output equals the one-device result. The backward pass is the blockwise one, sharded the
  same way (dq is summed over the devices; dk and dv stay on theirs).

  The target names its unit as in :func:`entropy_attention`: ``target_fraction=0.5`` asks for
  ``H = 0.5 · log(n_valid)`` in every row, ``target_entropy=1.5`` for 1.5 nats; entropy bounds
  work as there.

  Example (8 host devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``)::

    mesh = jax.make_mesh((8,), ("seq",))
    out = context_parallel_attention(q, k, v, mesh=mesh, axis_name="seq", target_fraction=0.5)

  Args:
    q, k, v, target_entropy, target_fraction, min_entropy, max_entropy, min_fraction,
      max_fraction, mask, is_causal, scale, block_q, block_k, num_iters,
      query_seq_lengths, key_value_seq_lengths, precision: as in :func:`entropy_attention`
      (``block_k`` applies to each device's share of the keys).
    mesh: a ``jax.sharding.Mesh`` holding ``axis_name``.
    axis_name: the mesh axis to split the sequence of keys and values over; ``kv_len`` must be a
      multiple of its size.

  Returns:
    ``[batch, q_len, heads, dim]`` in the dtype of ``q`` (replicated over ``axis_name``).

  Raises:
    ValueError: as :func:`entropy_attention`, and for an axis the mesh lacks or a sequence that
      the axis does not divide.
  """
  target, spec = targets.parse(
    "context_parallel_attention", removed=removed, target_entropy=target_entropy,
    target_fraction=target_fraction, min_entropy=min_entropy, max_entropy=max_entropy,
    min_fraction=min_fraction, max_fraction=max_fraction,
  )  # fmt: skip
  return _context_parallel_attention(
    q, k, v, target, mesh=mesh, axis_name=axis_name, spec=spec, mask=mask, is_causal=is_causal,
    scale=scale, block_q=block_q, block_k=block_k, num_iters=num_iters,
    query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
    precision=precision,
  )  # fmt: skip

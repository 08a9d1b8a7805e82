"""t-SNE input affinities: the perplexity calibration is an entropy-normalized softmax.

t-SNE (van der Maaten & Hinton, 2008) turns the squared distances ``d_ij`` from point i to its
neighbours into the conditional distribution

    p_{j|i} = exp(-β_i d_ij) / Σ_l exp(-β_i d_il),        β_i = 1 / (2 σ_i²),

and calibrates each precision β_i so that the row's perplexity ``exp(H(P_i))`` (H in nats; the
same number as ``2^H`` with H in bits) equals a user-chosen perplexity. That is exactly
``softmax(γ*·z)`` with ``z = -d`` and target entropy ``log(perplexity)``: β_i is γ*. scikit-learn
(``sklearn.manifold._utils._binary_search_perplexity``) and openTSNE find β_i by a per-row
bisection on ``exp(-β d)``; here the core solver finds it from the row's moments, on distances
shifted by the row minimum (so large distances cannot underflow), and the result is
differentiable in the distances and the perplexity by the implicit function theorem.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from entnorm_jax._src.functions import entropy_softmax
from entnorm_jax._src.inputs import broadcasts, check_where, compute_dtype, concrete


def _check_perplexity(perplexity, shape: tuple[int, ...]) -> None:
  """Static checks: ``perplexity`` broadcasts to the rows and (when concrete) lies in (1, k]."""
  batch, k = shape[:-1], shape[-1]
  p_shape = np.shape(perplexity)
  if not broadcasts(p_shape, batch):
    raise ValueError(
      f"perplexity of shape {p_shape} does not broadcast to the {tuple(batch)} rows of "
      f"sq_distances of shape {shape}"
    )
  v = concrete(perplexity)
  if v is not None and np.any(~((v > 1.0) & (v <= k))):
    bad = v[~((v > 1.0) & (v <= k))] if v.ndim else v
    raise ValueError(
      f"perplexity must lie in (1, k] = (1, {k}] for sq_distances of shape {shape} "
      f"(k = {k} neighbours per row), got {np.unique(bad)[:5].tolist()}"
    )


@functools.partial(jax.jit, static_argnames=("num_iters", "implementation"))
def _perplexity_affinities(sq_distances, perplexity, where, *, num_iters, implementation):
  logits = -jnp.asarray(sq_distances)
  target = jnp.log(jnp.asarray(perplexity, compute_dtype(logits.dtype)))
  return entropy_softmax(
    logits, target, -1, where, num_iters=num_iters, implementation=implementation
  )


def perplexity_affinities(
  sq_distances: ArrayLike,
  perplexity: ArrayLike,
  where: ArrayLike | None = None,
  *,
  num_iters: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """t-SNE's conditional affinities P_{j|i}: Gaussian kernels calibrated to a perplexity.

  For each row i (a point and its k nearest neighbours, squared distances ``d_ij``),

    P_{j|i} = exp(-β_i d_ij) / Σ_l exp(-β_i d_il),      H(P_i) = -Σ_j P_{j|i} log P_{j|i}
            = log(perplexity),

  which is ``entropy_softmax(-sq_distances, log(perplexity), where=where)``: the precision β_i
  = 1/(2σ_i²) is the solver's γ*, and ``entnorm_jax.solve_gamma(-sq_distances,
  jnp.log(perplexity), where=where)`` returns it. This is the calibration of t-SNE (van der
  Maaten & Hinton, 2008) as scikit-learn's ``TSNE`` and openTSNE do it with a per-row bisection
  (perplexity = 2^H in bits = e^H in nats; natural logs here). Unlike theirs, the kernel is
  evaluated on ``d_ij - min_l d_il``, so rows whose distances are all large (high-dimensional
  data, or distances with a common offset) do not underflow to an all-zero row; the answer only
  depends on the differences of a row's distances.

  UMAP calibrates a different kernel to a different target: it finds σ_i with
  Σ_j exp(-max(0, d_ij - ρ_i)/σ_i) = log2(k), with ``d`` the (unsquared) distances and ρ_i the
  distance to the nearest neighbour. That fixes the *sum* of unnormalized memberships, not the
  entropy of a normalized distribution, so it is not an entropy solve and this function does not
  reproduce it (no choice of perplexity does).

  Differentiable w.r.t. ``sq_distances`` and ``perplexity`` (forward, reverse, higher order) by
  the implicit function theorem through :func:`entnorm_jax.entropy_softmax`; jit- and vmap-safe.

  Args:
    sq_distances: squared distances ``[..., k]``, typically ``[n_points, k]``, from each point to
      its k nearest neighbours (the point itself excluded), in any order. ``+inf`` entries count
      as padding. Float32 resolves the spread of a row only to float32's precision at its
      magnitude: for rows whose spread is tiny next to their size, subtract the row minimum (in
      float64) before casting, or pass float64 under ``jax_enable_x64``.
    perplexity: the perplexity, > 1 and at most k; a scalar or an array broadcastable to the rows
      (``sq_distances.shape[:-1]``), e.g. one per point. A row with fewer valid neighbours than
      its perplexity (through ``where``) gets the uniform distribution over its valid neighbours
      (its maximum entropy); a row with none is all zeros.
    where: optional boolean mask broadcastable to ``sq_distances``; False marks padded
      neighbours, whose affinity is exactly 0.
    num_iters: as in :func:`entnorm_jax.entropy_softmax` (``None``: iterate until every row is
      within 2e-6·max(1, log k) nats of its target; 1e-12 in float64).
    implementation: as in :func:`entnorm_jax.entropy_softmax`.

  Returns:
    P_{j|i}, of the shape of ``sq_distances`` and its dtype (float32 for integers); each row
    sums to 1.

  Raises:
    ValueError: if ``sq_distances`` has no neighbour axis, ``perplexity`` or ``where`` does not
      broadcast, or ``perplexity`` (when not traced) is outside (1, k].

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> d2 = jnp.array([[1.0, 2.0, 4.0, 8.0], [0.5, 0.5, 3.0, 9.0]])
    >>> p = en.perplexity_affinities(d2, 2.5)
    >>> [round(float(jnp.exp(h)), 4) for h in en.entropy(jnp.log(p))]  # perplexity of each row
    [2.5, 2.5]
    >>> p = en.perplexity_affinities(d2, 2.5, where=d2 < 5.0)  # padding gets exactly 0
    >>> round(float(jnp.exp(en.entropy(jnp.log(p[1])))), 4), p[1, 3].item()
    (2.5, 0.0)
    >>> en.perplexity_affinities(d2, 2.5, where=d2 < 1.0)[1].tolist()  # 2 valid < 2.5: uniform
    [0.5, 0.5, 0.0, 0.0]
  """
  shape = np.shape(sq_distances)
  if len(shape) < 1:
    raise ValueError(f"sq_distances must have a neighbour axis [..., k], got shape {shape}")
  check_where(where, shape, "sq_distances")
  _check_perplexity(perplexity, shape)
  return _perplexity_affinities(
    sq_distances, perplexity, where, num_iters=num_iters, implementation=implementation
  )


@functools.partial(jax.jit, static_argnames=("dense",))
def _joint(conditional, neighbors, where, *, dense):
  n, k = conditional.shape
  valid = jnp.ones((n, k), bool) if where is None else jnp.broadcast_to(where, (n, k))
  p = jnp.where(valid, conditional, 0)
  cols = jnp.where(valid, neighbors, 0).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, k))
  total = 2 * jnp.sum(p)
  scale = 1 / jnp.where(total > 0, total, 1)
  if dense:
    m = jnp.zeros((n, n), p.dtype).at[rows, cols].add(p)
    return (m + m.T) * scale
  from jax.experimental import sparse

  data = jnp.concatenate([p.ravel(), p.ravel()]) * scale
  indices = jnp.concatenate(
    [jnp.stack([rows.ravel(), cols.ravel()], 1), jnp.stack([cols.ravel(), rows.ravel()], 1)]
  )
  return sparse.BCOO((data, indices), shape=(n, n))


def joint_affinities(
  conditional: ArrayLike,
  neighbors: ArrayLike,
  where: ArrayLike | None = None,
  *,
  dense: bool = True,
):
  """t-SNE's symmetric joint affinities P_ij from the conditional ones of a kNN graph.

  With P_{j|i} from :func:`perplexity_affinities` on the distances to ``neighbors`` (zero for
  pairs that are not neighbours),

    P_ij = (P_{j|i} + P_{i|j}) / Z,       Z = Σ_i Σ_j (P_{j|i} + P_{i|j}) = 2N,

  the matrix t-SNE's KL objective uses (scikit-learn's ``_joint_probabilities_nn``, openTSNE's
  ``joint_probabilities_nn``). Z is computed as the sum, which is 2N when every row has a valid
  neighbour, so the result always sums to 1. Differentiable w.r.t. ``conditional``; jit-safe.

  Args:
    conditional: P_{j|i}, ``[N, k]``: row i holds point i's affinities to its k neighbours.
    neighbors: integer indices ``[N, k]`` in [0, N) of those neighbours (the point itself
      excluded, as in ``NearestNeighbors().kneighbors_graph()``).
    where: optional boolean mask broadcastable to ``[N, k]``; False entries are dropped (their
      index may be anything, e.g. -1 padding).
    dense: ``True`` (default) returns a dense ``[N, N]`` array, N² entries: fine for N up to a
      few ten thousand on a CPU (20,000 points in float32 take 1.6 GB). ``False`` returns a
      ``jax.experimental.sparse.BCOO`` of shape ``[N, N]`` with 2·N·k stored entries, the pairs
      (i, j) and (j, i) of every neighbour pair; a pair stored twice (mutual neighbours) counts
      as the sum of its entries (``.todense()``, products); ``.sum_duplicates()`` (outside jit)
      merges them.

  Returns:
    P, symmetric, non-negative, summing to 1, dense or BCOO, in the dtype of ``conditional``.

  Raises:
    ValueError: if ``conditional`` is not 2-D, ``neighbors`` does not have its shape, or
      ``where`` does not broadcast to it.
    TypeError: if ``neighbors`` is not an integer array.

  Examples:
    >>> import jax.numpy as jnp, entnorm_jax as en
    >>> cond = jnp.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
    >>> nbrs = jnp.array([[1, 2], [0, 2], [1, 0]])
    >>> P = en.joint_affinities(cond, nbrs)
    >>> P.tolist()  # (P_{j|i} + P_{i|j}) / (2N), N = 3
    [[0.0, 0.2083..., 0.0416...], [0.2083..., 0.0, 0.25], [0.0416..., 0.25, 0.0]]
    >>> bool(jnp.allclose(en.joint_affinities(cond, nbrs, dense=False).todense(), P))
    True
  """
  c_shape, n_shape = np.shape(conditional), np.shape(neighbors)
  if len(c_shape) != 2:
    raise ValueError(f"conditional must be [N, k], got shape {c_shape}")
  if n_shape != c_shape:
    raise ValueError(f"neighbors of shape {n_shape} must have the shape of conditional, {c_shape}")
  if not jnp.issubdtype(jnp.result_type(neighbors), jnp.integer):
    raise TypeError(f"neighbors must be integer indices, got dtype {jnp.result_type(neighbors)}")
  check_where(where, c_shape, "conditional")
  return _joint(conditional, neighbors, where, dense=bool(dense))

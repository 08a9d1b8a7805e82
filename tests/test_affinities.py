"""t-SNE affinities: sklearn's perplexity calibration reproduced; masks, transforms, gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_figures
from jax.test_util import check_grads
from references import entropy64

import entnorm_jax as en

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.manifold._t_sne import _joint_probabilities_nn  # noqa: E402
from sklearn.manifold._utils import _binary_search_perplexity  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

# Each is compiled once per shape (and dtype); jit leaves the perplexity a traced argument.
affinities = jax.jit(en.perplexity_affinities)
joint = jax.jit(en.joint_affinities, static_argnames="dense")

EPS32 = float(np.finfo(np.float32).eps)
N, K = 64, 16  # the synthetic problems share a shape, so the solver compiles few times


def per_row(perplexity: float) -> np.ndarray:
  """One float32 perplexity per point (the synthetic tests all pass ``[N]``)."""
  return np.full(N, perplexity, np.float32)


def entropy_tolerance(k: int, dtype) -> float:
  """The solver's stopping rule (2e-6·max(1, log k) nats in float32, 1e-12 in float64), plus the
  rounding of H evaluated from probabilities stored in ``dtype`` (a few ulps per nat)."""
  if jnp.dtype(dtype) == jnp.float64:
    return 1e-12 * max(1.0, np.log(k)) + 64 * np.finfo(np.float64).eps * np.log(k)
  return 2e-6 * max(1.0, np.log(k)) + 8 * EPS32 * np.log(k)


@functools.cache
def digits_knn(perplexity: float):
  """kNN squared distances of sklearn's digits, as ``TSNE(method="barnes_hut")`` computes them.

  Returns ``(sq_distances float32 [n, k], neighbors [n, k], the CSR graph of squared distances)``
  with k = min(n - 1, int(3·perplexity + 1)).
  """
  x = load_digits().data
  n = len(x)
  k = min(n - 1, int(3.0 * perplexity + 1))
  graph = NearestNeighbors(n_neighbors=k).fit(x).kneighbors_graph(mode="distance")
  graph.data **= 2
  graph.sort_indices()  # as _joint_probabilities_nn does before reshaping
  d2 = graph.data.reshape(n, k).astype(np.float32)
  return d2, graph.indices.reshape(n, k), graph


def random_sq_distances(rng, shape, dtype=np.float32) -> np.ndarray:
  """Sorted squared distances with a spread like a kNN row's: ``(r0 + cumsum gaps)^2``."""
  gaps = rng.uniform(0.05, 1.0, shape)
  r = rng.uniform(1.0, 3.0, shape[:-1] + (1,)) + np.cumsum(gaps, axis=-1)
  return (r**2).astype(dtype)


# -------------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("perplexity", [5.0, 30.0, 50.0])
def test_matches_sklearn_binary_search_on_digits(perplexity):
  d2, _, _ = digits_knn(perplexity)
  ours = np.asarray(affinities(d2, perplexity))
  theirs = _binary_search_perplexity(d2, perplexity, 0)
  assert ours.shape == theirs.shape == d2.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours.sum(-1), 1.0, atol=4 * EPS32 * d2.shape[1])
  # every row's perplexity is the target: H = log(perplexity) in nats
  err = np.abs(entropy64(ours) - np.log(perplexity))
  assert err.max() <= entropy_tolerance(d2.shape[1], np.float32), err.max()


def test_joint_matches_sklearn_joint_probabilities_nn():
  perplexity = 30.0
  d2, neighbors, graph = digits_knn(perplexity)
  n = len(d2)
  theirs = _joint_probabilities_nn(graph.copy(), perplexity, 0).toarray()
  ours = np.asarray(joint(affinities(d2, perplexity), neighbors))
  # entries are O(1 / (2N k)): compare them on the scale of P_{j|i}, i.e. times 2N
  np.testing.assert_allclose(2 * n * ours, 2 * n * theirs, rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours, ours.T, rtol=0, atol=0)
  np.testing.assert_allclose(ours.sum(), 1.0, rtol=1e-5)
  assert (ours >= 0).all() and (np.diag(ours) == 0).all()


def test_joint_sparse_equals_dense(rng):
  d2 = random_sq_distances(rng, (N, K))
  others = [np.delete(np.arange(N), i) for i in range(N)]
  neighbors = np.stack([rng.choice(o, K, replace=False) for o in others])
  cond = affinities(d2, per_row(3.0))
  dense = joint(cond, neighbors)
  sparse = joint(cond, neighbors, dense=False)
  assert sparse.shape == (N, N) and sparse.nse == 2 * N * K
  np.testing.assert_allclose(sparse.todense(), dense, rtol=1e-6, atol=0)
  # and both equal the definition (P_{j|i} + P_{i|j}) / 2N, written out with NumPy
  m = np.zeros((N, N))
  np.add.at(m, (np.repeat(np.arange(N), K), neighbors.ravel()), np.asarray(cond).ravel())
  np.testing.assert_allclose(dense, (m + m.T) / (2 * N), rtol=1e-5, atol=1e-9)


def test_joint_drops_masked_pairs(rng):
  d2 = random_sq_distances(rng, (N, K))
  neighbors = np.stack([(i + 1 + np.arange(K)) % N for i in range(N)])
  where = np.ones((N, K), bool)
  where[::3, -4:] = False
  cond = affinities(d2, per_row(2.0), where)
  padded = np.where(where, neighbors, -1)  # -1 padding, as kNN libraries emit
  expected = joint(cond, neighbors)
  np.testing.assert_allclose(joint(cond, padded, where), expected, rtol=1e-6, atol=0)
  np.testing.assert_allclose(
    joint(cond, padded, where, dense=False).todense(), expected, rtol=1e-6, atol=0
  )


# ------------------------------------------------------------------------ entropy, masks, shapes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_row_has_the_target_entropy(request, rng, dtype):
  if dtype == np.float64:
    request.getfixturevalue("x64")
  k = K // 2
  d2 = random_sq_distances(rng, (N, k), dtype)
  perplexity = rng.uniform(1.2, k, N).astype(dtype)  # one per point
  p = affinities(d2, perplexity)
  assert p.dtype == dtype
  err = np.abs(entropy64(p) - np.log(perplexity))
  assert err.max() <= entropy_tolerance(k, dtype), err.max()
  if dtype == np.float64:  # softmax(-β d), β = solve_gamma's γ*: t-SNE's Gaussian kernel
    beta = en.solve_gamma(-d2, np.log(perplexity))
    np.testing.assert_allclose(p, jax.nn.softmax(-beta[:, None] * d2, axis=-1), atol=1e-12)


def test_masked_neighbours_are_zero_and_masked_equals_sliced(rng):
  k = K // 2
  d2 = random_sq_distances(rng, (N, k))
  garbage = rng.uniform(-5.0, 50.0, (N, K - k)).astype(np.float32)
  where = np.broadcast_to(np.arange(K) < k, (N, K))
  masked = affinities(np.concatenate([d2, garbage], -1), per_row(5.0), where)
  assert (masked[:, k:] == 0).all()
  np.testing.assert_allclose(masked[:, :k], affinities(d2, per_row(5.0)), rtol=0, atol=1e-6)
  # +inf distances are padding too
  inf = np.full((N, K - k), np.inf, np.float32)
  inf_padded = affinities(np.concatenate([d2, inf], -1), per_row(5.0))
  assert (inf_padded[:, k:] == 0).all()
  np.testing.assert_allclose(inf_padded[:, :k], masked[:, :k], rtol=0, atol=1e-6)


def test_rows_with_too_few_valid_neighbours_are_uniform(rng):
  d2 = random_sq_distances(rng, (N, K))
  where = np.zeros((N, K), bool)
  where[0] = True  # 16 valid > 6: on target
  where[1, [2, 5, 7]] = True  # 3 valid < 6: uniform over them
  p = np.asarray(affinities(d2, per_row(6.0), where))
  assert abs(entropy64(p[0]) - np.log(6.0)) <= entropy_tolerance(K, np.float32)
  np.testing.assert_allclose(p[1], np.where(where[1], 1 / 3, 0.0), rtol=1e-6, atol=0)
  assert (p[2:] == 0).all()  # no valid neighbour: all zeros


def test_jit_and_vmap(rng):
  d2 = random_sq_distances(rng, (3, N, K))
  perplexity = rng.uniform(1.5, K, (3, N)).astype(np.float32)
  batched = affinities(d2, perplexity)  # leading batch axes
  np.testing.assert_allclose(jax.vmap(affinities)(d2, perplexity), batched, rtol=0, atol=1e-6)
  for b in range(3):
    np.testing.assert_allclose(affinities(d2[b], perplexity[b]), batched[b], rtol=0, atol=1e-6)


def test_large_distances_do_not_underflow():
  # Digits' squared distances are integers, exact in float32 even after adding 1e4 or 1e5; a
  # common offset leaves P unchanged in exact arithmetic. exp(-β d) at such d underflows double
  # precision (bisections on exp(-β d) lose these rows); shifting by the row minimum does not.
  perplexity = 30.0
  d2, _, _ = digits_knn(perplexity)
  assert (d2 == np.rint(d2)).all()
  reference = _binary_search_perplexity(d2, perplexity, 0)
  for offset in (1e4, 1e5):
    shifted = d2 + np.float32(offset)
    assert (shifted - np.float32(offset) == d2).all()  # the offset is exact
    p = np.asarray(affinities(shifted, perplexity))
    np.testing.assert_allclose(p, reference, rtol=0, atol=1e-5)
    err = np.abs(entropy64(p) - np.log(perplexity))
    assert err.max() <= entropy_tolerance(d2.shape[1], np.float32), (offset, err.max())


# ------------------------------------------------------------------------------------ gradients


def test_gradients_float64(rng, x64):
  d2 = random_sq_distances(rng, (3, 7), np.float64)
  perplexity = np.array([2.0, 3.5, 5.0])
  check_grads(affinities, (d2, perplexity), order=1, modes=("fwd", "rev"))
  w = rng.standard_normal((4, 4))
  cond = affinities(random_sq_distances(rng, (4, 3), np.float64), np.full(4, 2.0))
  neighbors = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
  check_grads(lambda c: jnp.sum(w * joint(c, neighbors)), (cond,), order=1, modes=("fwd", "rev"))


def test_gradient_of_masked_entries_is_zero_and_finite(rng):
  d2 = random_sq_distances(rng, (N, K))
  where = np.broadcast_to(np.arange(K) < 12, (N, K))
  far = np.zeros((N, K), np.float32)
  far[:, 8:12] = 1.0  # the mass on the farthest valid neighbours
  grad = jax.jit(jax.grad(lambda d, p: jnp.sum(far * affinities(d, p, where)), argnums=(0, 1)))
  g_d, g_p = grad(d2, per_row(4.0))
  assert np.isfinite(g_d).all() and np.isfinite(g_p).all()
  assert (g_d[:, 12:] == 0).all()
  assert (g_p > 0).all()  # a higher perplexity moves mass to the far neighbours


# ----------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("perplexity", [1.0, 0.5, -3.0, 8.5, float("nan")])
def test_perplexity_out_of_range_raises(perplexity):
  d2 = np.ones((5, 8), np.float32)
  with pytest.raises(ValueError, match=r"perplexity must lie in \(1, k\] = \(1, 8\].*\(5, 8\)"):
    en.perplexity_affinities(d2, perplexity)


def test_bad_shapes_raise():
  d2 = np.ones((5, 8), np.float32)
  with pytest.raises(ValueError, match=r"perplexity of shape \(3,\) does not broadcast"):
    en.perplexity_affinities(d2, np.full(3, 2.0))
  with pytest.raises(ValueError, match=r"perplexity must lie.*\[9\.0\]"):
    en.perplexity_affinities(d2, np.array([2.0, 3.0, 9.0, 4.0, 5.0]))
  with pytest.raises(ValueError, match=r"where of shape \(5, 7\) does not broadcast"):
    en.perplexity_affinities(d2, 2.0, np.ones((5, 7), bool))
  with pytest.raises(ValueError, match=r"neighbour axis"):
    en.perplexity_affinities(np.float32(1.0), 2.0)
  cond = np.full((5, 2), 0.5, np.float32)
  with pytest.raises(ValueError, match=r"conditional must be \[N, k\], got shape \(10,\)"):
    en.joint_affinities(cond.ravel(), np.zeros(10, int))
  with pytest.raises(ValueError, match=r"neighbors of shape \(5, 3\)"):
    en.joint_affinities(cond, np.zeros((5, 3), int))
  with pytest.raises(TypeError, match="integer"):
    en.joint_affinities(cond, np.zeros((5, 2)))


# ------------------------------------------------------------------------------------ benchmark


def test_tsne_benchmark_runs_tiny(monkeypatch, tmp_path, figures):
  # The benchmark's run -> markdown -> plot path on one tiny case, so it cannot go stale; its
  # figures are checked for sanity, never for speed.
  from benchmarks import tsne

  case = tsne.Case("digits 300 + 1e5", "digits", 300, offset=1e5, bar=True)
  monkeypatch.setattr(tsne, "CASES", {True: (case,)})
  result = tsne.run(quick=True)
  (per,) = result["cases"]
  assert (per["n_points"], per["k"]) == (300, 91)
  assert {"entnorm_jax", "scikit-learn"} <= set(per["times"])
  assert all(t["median_s"] > 0 for t in per["times"].values())
  ours = per["accuracy"]["entnorm_jax"]
  assert ours["rows_off"] == 0 and ours["max_entropy_error"] <= entropy_tolerance(91, np.float32)
  assert ours["max_abs_error_vs_exact"] < 1e-5
  assert len(result["bars"]) == 1 and isinstance(result["bars"][0]["met"], bool)
  assert "digits 300 + 1e5" in tsne.markdown(result)
  assert tsne.plot(result, tmp_path) == [tmp_path / "tsne.png"]
  check_figures(figures, ["tsne.png"])

"""Improved precision and recall (Kynkaanniemi et al. 2019, Section 3).

Each set's manifold is the union of balls around its features whose radius is the distance to
the k-th nearest other feature of the same set (k = 3, the paper's choice). Precision is the
fraction of generated features inside the real manifold (fidelity); recall is the fraction of
real features inside the generated manifold (coverage). Distances are computed blockwise on the
device, exactly (highest matmul precision), so N = 50k never holds an N x N matrix.

Glossary: N real, M generated features, D feature dimension.
"""

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 1024  # rows of the distance matrix per device call


@jax.jit
def _sq_dist(a, b):
    """[n, D], [m, D] -> [n, m] squared Euclidean distances, never negative."""
    with jax.default_matmul_precision("highest"):
        d = jnp.sum(a * a, 1)[:, None] - 2 * a @ b.T + jnp.sum(b * b, 1)[None, :]
    return jnp.maximum(d, 0.0)


def _blocks(rows, cols, fn):
    """fn(distances [block, M]) for blocks of rows, concatenated (last block padded)."""
    out = []
    cols_dev = jnp.asarray(cols)
    for start in range(0, len(rows), BLOCK):
        block = rows[start : start + BLOCK]
        pad = BLOCK - len(block) if len(rows) > BLOCK else 0  # one compiled shape
        padded = np.pad(block, ((0, pad), (0, 0)))
        out.append(np.asarray(fn(_sq_dist(jnp.asarray(padded), cols_dev)))[: len(block)])
    return np.concatenate(out)


def knn_radii(features, k: int = 3) -> np.ndarray:
    """[N] squared distance from each feature to its k-th nearest other feature of the set."""
    features = np.asarray(features, np.float32)
    if len(features) <= k:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} features.")
    # the (k+1)-th smallest of a row, since the row holds the feature's own distance 0
    return _blocks(features, features, lambda d: -jax.lax.top_k(-d, k + 1)[0][:, k])


def coverage(points, centres, radii) -> float:
    """Fraction of `points` [M, D] inside at least one ball (centres [N, D], radii^2 [N])."""
    radii = jnp.asarray(radii)
    inside = _blocks(
        np.asarray(points, np.float32),
        np.asarray(centres, np.float32),
        lambda d: jnp.any(d <= radii[None, :], axis=1),
    )
    return float(np.mean(inside))


def precision_recall(real, generated, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of generated [M, D] against real [N, D] features."""
    real, generated = np.asarray(real, np.float32), np.asarray(generated, np.float32)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be [N, D] alike; got {real.shape}, {generated.shape}.")
    precision = coverage(generated, real, knn_radii(real, k))
    recall = coverage(real, generated, knn_radii(generated, k))
    return precision, recall

"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", Eq. 3).

The unbiased estimate of the squared MMD under the cubic polynomial kernel
k(x, y) = (x . y / D + 1)^3, averaged over `num_subsets` random subsets of `subset_size` images
from each side: 100 subsets of 1000, as StyleGAN's metrics and clean-fid report it. Unbiased means
its expectation is 0 for two samples of one distribution, so it can come out slightly negative.

Glossary: N, M images per side, m subset size, D feature dimension.
"""

import numpy as np


def mmd2_unbiased(x, y) -> float:
    """The unbiased MMD^2 of two sets of equal size m: x, y [m, D], cubic polynomial kernel."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(
    generated, real, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """Mean unbiased MMD^2 over subsets; generated [N, D], real [M, D]. The subsets come from
    a generator seeded by `seed`, so a figure repeats exactly."""
    generated, real = np.asarray(generated), np.asarray(real)
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"features must be [N, D] alike; got {generated.shape}, {real.shape}.")
    m = min(len(generated), len(real), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side; got {m}.")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = generated[rng.choice(len(generated), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        total += mmd2_unbiased(x, y)
    return total / num_subsets

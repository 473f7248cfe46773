import gaussian
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from patchdiff import sampling


def test_log_likelihood_of_gaussian_data_matches_the_closed_form():
    # The ODE's marginal at sigma_min is N(MU, STD^2 + sigma_min^2); with the exact denoiser the
    # field is linear, so Hutchinson's estimate of its divergence is exact.
    sigma_min, sigma_max = 0.01, 80.0
    x = gaussian.MU + gaussian.STD * jax.random.normal(jax.random.key(0), (4, 3, 2))
    ll, info = jax.jit(
        lambda x, k: sampling.log_likelihood(gaussian.denoiser, x, sigma_min, sigma_max, key=k)
    )(x, jax.random.key(1))
    std = np.sqrt(gaussian.STD**2 + sigma_min**2)
    expect = jnp.sum(norm.logpdf(x, gaussian.MU, std), axis=(1, 2))
    assert ll.shape == (4,)
    # the prior N(0, sigma_max^2) stands in for N(MU, STD^2 + sigma_max^2): a tiny mismatch
    np.testing.assert_allclose(ll, expect, atol=0.02)
    assert int(info["nfe"]) > 6


def test_log_likelihood_prefers_data_over_outliers():
    x = jnp.stack([jnp.full((3,), gaussian.MU), jnp.full((3,), gaussian.MU + 3.0)])
    ll, _ = sampling.log_likelihood(gaussian.denoiser, x, 0.01, 80.0, key=jax.random.key(0))
    assert float(ll[0]) > float(ll[1]) + 10

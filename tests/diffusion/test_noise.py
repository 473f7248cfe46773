import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff.diffusion import noise, precond

KEY = jax.random.key(0)
N = 200_000


def test_lognormal_moments():
    log_sigma = np.log(noise.lognormal(KEY, (N,), p_mean=-1.2, p_std=1.2))
    assert log_sigma.mean() == pytest.approx(-1.2, abs=0.02)
    assert log_sigma.std() == pytest.approx(1.2, abs=0.02)


def test_log_uniform_bounds_and_density():
    sigma = np.asarray(noise.log_uniform(KEY, (N,), sigma_min=0.02, sigma_max=100.0))
    assert sigma.min() >= 0.02 and sigma.max() <= 100.0
    counts, _ = np.histogram(np.log(sigma), bins=10)
    np.testing.assert_allclose(counts / N, 0.1, atol=0.01)  # flat in log sigma


def test_vp_uniform_draws_the_trained_levels_evenly():
    table = precond.VP(num_timesteps=25).sigmas
    sigma = np.asarray(noise.vp_uniform(KEY, (N,), sigmas=table))
    values, counts = np.unique(sigma, return_counts=True)
    np.testing.assert_allclose(values, np.sort(table), rtol=1e-6)
    np.testing.assert_allclose(counts / N, 1 / 25, atol=0.005)


@pytest.mark.parametrize("p", [precond.Flow(), precond.V(0.5)])
def test_logit_normal_time_is_logit_normal(p):
    sigma = noise.logit_normal(KEY, (N,), sigma_from_t=p.sigma_from_t, mean=0.3, std=0.8)
    t = np.asarray(p.scalings(sigma)[3], np.float64) / 1000
    logit = np.log(t / (1 - t))
    assert logit.mean() == pytest.approx(0.3, abs=0.02)
    assert logit.std() == pytest.approx(0.8, abs=0.02)
    assert np.all(np.isfinite(np.asarray(sigma)))


def test_distributions_jit_with_static_shape():
    fn = jax.jit(lambda k: noise.lognormal(k, (4,)))
    assert fn(KEY).shape == (4,) and fn(KEY).dtype == jnp.float32

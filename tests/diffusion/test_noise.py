import functools

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


def test_cosine_interpolated_is_the_plain_cosine_schedule_at_the_low_resolution():
    # With image_d = noise_d_low = noise_d_high both shifts vanish: u -> sigma is the cosine
    # schedule, whose median (u = 1/2, angle pi/4 up to the clipped ends) is sigma_data.
    draw = functools.partial(noise.cosine_interpolated, image_d=32, sigma_data=0.5)
    sigma = draw(jax.random.key(0), (100_000,))
    assert 1e-3 <= float(sigma.min()) and float(sigma.max()) <= 1e3
    assert float(jnp.median(sigma)) == pytest.approx(0.5, rel=0.05)
    # Each half of log sigma around log sigma_data holds half the draws: symmetric in log-SNR.
    assert float(jnp.mean(jnp.log(sigma / 0.5) > 0)) == pytest.approx(0.5, abs=0.01)


def test_cosine_interpolated_shifts_larger_images_towards_more_noise():
    key = jax.random.key(1)
    small = noise.cosine_interpolated(key, (50_000,), image_d=32)
    large = noise.cosine_interpolated(key, (50_000,), image_d=256)
    assert float(jnp.median(large)) > 2 * float(jnp.median(small))
    # Same u, same clipped range: the shift moves the middle, never past the ends.
    assert float(large.max()) <= 1e3 * (1 + 1e-5) and float(large.min()) >= 1e-3 * (1 - 1e-5)
    # The cleanest draws (u -> 1) follow the unshifted schedule of the image's own size, which
    # at image_d = 32 is the small image's: the same u gives nearly the same sigma there.
    clean = float(jnp.quantile(large, 0.001)), float(jnp.quantile(small, 0.001))
    assert clean[0] == pytest.approx(clean[1], rel=0.1)


def test_cosine_interpolated_needs_the_resolution_from_the_builder():
    from ml_collections_configs import base
    from patchdiff.diffusion import build

    config = base.get_config()
    config.diffusion.noise_distribution = "cosine_interpolated"
    precond = build.build_precond(config.diffusion)
    with pytest.raises(ValueError, match="pass resolution=config.data.resolution"):
        build.build_noise_distribution(config.diffusion, precond)
    sample = build.build_noise_distribution(config.diffusion, precond, 32)
    assert sample(jax.random.key(0), (4,)).shape == (4,)

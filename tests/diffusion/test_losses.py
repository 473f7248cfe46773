import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff.diffusion import losses, noise, precond, weighting


def gaussian_oracle(p, data_std, sigma_of_c_noise):
    """The exact F for x0 ~ N(0, s^2 I): D*(x, sigma) = s^2 / (s^2 + sigma^2) x."""

    def net(x_in, c_noise):
        sigma = sigma_of_c_noise(c_noise)[:, None, None, None]
        c_skip, c_out, c_in, _ = (c[:, None, None, None] for c in p.scalings(sigma[:, 0, 0, 0]))
        x = x_in / c_in
        ideal = data_std**2 / (data_std**2 + sigma**2) * x
        return (ideal - c_skip * x) / c_out

    return net


def test_edm_loss_of_the_exact_denoiser_is_one_at_every_sigma():
    # EDM chose lambda so that the optimal denoiser's loss is 1 at every sigma when sigma_data is
    # the data's std: lambda * s^2 sigma^2 / (s^2 + sigma^2) = 1.
    s = 0.5
    p = precond.EDM(sigma_data=s)
    net = gaussian_oracle(p, s, lambda c: jnp.exp(4 * c))
    x0 = s * jax.random.normal(jax.random.key(0), (4096, 4, 4, 2))
    for fixed in (0.01, 0.5, 20.0):
        loss = losses.denoising_loss(
            net,
            jax.random.key(1),
            x0,
            precond=p,
            sample_sigma=lambda k, shape, f=fixed: jnp.full(shape, f),
            weighting=lambda sig: weighting.edm(sig, sigma_data=s),
        )
        assert loss.shape == (4096,)
        assert float(loss.mean()) == pytest.approx(1.0, rel=0.03)


def test_a_perfect_network_has_zero_loss_for_every_parameterisation():
    x_fixed = jax.random.normal(jax.random.key(2), (8, 4, 4, 1))  # the only data point

    def oracle(p, sigma_of_c_noise):
        def net(x_in, c_noise):
            sigma = sigma_of_c_noise(c_noise)
            c_skip, c_out, c_in, _ = (c[:, None, None, None] for c in p.scalings(sigma))
            return (x_fixed - c_skip * x_in / c_in) / c_out

        return net

    cases = {
        precond.EDM(): lambda c: jnp.exp(4 * c),
        precond.VE(): lambda c: 2 * jnp.exp(c),
        precond.Flow(): lambda c: (c / 1000) / (1 - c / 1000),
        precond.V(0.5): lambda c: 0.5 * jnp.tan(c / 1000 * jnp.pi / 2),
    }
    for p, inverse in cases.items():
        loss = losses.denoising_loss(
            oracle(p, inverse),
            jax.random.key(3),
            x_fixed,
            precond=p,
            sample_sigma=lambda k, shape: noise.log_uniform(
                k, shape, sigma_min=0.05, sigma_max=5.0
            ),
            weighting=weighting.uniform,
        )
        assert float(loss.max()) < 1e-6, type(p).__name__


def test_conditioning_reaches_the_network_unnoised():
    seen = {}

    def net(x_in, c_noise, coords, labels):
        seen.update(coords=coords, labels=labels)
        return jnp.zeros_like(x_in)

    coords = jnp.ones((2, 4, 4, 2))
    labels = jnp.array([3, 5])
    losses.denoising_loss(
        net,
        jax.random.key(0),
        jnp.zeros((2, 4, 4, 3)),
        precond=precond.EDM(),
        sample_sigma=noise.lognormal,
        weighting=weighting.uniform,
        coords=coords,
        labels=labels,
    )
    np.testing.assert_array_equal(seen["coords"], coords)
    np.testing.assert_array_equal(seen["labels"], labels)

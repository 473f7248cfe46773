"""A data distribution whose denoiser and probability-flow ODE are known in closed form.

x0 ~ N(MU, STD^2 I): D(x, sigma) = MU + STD^2 / (STD^2 + sigma^2) (x - MU), and the ODE carries
x from sigma_a to sigma_b as x - MU -> (x - MU) sqrt((STD^2 + sigma_b^2) / (STD^2 + sigma_a^2)).
"""

import jax.numpy as jnp

MU, STD = 0.3, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def denoiser(x, sigma):
    s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


def flow(x, sigma_from, sigma_to):
    """The exact probability-flow ODE solution."""
    return MU + (x - MU) * jnp.sqrt((STD**2 + sigma_to**2) / (STD**2 + sigma_from**2))


def exact_sample(x_t, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    """What a grid ending in (..., sigma_min, 0) should give: the ODE down to sigma_min, then the
    final Euler step to 0, which returns D(x, sigma_min)."""
    x = flow(x_t, sigma_max, sigma_min)
    return denoiser(x, jnp.full(x.shape[:1], sigma_min, x.dtype))

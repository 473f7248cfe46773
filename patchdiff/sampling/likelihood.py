"""Log-likelihood of data under the probability-flow ODE (Song et al. 2021, Sec. D.2), as
k-diffusion's `log_likelihood`, with diffrax's adaptive Dormand-Prince solver.

Integrating dx/dsigma = (x - D(x, sigma)) / sigma from sigma_min up to sigma_max carries x to the
prior N(0, sigma_max^2 I); the change of variables adds the integral of the divergence of that
field, estimated by Hutchinson's trick v^T J v with a Rademacher v (unbiased; exact when J is a
multiple of the identity).
"""

import diffrax
import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from patchdiff.sampling.core import call, to_d


def log_likelihood(denoiser, x, sigma_min, sigma_max, *, key, atol=1e-4, rtol=1e-4, max_steps=4096):
    """log p(x) in nats per example: x [B, ...] -> ([B], {"nfe": int}).

    The estimate is for data blurred to sigma_min (the ODE cannot start at 0); divide by the
    number of dimensions and ln 2 for bits per dimension, and account for quantisation apart.
    """
    v = jax.random.rademacher(key, x.shape, x.dtype)
    axes = tuple(range(1, x.ndim))

    def field(sigma, state, args):
        x, _ = state
        d, jvp = jax.jvp(lambda y: to_d(y, sigma, call(denoiser, y, sigma)), (x,), (v,))
        return d, jnp.sum(v * jvp, axis=axes)

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Dopri5(),
        t0=sigma_min,
        t1=sigma_max,
        dt0=None,
        y0=(x, jnp.zeros(x.shape[:1], x.dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    latent, delta_ll = solution.ys[0][-1], solution.ys[1][-1]
    prior = jnp.sum(norm.logpdf(latent, 0.0, sigma_max), axis=axes)
    return prior + delta_ll, {"nfe": solution.stats["num_steps"] * 6 + 1}

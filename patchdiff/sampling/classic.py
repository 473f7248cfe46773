"""DDIM, DDPM and v-diffusion's pseudo-numerical samplers (PRK, PLMS), written in sigma.

In the VE convention these need no alpha tables: with alpha_bar = 1 / (1 + sigma^2),
- DDIM's update (Song et al. 2021, Eq. 12) is an ancestral Euler step whose noise std is
  sigma_up = eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) (k-diffusion's ancestral step);
  eta = 0 is the deterministic DDIM, eta = 1 is DDPM with the posterior variance beta-tilde.
- DDPM's posterior mean (Ho et al. 2020, Eq. 7) is x0_hat + (sigma'^2 / sigma^2)(x - x0_hat), and
  its variances in VE units are beta-tilde: sigma'^2 (sigma^2 - sigma'^2) / sigma^2, or beta:
  (sigma^2 - sigma'^2)(1 + sigma'^2) / (1 + sigma^2).
- v-diffusion's `transfer(x, eps, t1, t2)` (Crowson's v-diffusion-pytorch, after PNDM, Liu et al.
  2022) is x + (sigma_2 - sigma_1) eps with eps = (x - D) / sigma; its time is
  t = (2 / pi) atan(sigma), so PRK's midpoint is sigma_mid = tan((atan s1 + atan s2) / 2).
Sample a discrete model on its own levels with `get_sigmas_respaced(vp.sigmas, "ddim50")`.
"""

import jax.numpy as jnp
from jax import lax

from patchdiff.sampling.core import call, register, run_steps, to_d
from patchdiff.sampling.k_samplers import ancestral_euler

DDPM_VARIANCES = ("large", "small")


@register("ddim")
def sample_ddim(denoiser, x, sigmas, *, key=None, noise=None, callback=None, eta=0.0, s_noise=1.0):
    """DDIM with stochasticity eta (0: deterministic; 1: DDPM with variance beta-tilde)."""
    return ancestral_euler("ddim", denoiser, x, sigmas, key, noise, callback, eta, s_noise)


@register("ddpm")
def sample_ddpm(
    denoiser, x, sigmas, *, key=None, noise=None, callback=None, variance="large", s_noise=1.0
):
    """Ancestral DDPM sampling: the posterior q(x' | x, x0_hat) of each step.

    variance "large" (beta, ADM's fixed-large variance, its default without learned variances)
    or "small" (beta-tilde, the posterior's own). No noise is added on the step to sigma = 0.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(
            f"sample_ddpm: variance {variance!r} is not known; known: {', '.join(DDPM_VARIANCES)}."
        )

    def step(x, state, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)
        ratio = sigma_next**2 / sigma**2
        mean = denoised + ratio * (x - denoised)
        if variance == "small":
            var = ratio * (sigma**2 - sigma_next**2)
        else:
            var = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
        std = jnp.where(sigma_next > 0, jnp.sqrt(jnp.maximum(var, 0.0)), 0.0)
        return mean + std * s_noise * z, state, denoised

    return run_steps("ddpm", step, x, sigmas, key=key, noise=noise, draws=1, callback=callback)


def _sigma_mid(sigma_1, sigma_2):
    """The sigma halfway between two levels in v-diffusion time t = (2 / pi) atan(sigma)."""
    return jnp.tan((jnp.arctan(sigma_1) + jnp.arctan(sigma_2)) / 2)


def _prk_step(denoiser, x, sigma, sigma_next):
    """Pseudo Runge-Kutta (4 evaluations): (x_next, eps at sigma, denoised at sigma). The step to
    sigma = 0, where eps is undefined for a denoiser, is the plain Euler step x = D(x, sigma)."""
    denoised = call(denoiser, x, sigma)
    eps_1 = to_d(x, sigma, denoised)

    def prk():
        sigma_mid = _sigma_mid(sigma, sigma_next)
        eps = lambda x_, s: to_d(x_, s, call(denoiser, x_, s))  # noqa: E731
        eps_2 = eps(x + (sigma_mid - sigma) * eps_1, sigma_mid)
        eps_3 = eps(x + (sigma_mid - sigma) * eps_2, sigma_mid)
        eps_4 = eps(x + (sigma_next - sigma) * eps_3, sigma_next)
        return x + (sigma_next - sigma) * (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6

    x_next = lax.cond(sigma_next == 0, lambda: denoised, prk)
    return x_next, eps_1, denoised


@register("prk")
def sample_prk(denoiser, x, sigmas, *, key=None, noise=None, callback=None):
    """v-diffusion's pseudo Runge-Kutta sampler (PNDM's PRK), 4 evaluations per step."""

    def step(x, state, i, sigma, sigma_next, z):
        x_next, _, denoised = _prk_step(denoiser, x, sigma, sigma_next)
        return x_next, state, denoised

    return run_steps("prk", step, x, sigmas, callback=callback)


@register("plms")
def sample_plms(denoiser, x, sigmas, *, key=None, noise=None, callback=None):
    """v-diffusion's pseudo linear multistep sampler (PNDM's PLMS): three PRK steps, then
    eps' = (55 eps - 59 eps_1 + 37 eps_2 - 9 eps_3) / 24 with one evaluation per step."""

    def step(x, old_eps, i, sigma, sigma_next, z):
        def prk():
            return _prk_step(denoiser, x, sigma, sigma_next)

        def plms():
            denoised = call(denoiser, x, sigma)
            eps = to_d(x, sigma, denoised)
            eps_prime = (55 * eps - 59 * old_eps[0] + 37 * old_eps[1] - 9 * old_eps[2]) / 24
            return x + (sigma_next - sigma) * eps_prime, eps, denoised

        x_next, eps, denoised = lax.cond(i < 3, prk, plms)
        old_eps = jnp.concatenate([eps[None], old_eps[:-1]])  # newest first
        return x_next, old_eps, denoised

    history = jnp.zeros((3, *x.shape), x.dtype)
    return run_steps("plms", step, x, sigmas, history, callback=callback)

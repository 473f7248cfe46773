"""Loss weightings lambda(sigma) of the denoising loss, all in the x0 space of EDM Eq. 8:

    L = E[ lambda(sigma) || D(x0 + sigma n, sigma) - x0 ||^2 ]

With SNR(sigma) = 1 / sigma^2 (the VP signal-to-noise ratio alpha^2 / s^2 in VE form), familiar
objectives are weightings of this one loss: the eps-MSE of DDPM is lambda = SNR, since
D - x0 = -sigma (eps_hat - eps); the v-MSE is lambda = SNR + 1; EDM's is 1 / c_out^2.
Each function maps sigma [...] -> lambda [...] and is pure.
"""

import jax.numpy as jnp

from patchdiff.registry import Registry

WEIGHTINGS = Registry("loss weighting")


def snr_of(sigma):
    """SNR(sigma) = 1 / sigma^2."""
    return jnp.reciprocal(jnp.square(sigma))


@WEIGHTINGS.register("edm")
def edm(sigma, *, sigma_data=0.5):
    """lambda = (sigma^2 + sd^2) / (sigma sd)^2 (EDM Eq. 8 and Table 1), i.e. 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@WEIGHTINGS.register("uniform")
def uniform(sigma):
    """lambda = 1: plain x0-prediction MSE."""
    return jnp.ones_like(sigma)


@WEIGHTINGS.register("snr")
def snr(sigma):
    """lambda = SNR = 1 / sigma^2: the eps-prediction MSE of DDPM (Ho et al. 2020, L_simple)."""
    return snr_of(sigma)


@WEIGHTINGS.register("sqrt_snr")
def sqrt_snr(sigma):
    """lambda = sqrt(SNR) = 1 / sigma: Luhman & Luhman 2022 (patch diffusion), who weight the
    x0 loss by sqrt(alpha_bar / (1 - alpha_bar))."""
    return jnp.reciprocal(sigma)


@WEIGHTINGS.register("snr+1")
def snr_plus_one(sigma):
    """lambda = SNR + 1: the v-prediction MSE with unit-variance data (Salimans & Ho 2022, Eq. 10
    'SNR+1' weighting)."""
    return snr_of(sigma) + 1


@WEIGHTINGS.register("truncated_snr")
def truncated_snr(sigma):
    """lambda = max(SNR, 1): 'truncated SNR' of Salimans & Ho 2022, Eq. 9."""
    return jnp.maximum(snr_of(sigma), 1.0)


@WEIGHTINGS.register("p2")
def p2(sigma, *, k=1.0, gamma=1.0):
    """lambda = SNR / (k + SNR)^gamma: perception-prioritised weighting (Choi et al. 2022, Eq. 8),
    whose eps-loss weight 1 / (k + SNR)^gamma is multiplied by SNR to move it to x0 space."""
    s = snr_of(sigma)
    return s / (k + s) ** gamma


@WEIGHTINGS.register("min_snr")
def min_snr(sigma, *, gamma=5.0):
    """lambda = min(SNR, gamma): Min-SNR-gamma (Hang et al. 2023, Eq. 7, x0 form)."""
    return jnp.minimum(snr_of(sigma), gamma)


@WEIGHTINGS.register("soft_min_snr")
def soft_min_snr(sigma, *, sigma_data=0.5):
    """lambda = 1 / (sigma^2 + sd^2): k-diffusion's soft Min-SNR.

    k-diffusion weights its F-space loss by (sigma sd)^2 / (sigma^2 + sd^2)^2; dividing by c_out^2
    moves it to x0 space. With snr = sd^2 / sigma^2 this is snr / (1 + snr) / sd^2, a smooth
    min(snr, 1).
    """
    return jnp.reciprocal(sigma**2 + sigma_data**2)

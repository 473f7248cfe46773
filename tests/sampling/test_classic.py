"""DDIM, DDPM, PRK and PLMS in sigma against their original alpha-space formulas."""

import gaussian
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff import sampling
from patchdiff.diffusion.precond import VP


def vp_grid(spacing="ddim10"):
    return sampling.get_sigmas_respaced(VP().sigmas, spacing)


def alpha_bar(sigma):
    return 1 / (1 + sigma**2)


def eps_and_x0(x_vp, sigma):
    """A VP model's eps and x0 predictions, from the VE denoiser."""
    x_ve = x_vp * np.sqrt(1 + sigma**2)
    x0 = np.asarray(gaussian.denoiser(jnp.asarray(x_ve), jnp.full(x_ve.shape[:1], sigma)))
    return (x_ve - x0) / sigma, x0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_song_et_al_eq_12(eta):
    sigmas = np.asarray(vp_grid(), np.float64)
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 4)), np.float64) * sigmas[0]
    noise = np.asarray(jax.random.normal(jax.random.key(1), (10, 3, 4)), np.float64)
    x_vp = x * np.sqrt(alpha_bar(sigmas[0]))
    for i in range(10):
        a, a_next = alpha_bar(sigmas[i]), alpha_bar(sigmas[i + 1])
        eps, x0 = eps_and_x0(x_vp, sigmas[i])
        std = eta * np.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x_vp = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next - std**2) * eps + std * noise[i]
    ours = sampling.sample_ddim(
        gaussian.denoiser,
        jnp.asarray(x, jnp.float32),
        jnp.asarray(sigmas, jnp.float32),
        noise=noise.astype(np.float32),
        eta=eta,
    )
    np.testing.assert_allclose(ours, x_vp, rtol=1e-4, atol=1e-4)  # sigma = 0: x_vp = x_ve


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_matches_the_posterior_of_ho_et_al(variance):
    sigmas = np.asarray(vp_grid("20"), np.float64)
    n = len(sigmas) - 1
    x = np.asarray(jax.random.normal(jax.random.key(2), (3, 4)), np.float64) * sigmas[0]
    noise = np.asarray(jax.random.normal(jax.random.key(3), (n, 3, 4)), np.float64)
    x_vp = x * np.sqrt(alpha_bar(sigmas[0]))
    for i in range(n):
        a, a_next = alpha_bar(sigmas[i]), alpha_bar(sigmas[i + 1])
        beta = 1 - a / a_next  # the respaced chain's beta (ADM recomputes them from alpha_bar)
        _, x0 = eps_and_x0(x_vp, sigmas[i])
        # Ho et al. Eq. 7: the posterior mean and variance beta-tilde; ADM's "large" uses beta
        mean = (np.sqrt(a_next) * beta / (1 - a)) * x0 + (
            np.sqrt(1 - beta) * (1 - a_next) / (1 - a)
        ) * x_vp
        var = beta * (1 - a_next) / (1 - a) if variance == "small" else beta
        x_vp = mean + (np.sqrt(var) * noise[i] if sigmas[i + 1] > 0 else 0.0)
    ours = sampling.sample_ddpm(
        gaussian.denoiser,
        jnp.asarray(x, jnp.float32),
        jnp.asarray(sigmas, jnp.float32),
        noise=noise.astype(np.float32),
        variance=variance,
    )
    np.testing.assert_allclose(ours, x_vp, rtol=1e-4, atol=1e-4)


def v_diffusion_eps(x_vp, t):
    """eps of a VP model at v-diffusion time t (alpha = cos(t pi / 2), s = sin(t pi / 2))."""
    return eps_and_x0(x_vp, np.tan(t * np.pi / 2))[0]


def transfer(x_vp, eps, t_1, t_2):
    """v-diffusion's transfer: predict x0 from eps at t_1, re-noise it to t_2 (VP)."""
    a1, s1 = np.cos(t_1 * np.pi / 2), np.sin(t_1 * np.pi / 2)
    a2, s2 = np.cos(t_2 * np.pi / 2), np.sin(t_2 * np.pi / 2)
    return (x_vp - eps * s1) / a1 * a2 + eps * s2


def prk_reference(x_vp, t_1, t_2):
    t_mid = (t_1 + t_2) / 2
    eps_1 = v_diffusion_eps(x_vp, t_1)
    eps_2 = v_diffusion_eps(transfer(x_vp, eps_1, t_1, t_mid), t_mid)
    eps_3 = v_diffusion_eps(transfer(x_vp, eps_2, t_1, t_mid), t_mid)
    eps_4 = v_diffusion_eps(transfer(x_vp, eps_3, t_1, t_2), t_2)
    return transfer(x_vp, (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6, t_1, t_2), eps_1


@pytest.mark.parametrize("name", ["prk", "plms"])
def test_prk_and_plms_match_v_diffusion_in_alpha_space(name):
    ts = np.linspace(0.98, 0.05, 9)  # a grid in v-diffusion time, not ending at t = 0
    sigmas = np.tan(ts * np.pi / 2)
    x = np.asarray(jax.random.normal(jax.random.key(4), (3, 4)), np.float64) * sigmas[0]
    x_vp, old_eps = x * np.cos(ts[0] * np.pi / 2), []
    for i in range(len(ts) - 1):
        if name == "prk" or len(old_eps) < 3:
            x_vp, eps = prk_reference(x_vp, ts[i], ts[i + 1])
        else:
            eps = v_diffusion_eps(x_vp, ts[i])
            e = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
            x_vp = transfer(x_vp, e, ts[i], ts[i + 1])
        old_eps = (old_eps + [eps])[-3:]
    expect = x_vp / np.cos(ts[-1] * np.pi / 2)  # back to VE
    ours = sampling.sample(
        name, gaussian.denoiser, jnp.asarray(x, jnp.float32), jnp.asarray(sigmas, jnp.float32)
    )
    np.testing.assert_allclose(ours, expect, rtol=1e-4, atol=1e-4)

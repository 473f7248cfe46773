"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in k-diffusion's formulation.

They step in t = -log sigma with the data prediction D: over h = t_next - t the first-order update
is x_next = (sigma_next / sigma) x - expm1(-h) D, exact for a constant D. The SDE variants add
noise so that the marginals match the reverse SDE (eta = 1) or any mix with the ODE (0 < eta < 1).
A step to sigma_next = 0 returns D(x, sigma) (the `denoising step`).
"""

import jax.numpy as jnp
from jax import lax

from patchdiff.sampling.core import ancestral_step, call, is_zero, register, run_steps, to_d


def _t(sigma):
    return -jnp.log(sigma)


def _finite_h(sigma, sigma_next):
    """(h, last): the step in t, and whether it ends at sigma = 0, where h is infinite and the
    step returns D instead; h is then replaced by 1 so that no branch computes NaN."""
    last = sigma_next == 0
    return jnp.where(last, 1.0, _t(jnp.where(last, 1.0, sigma_next)) - _t(sigma)), last


def _safe_ratio(num, den, valid):
    """num / den where `valid`, 1 elsewhere: keeps the unused branch of a `where` free of NaN."""
    return jnp.where(valid, num, 1.0) / jnp.where(valid, den, 1.0)


@register("dpmpp_2s_ancestral")
def sample_dpmpp_2s_ancestral(
    denoiser, x, sigmas, *, key=None, noise=None, callback=None, eta=1.0, s_noise=1.0
):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps (midpoint r = 1/2)."""

    def step(x, state, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)

        def dpmpp_2s():
            h = _t(sigma_down) - _t(sigma)
            sigma_s = jnp.exp(-(_t(sigma) + h / 2))
            x_2 = (sigma_s / sigma) * x - jnp.expm1(-h / 2) * denoised
            denoised_2 = call(denoiser, x_2, sigma_s)
            return (sigma_down / sigma) * x - jnp.expm1(-h) * denoised_2

        euler = lambda: x + to_d(x, sigma, denoised) * (sigma_down - sigma)  # noqa: E731
        x = lax.cond(sigma_down == 0, euler, dpmpp_2s)
        if z is not None:
            x = x + z * s_noise * sigma_up
        return x, state, denoised

    draws = 0 if is_zero(eta) else 1
    return run_steps(
        "dpmpp_2s_ancestral", step, x, sigmas, key=key, noise=noise, draws=draws, callback=callback
    )


@register("dpmpp_sde")
def sample_dpmpp_sde(
    denoiser, x, sigmas, *, key=None, noise=None, callback=None, eta=1.0, s_noise=1.0, r=0.5
):
    """DPM-Solver++ (stochastic, two stages per step, the second at fraction r of the step).

    Its noise is Brownian: noise row i holds two standard normals, the normalised increments of a
    Brownian motion in sigma over [sigma_i, sigma_s] and [sigma_s, sigma_{i+1}]. The first stage
    uses the first; the second stage, which spans the whole step, uses their sum renormalised, as
    k-diffusion's Brownian-tree noise sampler gives.
    """

    def step(x, state, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)

        def dpmpp():
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            sigma_s = jnp.exp(-(t + h * r))
            fac = 1 / (2 * r)
            z_first = z_whole = 0.0
            if z is not None:
                span_1, span_2 = sigma - sigma_s, sigma_s - sigma_next
                z_first = z[0]
                z_whole = (jnp.sqrt(span_1) * z[0] + jnp.sqrt(span_2) * z[1]) / jnp.sqrt(
                    span_1 + span_2
                )
            # Stage 1: to sigma_s.
            sd, su = ancestral_step(sigma, sigma_s, eta)
            x_2 = (sd / sigma) * x - jnp.expm1(t - _t(sd)) * denoised
            x_2 = x_2 + z_first * s_noise * su
            denoised_2 = call(denoiser, x_2, sigma_s)
            # Stage 2: the whole step with the blended data prediction.
            sd, su = ancestral_step(sigma, sigma_next, eta)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x_new = (sd / sigma) * x - jnp.expm1(t - _t(sd)) * denoised_d
            return x_new + z_whole * s_noise * su

        euler = lambda: x + to_d(x, sigma, denoised) * (sigma_next - sigma)  # noqa: E731
        return lax.cond(sigma_next == 0, euler, dpmpp), state, denoised

    draws = 0 if is_zero(eta) else 2
    return run_steps(
        "dpmpp_sde", step, x, sigmas, key=key, noise=noise, draws=draws, callback=callback
    )


@register("dpmpp_2m")
def sample_dpmpp_2m(denoiser, x, sigmas, *, key=None, noise=None, callback=None):
    """DPM-Solver++(2M): second-order multistep with the previous step's D; first-order on the
    first step and on the step to sigma = 0."""

    def step(x, old_denoised, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)
        h = _t(sigma_next) - _t(sigma)
        ratio = sigma_next / sigma
        first = ratio * x - jnp.expm1(-h) * denoised
        multistep = (i > 0) & (sigma_next > 0)
        h_last = _t(sigma) - _t(sigmas[jnp.maximum(i - 1, 0)])
        r = _safe_ratio(h_last, h, multistep)
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        second = ratio * x - jnp.expm1(-h) * denoised_d
        return jnp.where(multistep, second, first), denoised, denoised

    return run_steps("dpmpp_2m", step, x, sigmas, jnp.zeros_like(x), callback=callback)


@register("dpmpp_2m_sde")
def sample_dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    *,
    key=None,
    noise=None,
    callback=None,
    eta=1.0,
    s_noise=1.0,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE; `solver_type` ("midpoint" or "heun") picks the 2nd-order correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(
            f"sample_dpmpp_2m_sde: solver_type {solver_type!r} is not known; known: heun, midpoint."
        )

    def step(x, old_denoised, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)
        h, last = _finite_h(sigma, sigma_next)
        eta_h = eta * h
        phi = -jnp.expm1(-h - eta_h)
        x_new = sigma_next / sigma * jnp.exp(-eta_h) * x + phi * denoised
        h_last = _t(sigma) - _t(sigmas[jnp.maximum(i - 1, 0)])
        inv_r = _safe_ratio(h, h_last, i > 0)
        if solver_type == "heun":
            correction = (phi / (-h - eta_h) + 1) * inv_r * (denoised - old_denoised)
        else:
            correction = 0.5 * phi * inv_r * (denoised - old_denoised)
        x_new = x_new + jnp.where(i > 0, correction, 0.0)
        if z is not None:
            x_new = x_new + z * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise
        return jnp.where(last, denoised, x_new), denoised, denoised

    draws = 0 if is_zero(eta) else 1
    return run_steps(
        "dpmpp_2m_sde",
        step,
        x,
        sigmas,
        jnp.zeros_like(x),
        key=key,
        noise=noise,
        draws=draws,
        callback=callback,
    )


@register("dpmpp_3m_sde")
def sample_dpmpp_3m_sde(
    denoiser, x, sigmas, *, key=None, noise=None, callback=None, eta=1.0, s_noise=1.0
):
    """DPM-Solver++(3M) SDE: third-order multistep from the third step on."""

    def step(x, history, i, sigma, sigma_next, z):
        denoised_1, denoised_2 = history
        denoised = call(denoiser, x, sigma)
        h, last = _finite_h(sigma, sigma_next)
        h_eta = h * (eta + 1)
        x_new = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * denoised
        h_1 = _t(sigma) - _t(sigmas[jnp.maximum(i - 1, 0)])
        h_2 = _t(sigmas[jnp.maximum(i - 1, 0)]) - _t(sigmas[jnp.maximum(i - 2, 0)])
        phi_2 = jnp.expm1(-h_eta) / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        # third order (i >= 2)
        r0 = _safe_ratio(h_1, h, i >= 1)
        r1 = _safe_ratio(h_2, h, i >= 2)
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        third = phi_2 * d1 - phi_3 * d2
        second = phi_2 * d1_0  # (i == 1)
        x_new = x_new + jnp.where(i >= 2, third, jnp.where(i >= 1, second, 0.0))
        if z is not None:
            x_new = x_new + z * sigma_next * jnp.sqrt(-jnp.expm1(-2 * h * eta)) * s_noise
        return jnp.where(last, denoised, x_new), (denoised, denoised_1), denoised

    draws = 0 if is_zero(eta) else 1
    history = (jnp.zeros_like(x), jnp.zeros_like(x))
    return run_steps(
        "dpmpp_3m_sde",
        step,
        x,
        sigmas,
        history,
        key=key,
        noise=noise,
        draws=draws,
        callback=callback,
    )

"""Karras-family samplers on the probability-flow ODE in sigma: Euler, Heun, DPM-2, their
ancestral variants, and linear multistep (k-diffusion's names, options and numbers).

Each step with sigma_next = 0 is an Euler step (x = D(x, sigma)), as in k-diffusion, so Heun with
n steps costs 2n - 1 denoiser calls. Churn (EDM Algorithm 2): where s_tmin <= sigma <= s_tmax the
level is raised to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / n, sqrt(2) - 1), by adding
noise of std sqrt(sigma_hat^2 - sigma^2) s_noise before the step.
"""

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from patchdiff.sampling.core import ancestral_step, call, is_zero, register, run_steps, to_d


def _churn(sigma, num_steps, s_churn, s_tmin, s_tmax):
    """sigma_hat of EDM Algorithm 2, lines 4-6."""
    gamma = jnp.minimum(s_churn / num_steps, math.sqrt(2) - 1)
    gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma, 0.0)
    return sigma * (gamma + 1)


def _churned(x, z, sigma, sigma_hat, s_noise):
    """x moved from sigma up to sigma_hat with the step's noise z (unchanged when z is None)."""
    if z is None:
        return x
    return x + z * s_noise * jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0))


def _log_midpoint(a, b):
    """exp((log a + log b) / 2): the midpoint of DPM-Solver-2 in log sigma."""
    return jnp.sqrt(a * b)


def _churned_sampler(name, denoiser, x, sigmas, key, noise, callback, churn, advance):
    """Shared by euler, heun and dpm_2: churn (EDM Alg. 2, lines 4-6), D at sigma_hat, then
    `advance(x, d, sigma_hat, sigma_next)` makes the method's step."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    num_steps = sigmas.shape[0] - 1

    def step(x, state, i, sigma, sigma_next, z):
        sigma_hat = _churn(sigma, num_steps, s_churn, s_tmin, s_tmax)
        x = _churned(x, z, sigma, sigma_hat, s_noise)
        denoised = call(denoiser, x, sigma_hat)
        return advance(x, to_d(x, sigma_hat, denoised), sigma_hat, sigma_next), state, denoised

    draws = 0 if is_zero(s_churn) else 1
    return run_steps(name, step, x, sigmas, key=key, noise=noise, draws=draws, callback=callback)


@register("euler")
def sample_euler(
    denoiser,
    x,
    sigmas,
    *,
    key=None,
    noise=None,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Euler's method (EDM Algorithm 2 without the correction), with optional churn."""

    def euler(x, d, sigma_hat, sigma_next):
        return x + d * (sigma_next - sigma_hat)

    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churned_sampler("euler", denoiser, x, sigmas, key, noise, callback, churn, euler)


@register("heun")
def sample_heun(
    denoiser,
    x,
    sigmas,
    *,
    key=None,
    noise=None,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Heun's second-order method with churn: EDM Algorithm 2."""

    def heun(x, d, sigma_hat, sigma_next):
        dt = sigma_next - sigma_hat

        def correct():
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, call(denoiser, x_2, sigma_next))
            return x + (d + d_2) / 2 * dt

        return lax.cond(sigma_next == 0, lambda: x + d * dt, correct)

    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churned_sampler("heun", denoiser, x, sigmas, key, noise, callback, churn, heun)


@register("dpm_2")
def sample_dpm_2(
    denoiser,
    x,
    sigmas,
    *,
    key=None,
    noise=None,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """DPM-Solver-2 steps in sigma (midpoint in log sigma), with EDM's churn."""

    def dpm_2(x, d, sigma_hat, sigma_next):
        def midpoint():
            sigma_mid = _log_midpoint(sigma_hat, sigma_next)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, call(denoiser, x_2, sigma_mid))
            return x + d_2 * (sigma_next - sigma_hat)

        return lax.cond(sigma_next == 0, lambda: x + d * (sigma_next - sigma_hat), midpoint)

    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churned_sampler("dpm_2", denoiser, x, sigmas, key, noise, callback, churn, dpm_2)


@register("euler_ancestral")
def sample_euler_ancestral(
    denoiser, x, sigmas, *, key=None, noise=None, callback=None, eta=1.0, s_noise=1.0
):
    """Ancestral sampling with Euler steps: down to sigma_down, then noise of std sigma_up."""
    return ancestral_euler(
        "euler_ancestral", denoiser, x, sigmas, key, noise, callback, eta, s_noise
    )


def ancestral_euler(name, denoiser, x, sigmas, key, noise, callback, eta, s_noise):
    """Shared by `euler_ancestral` and `ddim` (which is the same step in sigma, eta = 0 default)."""

    def step(x, state, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if z is not None:
            x = x + z * s_noise * sigma_up  # sigma_up is 0 on the last step (sigma_next = 0)
        return x, state, denoised

    draws = 0 if is_zero(eta) else 1
    return run_steps(name, step, x, sigmas, key=key, noise=noise, draws=draws, callback=callback)


@register("dpm_2_ancestral")
def sample_dpm_2_ancestral(
    denoiser, x, sigmas, *, key=None, noise=None, callback=None, eta=1.0, s_noise=1.0
):
    """Ancestral sampling with DPM-Solver-2 steps."""

    def step(x, state, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)

        def dpm_2():
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, call(denoiser, x_2, sigma_mid))
            return x + d_2 * (sigma_down - sigma)

        x = lax.cond(sigma_down == 0, lambda: x + d * (sigma_down - sigma), dpm_2)
        if z is not None:
            x = x + z * s_noise * sigma_up
        return x, state, denoised

    draws = 0 if is_zero(eta) else 1
    return run_steps(
        "dpm_2_ancestral", step, x, sigmas, key=key, noise=noise, draws=draws, callback=callback
    )


def lms_coefficients(sigmas, i, order: int):
    """Adams-Bashforth weights on a non-uniform grid: [order] floats, weight j for the derivative
    at sigma_{i-j}, each the integral over [sigma_i, sigma_{i+1}] of its Lagrange basis polynomial
    through sigma_i, ..., sigma_{i-order+1}. Gauss-Legendre with `order` nodes is exact for these
    polynomials of degree order - 1 (k-diffusion integrates them numerically with scipy)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    lo, hi = sigmas[i], sigmas[i + 1]
    taus = (hi - lo) / 2 * jnp.asarray(nodes) + (hi + lo) / 2  # [order]
    points = [sigmas[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        basis = jnp.ones_like(taus)
        for k in range(order):
            if k != j:
                basis = basis * (taus - points[k]) / (points[j] - points[k])
        coeffs.append((hi - lo) / 2 * jnp.sum(jnp.asarray(weights) * basis))
    return jnp.stack(coeffs)


@register("lms")
def sample_lms(denoiser, x, sigmas, *, key=None, noise=None, callback=None, order=4):
    """Linear multistep of `order` (4 by default); the first steps use the orders available."""
    if order < 1:
        raise ValueError(f"sample_lms: order must be at least 1; got {order}.")

    def coefficients(i):
        # step i has min(i + 1, order) past derivatives; pad the weights to `order`
        branches = [
            lambda i, o=o: jnp.pad(lms_coefficients(sigmas, i, o), (0, order - o))
            for o in range(1, order + 1)
        ]
        return lax.switch(jnp.minimum(i, order - 1), branches, i)

    def step(x, ds, i, sigma, sigma_next, z):
        denoised = call(denoiser, x, sigma)
        ds = jnp.concatenate([to_d(x, sigma, denoised)[None], ds[:-1]])  # newest first
        coeffs = coefficients(i).astype(x.dtype)
        return x + jnp.tensordot(coeffs, ds, axes=1), ds, denoised

    history = jnp.zeros((order, *x.shape), x.dtype)
    return run_steps("lms", step, x, sigmas, history, callback=callback)

"""Sigma grids: n + 1 descending noise levels ending in 0, with k-diffusion's conventions.

Karras et al. 2022 (EDM) Eq. 5 for `karras`; `exponential` and `polyexponential` are k-diffusion's;
`vp` is the continuous VP schedule of Song et al. 2021 as EDM writes it (Table 1). Respacing picks
K of a discrete model's T trained levels the way ADM's `space_timesteps` does ("250", "ddim50",
"10,15,20").
"""

import math

import jax.numpy as jnp
import numpy as np


def append_zero(sigmas):
    """[n] -> [n + 1]: the final step of every grid denoises to sigma = 0."""
    return jnp.concatenate([sigmas, jnp.zeros_like(sigmas[:1])])


def get_sigmas_karras(n: int, sigma_min, sigma_max, rho=7.0):
    """EDM Eq. 5: (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0. -> [n+1]"""
    ramp = jnp.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(n: int, sigma_min, sigma_max):
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0. -> [n + 1]"""
    return append_zero(jnp.exp(jnp.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def get_sigmas_polyexponential(n: int, sigma_min, sigma_max, rho=1.0):
    """log sigma = log s_min + (1 - i/(n-1))^rho (log s_max - log s_min), then 0 (rho = 1 is
    `exponential`). -> [n + 1]"""
    ramp = jnp.linspace(1, 0, n) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return append_zero(jnp.exp(ramp * (log_max - log_min) + log_min))


def get_sigmas_vp(n: int, beta_d=19.9, beta_min=0.1, eps_s=1e-3):
    """Continuous VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t from 1 to eps_s,
    then 0. -> [n + 1]"""
    t = jnp.linspace(1, eps_s, n)
    # expm1, not exp - 1: near t = eps_s the difference would lose most float32 digits
    return append_zero(jnp.sqrt(jnp.expm1(beta_d * t**2 / 2 + beta_min * t)))


def space_timesteps(num_timesteps: int, spacing: str) -> list[int]:
    """ADM's `space_timesteps`: which of T trained timesteps a respaced sampler visits, ascending.

    "ddimN": every k-th step from 0, with the stride k that gives exactly N steps (as DDIM does);
    "N" or "N1,N2,...": T is cut into equal sections and N_i steps are spread evenly in section i,
    ends included (rounded as ADM rounds).
    """
    if spacing.startswith("ddim"):
        count = int(spacing[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(
            f"timestep respacing {spacing!r}: no stride gives exactly {count} of {num_timesteps} "
            "steps."
        )
    try:
        counts = [int(c) for c in spacing.split(",")]
    except ValueError:
        raise ValueError(
            f"timestep respacing {spacing!r} is not allowed: use 'N', 'N1,N2,...' or 'ddimN'."
        ) from None
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(
                f"timestep respacing {spacing!r}: section {i} has {size} steps and cannot take "
                f"{count}."
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not multiplied, so that rounding matches ADM's step for step
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def get_sigmas_respaced(trained_sigmas, spacing: str):
    """A discrete model's trained sigmas [T] (ascending in t) respaced to K steps: the K chosen
    levels, descending, then 0. -> [K + 1]"""
    trained = np.asarray(trained_sigmas)
    steps = space_timesteps(len(trained), spacing)
    return append_zero(jnp.asarray(trained[steps[::-1]], jnp.float32))

"""Preconditionings: every parameterisation as one denoiser D(x, sigma) in the VE convention.

Karras et al. 2022 (EDM), Table 1 and Eq. 7: with x = x0 + sigma * n, any network F becomes

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))

so one sampler works with every model. Each parameterisation below is a frozen dataclass (hashable,
so it can be a static argument of `jax.jit`) with `scalings(sigma) -> (c_skip, c_out, c_in,
c_noise)`; `denoise` applies them. What the network F learns:

| name   | F predicts                    | source                                        |
| ------ | ----------------------------- | --------------------------------------------- |
| `edm`  | a mix of x0 and n             | Karras et al. 2022, Eq. 7 and Table 1         |
| `vp`   | the noise eps (DDPM/ADM)      | Ho et al. 2020; Nichol & Dhariwal 2021        |
| `ve`   | the noise scaled by sigma     | Song & Ermon 2019; Song et al. 2021 (Table 1) |
| `v`    | v = alpha eps - s x0          | Salimans & Ho 2022 (progressive distillation) |
| `flow` | the velocity n - x0           | Liu et al. 2022; Lipman et al. 2022           |

Glossary: B batch, T discrete timesteps. Sigmas are arrays of any shape; the scalings broadcast.
"""

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from patchdiff.registry import Registry

PRECONDITIONINGS: Registry[type] = Registry("parameterisation")


def edm_scalings(sigma, sigma_data=0.5):
    """EDM's preconditioning (Karras et al. 2022, Table 1): sigma [...] -> 4 arrays [...].

    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),  c_noise = ln(sigma) / 4.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data * jnp.reciprocal(jnp.sqrt(total))
    c_in = jnp.reciprocal(jnp.sqrt(total))
    c_noise = jnp.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


@PRECONDITIONINGS.register("edm")
@dataclasses.dataclass(frozen=True)
class EDM:
    """EDM (Karras et al. 2022); `sigma_data` is the data's std (0.5 for [-1, 1] images)."""

    sigma_data: float = 0.5
    default_noise_distribution = "lognormal"

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)


@PRECONDITIONINGS.register("ve")
@dataclasses.dataclass(frozen=True)
class VE:
    """Variance exploding (SMLD / NCSN++), EDM Table 1: c_skip 1, c_out sigma, c_in 1,
    c_noise ln(sigma / 2). D = x + sigma F, so F learns -n, the score times sigma."""

    default_noise_distribution = "log_uniform"

    def scalings(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        one = jnp.ones_like(sigma)
        return one, sigma, one, jnp.log(0.5 * sigma)


@functools.lru_cache(maxsize=8)
def vp_sigmas(schedule: str, num_timesteps: int) -> np.ndarray:
    """The trained noise levels of a discrete DDPM/ADM model: [T] float64, increasing.

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the VE noise level that matches
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps after dividing by sqrt(alpha_bar_t).
    Schedules: `linear` (Ho et al. 2020; betas 1e-4..0.02 at T=1000, scaled by 1000/T as in ADM's
    `get_named_beta_schedule`) and `cosine` (Nichol & Dhariwal 2021, Eq. 17, s=0.008, betas
    clipped at 0.999).
    """
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    elif schedule == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_timesteps, dtype=np.float64)
        betas = np.array(
            [1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps) for i in steps]
        )
        betas = np.minimum(betas, 0.999)
    else:
        raise ValueError(f"vp schedule {schedule!r} is not known; known: cosine, linear.")
    if betas.max() >= 1:
        raise ValueError(
            f"the linear vp schedule with {num_timesteps} timesteps has betas up to "
            f"{betas.max():.3g}; it needs more than 20 timesteps (ADM scales betas by 1000 / T)."
        )
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


@PRECONDITIONINGS.register("vp")
@dataclasses.dataclass(frozen=True)
class VP:
    """Discrete-time DDPM/ADM: the network predicts eps from x_t = x / sqrt(1 + sigma^2).

    c_skip 1, c_out -sigma, c_in 1 / sqrt(1 + sigma^2) (EDM Table 1, VP column); c_noise is the
    timestep t in [0, T-1] whose trained sigma matches, interpolated linearly in log sigma between
    the trained levels as k-diffusion's `DiscreteSchedule.sigma_to_t` does, so that samplers may ask
    for any sigma inside the trained range (it clamps outside).
    """

    schedule: str = "linear"
    num_timesteps: int = 1000
    default_noise_distribution = "vp_uniform"

    @property
    def sigmas(self) -> np.ndarray:
        """The trained levels, [T] float32, increasing with t."""
        return vp_sigmas(self.schedule, self.num_timesteps).astype(np.float32)

    def sigma_to_t(self, sigma):
        log_sigmas = jnp.log(jnp.asarray(self.sigmas))
        steps = jnp.arange(self.num_timesteps, dtype=jnp.float32)
        return jnp.interp(jnp.log(sigma), log_sigmas, steps)

    def scalings(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        c_in = jnp.reciprocal(jnp.sqrt(sigma**2 + 1))
        return jnp.ones_like(sigma), -sigma, c_in, self.sigma_to_t(sigma)


@PRECONDITIONINGS.register("v")
@dataclasses.dataclass(frozen=True)
class V:
    """The v-objective (Salimans & Ho 2022, Appendix D), written for data of std `sigma_data`.

    With alpha = sd / sqrt(sigma^2 + sd^2) and s = sigma / sqrt(sigma^2 + sd^2), the network input
    c_in x = alpha (x0 / sd) + s n is the VP latent of the unit-variance data x0 / sd, and the
    target v = alpha n - s x0 / sd gives x0 = sd (alpha c_in x - s v), that is
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = -sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2) (k-diffusion's `VDenoiser`); sigma_data = 1 is the original
    unit-variance form. Time: t = (2 / pi) atan(sigma / sd) in [0, 1); c_noise = 1000 t so that a
    positional embedding sees DDPM-sized inputs.
    """

    sigma_data: float = 0.5
    default_noise_distribution = "logit_normal"

    def sigma_from_t(self, t):
        return self.sigma_data * jnp.tan(t * jnp.pi / 2)

    def scalings(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        sd = self.sigma_data
        total = sigma**2 + sd**2
        c_out = -sigma * sd * jnp.reciprocal(jnp.sqrt(total))
        t = jnp.arctan(sigma / sd) * 2 / jnp.pi
        return sd**2 / total, c_out, jnp.reciprocal(jnp.sqrt(total)), 1000 * t


@PRECONDITIONINGS.register("flow")
@dataclasses.dataclass(frozen=True)
class Flow:
    """Rectified flow (Liu et al. 2022): x_t = (1 - t) x0 + t n, F predicts u = n - x0.

    In the VE convention sigma = t / (1 - t) and x_t = x / (1 + sigma); x0 = x_t - t u gives
    c_skip = c_in = 1 / (1 + sigma), c_out = -sigma / (1 + sigma); c_noise = 1000 t.
    """

    default_noise_distribution = "logit_normal"

    def sigma_from_t(self, t):
        return t / (1 - t)

    def scalings(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        c_in = jnp.reciprocal(1 + sigma)
        t = sigma * c_in
        return c_in, -t, c_in, 1000 * t


def broadcast_to(values, x):
    """Reshapes per-example values [B] to [B, 1, ..., 1] so that they broadcast against x."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))


def denoise(net_fn, precond, x, sigma, **net_kwargs):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, ...): x [B, ...], sigma [B] -> [B, ...].

    `net_fn(x_in, c_noise, **net_kwargs)` is the bare network F (EDM Eq. 7); its output is cast to
    float32 so that a bf16 network still returns an fp32 denoised image.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in, c_noise = precond.scalings(sigma)
    out = net_fn(broadcast_to(c_in, x) * x, c_noise, **net_kwargs).astype(jnp.float32)
    return broadcast_to(c_skip, x) * x + broadcast_to(c_out, x) * out

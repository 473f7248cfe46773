"""Training noise-level distributions: key, shape -> sigma [shape] float32.

| name           | draw                                          | source                          |
| -------------- | --------------------------------------------- | ------------------------------- |
| `lognormal`    | ln sigma ~ N(P_mean, P_std^2)                 | EDM (Karras et al. 2022), Sec 5 |
| `log_uniform`  | ln sigma ~ U(ln sigma_min, ln sigma_max)      | VE training in EDM's code       |
| `vp_uniform`   | t ~ U{0..T-1}, sigma = trained sigma_t        | DDPM / ADM                      |
| `logit_normal` | t = sigmoid(m + s n), sigma = sigma_from_t(t) | Esser et al. 2024 (SD3), Eq. 19 |

`cosine_interpolated` (Crowson et al. 2024, HDiT, Sec. 4): u ~ U(0, 1) through two cosine log-SNR
schedules shifted for two resolutions, blended by u.

Each is a pure function with its hyper-parameters as keyword arguments; `build.py` binds them
from the config.
"""

import jax
import jax.numpy as jnp

from patchdiff.registry import Registry

NOISE_DISTRIBUTIONS = Registry("noise distribution")

# logit-normal t is clipped away from {0, 1}: sigma_from_t(1) is infinite for `v` and `flow`.
T_EPS = 1e-5


@NOISE_DISTRIBUTIONS.register("lognormal")
def lognormal(key, shape, *, p_mean=-1.2, p_std=1.2):
    """EDM's training distribution: sigma = exp(P_mean + P_std n), n ~ N(0, 1)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))


@NOISE_DISTRIBUTIONS.register("log_uniform")
def log_uniform(key, shape, *, sigma_min=0.02, sigma_max=100.0):
    """sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1) (EDM's VELoss)."""
    u = jax.random.uniform(key, shape, jnp.float32)
    return sigma_min * (sigma_max / sigma_min) ** u


@NOISE_DISTRIBUTIONS.register("vp_uniform")
def vp_uniform(key, shape, *, sigmas):
    """A discrete model's trained levels drawn uniformly: sigmas [T] -> sigma [shape]."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    index = jax.random.randint(key, shape, 0, sigmas.shape[0])
    return sigmas[index]


@NOISE_DISTRIBUTIONS.register("logit_normal")
def logit_normal(key, shape, *, sigma_from_t, mean=0.0, std=1.0):
    """t = sigmoid(mean + std n) clipped to [T_EPS, 1 - T_EPS], mapped by `sigma_from_t`."""
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
    return sigma_from_t(jnp.clip(t, T_EPS, 1 - T_EPS))


def _cosine_logsnr(u, logsnr_low, logsnr_high):
    """The cosine schedule of Nichol & Dhariwal (2021) as a log-SNR: u = 0 gives logsnr_low
    (most noise), u = 1 logsnr_high, through logsnr = -2 log tan(angle) with the angle
    interpolated linearly between the two ends' arctan(exp(-logsnr / 2))."""
    start = jnp.arctan(jnp.exp(-0.5 * logsnr_low))
    stop = jnp.arctan(jnp.exp(-0.5 * logsnr_high))
    return -2.0 * jnp.log(jnp.tan(start + u * (stop - start)))


def _shifted_cosine_logsnr(u, logsnr_low, logsnr_high, shift):
    """The cosine schedule moved by `shift` in log-SNR (Hoogeboom et al. 2023, "simple
    diffusion": a d x d image at resolution D has the SNR of a noise_d image shifted by
    2 log(noise_d / D)), with its ends moved too so that the range stays the same."""
    return _cosine_logsnr(u, logsnr_low - shift, logsnr_high - shift) + shift


@NOISE_DISTRIBUTIONS.register("cosine_interpolated")
def cosine_interpolated(
    key, shape, *, image_d, noise_d_low=32, noise_d_high=None, sigma_data=0.5,
    sigma_min=1e-3, sigma_max=1e3,
):  # fmt: skip
    """HDiT's training levels: u ~ U(0, 1); the log-SNR is (1 - u) x the cosine schedule shifted
    for a noise_d_low image plus u x the one shifted for noise_d_high (default: image_d itself),
    so high noise levels follow the low-resolution shift and low levels the full-resolution one;
    sigma = sigma_data exp(-logsnr / 2) over [sigma_min, sigma_max] (k-diffusion's
    `rand_cosine_interpolated`, with its min 1e-3 and max 1e3 widened to the config's range)."""
    noise_d_high = image_d if noise_d_high is None else noise_d_high
    logsnr_low = -2.0 * jnp.log(sigma_max / sigma_data)  # the noisiest end
    logsnr_high = -2.0 * jnp.log(sigma_min / sigma_data)
    u = jax.random.uniform(key, shape, jnp.float32)
    shifts = [2.0 * jnp.log(d / image_d) for d in (noise_d_low, noise_d_high)]
    low, high = (_shifted_cosine_logsnr(u, logsnr_low, logsnr_high, s) for s in shifts)
    logsnr = (1.0 - u) * low + u * high
    return sigma_data * jnp.exp(-0.5 * logsnr)

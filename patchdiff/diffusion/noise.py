"""Training noise-level distributions: key, shape -> sigma [shape] float32.

| name           | draw                                          | source                          |
| -------------- | --------------------------------------------- | ------------------------------- |
| `lognormal`    | ln sigma ~ N(P_mean, P_std^2)                 | EDM (Karras et al. 2022), Sec 5 |
| `log_uniform`  | ln sigma ~ U(ln sigma_min, ln sigma_max)      | VE training in EDM's code       |
| `vp_uniform`   | t ~ U{0..T-1}, sigma = trained sigma_t        | DDPM / ADM                      |
| `logit_normal` | t = sigmoid(m + s n), sigma = sigma_from_t(t) | Esser et al. 2024 (SD3), Eq. 19 |

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

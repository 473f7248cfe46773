"""The denoising loss (EDM Eq. 8): draw sigma and noise, denoise, weight, average.

Pure: the network, parameterisation, noise-level distribution and weighting come in as arguments
(`build.py` makes them from a config). Glossary: B batch, H/W height/width, C channels.
"""

import jax
import jax.numpy as jnp

from patchdiff.diffusion.precond import broadcast_to, denoise


def denoising_loss(net_fn, key, x0, *, precond, sample_sigma, weighting, **net_kwargs):
    """Per-example weighted loss: x0 [B, H, W, C] -> [B].

    loss_i = lambda(sigma_i) mean_pixels (D(x0_i + sigma_i n_i, sigma_i) - x0_i)^2, with sigma_i
    from `sample_sigma(key, (B,))` and n_i ~ N(0, I). `net_kwargs` (labels, coords, train flag,
    dropout rngs) go to `net_fn(x_in, c_noise, **net_kwargs)` unchanged: coordinate channels
    describe the crop and are never noised.
    """
    sigma_key, noise_key = jax.random.split(key)
    sigma = sample_sigma(sigma_key, x0.shape[:1])  # [B]
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x = x0 + broadcast_to(sigma, x0) * noise
    denoised = denoise(net_fn, precond, x, sigma, **net_kwargs)
    squared = jnp.mean(jnp.square(denoised - x0), axis=tuple(range(1, x0.ndim)))
    return weighting(sigma) * squared

"""Denoisers built from denoisers: classifier-free guidance and SNR-split model routing.

Both return an ordinary `denoiser(x, sigma)`, so every sampler takes them unchanged.
"""

import jax
import jax.numpy as jnp


def classifier_free_guidance(denoiser, cond, uncond, scale):
    """D = D_u + scale (D_c - D_u) (Ho & Salimans 2022), both halves in one network call.

    `denoiser(x, sigma, cond)` takes a conditioning pytree batched like x (labels [B], ...);
    `cond` and `uncond` (e.g. the null label) are such pytrees. scale = 1 is the conditional
    denoiser, 0 the unconditional. Returns denoiser(x [B, ...], sigma [B]) -> [B, ...].
    """

    if isinstance(scale, int | float) and scale in (0, 1):
        # D_u + 1 (D_c - D_u) is D_c, and scale 0 is D_u: one network call instead of two.
        only = cond if scale == 1 else uncond
        return lambda x, sigma: denoiser(x, sigma, only)

    def guided(x, sigma):
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
        out = denoiser(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), both)
        d_cond, d_uncond = jnp.split(out, 2)
        return d_uncond + scale * (d_cond - d_uncond)

    return guided


def snr_split_denoiser(denoise_fn, stacked_params, sigma_boundaries, *, per_example=False):
    """One denoiser over K models, each trained for a range of noise levels (Luhman & Luhman
    2022's `snr_splits`).

    denoise_fn(params, x, sigma) -> D; stacked_params: K parameter sets stacked on a leading axis
    (`jax.tree.map(lambda *p: jnp.stack(p), *param_sets)`); sigma_boundaries: K - 1 ascending
    levels: model k serves sigma_boundaries[k-1] <= sigma < sigma_boundaries[k] (model 0 the
    least noise, i.e. the highest SNR = 1 / sigma^2). Routing by the first sigma of the batch runs
    one model, which is right for samplers (one sigma per call); `per_example=True` routes each
    example by its own sigma (as in training batches), at the cost of a per-example network call.
    """
    boundaries = jnp.asarray(sigma_boundaries)
    num_models = jax.tree.leaves(stacked_params)[0].shape[0]
    if boundaries.shape != (num_models - 1,):
        raise ValueError(
            f"snr_split_denoiser: {num_models} models need {num_models - 1} sigma boundaries; "
            f"got {boundaries.shape[0] if boundaries.ndim else 0}."
        )

    def params_for(sigma):
        index = jnp.searchsorted(boundaries, sigma, side="right")
        return jax.tree.map(lambda p: p[index], stacked_params)

    def routed(x, sigma):
        if per_example:
            one = lambda x_i, s_i: denoise_fn(params_for(s_i), x_i[None], s_i[None])[0]  # noqa: E731
            return jax.vmap(one)(x, sigma)
        return denoise_fn(params_for(sigma[0]), x, sigma)

    return routed

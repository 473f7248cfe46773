"""Images from a trained network: the EMA parameters, the configured sampler and guidance.

`make_generator(model, config)` returns a jitted function (params, key, labels) -> images in
[-1, 1]; `--mode sample` (`run`) writes config.sample.num_images of them as PNG files and one
.npz from the newest checkpoint.
"""

import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from patchdiff import sampling
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.precond import denoise
from patchdiff.train.report import save_grid, to_uint8


def sigma_grid(config):
    s = config.sample
    d = config.diffusion
    precond = diffusion_build.build_precond(d)
    if hasattr(precond, "sigmas"):  # a discrete model: its own trained range
        lo, hi = float(precond.sigmas[0]), float(precond.sigmas[-1])
    else:
        lo, hi = d.sigma_min, d.sigma_max
    return sampling.get_sigmas_karras(s.steps, lo, hi, s.rho), precond


def make_generator(model, config):
    """(params, key, labels [N] or None) -> images [N, R, R, C] in [-1, 1], jitted."""
    s, m, data = config.sample, config.model, config.data
    sigmas, precond = sigma_grid(config)
    # The sampler's own signature says which of the config's noise options it takes.
    accepted = inspect.signature(sampling.SAMPLERS.get(s.sampler)).parameters
    options = {}
    if "s_churn" in accepted and s.churn:
        options["s_churn"] = s.churn
    if "eta" in accepted:
        options["eta"] = s.eta

    def generate(params, key, labels):
        def net(x_in, c_noise, **kw):
            return model.apply({"params": params}, x_in, c_noise, **kw)

        if m.num_classes:
            cond = lambda x, sig, lab: denoise(net, precond, x, sig, labels=lab)  # noqa: E731
            null = jnp.full_like(labels, m.num_classes)
            denoiser = sampling.classifier_free_guidance(cond, labels, null, s.guidance_scale)
        else:
            denoiser = lambda x, sig: denoise(net, precond, x, sig)  # noqa: E731
        init_key, noise_key = jax.random.split(key)
        shape = (labels.shape[0], data.resolution, data.resolution, data.channels)
        x = sigmas[0] * jax.random.normal(init_key, shape)
        # every sampler takes a key; the deterministic ones ignore it
        out = sampling.sample(s.sampler, denoiser, x, sigmas, key=noise_key, **options)
        return jnp.clip(out, -1, 1)

    return jax.jit(generate)


def labels_for(config, start: int, count: int):
    """Class labels cycling 0..K-1 (every class in a grid), or zeros for unconditional models."""
    k = config.model.num_classes
    return jnp.asarray((np.arange(start, start + count) % k) if k else np.zeros(count), jnp.int32)


def generate_all(generator, params, config, num: int):
    """`num` images as uint8 [N, R, R, C] and their labels, in batches of sample.batch_size."""
    s = config.sample
    images, labels = [], []
    for start in range(0, num, s.batch_size):
        count = min(s.batch_size, num - start)
        lab = labels_for(config, start, s.batch_size)  # a fixed batch shape: one compilation
        key = jax.random.fold_in(jax.random.key(s.seed), start)
        images.append(to_uint8(generator(params, key, lab))[:count])
        labels.append(np.asarray(lab)[:count])
    return np.concatenate(images), np.concatenate(labels)


def write_samples(images, labels, folder) -> pathlib.Path:
    """PNG per image, all of them in images.npz, and a grid.png."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            folder / f"{i:06d}.png"
        )
    np.savez(folder / "images.npz", images=images, labels=labels)
    save_grid(images[:64], folder / "grid.png")
    return folder

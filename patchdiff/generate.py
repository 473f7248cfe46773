"""Images from a trained network: the EMA parameters, the configured sampler and guidance.

`make_generator(model, config)` returns a jitted function (params, keys [N], labels [N]) ->
images [N, R, R, C] in [-1, 1] (for latent diffusion, the latents decoded by the VAE: pixels).
Image i is made from its own key alone (its starting noise and every noise draw of a stochastic
sampler): the sampler runs under `jax.vmap` over images, so an image does not depend on the batch
it was drawn in, nor on how many devices shared that batch.
`image_keys(seed, start, count)` gives image i the key fold_in(key(seed), i), EDM's "seed i".

`--mode sample` (`run`) writes config.sample.num_images of them as PNG files and one .npz from
the newest checkpoint.

Glossary: N images, R resolution, C channels.
"""

import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from patchdiff import latent, sampling, xla_cpu
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.precond import denoise
from patchdiff.train.report import save_grid, to_uint8


def sigma_grid(config, steps=None):
    s = config.sample
    d = config.diffusion
    precond = diffusion_build.build_precond(d)
    if hasattr(precond, "sigmas"):  # a discrete model: its own trained range
        lo, hi = float(precond.sigmas[0]), float(precond.sigmas[-1])
    else:
        lo, hi = d.sigma_min, d.sigma_max
    return sampling.get_sigmas_karras(steps or s.steps, lo, hi, s.rho), precond


def make_generator(model, config, *, sampler=None, steps=None, guidance_scale=None):
    """(params, keys [N] (typed keys), labels [N] or None) -> images [N, R, R, C] in [-1, 1],
    jitted. `sampler`, `steps`, `guidance_scale` override config.sample's (the evaluation's own
    settings)."""
    s, m, data = config.sample, config.model, config.data
    sampler = sampler or s.sampler
    scale = s.guidance_scale if guidance_scale is None else guidance_scale
    sigmas, precond = sigma_grid(config, steps)
    # The sampler's own signature says which of the config's noise options it takes.
    accepted = inspect.signature(sampling.SAMPLERS.get(sampler)).parameters
    options = {}
    if "s_churn" in accepted and s.churn:
        options.update(s_churn=s.churn, s_tmin=s.s_tmin, s_tmax=s.s_tmax, s_noise=s.s_noise)
    if "eta" in accepted:
        options["eta"] = s.eta
    shape = (1, data.resolution, data.resolution, data.channels)

    def one(params, key, label):
        """One image [1, R, R, C] from its key; under vmap the network sees the whole batch."""

        def net(x_in, c_noise, **kw):
            return model.apply({"params": params}, x_in, c_noise, **kw)

        if m.num_classes:
            labels = label[None]
            cond = lambda x, sig, lab: denoise(net, precond, x, sig, labels=lab)  # noqa: E731
            null = jnp.full_like(labels, m.num_classes)
            denoiser = sampling.classifier_free_guidance(cond, labels, null, scale)
        else:
            denoiser = lambda x, sig: denoise(net, precond, x, sig)  # noqa: E731
        init_key, noise_key = jax.random.split(key)
        x = sigmas[0] * jax.random.normal(init_key, shape)
        # every sampler takes a key; the deterministic ones ignore it
        out = sampling.sample(sampler, denoiser, x, sigmas, key=noise_key, **options)
        return jnp.clip(out, -1, 1)[0]

    def generate(params, keys, labels):
        if labels is None:
            labels = jnp.zeros(keys.shape[:1], jnp.int32)
        return jax.vmap(one, in_axes=(None, 0, 0))(params, keys, labels)

    generate = xla_cpu.jit(generate)
    decode = latent.make_decoder(config)
    if decode is None:
        return generate
    # Latents leave the sampler in model space; the VAE's decoder is its own program, its
    # parameters an argument rather than constants folded into the sampler's.
    return lambda params, keys, labels: decode(generate(params, keys, labels))


def image_keys(seed: int, start: int, count: int):
    """Typed keys [count] of images start .. start + count - 1: fold_in(key(seed), i)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def labels_for(config, start: int, count: int):
    """Class labels of images start.., cycling 0..K-1 (every class in a grid, balanced classes
    in an evaluation), or zeros for unconditional models."""
    k = config.model.num_classes
    return jnp.asarray((np.arange(start, start + count) % k) if k else np.zeros(count), jnp.int32)


def generate_batches(generator, params, config, num: int, *, seed=None, start=0, batch=None):
    """Yields (first image number, uint8 [n, R, R, C]) for images start .. start + num - 1, in
    batches of `batch` (default sample.batch_size). The last batch is padded to the same shape
    (one compilation) and its extra images dropped."""
    seed = config.sample.seed if seed is None else seed
    batch = batch or config.sample.batch_size
    for first in range(start, start + num, batch):
        count = min(batch, start + num - first)
        keys, lab = image_keys(seed, first, batch), labels_for(config, first, batch)
        yield first, to_uint8(generator(params, keys, lab))[:count]


def generate_all(generator, params, config, num: int, *, seed=None, start=0):
    """`num` images as uint8 [N, R, R, C] and their labels."""
    images = [
        im for _, im in generate_batches(generator, params, config, num, seed=seed, start=start)
    ]
    return np.concatenate(images), np.asarray(labels_for(config, start, num))


def write_pngs(images, folder, start: int = 0) -> pathlib.Path:
    """One PNG per uint8 image [N, R, R, C], named by its image number (start, start + 1, ...)."""
    from PIL import Image

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            folder / f"{start + i:06d}.png"
        )
    return folder


def write_summary(images, labels, folder, npz: bool = True) -> pathlib.Path:
    """FOLDER_grid.png (beside the folder, which then holds only the images, ready for any FID
    tool) of the first 64 images and, with `npz`, all of them in FOLDER/images.npz."""
    folder = pathlib.Path(folder)
    if npz:
        np.savez(folder / "images.npz", images=images, labels=labels[: len(images)])
    save_grid(images[:64], folder.parent / f"{folder.name}_grid.png")
    return folder

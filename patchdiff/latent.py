"""Latent diffusion's edge: from a config whose data are VAE latents (`data.source = "latents"`)
to the VAE that decodes its samples and to the pixel images its samples are compared with.

The latents' folder (written by `python -m patchdiff.data.encode`) is the authority: its
meta.json names the VAE, the scaling and shift the latents were trained in, and the pixel dataset
they came from. `config.latent.vae` and `config.latent.scaling_factor` override the first two
(a VAE moved to another disk; a scale of one's own). Samples leave the network in model space,
(z - shift) * scale, and `make_decoder` maps them back to pixels in [-1, 1].

Glossary: N images, h/w and C the latents' size and channels, H/W the pixels' size.
"""

import functools

import jax.numpy as jnp

from patchdiff import xla_cpu
from patchdiff.data.sources import DataError


def is_latent(config) -> bool:
    return config.data.source == "latents"


def meta(config, split=None) -> dict:
    """The meta.json of the latents `config.data` names (split: default config.data.split)."""
    from patchdiff.data.latents import read_meta

    return read_meta(config.data.path, split or config.data.split)


def scaling(config, info=None) -> tuple[float, float]:
    """(scale, shift) of the latents in model space: config.latent.scaling_factor when set,
    otherwise the latents' own (their VAE's)."""
    info = info or meta(config)
    scale = config.latent.scaling_factor or info["scaling_factor"]
    return float(scale), float(info.get("shift_factor") or 0.0)


@functools.lru_cache(maxsize=4)
def _load(path: str):
    """One copy of a VAE per path and process: the trainer's grids and evaluator share it."""
    from patchdiff.models.vae import from_pretrained

    return from_pretrained(path)


def load_vae(config):
    """The VAE that decodes `config`'s samples: config.latent.vae, or the latents' own."""
    from patchdiff.models.vae import VAEError

    info = meta(config)
    path = config.latent.vae or info["vae"]["path"]
    try:
        vae = _load(str(path))
    except VAEError as e:
        where = "config.latent.vae" if config.latent.vae else f"the VAE named in {config.data.path}"
        raise DataError(f"{where}: {e}") from None
    if vae.latent_channels != config.data.channels:
        raise DataError(
            f"the VAE {path} has {vae.latent_channels} latent channels but "
            f"config.data.channels = {config.data.channels}: the latents and the VAE must match."
        )
    return vae


def pixel_shape(config) -> tuple[int, int]:
    """(resolution, channels) of the images `config` generates: the VAE's output for latents."""
    if not is_latent(config):
        return config.data.resolution, config.data.channels
    info = meta(config)
    factor = 2 ** (len(info["vae"]["config"]["block_out_channels"]) - 1)
    return config.data.resolution * factor, int(info["vae"]["config"]["out_channels"])


def pixel_config(config):
    """A copy of `config` whose `data` is the pixel dataset the latents were encoded from (the
    latents' meta.json), for reference statistics; `config` itself when it trains on pixels."""
    if not is_latent(config):
        return config
    pixels = meta(config)["pixel_data"]
    new = config.copy_and_resolve_references()
    with new.unlocked():
        for field in ("source", "name", "path", "split", "resolution", "channels", "fit"):
            new.data[field] = pixels[field] if pixels[field] is not None else ""
        new.data.random_flip = False
    return new


def make_decoder(config):
    """latents in model space [N, h, w, C] -> pixels [N, H, W, C'] in [-1, 1], jitted, or None
    for a pixel-space config."""
    if not is_latent(config):
        return None
    vae = load_vae(config)
    scale, shift = scaling(config)
    decode_fn = vae.decode_fn

    @xla_cpu.jit
    def decode(params, z):
        return jnp.clip(decode_fn(params, z / scale + shift), -1.0, 1.0)

    return lambda z: decode(vae.params, z)

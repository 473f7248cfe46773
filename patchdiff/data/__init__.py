"""Data: sources (`sources.py`; VAE latents in `latents.py`, written once by `encode.py`), the
seeded resumable loader and prefetch (`pipeline.py`), and the per-step plan of patch training.

A training step s uses patch size p_s drawn from the patch schedule with a generator seeded by
(seed, s), and a global batch of batch_size * R / p_s examples (Patch Diffusion scales the batch
x2 at R/2 and x4 at R/4, so every step sees about as many pixels). Being a function of s, the plan
needs no state of its own in a checkpoint.
"""

import numpy as np

from patchdiff.data.latents import LatentSource, read_meta
from patchdiff.data.pipeline import Loader, Prefetcher, to_global
from patchdiff.data.sources import SOURCES, CorruptImage, DataError, open_source
from patchdiff.diffusion.build import build_patch_schedule


def step_plan(config, step: int) -> tuple[int, int]:
    """(patch size, global batch size) of training step `step`."""
    schedule = build_patch_schedule(config)
    size = schedule.draw(np.random.default_rng([config.seed, step, 7]))
    return size, config.train.batch_size * (config.data.resolution // size)


def build_loader(config, position: int = 0, split=None) -> Loader:
    d = config.data
    loader = Loader(
        open_source(d, split),
        resolution=d.resolution,
        channels=d.channels,
        seed=config.seed,
        how=d.fit,
        random_flip=d.random_flip,
        position=position,
        threads=d.threads,
    )
    latent = config.get("latent")
    if getattr(loader.source, "latent", False) and latent and latent.scaling_factor:
        loader.scaling_factor = float(latent.scaling_factor)  # the user's, over the VAE's
    return loader


__all__ = [
    "SOURCES",
    "CorruptImage",
    "DataError",
    "LatentSource",
    "Loader",
    "Prefetcher",
    "build_loader",
    "open_source",
    "read_meta",
    "step_plan",
    "to_global",
]

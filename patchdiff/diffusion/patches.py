"""Patch training (Wang et al. 2023, "Patch Diffusion"): random crops with coordinate channels.

Each training step draws one patch size p from a schedule on the host; the batch [B, R, R, C] is
cut into random crops [B, p, p, C] (one offset per image), and two channels hold each pixel's
(x, y) position in the full image, scaled to [-1, 1] as x / (R - 1) * 2 - 1. The network sees
them beside its noisy input, so it knows where a crop lies. Sizes are static per step, so each
size compiles once.

Glossary: B batch, R full resolution, p patch size (pixels), C channels.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def coordinate_grid(resolution: int):
    """Pixel positions of an R x R image: [R, R, 2] float32, channel 0 = x (column), 1 = y (row).

    Both run over [-1, 1] inclusive, the convention of Patch Diffusion's `pachify`.
    """
    axis = jnp.linspace(-1.0, 1.0, resolution, dtype=jnp.float32)
    ys, xs = jnp.meshgrid(axis, axis, indexing="ij")
    return jnp.stack([xs, ys], axis=-1)


def crop(images, offsets, patch_size: int):
    """Crops each image at its own offset: images [B, R, R, C], offsets [B, 2] (row, col) int ->
    [B, p, p, C]."""
    channels = images.shape[-1]

    def one(image, offset):
        return jax.lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (patch_size, patch_size, channels)
        )

    return jax.vmap(one)(images, offsets)


def random_patches(key, images, patch_size: int):
    """Random crops and their coordinates: images [B, R, R, C] -> ([B, p, p, C], [B, p, p, 2]).

    Offsets are uniform over every position where the crop fits (0..R-p on each axis, per image).
    With p == R the crop is the image itself and the coordinates are the full grid.
    """
    batch, height, width, _ = images.shape
    if height != width:
        raise ValueError(f"patch training expects square images; got {height}x{width}.")
    if not 0 < patch_size <= height:
        raise ValueError(f"patch size {patch_size} must lie in 1..{height}, the image size.")
    offsets = jax.random.randint(key, (batch, 2), 0, height - patch_size + 1)
    grid = jnp.broadcast_to(coordinate_grid(height), (batch, height, height, 2))
    return crop(images, offsets, patch_size), crop(grid, offsets, patch_size)


@dataclasses.dataclass(frozen=True)
class PatchSchedule:
    """Patch sizes (pixels) and their probabilities; `draw` picks one per training step."""

    sizes: tuple[int, ...]
    probs: tuple[float, ...]

    def draw(self, rng: np.random.Generator) -> int:
        """One patch size from a host-side, seeded generator (its state can be checkpointed)."""
        return int(self.sizes[rng.choice(len(self.sizes), p=np.asarray(self.probs))])


def patch_schedule(resolution: int, scales, probs) -> PatchSchedule:
    """Schedule over sizes R * s: scales (s, ...) in (0, 1], probs summing to 1."""
    sizes = []
    for s in scales:
        size = resolution * s
        if not (0 < s <= 1 and float(size).is_integer()):
            raise ValueError(
                f"patch scale {s} must lie in (0, 1] and give a whole crop size at resolution "
                f"{resolution}."
            )
        sizes.append(int(size))
    if len(probs) != len(sizes) or not np.isclose(sum(probs), 1.0) or min(probs) < 0:
        raise ValueError(f"patch probabilities {tuple(probs)} must be one per scale and sum to 1.")
    return PatchSchedule(tuple(sizes), tuple(float(p) for p in probs))


def paper_schedule(resolution: int, full_prob: float = 0.5) -> PatchSchedule:
    """Patch Diffusion's recipe for pixel-space images: R with probability p, otherwise R/2 and
    R/4 in the ratio 3:2 (their `training_loop.py`; p = 0.5 gives 0.5 / 0.3 / 0.2)."""
    rest = 1.0 - full_prob
    return patch_schedule(resolution, (1.0, 0.5, 0.25), (full_prob, rest * 3 / 5, rest * 2 / 5))


def paper_latent_schedule(resolution: int, full_prob: float = 0.5) -> PatchSchedule:
    """Patch Diffusion's recipe in a VAE's latent space (their `train_on_latents`): the full
    latent R with probability p, R/2 otherwise; a latent pixel already spans 8 image pixels, so
    R/4 crops would be too small to teach anything (ImageNet-256: 32x32 and 16x16 latents)."""
    return patch_schedule(resolution, (1.0, 0.5), (full_prob, 1.0 - full_prob))

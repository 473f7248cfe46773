"""Axial rotary position embeddings (RoPE) on image coordinates, as HDiT uses them (Crowson et al.
2024, "Scalable High-Resolution Pixel-Space Image Synthesis with Hourglass Diffusion
Transformers", Sec. 3.2; Su et al. 2021 for RoPE itself).

Positions are the tokens' coordinates in the full image, in [-1, 1] (`patches.coordinate_grid`
averaged over each token's pixels), so a crop of patch training sees the window of the full
image's positions it was cut from, and the attention logits depend only on relative offsets.

Of each head's D channels the first half is rotated, a quarter per axis, and the second half is
left as it is (content-only channels). Each head has its own D/8 frequencies per axis, log-spaced
from pi to 10 pi over all heads together (heads interleaved), so that the heads cover the range
between them: with positions in [-1, 1], pi rad per unit is half a turn across the image and
10 pi about ten turns.

Angle layout: `angles[..., h, :D/8]` are axis 0's (x, the column) and `angles[..., h, D/8:]` axis
1's (y, the row), so `angles[..., h, j]` rotates the channel pair (j, j + D/4) of head h.

Glossary: B batch, h/w height/width in pixels, P patch size, D head dim.
"""

import math

import jax.numpy as jnp
import numpy as np
from einops import reduce


def token_positions(coords, patch_size: int):
    """coords [B, h, w, 2] (pixel positions in the full image, channel 0 = x, 1 = y) ->
    [B, h/P, w/P, 2] float32: each P x P patch's mean position."""
    coords = coords.astype(jnp.float32)
    return reduce(coords, "b (h p) (w q) c -> b h w c", "mean", p=patch_size, q=patch_size)


def rope_frequencies(heads: int, head_dim: int) -> np.ndarray:
    """[heads, D/8] float32 angular frequencies (radians per unit of position), log-spaced from
    pi (included) to 10 pi (excluded) over heads * D/8 values; head h takes every heads-th value
    from the h-th, so that every head spans the whole range."""
    if head_dim % 8:
        raise ValueError(f"axial RoPE needs a head dim divisible by 8; got {head_dim}.")
    count = heads * head_dim // 8
    log_freqs = math.log(math.pi) + math.log(10.0) * np.arange(count, dtype=np.float64) / count
    return np.exp(log_freqs).reshape(head_dim // 8, heads).T.astype(np.float32)


def axial_rope_angles(pos, heads: int, head_dim: int):
    """pos [..., 2] -> angles [..., heads, D/4] float32: [..., h, :D/8] = x * freqs[h],
    [..., h, D/8:] = y * freqs[h] (module docstring). Always float32: bfloat16 positions times
    frequencies up to 31 would be off by a large fraction of a turn."""
    freqs = jnp.asarray(rope_frequencies(heads, head_dim))  # [heads, D/8]
    pos = pos.astype(jnp.float32)[..., None, :, None]  # [..., 1, 2, 1]
    angles = pos * freqs[:, None, :]  # [..., heads, 2, D/8]
    return angles.reshape(*angles.shape[:-2], head_dim // 4)


def apply_rope(x, angles):
    """x [..., heads, D], angles [..., heads, D/4] (broadcastable) -> x with each channel pair
    (j, j + D/4), j < D/4, rotated by angles[..., j]; channels D/2.. pass through. The rotation is
    computed in float32 and returned in x's dtype."""
    quarter = angles.shape[-1]
    if x.shape[-1] < 4 * quarter:
        raise ValueError(f"RoPE angles for head dim {4 * quarter} do not fit x of {x.shape}.")
    x1 = x[..., :quarter].astype(jnp.float32)
    x2 = x[..., quarter : 2 * quarter].astype(jnp.float32)
    angles = angles.astype(jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    return jnp.concatenate([r.astype(x.dtype) for r in rotated] + [x[..., 2 * quarter :]], -1)

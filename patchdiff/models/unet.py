"""The bare network F of the denoiser: a DDPM++/ADM-style U-Net with a patchify stem.

Song et al. 2021 (DDPM++) and Dhariwal & Nichol 2021 (ADM): residual blocks with GroupNorm, SiLU,
dropout and scale-shift conditioning on an embedding of c_noise (and of a class label, with a
null label for classifier-free guidance), self-attention at chosen resolutions, skip connections
between encoder and decoder, and resampling inside residual blocks.

Patchify stem (Luhman & Luhman 2022): the input [B, R, R, C] is folded to [B, R/P, R/P, P*P*C]
before the first conv and the output unfolded after the last, so every conv runs at R/P. With
patch training the network also sees two coordinate channels (Patch Diffusion); they are folded
with the image.

Glossary: B batch, R image resolution, P stem patch size, C channels, E = 4 * channels.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from patchdiff.diffusion.patches import coordinate_grid
from patchdiff.models.layers import (
    AttentionBlock,
    ConvFactory,
    NoiseEmbedding,
    ResBlock,
    conv,
    default_conv3x3,
    dense,
    depth_to_space,
    group_norm,
    space_to_depth,
    zeros,
)


def level_resolutions(resolution: int, patch_size: int, num_levels: int) -> list[int]:
    """The feature-map size of each U-Net level for full-size inputs: R/P, R/2P, ..."""
    return [resolution // (patch_size * 2**i) for i in range(num_levels)]


class UNet(nn.Module):
    """F(x_in, c_noise, labels, coords): [B, h, w, C] -> [B, h, w, out_channels].

    `resolution` is the full image size R; `attn_resolutions` name the levels (by their feature-map
    size at full size, see `level_resolutions`) that get self-attention, so a crop of R/2 runs the
    same layers as the full image. h and w must be multiples of P * 2^(levels - 1).
    """

    out_channels: int
    resolution: int
    channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    head_dim: int = 64
    dropout: float = 0.1
    patch_size: int = 1
    num_classes: int = 0
    use_coords: bool = False
    noise_embedding: str = "positional"
    max_groups: int = 32
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    conv3x3: ConvFactory = default_conv3x3

    @nn.compact
    def __call__(self, x, c_noise, labels=None, coords=None, train: bool = False):
        """x [B, h, w, C], c_noise [B], labels [B] int or None, coords [B, h, w, 2] or None."""
        emb = self.embed(c_noise, labels)  # [B, E]
        x = self.with_coords(x, coords).astype(self.dtype)
        levels = level_resolutions(self.resolution, self.patch_size, len(self.channel_mult))
        block = dict(
            dropout=self.dropout, max_groups=self.max_groups, dtype=self.dtype, conv3x3=self.conv3x3
        )

        attention = functools.partial(
            AttentionBlock, self.head_dim, self.max_groups, self.attention_impl, self.dtype
        )

        def attend(h, level):
            return attention()(h) if levels[level] in self.attn_resolutions else h

        # Encoder.
        h = space_to_depth(x, self.patch_size)
        h = conv(self.channels * self.channel_mult[0], 3, "conv_in", dtype=self.dtype)(h)
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = attend(ResBlock(self.channels * mult, **block)(h, emb, train), level)
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = ResBlock(self.channels * mult, resample="down", **block)(h, emb, train)
                skips.append(h)

        # Middle.
        mid = self.channels * self.channel_mult[-1]
        h = ResBlock(mid, **block)(h, emb, train)
        h = attention()(h)
        h = ResBlock(mid, **block)(h, emb, train)

        # Decoder.
        for level in reversed(range(len(self.channel_mult))):
            features = self.channels * self.channel_mult[level]
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = attend(ResBlock(features, **block)(h, emb, train), level)
                if level > 0 and i == self.num_res_blocks:
                    h = ResBlock(features, resample="up", **block)(h, emb, train)

        # Output: back to pixels, P*P*C_out channels unfolded to [B, h, w, C_out].
        h = nn.silu(group_norm(h.shape[-1], self.max_groups, "norm_out", self.dtype)(h))
        out_features = self.out_channels * self.patch_size**2
        h = conv(out_features, 3, "conv_out", init=zeros, dtype=self.dtype)(h)
        return depth_to_space(h, self.patch_size)

    def embed(self, c_noise, labels):
        """c_noise [B] (and labels [B]) -> [B, E]: noise embedding through a 2-layer MLP, plus a
        learned class embedding whose last row (index num_classes) is the null label."""
        width = 4 * self.channels
        emb = NoiseEmbedding(self.channels, self.noise_embedding)(c_noise)
        emb = dense(width, "emb0", dtype=self.dtype)(emb)
        emb = dense(width, "emb1", dtype=self.dtype)(nn.silu(emb))
        if self.num_classes:
            if labels is None:
                labels = jnp.full(c_noise.shape, self.num_classes, jnp.int32)
            table = nn.Embed(
                self.num_classes + 1,
                width,
                dtype=self.dtype,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(1.0), ("vocab", "embed")
                ),
                name="label_embed",
            )
            emb = emb + table(labels)
        elif labels is not None:
            raise ValueError("labels were given to a U-Net built with num_classes = 0.")
        return emb

    def with_coords(self, x, coords):
        """Appends the two coordinate channels; without `coords`, x is taken as the full image."""
        if not self.use_coords:
            if coords is not None:
                raise ValueError("coords were given to a U-Net built with use_coords = False.")
            return x
        if coords is None:
            grid = coordinate_grid(x.shape[1])
            coords = jnp.broadcast_to(grid, x.shape[:1] + grid.shape)
        if coords.shape != x.shape[:3] + (2,):
            raise ValueError(f"coords must have shape {x.shape[:3] + (2,)}; got {coords.shape}.")
        return jnp.concatenate([x, coords.astype(x.dtype)], axis=-1)

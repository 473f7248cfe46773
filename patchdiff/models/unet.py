"""The bare network F of the denoiser: a DDPM++ or ADM-style U-Net with a patchify stem.

`arch="ddpmpp"` is EDM's DDPM++ (`SongUNet` in NVlabs/edm `training/networks.py` with its
CIFAR-10 settings) layer for layer: the same parameters (55,732,739 at 32x32x3, unconditional,
without augmentation labels; + 9 x 128 with EDM's 9) and FLOPs. Residual blocks with GroupNorm,
SiLU, dropout and an additive embedding of c_noise (and of a one-hot class label, zero for the
null label of classifier-free guidance, and of EDM's augmentation labels, zero at sampling:
patchdiff/diffusion/augment.py), one-head self-attention at chosen resolutions (in the decoder
only after each level's last block), skip connections between encoder and decoder, resampling
inside residual blocks with a 1x1 conv on their skip path, near-zero initialisation of each
branch's last layer.

`arch="adm"` keeps Dhariwal & Nichol's choices where they differ: scale-shift conditioning, a
first conv at the first level's width, attention after every decoder block of an attention level,
heads of `head_dim` channels, a learned class table, zero-initialised branch ends, resampling
without a skip conv. It is ADM-style, not EDM's `DhariwalUNet` layer for layer.

Patchify stem (Luhman & Luhman 2022): the input [B, R, R, C] is folded to [B, R/P, R/P, P*P*C]
before the first conv and the output unfolded after the last, so every conv runs at R/P. With
patch training the network also sees two coordinate channels (Patch Diffusion); they are folded
with the image.

Glossary: B batch, R image resolution, P stem patch size, C channels, E = 4 * channels.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from patchdiff.diffusion.patches import coordinate_grid
from patchdiff.models.layers import (
    AttentionBlock,
    ConvFactory,
    NoiseEmbedding,
    ResBlock,
    conv,
    default_conv3x3,
    default_init,
    dense,
    depth_to_space,
    group_norm,
    near_zero_init,
    space_to_depth,
    zeros,
)

ARCHS = ("ddpmpp", "adm")


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
    head_dim: int = 0  # 0: one head over all channels (DDPM++)
    arch: str = "ddpmpp"
    dropout: float = 0.1
    patch_size: int = 1
    num_classes: int = 0
    augment_dim: int = 0  # width of EDM's augmentation labels; 0 = none
    use_coords: bool = False
    noise_embedding: str = "positional"
    max_groups: int = 32
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    conv3x3: ConvFactory = default_conv3x3

    @nn.compact
    def __call__(
        self, x, c_noise, labels=None, coords=None, augment_labels=None, train: bool = False
    ):
        """x [B, h, w, C], c_noise [B], labels [B] int or None, coords [B, h, w, 2] or None,
        augment_labels [B, augment_dim] or None (zeros: no augmentation, as in sampling)."""
        if self.arch not in ARCHS:
            raise ValueError(f"U-Net arch {self.arch!r} is not known; known: {', '.join(ARCHS)}.")
        ddpmpp = self.arch == "ddpmpp"
        emb = self.embed(c_noise, labels, augment_labels)  # [B, E], after SiLU
        x = self.with_coords(x, coords).astype(self.dtype)
        levels = level_resolutions(self.resolution, self.patch_size, len(self.channel_mult))
        zero_init = near_zero_init if ddpmpp else zeros
        block = dict(
            dropout=self.dropout,
            adaptive_scale=not ddpmpp,
            resample_proj=ddpmpp,
            zero_init=zero_init,
            max_groups=self.max_groups,
            dtype=self.dtype,
            conv3x3=self.conv3x3,
        )
        attention = functools.partial(
            AttentionBlock,
            self.head_dim,
            self.max_groups,
            self.attention_impl,
            self.dtype,
            **({} if ddpmpp else {"qkv_init": default_init}),
            zero_init=zero_init,
        )

        def attend(h, level, last=True):
            # DDPM++ attends after every encoder block of the level but only after the decoder's
            # last block there; ADM after every block.
            return attention()(h) if levels[level] in self.attn_resolutions and last else h

        # Encoder.
        h = space_to_depth(x, self.patch_size)
        width_in = self.channels * (1 if ddpmpp else self.channel_mult[0])
        h = conv(width_in, 3, "conv_in", dtype=self.dtype)(h)
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
                last = i == self.num_res_blocks or not ddpmpp
                h = attend(ResBlock(features, **block)(h, emb, train), level, last)
                if level > 0 and i == self.num_res_blocks:
                    h = ResBlock(features, resample="up", **block)(h, emb, train)

        # Output: back to pixels, P*P*C_out channels unfolded to [B, h, w, C_out].
        h = nn.silu(group_norm(h.shape[-1], self.max_groups, "norm_out", self.dtype)(h))
        out_features = self.out_channels * self.patch_size**2
        h = conv(out_features, 3, "conv_out", init=zero_init, dtype=self.dtype)(h)
        return depth_to_space(h, self.patch_size)

    def embed(self, c_noise, labels, augment_labels=None):
        """c_noise [B] (and labels [B], augment_labels [B, augment_dim]) -> [B, E]: the noise
        embedding through a 2-layer MLP with SiLU after each layer. Labels run 0..num_classes,
        num_classes being the null label: DDPM++ adds Dense(one_hot(label) sqrt(num_classes)) to
        the noise embedding before the MLP (the null label's one-hot is zero, as EDM's label
        dropout), ADM a learned table's row (the last row is the null label) after it. Both add
        a bias-free Dense of the augmentation labels before the MLP, as EDM's `map_augment` in
        SongUNet (Xavier-initialised) and DhariwalUNet (zero-initialised)."""
        width = 4 * self.channels
        ddpmpp = self.arch == "ddpmpp"
        emb = NoiseEmbedding(
            self.channels, self.noise_embedding, endpoint=ddpmpp, sin_first=ddpmpp
        )(c_noise)
        if self.num_classes and labels is None:
            labels = jnp.full(c_noise.shape, self.num_classes, jnp.int32)
        elif labels is not None and not self.num_classes:
            raise ValueError("labels were given to a U-Net built with num_classes = 0.")
        if self.num_classes and ddpmpp:
            one_hot = jax.nn.one_hot(labels, self.num_classes, dtype=emb.dtype)  # null: zeros
            one_hot = one_hot * np.sqrt(self.num_classes)
            emb = emb + dense(self.channels, "label_embed", ("vocab", "embed"))(one_hot)
        if augment_labels is not None and not self.augment_dim:
            raise ValueError("augment_labels were given to a U-Net built with augment_dim = 0.")
        if self.augment_dim:
            if augment_labels is None:  # sampling: the labels of no augmentation
                augment_labels = jnp.zeros((c_noise.shape[0], self.augment_dim), emb.dtype)
            augment = nn.Dense(
                self.channels,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(
                    default_init if ddpmpp else zeros, (None, "embed")
                ),
                name="augment_embed",
            )
            emb = emb + augment(augment_labels.astype(emb.dtype))
        emb = nn.silu(dense(width, "emb0", dtype=self.dtype)(emb.astype(self.dtype)))
        emb = dense(width, "emb1", dtype=self.dtype)(emb)
        if self.num_classes and not ddpmpp:
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
        return nn.silu(emb)

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

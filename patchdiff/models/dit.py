"""DiT, the diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with
Transformers"), as the bare network F of our denoisers.

The image [B, h, w, C] is cut into P x P patches, each mapped to a token by one Linear (the same
map as DiT's P x P, stride P conv), with a position embedding; `depth` blocks with adaLN-Zero
conditioning (Sec. 3.2) follow, then a final adaptive LayerNorm and a zero-initialised Linear
back to P x P x C values per token, folded back into the image. A block is

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear_zero(SiLU(c))
    x = x + gate1 * MHSA(LN(x) (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN(x) (1 + scale2) + shift2)

with LayerNorms without affine parameters (eps 1e-6), qkv with biases, an MLP of GELU (tanh
approximation) at `mlp_ratio` x width. The zero-initialised modulation makes every block the
identity at initialisation and the output exactly zero. Conditioning c = MLP(sinusoid_256(c_noise
x noise_scale)) + class table row (+ a bias-free Linear of EDM's augmentation labels).

Differences from DiT's code, all deliberate: no learned variance (learn_sigma doubles DiT's output
channels, ours predicts only what the preconditioning asks for); the sin-cos table is evaluated at
each token's position rather than stored, so that a crop of patch training sees the window of the
full image's table it was cut from; patches are flattened (row, column, channel) as
`layers.space_to_depth` does, where DiT's conv weight is ordered (channel, row, column); guidance
touches every output channel (DiT's `forward_with_cfg` guides 3 of 4, its issue #41): the model
has no guidance of its own, the samplers guide the whole denoiser.

Parameters (`scan=False`): patch_embed, t_embed0/1, label_embed, augment_embed, block_0 ..
block_{depth-1} (each: modulation, qkv, proj, mlp0, mlp1), final_modulation, final. With
`scan=True` the blocks are one nn.scan over a single compiled block, and their parameters live
under "blocks" with a leading [depth] axis (e.g. blocks/qkv/kernel [depth, W, 3W]), that axis
unnamed for sharding (replicated).

Glossary: B batch, h/w height/width in pixels, C channels, P patch size, W width, S tokens
(h/P * w/P, row-major), D head dim (W / heads), R full image resolution.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import kernels
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.patches import coordinate_grid
from patchdiff.models.layers import (
    DTYPES,
    NoiseEmbedding,
    default_init,
    dense,
    depth_to_space,
    space_to_depth,
    zeros,
)
from patchdiff.models.rope import apply_rope, axial_rope_angles, token_positions

POS_EMBEDS = ("sincos", "rope")
# DiT's frequency embedding of the timestep: 256 sinusoids (its `frequency_embedding_size`).
FREQUENCY_FEATURES = 256
# DiT initialises the timestep MLP and the class table at normal(0.02) (`initialize_weights`).
small_normal = nn.initializers.normal(0.02)


def modulate(x, shift, scale):
    """x [B, S, W], shift and scale [B, W] -> x (1 + scale) + shift (DiT's `modulate`)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(dtype, name):
    """LayerNorm without scale or bias, eps 1e-6 (DiT): adaLN supplies the affine map."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


def sincos_embedding(pos, width: int):
    """pos [..., 2] (x, y) in token units -> [..., W] float32: DiT's fixed 2-D table (from MAE's
    `get_2d_sincos_pos_embed`) at any position. The first W/2 channels encode x (the column),
    the last W/2 y (the row); each half is [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (W/4)),
    i < W/4. At the integer grid 0..g-1 this is DiT's table row for row."""
    if width % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4; got {width}.")
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    angles = pos.astype(jnp.float32)[..., None] * jnp.asarray(omega, jnp.float32)  # [..., 2, W/4]
    waves = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., 2, W/2]
    return waves.reshape(*waves.shape[:-2], width)


def token_units(pos, resolution: int, patch_size: int):
    """Token mean positions in [-1, 1] (`rope.token_positions`) -> token indices in the full
    image: the pixel (pos + 1) / 2 (R - 1), less the patch's centre offset (P - 1) / 2, over P.
    The full image's tokens get 0 .. R/P - 1, the indices DiT's table is built on."""
    pixels = (pos + 1) / 2 * (resolution - 1)
    return (pixels - (patch_size - 1) / 2) / patch_size


def noise_scale(dcfg) -> float:
    """The factor applied to c_noise before DiT's sinusoids, which expect timesteps 0..999.

    A parameterisation whose c_noise is a timestep already (vp: 0..999, v and flow: 1000 t) keeps
    it as it is, so VP gives DiT's embedding exactly; one whose c_noise is a log-sigma (edm:
    ln(sigma) / 4, ve: ln(sigma / 2), spans under 11 units) is scaled so that EDM's sampling range
    sigma in [0.002, 80] spans 1000 units, as DiT's timesteps do: 377.5 for edm, 94.4 for ve.
    The range is EDM's constant, not config.diffusion's, so a trained model does not change
    when its sampling range does."""
    precond = diffusion_build.build_precond(dcfg)
    low, high = (float(precond.scalings(np.float32(s))[3]) for s in (0.002, 80.0))
    span = abs(high - low)
    return 1.0 if span > 100 else 1000.0 / span


class DiTBlock(nn.Module):
    """One adaLN-Zero block: x [B, S, W], cond [B, W] (after SiLU), angles (RoPE, [B, S, heads,
    D/4]) or None -> (x, None); the pair is what nn.scan carries."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cond, angles):
        batch, tokens, width = x.shape
        head_dim = width // self.heads
        mod = dense(6 * width, "modulation", ("embed", "mlp"), init=zeros, dtype=self.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod(cond), 6, axis=-1)

        h = modulate(layer_norm(self.dtype, "norm1")(x), shift1, scale1)
        qkv = dense(3 * width, "qkv", ("embed", "heads"), dtype=self.dtype)(h)
        qkv = qkv.reshape(batch, tokens, 3, self.heads, head_dim)  # [B, S, 3, heads, D]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        h = kernels.attention(q, k, v, impl=self.attention_impl).reshape(batch, tokens, width)
        h = dense(width, "proj", ("heads", "embed"), dtype=self.dtype)(h)
        x = x + gate1[:, None, :] * h

        h = modulate(layer_norm(self.dtype, "norm2")(x), shift2, scale2)
        hidden = int(width * self.mlp_ratio)
        h = nn.gelu(dense(hidden, "mlp0", ("embed", "mlp"), dtype=self.dtype)(h), approximate=True)
        h = dense(width, "mlp1", ("mlp", "embed"), dtype=self.dtype)(h)
        return x + gate2[:, None, :] * h, None


class DiT(nn.Module):
    """F(x_in, c_noise, labels, coords, augment_labels): [B, h, w, C] -> [B, h, w, out_channels].

    `resolution` is the full image size R; h and w must be multiples of P. Labels run
    0..num_classes, num_classes (and None) being the null class of classifier-free guidance.
    coords [B, h, w, 2] are the pixels' positions in the full image in [-1, 1] (patch training);
    None takes x as a full image at its own size.
    """

    out_channels: int
    resolution: int
    depth: int = 12
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 2
    num_classes: int = 0
    augment_dim: int = 0
    pos_embed: str = "sincos"
    noise_scale: float = 1.0
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(
        self, x, c_noise, labels=None, coords=None, augment_labels=None, train: bool = False
    ):
        """x [B, h, w, C], c_noise [B], labels [B] int, coords [B, h, w, 2], augment_labels
        [B, augment_dim]; `train` is accepted for the common signature (DiT has no dropout)."""
        del train
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(
                f"DiT pos_embed {self.pos_embed!r} is not known; known: {', '.join(POS_EMBEDS)}."
            )
        if self.width % self.heads:
            raise ValueError(f"DiT width {self.width} must be a multiple of heads {self.heads}.")
        batch, height, width_px, _ = x.shape
        p = self.patch_size
        if height % p or width_px % p:
            raise ValueError(f"DiT input {height}x{width_px} must be a multiple of patch size {p}.")
        grid = (height // p, width_px // p)

        cond = nn.silu(self.conditioning(c_noise, labels, augment_labels))  # [B, W]
        pos, full = self.positions(x, coords)  # [B, h/P, w/P, 2] in [-1, 1], and R
        h = space_to_depth(x.astype(self.dtype), p)  # [B, h/P, w/P, P*P*C]
        h = dense(self.width, "patch_embed", (None, "embed"), dtype=self.dtype)(h)
        angles = None
        if self.pos_embed == "sincos":
            h = h + sincos_embedding(token_units(pos, full, p), self.width).astype(self.dtype)
        else:
            angles = axial_rope_angles(pos, self.heads, self.width // self.heads)
            angles = angles.reshape(batch, grid[0] * grid[1], *angles.shape[-2:])
        h = h.reshape(batch, grid[0] * grid[1], self.width)  # [B, S, W]

        block = DiTBlock
        if self.remat:
            # prevent_cse guards remat against CSE across a Python loop; scan's loop body
            # cannot be merged with its neighbours, so it is not needed there (flax docs).
            block = nn.remat(block, prevent_cse=not self.scan)
        settings = dict(
            width=self.width,
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        if self.scan:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: None},  # the depth axis, replicated
            )
            h, _ = blocks(**settings, name="blocks")(h, cond, angles)
        else:
            for i in range(self.depth):
                h, _ = block(**settings, name=f"block_{i}")(h, cond, angles)

        mod = dense(
            2 * self.width, "final_modulation", ("embed", "mlp"), init=zeros, dtype=self.dtype
        )
        shift, scale = jnp.split(mod(cond), 2, axis=-1)
        h = modulate(layer_norm(self.dtype, "final_norm")(h), shift, scale)
        out = dense(
            p * p * self.out_channels, "final", ("embed", None), init=zeros, dtype=self.dtype
        )
        h = out(h).reshape(batch, *grid, -1)  # [B, h/P, w/P, P*P*C_out]
        return depth_to_space(h, p)

    def conditioning(self, c_noise, labels, augment_labels):
        """c_noise [B] (labels [B], augment_labels [B, augment_dim]) -> c [B, W], before SiLU:
        DiT's timestep MLP on 256 sinusoids of c_noise * noise_scale (cosines first, frequencies
        1 .. 1/10000 not reaching it, as DiT's `timestep_embedding`), plus the class table's row
        (the last row the null class), plus the augmentation labels through a bias-free Linear
        (EDM's `map_augment`; None = zeros, as in sampling)."""
        freqs = NoiseEmbedding(FREQUENCY_FEATURES)(c_noise.astype(jnp.float32) * self.noise_scale)
        c = dense(self.width, "t_embed0", (None, "mlp"), init=small_normal, dtype=self.dtype)
        c = nn.silu(c(freqs.astype(self.dtype)))
        c = dense(self.width, "t_embed1", ("mlp", "embed"), init=small_normal, dtype=self.dtype)(c)
        if self.num_classes:
            if labels is None:
                labels = jnp.full(c_noise.shape, self.num_classes, jnp.int32)
            table = nn.Embed(
                self.num_classes + 1,
                self.width,
                dtype=self.dtype,
                embedding_init=nn.with_logical_partitioning(small_normal, ("vocab", "embed")),
                name="label_embed",
            )
            c = c + table(labels)
        elif labels is not None:
            raise ValueError("labels were given to a DiT built with num_classes = 0.")
        if self.augment_dim:
            if augment_labels is None:
                augment_labels = jnp.zeros((c_noise.shape[0], self.augment_dim), self.dtype)
            augment = nn.Dense(
                self.width,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(default_init, (None, "embed")),
                name="augment_embed",
            )
            c = c + augment(augment_labels.astype(self.dtype))
        elif augment_labels is not None:
            raise ValueError("augment_labels were given to a DiT built with augment_dim = 0.")
        return c

    def positions(self, x, coords):
        """Each token's mean position in [-1, 1] ([B, h/P, w/P, 2]) and the resolution R of the
        image those coordinates span (`resolution` with coords; x's own size without)."""
        if coords is None:
            if x.shape[1] != x.shape[2]:
                raise ValueError(f"a non-square DiT input {x.shape[1:3]} needs its coords.")
            grid = coordinate_grid(x.shape[1])
            coords, full = jnp.broadcast_to(grid, x.shape[:1] + grid.shape), x.shape[1]
        else:
            full = self.resolution
        if coords.shape != x.shape[:3] + (2,):
            raise ValueError(f"coords must have shape {x.shape[:3] + (2,)}; got {coords.shape}.")
        return token_positions(coords, self.patch_size), full


def build_dit(config, **kwargs):
    """The DiT that `config.model` describes (`config.model.dit.*` and the shared model fields)."""
    if kwargs:
        raise ValueError(
            f"DiT takes no build options, got {', '.join(sorted(kwargs))}: kernel search's "
            "conv3x3 seam replaces U-Net convolutions, and DiT has none."
        )
    m, d = config.model, config.model.dit
    return DiT(
        out_channels=config.data.channels,
        resolution=config.data.resolution,
        depth=d.depth,
        width=d.width,
        heads=d.heads,
        mlp_ratio=d.mlp_ratio,
        patch_size=m.patch_size,
        num_classes=m.num_classes,
        augment_dim=m.get("augment_dim", 0),
        pos_embed=d.pos_embed,
        noise_scale=noise_scale(config.diffusion),
        attention_impl=m.attention_impl,
        dtype=DTYPES[m.dtype],
        remat=m.remat,
        scan=m.scan,
    )

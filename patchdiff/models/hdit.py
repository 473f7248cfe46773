"""The Hourglass Diffusion Transformer, HDiT (Crowson et al. 2024, "Scalable High-Resolution
Pixel-Space Image Synthesis with Hourglass Diffusion Transformers", Sec. 3 and Fig. 3), as the bare
network F of the denoiser.

Pixels are folded into P x P patches and projected to tokens (bias-free); each level of the
hourglass runs transformer layers, then merges 2 x 2 tokens into one (a linear map of the four)
for the next level down; the deepest level runs its layers once, and the way back up splits each
token into 2 x 2 (a linear map), joins the level's skip by a learned interpolation
`lerp(skip, x, f)` (f starts at 0.5) and runs the level's second set of layers. RMSNorm and a
zero-initialised projection unfold the tokens back to pixels, so F is exactly zero at init.

A layer is pre-norm attention then a GEGLU feed-forward (width ff_mult x), each behind an
adaptive RMSNorm (scale 1 + a zero-initialised linear map of the conditioning) and closed by a
zero-initialised projection. Attention is cosine-similarity attention with a learned scale per
head (starting at 10; the softmax's own scale is 1) and axial RoPE (`rope.py`) on image
positions; neighborhood attention (K x K tokens) at every level but the deepest, global there.
The conditioning comes from a mapping network: Fourier features of c_noise (EDM's
log(sigma) / 4, which the preconditioning passes), a class table (the last row the null class of
classifier-free guidance), and Fourier features of EDM's augmentation labels when
`augment_dim` > 0, summed and passed through RMSNorm / GEGLU blocks.

Patch training: token positions come from `coords`, the crop's pixel coordinates in the full
image, averaged per patch and again at every merge, so a crop attends as the same window of the
full image would; they never enter as input channels.

Parameters (float32; compute in `dtype`) are laid out as
`patch_in, time_in_proj, [aug_in_proj], [class_embed], mapping/..., down_{i}/..., merge_{i},
mid/..., split_{i}/{proj, fac}, up_{i}/..., out_norm, patch_out`; a level holds its layers as
`layer_{j}` or, with `scan`, as one `layers` subtree whose leaves have a leading [depth] axis
(unnamed, so replicated). Only the mapping MLP sits under `mapping`, the module that
k-diffusion gives 1/3 of the learning rate (config.train.lr_mult). Linear layers start as
PyTorch's (uniform, variance 1 / (3 fan-in)), as k-diffusion's `image_transformer_v2.py`.

Where ours differs from k-diffusion: token positions are pixel centres of a grid running from -1
to 1 inclusive (`patches.coordinate_grid`) averaged per patch, where k-diffusion uses the centres
of equal cells of [-1, 1] (1.2% narrower at 64 tokens per side); positions are (x, y) where
k-diffusion's are (y, x), which only relabels the two axes' frequencies; and without augmentation
(`augment_dim` = 0) there is no augmentation projection, where k-diffusion keeps one fed zeros.

Glossary: B batch, h/w height/width (pixels, or tokens of a level), C channels, P patch size,
W a level's width, M mapping width, S = h*w tokens, D head dim, K neighborhood kernel.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels.neighborhood import neighborhood_attention
from patchdiff.diffusion.patches import coordinate_grid
from patchdiff.models.layers import DTYPES, Dropout, depth_to_space, space_to_depth
from patchdiff.models.rope import apply_rope, axial_rope_angles, token_positions

# PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5)): U(+-1 / sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
zeros = nn.initializers.zeros
EPS = 1e-6  # RMSNorm's and the cosine similarity's epsilon (k-diffusion)


def linear(features, name, axes, *, init=torch_linear_init, dtype=jnp.float32):
    """A bias-free Dense layer (every HDiT projection is) with logical kernel axes (in, out)."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(init, axes),
        name=name,
    )


def rms_norm(x, scale):
    """x [..., W] / rms(x) * scale [..., W], in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + EPS)
    return (x32 * inv * scale).astype(x.dtype)


def fourier_features(x, features: int, seed: int):
    """x [B, N] -> [B, features]: cos and sin of 2 pi x @ w, w [N, features / 2] a fixed standard
    normal draw (numpy's PCG64, stable across releases: a constant of the architecture, not a
    parameter, as k-diffusion's FourierFeatures buffer)."""
    w = np.random.default_rng(seed).standard_normal((x.shape[-1], features // 2))
    angles = 2 * np.pi * x.astype(jnp.float32) @ jnp.asarray(w, jnp.float32)
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class RMSNorm(nn.Module):
    """x [..., W] -> RMS-normalised x with a learned scale (init 1)."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        return rms_norm(x, self.param("scale", init, (x.shape[-1],), jnp.float32))


class AdaRMSNorm(nn.Module):
    """x [B, h, w, W], cond [B, M] -> RMS-normalised x scaled by 1 + Linear(cond) (zero-init)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        scale = linear(x.shape[-1], "linear", (None, "embed"), init=zeros, dtype=self.dtype)(cond)
        return rms_norm(x, 1 + scale.astype(jnp.float32)[:, None, None, :])


class GEGLU(nn.Module):
    """x [..., W] -> [..., hidden]: a * gelu(g), (a, g) one bias-free projection (Shazeer 2020)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        a, gate = jnp.split(
            linear(2 * self.hidden, "up", ("embed", "mlp"), dtype=self.dtype)(x), 2, -1
        )
        return a * nn.gelu(gate, approximate=False)


def cosine_sim_scale(q, k, scale):
    """q, k [..., heads, D], scale [heads] -> q and k each at length sqrt(scale), so that q.k is
    scale x their cosine similarity (Henry et al. 2020's QK-norm). Math in float32."""
    root = jnp.sqrt(scale)[:, None]

    def unit(t):
        t32 = t.astype(jnp.float32)
        return (t32 * root * jax.lax.rsqrt(jnp.sum(t32 * t32, -1, keepdims=True) + EPS)).astype(
            t.dtype
        )

    return unit(q), unit(k)


class SelfAttention(nn.Module):
    """x [B, h, w, W], angles [B, h, w, heads, D/4], cond [B, M] -> x + attention's update.

    `kernel_size` > 0: neighborhood attention over K x K tokens (an axis shorter than K is one
    whole-axis window, which crops at deep levels hit); 0: global attention over all h*w tokens.
    """

    head_dim: int
    kernel_size: int = 0
    attention_impl: str = "auto"
    neighborhood_impl: str = "auto"
    dropout: float = 0.0
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, angles, cond):
        batch, height, width, features = x.shape
        heads = features // self.head_dim
        h = AdaRMSNorm(self.dtype, name="norm")(x, cond)
        qkv = linear(3 * features, "qkv", ("embed", "heads"), dtype=self.dtype)(h)
        qkv = qkv.reshape(batch, height, width, 3, heads, self.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, h, w, heads, D]
        scale_init = nn.with_logical_partitioning(nn.initializers.constant(10.0), ("norm",))
        q, k = cosine_sim_scale(q, k, self.param("scale", scale_init, (heads,), jnp.float32))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if self.kernel_size:
            out = neighborhood_attention(
                q, k, v, kernel_size=self.kernel_size, impl=self.neighborhood_impl, scale=1.0
            )
        else:
            tokens = (batch, height * width, heads, self.head_dim)  # [B, S, heads, D]
            out = kernels.attention(
                q.reshape(tokens), k.reshape(tokens), v.reshape(tokens),
                impl=self.attention_impl, scale=1.0,
            )  # fmt: skip
        out = Dropout(self.dropout)(out.reshape(x.shape), deterministic=not self.train)
        return x + linear(features, "out", ("heads", "embed"), init=zeros, dtype=self.dtype)(out)


class FeedForward(nn.Module):
    """x [B, h, w, W], cond [B, M] -> x + GEGLU feed-forward's update (hidden ff_mult x W)."""

    ff_mult: int = 3
    dropout: float = 0.0
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        features = x.shape[-1]
        h = AdaRMSNorm(self.dtype, name="norm")(x, cond)
        h = GEGLU(self.ff_mult * features, self.dtype, name="geglu")(h)
        h = Dropout(self.dropout)(h, deterministic=not self.train)
        return x + linear(features, "down", ("mlp", "embed"), init=zeros, dtype=self.dtype)(h)


class Layer(nn.Module):
    """One transformer layer, (x, angles, cond) -> (x, None): the carry signature of nn.scan."""

    head_dim: int
    kernel_size: int = 0
    attention_impl: str = "auto"
    neighborhood_impl: str = "auto"
    ff_mult: int = 3
    dropout: float = 0.0
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, angles, cond):
        x = SelfAttention(
            self.head_dim, self.kernel_size, self.attention_impl, self.neighborhood_impl,
            self.dropout, self.train, self.dtype, name="attn",
        )(x, angles, cond)  # fmt: skip
        x = FeedForward(self.ff_mult, self.dropout, self.train, self.dtype, name="ff")(x, cond)
        return x, None


class Level(nn.Module):
    """`depth` layers at one resolution: x [B, h, w, W], pos [B, h, w, 2], cond [B, M] -> x.

    With `scan` the layers are one nn.scan (one compiled body, parameters stacked on a leading
    [depth] axis under `layers`); without it, `layer_0`, `layer_1`, ...
    """

    depth: int
    layer: dict  # Layer's fields
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x, pos, cond):
        heads = x.shape[-1] // self.layer["head_dim"]
        angles = axial_rope_angles(pos, heads, self.layer["head_dim"])  # [B, h, w, heads, D/4]
        layer = nn.remat(Layer, prevent_cse=not self.scan) if self.remat else Layer
        if self.scan:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: None},
            )
            return stack(**self.layer, name="layers")(x, angles, cond)[0]
        for j in range(self.depth):
            x = layer(**self.layer, name=f"layer_{j}")(x, angles, cond)[0]
        return x


class MappingNetwork(nn.Module):
    """[B, M] -> [B, M]: RMSNorm, `depth` residual RMSNorm/GEGLU blocks, RMSNorm."""

    depth: int
    ff_mult: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = RMSNorm(name="in_norm")(x)
        for j in range(self.depth):
            h = RMSNorm(name=f"block_{j}_norm")(x)
            h = GEGLU(self.ff_mult * x.shape[-1], self.dtype, name=f"block_{j}_geglu")(h)
            x = x + linear(
                x.shape[-1], f"block_{j}_down", ("mlp", "embed"), init=zeros, dtype=self.dtype
            )(h)
        return RMSNorm(name="out_norm")(x)


class TokenSplit(nn.Module):
    """x [B, h, w, W_in], skip [B, 2h, 2w, W] -> lerp(skip, split(x), fac), fac learned from 0.5."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skip):
        x = linear(4 * skip.shape[-1], "proj", ("embed", None), dtype=self.dtype)(x)
        x = depth_to_space(x, 2)
        fac_init = nn.with_logical_partitioning(nn.initializers.constant(0.5), (None,))
        fac = self.param("fac", fac_init, (1,), jnp.float32).astype(x.dtype)
        return skip + fac * (x - skip)


class HDiT(nn.Module):
    """F(x_in, c_noise, labels, coords, augment_labels): [B, h, w, C] -> [B, h, w, out_channels].

    One entry of `widths`/`depths` per level, the first at R / patch_size; h and w must be
    multiples of patch_size * 2^(levels - 1). Every level but the deepest uses neighborhood
    attention of `neighborhood_kernel` tokens (0: global attention everywhere).
    """

    out_channels: int
    widths: tuple[int, ...] = (128, 256)
    depths: tuple[int, ...] = (2, 2)
    head_dim: int = 64
    neighborhood_kernel: int = 7
    ff_mult: int = 3
    mapping_width: int = 256
    mapping_depth: int = 2
    dropout: float = 0.0
    patch_size: int = 4
    num_classes: int = 0
    augment_dim: int = 0
    attention_impl: str = "auto"
    neighborhood_impl: str = "auto"
    remat: bool = False
    scan: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c_noise, labels=None, coords=None, augment_labels=None, train=False):
        """x [B, h, w, C], c_noise [B], labels [B] int or None (the null class), coords
        [B, h, w, 2] or None (x is the full image), augment_labels [B, augment_dim] or None
        (zeros: no augmentation, as when sampling)."""
        cond = self.condition(c_noise, labels, augment_labels)  # [B, M]
        if coords is None:
            grid = coordinate_grid(x.shape[1])
            coords = jnp.broadcast_to(grid, x.shape[:1] + grid.shape)
        if coords.shape != x.shape[:3] + (2,):
            raise ValueError(f"coords must have shape {x.shape[:3] + (2,)}; got {coords.shape}.")
        pos = token_positions(coords, self.patch_size)  # [B, h/P, w/P, 2]

        last = len(self.widths) - 1

        def level(i, name):
            fields = dict(
                head_dim=self.head_dim,
                kernel_size=self.neighborhood_kernel if i < last else 0,
                attention_impl=self.attention_impl,
                neighborhood_impl=self.neighborhood_impl,
                ff_mult=self.ff_mult,
                dropout=self.dropout,
                train=train,
                dtype=self.dtype,
            )
            return Level(self.depths[i], fields, self.remat, self.scan, name=name)

        h = space_to_depth(x, self.patch_size)  # [B, h/P, w/P, P*P*C]
        h = linear(self.widths[0], "patch_in", (None, "embed"), dtype=self.dtype)(h)
        skips = []
        for i in range(last):
            h = level(i, f"down_{i}")(h, pos, cond)
            skips.append((h, pos))
            h = space_to_depth(h, 2)  # the 2 x 2 tokens of the merge, side by side
            h = linear(self.widths[i + 1], f"merge_{i}", (None, "embed"), dtype=self.dtype)(h)
            pos = token_positions(pos, 2)
        h = level(last, "mid")(h, pos, cond)
        for i in reversed(range(last)):
            skip, pos = skips.pop()
            h = TokenSplit(self.dtype, name=f"split_{i}")(h, skip)
            h = level(i, f"up_{i}")(h, pos, cond)

        h = RMSNorm(name="out_norm")(h)
        out_features = self.out_channels * self.patch_size**2
        h = linear(out_features, "patch_out", ("embed", None), init=zeros, dtype=self.dtype)(h)
        return depth_to_space(h, self.patch_size)

    def condition(self, c_noise, labels, augment_labels):
        """c_noise [B] (EDM's log(sigma) / 4), labels [B], augment_labels [B, A] -> [B, M]."""
        width, batch = self.mapping_width, c_noise.shape[0]
        proj = functools.partial(linear, width, axes=(None, "embed"), dtype=self.dtype)
        emb = proj(name="time_in_proj")(fourier_features(c_noise[:, None], width, seed=0))
        if self.augment_dim:
            if augment_labels is None:
                augment_labels = jnp.zeros((batch, self.augment_dim), jnp.float32)
            emb = emb + proj(name="aug_in_proj")(fourier_features(augment_labels, width, seed=1))
        elif augment_labels is not None:
            raise ValueError("augment_labels were given to an HDiT built with augment_dim = 0.")
        if self.num_classes:
            if labels is None:
                labels = jnp.full((batch,), self.num_classes, jnp.int32)
            table = nn.Embed(
                self.num_classes + 1,
                width,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(1.0), ("vocab", "embed")
                ),
                name="class_embed",
            )
            emb = emb + table(labels)
        elif labels is not None:
            raise ValueError("labels were given to an HDiT built with num_classes = 0.")
        return MappingNetwork(self.mapping_depth, self.ff_mult, self.dtype, name="mapping")(emb)


def hdit_problems(config) -> list[str]:
    """What makes `config` unable to build an HDiT, one sentence each (empty if nothing)."""
    m, h = config.model, config.model.hdit
    problems = []
    widths, depths = tuple(h.widths), tuple(h.depths)
    if not widths or len(widths) != len(depths):
        problems.append(
            f"config.model.hdit.widths = {widths} and config.model.hdit.depths = {depths} must "
            "be non-empty and of one length (one entry per level)."
        )
    if h.head_dim <= 0 or h.head_dim % 8:
        problems.append(
            f"config.model.hdit.head_dim = {h.head_dim} must be a positive multiple of 8 (axial "
            "RoPE rotates a quarter of each head per axis, in pairs)."
        )
    elif any(w % h.head_dim for w in widths):
        problems.append(
            f"config.model.hdit.widths = {widths} must be multiples of config.model.hdit.head_dim "
            f"= {h.head_dim}."
        )
    factor = m.patch_size * 2 ** max(len(widths) - 1, 0)
    if config.data.resolution % factor:
        problems.append(
            f"config.data.resolution = {config.data.resolution} must be a multiple of {factor} "
            f"for an HDiT with patch size {m.patch_size} and {len(widths)} levels."
        )
    if h.neighborhood_kernel < 0 or (h.neighborhood_kernel and h.neighborhood_kernel % 2 == 0):
        problems.append(
            f"config.model.hdit.neighborhood_kernel = {h.neighborhood_kernel} must be 0 (global "
            "attention) or a positive odd number."
        )
    return problems


def build_hdit(config, **kwargs):
    """The HDiT that `config.model.hdit` (and model.patch_size, num_classes, augment_dim, dtype,
    attention_impl, remat, scan; data.channels, resolution) describes."""
    if kwargs:
        raise ValueError(
            f"the HDiT builder takes no keyword arguments, but got {', '.join(sorted(kwargs))} "
            "(conv3x3 is the U-Net's seam for kernel search; HDiT has no 3x3 convolutions)."
        )
    problems = hdit_problems(config)
    if problems:
        raise ValueError(problems[0])
    m, h = config.model, config.model.hdit
    return HDiT(
        out_channels=config.data.channels,
        widths=tuple(h.widths),
        depths=tuple(h.depths),
        head_dim=h.head_dim,
        neighborhood_kernel=h.neighborhood_kernel,
        ff_mult=h.ff_mult,
        mapping_width=h.mapping_width,
        mapping_depth=h.mapping_depth,
        dropout=h.dropout,
        patch_size=m.patch_size,
        num_classes=m.num_classes,
        augment_dim=m.augment_dim,
        attention_impl=m.attention_impl,
        neighborhood_impl=h.neighborhood_impl,
        remat=m.remat,
        scan=m.scan,
        dtype=DTYPES[m.dtype],
    )

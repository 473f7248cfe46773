"""EDM's non-leaking augmentations (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Appendix F.2; the pipeline of Karras et al. 2020, "Training
Generative Adversarial Networks with Limited Data", as NVlabs/edm's `training/augment.py` runs it).

Each training image is transformed before the noise is added, and the transform's parameters go
to the network as conditioning ("augment labels"). Sampling passes zero labels, which every
transform here maps to the identity, so the generated distribution is the clean data's: the
augmentations do not leak into samples (EDM, Appendix F.2).

Each enabled transform (multiplier > 0) is applied to an image with probability p x multiplier,
independently per image and per transform; a transform not applied draws zero parameters, and
its labels are then zero. The transforms and their labels, in the order they run and their
labels are laid out (EDM's):

- xflip, yflip: w in {0, 1} (applied means flipped half the time); label w.
- scale: w ~ N(0, 1), isotropic scale 2^(0.2 w); label w.
- rotate_frac: w ~ U(-pi, pi), rotation by w; labels cos w - 1, sin w.
- aniso: w ~ N(0, 1), r ~ U(-pi, pi) half the time (else 0), scale 2^(0.2 w) along the axis
  at angle r and its inverse across it; labels w cos r, w sin r.
- translate_frac: w ~ N(0, 1) for x and y, shift by 0.125 w of the width and height; labels w.
- brightness: w ~ N(0, 1), + 0.2 w; label w.
- contrast: w ~ N(0, 1), x 2^(0.5 w) about 0; label w.
- lumaflip: w in {0, 1}, colours reflected along the luma axis; label w.
- hue: w ~ U(-pi, pi), colours rotated about the luma axis; labels cos w - 1, sin w.
- saturation: w ~ N(0, 1), chroma x 2^w; label w.

EDM's CIFAR-10 setting (xflip, yflip, scale, rotate_frac, aniso, translate_frac) gives 9 labels.
EDM's integer blits (rotate_int, translate_int), which its configs never enable, are left out.

The geometric transforms compose one affine matrix and resample once, as EDM does: reflect-pad
the image, upsample 2x with the Symlet-6 wavelet filter, sample bilinearly at the mapped
positions, filter with the same wavelet and decimate 2x. EDM pads each batch by what its
transforms need (a data-dependent shape, clipped at H - 1 and W - 1); here always by H - 1 and
W - 1, the most EDM pads, so that shapes are static under jit. Reflect padding extends the same
reflection whatever its width, so the samples agree with EDM's wherever EDM's padded image
reaches them; the only differences are EDM's own edge effects at its padded image's border
(the upsampling filter's zero padding there), which its margin of 6 pixels beyond the mapped
corners keeps from all but the outermost samples of strongly shrunk images.
The padded, upsampled image is 36 times the image; batches whose upsampled images pass
RESAMPLE_CHUNK_BYTES are resampled a chunk at a time (1024 x 1024: two images per chunk).
Upsampling runs as the filter's two phases and filtering as sums of shifted slices: the same
sums as EDM's convolutions, in another order of additions.

Unlike EDM's other labels, aniso's do not fully determine its transform: (w, r) and
(-w, r + pi) give the same labels but inverse stretches (tests/diffusion/test_augment.py). Zero
labels still mean the identity, which is what non-leaking needs.

Glossary: B batch, H/W height/width, C channels, A label width (`label_dim`).
"""

import jax
import jax.numpy as jnp
import numpy as np

# EDM's AugmentPipe defaults for the spreads of the draws (its train.py changes none of them).
SCALE_STD = 0.2  # log2 standard deviation of isotropic scaling
ROTATE_FRAC_MAX = 1.0  # range of rotation, 1 = the full circle
ANISO_STD = 0.2  # log2 standard deviation of anisotropic scaling
ANISO_ROTATE_PROB = 0.5  # probability that the anisotropic axis is rotated
TRANSLATE_FRAC_STD = 0.125  # standard deviation of translation, relative to the image size
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5  # log2
HUE_MAX = 1.0  # range of hue rotation, 1 = the full circle
SATURATION_STD = 1.0  # log2

# Label columns of each transform, in the order the transforms run and the labels are laid out.
FLIPS = {"xflip": 1, "yflip": 1}
GEOMETRIC = {"scale": 1, "rotate_frac": 2, "aniso": 2, "translate_frac": 2}
COLOUR = {"brightness": 1, "contrast": 1, "lumaflip": 1, "hue": 2, "saturation": 1}
LABEL_WIDTHS = {**FLIPS, **GEOMETRIC, **COLOUR}

# The Symlet-6 low-pass decomposition filter (PyWavelets' `sym6` dec_lo), with which EDM
# upsamples before and decimates after the bilinear resampling: as an orthogonal wavelet's
# filter its even shifts are orthonormal, so upsampling and decimating with it is the identity.
SYM6 = np.array(
    [
        0.015404109327027373,
        0.0034907120842174702,
        -0.11799011114819057,
        -0.048311742585633,
        0.4910559419267466,
        0.787641141030194,
        0.3379294217276218,
        -0.07263752278646252,
        -0.021060292512300564,
        0.04472490177066578,
        0.0017677118642428036,
        -0.007800708325034148,
    ],
    np.float32,
)
_BORDER = len(SYM6) // 4  # source pixels resampled beyond each edge, cut after decimation
_LUMA = np.array([1.0, 1.0, 1.0, 0.0], np.float32) / np.sqrt(3)  # in homogeneous RGB


def enabled(cfg) -> list[str]:
    """The transforms with a multiplier > 0, in label order. `cfg` is `config.augment` (or any
    object with its attribute names)."""
    return [name for name in LABEL_WIDTHS if float(getattr(cfg, name)) > 0]


def label_dim(cfg) -> int:
    """A, the width of the labels of `cfg`'s enabled transforms (EDM's CIFAR-10 setting: 9)."""
    return sum(LABEL_WIDTHS[name] for name in enabled(cfg))


def validate(config):
    """Raises ConfigError naming the first bad field of `config.augment` (or the label width
    `config.model.augment_dim` it needs)."""
    from patchdiff.config import ConfigError  # patchdiff.config calls this function

    cfg = config.augment
    p = cfg.p
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise ConfigError(f"config.augment.p = {p!r} is not allowed: it must be in [0, 1].")
    for name in LABEL_WIDTHS:
        mult = getattr(cfg, name)
        if isinstance(mult, bool) or not isinstance(mult, int | float) or not 0 <= mult < np.inf:
            raise ConfigError(
                f"config.augment.{name} = {mult!r} is not allowed: a probability multiplier "
                "must be a finite number >= 0 (0 = off)."
            )
    if p == 0:
        return
    names = enabled(cfg)
    if config.model.augment_dim != label_dim(cfg):
        raise ConfigError(
            f"config.model.augment_dim = {config.model.augment_dim!r} is not allowed with "
            f"config.augment.p = {p}: it must be {label_dim(cfg)}, the label width of the "
            f"enabled augmentations ({', '.join(names) or 'none'})."
        )
    colour = [name for name in names if name in COLOUR]
    if colour and config.data.channels not in (1, 3):
        raise ConfigError(
            f"config.data.channels = {config.data.channels} is not allowed with colour "
            f"augmentations ({', '.join(colour)}): they need 1 or 3 channels."
        )


def sample(key, batch: int, cfg) -> dict:
    """Each enabled transform's parameters {name: [B, k]} (EDM's draws, in its units; zero where
    the transform is not applied). One draw of each kind for all transforms, enabled or not (a
    few calls to the generator compile in a fraction of the time of one per transform), each
    transform reading its own column: enabling one does not change another's draws."""
    p = float(cfg.p)
    names = list(LABEL_WIDTHS)
    k_apply, k_bit, k_angle, k_normal, k_axis = jax.random.split(key, 5)
    applied = jax.random.uniform(k_apply, (batch, len(names)))  # < p x multiplier: applied
    bits = jax.random.bernoulli(k_bit, 0.5, (batch, len(names))).astype(jnp.float32)
    angles = jax.random.uniform(k_angle, (batch, len(names)), minval=-np.pi, maxval=np.pi)
    normals = jax.random.normal(k_normal, (batch, len(names), 2))
    params = {}
    for i, name in enumerate(names):
        mult = float(getattr(cfg, name))
        if mult <= 0:
            continue
        if name in ("xflip", "yflip", "lumaflip"):
            w = bits[:, i, None]
        elif name in ("rotate_frac", "hue"):
            w = angles[:, i, None] * (ROTATE_FRAC_MAX if name == "rotate_frac" else HUE_MAX)
        elif name == "translate_frac":
            w = normals[:, i]
        else:
            w = normals[:, i, :1]
        w = jnp.where(applied[:, i, None] < mult * p, w, 0.0)
        if name == "aniso":  # the axis's angle is drawn apart from p: it rotates half the time
            rotated = jax.random.uniform(k_axis, (batch, 1)) < ANISO_ROTATE_PROB
            w = jnp.concatenate([w, jnp.where(rotated, angles[:, i, None], 0.0)], axis=1)
        params[name] = w  # [B, 1], or [B, 2]: (w_x, w_y) of translate_frac, (w, r) of aniso
    return params


def labels(params: dict):
    """The network's augment labels [B, A] of `sample`'s parameters, in EDM's layout."""
    columns = []
    for name, w in params.items():
        if name in ("rotate_frac", "hue"):
            columns += [jnp.cos(w) - 1, jnp.sin(w)]
        elif name == "aniso":
            w, r = w[:, :1], w[:, 1:]
            columns += [w * jnp.cos(r), w * jnp.sin(r)]
        else:
            columns.append(w)
    return jnp.concatenate(columns, axis=1).astype(jnp.float32)


def apply(images, params: dict):
    """images [B, H, W, C] transformed by `sample`'s parameters: flips, then one affine
    resampling for the geometric transforms, then one colour matrix (EDM's order)."""
    if "xflip" in params:
        images = jnp.where(params["xflip"][:, :, None, None] > 0, images[:, :, ::-1], images)
    if "yflip" in params:
        images = jnp.where(params["yflip"][:, :, None, None] > 0, images[:, ::-1], images)
    if any(name in params for name in GEOMETRIC):
        images = resample(images, geometric_matrix(params, *images.shape[1:3]))
    if any(name in params for name in COLOUR):
        images = recolour(images, colour_matrix(params))
    return images


def augment(key, images, cfg):
    """EDM's augmentation of a batch: images [B, H, W, C] in [-1, 1] -> (augmented [B, H, W, C],
    labels [B, A]). With cfg.p = 0 nothing is drawn: the images come back as they are, with zero
    labels."""
    if float(cfg.p) == 0:
        return images, jnp.zeros((images.shape[0], label_dim(cfg)), jnp.float32)
    params = sample(key, images.shape[0], cfg)
    return apply(images, params), labels(params)


def _matrix(rows):
    """[B, n, n] from n rows of n entries, each a [B] array or a number."""
    batch = next(np.shape(e)[0] for row in rows for e in row if np.ndim(e))
    entries = [jnp.broadcast_to(jnp.asarray(e, jnp.float32), (batch,)) for row in rows for e in row]
    return jnp.stack(entries, axis=-1).reshape(batch, len(rows), len(rows))


def _translate2d(tx, ty):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def _scale2d(sx, sy):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _rotate2d(theta):
    c, s = jnp.cos(theta), jnp.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def geometric_matrix(params: dict, height: int, width: int):
    """[B, 3, 3]: maps an output pixel's position to the source position it samples, both in
    pixels from the image centre (x right, y down). Composed right to left as EDM's `G_inv`:
    scale, rotation, anisotropic scale, translation (content moves by +t)."""
    batch = next(iter(params.values())).shape[0]
    g = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (batch, 3, 3))
    if "scale" in params:
        s = jnp.exp2(params["scale"][:, 0] * SCALE_STD)
        g = g @ _scale2d(1 / s, 1 / s)
    if "rotate_frac" in params:
        g = g @ _rotate2d(params["rotate_frac"][:, 0])
    if "aniso" in params:
        w, r = params["aniso"][:, 0], params["aniso"][:, 1]
        s = jnp.exp2(w * ANISO_STD)
        g = g @ _rotate2d(-r) @ _scale2d(1 / s, s) @ _rotate2d(r)
    if "translate_frac" in params:
        t = params["translate_frac"] * TRANSLATE_FRAC_STD
        g = g @ _translate2d(-t[:, 0] * width, -t[:, 1] * height)
    return g


def _filter(x, axis: int, taps, padding: tuple[int, int], stride: int = 1):
    """Correlates every line of x along `axis` with `taps` (zero padding before and after),
    keeping every `stride`-th output: torch's conv1d as EDM runs it per channel. A sum of
    shifted slices, which XLA:CPU fuses into one loop; its one-channel convolution took 8x
    longer (measured on a 2-core CPU, 64 images of 32x32)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = padding
    x = jnp.pad(x, widths)
    size = (x.shape[axis] - len(taps)) // stride + 1
    out = 0
    for t, tap in enumerate(np.asarray(taps, np.float64)):
        part = jax.lax.slice_in_dim(x, t, t + stride * (size - 1) + 1, stride, axis)
        out = out + float(tap) * part
    return out


def _upsample(x, axis: int):
    """EDM's 2x upsampling along `axis`, n samples -> 2n: a zero after each sample but the last,
    then correlation with SYM6 reversed, padded by 6 on both sides. Computed as its two phases:
    even outputs meet the samples through the even taps, odd ones through the odd taps, so no
    zeros are stored or multiplied."""
    taps = SYM6[::-1]
    even = _filter(x, axis, taps[0::2], (3, 2))
    odd = _filter(x, axis, taps[1::2], (2, 3))
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(*out.shape[:axis], -1, *out.shape[axis + 2 :])


def _bilinear(image, xs, ys):
    """image [h, w, C] at source pixel positions xs, ys [H', W'] -> [H', W', C]; each of the four
    neighbours outside the image counts as zero (torch's grid_sample, padding_mode="zeros")."""
    h, w = image.shape[:2]
    x0, y0 = jnp.floor(xs), jnp.floor(ys)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

    def at(y, x):
        inside = ((x >= 0) & (x < w) & (y >= 0) & (y < h))[..., None]
        return jnp.where(inside, image[jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)], 0)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


# Images resampled at once, at most: the upsampled padded image is 4 x 3 x 3 = 36 times the
# image (two pads of H - 1, doubled), 450 MB in float32 at 1024 x 1024 x 3; larger batches go
# through in chunks of this many bytes of upsampled images.
RESAMPLE_CHUNK_BYTES = 1 << 30


def resample(images, g):
    """images [B, H, W, C] warped by g [B, 3, 3] (`geometric_matrix`): reflect padding, 2x
    wavelet upsampling, bilinear sampling on a 2x grid, wavelet filtering and 2x decimation."""
    batch, height, width, channels = images.shape
    upsampled_bytes = 4 * channels * (2 * (3 * height - 2)) * (2 * (3 * width - 2))
    chunk = max(1, RESAMPLE_CHUNK_BYTES // upsampled_bytes)
    if chunk >= batch:
        return jax.vmap(_resample_one)(images, g)
    return jax.lax.map(lambda args: _resample_one(*args), (images, g), batch_size=chunk)


def _resample_one(image, g):
    """`resample` of one image [H, W, C] by g [3, 3]."""
    height, width, _ = image.shape
    pad_y, pad_x = height - 1, width - 1  # the most EDM pads (torch's reflect allows no more)
    x = jnp.pad(image, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    x = _upsample(_upsample(x, 1), 0)  # [2 (H + 2 pad_y), 2 (W + 2 pad_x), C]
    up_h, up_w = x.shape[:2]

    # The output grid at twice the resolution, _BORDER source pixels wider on each side for the
    # decimation filter. In pixels from the centres, a position q of it samples the upsampled
    # image at 2 g((q + 1/2) / 2) - 1/2: EDM's half-pixel shift of the 2x grids' origin, which
    # matches SYM6's phase.
    out_h, out_w = 2 * (height + 2 * _BORDER), 2 * (width + 2 * _BORDER)
    to_up = np.array([[2, 0, -0.5], [0, 2, -0.5], [0, 0, 1]], np.float32)  # T(-1/2) S(2)
    from_out = np.array([[0.5, 0, 0.25], [0, 0.5, 0.25], [0, 0, 1]], np.float32)  # S(1/2) T(1/2)
    g2 = to_up @ g @ from_out
    qy, qx = jnp.meshgrid(
        jnp.arange(out_h, dtype=jnp.float32) - (out_h - 1) / 2,
        jnp.arange(out_w, dtype=jnp.float32) - (out_w - 1) / 2,
        indexing="ij",
    )  # [out_h, out_w]
    xs = g2[0, 0] * qx + g2[0, 1] * qy + g2[0, 2] + (up_w - 1) / 2
    ys = g2[1, 0] * qx + g2[1, 1] * qy + g2[1, 2] + (up_h - 1) / 2
    x = _bilinear(x, xs, ys)  # [out_h, out_w, C]

    # Decimation: correlation with SYM6, every other sample, the border cut.
    down_pad = ((len(SYM6) - 1) // 2,) * 2
    x = _filter(x, 1, SYM6, down_pad, stride=2)[:, _BORDER:-_BORDER]
    x = _filter(x, 0, SYM6, down_pad, stride=2)[_BORDER:-_BORDER]
    return x.astype(image.dtype)


def colour_matrix(params: dict):
    """[B, 4, 4] acting on homogeneous RGB, composed left to right as EDM's `M`: brightness,
    contrast, luma flip, hue rotation, saturation."""
    batch = next(iter(params.values())).shape[0]
    eye = jnp.eye(4, dtype=jnp.float32)
    m = jnp.broadcast_to(eye, (batch, 4, 4))
    luma = jnp.asarray(_LUMA)
    luma_outer = jnp.outer(luma, luma)
    if "brightness" in params:
        b = params["brightness"][:, 0] * BRIGHTNESS_STD
        m = _matrix([[1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1]]) @ m
    if "contrast" in params:
        c = jnp.exp2(params["contrast"][:, 0] * CONTRAST_STD)
        m = _matrix([[c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1]]) @ m
    if "lumaflip" in params:
        m = (eye - 2 * luma_outer * params["lumaflip"][:, :, None]) @ m
    if "hue" in params:
        m = _rotate_about_luma(params["hue"][:, 0]) @ m
    if "saturation" in params:
        s = jnp.exp2(params["saturation"][:, :, None] * SATURATION_STD)  # [B, 1, 1]
        m = (luma_outer + (eye - luma_outer) * s) @ m
    return m


def _rotate_about_luma(theta):
    """[B, 4, 4]: rotations by theta [B] about the luma axis (Rodrigues' formula)."""
    vx, vy, vz = (float(v) for v in _LUMA[:3])
    s, c = jnp.sin(theta), jnp.cos(theta)
    cc = 1 - c
    return _matrix(
        [
            [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
            [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
            [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
            [0, 0, 0, 1],
        ]
    )


def recolour(images, m):
    """images [B, H, W, C] (C = 3, or 1: the mean of the RGB rows) through m [B, 4, 4]."""
    channels = images.shape[-1]
    if channels == 3:
        out = jnp.einsum("bij,bhwj->bhwi", m[:, :3, :3], images, precision="highest")
        return (out + m[:, None, None, :3, 3]).astype(images.dtype)
    if channels == 1:
        row = m[:, :3, :].mean(axis=1)  # [B, 4]: grey in, grey out
        gain, offset = row[:, :3].sum(axis=1), row[:, 3]
        return (images * gain[:, None, None, None] + offset[:, None, None, None]).astype(
            images.dtype
        )
    raise ValueError(f"colour augmentations need 1 or 3 channels; the images have {channels}.")

"""Stable Diffusion's autoencoder (diffusers' `AutoencoderKL`; Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3.1) in Flax, NHWC, with loaders for diffusers
folders and CompVis single files and an exporter to diffusers' layout.

    vae = from_pretrained("/data/sd-vae-ft-mse")          # or a pipeline folder, or a .safetensors
    z = vae.to_model_space(vae.encode(images, key))       # what a latent diffusion model learns
    images = vae.decode(vae.from_model_space(z))

The network matches diffusers' layer for layer, so that its weights load unchanged (the formats
and names are in `vae_convert.py`): ResNet blocks with GroupNorm (eps 1e-6) and SiLU, stride-2
convs padded only at the bottom/right (diffusers' Downsample2D with padding=0), nearest-neighbour
2x upsampling then a conv, one single-head attention over all pixels in each mid block.

Glossary: B batch, H/W image height/width, h/w latent height/width (H/f, W/f with f the
downsample factor), C channels, S = h*w tokens.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
from safetensors.numpy import save_file

from patchdiff.models.layers import DTYPES
from patchdiff.models.vae_convert import (
    TensorFile,
    VAEConfig,
    VAEError,
    compvis_vae_names,
    from_state_dict,
    infer_compvis_config,
    params_from_tensors,
    to_state_dict,
)

# PyTorch's default Conv2d/Linear initialisation (kaiming_uniform with a=sqrt(5) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in))), which a VAE trained from scratch as diffusers' would start
# from; biases start at zero rather than PyTorch's uniform, which no result depends on.
torch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# diffusers' value for every GroupNorm of the VAE (resnet_eps, the attention's eps).
NORM_EPS = 1e-6
# DiagonalGaussianDistribution's clamp, which keeps exp(logvar) finite for untrained encoders.
LOGVAR_RANGE = (-30.0, 20.0)


def _compute_dtype(dtype: str):
    if dtype not in DTYPES:
        raise VAEError(f"AutoencoderKL: dtype must be one of {sorted(DTYPES)}, found {dtype!r}.")
    return DTYPES[dtype]


def conv(features: int, kernel: int, name: str, dtype, stride: int = 1, pad: int | None = None):
    # Explicit padding (k // 2 each side by default) as PyTorch's, not 'SAME', which pads a
    # stride-2 conv differently.
    pad = kernel // 2 if pad is None else pad
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_init,
        name=name,
    )


def group_norm(x, groups: int, name: str):
    """GroupNorm in float32 whatever the compute dtype; the result in x's dtype."""
    # The two-pass variance: E[x^2] - E[x]^2 loses digits where activations have a large mean,
    # which the decoder's do, and PyTorch computes it in two passes too.
    norm = nn.GroupNorm(
        num_groups=groups,
        epsilon=NORM_EPS,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name=name,
    )
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding (dropout 0, output scale 1)."""

    features: int
    groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [B, H, W, C] -> [B, H, W, features]
        h = conv(self.features, 3, "conv1", self.dtype)(
            nn.silu(group_norm(x, self.groups, "norm1"))
        )
        h = conv(self.features, 3, "conv2", self.dtype)(
            nn.silu(group_norm(h, self.groups, "norm2"))
        )
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, "shortcut", self.dtype)(x)
        return x + h


class Attention(nn.Module):
    """diffusers' mid-block Attention: one head as wide as the channels, over every pixel."""

    groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [B, h, w, C]
        b, hh, ww, c = x.shape
        h = group_norm(x, self.groups, "norm").reshape(b, hh * ww, c)  # [B, S, C]

        def dense(name):
            return nn.Dense(
                c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_init, name=name
            )

        q, k, v = dense("q")(h), dense("k")(h), dense("v")(h)
        # Scores and softmax in float32 (diffusers' upcast_softmax). The [B, S, S] scores are
        # materialised: S is 4096 at 512x512 and 16384 at 1024x1024 (1 GiB per image).
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores / math.sqrt(c), axis=-1).astype(self.dtype)
        out = dense("proj")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + out.reshape(b, hh, ww, c)


def mid_block(x, config: VAEConfig, dtype):
    x = ResnetBlock(x.shape[-1], config.norm_num_groups, dtype, name="mid_resnet_0")(x)
    if config.mid_block_add_attention:
        x = Attention(config.norm_num_groups, dtype, name="mid_attention")(x)
    return ResnetBlock(x.shape[-1], config.norm_num_groups, dtype, name="mid_resnet_1")(x)


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> posterior moments [B, h, w, 2 * latent_channels]."""

    config: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c, dtype = self.config, self.dtype
        x = conv(c.block_out_channels[0], 3, "conv_in", dtype)(x)
        for i, features in enumerate(c.block_out_channels):
            for j in range(c.layers_per_block):
                x = ResnetBlock(features, c.norm_num_groups, dtype, name=f"down_{i}_resnet_{j}")(x)
            if i < len(c.block_out_channels) - 1:
                # diffusers' Downsample2D(padding=0): one row and column of zeros at the
                # bottom/right only, then a valid stride-2 conv.
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = conv(features, 3, f"down_{i}_downsample", dtype, stride=2, pad=0)(x)
        x = mid_block(x, c, dtype)
        x = nn.silu(group_norm(x, c.norm_num_groups, "norm_out"))
        return conv(2 * c.latent_channels, 3, "conv_out", dtype)(x)


class Decoder(nn.Module):
    """Latents [B, h, w, latent_channels] -> image [B, H, W, out_channels]."""

    config: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, z):
        c, dtype = self.config, self.dtype
        x = conv(c.block_out_channels[-1], 3, "conv_in", dtype)(z)
        x = mid_block(x, c, dtype)
        for i, features in enumerate(reversed(c.block_out_channels)):
            for j in range(c.layers_per_block + 1):
                x = ResnetBlock(features, c.norm_num_groups, dtype, name=f"up_{i}_resnet_{j}")(x)
            if i < len(c.block_out_channels) - 1:
                x = x.repeat(2, axis=1).repeat(2, axis=2)  # nearest-neighbour 2x
                x = conv(features, 3, f"up_{i}_upsample", dtype)(x)
        x = nn.silu(group_norm(x, c.norm_num_groups, "norm_out"))
        return conv(c.out_channels, 3, "conv_out", dtype)(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL. `dtype` is the compute dtype; parameters are float32, and so are
    GroupNorm, the attention softmax and every output (moments, images)."""

    config: VAEConfig
    dtype: str = "float32"

    def setup(self):
        c, dtype = self.config, _compute_dtype(self.dtype)
        self.encoder = Encoder(c, dtype)
        self.decoder = Decoder(c, dtype)
        latent = c.latent_channels
        self.quant_conv = conv(2 * latent, 1, "quant_conv", dtype) if c.use_quant_conv else None
        self.post_quant_conv = (
            conv(latent, 1, "post_quant_conv", dtype) if c.use_post_quant_conv else None
        )

    def encode_moments(self, x):
        """x [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, h, w, latent]."""
        moments = self.encoder(x.astype(_compute_dtype(self.dtype)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """Unscaled latents z [B, h, w, latent_channels] -> images [B, H, W, out_channels]."""
        z = z.astype(_compute_dtype(self.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x, key):
        """Training: (reconstruction, mean, logvar), the posterior sampled with `key`."""
        mean, logvar = self.encode_moments(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z), mean, logvar


# The module is static: one compilation per module (its config and dtype) and input shape, shared
# by every VAE holding an equal module.
def _decode(module: AutoencoderKL, params, latents):
    return module.apply({"params": params}, latents, method="decode")


@functools.partial(jax.jit, static_argnums=0)
def _moments(module: AutoencoderKL, params, images):
    mean, logvar = module.apply({"params": params}, images, method="encode_moments")
    return mean, jnp.exp(0.5 * logvar)


@functools.partial(jax.jit, static_argnums=0)
def _sample(module: AutoencoderKL, params, images, key):
    mean, std = _moments(module, params, images)
    return mean + std * jax.random.normal(key, mean.shape)


_decode_jit = jax.jit(_decode, static_argnums=0)


class VAE:
    """A loaded autoencoder: module + float32 params, with jitted entry points (compiled once per
    shape). Latents are unscaled (the autoencoder's own space) unless a method says otherwise."""

    def __init__(self, module: AutoencoderKL, params, source: str = ""):
        self.module = module
        self.params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
        self.config: VAEConfig = module.config
        self.source = str(source)

    def __repr__(self):
        return f"VAE({self.config}, dtype={self.module.dtype!r}, source={self.source!r})"

    scaling_factor = property(lambda self: self.config.scaling_factor)
    shift_factor = property(lambda self: self.config.shift_factor)
    downsample_factor = property(lambda self: self.config.downsample_factor)
    latent_channels = property(lambda self: self.config.latent_channels)

    @property
    def decode_fn(self):
        """A pure (params, latents) -> images, for use inside another jitted function."""
        return functools.partial(_decode, self.module)

    def encode(self, images, key=None):
        """Images [B, H, W, C] in [-1, 1] -> the posterior's mean (key None) or a sample of it."""
        if key is None:
            return _moments(self.module, self.params, images)[0]
        return _sample(self.module, self.params, images, key)

    def encode_moments(self, images):
        """Images [B, H, W, C] in [-1, 1] -> the posterior's (mean, std), [B, h, w, latent]."""
        return _moments(self.module, self.params, images)

    def decode(self, latents):
        """Unscaled latents [B, h, w, latent] -> images [B, H, W, C], not clipped to [-1, 1]."""
        return _decode_jit(self.module, self.params, latents)

    def to_model_space(self, z):
        """Latents as a diffusion model sees them: (z - shift) * scale, near unit variance."""
        return (z - self.shift_factor) * self.scaling_factor

    def from_model_space(self, z):
        return z / self.scaling_factor + self.shift_factor


def init_vae(config: VAEConfig, key, dtype: str = "float32") -> VAE:
    """A randomly initialised autoencoder."""
    module = AutoencoderKL(config, dtype)
    f = config.downsample_factor
    x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
    # As models.init_params: init is threefry hashing that LLVM optimises slowly and gains nothing.
    init = jax.jit(module.init).lower(key, x, jax.random.key(0))
    compiled = init.compile(compiler_options={"xla_backend_optimization_level": 0})
    return VAE(module, compiled(key, x, jax.random.key(0))["params"])


# ---------------------------------------------------------------------------------------------
# Files

WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers' variant="fp16" name; read (as float32) where the full-precision file is absent.
WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"
CONFIG = "config.json"


def from_pretrained(
    path,
    *,
    scaling_factor: float | None = None,
    dtype: str = "float32",
    norm_num_groups: int | None = None,
) -> VAE:
    """The autoencoder at `path`: a diffusers folder (config.json and
    diffusion_pytorch_model.safetensors), a pipeline folder holding one as vae/, or a single
    CompVis-layout .safetensors file (a whole Stable Diffusion checkpoint, whose other tensors are
    ignored, or a VAE alone).

    scaling_factor: overrides the file's. A single file carries none and defaults to 0.18215,
        Stable Diffusion 1.x/2.x's; SDXL's VAE needs 0.13025.
    norm_num_groups: a single file's GroupNorm group count, which no tensor shape shows
        (default 32, every Stable Diffusion VAE's); a folder's must agree with its config.json.
    dtype: the compute dtype ("float32", "bfloat16", "float16"); parameters stay float32.

    Raises VAEError, one sentence naming the file (and the tensor), for anything that does not
    load; PyTorch pickles (.bin, .ckpt) are not read.
    """
    _compute_dtype(dtype)  # before reading gigabytes
    path = pathlib.Path(path)
    if not path.exists():
        raise VAEError(f"{path}: no such file or folder.")
    if path.is_dir():
        folder = (
            path / "vae"
            if not (path / CONFIG).exists() and (path / "vae" / CONFIG).exists()
            else path
        )
        config_path = folder / CONFIG
        if not config_path.exists():
            raise VAEError(f"{folder} has no {CONFIG} (nor a vae/ folder with one).")
        weights = folder / WEIGHTS if (folder / WEIGHTS).exists() else folder / WEIGHTS_FP16
        if not weights.exists():
            raise VAEError(f"{folder} has no {WEIGHTS} (PyTorch .bin files are not read).")
        try:
            d = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VAEError(f"{config_path} is not readable JSON ({e}).") from None
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise VAEError(f"{config_path} describes a {d['_class_name']}, not an AutoencoderKL.")
        config = VAEConfig.from_diffusers(d, str(config_path))
        if norm_num_groups not in (None, config.norm_num_groups):
            raise VAEError(
                f"{config_path} says norm_num_groups {config.norm_num_groups}, "
                f"not the {norm_num_groups} asked for."
            )
        file = TensorFile(weights)
        params = from_state_dict(file.loaders(file.names), config, str(weights))
    else:
        if path.suffix != ".safetensors":
            raise VAEError(f"{path}: only .safetensors files are read (no PyTorch pickles).")
        file = TensorFile(path)
        names = compvis_vae_names(file)  # {CompVis name: name in the file}
        if not names:
            raise VAEError(
                f"{path} holds no VAE tensors (encoder.*, decoder.*, bare or under "
                "first_stage_model. or vae.)."
            )
        if any(".down_blocks." in n or ".up_blocks." in n or ".mid_block." in n for n in names):
            raise VAEError(
                f"{path} holds diffusers tensor names: load its folder, with its {CONFIG}."
            )
        config = infer_compvis_config(
            {n: file.shape(full) for n, full in names.items()},
            str(path),
            0.18215 if scaling_factor is None else scaling_factor,
            32 if norm_num_groups is None else norm_num_groups,
        )
        loaders = file.loaders(names.values())
        tensors = {n: loaders[full] for n, full in names.items()}
        params = params_from_tensors(tensors, config, str(path), "compvis")
    if scaling_factor is not None:
        config = dataclasses.replace(config, scaling_factor=float(scaling_factor))
    return VAE(AutoencoderKL(config, dtype), params, source=str(path))


def save_pretrained(vae: VAE, folder) -> pathlib.Path:
    """Writes `vae` as a diffusers folder (config.json, diffusion_pytorch_model.safetensors) that
    diffusers' AutoencoderKL.from_pretrained and `from_pretrained` load. The folder is written
    beside its final name and renamed into place, and an existing one is replaced only once the
    new one is whole."""
    folder = pathlib.Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
        (tmp / CONFIG).write_text(json.dumps(vae.config.to_diffusers(), indent=2) + "\n")
        # "pt" as PyTorch's save_file writes it: transformers-style loaders check the format.
        save_file(to_state_dict(vae.params, vae.config), tmp / WEIGHTS, metadata={"format": "pt"})
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


__all__ = [
    "AutoencoderKL",
    "VAE",
    "VAEConfig",
    "VAEError",
    "from_pretrained",
    "from_state_dict",
    "init_vae",
    "save_pretrained",
    "to_state_dict",
]

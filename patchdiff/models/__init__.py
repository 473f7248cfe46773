"""Networks F, built by name from `config.model` through `build_model`.

Models are flax.linen modules; `init_params` returns a plain parameter pytree (the logical-axis
boxes removed), which keeps vmapping candidates, EMA and sharding simple.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchdiff.models.dit import DiT, build_dit
from patchdiff.models.hdit import HDiT, build_hdit
from patchdiff.models.layers import DTYPES, PLACEHOLDER_CONVS, ConvFactory, default_conv3x3
from patchdiff.models.unet import ARCHS, UNet, level_resolutions
from patchdiff.registry import Registry

MODELS = Registry("model")


@MODELS.register("unet")
def build_unet(config, conv3x3: ConvFactory = default_conv3x3):
    m = config.model
    return UNet(
        out_channels=config.data.channels,
        resolution=config.data.resolution,
        channels=m.channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        head_dim=m.head_dim,
        arch=m.arch,
        dropout=m.dropout,
        patch_size=m.patch_size,
        num_classes=m.num_classes,
        augment_dim=m.get("augment_dim", 0),
        use_coords=m.use_coords,
        noise_embedding=m.noise_embedding,
        max_groups=m.max_groups,
        attention_impl=m.attention_impl,
        dtype=DTYPES[m.dtype],
        conv3x3=conv3x3,
    )


MODELS.register("dit")(build_dit)
MODELS.register("hdit")(build_hdit)


def build_model(config, **kwargs):
    """The network named by `config.model.name`; kwargs go to its builder (e.g. `conv3x3`, the
    seam through which kernel search replaces the residual blocks' 3x3 convolutions)."""
    return MODELS.get(config.model.name, "config.model.name")(config, **kwargs)


def dummy_inputs(config, batch: int = 1, resolution: int | None = None):
    """Zero inputs of the right shapes for init and cost analysis: (x, c_noise, kwargs)."""
    res = resolution or config.data.resolution
    x = jnp.zeros((batch, res, res, config.data.channels), jnp.float32)
    kwargs = {}
    if config.model.num_classes:
        kwargs["labels"] = jnp.zeros((batch,), jnp.int32)
    if config.model.use_coords:
        kwargs["coords"] = jnp.zeros((batch, res, res, 2), jnp.float32)
    augment_dim = config.model.get("augment_dim", 0)
    if augment_dim:  # zeros: the labels of no augmentation
        kwargs["augment_labels"] = jnp.zeros((batch, augment_dim), jnp.float32)
    return x, jnp.zeros((batch,), jnp.float32), kwargs


def init_params(model, key, config, batch: int = 1):
    """Fresh parameters as a plain pytree of float32 arrays (init compiled: op-by-op init of a
    deep U-Net is many times slower)."""
    x, c_noise, kwargs = dummy_inputs(config, batch)
    # Init runs once, and its program is mostly threefry hashing, which LLVM's optimiser takes
    # long over: without it, a small U-Net's init compiles in 2.6 s instead of 11.8 s on a
    # 2-core CPU. The random bits are the same; the float transforms of them (normals through
    # erfinv) can differ from the optimised program's in the last bit (2e-7 seen).
    if isinstance(key, jax.core.Tracer):  # inside eval_shape or jit: part of that program
        return nn.meta.unbox(model.init(key, x, c_noise, **kwargs)["params"])
    init = jax.jit(model.init).lower(key, x, c_noise, **kwargs)
    compiled = init.compile(compiler_options={"xla_backend_optimization_level": 0})
    return nn.meta.unbox(compiled(key, x, c_noise, **kwargs)["params"])


__all__ = [
    "ARCHS",
    "DTYPES",
    "DiT",
    "HDiT",
    "MODELS",
    "PLACEHOLDER_CONVS",
    "UNet",
    "build_model",
    "dummy_inputs",
    "init_params",
    "level_resolutions",
]

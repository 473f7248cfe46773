"""CIFAR-10 32x32 pixels, unconditional, with DiT-B/4 (Peebles & Xie 2023: 12 blocks of width 768,
12 heads, 4x4 patches, so 64 tokens at full size) as the network, EDM preconditioning and Patch
Diffusion's crops (32, 16 and 8 pixels: 8x8, 4x4 and 2x2 tokens, each placed by its pixel
coordinates through `use_coords`).

    python -m patchdiff.data.prepare cifar10   # once (needs the [prepare] extra)
    python -m patchdiff.main --config ml_collections_configs/dit_b4_cifar10.py --workdir runs/cifar10_dit_b4
    python -m patchdiff.main --config ml_collections_configs/dit_b4_cifar10.py:runlocal --workdir /tmp/c10_dit

Optimisation is DiT's (Adam at a constant 1e-4, no weight decay; EDM's 1e-3 is a U-Net's rate)
at EDM's CIFAR-10 batch and EMA. `config.model.num_classes = 10` makes it class-conditional
(label dropout 0.1 for guidance, as base sets).
"""

from ml_collections_configs import base

# DiT's sizes (Table 1): (depth, width, heads).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def dit(config, size: str, patch_size: int):
    """Makes `config.model` the DiT of `size` (S, B, L, XL) with P x P patches."""
    config.model.name = "dit"
    config.model.dit.depth, config.model.dit.width, config.model.dit.heads = SIZES[size]
    config.model.patch_size = patch_size
    return config


def shrink(config):
    """`runlocal`: a two-block DiT and a schedule small enough for a laptop CPU."""
    config.model.dit.depth, config.model.dit.width, config.model.dit.heads = 2, 64, 2
    base.shrink_schedule(config)
    config.eval.num_samples = 64
    config.eval.steps = 6
    return config


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = dit(base.get_config(), "B", patch_size=4)
    config.model.use_coords = True
    config.diffusion.parameterisation = "edm"
    config.diffusion.patch_scales = (1.0, 0.5, 0.25)
    config.diffusion.patch_probs = (0.5, 0.3, 0.2)
    config.train.lr = 1e-4
    config.train.lr_schedule = "constant"
    config.train.total_steps = 200_000_000 // 512
    config.train.checkpoint_every = 10_000
    return shrink(config) if "runlocal" in options else config

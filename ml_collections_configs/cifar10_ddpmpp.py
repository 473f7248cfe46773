"""CIFAR-10 32x32, unconditional, EDM's DDPM++ setup (Karras et al. 2022, Table 7, VP column with
EDM preconditioning): NVlabs/edm's DDPM++ network layer for layer (`model.arch = "ddpmpp"`,
55,732,739 parameters, pinned by tests/models/test_unet.py), batch 512, 200 Mimg.

    python -m patchdiff.data.prepare cifar10   # once (needs the [prepare] extra)
    python -m patchdiff.main --config ml_collections_configs/cifar10_ddpmpp.py --workdir runs/cifar10_ddpmpp
    python -m patchdiff.main --config ml_collections_configs/cifar10_ddpmpp.py:runlocal --workdir /tmp/c10

EDM's geometric augmentation pipeline is not implemented; its dropout (0.13) is kept.
"""

from ml_collections_configs import base


def shrink(config):
    """`runlocal`: a network and schedule small enough for a laptop CPU."""
    config.model.channels = 16
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.head_dim = 16
    config.model.attn_resolutions = (config.data.resolution // (2 * config.model.patch_size),)
    config.train.batch_size = 8
    config.train.total_steps = 10
    config.train.log_every = 5
    config.train.checkpoint_every = 5
    config.train.sample_every = 10
    config.train.lr_rampup_img = 100
    config.sample.steps = 6
    config.sample.num_images = 8
    config.sample.batch_size = 8
    return config


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = base.get_config()
    config.model.use_coords = False
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.total_steps = 200_000_000 // 512
    config.train.checkpoint_every = 10_000
    return shrink(config) if "runlocal" in options else config

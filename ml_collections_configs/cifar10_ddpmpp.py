"""CIFAR-10 32x32, unconditional, EDM's DDPM++ setup (Karras et al. 2022, Table 7, VP column with
EDM preconditioning): NVlabs/edm's DDPM++ network layer for layer (`model.arch = "ddpmpp"`;
55,732,739 parameters without augmentation labels, pinned by tests/models/test_unet.py, and
55,733,891 with this file's, by tests/diffusion/test_augment.py), batch 512, 200 Mimg.

    python -m patchdiff.data.prepare cifar10   # once (needs the [prepare] extra)
    python -m patchdiff.main --config ml_collections_configs/cifar10_ddpmpp.py --workdir runs/cifar10_ddpmpp
    python -m patchdiff.main --config ml_collections_configs/cifar10_ddpmpp.py:runlocal --workdir /tmp/c10

With EDM's CIFAR-10 augmentation (train.py's default `--augment=0.12`, Appendix F.2): x-flips,
y-flips, isotropic and anisotropic scaling, rotation and translation, each applied with
probability 0.12 (x-flips always drawn, so half the images are mirrored), their 9 labels fed to
the network (EDM's `augment_dim = 9`, whose bias-free projection `map_augment` adds 9 x 128
parameters). The augmentation's x-flips replace the loader's, as EDM trains CIFAR-10 without
its dataset x-flips (`--xflip` off). Dropout 0.13, as EDM's.
"""

from ml_collections_configs import base


def shrink(config):
    """`runlocal`: a network and schedule small enough for a laptop CPU."""
    config.model.channels = 16
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.head_dim = 16
    config.model.attn_resolutions = (config.data.resolution // (2 * config.model.patch_size),)
    base.shrink_schedule(config)
    config.train.lr_rampup_img = 100
    return config


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = base.get_config()
    config.model.use_coords = False
    # EDM's train.py for --augment > 0: AugmentPipe(p, xflip=1e8, yflip=1, scale=1,
    # rotate_frac=1, aniso=1, translate_frac=1) and augment_dim = 9.
    config.augment.update(
        p=0.12,
        xflip=1e8,
        yflip=1.0,
        scale=1.0,
        rotate_frac=1.0,
        aniso=1.0,
        translate_frac=1.0,
        brightness=0.0,  # no colour transforms: geometric only
        contrast=0.0,
        lumaflip=0.0,
        hue=0.0,
        saturation=0.0,
    )
    config.model.augment_dim = 9
    config.data.random_flip = False  # the augmentation's x-flips, which the labels record
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.total_steps = 200_000_000 // 512
    config.train.checkpoint_every = 10_000
    return shrink(config) if "runlocal" in options else config

"""CelebA 64x64 with Patch Diffusion: DDPM++ at 64 (mult 1, 2, 2, 2; attention at 16), crops of
64 / 32 / 16 with coordinate channels (Wang et al. 2023's CelebA setting), EDM preconditioning.

    python -m patchdiff.data.prepare celeb_a   # once
    python -m patchdiff.main --config ml_collections_configs/celeba64_patch.py --workdir runs/celeba64
"""

from ml_collections_configs import base, cifar10_ddpmpp


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = base.get_config()
    config.data.name = "celeb_a"
    config.data.resolution = 64
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.dropout = 0.05
    config.train.batch_size = 256
    config.train.lr = 2e-4
    config.train.total_steps = 200_000_000 // 256
    config.train.checkpoint_every = 10_000
    return cifar10_ddpmpp.shrink(config) if "runlocal" in options else config

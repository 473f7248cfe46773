"""FFHQ 64x64 with Patch Diffusion, EDM's FFHQ-64 DDPM++ settings (dropout 0.05, lr 2e-4, batch
256) from a folder of images (FFHQ is not in TFDS: point config.data.path at the PNGs).

    python -m patchdiff.main --config ml_collections_configs/ffhq64_patch.py --workdir runs/ffhq64 --config.data.path=/data/ffhq/images64
"""

from ml_collections_configs import base, celeba64_patch, cifar10_ddpmpp


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = celeba64_patch.get_config()
    config.data.source = "folder"
    config.data.name = "ffhq"
    config.data.path = "/data/ffhq/images64"
    return cifar10_ddpmpp.shrink(config) if "runlocal" in options else config

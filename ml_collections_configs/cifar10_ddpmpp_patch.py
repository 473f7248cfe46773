"""CIFAR-10 with Patch Diffusion (Wang et al. 2023): the DDPM++ setup of cifar10_ddpmpp.py, trained
on random crops of 32, 16 and 8 pixels (probabilities 0.5 / 0.3 / 0.2, batch x1 / x2 / x4) with
pixel-coordinate channels.

    python -m patchdiff.main --config ml_collections_configs/cifar10_ddpmpp_patch.py --workdir runs/cifar10_patch
"""

from ml_collections_configs import base, cifar10_ddpmpp


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = cifar10_ddpmpp.get_config()
    config.model.use_coords = True
    config.diffusion.patch_scales = (1.0, 0.5, 0.25)
    config.diffusion.patch_probs = (0.5, 0.3, 0.2)
    return cifar10_ddpmpp.shrink(config) if "runlocal" in options else config

"""LSUN bedrooms 256x256 with Luhman & Luhman's patchify stem P=4 (every convolution at 64x64),
their DDPM-style setup: discrete cosine VP schedule, eps-prediction, the sqrt(SNR) loss weighting.

    python -m patchdiff.data.prepare lsun/bedroom   # once
    python -m patchdiff.main --config ml_collections_configs/lsun256_p4.py --workdir runs/lsun_p4
"""

from ml_collections_configs import base, cifar10_ddpmpp


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = base.get_config()
    config.data.name = "lsun/bedroom"
    config.data.resolution = 256
    config.model.patch_size = 4
    config.model.channels = 128
    config.model.channel_mult = (1, 2, 3, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16, 8)  # feature maps at 64, 32, 16, 8
    config.model.dropout = 0.0
    config.model.use_coords = False
    config.diffusion.parameterisation = "vp"
    config.diffusion.vp_schedule = "cosine"
    config.diffusion.loss_weighting = "sqrt_snr"
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size = 64
    config.train.lr = 1e-4
    config.train.lr_schedule = "warmup_cosine"
    config.train.total_steps = 500_000
    config.sample.sampler = "ddim"
    config.sample.steps = 50
    return cifar10_ddpmpp.shrink(config) if "runlocal" in options else config

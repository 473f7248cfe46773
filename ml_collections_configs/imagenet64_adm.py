"""ImageNet 64x64, class-conditional, ADM's network (Dhariwal & Nichol 2021: 192 channels x
(1, 2, 3, 4), 3 blocks, attention at 32/16/8, 64-channel heads) with EDM preconditioning and
training as in EDM's ImageNet-64 retraining (batch 4096, lr 2e-4, EMA half-life 50 Mimg), and
classifier-free guidance through label dropout.

    python -m patchdiff.data.prepare imagenet_resized/64x64   # once
    python -m patchdiff.main --config ml_collections_configs/imagenet64_adm.py --workdir runs/in64
"""

from ml_collections_configs import base, cifar10_ddpmpp


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = base.get_config()
    config.data.name = "imagenet_resized/64x64"
    config.data.resolution = 64
    config.model.arch = "adm"
    config.model.head_dim = 64
    config.model.channels = 192
    config.model.channel_mult = (1, 2, 3, 4)
    config.model.num_res_blocks = 3
    config.model.attn_resolutions = (32, 16, 8)
    config.model.dropout = 0.1
    config.model.num_classes = 1000
    config.model.use_coords = False
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size = 4096
    config.train.lr = 2e-4
    config.train.ema_halflife_img = 50_000_000
    config.train.total_steps = 2_500_000_000 // 4096
    config.train.checkpoint_every = 5000
    config.sample.guidance_scale = 1.5
    return cifar10_ddpmpp.shrink(config) if "runlocal" in options else config

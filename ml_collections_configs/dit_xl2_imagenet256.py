"""ImageNet 256x256 in Stable Diffusion's VAE latents (32x32x4), class-conditional, with DiT-XL/2
as Peebles & Xie 2023 trained it: 28 blocks of width 1152, 16 heads, 2x2 patches (256 tokens),
AdamW at a constant 1e-4 without weight decay, batch 256, EMA decay 0.9999, label dropout 0.1,
DDPM's linear schedule of 1000 steps (`vp`), and classifier-free guidance 1.5 (their FID-50K
2.27 setting, 250 DDPM steps) for samples and evaluation.

    python -m patchdiff.data.encode --config ml_collections_configs/dit_xl2_imagenet256.py --vae /weights/sd-vae-ft-ema --out /data/in256_latents --flips
    python -m patchdiff.main --config ml_collections_configs/dit_xl2_imagenet256.py --workdir runs/in256_dit_xl2 --config.data.path=/data/in256_latents
    python -m patchdiff.main --config ml_collections_configs/dit_xl2_imagenet256.py:runlocal --workdir /tmp/in256_dit --config.data.path=/data/in256_latents

The latents are sd-vae-ft-ema's (README, "Latent diffusion"), encoded once with each image's
mirror (`--flips`), as DiT's own feature extraction does; training draws a posterior sample
from the stored mean and std at each read, and samples are decoded to pixels for grids and FID.

Differences from DiT: the network predicts no variance (DiT's learn_sigma; parameter counts in
tests/models/test_dit.py), and guidance acts on all 4 latent channels (DiT's `forward_with_cfg`
guides 3, its issue #41).
"""

from ml_collections_configs import base, dit_b4_cifar10, imagenet256_patch_latent


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = dit_b4_cifar10.dit(base.get_config(), "XL", patch_size=2)
    imagenet256_patch_latent.sd_vae_latents(config)
    config.data.random_flip = True  # DiT's only augmentation
    config.model.num_classes = 1000
    config.model.use_coords = False  # no patch training: full 32x32 latents, as DiT
    config.diffusion.parameterisation = "vp"
    config.diffusion.vp_schedule = "linear"
    config.diffusion.vp_timesteps = 1000
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size = 256
    config.train.lr = 1e-4
    config.train.lr_schedule = "constant"
    config.train.weight_decay = 0.0
    config.train.ema_decay = 0.9999
    config.train.total_steps = 7_000_000  # the paper's final XL/2; its ablations ran 400k
    config.train.checkpoint_every = 50_000
    config.sample.sampler = config.eval.sampler = "ddpm"
    config.sample.steps = config.eval.steps = 250
    config.sample.guidance_scale = config.eval.guidance_scale = 1.5
    return dit_b4_cifar10.shrink(config) if "runlocal" in options else config

"""ImageNet 256x256, class-conditional, in Stable Diffusion's VAE latents (sd-vae-ft-ema: 32x32x4,
scale 0.18215) with Patch Diffusion as Wang et al. 2023 trained it (FID 2.72): EDM's ADM network
(192 channels x (1, 2, 3, 4), 3 blocks, attention at 32/16/8), EDM preconditioning, 32x32 latents
half the time and 16x16 crops otherwise (`real_p = 0.5`, twice the batch at 16x16), batch 4096,
Adam lr 1e-4 (ramped over 10 Mimg), EMA half-life 50 Mimg, dropout 0.1, 2500 Mimg in all; label
dropout 0.1 for classifier-free guidance. Samples: their stochastic Heun, 256 steps with churn
40 in sigma [0.05, 50] and noise 1.003, decoded through the VAE.

    python -m patchdiff.data.prepare imagenet2012   # once; TFDS wants ILSVRC2012's tars in its manual_dir
    python -m patchdiff.data.encode --config ml_collections_configs/imagenet256_patch_latent.py --vae /weights/sd-vae-ft-ema --out /data/in256_latents
    python -m patchdiff.main --config ml_collections_configs/imagenet256_patch_latent.py --workdir runs/in256_patch --config.data.path=/data/in256_latents
    python -m patchdiff.main --config ml_collections_configs/imagenet256_patch_latent.py:runlocal --workdir /tmp/in256_patch --config.data.path=/data/in256_latents

`--vae` takes diffusers' folder of stabilityai/sd-vae-ft-ema (config.json and
diffusion_pytorch_model.safetensors) or a single-file SD checkpoint (README, "Latent diffusion").
Not Wang et al.'s: they trained in fp16 with loss scaling 100, this runs bfloat16, which needs
none; they encode each image as it is read (a posterior sample per step), the `latents` source
draws the same posterior sample from stored means and stds; the guidance scale 1.5 is ours (the
paper does not state theirs).
"""

from ml_collections_configs import base, cifar10_ddpmpp, imagenet64_adm

SD_VAE_SCALE = 0.18215  # Rombach et al.'s scale of sd-vae-ft-ema's latents (unit variance)


def sd_vae_latents(config, path="SET_ME/in256_latents"):
    """`config.data`: ImageNet 256x256 (TFDS imagenet2012, ADM's centre crop) as Stable
    Diffusion's VAE latents, 32x32x4, read from `path` (the folder encode --out wrote)."""
    config.data.source = "latents"
    config.data.name = "imagenet256_sd_vae"
    config.data.path = path
    config.data.resolution = 32
    config.data.channels = 4
    config.data.random_flip = True
    config.latent.data.source = "tfds"
    config.latent.data.name = "imagenet2012"
    config.latent.data.resolution = 256
    config.latent.data.channels = 3
    config.latent.data.fit = "crop_resize"
    return config


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = sd_vae_latents(imagenet64_adm.get_config())
    config.model.dtype = "bfloat16"
    config.model.use_coords = True  # Patch Diffusion's coordinate channels
    config.diffusion.patch_scales = (1.0, 0.5)
    config.diffusion.patch_probs = (0.5, 0.5)
    config.train.batch_size = 4096
    config.train.lr = 1e-4
    config.train.ema_halflife_img = 50_000_000
    # 2500 Mimg, where a step at 16x16 counts twice the batch: 1.5 x 4096 images per step.
    config.train.total_steps = 2_500_000_000 * 2 // (3 * 4096)
    config.train.label_dropout = 0.1
    config.sample.sampler = config.eval.sampler = "heun"
    config.sample.steps = config.eval.steps = 256
    config.sample.churn = 40.0
    config.sample.s_tmin, config.sample.s_tmax, config.sample.s_noise = 0.05, 50.0, 1.003
    config.sample.guidance_scale = config.eval.guidance_scale = 1.5
    if "runlocal" in options:
        cifar10_ddpmpp.shrink(config)
        config.model.dtype = "float32"
        config.sample.steps = config.eval.steps = 6
        config.eval.num_samples = 64
    return config

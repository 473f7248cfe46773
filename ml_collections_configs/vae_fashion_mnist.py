"""A small KL autoencoder for Fashion-MNIST (latent diffusion's first stage): 32x32x1 pixels
(zero-padded from 28) -> 8x8x4 latents, trained with LDM's objective without LPIPS (l1 + a small
KL; the PatchGAN term is off), exported as a diffusers folder with unit-variance latents for
ml_collections_configs/latent_fashion_mnist.py.

    sudo apt-get install dataset-fashion-mnist   # the data, once
    python -m patchdiff.vae --config ml_collections_configs/vae_fashion_mnist.py --workdir runs/vae_fmnist
    python -m patchdiff.vae --config ml_collections_configs/vae_fashion_mnist.py --workdir runs/vae_fmnist --mode eval
    python -m patchdiff.vae --config ml_collections_configs/vae_fashion_mnist.py --workdir runs/vae_fmnist --mode export

Training ends with the export to runs/vae_fmnist/vae/ (--mode export rewrites it from the newest
checkpoint). `:runlocal` makes it a seconds-long smoke run.

Widths (16, 32, 32) train at about 195 images/s on a 2-core CPU: 1500 steps in about 8 minutes.
Twice the widths, (32, 64, 64), reached 28.1 dB test PSNR at 1500 steps (26.8 at 1000) but ran
at 78 images/s, 23 minutes; this size's figures are in BENCHMARKS.md (benchmarks/latent_demo.py).

Only the blocks the autoencoder reads are here: seed, distributed and multihost, and data (the
diffusion config's, from base), then vae, loss, train, eval and export.
"""

import ml_collections

from ml_collections_configs import base


def get_config(arg=None):
    options = base.parse_arg(arg)
    shared = base.get_config()
    config = ml_collections.ConfigDict()
    config.seed = shared.seed
    config.distributed = shared.distributed
    config.multihost = shared.multihost
    config.data = shared.data
    config.data.source = "fashion_mnist"
    config.data.name = "fashion_mnist"
    config.data.channels = 1
    config.data.fit = "pad"
    config.data.resolution = 32
    config.data.random_flip = True

    # diffusers' AutoencoderKL (patchdiff/models/vae.py) at a small size: three levels (16, 32,
    # 32 channels) downsample by 4, one ResNet block per level, attention in the middle at 8x8.
    config.vae = ml_collections.ConfigDict()
    config.vae.block_out_channels = (16, 32, 32)
    config.vae.layers_per_block = 1
    config.vae.latent_channels = 4
    config.vae.norm_num_groups = 8
    config.vae.mid_block_add_attention = True
    config.vae.dtype = "float32"  # compute dtype: float32, bfloat16, float16

    # LDM's objective (autoencoder_losses.py), each term weighted; the reconstruction terms are
    # means over pixels, the KL a sum over the latent's dimensions averaged over the batch.
    config.loss = ml_collections.ConfigDict()
    config.loss.l1_weight = 1.0  # LDM's pixel loss
    config.loss.l2_weight = 0.0
    # LDM weighs its KL 1e-6 against a per-image pixel *sum*: 1e-6 / 196608 per mean pixel at
    # 256x256x3, a nearly free latent. Here the latent keeps 1/4 of the pixel count (LDM's f8
    # keeps 1/48), room enough to copy pixel noise, and 1e-6 per mean pixel is still ~1/20 of a
    # true ELBO's weight (b / pixels for a Laplace decoder of scale b ~ 0.02: 2e-5), so the
    # reconstruction wins while the latents stay bounded.
    config.loss.kl_weight = 1e-6
    # The PatchGAN term (hinge loss): off (0) builds no discriminator at all.
    config.loss.adv_weight = 0.0
    config.loss.adv_start_step = 500  # LDM's disc_start: D and the G term start here
    config.loss.disc_channels = 32
    # Two stride-2 layers: 34-pixel receptive fields, about the image (pix2pix's 3 see 70).
    config.loss.disc_layers = 2
    config.loss.disc_norm = "group"  # or "none" (pix2pix's BatchNorm would add state)
    config.loss.disc_lr = 1e-4

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64
    config.train.total_steps = 1500
    config.train.lr = 1e-3
    config.train.warmup_steps = 100  # linear from lr/100 to lr, then constant
    for name in ("adam_b1", "adam_b2", "adam_eps", "weight_decay", "grad_clip", "time_limit_s"):
        setattr(config.train, name, shared.train[name])  # Adam's defaults; no clipping, no limit
    # Capped by LitEma's ramp (1 + n) / (10 + n) until step ~9000: 0.994 at step 1500.
    config.train.ema_decay = 0.999
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.sample_every = 500  # reconstruction grid and PSNR; 0 = only at the end

    # PSNR of the EMA's reconstructions (the posterior mean decoded) on held-out images.
    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.num_examples = 1000
    config.eval.batch_size = 250
    config.eval.grid_images = 32  # 2 k^2: 4 rows of originals over 4 rows of reconstructions

    # The export's scaling_factor: 1 / std of the posterior means of these training images.
    config.export = ml_collections.ConfigDict()
    config.export.num_images = 2048

    if "runlocal" in options:
        config.vae.block_out_channels = (8, 16)
        config.vae.norm_num_groups = 4
        config.train.batch_size = 8
        config.train.total_steps = 10
        config.train.warmup_steps = 2
        config.train.log_every = 5
        config.train.checkpoint_every = 5
        config.train.sample_every = 10
        config.eval.num_examples = 64
        config.eval.batch_size = 64
        config.eval.grid_images = 8
        config.export.num_images = 64
    return config

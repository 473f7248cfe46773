"""The latent demo: class-conditional Fashion-MNIST in the latents of our own small VAE
(32x32x1 pixels -> 8x8x4 latents, ml_collections_configs/vae_fashion_mnist.py), with Patch
Diffusion's latent recipe (8x8 and 4x4 crops), on a CPU in minutes, judged in pixels (fd_fmnist of
the decoded samples). Three steps: train the VAE, encode the dataset once, train on the latents.

    python -m patchdiff.vae --config ml_collections_configs/vae_fashion_mnist.py --workdir runs/vae_fmnist
    python -m patchdiff.data.encode --config ml_collections_configs/latent_fashion_mnist.py --vae runs/vae_fmnist/vae --out runs/fmnist_latents
    python -m patchdiff.data.encode --config ml_collections_configs/latent_fashion_mnist.py --vae runs/vae_fmnist/vae --out runs/fmnist_latents --split test
    python -m patchdiff.main --config ml_collections_configs/latent_fashion_mnist.py --workdir runs/fmnist_latent
    python -m patchdiff.main --config ml_collections_configs/latent_fashion_mnist.py --workdir runs/fmnist_latent --mode sample

The test split's latents serve `--mode eval`'s denoising error only. `:runlocal` makes the last
two a seconds-long smoke run (the latents must exist).
"""

from ml_collections_configs import base, fashion_mnist


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = fashion_mnist.get_config()
    config.data.source = "latents"
    config.data.name = "fashion_mnist_latents"
    config.data.path = "runs/fmnist_latents"  # `patchdiff.data.encode --out`
    config.data.resolution = 8
    config.data.channels = 4
    # The pixels that encode reads: the pixel demo's own data.
    config.latent.data.source = "fashion_mnist"
    config.latent.data.name = "fashion_mnist"
    config.latent.data.resolution = 32
    config.latent.data.channels = 1
    config.latent.data.fit = "pad"

    # 8x8 latents need no patchify stem; two levels (8, 4) with attention at both. 32 channels and
    # one block a level: 0.13 s a step here, where 64 x 2 took 0.54 s and, for equal training
    # time, scored fd_fmnist@5k 217 against this size's 161 (BENCHMARKS.md).
    config.model.patch_size = 1
    config.model.channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8, 4)
    config.model.head_dim = 32
    # The VAE scales its latents to unit variance (1 / std, LDM's rule), so the data's std is 1.
    config.diffusion.sigma_data = 1.0
    # Patch Diffusion on latents (Wang et al., `train_on_latents`): R with p = 0.5, else R/2.
    config.diffusion.patch_scales = (1.0, 0.5)
    config.diffusion.patch_probs = (0.5, 0.5)

    if "runlocal" in options:
        config.model.channels = 16
        config.model.head_dim = 16
        base.shrink_schedule(config)
        config.eval.num_samples = 100
        config.eval.steps = 6
    return config

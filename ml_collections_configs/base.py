"""Shared defaults: CIFAR-10-sized DDPM++ U-Net (EDM's CIFAR-10 setup) with EDM preconditioning
and Patch Diffusion's patch-size recipe.

    python -m patchdiff.main --config ml_collections_configs/base.py
    python -m patchdiff.main --config ml_collections_configs/base.py:runlocal

Options (comma-separated after the colon): `runlocal` shrinks the network for a laptop CPU.
Variants import this module and override a few fields (STYLE.md, item 2).
"""

import ml_collections

OPTIONS = ("runlocal",)


def parse_arg(arg: str | None) -> set[str]:
    """'runlocal,foo' -> {'runlocal', 'foo'}; unknown options stop with the list of known ones."""
    options = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = options - set(OPTIONS)
    if unknown:
        raise ValueError(
            f"config option(s) {sorted(unknown)} are not known; known: {', '.join(OPTIONS)}."
        )
    return options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"
    config.data.resolution = 32
    config.data.channels = 3

    # DDPM++ at CIFAR-10 size (EDM, Table 7 / `--arch=ddpmpp`): 128 channels, mult (2, 2, 2),
    # 4 blocks per level, attention at 16x16, dropout 0.13.
    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.channels = 128
    config.model.channel_mult = (2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.attn_resolutions = (16,)  # feature-map sizes (at full size) that get attention
    config.model.head_dim = 64
    config.model.dropout = 0.13
    config.model.patch_size = 1  # the patchify stem's P (Luhman & Luhman): 1, 2, 4 or 8
    config.model.num_classes = 0  # 0: unconditional; N: labels 0..N-1 plus a null label N
    config.model.use_coords = True  # two pixel-coordinate input channels (Patch Diffusion)
    config.model.noise_embedding = "positional"  # or "fourier"
    config.model.max_groups = 32  # GroupNorm groups: min(max_groups, channels // 4)
    config.model.attention_impl = "auto"  # kernels.attention: auto, xla, cudnn
    config.model.dtype = "float32"  # compute dtype: float32, bfloat16, float16

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.parameterisation = "edm"  # edm, vp, ve, v, flow
    config.diffusion.sigma_data = 0.5  # std of [-1, 1] images (EDM)
    config.diffusion.sigma_min = 0.002  # sampling range, and log_uniform's bounds (EDM: 0.002, 80)
    config.diffusion.sigma_max = 80.0
    config.diffusion.noise_distribution = "default"  # the parameterisation's own, or a name
    config.diffusion.p_mean = -1.2  # lognormal (EDM)
    config.diffusion.p_std = 1.2
    config.diffusion.logit_mean = 0.0  # logit_normal (v, flow)
    config.diffusion.logit_std = 1.0
    config.diffusion.vp_schedule = "linear"  # vp: linear or cosine betas
    config.diffusion.vp_timesteps = 1000
    config.diffusion.loss_weighting = "default"  # 1 / c_out^2, or a name in weighting.py
    config.diffusion.p2_k = 1.0
    config.diffusion.p2_gamma = 1.0
    config.diffusion.min_snr_gamma = 5.0
    # Patch Diffusion's recipe: full size half the time, else R/2 (0.3) or R/4 (0.2).
    config.diffusion.patch_scales = (1.0, 0.5, 0.25)
    config.diffusion.patch_probs = (0.5, 0.3, 0.2)

    if "runlocal" in options:
        config.model.channels = 32
        config.model.channel_mult = (1, 2)
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = (16,)
        config.model.head_dim = 32
    return config

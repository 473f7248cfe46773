"""ImageNet 256x256, class-conditional rectified flow in Stable Diffusion's VAE latents (32x32x4):
DiT-XL/2 blocks (28 x 1152, 16 heads, 2x2 patches: 256 tokens), x_t = (1 - t) x0 + t n with F
predicting n - x0 (`flow`), t drawn logit-normal (0, 1) (Esser et al. 2024), label dropout 0.1 to
a null class for classifier-free guidance, and SiT's optimisation (Ma et al. 2024: AdamW at a
constant 1e-4 without decay, batch 256, EMA 0.9999). Samples: Heun, 50 steps, guidance 1.5.

    python -m patchdiff.data.encode --config ml_collections_configs/flow_dit_imagenet256.py --vae /weights/sd-vae-ft-ema --out /data/in256_latents
    python -m patchdiff.main --config ml_collections_configs/flow_dit_imagenet256.py --workdir runs/in256_flow --config.data.path=/data/in256_latents
    python -m patchdiff.main --config ml_collections_configs/flow_dit_imagenet256.py:rope --workdir runs/in256_flow_rope --config.data.path=/data/in256_latents
    python -m patchdiff.main --config ml_collections_configs/flow_dit_imagenet256.py:runlocal --workdir /tmp/in256_flow --config.data.path=/data/in256_latents

Options: `rope` (axial RoPE on each head instead of DiT's absolute sin-cos table), `runlocal`.
`sample.sampler = "euler"` is the plain flow ODE. Guidance is the standard
D = D_uncond + w (D_cond - D_uncond) on every latent channel (some implementations guide only
the first three of four, DiT's issue #41), and the null class is an extra embedding row.
"""

from ml_collections_configs import base, dit_xl2_imagenet256


def get_config(arg=None):
    options = base.parse_arg(arg, extra=("rope",))
    # DiT-XL/2 on the same latents with DiT's (SiT's) optimisation: batch 256, AdamW at a
    # constant 1e-4 without decay, EMA 0.9999, label dropout 0.1, flips.
    config = dit_xl2_imagenet256.get_config("runlocal" if "runlocal" in options else None)
    config.model.dit.pos_embed = "rope" if "rope" in options else "sincos"
    config.model.dtype = "float32" if "runlocal" in options else "bfloat16"
    config.diffusion.parameterisation = "flow"
    config.diffusion.noise_distribution = "logit_normal"
    config.diffusion.logit_mean, config.diffusion.logit_std = 0.0, 1.0
    if "runlocal" not in options:
        config.train.total_steps = 400_000
        config.sample.steps = config.eval.steps = 50
    config.sample.sampler = config.eval.sampler = "heun"
    config.sample.guidance_scale = config.eval.guidance_scale = 1.5
    return config

"""Samplers for any denoiser D(x, sigma) in the VE convention, as jitted JAX programs.

Names, options and numbers follow k-diffusion's `sampling.py` (plus DDIM, DDPM, and
v-diffusion's PRK/PLMS). Every sampler is `sample_NAME(denoiser, x, sigmas, *, key=None,
noise=None, callback=None, **options) -> x0`; `sample(name, ...)` looks one up by name.

    sigmas = get_sigmas_karras(18, 0.002, 80.0)
    x = 80.0 * jax.random.normal(key, (16, 32, 32, 3))
    images = jax.jit(lambda x, s: sample_heun(denoiser, x, s))(x, sigmas)
"""

from patchdiff.sampling.classic import sample_ddim, sample_ddpm, sample_plms, sample_prk
from patchdiff.sampling.core import (
    SAMPLERS,
    ancestral_step,
    noise_from_key,
    sample,
    to_d,
)
from patchdiff.sampling.dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from patchdiff.sampling.dpmpp import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from patchdiff.sampling.grids import (
    append_zero,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_polyexponential,
    get_sigmas_respaced,
    get_sigmas_vp,
    space_timesteps,
)
from patchdiff.sampling.guidance import classifier_free_guidance, snr_split_denoiser
from patchdiff.sampling.k_samplers import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from patchdiff.sampling.likelihood import log_likelihood

__all__ = [
    "SAMPLERS",
    "ancestral_step",
    "append_zero",
    "classifier_free_guidance",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_polyexponential",
    "get_sigmas_respaced",
    "get_sigmas_vp",
    "log_likelihood",
    "noise_from_key",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms",
    "sample_prk",
    "snr_split_denoiser",
    "space_timesteps",
    "to_d",
]

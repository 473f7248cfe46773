"""Builders: the one place where `config.diffusion` is unpacked into the pure functions.

`build_precond`, `build_noise_distribution` and `build_weighting` take `config.diffusion` (dcfg);
`build_patch_schedule` takes the whole config, since crop sizes depend on
`config.data.resolution`. They return the objects and closures that the loss and samplers take
as arguments.
"""

import functools

from patchdiff.diffusion import noise, weighting
from patchdiff.diffusion.patches import PatchSchedule, patch_schedule
from patchdiff.diffusion.precond import PRECONDITIONINGS, VP


def build_precond(dcfg):
    """The parameterisation named by `config.diffusion.parameterisation`."""
    cls = PRECONDITIONINGS.get(dcfg.parameterisation, "config.diffusion.parameterisation")
    if cls is VP:
        return VP(schedule=dcfg.vp_schedule, num_timesteps=dcfg.vp_timesteps)
    if "sigma_data" in getattr(cls, "__dataclass_fields__", {}):
        return cls(sigma_data=dcfg.sigma_data)
    return cls()


def noise_distribution_name(dcfg, precond) -> str:
    name = dcfg.noise_distribution
    return precond.default_noise_distribution if name == "default" else name


def build_noise_distribution(dcfg, precond, resolution=None):
    """key, shape -> sigma: the training noise levels of `config.diffusion.noise_distribution`
    ("default" picks the parameterisation's own: lognormal for edm, log_uniform for ve,
    vp_uniform for vp, logit_normal for v and flow). `resolution` (config.data.resolution) is
    the image size that cosine_interpolated shifts its schedule for."""
    name = noise_distribution_name(dcfg, precond)
    fn = noise.NOISE_DISTRIBUTIONS.get(name, "config.diffusion.noise_distribution")
    if name == "lognormal":
        kwargs = dict(p_mean=dcfg.p_mean, p_std=dcfg.p_std)
    elif name == "log_uniform":
        kwargs = dict(sigma_min=dcfg.sigma_min, sigma_max=dcfg.sigma_max)
    elif name == "vp_uniform":
        if not isinstance(precond, VP):
            raise ValueError(
                "config.diffusion.noise_distribution = 'vp_uniform' needs the discrete levels of "
                f"parameterisation 'vp', not {dcfg.parameterisation!r}."
            )
        kwargs = dict(sigmas=precond.sigmas)
    elif name == "cosine_interpolated":
        if resolution is None:
            raise ValueError(
                "config.diffusion.noise_distribution = 'cosine_interpolated' shifts its schedule "
                "for the image size: pass resolution=config.data.resolution to the builder."
            )
        kwargs = dict(
            image_d=resolution,
            noise_d_low=dcfg.cosine_noise_d_low,
            sigma_data=dcfg.sigma_data,
            sigma_min=min(dcfg.sigma_min, 1e-3),
            sigma_max=max(dcfg.sigma_max, 1e3),
        )
    else:  # logit_normal
        if not hasattr(precond, "sigma_from_t"):
            raise ValueError(
                "config.diffusion.noise_distribution = 'logit_normal' draws a time t in (0, 1) and "
                f"needs a parameterisation with a time axis ('v' or 'flow'), not "
                f"{dcfg.parameterisation!r}."
            )
        kwargs = dict(sigma_from_t=precond.sigma_from_t, mean=dcfg.logit_mean, std=dcfg.logit_std)
    return functools.partial(fn, **kwargs)


def build_weighting(dcfg, precond):
    """sigma -> lambda for `config.diffusion.loss_weighting`; "default" is 1 / c_out^2, the loss
    that each parameterisation's F was designed for (EDM's lambda for edm, eps-MSE for vp and ve,
    v-MSE for v, velocity MSE for flow)."""
    name = dcfg.loss_weighting
    if name == "default":
        return lambda sigma: 1.0 / precond.scalings(sigma)[1] ** 2
    fn = weighting.WEIGHTINGS.get(name, "config.diffusion.loss_weighting")
    kwargs = {
        "edm": dict(sigma_data=dcfg.sigma_data),
        "soft_min_snr": dict(sigma_data=dcfg.sigma_data),
        "p2": dict(k=dcfg.p2_k, gamma=dcfg.p2_gamma),
        "min_snr": dict(gamma=dcfg.min_snr_gamma),
    }.get(name, {})
    return functools.partial(fn, **kwargs)


def build_loss_kwargs(dcfg, resolution=None) -> dict:
    """The keyword arguments of `losses.denoising_loss` that `config.diffusion` decides:
    {"precond", "sample_sigma", "weighting"}; `resolution` as for build_noise_distribution."""
    precond = build_precond(dcfg)
    return {
        "precond": precond,
        "sample_sigma": build_noise_distribution(dcfg, precond, resolution),
        "weighting": build_weighting(dcfg, precond),
    }


def build_patch_schedule(config) -> PatchSchedule:
    """Patch sizes R * s for `config.diffusion.patch_scales` with `patch_probs`."""
    dcfg = config.diffusion
    return patch_schedule(config.data.resolution, dcfg.patch_scales, dcfg.patch_probs)

"""Config validation: every bad value stops with one sentence naming the field and what is allowed.

`validate(config)` runs when a config is read (main, build helpers, benchmarks). The checks live
here rather than in `ml_collections_configs/base.py` because they consult the registries of
parameterisations, weightings and models, and configs import nothing of ours but `base`.
"""

import importlib.util
import math
import pathlib

import kernels
from patchdiff.diffusion import augment
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.noise import NOISE_DISTRIBUTIONS
from patchdiff.diffusion.precond import PRECONDITIONINGS
from patchdiff.diffusion.weighting import WEIGHTINGS
from patchdiff.models import ARCHS, DTYPES, MODELS, PLACEHOLDER_CONVS
from patchdiff.models.unet import level_resolutions

PATCH_SIZES = (1, 2, 4, 8)
NOISE_EMBEDDINGS = ("fourier", "positional")
VP_SCHEDULES = ("cosine", "linear")
REDUCTIONS = ("allreduce", "fixed_order")
# config.multihost.cluster: jax's cluster detection methods, "auto" (the first one present) and
# "manual" (none: coordinator, num_processes and process_id from the config).
CLUSTERS = ("auto", "manual", "slurm", "ompi", "mpi4py", "tpu", "gcetpu", "gketpu")


class ConfigError(ValueError):
    """A config field holds a value that is not allowed."""


def _check(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_of(field: str, value, names):
    _check(value in names, field, value, f"it must be one of {', '.join(map(str, names))}")


def validate(config):
    """Raises ConfigError on the first bad field of `config`; returns the config otherwise."""
    _validate_data(config.data)
    _validate_latent(config)
    _validate_model(config)
    augment.validate(config)
    _validate_diffusion(config)
    _validate_train(config)
    _validate_multihost(config)
    _validate_sample(config.sample)
    _validate_eval(config)
    return config


def load_file(spec: str):
    """The config of 'path.py[:options]', as `--config` reads it (for the commands that are not
    absl apps, such as `python -m patchdiff.metrics.ref`)."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"--config {path!r} is not a file.")
    module_spec = importlib.util.spec_from_file_location("patchdiff_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _validate_data(data):
    from patchdiff.data.pipeline import FITS
    from patchdiff.data.sources import SOURCES

    _one_of("data.source", data.source, SOURCES.names())
    _one_of("data.fit", data.fit, FITS)
    if data.source in ("npz", "folder", "idx"):
        _check(
            bool(data.path),
            "data.path",
            data.path,
            f"data.source = {data.source!r} reads from a path; set one",
        )
    _check(
        _is_int(data.resolution) and data.resolution > 0,
        "data.resolution",
        data.resolution,
        "it must be a positive integer",
    )
    _check(
        _is_int(data.channels) and data.channels > 0,
        "data.channels",
        data.channels,
        "it must be a positive integer",
    )


def _validate_latent(config):
    """Latent diffusion's fields: the latents' folder, the VAE override, the scale, and the
    pixel dataset `patchdiff.data.encode` reads."""
    latent, data = config.latent, config.data
    _check(
        isinstance(latent.vae, str),
        "latent.vae",
        latent.vae,
        'it must be a path (a diffusers folder or a single .safetensors file) or ""',
    )
    _check(
        isinstance(latent.scaling_factor, (int, float))
        and not isinstance(latent.scaling_factor, bool)
        and latent.scaling_factor >= 0,
        "latent.scaling_factor",
        latent.scaling_factor,
        "it must be 0 (the VAE's own) or a positive number",
    )
    if data.source != "latents":
        for field, unset in (("vae", ""), ("scaling_factor", 0.0)):
            _check(
                latent[field] == unset,
                f"latent.{field}",
                latent[field],
                'it only applies to latent diffusion: set config.data.source = "latents"',
            )
        return
    _check(
        bool(data.path),
        "data.path",
        data.path,
        'data.source = "latents" reads the folder that `python -m patchdiff.data.encode --out` '
        "wrote; set it",
    )
    _check(
        config.augment.p == 0,
        "augment.p",
        config.augment.p,
        "EDM's augmentations transform pixels, not VAE latents: it must be 0 with "
        'data.source = "latents"',
    )
    from patchdiff.data.sources import SOURCES

    pixels = latent.data
    _one_of("latent.data.source", pixels.source, [n for n in SOURCES.names() if n != "latents"])
    for field in ("resolution", "channels"):
        _positive_int(f"latent.data.{field}", pixels[field])


def _validate_model(config):
    """The fields every network reads, then the named network's own (`_MODEL_CHECKS`)."""
    m, resolution = config.model, config.data.resolution
    _one_of("model.name", m.name, MODELS.names())
    _one_of("model.patch_size", m.patch_size, PATCH_SIZES)
    _check(
        resolution % m.patch_size == 0,
        "model.patch_size",
        m.patch_size,
        f"it must divide config.data.resolution = {resolution}",
    )
    _check(
        _is_int(m.num_classes) and m.num_classes >= 0,
        "model.num_classes",
        m.num_classes,
        "it must be 0 (unconditional) or the number of classes",
    )
    _one_of("model.attention_impl", m.attention_impl, ["auto", *sorted(kernels.IMPLEMENTATIONS)])
    _one_of("model.dtype", m.dtype, list(DTYPES))
    for field in ("remat", "scan", "use_coords"):
        value = m.get(field, False)
        _check(isinstance(value, bool), f"model.{field}", value, "it must be True or False")
    augment_dim = m.get("augment_dim", 0)
    _check(
        _is_int(augment_dim) and augment_dim >= 0,
        "model.augment_dim",
        augment_dim,
        "it must be 0 (no augmentation labels) or the label width of config.augment",
    )
    _MODEL_CHECKS.get(m.name, lambda c: None)(config)


def _validate_unet(config):
    m, resolution = config.model, config.data.resolution
    _check(
        _is_int(m.channels) and m.channels > 0 and m.channels % 2 == 0,
        "model.channels",
        m.channels,
        "it must be a positive even integer",
    )
    mult = tuple(m.channel_mult)
    _check(
        len(mult) > 0 and all(_is_int(c) and c > 0 for c in mult),
        "model.channel_mult",
        m.channel_mult,
        "it must be a non-empty tuple of positive integers",
    )
    _check(
        _is_int(m.num_res_blocks) and m.num_res_blocks > 0,
        "model.num_res_blocks",
        m.num_res_blocks,
        "it must be a positive integer",
    )
    factor = m.patch_size * 2 ** (len(mult) - 1)
    _check(
        resolution % factor == 0,
        "data.resolution",
        resolution,
        f"a U-Net with patch size {m.patch_size} and {len(mult)} levels needs a multiple of "
        f"{factor}",
    )
    levels = level_resolutions(resolution, m.patch_size, len(mult))
    for res in m.attn_resolutions:
        _check(
            res in levels,
            "model.attn_resolutions",
            tuple(m.attn_resolutions),
            f"{res} is not a feature-map size of this U-Net, whose levels run at "
            f"{', '.join(map(str, levels))} (resolution {resolution} / patch size "
            f"{m.patch_size}, halved per level)",
        )
    _one_of("model.arch", m.arch, ARCHS)
    _check(
        _is_int(m.head_dim) and m.head_dim >= 0,
        "model.head_dim",
        m.head_dim,
        "it must be 0 (one head over all channels) or a positive integer",
    )
    attended = [mult[levels.index(r)] for r in m.attn_resolutions] + [mult[-1]]  # middle too
    for width in (m.channels * k for k in attended):
        _check(
            m.head_dim == 0 or width % m.head_dim == 0,
            "model.head_dim",
            m.head_dim,
            f"it must divide the width {width} of every attention layer",
        )
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "it must lie in [0, 1)")
    _one_of("model.noise_embedding", m.noise_embedding, NOISE_EMBEDDINGS)
    _check(
        _is_int(m.max_groups) and m.max_groups > 0,
        "model.max_groups",
        m.max_groups,
        "it must be a positive integer",
    )
    placeholders = m.get("placeholders", ())
    _check(
        isinstance(placeholders, (tuple, list))
        and set(placeholders) <= set(PLACEHOLDER_CONVS)
        and len(set(placeholders)) == len(placeholders),
        "model.placeholders",
        placeholders,
        f"it must be a tuple of distinct names among {', '.join(PLACEHOLDER_CONVS)}",
    )


def _positive_ints(field: str, values, length: int | None = None):
    ok = isinstance(values, (tuple, list)) and len(values) > 0
    ok = ok and all(_is_int(v) and v > 0 for v in values)
    _check(ok, field, values, "it must be a non-empty tuple of positive integers")
    if length is not None:
        _check(len(values) == length, field, values, f"it needs one entry per level ({length})")


def _validate_dit(config):
    d, resolution = config.model.dit, config.data.resolution
    _positive_int("model.dit.depth", d.depth)
    _positive_int("model.dit.heads", d.heads)
    _check(
        _is_int(d.width) and d.width > 0 and d.width % d.heads == 0,
        "model.dit.width",
        d.width,
        f"it must be a positive multiple of config.model.dit.heads = {d.heads}",
    )
    _check(d.mlp_ratio > 0, "model.dit.mlp_ratio", d.mlp_ratio, "it must be positive")
    _one_of("model.dit.pos_embed", d.pos_embed, ("sincos", "rope"))
    # sincos: a quarter of the width per axis and per sin/cos; rope: a quarter of each head.
    # sincos: a quarter of the width per axis and per sin/cos; rope: a quarter of each head per
    # axis, rotated in pairs (patchdiff/models/rope.py).
    unit, what = (
        (4, "a width divisible by 4")
        if d.pos_embed == "sincos"
        else (8 * d.heads, "a head dim divisible by 8")
    )
    _check(
        d.width % unit == 0,
        "model.dit.width",
        d.width,
        f"pos_embed = {d.pos_embed!r} needs {what}",
    )
    _check(
        resolution % config.model.patch_size == 0,
        "data.resolution",
        resolution,
        f"it must be a multiple of the patch size {config.model.patch_size}",
    )


def _validate_hdit(config):
    from kernels.neighborhood import IMPLEMENTATIONS as NEIGHBORHOOD_IMPLS
    from patchdiff.models.hdit import hdit_problems

    h = config.model.hdit
    _positive_ints("model.hdit.widths", h.widths)
    _positive_ints("model.hdit.depths", h.depths, len(h.widths))
    if problems := hdit_problems(config):  # levels, head dim, resolution, window: the builder's
        raise ConfigError(problems[0])
    _one_of("model.hdit.neighborhood_impl", h.neighborhood_impl, ["auto", *NEIGHBORHOOD_IMPLS])
    _check(h.ff_mult > 0, "model.hdit.ff_mult", h.ff_mult, "it must be positive")
    _positive_int("model.hdit.mapping_width", h.mapping_width)
    _positive_int("model.hdit.mapping_depth", h.mapping_depth)
    _check(0 <= h.dropout < 1, "model.hdit.dropout", h.dropout, "it must lie in [0, 1)")


_MODEL_CHECKS = {"unet": _validate_unet, "dit": _validate_dit, "hdit": _validate_hdit}


def _validate_diffusion(config):
    d = config.diffusion
    _one_of("diffusion.parameterisation", d.parameterisation, PRECONDITIONINGS.names())
    _check(d.sigma_data > 0, "diffusion.sigma_data", d.sigma_data, "it must be positive")
    _check(d.sigma_min > 0, "diffusion.sigma_min", d.sigma_min, "it must be positive")
    _check(
        d.sigma_max > d.sigma_min,
        "diffusion.sigma_max",
        d.sigma_max,
        f"it must exceed config.diffusion.sigma_min = {d.sigma_min}",
    )
    _check(d.p_std > 0, "diffusion.p_std", d.p_std, "it must be positive")
    _check(d.logit_std > 0, "diffusion.logit_std", d.logit_std, "it must be positive")
    _one_of("diffusion.vp_schedule", d.vp_schedule, VP_SCHEDULES)
    _check(
        _is_int(d.vp_timesteps) and d.vp_timesteps >= 2,
        "diffusion.vp_timesteps",
        d.vp_timesteps,
        "it must be an integer of at least 2",
    )
    _check(
        d.vp_schedule != "linear" or d.vp_timesteps > 20,
        "diffusion.vp_timesteps",
        d.vp_timesteps,
        "the linear schedule scales betas by 1000 / T and needs T > 20",
    )
    _one_of(
        "diffusion.noise_distribution",
        d.noise_distribution,
        ["default", *NOISE_DISTRIBUTIONS.names()],
    )
    _one_of("diffusion.loss_weighting", d.loss_weighting, ["default", *WEIGHTINGS.names()])
    _check(d.p2_k > 0, "diffusion.p2_k", d.p2_k, "it must be positive")
    _check(d.min_snr_gamma > 0, "diffusion.min_snr_gamma", d.min_snr_gamma, "it must be positive")
    precond = diffusion_build.build_precond(d)
    try:  # the builder refuses pairings such as vp_uniform with edm, in one sentence
        diffusion_build.build_noise_distribution(d, precond, config.data.resolution)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_patches(config)


def _validate_patches(config):
    d, m = config.diffusion, config.model
    scales, probs = tuple(d.patch_scales), tuple(d.patch_probs)
    _check(
        len(scales) > 0 and len(scales) == len(probs),
        "diffusion.patch_probs",
        probs,
        f"it must give one probability per patch scale {scales}",
    )
    _check(
        all(p >= 0 for p in probs) and math.isclose(sum(probs), 1.0, abs_tol=1e-6),
        "diffusion.patch_probs",
        probs,
        "they must be non-negative and sum to 1",
    )
    levels = {"unet": len(m.channel_mult), "hdit": len(m.hdit.widths)}.get(m.name, 1)
    factor = m.patch_size * 2 ** (levels - 1)
    for s in scales:
        size = config.data.resolution * s
        _check(
            0 < s <= 1 and float(size).is_integer() and size % factor == 0,
            "diffusion.patch_scales",
            scales,
            f"scale {s} gives crops of {size:g} pixels, but scales must lie in (0, 1] and "
            f"give crops that are multiples of {factor} (patch size {m.patch_size}, "
            f"{levels} levels)",
        )
    # A transformer knows where a crop lies only from its coordinates (its positions); without
    # them every crop would be embedded as a whole image of its size.
    _check(
        m.name == "unet" or m.use_coords or set(scales) == {1.0},
        "model.use_coords",
        m.use_coords,
        f"a {m.name} trained on crops (diffusion.patch_scales = {scales}) takes its positions "
        "from the crops' coordinates: set it to True",
    )


def with_patch_size(config, patch_size: int):
    """A copy of `config` with the stem's patch size P, attention kept at the same U-Net levels.

    Attention resolutions are feature-map sizes, which shrink with P: a layer at 16 for P=1 runs
    at 8 for P=2. This keeps the network the same apart from the stem, for cost comparisons.
    """
    new = config.copy_and_resolve_references()
    old = config.model.patch_size
    new.model.patch_size = patch_size
    new.model.attn_resolutions = tuple(r * old // patch_size for r in config.model.attn_resolutions)
    return new


def _positive_int(field, value):
    _check(_is_int(value) and value > 0, field, value, "it must be a positive integer")


def _zero_or_count(field, value, allowed: str):
    """An integer >= 0 where 0 means off or all; `allowed` says which, in the error."""
    _check(_is_int(value) and value >= 0, field, value, allowed)


def _validate_train(config):
    from patchdiff.train.optim import LR_SCHEDULES

    t = config.train
    _positive_int("train.batch_size", t.batch_size)
    _check(
        _is_int(t.total_steps) and t.total_steps >= 0,
        "train.total_steps",
        t.total_steps,
        "it must be a non-negative integer",
    )
    _check(t.lr > 0, "train.lr", t.lr, "it must be positive")
    _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _positive_int("train.grad_accum", t.grad_accum)
    _check(
        t.batch_size % t.grad_accum == 0,
        "train.grad_accum",
        t.grad_accum,
        f"it must divide config.train.batch_size = {t.batch_size}",
    )
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "it must be 0 (off) or positive")
    decay = t.get("weight_decay", 0.0)
    _check(decay >= 0, "train.weight_decay", decay, "it must be 0 (Adam) or positive (AdamW)")
    for name, mult in dict(t.get("lr_mult", {})).items():
        _check(
            isinstance(mult, (int, float)) and not isinstance(mult, bool) and mult > 0,
            f"train.lr_mult.{name}",
            mult,
            "it must be a positive number (a top-level module's learning-rate multiplier)",
        )
    _check(
        isinstance(t.grad_noise_scale, bool),
        "train.grad_noise_scale",
        t.grad_noise_scale,
        "it must be True or False",
    )
    if t.grad_noise_scale and t.grad_accum == 1:
        _check(
            t.batch_size % 2 == 0,
            "train.batch_size",
            t.batch_size,
            "it must be even while config.train.grad_noise_scale is on (the noise scale compares "
            "the gradients of two half batches); set grad_noise_scale = False for an odd batch",
        )
    _check(
        t.time_limit_s >= 0,
        "train.time_limit_s",
        t.time_limit_s,
        "it must be 0 (no limit) or a positive number of training seconds",
    )
    _check(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "it must lie in [0, 1)")
    _check(
        t.ema_halflife_img > 0, "train.ema_halflife_img", t.ema_halflife_img, "it must be positive"
    )
    _check(
        0 <= t.label_dropout < 1, "train.label_dropout", t.label_dropout, "it must lie in [0, 1)"
    )
    _positive_int("train.log_every", t.log_every)
    for name in ("checkpoint_every", "sample_every"):
        _zero_or_count(
            f"train.{name}", t[name], "it must be 0 (never) or a positive number of steps"
        )
    _positive_int("train.keep_checkpoints", t.keep_checkpoints)
    _positive_int("mesh.model", config.mesh.model)
    _one_of("mesh.reduction", config.mesh.reduction, REDUCTIONS)
    if config.mesh.reduction == "fixed_order":
        _check(
            config.mesh.model == 1,
            "mesh.reduction",
            config.mesh.reduction,
            f"it needs config.mesh.model = 1 (it is {config.mesh.model}): the fixed-order sum "
            "runs over the data axis of a data-parallel mesh",
        )


def _validate_multihost(config):
    h = config.multihost
    _check(
        isinstance(config.distributed, bool),
        "distributed",
        config.distributed,
        "it must be True or False",
    )
    _one_of("multihost.cluster", h.cluster, CLUSTERS)
    if h.coordinator:
        host, _, port = str(h.coordinator).rpartition(":")
        _check(
            bool(host) and port.isdigit() and 0 < int(port) < 65536,
            "multihost.coordinator",
            h.coordinator,
            'it must be "host:port" (process 0\'s address and a free port), or "" to take it '
            "from the cluster",
        )
    _check(
        _is_int(h.num_processes) and h.num_processes >= 0,
        "multihost.num_processes",
        h.num_processes,
        "it must be 0 (from the cluster) or a positive number of processes",
    )
    _check(
        _is_int(h.process_id)
        and h.process_id >= -1
        and (h.num_processes == 0 or h.process_id < h.num_processes),
        "multihost.process_id",
        h.process_id,
        "it must be -1 (from the cluster) or lie in [0, config.multihost.num_processes)",
    )
    ids = tuple(h.local_device_ids)
    _check(
        all(_is_int(i) and i >= 0 for i in ids) and len(set(ids)) == len(ids),
        "multihost.local_device_ids",
        h.local_device_ids,
        "it must be () (all) or distinct non-negative device numbers",
    )
    _check(
        isinstance(h.timeout_s, int | float) and h.timeout_s > 0,
        "multihost.timeout_s",
        h.timeout_s,
        "it must be a positive number of seconds",
    )
    if h.cluster == "manual":
        for field, unset in (("coordinator", ""), ("num_processes", 0), ("process_id", -1)):
            _check(
                h[field] != unset,
                f"multihost.{field}",
                h[field],
                'config.multihost.cluster = "manual" needs coordinator, num_processes and '
                "process_id set",
            )
    if not config.distributed:
        for field, unset in (
            ("cluster", "auto"),
            ("coordinator", ""),
            ("num_processes", 0),
            ("process_id", -1),
        ):
            _check(
                h[field] == unset,
                f"multihost.{field}",
                h[field],
                "it only applies to several processes: add --config.distributed=True",
            )


def _validate_sample(s):
    from patchdiff.sampling import SAMPLERS

    _one_of("sample.sampler", s.sampler, SAMPLERS.names())
    _positive_int("sample.steps", s.steps)
    _positive_int("sample.num_images", s.num_images)
    _positive_int("sample.batch_size", s.batch_size)
    _check(s.churn >= 0, "sample.churn", s.churn, "it must be 0 or positive")
    _check(s.eta >= 0, "sample.eta", s.eta, "it must be 0 or positive")


def _validate_eval(config):
    from patchdiff.metrics import METRICS
    from patchdiff.sampling import SAMPLERS

    e = config.eval
    _positive_int("eval.num_examples", e.num_examples)
    _positive_int("eval.num_sigmas", e.num_sigmas)
    _zero_or_count(
        "eval.every_images",
        e.every_images,
        "it must be 0 (never) or a positive number of training images",
    )
    _check(
        _is_int(e.num_samples) and e.num_samples >= 2,
        "eval.num_samples",
        e.num_samples,
        "it must be an integer of at least 2",
    )
    metrics = tuple(e.metrics)
    _check(
        bool(metrics) and all(m in METRICS for m in metrics) and len(set(metrics)) == len(metrics),
        "eval.metrics",
        metrics,
        f"it must name one or more distinct metrics of {', '.join(METRICS.names())}",
    )
    _check(
        METRICS.get(metrics[0]).lower_is_better,
        "eval.metrics",
        metrics,
        "its first metric chooses the best checkpoint and must be one whose lower values are "
        "better (fid, kid or fd_fmnist)",
    )
    _one_of("eval.sampler", e.sampler, SAMPLERS.names())
    _positive_int("eval.steps", e.steps)
    _positive_int("eval.repeats", e.repeats)
    _zero_or_count(
        "eval.ref_num", e.ref_num, "it must be 0 (every image of the split) or a positive count"
    )
    _zero_or_count(
        "eval.ref_features",
        e.ref_features,
        "it must be 0 or a positive count of reference features kept for KID and PR",
    )
    if "fd_fmnist" in metrics:
        pixels = config.latent.data if config.data.source == "latents" else config.data
        _check(
            pixels.channels == 1,
            "eval.metrics",
            metrics,
            "fd_fmnist measures grey Fashion-MNIST-like images: it needs config.data.channels = 1",
        )

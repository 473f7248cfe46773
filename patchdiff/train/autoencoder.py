"""Training the KL autoencoder of latent diffusion (the first stage): `train_and_evaluate(config,
workdir)`, read top to bottom; `evaluate` and `export` for `--mode eval` and `--mode export`;
`validate(config)` for the VAE config's fields.

    python -m patchdiff.vae --config ml_collections_configs/vae_fashion_mnist.py \
        --workdir runs/vae_fmnist

The objective is LDM's (Rombach et al. 2022; `autoencoder_losses.py`): l1_weight |x - x̂| +
l2_weight (x - x̂)^2 + kl_weight KL(q(z|x) || N(0, I)), and, with config.loss.adv_weight > 0, a
PatchGAN discriminator trained with the hinge loss on its own Adam from loss.adv_start_step. LPIPS,
LDM's perceptual term, is not available: its VGG weights would have to be downloaded.

Sections of the loop: mesh, model and optimizers, state (fresh or restored), step (these three
in `autoencoder_step.py`), data, the loop with its reports, checkpoints, reconstruction grids and
PSNR (the posterior mean decoded and clipped, per image over the [0, 1] range and on uint8 images,
averaged), then shutdown and export. The machinery is the diffusion trainer's (`loop.py`): the
seeded resumable loader, orbax checkpoints with the loader's position, metrics.jsonl and
TensorBoard, SIGTERM/SIGINT -> save and leave, and train.time_limit_s. The export writes the EMA
weights as a diffusers folder (WORKDIR/vae/) whose scaling_factor makes the latents
unit-variance (LDM's rule for a new autoencoder).

Glossary: B batch, H/W height/width, C image channels, Cz latent channels.
"""

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from patchdiff import data as data_lib
from patchdiff import xla_cpu
from patchdiff.config import _check, _is_int, _one_of, _validate_data
from patchdiff.models.layers import DTYPES
from patchdiff.tables import format_table
from patchdiff.train import autoencoder_losses as losses
from patchdiff.train.autoencoder_step import (
    adversarial,
    build,
    build_module,
    fresh_state,
    make_mesh,
    make_train_step,
)
from patchdiff.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_with_shardings,
    check_fields,
)
from patchdiff.train.control import RunControl
from patchdiff.train.loop import TrainingStopped
from patchdiff.train.report import MetricsWriter, save_grid, to_uint8, write_json

# Fields whose change makes a checkpoint unusable: the parameter shapes (and GroupNorm's grouping,
# which changes what the parameters mean).
SHAPE_FIELDS = (
    "data.channels",
    "vae.block_out_channels",
    "vae.layers_per_block",
    "vae.latent_channels",
    "vae.norm_num_groups",
    "vae.mid_block_add_attention",
)
DISC_SHAPE_FIELDS = ("loss.disc_channels", "loss.disc_layers", "loss.disc_norm")


# ---------------------------------------------------------------------------------------------
# Config


# What a real-valued field may hold, and the sentence that says so.
REAL_RANGES = {
    "positive": (lambda v: v > 0, "it must be a positive number"),
    "nonnegative": (lambda v: v >= 0, "it must be a number >= 0"),
    "fraction": (lambda v: 0 <= v < 1, "it must lie in [0, 1)"),
}


def _value(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def _integers(config, minimum: int, *fields):
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    for field in fields:
        value = _value(config, field)
        _check(_is_int(value) and value >= minimum, field, value, f"it must be {what}")


def _reals(config, kind: str, *fields):
    test, allowed = REAL_RANGES[kind]
    for field in fields:
        value = _value(config, field)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        _check(number and math.isfinite(value) and test(value), field, value, allowed)


def validate(config):
    """Raises ConfigError on the first bad field of a VAE config; returns the config otherwise."""
    _validate_data(config.data)  # the diffusion trainer's checks of the same data block
    v, loss, resolution = config.vae, config.loss, config.data.resolution
    blocks = tuple(v.block_out_channels)
    _check(
        len(blocks) > 0 and all(_is_int(c) and c > 0 for c in blocks),
        "vae.block_out_channels",
        v.block_out_channels,
        "it must be a non-empty tuple of positive integers",
    )
    _integers(config, 0, "seed", "loss.adv_start_step", "train.total_steps",
              "train.warmup_steps", "train.checkpoint_every", "train.sample_every")  # fmt: skip
    _integers(config, 1, "data.prefetch", "vae.layers_per_block", "vae.latent_channels",
              "vae.norm_num_groups", "loss.disc_channels", "loss.disc_layers",
              "train.batch_size", "train.log_every", "train.keep_checkpoints",
              "eval.num_examples", "eval.batch_size")  # fmt: skip
    _integers(config, 2, "export.num_images")
    _reals(config, "positive", "train.lr", "train.adam_eps", "loss.disc_lr")
    _reals(config, "nonnegative", "loss.l1_weight", "loss.l2_weight", "loss.kl_weight",
           "loss.adv_weight", "train.grad_clip", "train.weight_decay",
           "train.time_limit_s")  # fmt: skip
    _reals(config, "fraction", "train.adam_b1", "train.adam_b2", "train.ema_decay")
    _check(
        all(c % v.norm_num_groups == 0 for c in blocks),
        "vae.norm_num_groups",
        v.norm_num_groups,
        f"it must divide every width of config.vae.block_out_channels = {blocks}",
    )
    _check(
        isinstance(v.mid_block_add_attention, bool),
        "vae.mid_block_add_attention",
        v.mid_block_add_attention,
        "it must be True or False",
    )
    _one_of("vae.dtype", v.dtype, list(DTYPES))
    factor = 2 ** (len(blocks) - 1)
    _check(
        resolution % factor == 0,
        "data.resolution",
        resolution,
        f"an autoencoder with {len(blocks)} levels downsamples by {factor}, which must divide it",
    )
    _check(
        loss.l1_weight + loss.l2_weight > 0,
        "loss.l1_weight",
        loss.l1_weight,
        "with config.loss.l2_weight = 0 too nothing asks for a reconstruction; make one "
        "of them positive",
    )
    _one_of("loss.disc_norm", loss.disc_norm, losses.DISC_NORMS)
    smallest = 3 * 2**loss.disc_layers  # the logits map is R / 2^layers - 2 wide
    _check(
        not adversarial(config) or resolution >= smallest,
        "loss.disc_layers",
        loss.disc_layers,
        f"the discriminator's logits map would be empty at config.data.resolution = "
        f"{resolution} (it needs {smallest})",
    )
    e = config.eval
    _check(
        isinstance(e.split, str) and bool(e.split),
        "eval.split",
        e.split,
        "it must name a split of config.data.source, such as 'test'",
    )
    k = math.isqrt(e.grid_images // 2) if _is_int(e.grid_images) and e.grid_images > 0 else 0
    _check(
        k > 0 and e.grid_images == 2 * k * k,
        "eval.grid_images",
        e.grid_images,
        "it must be 2 k^2 (8, 18, 32, 50, ...), so that the originals fill the top half of "
        "the square grid and their reconstructions the bottom half",
    )
    _check(
        e.grid_images <= e.num_examples,
        "eval.grid_images",
        e.grid_images,
        f"the grid shows some of the config.eval.num_examples = {e.num_examples} images",
    )
    return config


def check_compatible(saved: dict, config, where) -> None:
    """Refuses a checkpoint of another autoencoder shape, or one with(out) a discriminator when
    this config has none (or one): the train state would not have the same arrays."""
    had = (saved.get("loss", {}).get("adv_weight") or 0) > 0
    if had != adversarial(config):
        raise CheckpointError(
            f"the checkpoint in {where} was written with config.loss.adv_weight = "
            f"{saved['loss']['adv_weight']!r} ({'with' if had else 'without'} a discriminator), "
            f"but this config has {config.loss.adv_weight!r}: use another --workdir or keep the "
            "adversarial term " + ("on." if had else "off.")
        )
    check_fields(saved, config, where, SHAPE_FIELDS + (DISC_SHAPE_FIELDS if had else ()))


# ---------------------------------------------------------------------------------------------
# Reconstructions, PSNR and the latents' scale


def _host(array) -> np.ndarray:
    """A global array's values on every host (gathered when they span processes)."""
    if jax.process_count() > 1 and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def _local(tree):
    """This process's copy of a replicated pytree, for writing files."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _eval_batch(config, mesh) -> int:
    """config.eval.batch_size rounded up to a whole shard per device."""
    devices = mesh.devices.size
    return -(-config.eval.batch_size // devices) * devices


def _batches(config, split, count, batch, sharding):
    """Global batches [batch, H, W, C] of the first `count` images of `split` (position 0 of its
    seeded stream, unflipped: the same images every call), with the number of real images in
    each; the last batch is filled up from the stream and its extra rows are not counted."""
    loader = data_lib.build_loader(config, 0, split=split)
    loader.random_flip = False
    for start in range(0, count, batch):
        images = data_lib.to_global(loader.next(batch)["image"], sharding)
        yield images, min(batch, count - start)


class Reconstructions:
    """PSNR of a parameter set's reconstructions (the posterior mean decoded, clipped to [-1, 1])
    of config.eval.num_examples images of config.eval.split, averaged over images, and the first
    eval.grid_images of them over their reconstructions as a uint8 grid."""

    def __init__(self, config, module, mesh):
        self.config = config
        self.batch = _eval_batch(config, mesh)
        self.sharding = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())

        def measure(params, images, count):  # images [B, H, W, C], count [] real rows
            mean, _ = module.apply({"params": params}, images, method="encode_moments")
            recon = jnp.clip(module.apply({"params": params}, mean, method="decode"), -1, 1)
            valid = jnp.arange(images.shape[0]) < count
            per_image = losses.psnr_per_image(images, recon.astype(jnp.float32))
            return {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in per_image.items()}, recon

        self.measure = xla_cpu.jit(
            measure,
            in_shardings=(replicated, self.sharding, replicated),
            out_shardings=(replicated, self.sharding),
        )

    def __call__(self, params) -> tuple[dict, np.ndarray]:
        """({"psnr", "psnr_uint8", "examples"}, grid images uint8 [2 n, H, W, C])."""
        e = self.config.eval
        totals, originals, recons = {}, [], []
        for images, count in _batches(
            self.config, e.split, e.num_examples, self.batch, self.sharding
        ):
            sums, recon = self.measure(params, images, jnp.int32(count))
            for name, value in jax.device_get(sums).items():
                totals[name] = totals.get(name, 0.0) + float(value)
            if sum(len(o) for o in originals) < e.grid_images:
                originals.append(_host(images)[:count])
                recons.append(_host(recon)[:count])
        result = {name: value / e.num_examples for name, value in totals.items()}
        shown = [np.concatenate(a)[: e.grid_images] for a in (originals, recons)]
        grid = to_uint8(np.concatenate(shown))  # originals on top, then reconstructions
        return {**result, "examples": e.num_examples}, grid


def latent_std(config, module, params, mesh) -> float:
    """The std of the posterior means over config.export.num_images training images, all
    latent dimensions pooled (LDM's `scale_by_std` takes 1 / std of one batch's latents)."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def moments(params, images, count):  # -> sums of z and z^2 over the real rows
        mean, _ = module.apply({"params": params}, images, method="encode_moments")  # [B, h, w, Cz]
        mean = mean.astype(jnp.float32)
        valid = (jnp.arange(images.shape[0]) < count)[:, None, None, None]
        return jnp.sum(jnp.where(valid, mean, 0.0)), jnp.sum(jnp.where(valid, mean * mean, 0.0))

    moments = xla_cpu.jit(
        moments, in_shardings=(replicated, sharding, replicated), out_shardings=replicated
    )
    total = total_sq = 0.0  # the batches' float32 sums, added in float64
    n = config.export.num_images
    for images, count in _batches(
        config, config.data.split, n, _eval_batch(config, mesh), sharding
    ):
        s, sq = jax.device_get(moments(params, images, jnp.int32(count)))
        total, total_sq = total + float(s), total_sq + float(sq)
    f = module.config.downsample_factor
    dims = n * (config.data.resolution // f) ** 2 * config.vae.latent_channels
    return math.sqrt(max(total_sq / dims - (total / dims) ** 2, 0.0))


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config, workdir) -> dict:
    """Trains config.train.total_steps steps in `workdir`, resuming what is there, then exports
    the EMA autoencoder to WORKDIR/vae/. Returns {"step", "state", "psnr"}."""
    validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tcfg = config.train
    primary = jax.process_index() == 0

    # Mesh, model, optimizers, state (restored with its data position when there is one).
    mesh = make_mesh(config)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    module, disc, optimizers, init, abstract, shardings = build(config, mesh)
    checkpointer = Checkpointer(
        workdir / "checkpoints",
        keep=tcfg.keep_checkpoints,
        every=tcfg.checkpoint_every,
        check=check_compatible,
    )
    restored = checkpointer.restore(abstract_with_shardings(abstract, shardings), config)
    if restored is None:
        state, position, trained_s = fresh_state(init, shardings), 0, 0.0
    else:
        state, meta = restored
        position, trained_s = meta["position"], meta.get("train_seconds", 0.0)
    start = int(state.step)
    train_step = make_train_step(config, module, disc, optimizers, shardings, batch_sharding)
    reconstructions = Reconstructions(config, module, mesh)

    # Data: the loader continues from `position`; positions[s] is the stream position after s
    # steps, which a checkpoint of step s stores (the prefetch thread runs ahead of the step).
    loader = data_lib.build_loader(config, position)
    positions = {start: position}

    def produce(step):
        images = data_lib.to_global(loader.next(tcfg.batch_size)["image"], batch_sharding)
        positions[step + 1] = loader.position
        return images

    prefetch = data_lib.Prefetcher(produce, start, depth=config.data.prefetch)

    # Signals and the time limit end the loop after a whole step; training seconds (PSNR and
    # grids paused out) carry across resumes (control.py, shared with the diffusion loop).
    control = RunControl(start_step=start, trained_s=trained_s, time_limit_s=tcfg.time_limit_s)

    def meta(step):
        return control.checkpoint_meta(step, positions[step], config, loader.skipped)

    writer = MetricsWriter(workdir, enabled=primary)
    bar = tqdm(
        total=tcfg.total_steps, initial=start, disable=not primary or None, dynamic_ncols=True
    )
    say = bar.write if not bar.disable else print
    window = {"start": time.perf_counter(), "images": 0, "metrics": []}

    def show(step):
        """PSNR of the EMA's reconstructions and the grid, off the training clock."""
        t = time.perf_counter()
        result, grid = reconstructions(state.ema)
        if primary:
            save_grid(grid, workdir / "samples" / f"step_{step:07d}.png")
        writer.write(step, {k: result[k] for k in ("psnr", "psnr_uint8")})
        say(
            f"step {step}: EMA reconstructions of {result['examples']} {config.eval.split} "
            f"images: psnr {result['psnr']:.2f} dB (uint8 {result['psnr_uint8']:.2f} dB)"
        )
        seconds = time.perf_counter() - t
        control.pause(seconds)
        window["start"] += seconds
        return result

    step, shown = start, {}
    try:
        while step < tcfg.total_steps and control.running:
            images = prefetch.get()
            state, metrics = train_step(state, images)
            step += 1
            window["images"] += images.shape[0]
            window["metrics"].append(metrics)
            control.after_step(step, state.step)
            last = step == tcfg.total_steps or control.out_of_time
            if step % tcfg.log_every == 0 or last:
                record = _report(window, int(state.bad_step))
                writer.write(step, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                if not bar.disable:
                    bar.update(step - bar.n)
                else:
                    print(
                        f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()),
                        flush=True,
                    )
            if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or last:
                _check_finite(int(state.bad_step))  # never save past a bad step
            if checkpointer.save(step, state, meta(step), force=control.out_of_time):
                for old in [s for s in list(positions) if s < step]:
                    positions.pop(old, None)
            if (tcfg.sample_every and step % tcfg.sample_every == 0) or last:
                _check_finite(int(state.bad_step))
                shown = show(step)
        control.say_why_stopped(step, tcfg.total_steps)
        if int(state.bad_step) < 0:
            checkpointer.save(step, state, meta(step), force=True)
    finally:
        prefetch.close()
        checkpointer.close()
        writer.close()
        bar.close()
        control.close()

    # Export: the run's end (not a signal's), or a finished run whose export is missing.
    if control.signal is None and (step > start or not (workdir / "vae").exists()):
        export(config, workdir, module, state.ema, mesh)
    return {"step": step, "state": state, "psnr": shown.get("psnr")}


def _check_finite(bad_step: int):
    if bad_step >= 0:
        raise TrainingStopped(
            f"the loss or its gradient became non-finite at step {bad_step}; training stopped "
            "there and the last checkpoint before it is kept (lower config.train.lr or enable "
            "config.train.grad_clip)."
        )


def _report(window, bad_step) -> dict:
    """Means of the window's metrics (the learning rate: its last), images per second."""
    _check_finite(bad_step)
    metrics = jax.device_get(window["metrics"])
    seconds = time.perf_counter() - window["start"]
    names = [k for k in ("loss", "l1", "l2", "kl", "adv", "disc", "grad_norm") if k in metrics[0]]
    record = {k: float(np.mean([m[k] for m in metrics])) for k in names}
    record["lr"] = float(metrics[-1]["lr"])
    record["img_per_s"] = window["images"] / seconds
    window.update(start=time.perf_counter(), images=0, metrics=[])
    return record


# ---------------------------------------------------------------------------------------------
# --mode eval and --mode export


def restore_latest(config, workdir):
    """(module, state, meta, mesh) of the newest readable checkpoint in `workdir`."""
    validate(config)
    workdir = pathlib.Path(workdir)
    mesh = make_mesh(config)
    module, _, _, _, abstract, shardings = build(config, mesh)
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=config.train.keep_checkpoints, every=0, check=check_compatible
    )
    try:
        restored = checkpointer.restore(abstract_with_shardings(abstract, shardings), config)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(
            f"no checkpoint in {workdir / 'checkpoints'}: train first (--mode train) or point "
            "--workdir at a run."
        )
    return module, *restored, mesh


def evaluate(config, workdir) -> dict:
    """`--mode eval`: the PSNR of the newest checkpoint's EMA (and, for comparison, its raw
    parameters) on config.eval.num_examples images of config.eval.split; printed as a table and
    written to WORKDIR/eval/psnr_step_N.json."""
    module, state, meta, mesh = restore_latest(config, workdir)
    reconstructions = Reconstructions(config, module, mesh)
    rows = []
    for name, params in (("ema", state.ema), ("params", state.params)):
        result, _ = reconstructions(params)
        rows.append({"weights": name, "psnr": result["psnr"], "psnr_uint8": result["psnr_uint8"]})
    e = config.eval
    print(format_table(rows))
    print(f"{e.num_examples} {e.split} images at step {meta['step']}")
    record = {
        "step": meta["step"],
        "split": e.split,
        "examples": e.num_examples,
        **{row["weights"]: {k: row[k] for k in ("psnr", "psnr_uint8")} for row in rows},
    }
    if jax.process_index() == 0:
        path = pathlib.Path(workdir) / "eval" / f"psnr_step_{meta['step']}.json"
        print(f"wrote {write_json(path, record)}")
    return record


def export(config, workdir, module, params, mesh) -> pathlib.Path:
    """Writes `params` (the EMA) as a diffusers folder WORKDIR/vae/ whose scaling_factor is
    1 / std of the latents (LDM's rule for a new autoencoder: scaled latents of unit variance;
    shift_factor 0)."""
    from patchdiff.models.vae import VAE, save_pretrained

    std = latent_std(config, module, params, mesh)
    factor = 1.0 / std
    scaled = build_module(config, scaling_factor=factor)
    folder = pathlib.Path(workdir) / "vae"
    if jax.process_index() == 0:
        vae = VAE(scaled, _local(params), source=str(pathlib.Path(workdir) / "checkpoints"))
        save_pretrained(vae, folder)
    print(
        f"scaling_factor {factor:.6g} (1 / std {std:.4g} of the posterior means of "
        f"{config.export.num_images} {config.data.split} images); wrote {folder}"
    )
    return folder


def export_latest(config, workdir) -> pathlib.Path:
    """`--mode export`: the newest checkpoint's EMA, as `export` writes it."""
    module, state, _, mesh = restore_latest(config, workdir)
    return export(config, workdir, module, state.ema, mesh)

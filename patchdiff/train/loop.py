"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom; and `sample`, the
`--mode sample` entry.

Sections: mesh, data, model and optimizer, state (fresh or restored), step, the loop with its
reports, checkpoints and sample grids, and shutdown. SIGTERM/SIGINT finish the current step, save
a checkpoint and return; a non-finite loss stops with the step's number, the last good
checkpoint kept.
"""

import logging
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from patchdiff import config as config_lib
from patchdiff import data as data_lib
from patchdiff import generate, latent
from patchdiff.metrics.evaluator import SampleEvaluator
from patchdiff.models import build_model, init_params
from patchdiff.models.partitioning import REPLICATED_RULES
from patchdiff.train.checkpoint import Checkpointer, abstract_with_shardings
from patchdiff.train.control import RunControl
from patchdiff.train.optim import build_optimizer
from patchdiff.train.report import MetricsWriter, save_grid
from patchdiff.train.state import create_state, state_shardings
from patchdiff.train.step import make_train_step

# With a model axis, shard the wide parameter axes over it (MaxText-style logical rules).
MODEL_PARALLEL_RULES = (
    ("conv_out", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("conv_in", None),
    ("embed", None),
    ("norm", None),
    ("vocab", None),
)


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss."""


def make_mesh(config) -> tuple[Mesh, tuple]:
    devices = jax.devices()
    model = config.mesh.model
    if model < 1 or len(devices) % model:
        raise config_lib.ConfigError(
            f"config.mesh.model = {model} is not allowed: it must divide the {len(devices)} "
            "devices."
        )
    mesh = Mesh(np.array(devices).reshape(len(devices) // model, model), ("data", "model"))
    return mesh, (REPLICATED_RULES if model == 1 else MODEL_PARALLEL_RULES)


def _restore_or_init(checkpointer, model, optimizer, config, shardings, abstract):
    restored = checkpointer.restore(abstract_with_shardings(abstract, shardings), config)
    if restored is not None:
        state, meta = restored
        logging.info("resumed from step %d", meta["step"])
        return state, meta["position"], meta.get("train_seconds", 0.0)
    params = init_params(model, jax.random.PRNGKey(config.seed), config)
    state = jax.device_put(create_state(model, optimizer, config, params), shardings)
    return state, 0, 0.0


def train_and_evaluate(config, workdir) -> dict:
    """Trains `config` in `workdir` until config.train.total_steps; resumes what is there."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tcfg = config.train
    primary = jax.process_index() == 0

    # Mesh: data parallel over all devices (times an optional model axis).
    mesh, rules = make_mesh(config)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    # Model, optimizer, state.
    model = build_model(config)
    optimizer = build_optimizer(tcfg)
    shardings, abstract = state_shardings(model, optimizer, config, mesh, rules)
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=tcfg.keep_checkpoints, every=tcfg.checkpoint_every
    )
    state, position, trained_s = _restore_or_init(
        checkpointer, model, optimizer, config, shardings, abstract
    )
    start = int(state.step)
    train_step = make_train_step(model, optimizer, config, shardings, batch_sharding)
    generator = generate.make_generator(model, config) if tcfg.sample_every else None
    # Sample quality every eval.every_images images and at the end (references computed once).
    evaluator = SampleEvaluator(config, model, workdir, mesh) if config.eval.every_images else None
    best = BestKeeper(workdir / "best", evaluator.main_metric) if evaluator else None

    # Data: the plan of step s is a function of s; the loader continues from `position`.
    loader = data_lib.build_loader(config, position)
    positions = {start: position}

    def produce(step):
        patch_size, size = data_lib.step_plan(config, step)
        batch = data_lib.to_global(loader.next(size), batch_sharding)
        positions[step + 1] = loader.position
        return patch_size, batch

    prefetch = data_lib.Prefetcher(produce, start, depth=config.data.prefetch)

    # Signals and the time limit end the loop after a whole step; the clock of training seconds
    # (evaluations and grids paused out) is carried across resumes (control.py).
    control = RunControl(start_step=start, trained_s=trained_s, time_limit_s=tcfg.time_limit_s)

    def meta(step):
        return control.checkpoint_meta(step, positions[step], config, loader.skipped)

    writer = MetricsWriter(workdir, enabled=primary)
    bar = tqdm(
        total=tcfg.total_steps, initial=start, disable=not primary or None, dynamic_ncols=True
    )
    window = {"start": time.perf_counter(), "images": 0, "metrics": [], "sizes": []}
    step = start
    images_seen = int(state.nimg)  # images (crops) trained on, the clock of eval.every_images
    try:
        while step < tcfg.total_steps and control.running:
            patch_size, batch = prefetch.get()
            state, metrics = train_step(state, batch, patch_size)
            step += 1
            window["images"] += batch["image"].shape[0]
            images_seen += batch["image"].shape[0]
            window["metrics"].append(metrics)
            window["sizes"].append(patch_size)
            control.after_step(step, state.step)
            last = step == tcfg.total_steps or control.out_of_time
            if step % tcfg.log_every == 0 or last:
                report = _report(window, int(state.bad_step), step)
                writer.write(step, report)
                bar.set_postfix(loss=f"{report['loss']:.4f}", img_s=f"{report['img_per_s']:.1f}")
                if not bar.disable:
                    bar.update(step - bar.n)
                else:
                    print(
                        f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()),
                        flush=True,
                    )
            if step % max(tcfg.checkpoint_every, 1) == 0 and int(state.bad_step) >= 0:
                _report(window, int(state.bad_step), step)  # raises: never save past a bad step
            if checkpointer.save(step, state, meta(step), force=control.out_of_time):
                for old in [s for s in list(positions) if s < step]:  # atomic copy
                    positions.pop(old, None)
            if generator is not None and step % tcfg.sample_every == 0:
                t = time.perf_counter()
                _sample_grid(generator, state, config, workdir, step, primary)
                _pause(control, window, time.perf_counter() - t)
            every = config.eval.every_images
            due = every and (
                images_seen // every > (images_seen - batch["image"].shape[0]) // every or last
            )
            if evaluator is not None and due and int(state.bad_step) < 0:
                t = time.perf_counter()
                seconds = control.train_seconds()
                _evaluate(evaluator, best, state, step, images_seen, seconds, writer, bar)
                _pause(control, window, time.perf_counter() - t)
        control.say_why_stopped(step, tcfg.total_steps)
        if int(state.bad_step) < 0:
            checkpointer.save(step, state, meta(step), force=True)
    finally:
        prefetch.close()
        checkpointer.close()
        writer.close()
        bar.close()
        control.close()
    return {"step": step, "state": state}


def _pause(control, window, seconds):
    """Takes `seconds` of sampling or evaluation out of the training clock and the img/s window."""
    control.pause(seconds)
    window["start"] += seconds


def _report(window, bad_step, step) -> dict:
    """Averages since the last report; raises TrainingStopped after a non-finite loss."""
    if bad_step >= 0:
        raise TrainingStopped(
            f"the loss or its gradient became non-finite at step {bad_step}; training stopped "
            "there and the last checkpoint before it is kept (lower config.train.lr or enable "
            "config.train.grad_clip)."
        )
    metrics = jax.device_get(window["metrics"])
    seconds = time.perf_counter() - window["start"]
    report = {
        "loss": float(np.mean([m["loss"] for m in metrics])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
        "lr": float(metrics[-1]["lr"]),
        "img_per_s": window["images"] / seconds,
        "step_time_s": seconds / len(metrics),
    }
    if "grad_trace_cov" in metrics[0]:
        # B_simple (McCandlish et al.): the batch size beyond which larger batches stop paying;
        # a ratio of the window's means, as each step's estimates are noisy and can be negative.
        trace_cov = np.mean([m["grad_trace_cov"] for m in metrics])
        sq_norm = np.mean([m["grad_sq_norm"] for m in metrics])
        report["grad_noise_scale"] = float(trace_cov / sq_norm)
    for size in sorted(set(window["sizes"])):
        losses = [m["loss"] for m, s in zip(metrics, window["sizes"], strict=True) if s == size]
        report[f"loss_patch{size}"] = float(np.mean(losses))
    window.update(start=time.perf_counter(), images=0, metrics=[], sizes=[])
    return report


def _evaluate(evaluator, best, state, step, images_seen, train_seconds, writer, bar):
    """Sample-quality metrics of the EMA at `step`, logged; the best EMA so far kept."""
    t = time.perf_counter()
    result = evaluator(state.ema)
    seconds = time.perf_counter() - t
    record = {**result, "eval_seconds": seconds, "train_seconds": train_seconds}
    record["images_seen"] = images_seen
    writer.write(step, record)
    best.offer(step, result[best.metric], state.ema)
    text = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
    (bar.write if not bar.disable else print)(f"step {step}: {text} ({seconds:.0f} s)")


class BestKeeper:
    """Keeps the EMA parameters of the best evaluation so far in `folder`: folder/step_N (orbax)
    and folder/best.json ({"step", metric: value}), replaced only after the new copy is whole."""

    def __init__(self, folder, metric: str):
        import json

        self.folder, self.metric = pathlib.Path(folder).absolute(), metric
        self.record = self.folder / "best.json"
        self.value = float("inf")
        if self.record.is_file():
            saved = json.loads(self.record.read_text())
            self.value = saved.get(metric, float("inf"))

    def offer(self, step: int, value: float, ema) -> bool:
        import json
        import shutil

        import orbax.checkpoint as ocp

        if not value < self.value:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"step_{step}"
        if target.exists():
            shutil.rmtree(target)
        with ocp.StandardCheckpointer() as saver:
            saver.save(target, ema)
            saver.wait_until_finished()
        if jax.process_index() == 0:
            tmp = self.record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, self.metric: value}) + "\n")
            tmp.replace(self.record)  # the record points at a whole copy
            for old in self.folder.glob("step_*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        self.value = value
        return True


def _sample_grid(generator, state, config, workdir, step, primary):
    """The grid of the EMA's samples, written by process 0. Replicated parameters are sampled
    from this host's copy, by process 0 alone; parameters sharded over hosts (config.mesh.model
    across processes) are gathered by every process first, a collective they all join."""
    ema = state.ema
    if jax.process_count() > 1:
        if all(a.is_fully_replicated for a in jax.tree.leaves(ema)):
            ema = jax.tree.map(lambda a: a.addressable_data(0), ema)
        else:
            ema = multihost_utils.process_allgather(ema, tiled=True)
    if primary:
        images, _ = generate.generate_all(generator, ema, config, config.sample.num_images)
        save_grid(images, pathlib.Path(workdir) / "samples" / f"step_{step:07d}.png")


def restore_latest(config, workdir):
    """(model, state, meta) from the newest readable checkpoint in `workdir`."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    mesh, rules = make_mesh(config)
    model = build_model(config)
    optimizer = build_optimizer(config.train)
    shardings, abstract = state_shardings(model, optimizer, config, mesh, rules)
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=config.train.keep_checkpoints, every=0
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
    return (model, *restored)


def sample(config, workdir) -> pathlib.Path:
    """`--mode sample`: config.sample.num_images images from the newest checkpoint's EMA, as PNG
    files (written batch by batch, so 50k images for another project's FID tool never sit in
    memory at once) and images.npz (when under 2 GB) in WORKDIR/generated/NAME/, and the grid
    of the first 64 beside that folder as NAME_grid.png."""
    model, state, meta = restore_latest(config, workdir)
    generator = generate.make_generator(model, config)
    s = config.sample
    name = f"step{meta['step']}_{s.sampler}{s.steps}_cfg{s.guidance_scale:g}_seed{s.seed}"
    folder = pathlib.Path(workdir) / "generated" / name
    resolution, channels = latent.pixel_shape(config)  # decoded images for latent diffusion
    pixels = s.num_images * resolution**2 * channels
    keep = pixels < 2**31
    kept, written = [], 0
    bar = tqdm(total=s.num_images, unit="img", disable=None, dynamic_ncols=True)
    for first, images in generate.generate_batches(generator, state.ema, config, s.num_images):
        generate.write_pngs(images, folder, first)
        if keep or first == 0:
            kept.append(images)
        written += len(images)
        bar.update(len(images))
    bar.close()
    labels = np.asarray(generate.labels_for(config, 0, s.num_images))
    generate.write_summary(np.concatenate(kept), labels, folder, npz=keep)
    print(f"wrote {written} images to {folder}")
    return folder

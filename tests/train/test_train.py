import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ml_collections_configs import base
from patchdiff import train
from patchdiff.train.checkpoint import CheckpointError
from patchdiff.train.evaluate import evaluate
from patchdiff.train.loop import restore_latest

ROOT = pathlib.Path(__file__).parents[2]


def make_data(path, n=64, resolution=16):
    rng = np.random.default_rng(0)
    # blobs on a dark background: something with structure to learn
    yy, xx = np.mgrid[:resolution, :resolution]
    images = []
    for _ in range(n):
        cy, cx = rng.integers(4, resolution - 4, 2)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < 9).astype(np.uint8) * 255
        images.append(np.stack([blob, blob // 2, 255 - blob], -1))
    np.savez(path, images=np.stack(images), labels=np.arange(n) % 3)
    return path


def tiny_config(data_path, patches=False, **train_fields):
    config = base.get_config()
    config.data.source = "npz"
    config.data.path = str(data_path)
    config.data.resolution = 16
    config.data.threads = 2
    config.model.channels = 8
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.head_dim = 8
    config.model.dropout = 0.0
    config.model.num_classes = 3
    if patches:
        config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0, 0.5), (0.5, 0.5)
    else:
        config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size = 8
    config.train.total_steps = 6
    config.train.lr_rampup_img = 32
    config.train.ema_halflife_img = 64
    config.train.log_every = 3
    config.train.checkpoint_every = 3
    config.train.sample_every = 6
    config.sample.steps = 4
    config.sample.num_images = 6
    config.sample.batch_size = 6
    config.eval.sample_quality = False  # sample quality has its own tests (tests/metrics)
    for name, value in train_fields.items():
        setattr(config.train, name, value)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short patch-training run (6 steps, checkpoints at 3 and 6) shared by the tests that
    only read it: compiling the train step dominates their cost."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(make_data(root / "d.npz"), patches=True)
    result = train.train_and_evaluate(config, root / "run")
    return config, root / "run", result


def test_a_few_steps_of_patch_training(trained):
    config, run, result = trained
    assert result["step"] == 6
    lines = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [line["step"] for line in lines] == [3, 6]
    assert all(np.isfinite(line["loss"]) and line["img_per_s"] > 0 for line in lines)
    assert any(key.startswith("loss_patch") for key in lines[0])
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
    assert (run / "samples" / "step_0000006.png").exists()
    assert list((run / "tensorboard").iterdir())


def test_sample_mode_writes_images_with_any_sampler(trained):
    config, run, _ = trained
    config = config.copy_and_resolve_references()
    config.sample.sampler = "dpmpp_2m_sde"
    config.sample.guidance_scale = 2.0
    config.sample.num_images = 5
    folder = train.sample(config, run)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert (folder.parent / f"{folder.name}_grid.png").is_file()  # beside: the folder is images
    with np.load(folder / "images.npz") as saved:
        assert saved["images"].shape == (5, 16, 16, 3) and saved["images"].dtype == np.uint8
        assert list(saved["labels"]) == [0, 1, 2, 0, 1]


def test_eval_mode_is_reproducible(trained):
    config, run, _ = trained
    config = config.copy_and_resolve_references()
    config.eval.num_examples, config.eval.num_sigmas = 12, 3
    first = evaluate(config, run)
    assert first == evaluate(config, run)
    errors = list(first["mse_at_sigma"].values())
    assert len(errors) == 3 and errors[0] < errors[-1]  # more noise, larger error
    assert (run / "eval" / "step_6.json").exists()


def test_a_finished_run_resumes_and_stops_at_once(trained):
    config, run, _ = trained
    assert train.train_and_evaluate(config, run)["step"] == 6


def start_cli(workdir, data, *overrides, devices=1, log=None):
    """The tiny config's training in a subprocess, on `devices` fake CPU devices, output piped
    (or written to the file `log`)."""
    args = [
        sys.executable,
        "-m",
        "patchdiff.main",
        "--config",
        str(ROOT / "tests" / "train" / "tiny_config.py"),
        "--workdir",
        str(workdir),
        f"--config.data.path={data}",
        *overrides,
    ]
    # One CPU device in both runs ("same device count"): compiling for 8 fake devices is slower.
    from conftest import TEST_XLA_FLAGS  # here: tiny_config.py imports this module in the child

    flags = f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONUNBUFFERED="1")
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(
        args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env
    )


def run_cli(workdir, data, steps, wait_for_checkpoint=None):
    """Trains in a subprocess; with `wait_for_checkpoint`, kill -9 it once that step is saved."""
    process = start_cli(workdir, data, f"--config.train.total_steps={steps}")
    if wait_for_checkpoint is None:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
        return
    target = pathlib.Path(workdir) / "checkpoints" / str(wait_for_checkpoint)
    deadline = time.time() + 300
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed: {out}"


def test_a_run_killed_with_sigkill_resumes_bitwise_exactly(tmp_path):
    data = make_data(tmp_path / "d.npz")
    run_cli(tmp_path / "straight", data, 8)
    run_cli(tmp_path / "killed", data, 8, wait_for_checkpoint=4)
    saved = sorted(int(s) for s in os.listdir(tmp_path / "killed" / "checkpoints") if s.isdigit())
    assert 4 in saved and 8 not in saved
    run_cli(tmp_path / "killed", data, 8)  # resumes from the newest complete checkpoint
    config = tiny_config(data)
    config.train.checkpoint_every = 1
    _, a, meta_a = restore_latest(config, tmp_path / "straight")
    _, b, meta_b = restore_latest(config, tmp_path / "killed")
    assert meta_a["step"] == meta_b["step"] == 8
    assert meta_a["position"] == meta_b["position"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_checkpoint_of_another_shape_is_refused_by_name(trained):
    config, run, _ = trained
    other = config.copy_and_resolve_references()
    other.model.channels = 16
    with pytest.raises(
        CheckpointError,
        match=r"written with config.model.channels = 8, but this "
        r"config has 16",
    ):
        train.train_and_evaluate(other, run)


def test_a_time_limit_stops_with_a_checkpoint_and_holds_across_resumes(trained, tmp_path, capsys):
    config, run, _ = trained
    shutil.copytree(run, tmp_path / "run")
    _, _, meta = restore_latest(config, tmp_path / "run")
    assert meta["step"] == 6 and meta["train_seconds"] > 0  # training seconds are checkpointed
    limited = config.copy_and_resolve_references()
    limited.train.total_steps = 12
    limited.train.time_limit_s = meta["train_seconds"] + 1e-6  # reached by the next step
    assert train.train_and_evaluate(limited, tmp_path / "run")["step"] == 7
    assert "stopping at step 7" in capsys.readouterr().err
    _, _, meta = restore_latest(limited, tmp_path / "run")
    assert meta["step"] == 7 and meta["train_seconds"] >= limited.train.time_limit_s
    # the budget counts across resumes: nothing is left, so no step is taken
    assert train.train_and_evaluate(limited, tmp_path / "run")["step"] == 7


def test_noise_estimates_are_unbiased():
    """McCandlish et al.'s estimators from squared norms at two batch sizes recover |G|^2 and
    tr(Sigma) of per-example gradients G + noise (averaged over many draws)."""
    from patchdiff.train.step import noise_estimates

    rng = np.random.default_rng(0)
    d, big, small = 20, 16, 8
    mean = rng.standard_normal(d) * 0.5  # |G|^2 ~ 5
    scales = rng.uniform(0.5, 2.0, d)  # tr(Sigma) = sum of squares
    sq_norm, trace = [], []
    for _ in range(4000):
        per_example = mean + rng.standard_normal((big, d)) * scales
        halves = per_example.reshape(2, small, d).mean(1)
        out = noise_estimates(np.mean(np.sum(halves**2, 1)),
                              np.sum(per_example.mean(0) ** 2), small, big)  # fmt: skip
        sq_norm.append(out["grad_sq_norm"])
        trace.append(out["grad_trace_cov"])
    assert np.mean(sq_norm) == pytest.approx(np.sum(mean**2), rel=0.05)
    assert np.mean(trace) == pytest.approx(np.sum(scales**2), rel=0.05)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path, caplog):
    config, run, _ = trained
    shutil.copytree(run, tmp_path / "run")
    for path in (tmp_path / "run" / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 8)
    _, state, meta = restore_latest(config, tmp_path / "run")
    assert meta["step"] == 3 and int(state.step) == 3
    assert "cannot be read" in caplog.text


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path):
    data = make_data(tmp_path / "d.npz")
    config = tiny_config(
        data,
        total_steps=9,
        lr=1e30,
        lr_schedule="constant",
        sample_every=0,
        checkpoint_every=1,
        log_every=1,
    )
    with pytest.raises(train.TrainingStopped, match=r"non-finite at step \d+"):
        train.train_and_evaluate(config, tmp_path / "run")
    _, state, meta = restore_latest(config, tmp_path / "run")
    assert int(state.bad_step) == -1
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))


def test_main_needs_a_workdir_and_names_a_missing_checkpoint(tmp_path):
    base_args = [
        sys.executable,
        "-m",
        "patchdiff.main",
        "--config",
        "ml_collections_configs/base.py:runlocal",
    ]
    result = subprocess.run(base_args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--mode train needs --workdir DIR" in result.stderr
    result = subprocess.run(
        base_args + ["--mode", "sample", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "no checkpoint in" in result.stderr


def test_main_names_a_missing_dataset_in_one_line(tmp_path):
    """A missing Fashion-MNIST (or any data error) ends training, and the reference-statistics
    command, with one `patchdiff: ...` line that says how to get the data, never a traceback."""
    nowhere = tmp_path / "nowhere"
    config = tmp_path / "moved.py"  # the ref command takes a config file, no overrides
    config.write_text(
        "from ml_collections_configs import fashion_mnist\n\n\ndef get_config(arg=None):\n"
        f"    config = fashion_mnist.get_config('runlocal')\n    config.data.path = '{nowhere}'\n"
        "    return config\n"
    )
    commands = (
        ["patchdiff.main", "--config", "ml_collections_configs/fashion_mnist.py:runlocal",
         "--workdir", str(tmp_path / "run"), f"--config.data.path={nowhere}"],
        ["patchdiff.metrics.ref", "--config", str(config), "--extractor", "fmnist",
         "--out", str(tmp_path / "ref.npz")],
    )  # fmt: skip
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("patchdiff: Fashion-MNIST is not in"), result.stderr
        assert "apt-get install dataset-fashion-mnist" in last


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = make_data(tmp_path / "d.npz")
    process = start_cli(
        tmp_path / "run",
        data,
        "--config.train.total_steps=100000",
        "--config.train.checkpoint_every=0",
        "--config.train.grad_accum=2",
    )
    for line in process.stdout:  # wait until training runs (micro-batched steps)
        if line.startswith("step 3:"):
            break
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert "stopping at step" in out
    steps = [int(s) for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 100000

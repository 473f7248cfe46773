"""The autoencoder trainer (patchdiff/train/autoencoder.py) on a tiny VAE and made-up 32x32 grey
images, on the 8 fake CPU devices of conftest: training lowers the loss, reports PSNR and grids,
resumes bitwise after a SIGTERM, exports a folder `from_pretrained` reads with unit-variance
latents, runs the adversarial term, and names bad config fields."""

import json
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ml_collections_configs import vae_fashion_mnist
from patchdiff.config import ConfigError
from patchdiff.models.vae import from_pretrained
from patchdiff.train import autoencoder
from patchdiff.train.checkpoint import CheckpointError

ROOT = pathlib.Path(__file__).parents[2]


def make_data(path, n=48):
    """Grey 32x32 images (a Fashion-MNIST-sized npz): bright rectangles of random size and
    brightness on black, the garments' silhouettes at their simplest."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, 32, 32), np.uint8)
    for image in images:
        top, left = rng.integers(2, 12, 2)
        height, width = rng.integers(10, 20, 2)
        image[top : top + height, left : left + width] = rng.integers(120, 256)
    np.savez(path, images=images, labels=np.arange(n) % 10)
    return path


def tiny_config(data, **fields):
    """The config file's runlocal model on the npz: 8 images a step, 6 steps, checkpoints every
    2, a report every step, one grid and PSNR at step 3 and at the end."""
    config = vae_fashion_mnist.get_config("runlocal")
    config.data.source = "npz"
    config.data.path = str(data)
    config.data.threads = 2
    config.train.total_steps = 6
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.sample_every = 3
    config.eval.num_examples = 12  # a last batch with padding rows that must not count
    config.eval.batch_size = 8
    config.export.num_images = 20
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted run of 6 steps, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("vae")
    config = tiny_config(make_data(root / "d.npz"))
    result = autoencoder.train_and_evaluate(config, root / "run")
    return config, root / "run", result


def metrics_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def test_a_few_steps_lower_the_loss_and_report_psnr_and_grids(trained):
    config, run, result = trained
    assert result["step"] == 6
    lines = metrics_of(run)
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert {"l1", "l2", "kl", "grad_norm", "lr", "img_per_s"} <= set(lines[0])
    assert "adv" not in lines[0]  # no discriminator without the adversarial term
    psnr = [line for line in lines if "psnr" in line]
    assert [line["step"] for line in psnr] == [3, 6]
    assert all(np.isfinite(line["psnr"]) and line["psnr"] > 0 for line in psnr)
    assert result["psnr"] == psnr[-1]["psnr"]
    for step in (3, 6):
        assert (run / "samples" / f"step_{step:07d}.png").is_file()
    assert result["state"].disc_params is None


def test_eval_mode_writes_the_ema_psnr_of_the_newest_checkpoint(trained):
    config, run, _ = trained
    record = autoencoder.evaluate(config, run)
    assert record["step"] == 6 and record["examples"] == 12
    # The same EMA on the same images as the training's last report.
    assert record["ema"]["psnr"] == pytest.approx(metrics_of(run)[-1]["psnr"], rel=1e-6)
    saved = json.loads((run / "eval" / "psnr_step_6.json").read_text())
    assert saved["ema"] == record["ema"]


def test_the_export_loads_and_scales_latents_to_unit_variance(trained):
    config, run, result = trained
    vae = from_pretrained(run / "vae")
    for a, b in zip(jax.tree.leaves(vae.params), jax.tree.leaves(result["state"].ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the EMA, unchanged
    assert vae.shift_factor == 0.0
    # The first export.num_images images of the training stream, unflipped, encoded again.
    loader = autoencoder.data_lib.build_loader(config, 0)
    loader.random_flip = False
    means = vae.encode(loader.next(config.export.num_images)["image"])
    assert vae.scaling_factor == pytest.approx(1 / np.std(np.asarray(means, np.float64)), rel=1e-4)


def test_a_run_stopped_by_sigterm_resumes_bitwise_exactly(trained, tmp_path, monkeypatch):
    config, straight, _ = trained

    class SigtermAtStep3(autoencoder.MetricsWriter):
        def write(self, step, scalars):
            super().write(step, scalars)
            if step == 3 and "loss" in scalars:
                signal.raise_signal(signal.SIGTERM)  # as `kill` would, between two steps

    monkeypatch.setattr(autoencoder, "MetricsWriter", SigtermAtStep3)
    assert autoencoder.train_and_evaluate(config, tmp_path / "run")["step"] == 3
    assert not (tmp_path / "run" / "vae").exists()  # a signal saves and leaves, no export
    monkeypatch.undo()
    assert autoencoder.train_and_evaluate(config, tmp_path / "run")["step"] == 6
    _, a, meta_a, _ = autoencoder.restore_latest(config, straight)
    _, b, meta_b, _ = autoencoder.restore_latest(config, tmp_path / "run")
    assert meta_a["step"] == meta_b["step"] == 6
    assert meta_a["position"] == meta_b["position"] == 6 * config.train.batch_size
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # and a finished run resumes to stop at once
    assert autoencoder.train_and_evaluate(config, tmp_path / "run")["step"] == 6


def test_the_adversarial_term_trains_a_discriminator_from_its_start_step(tmp_path):
    data = make_data(tmp_path / "d.npz")
    config = tiny_config(
        data,
        loss__adv_weight=0.5,
        loss__adv_start_step=1,
        train__total_steps=3,
        train__sample_every=0,
    )
    result = autoencoder.train_and_evaluate(config, tmp_path / "run")
    lines = [line for line in metrics_of(tmp_path / "run") if "loss" in line]
    assert all(np.isfinite(line["adv"]) and np.isfinite(line["disc"]) for line in lines)
    state = result["state"]
    assert int(state.disc_opt_state[0].count) == 2  # steps 1 and 2; step 0 came before the start
    # A checkpoint with a discriminator is refused by a config without one, by name.
    with pytest.raises(CheckpointError, match=r"config.loss.adv_weight = 0.5 \(with a discrim"):
        autoencoder.restore_latest(tiny_config(data), tmp_path / "run")


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "vae__norm_num_groups",
            3,
            "config.vae.norm_num_groups = 3 is not allowed: it must divide",
        ),
        ("vae__dtype", "float64", "config.vae.dtype = 'float64' is not allowed: it must be one of"),
        ("loss__kl_weight", -1.0, "config.loss.kl_weight = -1.0 is not allowed: it must be a num"),
        ("loss__disc_norm", "batch", "config.loss.disc_norm = 'batch' is not allowed"),
        ("train__ema_decay", 1.0, r"config.train.ema_decay = 1.0 is not allowed: it must lie in"),
        ("train__warmup_steps", -1, "config.train.warmup_steps = -1 is not allowed: it must be"),
        ("eval__grid_images", 10, r"config.eval.grid_images = 10 is not allowed: it must be 2 k"),
        ("export__num_images", 1, "config.export.num_images = 1 is not allowed"),
    ],
)
def test_a_bad_field_is_named_in_one_sentence(field, value, message):
    config = tiny_config("unused.npz", **{field: value})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        autoencoder.validate(config)


def test_the_command_ends_with_one_line_naming_the_problem(tmp_path):
    command = [
        sys.executable,
        "-m",
        "patchdiff.vae",
        "--config",
        "ml_collections_configs/vae_fashion_mnist.py:runlocal",
    ]
    cases = [
        (
            ["--workdir", str(tmp_path), "--config.loss.l1_weight=0.0"],
            "patchdiff: config.loss.l1_weight = 0.0 is not allowed: with config.loss.l2_weight",
        ),
        (["--workdir", str(tmp_path), "--mode", "eval"], "patchdiff: no checkpoint in"),
    ]
    for args, expected in cases:
        result = subprocess.run(
            command + args, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr

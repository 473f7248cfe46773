"""The sample evaluator: one seed per image, the same images and figures on 1 and 8 devices, and
sample quality in training (metrics.jsonl, the best checkpoint) and in `--mode eval`.

A tiny grey 32x32 U-Net with random parameters makes the images and the committed fd_fmnist
classifier measures them; the reference comes from made-up data through the trainer's own
sources, so nothing here needs Fashion-MNIST installed.
"""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import random_params, tiny_config
from patchdiff import generate, train
from patchdiff.metrics import MetricError, fid
from patchdiff.metrics.evaluator import SampleEvaluator
from patchdiff.models import build_model
from patchdiff.train.evaluate import evaluate


def grey_config(tmp_path, **eval_fields):
    """A 32x32 grey class-conditional model on 40 made-up images, measured by fd_fmnist."""
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=np.arange(40) % 3)
    config = tiny_config(resolution=32, patch_size=2, num_classes=3)
    config.model.channels = 8
    config.model.head_dim = 8
    config.data.source, config.data.channels = "npz", 1
    config.data.path = str(tmp_path / "data.npz")
    config.data.random_flip = False
    config.sample.batch_size = 8
    e = config.eval
    e.metrics, e.num_samples, e.sampler, e.steps = ("fd_fmnist",), 12, "euler_ancestral", 3
    e.seed = 5
    for name, value in eval_fields.items():
        setattr(e, name, value)
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluator")
    config = grey_config(tmp)
    model = build_model(config)
    return config, model, random_params(model, config, seed=1), tmp


def test_an_image_depends_on_its_seed_alone(setup):
    """Image i comes from fold_in(key(seed), i): the same in any batch, at any position, even
    with a stochastic sampler (euler_ancestral draws noise at every step)."""
    config, model, params, _ = setup
    gen = generate.make_generator(model, config, sampler="euler_ancestral", steps=3)
    eight = np.asarray(gen(params, generate.image_keys(5, 0, 8), generate.labels_for(config, 0, 8)))
    four = np.asarray(gen(params, generate.image_keys(5, 4, 4), generate.labels_for(config, 4, 4)))
    np.testing.assert_allclose(four, eight[4:], atol=2e-6)
    other_seed = np.asarray(
        gen(params, generate.image_keys(6, 4, 4), generate.labels_for(config, 4, 4))
    )
    assert np.abs(other_seed - four).mean() > 0.1  # the seed, not the batch, makes the image


def test_one_and_eight_devices_give_the_same_images_and_figure(setup):
    config, model, params, tmp = setup
    assert len(jax.devices()) == 8
    one = SampleEvaluator(config, model, tmp / "one", Mesh(np.array(jax.devices()[:1])[:, None],
                                                          ("data", "model")))  # fmt: skip
    eight = SampleEvaluator(config, model, tmp / "eight", Mesh(np.array(jax.devices())[:, None],
                                                              ("data", "model")))  # fmt: skip
    # 12 images in batches of 8: a full batch, then a padded one whose extra images are dropped
    got_one = list(one.images(params, 12, 0))
    got_eight = list(eight.images(params, 12, 0))
    idx1, im1 = (np.concatenate(x) for x in zip(*got_one, strict=True))
    idx8, im8 = (np.concatenate(x) for x in zip(*got_eight, strict=True))
    np.testing.assert_array_equal(idx1, np.arange(12))
    np.testing.assert_array_equal(idx8, idx1)
    # XLA:CPU may round the last float32 bit differently for other per-device batch sizes;
    # after quantisation to uint8 at most a rare pixel moves by one level.
    diff = np.abs(im1.astype(int) - im8.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    a, b = one(params), eight(params)
    assert list(a) == ["fd_fmnist@12"] and np.isfinite(a["fd_fmnist@12"])
    assert b["fd_fmnist@12"] == pytest.approx(a["fd_fmnist@12"], rel=1e-4)
    # the reference was computed once per workdir, in EDM's format plus our fields
    ref = fid.load_reference(tmp / "one" / "eval" / "ref_fmnist_train_all.npz", "fmnist", 128)
    assert ref.count == 40 and ref.extractor == "fmnist"
    # a later range of seeds is other images, so another figure
    assert one(params, 12, 12)["fd_fmnist@12"] != a["fd_fmnist@12"]


def test_a_given_reference_file_is_checked_and_used(setup):
    config, model, params, tmp = setup
    stats = fid.FeatureStats(128)
    stats.add(np.random.default_rng(0).standard_normal((10, 128)))
    fid.save_reference(tmp / "inception.npz", stats, "inception")
    with pytest.raises(MetricError, match="of 'inception' features, not 'fmnist'"):
        SampleEvaluator(grey_config(tmp, ref_fmnist=str(tmp / "inception.npz")), model, tmp / "x")
    fid.save_reference(tmp / "fmnist.npz", stats, "fmnist")
    evaluator = SampleEvaluator(grey_config(tmp, ref_fmnist=str(tmp / "fmnist.npz")), model, tmp)
    assert evaluator.refs["fmnist"].count == 10
    assert not (tmp / "x" / "eval").exists()  # nothing computed when a file is given


def test_sample_quality_in_training_and_in_eval_mode(tmp_path):
    """eval.every_images during training: each evaluation is a metrics.jsonl line with the count
    in its name and the training seconds; the best EMA is kept; reports carry the gradient noise
    scale; --mode eval follows EDM's protocol (seed ranges, each figure, the best) as JSON."""
    config = grey_config(tmp_path, every_images=32, repeats=2)
    config.train.batch_size = 8
    config.train.total_steps = 6
    config.train.log_every = 3
    config.train.checkpoint_every = 3
    config.train.sample_every = 0
    config.train.lr_rampup_img = 16
    config.train.grad_noise_scale = True  # the default, which the tiny configs turn off
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    run = tmp_path / "run"
    train.train_and_evaluate(config, run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "fd_fmnist@12" in x]
    assert [x["step"] for x in evals] == [4, 6]  # 32 images at step 4, and the last step
    assert all(x["train_seconds"] > 0 and x["images_seen"] in (32, 48) for x in evals)
    reports = [x for x in lines if "loss" in x]
    assert all(np.isfinite(x["grad_noise_scale"]) for x in reports)
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["fd_fmnist@12"] == min(x["fd_fmnist@12"] for x in evals)
    assert (run / "best" / f"step_{best['step']}").is_dir()

    config.eval.num_examples, config.eval.num_sigmas = 8, 2
    result = evaluate(config, run)
    quality = result["sample_quality"]
    assert len(quality["repeats"]) == 2 and quality["seed"] == 5
    values = [r["fd_fmnist@12"] for r in quality["repeats"]]
    assert quality["best"]["fd_fmnist@12"] == min(values) and values[0] != values[1]
    # the first seed range is the training loop's evaluation of the same EMA
    assert values[0] == pytest.approx(evals[-1]["fd_fmnist@12"], rel=1e-6)
    saved = json.loads((run / "eval" / "step_6.json").read_text())
    assert saved["sample_quality"]["best"] == quality["best"]

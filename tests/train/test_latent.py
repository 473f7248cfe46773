"""Latent diffusion end to end: a VAE file, `patchdiff.data.encode`, training on the latents,
samples decoded to pixels (grids, --mode sample, the evaluator's references)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from patchdiff import config as config_lib
from patchdiff import latent, train
from patchdiff.data import DataError, encode

# A config file the encode command reads: the latent demo's, on pixels the test writes.
CONFIG = """
from ml_collections_configs import latent_fashion_mnist


def get_config(arg=None):
    config = latent_fashion_mnist.get_config("runlocal")
    config.latent.data.source = "npz"
    config.latent.data.path = {pixels!r}
    config.latent.data.resolution = 16
    config.data.path = {latents!r}
    config.data.threads = 2
    return config
"""


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """(config file, latents folder): 48 grey 16x16 images of 10 classes encoded by a tiny VAE
    (16x16x1 -> 8x8x4, the latent demo's latent shape)."""
    from patchdiff.models.vae import VAEConfig, init_vae, save_pretrained

    tmp = tmp_path_factory.mktemp("latent")
    rng = np.random.default_rng(0)
    images = (rng.random((48, 16, 16)) * np.linspace(0, 255, 16)).astype(np.uint8)
    np.savez(tmp / "pixels.npz", images=images, labels=np.arange(48) % 10)
    tiny = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                     layers_per_block=1, norm_num_groups=4, latent_channels=4,
                     scaling_factor=0.7)  # fmt: skip
    save_pretrained(init_vae(tiny, jax.random.key(0)), tmp / "vae")
    spec = tmp / "config.py"
    spec.write_text(CONFIG.format(pixels=str(tmp / "pixels.npz"), latents=str(tmp / "latents")))
    for split in ("train", "test"):  # the npz source has one split: both read it
        out = str(tmp / "latents")
        encode.main(["--config", str(spec), "--vae", str(tmp / "vae"), "--out", out,
                     "--split", split, "--shard_size", "32"])  # fmt: skip
    return spec, tmp / "latents"


def load(spec) -> object:
    return config_lib.validate(config_lib.load_file(str(spec)))


def test_the_latent_demo_trains_samples_and_evaluates_in_pixels(latents, tmp_path):
    spec, folder = latents
    config = load(spec)
    assert latent.pixel_shape(config) == (16, 1)
    assert latent.scaling(config) == (pytest.approx(0.7), 0.0)
    workdir = tmp_path / "run"
    result = train.train_and_evaluate(config, workdir)
    assert result["step"] == config.train.total_steps
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    # Patch Diffusion's latent crops: both sizes were trained.
    assert {k for x in lines for k in x if k.startswith("loss_patch")} >= {"loss_patch8"}
    grid = workdir / "samples" / f"step_{config.train.total_steps:07d}.png"
    assert grid.is_file()

    folder = train.sample(config, workdir)  # --mode sample: decoded pixels
    with np.load(folder / "images.npz") as saved:
        assert saved["images"].shape == (config.sample.num_images, 16, 16, 1)
        assert saved["images"].dtype == np.uint8

    # The evaluator's reference comes from the pixels the latents were encoded from.
    pixels = latent.pixel_config(config)
    assert pixels.data.source == "npz" and pixels.data.resolution == 16
    assert pixels.data.channels == 1 and not pixels.data.random_flip


def test_a_flow_dit_trains_on_the_same_latents(latents, tmp_path):
    """The rectified-flow DiT recipe (flow_dit_imagenet256.py) on latents, a few steps."""
    from ml_collections_configs import flow_dit_imagenet256

    spec, folder = latents
    config = flow_dit_imagenet256.get_config("runlocal,rope")
    demo = load(spec)
    config.data = demo.data
    config.latent = demo.latent
    config.model.num_classes = 10
    config.train.total_steps = 3
    config.train.sample_every = 0
    config.train.checkpoint_every = 0
    config_lib.validate(config)
    result = train.train_and_evaluate(config, tmp_path / "flow")
    assert result["step"] == 3
    lines = (tmp_path / "flow" / "metrics.jsonl").read_text().splitlines()
    assert np.isfinite(json.loads(lines[-1])["loss"])


def test_latent_config_errors_name_the_field(latents):
    spec, folder = latents
    config = load(spec)
    config.data.resolution = 16
    with pytest.raises(DataError, match="config.data.resolution = 16 .* set them to 8 and 4"):
        from patchdiff.data import build_loader

        build_loader(config)
    config = load(spec)
    config.augment.p = 0.1
    config.model.augment_dim = 9
    with pytest.raises(config_lib.ConfigError, match="config.augment.p"):
        config_lib.validate(config)
    config = load(spec)
    config.latent.vae = str(pathlib.Path(folder) / "nowhere")
    with pytest.raises(DataError, match="config.latent.vae"):
        latent.load_vae(config)
    pixel = config_lib.load_file("ml_collections_configs/fashion_mnist.py")
    pixel.latent.vae = "some/vae"
    with pytest.raises(config_lib.ConfigError, match="config.latent.vae .* latent diffusion"):
        config_lib.validate(pixel)

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from ml_collections_configs import base, hdit_fashion_mnist, hdit_ffhq1024, hdit_imagenet256
from patchdiff import config as config_lib
from patchdiff import train
from patchdiff.diffusion.patches import random_patches
from patchdiff.models import build_model, init_params
from patchdiff.models.cost import count_params
from patchdiff.models.hdit import hdit_problems


def tiny_config(scan=False, **model):
    """Two levels at 16x16 with 2x2 patches: 8x8 tokens with 3x3 neighborhood attention, then
    4x4 tokens with global attention; class-conditional."""
    config = base.get_config()
    config.data.resolution = 16
    hdit_ffhq1024.hdit(config, (32, 64), (1, 2), patch_size=2, mapping_width=32)
    config.model.hdit.head_dim = 16
    config.model.hdit.neighborhood_kernel = 3
    config.model.num_classes = 3
    config.model.scan = scan
    for name, value in model.items():
        setattr(config.model, name, value)
    config_lib.validate(config)
    return config


def nonzero_params(model, config, seed=0):
    """Random parameters everywhere (no zero-initialised output), the attention scales positive
    (each head's logit scale is sqrt(scale)^2, as at init)."""
    params = random_params(model, config, seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.abs(p) * 10 if path[-1].key == "scale" else p, params
    )


def inputs(batch=2, size=16, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, size, size, 3))
    return x, jnp.linspace(-1.0, 1.0, batch)


def test_zero_at_init():
    """F is exactly zero at init: its last projection starts at zero."""
    config = tiny_config()
    model = build_model(config)
    params = init_params(model, jax.random.key(0), config)
    x, c_noise = inputs()
    out = jax.jit(model.apply)({"params": params}, x, c_noise, labels=jnp.array([0, 3]))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert not jnp.any(out)
    assert set(params) >= {"mapping", "patch_in", "down_0", "merge_0", "mid", "split_0", "up_0"}


def test_crops_see_only_relative_positions_and_labels_matter():
    """Positions enter only through RoPE, so a crop's output is the same wherever its
    coordinates put it if they all move together, and changes when they spread; labels None is
    the null class. One call on four copies of two crops."""
    config = tiny_config()
    model = build_model(config)
    params = nonzero_params(model, config)
    x, c_noise = inputs()
    crops, coords = random_patches(jax.random.key(1), x, 8)  # [2, 8, 8, 3]: 4x4, 2x2 tokens
    null, labels = jnp.full((2,), 3), jnp.array([0, 1])
    out = jax.jit(model.apply)(
        {"params": params},
        jnp.tile(crops, (4, 1, 1, 1)),
        jnp.tile(c_noise, 4),
        labels=jnp.concatenate([null, null, null, labels]),
        coords=jnp.concatenate([coords, coords + 0.25, coords * 0.5, coords]),
    )
    assert out.shape == (8, 8, 8, 3)
    same, shifted, spread, relabelled = jnp.split(out, 4)
    scale = float(jnp.abs(same).max())
    assert float(jnp.abs(same).mean()) > 1e-3
    np.testing.assert_allclose(shifted, same, atol=2e-4 * scale)
    assert float(jnp.abs(spread - same).max()) > 1e-2 * scale
    assert float(jnp.abs(relabelled - same).max()) > 1e-2 * scale
    unlabelled = jax.jit(model.apply)({"params": params}, crops, c_noise, coords=coords)
    np.testing.assert_allclose(unlabelled, same, atol=1e-5 * scale)


def test_scan_matches_a_loop_over_layers():
    """`scan` stacks a level's layer_0, layer_1, ... on a leading axis under `layers`; the same
    numbers give the same output either way."""
    loop_config, scan_config = tiny_config(scan=False), tiny_config(scan=True)
    loop, scanned = build_model(loop_config), build_model(scan_config)
    params = nonzero_params(loop, loop_config)

    def stacked(level):
        layers = [level[f"layer_{j}"] for j in range(len(level))]
        return {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}

    scan_params = {
        k: stacked(v) if k in ("down_0", "mid", "up_0") else v for k, v in params.items()
    }
    expected = jax.eval_shape(lambda k: init_params(scanned, k, scan_config), jax.random.key(0))
    assert jax.tree.map(jnp.shape, scan_params) == jax.tree.map(jnp.shape, expected)
    x, c_noise = inputs()
    out = jax.jit(loop.apply)({"params": params}, x, c_noise)
    np.testing.assert_allclose(
        jax.jit(scanned.apply)({"params": scan_params}, x, c_noise), out, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "module, paper, ours",
    [(hdit_ffhq1024, 85e6, 85_079_300), (hdit_imagenet256, 557e6, 557_350_986)],
)
def test_paper_configs_parameter_counts(module, paper, ours):
    """The papers' sizes within 0.1%: FFHQ-1024 85 M (ours has the augmentation labels'
    projection, 65,536 of its parameters), ImageNet-256 557 M."""
    config = module.get_config()
    config_lib.validate(config)
    model = build_model(config)
    count = count_params(jax.eval_shape(lambda k: init_params(model, k, config), jax.random.key(0)))
    assert count == ours
    assert abs(count / paper - 1) < 1e-3


def test_builder_refuses_what_it_cannot_build():
    config = tiny_config()
    with pytest.raises(ValueError, match="conv3x3 is the U-Net's seam"):
        build_model(config, conv3x3=object())
    config.model.hdit.head_dim = 12
    assert hdit_problems(config) == [
        "config.model.hdit.head_dim = 12 must be a positive multiple of 8 (axial RoPE rotates a "
        "quarter of each head per axis, in pairs)."
    ]
    with pytest.raises(ValueError, match="head_dim = 12"):
        build_model(config)


def write_idx(path, array):
    """An IDX file of unsigned bytes (the MNIST format)."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_demo_trains(tmp_path):
    """hdit_fashion_mnist.py:runlocal through the trainer (scanned and rematerialised layers) on
    made-up 28x28 images."""
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (32, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(32) % 10)
    config = hdit_fashion_mnist.get_config("runlocal")
    config.data.path = str(tmp_path)
    config.model.scan = config.model.remat = True
    # one crop size, one compiled step: 8 pixels, 4x4 tokens at the first level, under the
    # 7x7 window (full-size images run in the tests above)
    config.diffusion.patch_scales, config.diffusion.patch_probs = (0.25,), (1.0,)
    config.train.total_steps = config.train.log_every = config.train.checkpoint_every = 4
    config.train.sample_every = 0
    config.train.grad_noise_scale = False
    config.eval.sample_quality = False
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 4
    (line,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert np.isfinite(line["loss"]) and line["grad_norm"] > 0

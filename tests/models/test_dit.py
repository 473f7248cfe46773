import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from ml_collections_configs import base, dit_b4_cifar10, dit_xl2_imagenet256
from patchdiff import config as config_lib
from patchdiff import train
from patchdiff.diffusion import patches
from patchdiff.models import build_model, cost, dummy_inputs, init_params
from patchdiff.models.dit import DiTBlock, sincos_embedding, token_units
from patchdiff.models.rope import token_positions

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "train"))
from test_train import make_data  # noqa: E402


def tiny_config(pos_embed="sincos", **model):
    """A two-block DiT of width 32 (2 heads of 16) on 16x16x3 images, 2x2 patches, 3 classes."""
    config = dit_b4_cifar10.dit(base.get_config(), "S", patch_size=2)
    config.data.resolution = 16
    config.model.dit.depth, config.model.dit.width, config.model.dit.heads = 2, 32, 2
    config.model.dit.pos_embed = pos_embed
    config.model.num_classes = 3
    config.model.scan = False
    for name, value in model.items():
        setattr(config.model, name, value)
    return config_lib.validate(config)


def apply(model, params, x, c_noise, **kwargs):
    # Jitted: one compile of a tiny DiT costs less than op-by-op dispatch of its many small ops.
    return jax.jit(model.apply)({"params": params}, x, c_noise, **kwargs)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_output_shapes_for_the_full_image_and_a_crop(pos_embed):
    config = tiny_config(pos_embed, augment_dim=2)
    model = build_model(config)
    params = random_params(model, config)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    c_noise = jnp.array([0.1, -0.3])
    out = apply(model, params, images, c_noise)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    # None means the null class and zero augmentation labels (sampling).
    same = apply(
        model, params, images, c_noise, labels=jnp.array([3, 3]), augment_labels=jnp.zeros((2, 2))
    )
    np.testing.assert_array_equal(out, same)
    augmented = apply(model, params, images, c_noise, augment_labels=jnp.ones((2, 2)))
    assert not np.allclose(augmented, out)
    crops, coords = patches.random_patches(jax.random.key(1), images, 8)
    out = apply(model, params, crops, c_noise, labels=jnp.array([0, 2]), coords=coords)
    assert out.shape == (2, 8, 8, 3)


def test_output_is_zero_and_every_block_the_identity_at_init():
    config = tiny_config()
    model = build_model(config)
    params = init_params(model, jax.random.key(0), config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    assert not np.any(apply(model, params, x, jnp.ones(2), labels=jnp.array([0, 1])))
    block = DiTBlock(width=32, heads=2)
    tokens = jax.random.normal(jax.random.key(2), (2, 64, 32))
    cond = jax.random.normal(jax.random.key(3), (2, 32))
    for i in range(2):
        out, _ = block.apply({"params": params[f"block_{i}"]}, tokens, cond, None)
        np.testing.assert_array_equal(out, tokens)


def dit_table(width, grid):
    """DiT's `get_2d_sincos_pos_embed(width, grid)`, written out: tokens row-major, the first
    half of the channels from the column index, the second from the row, each [sin, cos] of the
    index times 10000^(-i / (W/4))."""
    omega = 1.0 / 10000 ** (np.arange(width // 4) / (width / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def one_axis(index):
        angles = index.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)  # [grid^2, W]


def full_image_embedding(resolution, patch_size, width):
    grid = patches.coordinate_grid(resolution)[None]
    return sincos_embedding(token_units(token_positions(grid, patch_size), resolution, patch_size),
                            width)[0]  # fmt: skip


@pytest.mark.parametrize("resolution, patch_size", [(32, 2), (16, 4)])
def test_sincos_table_at_the_full_grid_is_dits(resolution, patch_size):
    ours = full_image_embedding(resolution, patch_size, 64)  # [R/P, R/P, W]
    expected = dit_table(64, resolution // patch_size)
    np.testing.assert_allclose(ours.reshape(-1, 64), expected, atol=2e-5)


def test_a_crops_embedding_is_the_window_of_the_full_images():
    full = full_image_embedding(32, 2, 64)  # 16 x 16 tokens
    grid = jnp.broadcast_to(patches.coordinate_grid(32), (1, 32, 32, 2))
    coords = patches.crop(grid, jnp.array([[6, 10]]), 12)  # pixels 6..17 x 10..21
    window = sincos_embedding(token_units(token_positions(coords, 2), 32, 2), 64)[0]
    np.testing.assert_allclose(window, full[3:9, 5:11], atol=2e-5)


def abstract_params(config, **fields):
    model = build_model(config).clone(**fields)
    return jax.eval_shape(lambda k: init_params(model, k, config), jax.random.key(0)), model


@pytest.mark.parametrize(
    "make, ours, paper",
    [
        (dit_xl2_imagenet256.get_config, 674_816_272, 675_129_632),  # the paper's 675M
        (dit_b4_cifar10.get_config, 129_583_920, 130_475_648),  # the paper's 130M (DiT-B)
    ],
)
def test_parameter_counts_match_the_paper(make, ours, paper):
    config = make()
    params, _ = abstract_params(config)
    assert cost.count_params(params) == ours
    # The paper counts as DiT's train.py does (`sum(p.numel() for p in model.parameters())`):
    # class-conditional on 32x32x4 latents, 2C output channels (learn_sigma), and the frozen
    # sin-cos table, S x W, among the parameters.
    config.data.resolution, config.data.channels, config.model.num_classes = 32, 4, 1000
    doubled, _ = abstract_params(config, out_channels=8)
    tokens = (32 // config.model.patch_size) ** 2
    theirs = cost.count_params(doubled) + tokens * config.model.dit.width
    assert theirs == paper
    assert abs(theirs - round(paper, -6)) <= 0.01 * paper


def test_dit_xl2_costs_118_6_gmacs_per_image():
    config = dit_xl2_imagenet256.get_config()
    assert config.model.scan  # matmul_flops counts the scanned body depth times
    params, model = abstract_params(config)
    x, c_noise, kwargs = dummy_inputs(config)
    flops = cost.matmul_flops(lambda p: apply(model, p, x, c_noise, **kwargs), params)
    # Peebles & Xie, Table 4: 118.6 Gflops, counted as multiply-adds; ours is 2 per MAC, and
    # with C rather than 2C outputs (learn_sigma) the final Linear is 4.7 MMACs smaller.
    assert abs(flops / 2 - 118.6e9) <= 0.001 * 118.6e9
    # XLA's cost analysis counts a loop body once: model_cost counts the unrolled twin instead.
    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan = False
    assert (
        cost.model_cost(config)["gflops_per_image"] == cost.model_cost(unrolled)["gflops_per_image"]
    )


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_scan_gives_the_loop_s_output_for_the_same_weights(pos_embed):
    config = tiny_config(pos_embed)
    loop = build_model(config)
    params = random_params(loop, config)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), params.pop("block_0"), params.pop("block_1"))
    scanned = loop.clone(scan=True, remat=True)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    coords = patches.random_patches(jax.random.key(1), x, 8)[1]
    expect = apply(loop, {**params, "block_0": jax.tree.map(lambda a: a[0], stacked),
                          "block_1": jax.tree.map(lambda a: a[1], stacked)},
                   x[:, :8, :8], jnp.zeros(2), coords=coords)  # fmt: skip
    got = apply(scanned, {**params, "blocks": stacked}, x[:, :8, :8], jnp.zeros(2), coords=coords)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_gradients_are_finite_in_bfloat16_with_remat_and_scan():
    config = tiny_config("rope", dtype="bfloat16", remat=True, scan=True)
    model = build_model(config)
    params = random_params(model, config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert params["blocks"]["qkv"]["kernel"].shape == (2, 32, 96)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    def loss(p):
        out = apply(model, p, x, jnp.array([0.5, -1.0]), labels=jnp.array([1, 3]))
        assert out.dtype == jnp.bfloat16
        return jnp.mean(out.astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(g.dtype == jnp.float32 for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_refuses_the_u_nets_conv_seam():
    with pytest.raises(ValueError, match="DiT takes no build options, got conv3x3"):
        build_model(tiny_config(), conv3x3=nn.Conv)


def test_a_few_patch_training_steps_through_the_trainer(tmp_path):
    config = tiny_config(use_coords=True)
    config.data.source, config.data.path = "npz", str(make_data(tmp_path / "d.npz"))
    config.data.threads = 2
    # Crops only (8x8 of 16x16, one compiled step): the positions come from their coordinates.
    config.diffusion.patch_scales, config.diffusion.patch_probs = (0.5,), (1.0,)
    config.train.batch_size, config.train.total_steps = 8, 3
    config.train.log_every, config.train.checkpoint_every, config.train.sample_every = 3, 0, 0
    config.train.grad_noise_scale = False
    config.eval.sample_quality = False
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 3
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [line["step"] for line in lines] == [3] and np.isfinite(lines[0]["loss"])
    moved = jax.tree.map(lambda p: bool(jnp.any(p != 0)), result["state"].params["final"])
    assert all(jax.tree.leaves(moved))  # the zero-initialised output layer has trained

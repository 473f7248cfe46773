import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from conftest import random_params, tiny_config
from ml_collections_configs import base
from patchdiff import config as config_lib
from patchdiff.diffusion import patches, precond
from patchdiff.models import build_model, cost, dummy_inputs, init_params, partitioning
from patchdiff.models.layers import Dropout


def built(config, seed=0):
    """The model and random (all non-zero) parameters: zero-initialised output layers would
    block gradients and hide the network's output."""
    config_lib.validate(config)
    model = build_model(config)
    return model, random_params(model, config, seed)


@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize("conditioned", [False, True])
def test_output_shape(resolution, patch_size, conditioned):
    config = tiny_config(
        resolution, patch_size, use_coords=conditioned, num_classes=10 if conditioned else 0
    )
    model, params = built(config)
    x, c_noise, kwargs = dummy_inputs(config, batch=2)
    assert set(kwargs) == ({"labels", "coords"} if conditioned else set())
    out = jax.jit(model.apply)({"params": params}, x + 1.0, c_noise, **kwargs)
    assert out.shape == (2, resolution, resolution, 3)
    assert out.dtype == jnp.float32


def test_a_crop_runs_with_its_coordinates():
    config = tiny_config(16, 2, use_coords=True)
    model, params = built(config)
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    crops, coords = patches.random_patches(jax.random.key(1), images, 8)
    out = jax.jit(model.apply)({"params": params}, crops, jnp.zeros(3), coords=coords)
    assert out.shape == (3, 8, 8, 3)


def test_stem_patch_size_two_costs_about_a_quarter():
    config = tiny_config(32, 1)
    config.model.channels = 32
    config.model.head_dim = 32
    flops = {}
    for p in (1, 2):
        variant = config_lib.with_patch_size(config, p)
        flops[p] = cost.model_cost(variant)["gflops_per_image"]
    ratio = flops[2] / flops[1]
    assert abs(ratio - 0.25) <= 0.35 * 0.25, ratio


def test_gradients_reach_every_parameter():
    config = tiny_config(16, 2, use_coords=True, num_classes=4, dropout=0.1)
    model, params = built(config)
    x, _, kwargs = dummy_inputs(config, batch=2)
    x = jax.random.normal(jax.random.key(2), x.shape)
    kwargs["labels"] = jnp.array([1, 4])  # a class and the null label

    def loss(p):
        out = model.apply(
            {"params": p},
            x,
            jnp.array([0.3, -0.5]),
            train=True,
            rngs={"dropout": jax.random.key(3)},
            **kwargs,
        )
        return jnp.mean(out**2)

    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)]
    # Only label rows that this batch did not use get no gradient.
    assert dead == [], dead


def test_edm_denoiser_returns_x_as_sigma_goes_to_zero():
    config = tiny_config(16, 1)
    model, params = built(config)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    net = jax.jit(lambda x_in, c_noise: model.apply({"params": params}, x_in, c_noise))

    errors = []
    for sigma in (1e-1, 1e-2, 1e-3, 1e-4):
        d = precond.denoise(net, precond.EDM(), x, jnp.full((2,), sigma))
        errors.append(float(jnp.max(jnp.abs(d - x))))
    assert errors[-1] < 1e-3
    assert errors == sorted(errors, reverse=True)
    # and the network's output is not itself zero, so the limit is the preconditioning's doing
    assert float(jnp.abs(net(x, jnp.zeros(2))).max()) > 1e-2


def test_null_label_is_the_default():
    config = tiny_config(16, 1, num_classes=3)
    model, params = built(config)
    x, c_noise, _ = dummy_inputs(config, batch=2)
    apply = jax.jit(model.apply)
    none = apply({"params": params}, x, c_noise)
    null = apply({"params": params}, x, c_noise, labels=jnp.array([3, 3]))
    other = apply({"params": params}, x, c_noise, labels=jnp.array([0, 1]))
    np.testing.assert_allclose(none, null)
    assert not np.allclose(none, other)


def test_wrong_conditioning_is_refused():
    config = tiny_config(16, 1, use_coords=False, num_classes=0)
    model, params = built(config)
    x, c_noise, _ = dummy_inputs(config)
    with pytest.raises(ValueError, match="num_classes = 0"):
        model.apply({"params": params}, x, c_noise, labels=jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="use_coords = False"):
        model.apply({"params": params}, x, c_noise, coords=jnp.zeros((1, 16, 16, 2)))


def test_conv_seam_builds_every_residual_conv():
    built_names = []

    def factory(features, name, dtype=jnp.float32, init=None):
        built_names.append(name)
        return nn.Conv(features, (1, 1), dtype=dtype, name=name)

    config = tiny_config(16, 1)
    model = build_model(config, conv3x3=factory)
    params = random_params(model, config)
    # 2 levels: encoder 1 + down + 1, middle 2, decoder 2 + up + 2 = 10 blocks, 2 convs each
    assert len(built_names) == 2 * 10
    first = params["ResBlock_0"]["conv0"]["kernel"]
    assert first.shape[:2] == (1, 1)


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_init_gives_float32_params_and_near_zero_output_layers(arch):
    config = tiny_config(16, 2, dtype="bfloat16", arch=arch)
    model = build_model(config)
    params = init_params(model, jax.random.key(0), config)
    # The output conv, each block's last conv and each attention projection start at zero (ADM's
    # zero_module) or at Xavier x 1e-5 (EDM's DDPM++); the other layers at Xavier.
    ends = [params["conv_out"], params["ResBlock_0"]["conv1"], params["AttentionBlock_0"]["proj"]]
    for layer in ends:
        kernel = np.asarray(layer["kernel"])
        fan_avg = (np.prod(kernel.shape[:-1]) + np.prod(kernel.shape[:-2]) * kernel.shape[-1]) / 2
        limit = 1e-5 * np.sqrt(3 / fan_avg) if arch == "ddpmpp" else 0.0
        assert np.abs(kernel).max() <= limit
        assert (np.abs(kernel).max() > limit / 2) == (arch == "ddpmpp")
    assert np.abs(np.asarray(params["ResBlock_0"]["conv0"]["kernel"])).max() > 1e-2
    x, c_noise, kwargs = dummy_inputs(config)
    assert jax.jit(model.apply)({"params": params}, x, c_noise, **kwargs).dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_parameters_carry_logical_axes_and_shard_on_a_mesh(devices):
    config = tiny_config(16, 1)
    model = build_model(config)
    x, c_noise, kwargs = dummy_inputs(config, batch=8)
    specs = partitioning.logical_specs(model, jax.random.key(0), x, c_noise, **kwargs)
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
    )[0]
    names = {name for _, spec in flat for name in spec if name}
    assert {"conv_in", "conv_out", "embed", "mlp", "heads", "norm"} <= names
    assert all(isinstance(spec, PartitionSpec) and len(spec) for _, spec in flat)

    mesh = Mesh(np.array(devices), ("data",))
    shardings = partitioning.mesh_shardings(specs, mesh)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
    params = random_params(model, config)
    x = jax.random.normal(jax.random.key(1), x.shape)
    expect = jax.jit(model.apply)({"params": params}, x, c_noise, **kwargs)
    batch = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.jit(
        lambda p, x, c, k: model.apply({"params": p}, x, c, **k),
        in_shardings=(shardings["params"], batch, batch, batch),
        out_shardings=batch,
    )(params, x, c_noise, kwargs)
    np.testing.assert_allclose(sharded, expect, rtol=1e-5, atol=1e-5)


def test_unknown_model_name():
    config = tiny_config()
    config.model.name = "vit"
    with pytest.raises(ValueError, match="config.model.name = 'vit' is not a known model"):
        build_model(config)


@pytest.mark.parametrize(
    "num_classes, count",
    # NVlabs/edm's EDMPrecond(model_type="SongUNet") with the CIFAR-10 DDPM++ settings
    # (model_channels 128, channel_mult [2, 2, 2], positional embedding, resample_filter [1, 1],
    # no augmentation labels), counted in PyTorch: label_dim 0 and label_dim 10.
    [(0, 55_732_739), (10, 55_734_147)],
)
def test_cifar10_ddpmpp_is_edms_ddpmpp(num_classes, count):
    config = base.get_config()
    config.model.use_coords = False
    config.model.num_classes = num_classes
    config_lib.validate(config)
    model = build_model(config)
    x, c_noise, kwargs = dummy_inputs(config)
    params = jax.eval_shape(
        lambda k: nn.meta.unbox(model.init(k, x, c_noise, **kwargs)["params"]), jax.random.key(0)
    )
    assert cost.count_params(params) == count
    # torch's flop counter gives edm 42,383,048,704 forward FLOPs per image: the same convolutions
    # and matrix products, plus 2.6 MFLOPs of its [1, 1] resampling filters run as convolutions
    # (mean pooling and repetition here).
    flops = cost.matmul_flops(lambda p: model.apply({"params": p}, x, c_noise, **kwargs), params)
    assert flops == 42_380_427_264 + 2 * num_classes * 128  # the one-hot label's Dense


def test_a_config_arch_that_is_not_known_is_named():
    config = tiny_config(16, 1)
    config.model.arch = "ncsnpp"
    with pytest.raises(config_lib.ConfigError, match="model.arch"):
        config_lib.validate(config)


def test_a_checkpoint_from_before_the_arch_field_is_refused_by_name():
    from patchdiff.train.checkpoint import CheckpointError, check_compatible

    config = tiny_config(16, 1)
    saved = json.loads(config.to_json_best_effort())
    del saved["model"]["arch"]  # written before U-Nets had an arch
    with pytest.raises(CheckpointError, match=r"config.model.arch = None, but this config has"):
        check_compatible(saved, config, "runs/old")


@pytest.mark.parametrize("rate", [0.13, 0.5])
def test_dropout_drops_at_its_rate_and_keeps_the_mean(rate):
    x = jnp.ones((64, 4096))
    y = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7)})
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / x.size)
    np.testing.assert_allclose(np.asarray(y[y != 0]), 1 / (1 - rate), rtol=1e-6)
    again = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(8)})
    assert not np.array_equal(np.asarray(y), np.asarray(again))  # the key decides the mask
    assert Dropout(rate).apply({}, x, deterministic=True) is x
    assert Dropout(0.0).apply({}, x, deterministic=False) is x

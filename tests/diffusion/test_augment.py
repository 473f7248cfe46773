"""EDM's augmentation pipeline (patchdiff/diffusion/augment.py): label layout, exact flips and
shifts, identity at zero parameters, colour, determinism, and its wiring into the U-Net and the
train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import random_params, tiny_config
from ml_collections_configs import base, cifar10_ddpmpp
from patchdiff import config as config_lib
from patchdiff.diffusion import augment
from patchdiff.models import build_model, cost, dummy_inputs, init_params

GEOMETRIC_CIFAR = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def settings(p=1.0, **multipliers):
    """config.augment with every multiplier 0 but those given."""
    cfg = ml_collections.ConfigDict({name: 0.0 for name in augment.LABEL_WIDTHS})
    cfg.p = p
    cfg.update({name: float(value) for name, value in multipliers.items()})
    return cfg


def run(key, x, cfg):
    """augment.augment jitted: one compiled program rather than op-by-op dispatch (faster)."""
    return jax.jit(lambda key, x: augment.augment(key, x, cfg))(key, x)


apply = jax.jit(augment.apply)


def images(batch=4, size=16, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, (batch, size, size, channels)), jnp.float32)


def test_p_zero_returns_the_images_unchanged_with_zero_labels():
    x = images()
    out, labels = run(jax.random.key(0), x, settings(0.0, **GEOMETRIC_CIFAR))
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(labels, np.zeros((4, 9)))


def test_xflip_alone_flips_exactly_and_the_label_says_which():
    x = images(batch=16)
    out, labels = run(jax.random.key(1), x, settings(1.0, xflip=1))
    flipped = labels[:, 0] == 1
    assert labels.shape == (16, 1) and set(np.unique(labels)) == {0.0, 1.0}
    np.testing.assert_array_equal(out[flipped], x[flipped][:, :, ::-1])
    np.testing.assert_array_equal(out[~flipped], x[~flipped])


@pytest.mark.parametrize("name", list(augment.LABEL_WIDTHS))
def test_each_transform_adds_its_label_columns(name):
    cfg = settings(0.5, **{name: 1})
    assert augment.label_dim(cfg) == augment.LABEL_WIDTHS[name]
    params = augment.sample(jax.random.key(2), 5, cfg)
    assert list(params) == [name]
    assert augment.labels(params).shape == (5, augment.LABEL_WIDTHS[name])


def test_label_layout_follows_edm():
    assert augment.label_dim(settings(**GEOMETRIC_CIFAR)) == 9  # EDM's augment_dim for CIFAR-10
    assert augment.label_dim(settings(**dict.fromkeys(augment.LABEL_WIDTHS, 1))) == 15
    # Angles go in as (cos w - 1, sin w): zero for no rotation, on the unit circle around (-1, 0).
    _, labels = run(jax.random.key(3), images(), settings(1.0, rotate_frac=1))
    np.testing.assert_allclose((labels[:, 0] + 1) ** 2 + labels[:, 1] ** 2, 1, atol=1e-6)
    # Columns in EDM's order: xflip, yflip, scale, rotation (2), aniso (2), translation (2).
    params = {
        "xflip": jnp.ones((1, 1)),
        "yflip": jnp.zeros((1, 1)),
        "scale": jnp.full((1, 1), 0.3),
        "rotate_frac": jnp.full((1, 1), np.pi / 2),
        "aniso": jnp.array([[2.0, np.pi]]),
        "translate_frac": jnp.array([[0.5, -1.0]]),
    }
    np.testing.assert_allclose(
        augment.labels(params)[0], [1, 0, 0.3, -1, 1, -2, 0, 0.5, -1], atol=1e-6
    )


def test_sym6_is_an_orthonormal_low_pass_filter():
    h = augment.SYM6.astype(np.float64)
    np.testing.assert_allclose(h.sum(), np.sqrt(2), atol=1e-7)
    shifts = [h[: len(h) - 2 * m] @ h[2 * m :] for m in range(len(h) // 2)]
    np.testing.assert_allclose(shifts, np.eye(1, len(h) // 2)[0], atol=1e-7)


def test_an_identity_affine_reproduces_the_image():
    x = images(size=16)
    eye = jnp.broadcast_to(jnp.eye(3), (4, 3, 3))
    np.testing.assert_allclose(jax.jit(augment.resample)(x, eye), x, atol=2e-6)


def test_large_batches_are_resampled_in_chunks_with_the_same_result(monkeypatch):
    x = images(batch=5)
    g = augment.geometric_matrix(
        augment.sample(jax.random.key(9), 5, settings(1.0, **GEOMETRIC_CIFAR)), 16, 16
    )
    whole = jax.jit(augment.resample)(x, g)
    monkeypatch.setattr(augment, "RESAMPLE_CHUNK_BYTES", 2 * 4 * 3 * (2 * 46) ** 2)  # 2 images
    np.testing.assert_allclose(jax.jit(augment.resample)(x, g), whole, atol=1e-6)


def test_translations_move_content_as_labelled():
    size = 16
    x = images(batch=2, size=size)
    # Labels (1, -0.5) and (0.5, 1): 0.125 of 16 pixels each, right/down for positive labels.
    params = {"translate_frac": jnp.array([[1.0, -0.5], [0.5, 1.0]])}
    np.testing.assert_array_equal(augment.labels(params), params["translate_frac"])
    out = apply(x, params)
    pad = size - 1
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    for b, (dx, dy) in enumerate([(2, -1), (1, 2)]):
        shifted = padded[b, pad - dy : pad - dy + size, pad - dx : pad - dx + size]
        np.testing.assert_allclose(out[b], shifted, atol=2e-6)


def test_zero_parameters_are_the_identity_for_every_transform():
    # Zero labels at sampling must mean "not augmented", or the augmentations leak into samples.
    cfg = settings(1.0, **dict.fromkeys(augment.LABEL_WIDTHS, 1))
    params = jax.tree.map(jnp.zeros_like, augment.sample(jax.random.key(4), 4, cfg))
    params["aniso"] = params["aniso"].at[:, 1].set(1.0)  # any axis: no stretch along it
    np.testing.assert_array_equal(augment.labels(params), 0)
    x = images()
    np.testing.assert_allclose(apply(x, params), x, atol=3e-6)


def test_the_same_parameters_give_the_same_transform():
    cfg = settings(1.0, **dict.fromkeys(augment.LABEL_WIDTHS, 1))
    x = images(size=16)
    jitted = jax.jit(lambda key, x: augment.augment(key, x, cfg))
    out, labels = jitted(jax.random.key(5), x)
    params = augment.sample(jax.random.key(5), 4, cfg)
    np.testing.assert_allclose(augment.labels(params), labels, atol=1e-6)
    once, twice = apply(x, params), apply(x, params)
    np.testing.assert_array_equal(once, twice)
    np.testing.assert_allclose(once, out, rtol=1e-4, atol=1e-4)  # jitted or not: rounding
    again, _ = jitted(jax.random.key(5), x)  # deterministic for a key, not for another
    np.testing.assert_array_equal(again, out)
    assert not np.allclose(jitted(jax.random.key(6), x)[0], out)


def test_aniso_labels_do_not_tell_stretch_from_squeeze():
    # EDM's layout (w cos r, w sin r) gives (w, r) and (-w, r + pi) the same labels, but the
    # first stretches along the axis at r and the second squeezes along it.
    a = {"aniso": jnp.array([[1.5, 0.3]])}
    b = {"aniso": jnp.array([[-1.5, 0.3 + np.pi]])}
    np.testing.assert_allclose(augment.labels(a), augment.labels(b), atol=1e-6)
    x = images(batch=1)
    assert np.abs(apply(x, a) - apply(x, b)).max() > 0.1


def test_colour_transforms_move_the_mean_as_labelled():
    x = images(batch=8)
    luma = lambda y: y.mean(axis=-1)  # noqa: E731  per-pixel mean over RGB
    out, _ = run(jax.random.key(7), x, settings(0.0, brightness=1, hue=1))
    np.testing.assert_array_equal(out, x)
    # Brightness adds 0.2 x its label to every channel.
    out, labels = run(jax.random.key(7), x, settings(1.0, brightness=1))
    shift = (out - x).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(shift, 0.2 * labels[:, 0], atol=1e-5)
    assert np.abs(shift).min() > 1e-3
    # Hue rotates and saturation scales about the luma axis: each pixel keeps its RGB mean.
    out, labels = run(jax.random.key(8), x, settings(1.0, hue=1, saturation=1))
    assert np.abs(labels).min() > 0 and np.abs(out - x).max() > 0.05
    np.testing.assert_allclose(luma(out), luma(x), atol=1e-5)
    # Grey images take the mean of the RGB rows.
    grey = images(batch=8, channels=1)
    out, labels = run(jax.random.key(7), grey, settings(1.0, brightness=1))
    shift = np.broadcast_to(0.2 * labels[:, 0, None, None, None], grey.shape)
    np.testing.assert_allclose(out - grey, shift, atol=1e-5)


def small_unet(augment_dim, arch="ddpmpp", use_coords=False):
    """One level, no attention, 8x8: the embedding is what these tests look at."""
    config = tiny_config(8, arch=arch, channel_mult=(1,), attn_resolutions=())
    config.model.update(use_coords=use_coords, augment_dim=augment_dim)
    return config, build_model(config)


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_the_unet_takes_augment_labels(arch):
    config, model = small_unet(9, arch)
    kernel = init_params(model, jax.random.key(0), config)["augment_embed"]["kernel"]
    assert kernel.shape == (9, config.model.channels)
    assert (np.abs(kernel).max() > 0) == (arch == "ddpmpp")  # EDM: Xavier (SongUNet), 0 (ADM)
    params = random_params(model, config)  # nothing zero: the labels reach the output
    assert list(params["augment_embed"]) == ["kernel"]  # bias-free, as EDM's map_augment
    x, c_noise = images(batch=2, size=8), jnp.array([0.1, -0.3])

    @jax.jit
    def outputs(labels):
        def net(**kwargs):
            return model.apply({"params": params}, x, c_noise, **kwargs)

        return net(), net(augment_labels=jnp.zeros_like(labels)), net(augment_labels=labels)

    none, zeros, ones = outputs(jnp.ones((2, 9)))
    np.testing.assert_array_equal(zeros, none)  # None = zero labels = sampling
    assert np.abs(ones - none).max() > 1e-3


def test_a_unet_without_augment_dim_refuses_augment_labels():
    config, model = small_unet(0)
    x, c_noise, kwargs = dummy_inputs(config)
    assert "augment_labels" not in kwargs
    with pytest.raises(ValueError, match="augment_dim = 0"):
        jax.eval_shape(
            lambda k: model.init(k, x, c_noise, augment_labels=jnp.zeros((1, 9))),
            jax.random.key(0),
        )


def test_cifar10_ddpmpp_counts_edms_parameters_with_augment_labels():
    # NVlabs/edm's SongUNet with train.py's CIFAR-10 settings has map_augment =
    # Linear(augment_dim=9, 128, bias=False): 55,732,739 (its count without, tests/models/
    # test_unet.py) + 9 x 128.
    config = cifar10_ddpmpp.get_config()
    config_lib.validate(config)
    model = build_model(config)
    x, c_noise, kwargs = dummy_inputs(config)
    assert kwargs["augment_labels"].shape == (1, 9)
    params = jax.eval_shape(
        lambda k: nn.meta.unbox(model.init(k, x, c_noise, **kwargs)["params"]), jax.random.key(0)
    )
    assert cost.count_params(params) == 55_732_739 + 9 * 128


def test_validate_names_the_field():
    config = base.get_config()
    config.augment.p = 1.5
    with pytest.raises(config_lib.ConfigError, match=r"config\.augment\.p = 1\.5"):
        augment.validate(config)
    config.augment.p = 0.12
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.augment_dim = 0 .* be 9"):
        augment.validate(config)
    config.model.augment_dim = 9
    augment.validate(config)
    config.augment.yflip = -1.0
    with pytest.raises(config_lib.ConfigError, match=r"config\.augment\.yflip"):
        augment.validate(config)
    config.augment.yflip, config.augment.hue = 1.0, 1.0
    config.model.augment_dim, config.data.channels = 11, 4
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.channels = 4"):
        augment.validate(config)


def test_one_train_step_with_augmentation():
    from patchdiff.train.loop import make_mesh
    from patchdiff.train.optim import build_optimizer
    from patchdiff.train.state import create_state, state_shardings
    from patchdiff.train.step import make_train_step

    config, model = small_unet(9, use_coords=True)  # crops' coordinates, cut after augmenting
    config.augment.p = 0.5
    config_lib.validate(config)
    mesh, rules = make_mesh(config)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    optimizer = build_optimizer(config.train)
    shardings, _ = state_shardings(model, optimizer, config, mesh, rules)
    params = random_params(model, config)
    state = jax.device_put(create_state(model, optimizer, config, params), shardings)
    step = make_train_step(model, optimizer, config, shardings, batch_sharding)
    batch = {"image": images(batch=8, size=8), "label": jnp.zeros((8,), jnp.int32)}
    state, metrics = step(state, jax.device_put(batch, batch_sharding), 4)  # augment, then crop
    assert int(state.step) == 1 and int(state.bad_step) == -1
    assert np.isfinite(float(metrics["loss"]))


def test_a_checkpoint_is_refused_under_another_augment_dim():
    import json

    from patchdiff.train.checkpoint import CheckpointError, check_compatible

    saved = json.loads(base.get_config().to_json_best_effort())
    del saved["model"]["augment_dim"]  # written before the field existed: no labels
    config = base.get_config()
    check_compatible(saved, config, "runs/old")
    config.model.augment_dim = 9
    with pytest.raises(CheckpointError, match=r"config\.model\.augment_dim = 0"):
        check_compatible(saved, config, "runs/old")


def test_the_training_keys_are_unchanged_without_augmentation():
    # training_inputs splits the step's key in five, the fifth for the augmentation: the first
    # four must be what split(key, 4) gave before, so runs without it draw the same crops,
    # dropout, labels and noise.
    key = jax.random.key(11)
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.split(key, 5)[:4]),
        jax.random.key_data(jax.random.split(key, 4)),
    )

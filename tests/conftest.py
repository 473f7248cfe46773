"""Test set-up: 8 fake CPU devices for sharding tests, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ml_collections_configs import base  # noqa: E402


def tiny_config(resolution=16, patch_size=1, **model):
    """A small U-Net (2 levels, 16 channels, attention at the second level) for fast tests."""
    config = base.get_config()
    config.data.resolution = resolution
    config.model.channels = 16
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.head_dim = 16
    config.model.attn_resolutions = (resolution // (2 * patch_size),)
    config.model.patch_size = patch_size
    config.model.dropout = 0.0
    config.diffusion.patch_scales = (1.0, 0.5)
    config.diffusion.patch_probs = (0.5, 0.5)
    for name, value in model.items():
        setattr(config.model, name, value)
    return config


def random_params(model, config, seed=0):
    """Parameters of the right shapes filled from numpy (std 1/sqrt(fan-in)), with no jitted init.

    XLA:CPU takes seconds to compile a model's threefry initialisers; tests that need some
    parameters, not the initial ones, use these. Nothing is zero, so every path carries signal.
    """
    from patchdiff.models import dummy_inputs

    x, c_noise, kwargs = dummy_inputs(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, c_noise, **kwargs)["params"]
    shapes = nn.meta.unbox(shapes)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree.map(fill, shapes)


@pytest.fixture(scope="session")
def devices():
    return jax.devices()

"""Test set-up: 8 fake CPU devices for sharding tests, set before anything imports jax."""

import os
import tempfile

# XLA_FLAGS: 8 fake CPU devices; and LLVM's optimiser off (backend optimisation level 0), since
# the tests' programs are tiny and compiling them dominates the suite: a tiny U-Net's train step
# compiles in 12 s instead of 21 s on a 2-core CPU. Results are the same IEEE arithmetic; every
# comparison in the tests is between programs compiled alike, or within a tolerance.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the test run's workers and the subprocesses they start
# (the resume tests run the same training command three times): XLA:CPU takes 10-25 s to
# compile a tiny U-Net's train step, and a hit loads it in well under a second. Entries are keyed
# by the program, the compile options and the jax version, so a stale entry is never used.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"patchdiff-tests-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

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
    # The noise scale's two half-batch gradients compile the network twice; tests/train and
    # tests/metrics train with it on, the other trainings here need not pay for it.
    config.train.grad_noise_scale = False
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

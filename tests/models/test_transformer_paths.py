"""DiT and HDiT along the paths the U-Net takes: every parameterisation's denoiser, guided
sampling with a one-step and a multistep sampler, and CLI training on 8 fake devices with a
model axis (checkpoint, kill, bitwise resume, EMA, `--mode sample`).

Tiny models on 16x16 images with 2x2 patches and 3 classes (DiT: two blocks of width 32; HDiT:
two levels of one layer, widths 32 and 64), their layers under nn.scan as the configs train them;
random parameters where a path needs a network whose output is not the zero of initialisation
(guidance would change nothing).
"""

import functools
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from ml_collections_configs import base
from patchdiff import config as config_lib
from patchdiff import sampling, train
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.precond import PRECONDITIONINGS, denoise
from patchdiff.models import build_model
from patchdiff.train.loop import make_mesh, restore_latest
from patchdiff.train.optim import build_optimizer
from patchdiff.train.state import state_shardings

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "train"))
import tiny_config as train_config  # noqa: E402  (tests/train's CLI config)
from test_train import make_data, start_cli  # noqa: E402

MODEL_NAMES = ("dit", "hdit")
# The tiny models as --config overrides, so that the CLI runs and the in-process configs agree.
TINY = {
    "dit": {
        "model.name": "dit",
        "model.patch_size": 2,
        "model.dit.depth": 2,
        "model.dit.width": 32,
        "model.dit.heads": 2,
    },
    "hdit": {
        "model.name": "hdit",
        "model.patch_size": 2,
        "model.use_coords": True,
        "model.channel_mult": (1, 1),
        "model.attn_resolutions": (),
        "model.hdit.widths": (32, 64),
        "model.hdit.depths": (1, 1),
        "model.hdit.head_dim": 16,
        "model.hdit.neighborhood_kernel": 3,
        "model.hdit.mapping_width": 32,
    },
}


# A 4 x 2 mesh of the 8 fake devices; the noise scale's extra half-batch gradients are left out
# (they compile the network twice more; tests/train covers them).
MESH_FIELDS = {"mesh.model": 2, "train.grad_noise_scale": False}


def tiny_config(name, parameterisation="edm"):
    """A class-conditional two-layer `name` on 16x16x3 images (the fields of TINY)."""
    config = base.get_config()
    config.data.resolution = 16
    config.model.num_classes = 3
    config.diffusion.parameterisation = parameterisation
    set_fields(config, TINY[name])
    return config_lib.validate(config)


def some_params(model, config):
    """Random parameters (conftest.random_params), HDiT's attention scales positive: a head's
    logit scale is sqrt(scale)^2 (cosine-similarity attention), as at its init of 10."""
    params = random_params(model, config)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.abs(p) if path[-1].key == "scale" else p, params
    )


def set_fields(config, fields):
    """Sets dotted fields ("model.dit.depth": 2) of `config`."""
    for key, value in fields.items():
        *groups, field = key.split(".")
        owner = config
        for group in groups:
            owner = owner[group]
        setattr(owner, field, value)


def overrides(name):
    """TINY[name] and the model-parallel mesh as --config flags."""
    fields = {**TINY[name], **MESH_FIELDS}
    return [f"--config.{k}={str(v).replace(' ', '')}" for k, v in fields.items()]


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, x_in, c_noise, labels):
    """F jitted once per distinct model (DiT's noise_scale depends on the parameterisation,
    HDiT is the same network under all five)."""
    return model.apply({"params": params}, x_in, c_noise, labels=labels)


def denoiser(model, params, precond, labels):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, labels) (precond.denoise)."""
    net = functools.partial(apply, model, params)
    return lambda x, sigma, labels=labels: denoise(net, precond, x, sigma, labels=labels)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameterisation_gives_a_finite_denoiser(name):
    sigma = jnp.array([0.01, 1.0, 50.0])  # VP's trained levels span 0.01 .. 157
    x0 = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
    x = x0 + sigma[:, None, None, None] * jax.random.normal(jax.random.key(1), x0.shape)
    labels = jnp.array([0, 1, 3])  # 3: the null class
    params = None
    for parameterisation in PRECONDITIONINGS.names():
        config = tiny_config(name, parameterisation)
        model = build_model(config)
        params = some_params(model, config) if params is None else params  # same shapes
        precond = diffusion_build.build_precond(config.diffusion)
        out = denoiser(model, params, precond, labels)(x, sigma)
        assert out.shape == x.shape and out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out))), parameterisation
        # the network's part is there: D is not c_skip x alone
        c_skip = precond.scalings(sigma)[0][:, None, None, None]
        assert not np.allclose(out, c_skip * x), parameterisation


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_guided_sampling_with_two_samplers(name):
    """Classifier-free guidance (sampling.classifier_free_guidance, the generator's) with Heun
    (EDM's sampler) and DPM-Solver++(2M) (multistep): finite, and scale 2 is not scale 1. The
    scale is traced, so that one program serves both (a Python 1 would skip the unconditional
    half)."""
    config = tiny_config(name)
    model = build_model(config)
    params = some_params(model, config)
    precond = diffusion_build.build_precond(config.diffusion)
    sigmas = sampling.get_sigmas_karras(3, config.diffusion.sigma_min, config.diffusion.sigma_max)
    labels = jnp.array([0, 2])
    x = sigmas[0] * jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    def run(sampler, params, x, scale):
        cond = denoiser(model, params, precond, labels)
        guided = sampling.classifier_free_guidance(cond, labels, jnp.full_like(labels, 3), scale)
        return sampling.sample(sampler, guided, x, sigmas, key=jax.random.key(1))

    for sampler in ("heun", "dpmpp_2m"):
        sample = jax.jit(functools.partial(run, sampler))
        guided, conditional = sample(params, x, 2.0), sample(params, x, 1.0)
        assert guided.shape == x.shape, sampler
        assert bool(jnp.all(jnp.isfinite(guided)) & jnp.all(jnp.isfinite(conditional))), sampler
        assert float(jnp.max(jnp.abs(guided - conditional))) > 1e-2, sampler


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_parallel_rules_split_the_wide_axes_evenly(name):
    """On the 4 x 2 mesh, loop.MODEL_PARALLEL_RULES shard some of the network's axes over
    "model" (attention heads, MLP hidden units), each into equal halves; the scanned layer axis
    stays whole. Abstract: nothing is compiled or allocated."""
    config = tiny_config(name)
    set_fields(config, MESH_FIELDS)
    mesh, rules = make_mesh(config)
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    model = build_model(config)
    shardings, abstract = state_shardings(model, build_optimizer(config.train), config, mesh, rules)
    split = []
    for (path, sharding), leaf in zip(
        jax.tree_util.tree_flatten_with_path(shardings.params)[0],
        jax.tree.leaves(abstract.params),
        strict=True,
    ):
        for axis, (size, names) in enumerate(zip(leaf.shape, sharding.spec, strict=False)):
            if names is not None:
                assert names == "model" and size % 2 == 0, (jax.tree_util.keystr(path), axis)
                split.append(jax.tree_util.keystr(path))
        if "blocks" in jax.tree_util.keystr(path) or "layers" in jax.tree_util.keystr(path):
            assert sharding.spec[0] is None  # nn.scan's leading [depth] axis
    assert any("qkv" in path for path in split) and len(split) >= 4


def checkpoints(run):
    return sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())


def train_cli(run, data, name, steps, kill_after=None):
    """Trains the tiny `name` through patchdiff.main on 8 fake devices as a 4 x 2 (data x model)
    mesh; with `kill_after`, SIGKILLs it once that step's checkpoint is saved."""
    process = start_cli(
        run, data, *overrides(name), f"--config.train.total_steps={steps}", devices=8
    )
    if kill_after is None:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
        return
    target, deadline = run / "checkpoints" / str(kill_after), time.time() + 300
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed: {out}"


# DiT only, to keep this file near 60 s: HDiT's run of this test passes too (52 s on its own on
# the 2-core CI CPU with a cold compilation cache); its sharding is checked above.
@pytest.mark.parametrize("name", ["dit"])
def test_model_parallel_cli_run_is_killed_resumes_bitwise_and_samples(name, tmp_path):
    """patchdiff.main trains on a 4 x 2 mesh, is SIGKILLed after checkpoint 2 and resumed to
    step 4; the same 4 steps in one go (in this process, which has the same 8 fake devices and
    finds the train step in the compilation cache) end bitwise where it ends."""
    data = make_data(tmp_path / "d.npz")
    killed = tmp_path / "killed"
    train_cli(killed, data, name, 4, kill_after=2)
    assert 2 in checkpoints(killed) and 4 not in checkpoints(killed)
    train_cli(killed, data, name, 4)  # resumes from the newest whole checkpoint

    config = train_config.get_config()
    set_fields(config, {**TINY[name], **MESH_FIELDS, "data.path": str(data)})
    config.train.total_steps = 4
    straight = train.train_and_evaluate(config, tmp_path / "straight")["state"]
    _, state, meta = restore_latest(config, killed)
    assert meta["step"] == int(straight.step) == 4
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The model axis is used: the wide axes are split over it (loop.MODEL_PARALLEL_RULES), and
    # the EMA follows its parameters.
    shardings = jax.tree.map(lambda p: p.sharding, state.params)
    assert any("model" in s.spec for s in jax.tree.leaves(shardings))
    assert jax.tree.map(lambda p: p.sharding, state.ema) == shardings
    # The EMA is there, finite, and trails the parameters.
    ema, params = jax.tree.leaves(state.ema), jax.tree.leaves(state.params)
    assert all(bool(jnp.all(jnp.isfinite(e))) for e in ema)
    assert any(not np.array_equal(e, p) for e, p in zip(ema, params, strict=True))

    # --mode sample (train.sample) from the resumed run's EMA, guided, on the same mesh.
    config.sample.sampler, config.sample.guidance_scale = "dpmpp_2m", 2.0
    config.sample.steps, config.sample.num_images, config.sample.batch_size = 3, 3, 3
    folder = train.sample(config, killed)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(3)]
    with np.load(folder / "images.npz") as saved:
        assert saved["images"].shape == (3, 16, 16, 3) and list(saved["labels"]) == [0, 1, 2]

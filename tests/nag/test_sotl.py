"""SoTL-E: the batched training of many kernel graphs (vmapped, or mapped in one program) gives
the scores and loss curves of training each `canvas_jax.replace` model alone; its pieces (the
distillation target, LoRA, the parameter split) and its errors.

Glossary: M candidates, S steps, E last steps, P pool images, R resolution, C channels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import canvas_jax
from canvas_jax.graph import KernelGraph, Space
from conftest import random_params, tiny_config
from nag import sotl
from patchdiff.config import ConfigError
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.losses import denoising_loss
from patchdiff.models import build_model
from patchdiff.train.step import make_loss_fn

# A few primitives keep the template (every primitive compiled at every node) quick to compile.
SPACE = Space(ops=("fc", "dwconv3", "relu", "scale", "shift_h+1", "add"), max_nodes=5)
GRAPHS = [
    KernelGraph(("input", "dwconv3", "relu", "fc"), ((), (0,), (1,), (2,))),
    KernelGraph(("input", "fc", "shift_h+1", "add"), ((), (0,), (1,), (2, 0))),
    KernelGraph(("input", "scale", "dwconv3", "relu", "add"), ((), (0,), (1,), (2,), (3, 1))),
]


def sotl_config():
    """One U-Net level at 8x8 (5 residual blocks), conv1 as placeholder, 3 classes, crops of 8
    and 4 pixels."""
    config = tiny_config(resolution=8, channel_mult=(1,), attn_resolutions=())
    config.model.placeholders = ("conv1",)
    config.model.num_classes = 3
    config.kernel_search.max_nodes = SPACE.max_nodes
    return config


@pytest.fixture(scope="module")
def setting():
    config = sotl_config()
    base = random_params(build_model(config), config)
    rng = np.random.default_rng(0)
    data = {
        "image": rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 3, 16),
    }
    return config, base, data


def test_vmapped_scores_equal_the_per_candidate_loop(setting):
    config, base, data = setting
    settings = sotl.SotlSettings(steps=4, last=2, steps_per_call=2, batch_size=2)
    batched = sotl.SotlTrainer(config, base, settings, space=SPACE).scores(GRAPHS, data)
    looped = sotl.sotl_loop(GRAPHS, config, base, data, settings, space=SPACE)
    assert batched.curves.shape == (3, 4) and batched.scores.shape == (3,)
    np.testing.assert_allclose(batched.curves, looped.curves, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched.scores, -batched.curves[:, -2:].sum(1), rtol=1e-6)
    assert batched.patch_sizes == looped.patch_sizes
    assert len(set(np.round(batched.scores, 5))) == 3  # the kernels are told apart


def test_mapped_distilled_lora_training_equals_the_loop(setting):
    config, base, data = setting
    settings = sotl.SotlSettings(
        steps=2,
        last=1,
        steps_per_call=2,
        batch_size=2,
        distill=0.5,
        lora_rank=2,
        batching="map",
        candidates_per_call=2,  # 3 graphs: two calls, the second padded
    )
    batched = sotl.SotlTrainer(config, base, settings, space=SPACE).scores(GRAPHS, data)
    looped = sotl.sotl_loop(GRAPHS, config, base, data, settings, space=SPACE)
    np.testing.assert_allclose(batched.curves, looped.curves, rtol=1e-4, atol=1e-5)


def test_distillation_at_weight_zero_is_the_denoising_loss(setting):
    config, base, data = setting
    model = build_model(config)
    kwargs = diffusion_build.build_loss_kwargs(config.diffusion, config.data.resolution)
    x0 = jnp.asarray(data["image"][:4])
    labels = jnp.asarray(data["label"][:4])

    def net(x, c_noise, **kw):
        return model.apply({"params": base}, x, c_noise, **kw)

    key = jax.random.key(3)
    plain = denoising_loss(net, key, x0, labels=labels, **kwargs)
    zero = sotl.distillation_loss(net, net, key, x0, weight=0.0, labels=labels, **kwargs)
    own = sotl.distillation_loss(net, net, key, x0, weight=1.0, labels=labels, **kwargs)
    np.testing.assert_allclose(zero, plain, rtol=1e-6)
    np.testing.assert_allclose(own, 0.0, atol=1e-10)  # the teacher matches itself
    # The SoTL loss is the trainer's loss when not distilling.
    batch = {"image": jnp.asarray(data["image"][:4]), "label": labels}
    ours = sotl.make_loss(model, config, 0.0)(base, {}, batch, key, 4)
    np.testing.assert_allclose(ours, make_loss_fn(model, config)(base, batch, key, 4), rtol=1e-6)


def test_split_and_merge_of_parameters(setting):
    config, base, _ = setting
    params = canvas_jax.kernel_params(config, base, SPACE)
    count = lambda tree: len(jax.tree.leaves(tree))  # noqa: E731
    full, frozen = sotl.split_params(params, train_rest=True, lora_rank=0)
    assert frozen == {} and count(full) == count(params)
    only, frozen = sotl.split_params(params, train_rest=False, lora_rank=0)
    assert all("/graph/" in p for p in only["kernel"]) and not only["rest"] and not only["lora"]
    assert count(only) + count(frozen) == count(params)
    lora, frozen = sotl.split_params(params, train_rest=True, lora_rank=3)
    assert lora["lora"] and all(f["a"].shape[1] == 3 for f in lora["lora"].values())
    assert "ResBlock_0/conv0/kernel" in lora["lora"]  # a conv outside the placeholders
    merged = sotl.merge_params(lora, frozen)  # B = 0: the merged model is the original
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_bad_settings_and_inputs_are_named(setting):
    config, base, data = setting
    for fields, match in [
        ({"steps": 4, "last": 5}, "last = 5 is not allowed: it must be in 1..steps = 4"),
        ({"steps": 6, "steps_per_call": 4}, "steps_per_call = 4 .* dividing steps = 6"),
        ({"train_rest": False, "lora_rank": 2}, "lora_rank = 2 .* 0 when train_rest is False"),
        ({"batching": "pmap"}, "batching = 'pmap' .* one of vmap, map"),
        ({"distill": 1.5}, r"distill = 1.5 .* in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match="SotlSettings." + match):
            sotl.SotlSettings(**{"steps": 4, "last": 2, "steps_per_call": 2, **fields})
    with pytest.raises(ConfigError, match=r"config.nag.sotl.last = 9 .* in 1..steps = 4"):
        sotl.SotlSettings.from_config({"steps": 4, "last": 9, "steps_per_call": 2})
    with pytest.raises(ConfigError, match="config.nag.sotl.lr is not a known field"):
        sotl.SotlSettings.from_config({"lr": 1.0})

    settings = sotl.SotlSettings(steps=2, last=1, steps_per_call=1, batch_size=2)
    trainer = sotl.SotlTrainer(config, base, settings, space=SPACE)
    with pytest.raises(ValueError, match="at least one KernelGraph"):
        trainer.scores([], data)
    outside = KernelGraph(("input", "gelu", "fc"), ((), (0,), (1,)))
    with pytest.raises(ValueError, match=r"graphs\[1\] is not in the search space.*'gelu'"):
        trainer.scores([GRAPHS[0], outside], data)
    with pytest.raises(ValueError, match=r"data\['image'\]: \[P, 8, 8, 3\]"):
        trainer.scores(GRAPHS, {"image": data["image"][:, :4]})
    plain = sotl_config()
    plain.model.placeholders = ()
    with pytest.raises(ValueError, match="declares no placeholders"):
        sotl.SotlTrainer(plain, base, settings, space=SPACE)

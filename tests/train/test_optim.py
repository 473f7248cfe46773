"""The optimizer's options: AdamW's decoupled decay and per-module learning-rate multipliers."""

import jax
import jax.numpy as jnp
import optax
import pytest

from ml_collections_configs import base
from patchdiff.config import ConfigError, validate
from patchdiff.train.optim import build_optimizer

PARAMS = {
    "mapping": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    "block": {
        "kernel": jnp.ones((3, 3)),
        "scale": jnp.ones((2, 3)),  # a per-head scale stacked over scanned layers: not decayed
        "norm": {"linear": {"kernel": jnp.ones((3, 3))}},
    },
}


def first_update(tcfg, params=PARAMS):
    optimizer = build_optimizer(tcfg)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return updates


def test_plain_adam_keeps_its_state_layout():
    # Runs without decay or multipliers restore checkpoints written before these options.
    tcfg = base.get_config().train
    state = build_optimizer(tcfg).init(PARAMS)
    adam = optax.inject_hyperparams(lambda learning_rate: optax.adam(learning_rate))
    plain = adam(learning_rate=tcfg.lr).init(PARAMS)
    assert jax.tree.structure(state) == jax.tree.structure(plain)


def test_adamw_decays_kernels_only_and_multipliers_scale_their_modules():
    tcfg = base.get_config().train
    tcfg.lr, tcfg.weight_decay, tcfg.lr_mult = 1e-2, 0.5, {"mapping": 1 / 3, "norm": 0.5}
    updates = first_update(tcfg)
    # Adam's first step is the gradient's sign (1); decay adds 0.5 x the weight (1) to kernels.
    assert jnp.allclose(updates["block"]["kernel"], -1e-2 * 1.5)
    assert jnp.allclose(updates["block"]["scale"], -1e-2)
    assert jnp.allclose(updates["mapping"]["kernel"], -1e-2 * 1.5 / 3)
    assert jnp.allclose(updates["mapping"]["bias"], -1e-2 / 3)
    # A module name matches at any depth: HDiT's AdaRMSNorm projections inside each layer.
    assert jnp.allclose(updates["block"]["norm"]["linear"]["kernel"], -1e-2 * 1.5 * 0.5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("weight_decay", -0.1, "config.train.weight_decay = -0.1 is not allowed"),
        ("lr_mult", {"mapping": 0.0}, "config.train.lr_mult.mapping = 0.0 is not allowed"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    config = base.get_config()
    config.train[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)

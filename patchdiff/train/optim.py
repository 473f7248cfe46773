"""Optimizer and schedules: Adam with a learning rate set each step from the step count and the
number of images seen (EDM ramps up over images, not steps, and patch training varies the batch).
"""

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ("constant", "edm_rampup", "warmup_cosine")


def learning_rate(tcfg, step, nimg):
    """The learning rate of a step: `edm_rampup` lr min(nimg / lr_rampup_img, 1) (EDM's
    training_loop), `warmup_cosine` linear warm-up then cosine decay to 0 over total_steps."""
    if tcfg.lr_schedule == "edm_rampup":
        return tcfg.lr * jnp.minimum(nimg / max(tcfg.lr_rampup_img, 1), 1.0)
    if tcfg.lr_schedule == "warmup_cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, tcfg.lr, max(tcfg.warmup_steps, 1), max(tcfg.total_steps, tcfg.warmup_steps + 1)
        )
        return schedule(step)
    return jnp.asarray(tcfg.lr, jnp.float32)


def build_optimizer(tcfg):
    """Adam (AdamW's decoupled decay when train.weight_decay > 0, optional global-norm clipping,
    per-module learning-rate multipliers from train.lr_mult) whose learning rate is a
    hyper-parameter that the train step sets from `learning_rate`.

    Without decay and multipliers the state is plain optax.adam's, as before, so checkpoints of
    such runs keep their layout."""
    decay, multipliers = float(tcfg.get("weight_decay", 0.0)), dict(tcfg.get("lr_mult", {}))

    def make(learning_rate):
        if decay or multipliers:
            # AdamW as optax.adamw composes it (the decay is scaled by the learning rate, as in
            # PyTorch and k-diffusion), with the multiplier applied to the whole update.
            adam = optax.chain(
                optax.scale_by_adam(b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps),
                optax.add_decayed_weights(decay, mask=decayed_mask) if decay else optax.identity(),
                scale_by_module(multipliers),
                optax.scale_by_learning_rate(learning_rate),
            )
        else:
            adam = optax.adam(learning_rate, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps)
        if tcfg.grad_clip > 0:
            return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adam)
        return adam

    return optax.inject_hyperparams(make)(learning_rate=tcfg.lr)


def decayed_mask(params):
    """Weight decay applies to the kernels of Dense and Conv layers only: not to biases, norm
    scales, per-head attention scales (whatever their rank under nn.scan) or embedding tables,
    as k-diffusion's HDiT and the usual AdamW practice."""

    def one(path, _):
        return getattr(path[-1], "key", None) == "kernel"

    return jax.tree_util.tree_map_with_path(one, params)


def module_multipliers(params, multipliers: dict):
    """A float per leaf: multipliers[name] for leaves under a module called `name` at any depth
    (the one nearest the root wins), else 1. HDiT: {"mapping": 1/3} is its mapping network,
    {"norm": 1/3} every AdaRMSNorm's projection of the conditioning."""

    def one(path, _):
        for entry in path[:-1]:
            name = getattr(entry, "key", None)
            if name in multipliers:
                return float(multipliers[name])
        return 1.0

    return jax.tree_util.tree_map_with_path(one, params)


def scale_by_module(multipliers: dict):
    """Scales each update by its module's multiplier (`module_multipliers`; HDiT trains its
    mapping network and its norms' conditioning at 1/3 of the learning rate); stateless, so the
    optimizer state keeps its layout."""
    if not multipliers:
        return optax.identity()

    def update(updates, state, params=None):
        del params
        scales = module_multipliers(updates, multipliers)
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def ema_beta(tcfg, nimg, batch_images):
    """EMA decay for a step of `batch_images` images: a fixed `ema_decay`, or EDM's half-life in
    images, beta = 0.5 ** (batch / halflife), the half-life capped at nimg * ramp-up ratio."""
    if tcfg.ema_decay > 0:
        return jnp.asarray(tcfg.ema_decay, jnp.float32)
    halflife = jnp.asarray(float(tcfg.ema_halflife_img), jnp.float32)
    if tcfg.ema_rampup_ratio > 0:
        halflife = jnp.minimum(halflife, nimg * tcfg.ema_rampup_ratio)
    return 0.5 ** (batch_images / jnp.maximum(halflife, 1e-8))

"""Optimizer and schedules: Adam with a learning rate set each step from the step count and the
number of images seen (EDM ramps up over images, not steps, and patch training varies the batch).
"""

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
    """Adam (with optional global-norm clipping) whose learning rate is a hyper-parameter that
    the train step sets from `learning_rate`."""

    def make(learning_rate):
        adam = optax.adam(learning_rate, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps)
        if tcfg.grad_clip > 0:
            return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adam)
        return adam

    return optax.inject_hyperparams(make)(learning_rate=tcfg.lr)


def ema_beta(tcfg, nimg, batch_images):
    """EMA decay for a step of `batch_images` images: a fixed `ema_decay`, or EDM's half-life in
    images, beta = 0.5 ** (batch / halflife), the half-life capped at nimg * ramp-up ratio."""
    if tcfg.ema_decay > 0:
        return jnp.asarray(tcfg.ema_decay, jnp.float32)
    halflife = jnp.asarray(float(tcfg.ema_halflife_img), jnp.float32)
    if tcfg.ema_rampup_ratio > 0:
        halflife = jnp.minimum(halflife, nimg * tcfg.ema_rampup_ratio)
    return 0.5 ** (batch_images / jnp.maximum(halflife, 1e-8))

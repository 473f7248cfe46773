"""The autoencoder's model, optimizers, train state and train step (`autoencoder.py` runs them).

One jitted step does LDM's two optimisations (Rombach et al. 2022; the objective is in
`autoencoder_losses.py`): the autoencoder's Adam on l1 + l2 + kl (+ the generator's adversarial
term from loss.adv_start_step), then, with config.loss.adv_weight > 0, the discriminator's Adam on
the hinge loss against this step's reconstructions. A step whose loss or gradient is not finite
leaves the state as it was and records its number in `state.bad_step`, as `step.py` does.

Glossary: B batch, H/W height/width, C image channels.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from patchdiff import xla_cpu
from patchdiff.config import ConfigError
from patchdiff.train import autoencoder_losses as losses
from patchdiff.train.optim import build_optimizer

# LDM trains both its autoencoder and its discriminator with Adam betas (0.5, 0.9); the
# discriminator keeps them here (the autoencoder's are config.train.adam_b1/b2).
DISC_BETAS = (0.5, 0.9)


def adversarial(config) -> bool:
    """Whether the run has a discriminator at all (none is built with loss.adv_weight = 0)."""
    return config.loss.adv_weight > 0


# ---------------------------------------------------------------------------------------------
# Model, optimizers, state


def build_module(config, scaling_factor=1.0):
    """The AutoencoderKL that config.vae describes (in and out channels from config.data)."""
    from patchdiff.models.vae import AutoencoderKL, VAEConfig

    v, d = config.vae, config.data
    vae_config = VAEConfig(
        in_channels=d.channels,
        out_channels=d.channels,
        block_out_channels=tuple(v.block_out_channels),
        layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        scaling_factor=scaling_factor,
        shift_factor=0.0,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=v.mid_block_add_attention,
        sample_size=d.resolution,
    )
    return AutoencoderKL(config=vae_config, dtype=v.dtype)


def build_discriminator(config):
    """The PatchGAN discriminator, or None without the adversarial term."""
    if not adversarial(config):
        return None
    l = config.loss
    return losses.PatchDiscriminator(
        channels=l.disc_channels, layers=l.disc_layers, norm=l.disc_norm
    )


@flax.struct.dataclass
class AutoencoderState:
    step: jax.Array  # int32 []
    params: dict
    ema: dict
    opt_state: object
    disc_params: dict | None  # None without the adversarial term
    disc_opt_state: object
    key: jax.Array  # uint32 [2], the run's key; step keys are fold_in(key, step)
    bad_step: jax.Array  # int32 [], first step with a non-finite loss, -1 if none


def build_optimizers(config):
    """(autoencoder's, discriminator's or None). The autoencoder's is the diffusion trainer's
    Adam (optional clipping, AdamW decay) with the learning rate the step sets."""
    disc = None
    if adversarial(config):
        disc = optax.adam(config.loss.disc_lr, b1=DISC_BETAS[0], b2=DISC_BETAS[1])
    return build_optimizer(config.train), disc


def init_state(config, module, disc, optimizer, disc_optimizer) -> AutoencoderState:
    init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    k_vae, k_sample, k_disc = jax.random.split(init_key, 3)
    d = config.data
    x = jnp.zeros((1, d.resolution, d.resolution, d.channels), jnp.float32)  # [B, H, W, C]
    params = nn.meta.unbox(module.init(k_vae, x, k_sample)["params"])
    disc_params = nn.meta.unbox(disc.init(k_disc, x)["params"]) if disc else None
    return AutoencoderState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        disc_params=disc_params,
        disc_opt_state=disc_optimizer.init(disc_params) if disc else None,
        key=run_key,
        bad_step=jnp.full((), -1, jnp.int32),
    )


def make_mesh(config) -> Mesh:
    """Data parallel over every device: the autoencoder is small, its parameters replicated."""
    devices = jax.devices()
    if config.train.batch_size % len(devices):
        raise ConfigError(
            f"config.train.batch_size = {config.train.batch_size} is not allowed: it must split "
            f"evenly over the {len(devices)} devices."
        )
    return Mesh(np.array(devices), ("data",))


def build(config, mesh):
    """(module, discriminator, optimizers, init function, abstract state, its shardings)."""
    module, disc = build_module(config), build_discriminator(config)
    optimizer, disc_optimizer = build_optimizers(config)

    def init():
        return init_state(config, module, disc, optimizer, disc_optimizer)

    abstract = jax.eval_shape(init)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, abstract)
    return module, disc, (optimizer, disc_optimizer), init, abstract, shardings


def fresh_state(init, shardings):
    """The initial state on the mesh. Init runs once and is mostly threefry hashing, which
    LLVM's optimiser takes long over (see models.init_params): compiled without it."""
    lowered = jax.jit(init, out_shardings=shardings).lower()
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})()


# ---------------------------------------------------------------------------------------------
# The train step


def learning_rate(tcfg, step):
    """Linear warm-up over train.warmup_steps, then constant (LDM trains its autoencoders at a
    constant rate)."""
    warm = jnp.minimum((step + 1) / max(tcfg.warmup_steps, 1), 1.0)
    return tcfg.lr * warm.astype(jnp.float32)


def ema_decay(tcfg, step):
    """train.ema_decay, lowered early on as LDM's LitEma does, min(decay, (1 + n) / (10 + n)):
    a short run's EMA then follows the training instead of staying at the initialisation."""
    return jnp.minimum(tcfg.ema_decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def make_train_step(config, module, disc, optimizers, state_sharding, batch_sharding):
    """step(state, images [B, H, W, C]) -> (state, metrics), jitted, the state donated."""
    l, tcfg = config.loss, config.train
    optimizer, disc_optimizer = optimizers

    def step(state, images):
        key = jax.random.fold_in(state.key, state.step)
        # LDM's disc_start: before it, neither the generator's adversarial term nor the
        # discriminator's own loss counts.
        adv_on = state.step >= l.adv_start_step

        def loss_fn(params):
            recon, mean, logvar = module.apply({"params": params}, images, key)  # [B, H, W, C]
            terms = losses.reconstruction_terms(images, recon)
            terms["kl"] = losses.kl_to_standard_normal(mean, logvar)
            loss = l.l1_weight * terms["l1"] + l.l2_weight * terms["l2"] + l.kl_weight * terms["kl"]
            if disc is not None:
                logits = disc.apply({"params": state.disc_params}, recon)
                terms["adv"] = losses.generator_adversarial_loss(logits)
                loss = loss + jnp.where(adv_on, l.adv_weight, 0.0) * terms["adv"]
            return loss, (terms, recon)

        (loss, (terms, recon)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        lr = learning_rate(tcfg, state.step)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "lr": lr}
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if disc is not None:
            fake = jax.lax.stop_gradient(recon)

            def disc_loss_fn(disc_params):  # real and fake in one call: [2B, h', w', 1]
                logits = disc.apply({"params": disc_params}, jnp.concatenate([images, fake]))
                real, fake_logits = jnp.split(logits, 2)
                return losses.hinge_discriminator_loss(real, fake_logits)

            metrics["disc"], disc_grads = jax.value_and_grad(disc_loss_fn)(state.disc_params)
            ok = ok & jnp.isfinite(metrics["disc"])
        state.opt_state.hyperparams["learning_rate"] = lr

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            beta = ema_decay(tcfg, state.step)
            ema = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, state.ema, params)
            disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
            if disc is not None:
                d_updates, d_opt = disc_optimizer.update(disc_grads, disc_opt_state, disc_params)
                # Before adv_start_step the discriminator's Adam is left untouched (no count, no
                # moments), so that it starts as a fresh Adam there.
                disc_params, disc_opt_state = losses.select(
                    adv_on,
                    (optax.apply_updates(disc_params, d_updates), d_opt),
                    (disc_params, disc_opt_state),
                )
            return params, opt_state, ema, disc_params, disc_opt_state

        def keep(_):
            return state.params, state.opt_state, state.ema, state.disc_params, state.disc_opt_state

        # A non-finite step leaves everything as it was; the loop stops at its next report.
        params, opt_state, ema, disc_params, disc_opt_state = jax.lax.cond(ok, update, keep, None)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema=ema,
            opt_state=opt_state,
            disc_params=disc_params,
            disc_opt_state=disc_opt_state,
            bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step),
        )
        return new_state, metrics

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return xla_cpu.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )

"""The train step: one jitted function per patch size, with in/out shardings on the mesh and the
state donated.

loss -> grads (optionally over micro-batches) -> Adam with the step's learning rate -> EMA. A step
whose loss or gradient norm is not finite leaves the state as it was and records its number in
`state.bad_step`, which the loop checks at its next report: no host sync per step.

The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
Appendix A.1; k-diffusion logs it as `gns`) needs the squared gradient norm at two batch sizes.
k-diffusion takes each GPU's gradient as the small batch, which says nothing on one device; here
the step's batch is split into groups (the micro-batches when train.grad_accum > 1, otherwise
its two halves), and the step returns the two unbiased estimates per step:
|G|^2 = (B |g_B|^2 - b |g_b|^2) / (B - b) and tr(Sigma) = (|g_b|^2 - |g_B|^2) / (1/b - 1/B),
with |g_b|^2 the mean over groups. The loop reports B_simple = mean tr(Sigma) / mean |G|^2.

Glossary: B batch, R resolution, p patch size, C channels.
"""

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from patchdiff import xla_cpu
from patchdiff.config import ConfigError
from patchdiff.diffusion import augment
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.losses import denoising_loss
from patchdiff.diffusion.patches import random_patches
from patchdiff.train.optim import ema_beta, learning_rate


def training_inputs(config, model, params, batch, key, patch_size):
    """What one training step's loss sees: (net(x_in, c_noise, **kw) in train mode with its
    dropout key, crops [B, p, p, C], the net's kwargs (coordinate channels, labels with label
    dropout, EDM's augmentation labels), the key of the loss's noise). Shared with short
    trainings elsewhere (nag.sotl), so their crops, dropout and noise are the trainer's for the
    same key."""
    m = config.model
    # A fifth key leaves the first four as split(key, 4) gives them (threefry_partitionable):
    # runs without augmentation draw what they drew before it existed.
    k_patch, k_loss, k_drop, k_label, k_augment = jax.random.split(key, 5)
    images = batch["image"]  # [B, R, R, C]
    kwargs = {}
    if config.augment.p > 0:
        # The whole image, before cropping: EDM's transforms are defined on it (reflections at
        # its borders, translations relative to its size).
        images, kwargs["augment_labels"] = augment.augment(k_augment, images, config.augment)
    images, coords = random_patches(k_patch, images, patch_size)  # [B, p, p, C]
    if m.use_coords:
        kwargs["coords"] = coords
    if m.num_classes:
        drop = jax.random.uniform(k_label, batch["label"].shape) < config.train.label_dropout
        kwargs["labels"] = jnp.where(drop, m.num_classes, batch["label"])

    def net(x_in, c_noise, **kw):
        return model.apply(
            {"params": params}, x_in, c_noise, train=True, rngs={"dropout": k_drop}, **kw
        )

    return net, images, kwargs, k_loss


def make_loss_fn(model, config):
    """loss(params, batch, key, patch_size) -> scalar: crops, label dropout, the denoising loss."""
    loss_kwargs = diffusion_build.build_loss_kwargs(config.diffusion, config.data.resolution)

    def loss_fn(params, batch, key, patch_size):
        net, images, kwargs, k_loss = training_inputs(config, model, params, batch, key, patch_size)
        per_example = denoising_loss(net, k_loss, images, **loss_kwargs, **kwargs)
        return jnp.mean(per_example)

    return loss_fn


def noise_estimates(sq_small, sq_big, small: int, big: int) -> dict:
    """Unbiased estimates of |G|^2 and tr(Sigma) from squared gradient norms at batch sizes
    small < big (McCandlish et al. 2018, Eqs. A.2-A.3)."""
    return {
        "grad_sq_norm": (big * sq_big - small * sq_small) / (big - small),
        "grad_trace_cov": (sq_small - sq_big) / (1 / small - 1 / big),
    }


def fixed_order_mean(tree, axis: str, devices: int):
    """The mean over `axis` of each device's `tree`, summed in device order whatever the
    collective library: a reduce-scatter by all-to-all (device i receives everyone's chunk i and
    adds them up in device order), then an all-gather of the sums. Data movement is exact, so
    the result is the same bits on one process with 8 devices as on two with 4 each, where an
    all-reduce's order of additions differs (gloo against XLA:CPU's in-process sum, NCCL's
    ring against its tree). Same traffic as a ring all-reduce; the flat copy, its chunks and
    the gathered sums take about 3 gradient copies of memory while it runs."""
    flat, unflatten = ravel_pytree(tree)
    size = flat.shape[0]
    chunks = jnp.pad(flat, (0, -size % devices)).reshape(devices, -1)
    received = jax.lax.all_to_all(chunks, axis, 0, 0, tiled=True)  # [devices, size/devices]
    total = received[0]
    for row in range(1, devices):  # device order, written out: no reduction tree to reorder
        total = total + received[row]
    gathered = jax.lax.all_gather(total / devices, axis, tiled=True)
    return unflatten(gathered[:size])


def make_train_step(model, optimizer, config, state_sharding, batch_sharding):
    """step(state, batch, patch_size) -> (state, metrics), jitted with `patch_size` static."""
    loss_fn = make_loss_fn(model, config)
    tcfg = config.train
    accum = tcfg.grad_accum

    mesh = batch_sharding.mesh
    fixed_order = config.mesh.reduction == "fixed_order"
    devices = mesh.shape["data"] if fixed_order else 1  # batch shards summed by hand
    if fixed_order and (tcfg.batch_size % devices or (tcfg.batch_size // devices) % accum):
        raise ConfigError(
            f"config.train.batch_size = {tcfg.batch_size} is not allowed with "
            f'config.mesh.reduction = "fixed_order": it must split into {devices} devices\' '
            f"shards of config.train.grad_accum = {accum} micro-batches each."
        )
    # Groups of the batch whose gradients the noise scale compares (the micro-batches, or two
    # halves); with a fixed-order sum the devices' shards are groups already.
    groups = accum if accum > 1 else (2 if tcfg.grad_noise_scale and devices == 1 else 1)

    def grads_of(params, batch, key, patch_size):
        """(loss, grads, mean squared norm of the groups' gradients or None)."""
        if groups == 1:
            return (*jax.value_and_grad(loss_fn)(params, batch, key, patch_size), None)
        micro = jax.tree.map(lambda a: a.reshape(groups, a.shape[0] // groups, *a.shape[1:]), batch)

        def of_group(i, mb):  # group i's (loss, grads, squared gradient norm)
            loss, grads = jax.value_and_grad(loss_fn)(
                params, mb, jax.random.fold_in(key, i), patch_size
            )
            return loss, grads, optax.tree.norm(grads, squared=True)

        if accum == 1:
            # The noise scale's two halves, as two independent programs in one step. Measured on
            # the demo's U-Net (2-core CPU, batch 64): 0.62 s per full-size step against 0.82 s
            # for the whole batch at once (XLA:CPU runs the halves side by side), +45% compile
            # time; a vmap over the halves made the weight-gradient convolutions batch-grouped
            # (1.44 s), and the lax.scan that grad_accum uses took 11.5 s (benchmarks/
            # train_throughput.py --gns on,off; BENCHMARKS.md).
            outs = [of_group(i, jax.tree.map(lambda a, i=i: a[i], micro)) for i in range(groups)]
            return jax.tree.map(lambda *a: sum(a) / groups, *outs)

        def add(carry, inputs):
            return jax.tree.map(jnp.add, carry, of_group(*inputs)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params), jnp.zeros(()))
        (loss, grads, sq), _ = jax.lax.scan(add, zero, (jnp.arange(groups), micro))
        return jax.tree.map(lambda a: a / groups, (loss, grads, sq))

    def sharded_grads_of(params, batch, key, patch_size):
        """grads_of on each device's shard of the batch (its own key), the means over devices
        summed in device order (fixed_order_mean)."""

        def local(params, batch, key):
            key = jax.random.fold_in(key, jax.lax.axis_index("data"))
            loss, grads, group_sq = grads_of(params, batch, key, patch_size)
            if group_sq is None:
                group_sq = optax.tree.norm(grads, squared=True)
            return fixed_order_mean((loss, grads, group_sq), "data", devices)

        spec = jax.sharding.PartitionSpec
        loss, grads, group_sq = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec(), spec("data"), spec()),
            out_specs=spec(),
            check_vma=False,
        )(params, batch, key)
        return loss, grads, (group_sq if tcfg.grad_noise_scale or accum > 1 else None)

    def step(state, batch, patch_size):
        key = jax.random.fold_in(state.key, state.step)
        loss, grads, group_sq = (sharded_grads_of if fixed_order else grads_of)(
            state.params, batch, key, patch_size
        )
        grad_norm = optax.tree.norm(grads)
        batch_images = batch["image"].shape[0]
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if group_sq is not None and devices * groups > 1:
            metrics.update(noise_estimates(group_sq, grad_norm**2,
                                           batch_images // (devices * groups),
                                           batch_images))  # fmt: skip
        lr = learning_rate(tcfg, state.step, state.nimg)
        nimg = state.nimg + batch_images
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        state.opt_state.hyperparams["learning_rate"] = lr

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            beta = ema_beta(tcfg, nimg, batch_images)
            ema = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, state.ema, params)
            return params, opt_state, ema

        # A non-finite step leaves parameters, EMA and optimizer as they were. A cond rather than
        # a select per array: the selects read both versions of all four trees, 0.18 s of the
        # DDPM++ step at batch 8 on a 2-core CPU, the cond's update runs in place (BENCHMARKS.md).
        params, opt_state, ema = jax.lax.cond(
            ok, update, lambda _: (state.params, state.opt_state, state.ema), None
        )
        new_state = state.replace(
            step=state.step + 1,
            nimg=jnp.where(ok, nimg, state.nimg),
            params=params,
            ema=ema,
            opt_state=opt_state,
            bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step),
        )
        return new_state, {**metrics, "lr": lr}

    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return xla_cpu.jit(
        step,
        static_argnums=2,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )

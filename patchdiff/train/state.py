"""The training state: one pytree that the step donates, the mesh shards and orbax saves."""

import flax.struct
import jax
import jax.numpy as jnp

from patchdiff.models import dummy_inputs
from patchdiff.models.partitioning import logical_specs, mesh_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    nimg: jax.Array  # int32 [], training examples seen (EDM's cur_nimg)
    params: dict
    ema: dict
    opt_state: object
    key: jax.Array  # uint32 [2], the run's base key; step keys are fold_in(key, step)
    bad_step: jax.Array  # int32 [], first step with a non-finite loss, -1 if none


def create_state(model, optimizer, config, params):
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        nimg=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        key=jax.random.PRNGKey(config.seed),
        bad_step=jnp.full((), -1, jnp.int32),
    )


def state_shardings(model, optimizer, config, mesh, rules):
    """NamedShardings for every leaf of the state: parameters (and their EMA and Adam moments)
    by logical axis rules, scalars replicated. Returns (shardings, abstract state)."""
    x, c_noise, kwargs = dummy_inputs(config)
    logical = logical_specs(model, jax.random.key(0), x, c_noise, **kwargs)["params"]
    param_shardings = mesh_shardings(logical, mesh, rules)

    def init():
        from patchdiff.models import init_params

        return create_state(model, optimizer, config, init_params(model, jax.random.key(0), config))

    abstract = jax.eval_shape(init)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_path = {
        jax.tree_util.keystr(path): (sharding, leaf.shape)
        for (path, sharding), leaf in zip(
            jax.tree_util.tree_flatten_with_path(param_shardings)[0],
            jax.tree.leaves(abstract.params),
            strict=True,
        )
    }

    def pick(path, leaf):
        # A leaf whose trailing keys name a parameter of the same shape (the EMA copy, Adam's
        # moments) is sharded like that parameter; counters and scalars are replicated.
        for start in range(len(path)):
            match = by_path.get(jax.tree_util.keystr(path[start:]))
            if match is not None and match[1] == leaf.shape:
                return match[0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract), abstract

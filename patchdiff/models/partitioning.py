"""Logical axis rules: which mesh axis (if any) each logical parameter axis is sharded over.

Model code names axes ("conv_in", "conv_out", "embed", "mlp", "heads", "norm", "vocab"); a rule
set maps each name to a mesh axis or None (MaxText's `logical_axis_rules`). The default
replicates every parameter, which is right for U-Nets of CIFAR/ImageNet size on data-parallel
meshes; larger models can map "conv_out", "mlp" and "heads" to a "model" axis.
"""

import flax.linen as nn
import jax

LOGICAL_AXES = ("conv_in", "conv_out", "embed", "mlp", "heads", "norm", "vocab")
REPLICATED_RULES = tuple((name, None) for name in LOGICAL_AXES)


def logical_specs(model, *init_args, **init_kwargs):
    """The logical PartitionSpec of every parameter, found without allocating any of them."""
    abstract = jax.eval_shape(model.init, *init_args, **init_kwargs)
    return nn.get_partition_spec(abstract)


def mesh_shardings(logical, mesh, rules=REPLICATED_RULES):
    """Logical specs (a pytree of PartitionSpec) -> NamedShardings on `mesh` under `rules`."""
    return nn.logical_to_mesh_sharding(logical, mesh, rules)

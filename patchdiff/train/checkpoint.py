"""Checkpoints with orbax's CheckpointManager: the train state, the data position and the config.

Saves are asynchronous (training goes on while the files are written; orbax renames a step's
folder into place only when it is complete, so a crash never leaves a half checkpoint that looks
whole). Restore takes the newest step that reads back; a damaged newest one is skipped with a
warning. A checkpoint written under another network or data shape is refused with a sentence
that names the first field that differs.
"""

import json
import logging
import pathlib

import jax
import orbax.checkpoint as ocp

# Replicated arrays are written by one replica, not sliced across replicas ("replica-parallel",
# orbax's default). Slicing compiles a small program per parameter shape and device at the first
# save: measured 28 s for 60 shapes on 8 CPU devices, against 0.04 s written whole; the train
# state is data-parallel, so nearly every array is replicated. On a multi-GPU host this costs the
# spreading of replicated writes over devices, which the project's model sizes do not need.
_absl = logging.getLogger("absl")
_level = _absl.level
_absl.setLevel(logging.ERROR)  # orbax warns on every override of its default handler
try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
    )
finally:
    _absl.setLevel(_level)

# Fields whose change makes a checkpoint unusable (parameter shapes or their meaning): those of
# every network, then the named network's own (a U-Net's checkpoint ignores DiT's fields).
SHAPE_FIELDS = (
    "model.name",
    "model.patch_size",
    "model.num_classes",
    "model.augment_dim",
    "model.use_coords",
    "data.resolution",
    "data.channels",
    "diffusion.parameterisation",
)
MODEL_SHAPE_FIELDS = {
    "unet": (
        "model.arch",
        "model.channels",
        "model.channel_mult",
        "model.num_res_blocks",
        "model.attn_resolutions",
        "model.head_dim",
        "model.noise_embedding",
    ),
    # nn.scan stacks a level's layers into one parameter tree: a different layout.
    "dit": ("model.scan", "model.dit.depth", "model.dit.width", "model.dit.heads",
            "model.dit.mlp_ratio", "model.dit.pos_embed"),
    "hdit": ("model.scan", "model.hdit.widths", "model.hdit.depths", "model.hdit.head_dim",
             "model.hdit.ff_mult", "model.hdit.mapping_width", "model.hdit.mapping_depth"),
}  # fmt: skip

# The values that checkpoints written before a field existed were trained with.
FIELD_DEFAULTS = {"model.augment_dim": 0}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this config."""


def _field(config_dict, dotted):
    """The value at `dotted`, or None where the config predates that field."""
    node = config_dict
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return list(node) if isinstance(node, tuple | list) else node


def check_compatible(saved: dict, config, where) -> None:
    """Refuses a diffusion checkpoint whose SHAPE_FIELDS or network's own fields differ."""
    check_fields(saved, config, where, SHAPE_FIELDS + MODEL_SHAPE_FIELDS.get(config.model.name, ()))


def check_fields(saved: dict, config, where, fields) -> None:
    """Raises CheckpointError naming the first of `fields` (dotted) whose value in the saved
    config dict differs from `config`'s."""
    current = json.loads(config.to_json_best_effort())
    for field in fields:
        old, new = (_field(c, field) for c in (saved, current))
        old, new = (FIELD_DEFAULTS.get(field) if v is None else v for v in (old, new))
        if old != new:
            raise CheckpointError(
                f"the checkpoint in {where} was written with config.{field} = {old!r}, but this "
                f"config has {new!r}: use another --workdir or the checkpoint's settings."
            )


class Checkpointer:
    def __init__(self, directory, *, keep: int, every: int, check=check_compatible):
        """`check(saved_config_dict, config, where)` raises CheckpointError for a checkpoint
        this config cannot use; the default knows the diffusion networks, and other trainers
        (the autoencoder's) pass their own fields."""
        self.check = check
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self.every = every

    def save(self, step: int, state, meta: dict, force=False) -> bool:
        """Saves at multiples of `every` (or always with `force`); returns whether it saved."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, config):
        """(state, meta) from the newest readable checkpoint, or None when there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
            except Exception as e:  # damaged: fall back to the previous one
                logging.warning(
                    "checkpoint %d in %s cannot be read (%s); trying an older one.",
                    step,
                    self.directory,
                    e,
                )
                continue
            self.check(meta["config"], config, self.directory)
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as e:
                logging.warning(
                    "checkpoint %d in %s cannot be read (%s); trying an older one.",
                    step,
                    self.directory,
                    e,
                )
                continue
            return restored["state"], meta
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs that carry the target shardings, so that restore lays arrays out on the
    mesh directly."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )

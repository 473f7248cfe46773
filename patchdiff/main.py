"""Entry point: python -m patchdiff.main --config ml_collections_configs/NAME.py[:options].

Modes: `summary` (the network's parameters and FLOPs per image at stem patch sizes 1, 2, 4).
Field overrides: --config.model.channels=64. Everything else lives in the library.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from patchdiff import config as config_lib
from patchdiff import summary

MODES = {"summary": lambda config, workdir: summary.summarize(config)}

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "summary", list(MODES), "What to run.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # jax logs at INFO each accelerator plugin it did not find (libtpu on a GPU box, ...).
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        config = config_lib.validate(FLAGS.config)
    except config_lib.ConfigError as e:
        raise SystemExit(f"patchdiff: {e}") from None  # one sentence, no usage dump
    MODES[FLAGS.mode](config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)

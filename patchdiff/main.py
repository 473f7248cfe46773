"""Entry point: python -m patchdiff.main --config ml_collections_configs/NAME.py[:options]
--workdir DIR [--mode train|sample|eval|summary].

Modes: `train` (train, or resume what is in --workdir), `sample` (images from the newest
checkpoint with config.sample.*), `eval` (sample quality by EDM's protocol,
then the denoising error on held-out images), `summary`
(parameters and FLOPs per image at stem patch sizes 1, 2, 4). Field overrides:
--config.train.batch_size=64. Everything else lives in the library.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from patchdiff import config as config_lib
from patchdiff import distributed, summary, train
from patchdiff.data import DataError
from patchdiff.metrics import MetricError
from patchdiff.train.checkpoint import CheckpointError
from patchdiff.train.evaluate import evaluate

MODES = {
    "train": train.train_and_evaluate,
    "sample": train.sample,
    "eval": evaluate,
    "summary": lambda config, workdir: summary.summarize(config),
}
NEEDS_WORKDIR = ("train", "sample", "eval")

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # jax logs at INFO each accelerator plugin it did not find (libtpu on a GPU box, ...), and
    # orbax a dozen lines per checkpoint: keep the console for the progress bar and reports.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        config = config_lib.validate(FLAGS.config)
    except config_lib.ConfigError as e:
        raise SystemExit(f"patchdiff: {e}") from None  # one sentence, no usage dump
    if FLAGS.mode in NEEDS_WORKDIR and not FLAGS.workdir:
        raise SystemExit(f"patchdiff: --mode {FLAGS.mode} needs --workdir DIR.")
    try:
        if config.distributed:  # every process runs this same command; jax finds its peers
            distributed.initialize(config)
    except config_lib.ConfigError as e:
        raise SystemExit(f"patchdiff: {e}") from None
    if FLAGS.mode in NEEDS_WORKDIR:
        distributed.log_start()
    try:
        MODES[FLAGS.mode](config, FLAGS.workdir)
    except (
        config_lib.ConfigError,
        DataError,
        MetricError,
        CheckpointError,
        FileNotFoundError,
        train.TrainingStopped,
    ) as e:  # the user's to mend: one line, no traceback
        raise SystemExit(f"patchdiff: {e}") from None


if __name__ == "__main__":
    app.run(main)

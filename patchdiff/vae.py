"""Entry point of the autoencoder (latent diffusion's first stage):

    python -m patchdiff.vae --config ml_collections_configs/vae_fashion_mnist.py[:runlocal]
        --workdir DIR [--mode train|eval|export]

Modes: `train` (train, or resume what is in --workdir, then export), `eval` (the PSNR of the
newest checkpoint's EMA reconstructions, written to DIR/eval/psnr_step_N.json), `export` (the
newest checkpoint's EMA as a diffusers folder DIR/vae/, scaled to unit-variance latents). Field
overrides: --config.train.batch_size=32. Everything else lives in `patchdiff.train.autoencoder`.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from patchdiff import config as config_lib
from patchdiff import distributed
from patchdiff.data import DataError
from patchdiff.models.vae_convert import VAEError
from patchdiff.train import autoencoder
from patchdiff.train.checkpoint import CheckpointError
from patchdiff.train.loop import TrainingStopped

MODES = {
    "train": autoencoder.train_and_evaluate,
    "eval": autoencoder.evaluate,
    "export": autoencoder.export_latest,
}

config_flags.DEFINE_config_file("config", None, "Autoencoder config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, grids and the export.")
flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # As patchdiff.main: keep the console for the progress bar and the reports.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        config = autoencoder.validate(FLAGS.config)
        if not FLAGS.workdir:
            raise config_lib.ConfigError(f"--mode {FLAGS.mode} needs --workdir DIR.")
        if config.distributed:  # every process runs this same command; jax finds its peers
            distributed.initialize(config)
        distributed.log_start()
        MODES[FLAGS.mode](config, FLAGS.workdir)
    except (
        config_lib.ConfigError,
        DataError,
        CheckpointError,
        FileNotFoundError,
        TrainingStopped,
        VAEError,
    ) as e:  # the user's to mend: one line, no traceback
        raise SystemExit(f"patchdiff: {e}") from None


if __name__ == "__main__":
    app.run(main)

"""Entry point of the U-Net kernel search:

    python -m nag.main --config ml_collections_configs/kernel_search_fashion_mnist.py --workdir DIR

Trains (or resumes) the original U-Net, searches kernels for its placeholders, fine-tunes the
winner beside the original and reports (`nag.kernel_search.run`); a re-run on the same DIR
reuses what is done. Field overrides: --config.nag.budget=32. Everything else lives in the
library.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from nag import kernel_search
from patchdiff import config as config_lib
from patchdiff import train

config_flags.DEFINE_config_file("config", None, "Kernel search config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for the model, search records and report.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"nag: unexpected arguments {argv[1:]}.")
    # jax logs each accelerator plugin it did not find, orbax a dozen lines per checkpoint.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        kernel_search.run(FLAGS.config, FLAGS.workdir)  # checks every field before any work
    except (config_lib.ConfigError, FileNotFoundError, train.TrainingStopped) as e:
        raise SystemExit(f"nag: {e}") from None


if __name__ == "__main__":
    app.run(main)

"""The tiny training config of tests/train (a config file, so that subprocesses can load it)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from test_train import tiny_config  # noqa: E402


def get_config(arg=None):
    config = tiny_config("")
    config.train.checkpoint_every = 1
    config.train.log_every = 1
    config.train.sample_every = 0
    return config

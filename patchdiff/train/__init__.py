"""Training: state, optimizer and EMA, the sharded train step, checkpoints, reports, the loop."""

from patchdiff.train.loop import TrainingStopped, sample, train_and_evaluate

__all__ = ["TrainingStopped", "sample", "train_and_evaluate"]

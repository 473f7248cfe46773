"""What every training loop here does around its steps (the diffusion trainer's `loop.py`, the
autoencoder's `autoencoder.py`): stop cleanly on a signal or a time limit, and keep the clock of
training seconds.

Signals: finish the step, save, leave. With several processes, jax's preemption service holds
SIGTERM (jax.distributed.initialize installs it): a SIGTERM to any process makes every process's
reached_preemption_sync_point true at the same step, so all save that step and leave; a process
that stopped alone would leave the others waiting in a collective. Ctrl-C is turned into that
SIGTERM.

The clock counts training seconds (evaluations and sample grids paused out of it), carried across
resumes: the clock of `train.time_limit_s` and of the metrics' train_seconds. With several
processes, process 0's clock decides the last step for all.
"""

import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


class RunControl:
    """Installs the signal handlers at construction; `close()` restores the previous ones."""

    def __init__(self, *, start_step: int, trained_s: float, time_limit_s: float):
        self.start_step, self.time_limit_s = start_step, time_limit_s
        self.multihost = jax.process_count() > 1
        self.signal = None
        self.out_of_time = bool(time_limit_s) and trained_s >= time_limit_s
        self._start, self._paused = time.perf_counter() - trained_s, 0.0
        self._previous = {}
        if self.multihost:
            self._previous[signal.SIGINT] = signal.signal(
                signal.SIGINT, lambda s, f: os.kill(os.getpid(), signal.SIGTERM)
            )
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, sig, frame):
        self.signal = sig

    @property
    def running(self) -> bool:
        return self.signal is None and not self.out_of_time

    def train_seconds(self) -> float:
        return time.perf_counter() - self._start - self._paused

    def checkpoint_meta(self, step: int, position: int, config, skipped: int) -> dict:
        """What a checkpoint of `step` stores beside the state: the data stream's position
        after it, the config, the images skipped so far and the training seconds."""
        return {
            "step": step,
            "position": position,
            "config": config.to_dict(),
            "skipped_images": skipped,
            "train_seconds": self.train_seconds(),
        }

    def pause(self, seconds: float):
        """Takes `seconds` of evaluation or sampling out of the training clock."""
        self._paused += seconds

    def after_step(self, step: int, state_step):
        """Checks the signals and the time limit after step `step` (`state_step`: an array the
        step produced, waited on so that the limit counts finished steps)."""
        # Steps counted from this run's start: jax picks the sync step as the highest one
        # reported plus one, which is 1 for a SIGTERM before the first report, a step a
        # resumed run's own numbering has left behind.
        if self.multihost and multihost_utils.reached_preemption_sync_point(step - self.start_step):
            self.signal = signal.SIGTERM
        if self.time_limit_s:
            jax.block_until_ready(state_step)
            out_of_time = self.train_seconds() >= self.time_limit_s
            if self.multihost:  # process 0's clock decides for all: the same last step
                out_of_time = bool(multihost_utils.broadcast_one_to_all(np.bool_(out_of_time)))
            self.out_of_time = out_of_time

    def say_why_stopped(self, step: int, total_steps: int):
        """One line on stderr when the loop ended before total_steps: the signal or the limit."""
        if self.signal is not None:
            print(
                f"stopping at step {step} on signal {self.signal}: saving a checkpoint",
                file=sys.stderr,
            )
        elif self.out_of_time and step < total_steps:
            print(
                f"stopping at step {step}: {self.train_seconds():.0f} s of training reached "
                f"config.train.time_limit_s = {self.time_limit_s:g}",
                file=sys.stderr,
            )

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

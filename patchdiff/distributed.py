"""Several processes: `initialize(config)` connects them (jax.distributed) from config.multihost
or the cluster's variables, and `describe()` is the line every process logs at start.

Every process runs the same command with --config.distributed=True. jax finds the coordinator
(process 0's "host:port"), the process count and this process's id in the cluster's variables:
Slurm (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; one task
per GPU), Cloud TPU VMs and GKE (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID), Open MPI, or
JAX_COORDINATOR_ADDRESS/JAX_COORDINATOR_PORT; config.multihost sets them where there is no
cluster (two processes on one machine, a hand-made pool of hosts).

Once connected, SIGTERM to any process reaches all of them through jax's preemption service:
the training loop asks `multihost_utils.reached_preemption_sync_point(step)` every step, and all
processes save at the same step (train/loop.py).
"""

import os
import socket
import sys
import time

import jax

from patchdiff.config import ConfigError


def initialize(config) -> None:
    """jax.distributed.initialize() with config.multihost's explicit settings; a failure is one
    sentence that says what was tried."""
    h = config.multihost
    kwargs = {"initialization_timeout": int(h.timeout_s)}
    if h.coordinator:
        kwargs["coordinator_address"] = h.coordinator
    if h.num_processes:
        kwargs["num_processes"] = h.num_processes
    if h.process_id >= 0:
        kwargs["process_id"] = h.process_id
    if tuple(h.local_device_ids):
        kwargs["local_device_ids"] = list(h.local_device_ids)
    if h.cluster == "manual":
        kwargs["cluster_detection_method"] = "deactivate"
    elif h.cluster != "auto":
        kwargs["cluster_detection_method"] = h.cluster
    if h.coordinator and h.process_id > 0:
        # jax's client ends the process with a C++ abort when the coordinator never answers:
        # say it in one sentence first.
        _wait_for(h.coordinator, h.timeout_s)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # jax's errors range from ValueError to XlaRuntimeError
        cause = " ".join(str(e).split())[:300]
        if "coordinator_address should be defined" in cause or "not functional" in cause:
            raise ConfigError(
                "config.distributed = True, but no cluster (Slurm, a Cloud TPU VM or GKE pod, "
                "Open MPI, JAX_COORDINATOR_ADDRESS) was found to name the coordinator: set "
                "config.multihost.coordinator, num_processes and process_id, or run under "
                f"srun (jax said: {cause})"
            ) from None
        where = h.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the cluster's"
        raise ConfigError(
            f"jax.distributed.initialize with coordinator {where} failed within "
            f"config.multihost.timeout_s = {h.timeout_s:g} s: check that every process was "
            "started with the same command, that the coordinator's host and port are reachable "
            f"from every host (no proxy, not a 127.x address on a cluster) (jax said: {cause})"
        ) from None
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Seen with jax 0.10.2: two CPU processes resuming with some executables from the
        # persistent compilation cache and others compiled afresh timed out creating their gloo
        # contexts (the cache key holds each process's device ids, so a process whose entry
        # was written loads it while the others compile). Compile afresh on every process.
        jax.config.update("jax_enable_compilation_cache", False)


def _wait_for(coordinator: str, timeout_s: float) -> None:
    """Returns once a TCP connection to "host:port" opens; ConfigError after `timeout_s`."""
    host, _, port = coordinator.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"config.multihost.coordinator = {coordinator!r} did not answer within "
                    f"config.multihost.timeout_s = {timeout_s:g} s ({e.strerror or e}): start "
                    "process 0 there, or give its reachable address"
                ) from None
            time.sleep(0.5)


def describe() -> str:
    """'process 1 of 2 on HOST: 4 of 8 devices (cpu:4, cpu:5, cpu:6, cpu:7)'."""
    local = jax.local_devices()
    names = ", ".join(f"{d.platform}:{d.id}" for d in local)
    return (
        f"process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}: "
        f"{len(local)} of {jax.device_count()} devices ({names})"
    )


def log_start() -> None:
    """Every process says who it is on stderr, so that a pod's logs show which host has what."""
    print(f"patchdiff: {describe()}", file=sys.stderr, flush=True)

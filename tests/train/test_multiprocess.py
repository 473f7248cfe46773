"""Several processes on this machine: two processes on 127.0.0.1, each with 4 fake CPU devices,
connected by jax.distributed with an explicit coordinator, train the tiny config together (each
reading its own slice of every batch), checkpoint with orbax, are stopped, killed and resumed,
and end where one process with 8 devices ends; a SIGTERM to one of them makes both save at the
same step and exit 0.

Not bitwise: XLA:CPU's convolutions on a device give other last bits when the process holds 8
devices than when it holds 4 (or 1): the weight gradient of one 3x3 convolution differed with
the compiled HLO identical, whatever --xla_cpu_multi_thread_eigen or the YNNPACK fusions; its
intra-op thread pool grows with the device count. So the two layouts agree to float32
rounding (measured ~1e-7 relative after 6 steps), and the resumed pair agrees with its own
straight run bitwise through the checkpoint tests' mechanism (tests/train/test_train.py)."""

import os
import pathlib
import signal
import socket
import time

import jax
import numpy as np
from test_train import make_data, start_cli, tiny_config

from patchdiff.train.loop import restore_latest

# The gradient mean summed in device order on both layouts (patchdiff/train/step.py), and a
# one-level U-Net without attention: each of the four runs compiles its train step afresh
# (several CPU processes never use the compilation cache: patchdiff/distributed.py).
OVERRIDES = {
    "mesh.reduction": "fixed_order",
    "model.channel_mult": (1,),
    "model.attn_resolutions": (),
    "train.grad_noise_scale": False,
}
FIXED = [f"--config.{k}={str(v).replace(' ', '')}" for k, v in OVERRIDES.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, data, devices, *overrides, log=None):
    """patchdiff.main on the tiny config with OVERRIDES, on `devices` fake CPU devices."""
    return start_cli(workdir, data, *FIXED, *overrides, devices=devices, log=log)


def start_pair(workdir, data, *overrides):
    """Two processes of 4 devices each, process 0 the coordinator; their logs beside workdir."""
    port = free_port()
    return [
        start(
            workdir,
            data,
            4,
            "--config.distributed=True",
            "--config.multihost.cluster=manual",
            f"--config.multihost.coordinator=127.0.0.1:{port}",
            "--config.multihost.num_processes=2",
            f"--config.multihost.process_id={i}",
            "--config.multihost.timeout_s=120",
            *overrides,
            log=f"{workdir}.{i}.log",
        )
        for i in range(2)
    ]


def wait_all(processes, workdir, timeout=300):
    for i, p in enumerate(processes):
        p.wait(timeout=timeout)
        assert p.returncode == 0, pathlib.Path(f"{workdir}.{i}.log").read_text()[-3000:]


def wait_for(path, processes, log, what, timeout=300):
    """Until `path` exists, while every process runs."""
    deadline = time.time() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in processes), log.read_text()[-3000:]
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def checkpoints(run):
    return sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())


def test_two_processes_stopped_killed_and_resumed_end_where_one_process_ends(tmp_path):
    """One process with 8 devices trains 8 steps. Two processes with 4 devices each train the
    same: SIGTERM to process 1 alone stops both at the same step with a checkpoint and exit 0;
    the resumed pair is killed (SIGKILL) after its next checkpoint; the pair resumed again
    finishes where the one process does, to float32 rounding (module docstring)."""
    data = make_data(tmp_path / "d.npz")
    steps = "--config.train.total_steps=8"
    one = start(tmp_path / "one", data, 8, steps)
    out, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out
    assert "patchdiff: process 0 of 1" in out and "8 of 8 devices" in out

    run = tmp_path / "two"
    log0 = pathlib.Path(f"{run}.0.log")
    pair = start_pair(run, data, steps)
    wait_for(run / "checkpoints" / "2", pair, log0, "checkpoint 2")
    pair[1].send_signal(signal.SIGTERM)  # one process only: the other learns it through jax
    wait_all(pair, run, timeout=120)
    logs = [pathlib.Path(f"{run}.{i}.log").read_text() for i in range(2)]
    assert "patchdiff: process 0 of 2" in logs[0] and "4 of 8 devices" in logs[0]
    assert "patchdiff: process 1 of 2" in logs[1] and "(cpu:" in logs[1]
    stops = [
        int(line.split()[3]) for text in logs for line in text.splitlines() if "stopping at" in line
    ]
    assert len(stops) == 2 and stops[0] == stops[1] and 2 <= stops[0] < 8, stops
    assert checkpoints(run)[-1] == stops[0]

    pair = start_pair(run, data, steps)  # resumes, and is killed after its next checkpoint
    wait_for(run / "checkpoints" / str(stops[0] + 1), pair, log0, "a checkpoint after resuming")
    for p in pair:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert [p.returncode for p in pair] == [-signal.SIGKILL] * 2, "ended before the kill"
    assert 8 not in checkpoints(run)

    pair = start_pair(run, data, steps)  # resumes from the newest whole checkpoint
    wait_all(pair, run)
    config = tiny_config(data)
    for key, value in OVERRIDES.items():
        group, name = key.split(".")
        setattr(config[group], name, value)
    _, a, meta_a = restore_latest(config, tmp_path / "one")
    _, b, meta_b = restore_latest(config, run)
    assert meta_a["step"] == meta_b["step"] == 8
    assert meta_a["position"] == meta_b["position"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-7)


def test_the_fixed_order_mean_adds_the_devices_in_order():
    """fixed_order_mean is the sequential float32 sum of the devices' values in mesh order,
    divided by their count: data movement (all-to-all, all-gather) around one local sum."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from patchdiff.train.step import fixed_order_mean

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    scales = 10.0 ** rng.integers(-3, 4, (8, 37))  # orders of magnitude: the order matters
    values = {
        "a": (rng.standard_normal((8, 37)) * scales).astype(np.float32),
        "b": rng.standard_normal((8, 3, 2)).astype(np.float32),
    }
    f = jax.jit(
        jax.shard_map(
            lambda t: fixed_order_mean(jax.tree.map(lambda v: v[0], t), "data", 8),
            mesh=mesh,
            in_specs=PartitionSpec("data"),
            out_specs=PartitionSpec(),
            check_vma=False,
        )
    )
    got = f(jax.device_put(values, NamedSharding(mesh, PartitionSpec("data"))))
    for name, v in values.items():
        total = v[0].copy()
        for row in v[1:]:
            total = total + row  # float32, in device order
        np.testing.assert_array_equal(np.asarray(got[name]), total / np.float32(8))

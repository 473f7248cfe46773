"""Training throughput of the CIFAR-10 DDPM++ U-Net: full-size vs Patch Diffusion's mixture,
float32 vs bfloat16 compute, on the present device(s).

    python -m benchmarks.train_throughput                       # all devices of this process
    python -m benchmarks.train_throughput --devices 1,8         # CPU: 1 vs 8 fake devices
    python -m benchmarks.train_throughput --batch 256 --steps 20   # on a GPU
    python -m benchmarks.train_throughput --gns on,off   # the gradient noise scale's cost
    EDM_SRC=~/edm python -m benchmarks.train_throughput --peer edm --peer-python ~/tv/bin/python \
        --config ml_collections_configs/cifar10_ddpmpp.py --modes full --dtypes float32   # vs edm

Each row runs the real jitted train step (loss, gradients, Adam, EMA, sharded over a data mesh)
on a synthetic batch already on the devices, so it measures the step and not the input
pipeline. Patch mode follows the training plan (32 / 16 / 8 pixel crops with probabilities 0.5 /
0.3 / 0.2, the batch x1 / x2 / x4), one compiled program per crop size. MFU is the train step's
FLOPs (XLA cost analysis of the compiled step) per second over the device's peak: the published
dense peak for known GPUs/TPUs, `--peak-tflops`, or on a CPU the rate of a large float32 matmul
measured here (so CPU MFU reads as 'share of this CPU's matmul speed'). `--devices` runs one
subprocess per device count (fake CPU devices via XLA_FLAGS). Prints a table and writes
benchmarks/results/train_throughput.json (or --out).

`--peer edm` also runs NVlabs/edm's own training step on the same network, batch and device, in
a subprocess (`benchmarks/peers/edm_step.py`) under `--peer-python` (a Python with torch; neither
torch nor edm is a dependency of this project) with the edm checkout at EDM_SRC, after ours, and
prints ours / edm in images per second: in float32, and on a GPU also against edm's fp16.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json
from benchmarks.model_cost import load_config
from patchdiff import config as config_lib
from patchdiff import data as data_lib
from patchdiff.models import build_model, init_params
from patchdiff.models.cost import count_params
from patchdiff.tables import format_table
from patchdiff.train.loop import make_mesh
from patchdiff.train.optim import build_optimizer
from patchdiff.train.state import create_state, state_shardings
from patchdiff.train.step import make_train_step

# Dense peak TFLOP/s per chip: (float32 matrix, bfloat16 matrix), from the vendors' data sheets.
PEAKS = {
    "H100": (494.7, 989.4),
    "H200": (494.7, 989.4),
    "A100": (156.0, 312.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5": (197.0, 197.0),
}


def cpu_peak_tflops() -> float:
    """The float32 matmul rate this CPU reaches (2048^3, median of 5), in TFLOP/s."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / float(np.median(times)) / 1e12


def device_peak(dtype: str, override: float | None):
    if override:
        return override, "given"
    kind = jax.devices()[0].device_kind
    for name, (fp32, bf16) in PEAKS.items():
        if name in kind:
            return (bf16 if dtype == "bfloat16" else fp32) * jax.device_count(), "data sheet"
    return cpu_peak_tflops() * (1 if jax.default_backend() == "cpu" else jax.device_count()), (
        "measured matmul"
    )


def synthetic_training(config):
    """(state, step_fn, mesh, batch_sharding): `config`'s real train step, sharded as in training,
    on a state whose parameters are all 0.01 (no init program to compile)."""
    config_lib.validate(config)
    mesh, rules = make_mesh(config)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    model = build_model(config)
    optimizer = build_optimizer(config.train)
    shardings, abstract = state_shardings(model, optimizer, config, mesh, rules)
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), abstract.params)
    state = jax.device_put(create_state(model, optimizer, config, params), shardings)
    step_fn = make_train_step(model, optimizer, config, shardings, batch_sharding)
    return state, step_fn, mesh, batch_sharding


class Runner:
    """One row's train step, compiled and warmed up; `run()` times `steps` steps of `mode`
    ("full" or "patch") and returns the seconds; `result(seconds)` the row's rates and FLOPs."""

    def __init__(self, config, mode: str, steps: int):
        if mode == "full":
            config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
        self.state, self.step_fn, mesh, batch_sharding = synthetic_training(config)
        res, ch = config.data.resolution, config.data.channels

        self.batches, self.flops, self.compile_s = {}, {}, 0.0
        self.plan = [data_lib.step_plan(config, s) for s in range(steps)]
        for patch, size in sorted(set(self.plan)):
            batch = {
                "image": jnp.zeros((size, res, res, ch)),
                "label": jnp.zeros((size,), jnp.int32),
            }
            self.batches[patch] = jax.device_put(batch, batch_sharding)
            start = time.perf_counter()
            compiled = self.step_fn.lower(self.state, self.batches[patch], patch).compile()
            self.compile_s += time.perf_counter() - start
            # XLA's cost analysis of an SPMD program counts one device's share: scale to the mesh.
            self.flops[patch] = xla_flops_of(compiled) * mesh.devices.size
            self.state, _ = self.step_fn(self.state, self.batches[patch], patch)  # warm-up
        jax.block_until_ready(self.state)

    def run(self) -> float:
        start = time.perf_counter()
        for patch, _ in self.plan:
            self.state, metrics = self.step_fn(self.state, self.batches[patch], patch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start

    def result(self, seconds: float) -> dict:
        steps = len(self.plan)
        examples = sum(size for _, size in self.plan)
        total_flops = sum(self.flops[patch] for patch, _ in self.plan)
        return {
            "examples_per_s": examples / seconds,
            "step_s": seconds / steps,
            "tflops_per_s": total_flops / seconds / 1e12,
            "compile_s": self.compile_s,
            "mean_examples_per_step": examples / steps,
        }


def xla_flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis["flops"])


EDM_DDPMPP_PARAMS = 55_732_739  # edm's EDMPrecond(SongUNet) with train.py --arch=ddpmpp


def check_peer(args):
    """Ends the run with one sentence when `--peer edm` cannot run, before anything is timed."""
    source = os.environ.get("EDM_SRC", "")
    if not source or not os.path.isfile(os.path.join(source, "training", "networks.py")):
        sys.exit(
            f"train_throughput: --peer edm needs EDM_SRC set to an NVlabs/edm checkout (a folder "
            f"with training/networks.py); EDM_SRC={source!r}."
        )
    config = load_config(args.config)
    config.model.num_classes = 0
    model = build_model(config)
    params = jax.eval_shape(lambda k: init_params(model, k, config), jax.random.key(0))
    if count_params(params) != EDM_DDPMPP_PARAMS:
        sys.exit(
            f"train_throughput: --peer edm times EDM's CIFAR-10 DDPM++ ({EDM_DDPMPP_PARAMS:,} "
            f"parameters), but --config {args.config} builds {count_params(params):,}: use "
            f"ml_collections_configs/cifar10_ddpmpp.py."
        )
    probe = subprocess.run([args.peer_python, "-c", "import torch"], capture_output=True)
    if probe.returncode:
        sys.exit(
            f"train_throughput: --peer edm needs torch, which {args.peer_python} cannot import; "
            f"pass --peer-python a Python that has it."
        )


class Peer:
    """edm's step (`benchmarks/peers/edm_step.py --serve`) in a subprocess, warmed up; `run()`
    times `steps` of its steps and returns the seconds."""

    def __init__(self, args, dtype: str):
        command = [
            args.peer_python,
            os.path.join(os.path.dirname(__file__), "peers", "edm_step.py"),
            "--serve",
            "--batch",
            str(args.batch),
            *(["--fp16"] if dtype == "float16" else []),
        ]
        self.dtype, self.steps, self.batch = dtype, args.steps, args.batch
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.about = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"train_throughput: edm's step ended (exit {self.process.wait()}).")
        return json.loads(line)

    def run(self) -> float:
        self.process.stdin.write(f"{self.steps}\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self):
        self.process.stdin.close()
        self.process.wait()

    def result(self, seconds: float) -> dict:
        return {
            "impl": f"edm (torch {self.about['torch']})",
            "devices": 1,
            "mode": "full",
            "dtype": self.dtype,
            "gns": "off",
            "examples_per_s": self.batch * self.steps / seconds,
            "step_s": seconds / self.steps,
            "compile_s": self.about["warmup_s"],
            "params": self.about["params"],
        }


def with_flops(peer_rows, rows) -> list[dict]:
    """The peer's TFLOP/s and MFU, counting its step as ours: the same network and loss, so the
    same FLOPs per image (XLA's count of our full-size step); fp16 against the 16-bit peak."""
    ours = [r for r in rows if r["mode"] == "full"]
    for peer in peer_rows:
        match = [r for r in ours if r["dtype"] == peer["dtype"]] or ours
        peak = [r for r in rows if (r["dtype"] != "float32") == (peer["dtype"] != "float32")]
        if match and peak:
            per_image = match[0]["tflops_per_s"] / match[0]["examples_per_s"]
            peer["tflops_per_s"] = per_image * peer["examples_per_s"]
            peer["mfu"] = peer["tflops_per_s"] / peak[0]["peak_tflops"]
            peer["peak_source"] = peak[0]["peak_source"]
    return peer_rows


def ratios(rows) -> list[str]:
    """'ours full float32 gns on / edm float32: 1.23x' for every pair of full-size rows."""
    ours = [r for r in rows if r["impl"] == "patchdiff" and r["mode"] == "full"]
    lines = []
    for peer in (r for r in rows if r["impl"].startswith("edm")):
        for row in ours:
            lines.append(
                f"ours {row['dtype']} (gns {row['gns']}, {row['devices']} device(s)) / "
                f"{peer['impl']} {peer['dtype']}: "
                f"{row['examples_per_s'] / peer['examples_per_s']:.2f}x images/s"
            )
    return lines


def run_here(args) -> list[dict]:
    """Every row's step compiled first, then `--rounds` rounds that time each row (and the peer)
    in turn, so that all see the same state of a shared machine; each row reports its median
    round, and its fastest and slowest step times."""
    runners, rows = [], []
    for dtype in args.dtypes.split(","):
        peak, peak_source = device_peak(dtype, args.peak_tflops)
        for mode, gns in itertools.product(args.modes.split(","), args.gns.split(",")):
            config = load_config(args.config)
            config.model.dtype = dtype
            config.train.batch_size = args.batch
            config.train.grad_noise_scale = gns == "on"
            runners.append(Runner(config, mode, args.steps))
            rows.append(
                {
                    "impl": "patchdiff",
                    "devices": jax.device_count(),
                    "mode": mode,
                    "dtype": dtype,
                    "gns": gns,
                    "peak_tflops": peak,
                    "peak_source": peak_source,
                }
            )
            print(f"{mode} {dtype} gns {gns} compiled", file=sys.stderr, flush=True)
    if args.peer:
        peer_dtypes = ["float32"] + (["float16"] if jax.default_backend() == "gpu" else [])
        for dtype in peer_dtypes:
            runners.append(Peer(args, dtype))
            rows.append({})
    seconds = [[] for _ in runners]
    for round_index in range(args.rounds):
        for times, runner in zip(seconds, runners, strict=True):
            times.append(runner.run())
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    for row, runner, times in zip(rows, runners, seconds, strict=True):
        row.update(runner.result(float(np.median(times))))
        row["step_s_min"], row["step_s_max"] = min(times) / args.steps, max(times) / args.steps
        row["rounds"] = len(times)
        if "peak_tflops" in row:
            row["mfu"] = row["tflops_per_s"] / row["peak_tflops"]
        if isinstance(runner, Peer):
            runner.close()
    ours = [r for r in rows if r["impl"] == "patchdiff"]
    return ours + with_flops([r for r in rows if r["impl"] != "patchdiff"], ours)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml_collections_configs/cifar10_ddpmpp_patch.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1, help="timings per row, alternated")
    parser.add_argument("--modes", default="full,patch")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--gns", default="on", help="on,off: the step with and without the "
                        "gradient noise scale's two half-batch gradients")  # fmt: skip
    parser.add_argument("--devices", default="", help="e.g. 1,8: one subprocess per count (CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--peer", default="", choices=["", "edm"],
                        help="edm: also time NVlabs/edm's step (EDM_SRC, torch)")  # fmt: skip
    parser.add_argument("--peer-python", default=sys.executable,
                        help="the Python (with torch) that runs the peer")  # fmt: skip
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps {args.steps} and --rounds {args.rounds} must both be at least 1")
    if bad := set(args.gns.split(",")) - {"on", "off"}:
        parser.error(f"--gns {args.gns!r}: each value must be on or off, not {sorted(bad)}")
    if args.peer:
        check_peer(args)
        if args.devices:
            parser.error("--peer runs in this process's device set; leave out --devices")
    env = environment()  # at the start: the commit that runs, not the one at the end

    if args.devices:
        rows = []
        for count in args.devices.split(","):
            sub_env = dict(
                os.environ,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
                JAX_PLATFORMS="cpu",
            )
            sub = [
                "--config",
                args.config,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--modes",
                args.modes,
                "--dtypes",
                args.dtypes,
                "--gns",
                args.gns,
                "--rounds",
                str(args.rounds),
                "--rows-only",
            ]
            if args.peak_tflops:
                sub += ["--peak-tflops", str(args.peak_tflops)]
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.train_throughput", *sub],
                env=sub_env,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(f"the run on {count} device(s) failed:\n{out.stderr[-3000:]}")
            rows += json.loads(out.stdout.strip().splitlines()[-1])
    else:
        rows = run_here(args)
    if args.rows_only:
        print(json.dumps(rows))
        return

    print(
        f"{env['device']}, jax {env['jax']}, {args.config}, global batch {args.batch} at full "
        f"size, {args.steps} timed steps, commit {env['commit']}, {env['date']}"
    )
    print(
        format_table(
            rows,
            [
                "impl",
                "devices",
                "mode",
                "dtype",
                "gns",
                "examples_per_s",
                "step_s",
                "step_s_min",
                "step_s_max",
                "tflops_per_s",
                "mfu",
                "peak_source",
                "compile_s",
            ],
        )
    )
    for line in ratios(rows):
        print(line)
    path = write_json(
        "train_throughput", {"environment": env, "args": vars(args), "rows": rows}, args.out
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

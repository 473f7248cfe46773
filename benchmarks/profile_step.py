"""Where a full-size train step's time goes: a jax.profiler trace of the compiled step, its events
joined to the optimised HLO and summed by kind of work.

    python -m benchmarks.profile_step --config ml_collections_configs/cifar10_ddpmpp.py
    python -m benchmarks.profile_step --xla-defaults   # compiled with XLA:CPU's own libraries

Kinds: convolution forward / input gradient / weight gradient (from each op's jax name and
shape), layout copies (transposes XLA inserts around library calls), matrix products, GroupNorm,
dropout's random bits, the optimizer/EMA update, and the rest by jax primitive. A library call
that runs on its own thread pool can end before the work it started (XLA:CPU's Eigen
convolutions do): the table therefore also gives "not in any event", the step's time that no
event covers, which is where such work shows. Prints the table; writes
benchmarks/results/profile_step.json (or --out).
"""

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json
from benchmarks.model_cost import load_config
from benchmarks.train_throughput import synthetic_training
from patchdiff import xla_cpu
from patchdiff.tables import format_table


def kind_of(hlo_line: str, name: str) -> str:
    """The kind of work of one HLO instruction, from its jax op name and output shape."""
    op = re.search(r'op_name="([^"]+)"', hlo_line)
    op = op.group(1) if op else ""
    backward = "transpose(" in op
    shape = hlo_line.split(" = ", 1)[1].split(" ", 1)[0]
    primitive = op.rsplit("/", 1)[-1]
    if "conv_general_dilated" in primitive and "copy" not in name:
        if not backward:
            return "conv forward"
        weight = re.match(r"f32\[(\d+),(\d+),(\d+),(\d+)\]", shape)
        # weight gradients are [kh, kw, C_in, C_out] or XLA's [C_in, kh, kw, C_out]
        small = weight and sorted(int(d) for d in weight.groups())[:2] in ([1, 1], [3, 3])
        return "conv weight gradient" if small else "conv input gradient"
    if "copy" in name or "transpose" in name:
        return "layout copies"
    if "dot_general" in primitive:
        return "matrix products"
    if "/norm" in op or "GroupNorm" in op:
        return "groupnorm"
    if "random_bits" in op or "threefry" in op or "Dropout" in op:
        return "dropout random bits"
    if any(k in op for k in ("update", "adam", "ema", "cond/branch")):
        return "optimizer and EMA"
    return f"other: {primitive}" if primitive else "other (no jax op name)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml_collections_configs/cifar10_ddpmpp.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gns", default="off", choices=["on", "off"])
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile without patchdiff.xla_cpu's options")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()
    if args.xla_defaults:
        xla_cpu.compiler_options = lambda: None  # the step is built below, after this
    config = load_config(args.config)
    config.train.batch_size = args.batch
    config.train.grad_noise_scale = args.gns == "on"
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    state, step, _, batch_sharding = synthetic_training(config)
    res, ch = config.data.resolution, config.data.channels
    images, labels = jnp.zeros((args.batch, res, res, ch)), jnp.zeros((args.batch,), jnp.int32)
    batch = jax.device_put({"image": images, "label": labels}, batch_sharding)
    hlo = step.lower(state, batch, res).compile().as_text()
    lines = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if match:
            lines[match.group(1)] = line
    for _ in range(2):  # compile and warm up
        state, metrics = step(state, batch, res)
    jax.block_until_ready(state)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        state, metrics = step(state, batch, res)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            state, metrics = step(state, batch, res)
            jax.block_until_ready(state)
            traced_s = time.perf_counter() - start
        trace = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
        if not trace:
            sys.exit("profile_step: jax.profiler wrote no trace on this platform.")
        events = json.load(gzip.open(trace[0]))["traceEvents"]
    by_kind, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in lines:
            kind = kind_of(lines[event["name"]], event["name"])
            by_kind[kind] += event["dur"] / 1e6
            count[kind] += 1
    covered = sum(by_kind.values())
    rows = [
        {"kind": kind, "s": s, "share": s / traced_s, "events": count[kind]}
        for kind, s in by_kind.most_common()
        if s >= 0.002 * traced_s
    ]
    rows.append(
        {"kind": "not in any event", "s": traced_s - covered, "share": 1 - covered / traced_s}
    )
    setup = "XLA's defaults" if args.xla_defaults else f"options {xla_cpu.compiler_options()}"
    print(
        f"{env['device']}, jax {env['jax']}, {args.config}, batch {args.batch}, gns {args.gns}, "
        f"{setup}; step {np.median(times):.2f} s untraced, {traced_s:.2f} s traced; commit "
        f"{env['commit']}, {env['date']}"
    )
    print(format_table(rows, ["kind", "s", "share", "events"]))
    path = write_json(
        "profile_step",
        {"environment": env, "args": vars(args), "step_s": times, "traced_s": traced_s,
         "rows": rows},
        args.out,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

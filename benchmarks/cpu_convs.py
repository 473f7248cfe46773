"""3x3 convolutions on the CPU: forward, input gradient and weight gradient, under XLA:CPU's
default libraries, under this project's options (`patchdiff.xla_cpu`: YNNPACK's convolutions
off, Eigen's on), and in PyTorch (oneDNN) when `--peer-python` names a Python with torch.

    python -m benchmarks.cpu_convs
    python -m benchmarks.cpu_convs --peer-python ~/tv/bin/python

Shapes (batch, size, C_in, C_out): the CIFAR-10 DDPM++ U-Net's at batch 8 (32x32 and 16x16 at 256
channels, a decoder conv from 512) and the demo's (Fashion-MNIST, P=2 stem: 16x16 and 8x8 at 32
and 64 channels, batch 64). Each figure is the median of --iters calls after two warm-ups, the
same inputs for every library. Prints a table (ms and GFLOP/s) and writes
benchmarks/results/cpu_convs.json (or --out).
"""

import argparse
import json
import os
import subprocess
import sys

import jax

from benchmarks.common import environment, time_fn, write_json
from patchdiff import xla_cpu
from patchdiff.tables import format_table

SHAPES = [
    (8, 32, 256, 256),
    (8, 16, 256, 256),
    (8, 32, 512, 256),
    (64, 16, 32, 32),
    (64, 8, 64, 64),
    (64, 16, 64, 32),
]
PASSES = ("forward", "input_grad", "weight_grad")

TORCH_SCRIPT = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
iters, shapes, out = int(sys.argv[2]), json.loads(sys.argv[3]), []
conv = torch.nn.functional.conv2d
for b, size, cin, cout in shapes:
    x = torch.randn(b, cin, size, size); w = torch.randn(cout, cin, 3, 3) * 0.05
    g = torch.randn(b, cout, size, size)
    fns = {
        "forward": lambda: conv(x, w, padding=1),
        "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1),
        "weight_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1),
    }
    for name, fn in fns.items():
        fn(); fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
        out.append({"shape": [b, size, cin, cout], "pass": name, "s": statistics.median(times)})
print(json.dumps({"torch": torch.__version__, "rows": out}))
"""


def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def programs(options):
    """{pass: jitted fn(x, w, g)} compiled with `options` (None: XLA's defaults)."""
    kwargs = {"compiler_options": options} if options else {}
    return {
        "forward": jax.jit(lambda x, w, g: conv(x, w), **kwargs),
        "input_grad": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0], **kwargs),
        "weight_grad": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1], **kwargs),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--peer-python", default="", help="a Python with torch: adds its row")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()
    ours = xla_cpu.compiler_options()
    if not ours:
        sys.exit("cpu_convs: patchdiff.xla_cpu sets no options here (not a CPU, or XLA_FLAGS "
                 "already chooses the YNN fusion types); nothing to compare.")  # fmt: skip
    setups = {"xla default (ynnpack)": None, "patchdiff (eigen)": ours}
    times = {}
    for b, size, cin, cout in SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (b, size, size, cin))
        w = jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.05
        g = jax.random.normal(keys[2], (b, size, size, cout))
        for setup, options in setups.items():
            fns = programs(options)
            for name in PASSES:
                times[(b, size, cin, cout), name, setup] = time_fn(
                    fns[name], x, w, g, iters=args.iters
                )["median"]
        print(f"{b}x{size}x{size}x{cin}->{cout} done", file=sys.stderr, flush=True)
    torch_version = ""
    if args.peer_python:
        threads = str(os.cpu_count())  # XLA:CPU's thread pool uses every core too
        out = subprocess.run(
            [args.peer_python, "-c", TORCH_SCRIPT, threads, str(args.iters), json.dumps(SHAPES)],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"cpu_convs: the torch run failed:\n{out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        torch_version = result["torch"]
        setups[f"torch {torch_version} (onednn)"] = None
        for row in result["rows"]:
            key = (tuple(row["shape"]), row["pass"], f"torch {torch_version} (onednn)")
            times[key] = row["s"]
    rows = []
    for shape in SHAPES:
        b, size, cin, cout = shape
        gflop = 2 * b * size * size * cin * cout * 9 / 1e9
        for name in PASSES:
            row = {"shape": f"{b}x{size}x{size}x{cin}->{cout}", "pass": name}
            for setup in setups:
                seconds = times[shape, name, setup]
                row[f"{setup} ms"] = seconds * 1e3
                row[f"{setup} GFLOP/s"] = gflop / seconds
            rows.append(row)
    print(f"{env['device']}, jax {env['jax']}, commit {env['commit']}, {env['date']}")
    print(format_table(rows))
    path = write_json(
        "cpu_convs",
        {"environment": env, "args": vars(args), "options": ours, "torch": torch_version,
         "rows": rows},
        args.out,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

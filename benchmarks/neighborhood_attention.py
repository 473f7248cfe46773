"""Neighborhood attention forward and forward+backward: our Pallas kernels against the exact XLA
halo tiles, dense masked attention and (where `import natten` works) NATTEN in torch, on one
device, same inputs, one run.

    python -m benchmarks.neighborhood_attention                 # HDiT-like shapes (GPU/TPU)
    python -m benchmarks.neighborhood_attention --write-table   # ... and record for impl="auto"
    python -m benchmarks.neighborhood_attention --quick         # small shapes, xla vs dense (CPU)

Glossary: B batch, H x W the token grid, N heads (key/value heads too: NATTEN takes no GQA), D
head dim, K the window side. Shapes are BxHxWxNxD: 64 x 64 and 128 x 128 tokens, D = 64 and
widths N * D of 256 and 768, as in HDiT's neighborhood levels (Crowson et al. 2024). FLOPs are
the ideal ones, 4 B S N D K^2 forward and 3.5x that forward+backward (FlashAttention's counting;
our kernels compute 4-11x more logits, see `kernels.neighborhood.pallas`). The forward+backward
is one jitted `jax.vjp`. Every output is checked against `xla` before its time counts; the dense
oracle is left out where its S x S float32 logits would pass --dense-gib. Interpret-mode timings
mean nothing, so on a CPU our kernels are reported as unavailable, not timed. Prints a table and
writes benchmarks/results/neighborhood_attention.json (or --out); `--write-table` merges this
device class's forward+backward milliseconds into the "neighborhood" table of kernels/measured.json.
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, merge_measured, time_fn, write_json
from kernels.attention import MEASURED, device_class
from kernels.neighborhood import IMPLEMENTATIONS, neighborhood_attention
from kernels.neighborhood.reference import neighborhood_attention_dense
from patchdiff.tables import format_table

SHAPES = ["8x64x64x4x64", "8x64x64x12x64", "2x128x128x4x64", "2x128x128x12x64"]
QUICK_SHAPES = ["1x16x16x2x32", "1x32x32x4x64"]


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise SystemExit(
            f"benchmarks.neighborhood_attention: --shapes takes BxHxWxNxD like 8x64x64x4x64, "
            f"not {text!r}"
        )
    return shape


def natten_timer(q, k, v, do, kernel_size, iters):
    """NATTEN's forward and forward+backward medians in seconds, with torch's own syncs; None
    where natten or a CUDA device is missing."""
    try:
        import natten
        import torch
    except ImportError:
        return None, "natten (torch) is not installed"
    if not torch.cuda.is_available():
        return None, "natten needs a CUDA device visible to torch"

    def to_torch(x):
        return torch.from_numpy(np.asarray(x, np.float32)).to("cuda", getattr(torch, str(q.dtype)))

    tq, tk, tv, tdo = (to_torch(x).requires_grad_() for x in (q, k, v, do))

    def run(backward):
        out = natten.functional.na2d(tq, tk, tv, kernel_size)
        if backward:
            out.backward(tdo)
        return out

    times = {}
    for backward in (False, True):
        for _ in range(3):
            run(backward)
        torch.cuda.synchronize()
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            run(backward)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        times[backward] = float(np.median(samples))
    return times, None


def forward_backward(fn):
    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, *vjp(do)

    return jax.jit(run)


def candidates(q, kernel_size, dense_gib):
    """{name: (fn(q, k, v) or None, why not)}: every implementation, then the dense oracle."""
    out = {}
    for name, impl in IMPLEMENTATIONS.items():
        reason = impl.why_not(q, q, q, False)

        def fn(q, k, v, name=name):
            return neighborhood_attention(q, k, v, kernel_size=kernel_size, impl=name)

        out[name] = (None, reason) if reason else (fn, None)
    batch, height, width, heads, _ = q.shape
    # Forward logits and probabilities, and the backward's copies: about 3 S x S float32 arrays.
    gib = 3 * 4 * batch * heads * (height * width) ** 2 / 2**30
    if gib > dense_gib:
        out["dense"] = (None, f"its S x S logits need ~{gib:.0f} GiB (> --dense-gib)")
    else:
        out["dense"] = (
            lambda q, k, v: neighborhood_attention_dense(q, k, v, kernel_size=kernel_size)[0],
            None,
        )
    return out


def measure(shape, dtype, kernel_size, iters, reps, only, dense_gib):
    batch, height, width, heads, dim = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
    flops = (
        4
        * batch
        * height
        * width
        * heads
        * dim
        * min(kernel_size, height)
        * min(kernel_size, width)
    )
    reference = forward_backward(
        lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=kernel_size, impl="xla")
    )
    want = [np.asarray(x, np.float32) for x in reference(q, k, v, do)]
    base = {"shape": "x".join(map(str, shape)), "K": kernel_size}
    rows = []
    for name, (fn, reason) in candidates(q, kernel_size, dense_gib).items():
        if only and name not in only:
            continue
        row = {**base, "impl": name}
        if fn is None:
            rows.append({**row, "note": reason})
            continue
        try:
            fwd, both = jax.jit(fn), forward_backward(fn)
            got = [np.asarray(x, np.float32) for x in both(q, k, v, do)]
            errors = [
                float(np.abs(g - w).max() / (np.abs(w).max() + 1e-6))
                for g, w in zip(got, want, strict=True)
            ]
            if not np.isfinite(errors).all() or max(errors) > 5e-2:
                rows.append({**row, "note": f"wrong: relative errors o/dq/dk/dv {errors}"})
                continue
            t_fwd = time_fn(fwd, q, k, v, warmup=2, iters=iters, reps=reps)["median"]
            t_both = time_fn(both, q, k, v, do, warmup=2, iters=iters, reps=reps)["median"]
        except Exception as err:  # an implementation that fails on this stack is reported
            rows.append({**row, "note": f"failed: {type(err).__name__}: {str(err)[:200]}"})
            continue
        rows.append(_timed(row, flops, t_fwd, t_both, max(errors)))
    if not only or "natten" in only:
        times, reason = natten_timer(q, k, v, do, kernel_size, iters)
        row = {**base, "impl": "natten"}
        rows.append(
            _timed(row, flops, times[False], times[True], None)
            if times
            else {**row, "note": reason}
        )
    return rows


def _timed(row, flops, t_fwd, t_both, error):
    return {
        **row,
        "fwd ms": t_fwd * 1e3,
        "fwd+bwd ms": t_both * 1e3,
        "fwd TFLOP/s": flops / t_fwd / 1e12,
        "fwd+bwd TFLOP/s": 3.5 * flops / t_both / 1e12,
        **({"max rel err": error} if error is not None else {}),
    }


def write_table(rows, dtype, path=MEASURED):
    """Merges this device class's forward+backward milliseconds into measured.json's
    "neighborhood" table (`kernels.neighborhood.choose_impl` reads it), keeping other tables."""
    entries = {}
    for row in rows:
        if "fwd+bwd ms" not in row or row["impl"] not in IMPLEMENTATIONS:
            continue
        batch, height, width, heads, dim = parse_shape(row["shape"])
        key = (height * width, dim, row["K"])
        entry = entries.setdefault(
            key,
            {"dtype": dtype, "head_dim": dim, "tokens": key[0], "kernel_size": row["K"], "ms": {}},
        )
        entry["ms"][row["impl"]] = round(row["fwd+bwd ms"], 3)
    return merge_measured(
        path,
        "neighborhood",
        device_class(),
        entries,
        lambda e: (e["tokens"], e["head_dim"], e["kernel_size"]),
        dtype,
        "benchmarks.neighborhood_attention",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, help="BxHxWxNxD ...")
    parser.add_argument("--quick", action="store_true", help="small shapes, xla and dense only")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--impls", nargs="+", default=None, help="only these (default: all)")
    parser.add_argument("--dense-gib", type=float, default=24.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3, help="calls per timed sample")
    parser.add_argument("--write-table", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()  # at the start: the commit that runs, not the one at the end
    accelerator = jax.default_backend() != "cpu"
    # bf16 on accelerators as the brief asks; float32 on a CPU, whose bf16 matmuls are emulated.
    dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    shapes = [parse_shape(s) for s in args.shapes or (QUICK_SHAPES if args.quick else SHAPES)]
    only = args.impls or (["xla", "dense"] if args.quick else None)
    known = {*IMPLEMENTATIONS, "dense", "natten"}
    if only and not set(only) <= known:
        raise SystemExit(
            f"benchmarks.neighborhood_attention: --impls takes {', '.join(sorted(known))}"
        )
    rows = []
    for shape in shapes:
        rows += measure(
            shape, jnp.dtype(dtype), args.kernel_size, args.iters, args.reps, only, args.dense_gib
        )
    columns = ["shape", "K", "impl", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s"]
    print(f"{env['device']}, {dtype}, commit {env['commit']}")
    print(format_table(rows, columns + ["max rel err", "note"]))
    payload = {
        "environment": env,
        "command": "python -m " + " ".join(["benchmarks.neighborhood_attention", *sys.argv[1:]]),
        "args": {**vars(args), "dtype": dtype},
        "rows": rows,
    }
    path = write_json("neighborhood_attention", payload, args.out)
    print(f"wrote {path}")
    if args.write_table:
        print(f"wrote {write_table(rows, dtype)}")


if __name__ == "__main__":
    main()

"""Attention forward and forward+backward TFLOP/s: our FlashAttention kernels against cuDNN, XLA,
jax's Pallas `mha` and tokamax, on one device, same inputs, one run.

    python -m benchmarks.attention                     # the issue's six shapes (GPU/TPU)
    python -m benchmarks.attention --write-table       # ... and record winners for impl="auto"
    python -m benchmarks.attention --shapes 1x512x4x64 --iters 5   # anything, e.g. on a CPU

FLOPs follow FlashAttention's counting: forward 4·B·S·T·H·D (halved when causal), forward+backward
3.5x that (the backward's five matmuls against the forward's two). Layout [B, S, H, D] for every
implementation (no transposes outside them). Inputs are bf16 by default; the forward+backward
time is one jitted `jax.vjp` (forward, then dq, dk, dv). Times are medians after warm-up; short
calls are dispatched back to back (`--reps`). Every output is checked against the XLA reference
before its time counts. Prints a table and writes benchmarks/results/attention.json (or --out);
`--write-table` merges this device class's forward+backward figures into kernels/measured.json.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from benchmarks.common import environment, merge_measured, time_fn, write_json
from kernels.attention import IMPLEMENTATIONS, MEASURED, device_class
from patchdiff.tables import format_table

# (B, S, H, D) from the kernels issue: long and short sequences, D 64 and 128.
SHAPES = ["4x4096x16x64", "2x8192x16x128", "16x1024x16x64", "64x256x8x64", "4x4096x32x64"]
SHAPES.append("4x4096x16x128")
CPU_SHAPES = ["2x512x4x64", "1x1024x4x128"]  # XLA's S x T logits for the ones above swamp a CPU


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise SystemExit(
            f"benchmarks.attention: --shapes takes BxSxHxD like 4x4096x16x64, not {text!r}"
        )
    return shape


def pallas_mha(q, k, v, *, causal):
    """jax's own Pallas-Triton FlashAttention (jax.experimental.pallas.ops.gpu.attention)."""
    from jax.experimental.pallas.ops.gpu import attention as ops

    return ops.mha(q, k, v, segment_ids=None, sm_scale=q.shape[-1] ** -0.5, causal=causal)


def tokamax_attention(q, k, v, *, causal):
    import tokamax

    return tokamax.dot_product_attention(q, k, v, is_causal=causal)


def candidates(q, causal):
    """{name: (fn(q, k, v) or None, why not)} for every implementation this script compares."""
    out = {}
    for name, impl in IMPLEMENTATIONS.items():
        reason = impl.why_not(q, q, q, causal, False, False)
        fn = lambda q, k, v, name=name: kernels.attention(q, k, v, impl=name, causal=causal)  # noqa: E731
        out[name] = (None, reason) if reason else (fn, None)
    gpu = jax.default_backend() == "gpu"
    out["pallas_mha"] = (
        (lambda q, k, v: pallas_mha(q, k, v, causal=causal), None)
        if gpu
        else (None, "jax's Pallas mha runs on GPUs")
    )
    try:
        import tokamax  # noqa: F401

        out["tokamax"] = (lambda q, k, v: tokamax_attention(q, k, v, causal=causal), None)
    except ImportError:
        out["tokamax"] = (None, "tokamax is not installed")
    return out


def forward_backward(fn):
    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, *vjp(do)

    return jax.jit(run)


def measure(shape, dtype, causal, iters, reps, only):
    batch, seq, heads, dim = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
    flops = 4 * batch * seq * seq * heads * dim / (2 if causal else 1)
    reference = forward_backward(
        lambda q, k, v: kernels.attention(q, k, v, impl="xla", causal=causal)
    )
    want = [np.asarray(x, np.float32) for x in reference(q, k, v, do)]
    rows = []
    for name, (fn, reason) in candidates(q, causal).items():
        if only and name not in only:
            continue
        row = {"impl": name, "shape": "x".join(map(str, shape)), "causal": causal}
        if fn is None:
            rows.append({**row, "note": reason})
            continue
        try:
            fwd, both = jax.jit(fn), forward_backward(fn)
            got = [np.asarray(x, np.float32) for x in both(q, k, v, do)]
            errors = [
                np.abs(g - w).max() / (np.abs(w).max() + 1e-6)
                for g, w in zip(got, want, strict=True)
            ]
            if not np.isfinite(errors).all() or max(errors) > 5e-2:
                rows.append({**row, "note": f"wrong: relative errors o/dq/dk/dv {errors}"})
                continue
            t_fwd = time_fn(fwd, q, k, v, warmup=3, iters=iters, reps=reps)
            t_both = time_fn(both, q, k, v, do, warmup=3, iters=iters, reps=reps)
        except Exception as err:  # a baseline that fails on this stack is reported, not fatal
            rows.append({**row, "note": f"failed: {type(err).__name__}: {str(err)[:200]}"})
            continue
        rows.append(
            {
                **row,
                "fwd TFLOP/s": flops / t_fwd["median"] / 1e12,
                "fwd+bwd TFLOP/s": 3.5 * flops / t_both["median"] / 1e12,
                "fwd ms": t_fwd["median"] * 1e3,
                "fwd+bwd ms": t_both["median"] * 1e3,
                "max rel err": float(max(errors)),
            }
        )
    return rows


def write_table(rows, dtype, path=MEASURED):
    """Merges this device class's forward+backward TFLOP/s into the table `impl="auto"` reads."""
    entries = {}
    for row in rows:
        if "fwd+bwd TFLOP/s" not in row or row["impl"] not in IMPLEMENTATIONS:
            continue
        batch, seq, heads, dim = parse_shape(row["shape"])
        key = (seq, dim, row["causal"])
        entry = entries.setdefault(
            key,
            {"dtype": dtype, "head_dim": dim, "seq": seq, "causal": row["causal"], "tflops": {}},
        )
        entry["tflops"][row["impl"]] = round(row["fwd+bwd TFLOP/s"], 1)
    return merge_measured(
        path,
        "devices",
        device_class(),
        entries,
        lambda e: (e["seq"], e["head_dim"], e["causal"]),
        dtype,
        "benchmarks.attention",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, help="BxSxHxD ...")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--impls", nargs="+", default=None, help="only these (default: all)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5, help="calls per timed sample")
    parser.add_argument("--write-table", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()  # at the start: the commit that runs, not the one at the end
    default = CPU_SHAPES if jax.default_backend() == "cpu" else SHAPES
    shapes = [parse_shape(s) for s in args.shapes or default]
    known = {*IMPLEMENTATIONS, "pallas_mha", "tokamax"}
    if args.impls and not set(args.impls) <= known:
        raise SystemExit(f"benchmarks.attention: --impls takes {', '.join(sorted(known))}")
    rows = []
    for shape in shapes:
        rows += measure(
            shape, jnp.dtype(args.dtype), args.causal, args.iters, args.reps, args.impls
        )
    columns = ["shape", "impl", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "fwd ms", "fwd+bwd ms"]
    print(f"{env['device']}, {args.dtype}, causal={args.causal}, commit {env['commit']}")
    print(format_table(rows, columns + ["max rel err", "note"]))
    path = write_json("attention", {"environment": env, "args": vars(args), "rows": rows}, args.out)
    print(f"wrote {path}")
    if args.write_table:
        print(f"wrote {write_table(rows, args.dtype)}")


if __name__ == "__main__":
    main()

"""Launch plans of the FlashAttention-2 Triton kernels: pure Python from shapes, and the launcher.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D], H % K == 0, G = H // K.

A launch plan (`LaunchPlan`) says everything one kernel launch needs besides the arrays: kernel
name, grid, scalar arguments (strides, lengths, scales), output shapes/dtypes, constexprs,
warps/stages. `kernels.triton_fa2.forward` and `.backward` build the plans and run them through a
`Launch` callable: `jax_triton_launch` on a GPU; on a CPU, tests/kernels/triton_host.py runs the
same plans in triton's interpreter on numpy arrays, so the tests run exactly what the GPU runs.
triton and jax_triton are imported inside `jax_triton_launch` only: the `kernels` package must
import with jax alone.
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kernels import front
from kernels.common import default_scale

INPUT_DTYPES = ("float32", "float16", "bfloat16")
MAX_HEAD_DIM = 256
PRECISIONS = ("ieee", "tf32", "tf32x3")
TUNING_KEYS = ("num_warps", "num_stages", "dot_precision")


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# Per-kernel defaults by head dim, for Ampere (A100, 164 KiB shared memory) and Hopper (H100,
# 228 KiB). Why these: the tile a program keeps (Q and the O accumulator in the forward and dQ
# kernels, K, V, dK, dV in the dK/dV kernel) lives in registers as float32 [BLOCK, D], so D = 128
# halves what D = 64 can keep and needs 8 warps to spread it; each pipeline stage buffers one
# streamed K/V (or Q/dO) tile of BLOCK x D in shared memory, so stages fall as D grows. The
# backward kernels carry twice the accumulators of the forward, hence smaller fixed blocks (the
# D <= 64 backward tiles are the Triton fused-attention tutorial's 32 x 128 / 128 x 32). Untimed
# here (no GPU): benchmarks/ on a real GPU should re-tune them.
_DEFAULTS = {
    # head dim bound: (forward, dK/dV, dQ)
    64: (KernelTuning(128, 64, 4, 3), KernelTuning(32, 128, 4, 3), KernelTuning(128, 32, 4, 3)),
    128: (KernelTuning(128, 64, 8, 2), KernelTuning(64, 64, 8, 2), KernelTuning(64, 64, 8, 2)),
    256: (KernelTuning(64, 32, 4, 2), KernelTuning(32, 32, 4, 1), KernelTuning(32, 32, 4, 1)),
}
# Hopper's larger shared memory fits a third K/V stage in the D = 128 forward (backward as above).
_HOPPER_STAGES = {128: (3, 2, 2)}


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything the plans need from the inputs: shapes, dtype, and the static options."""

    batch: int
    seq_q: int
    seq_k: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    scale: float
    has_segments: bool
    precision: str = "ieee"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: `kernel[grid](*inputs, *scalars, *outputs, **constexprs)`."""

    kernel: str  # attribute name in kernels.triton_fa2.kernels
    grid: tuple[int, int]
    inputs: tuple[str, ...]  # names of the array operands, in kernel order
    scalars: tuple  # strides, lengths, scales (runtime ints and floats)
    outputs: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype)
    constexprs: Mapping[str, object]
    num_warps: int
    num_stages: int


def strides(shape) -> tuple[int, ...]:
    """Row-major strides in elements, all but the last (kernels assume a contiguous last dim)."""
    return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape) - 1))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"triton_fa2 {name} must be a power of two >= 16 (tl.dot), got {value}.")
    return value


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def default_tuning(head_dim: int, *, hopper: bool = False) -> tuple[KernelTuning, ...]:
    """(forward, dK/dV, dQ) tunings for `head_dim` from the table above."""
    bound = min(b for b in _DEFAULTS if head_dim <= b)
    tunings = _DEFAULTS[bound]
    if hopper and bound in _HOPPER_STAGES:
        tunings = tuple(
            dataclasses.replace(t, num_stages=s)
            for t, s in zip(tunings, _HOPPER_STAGES[bound], strict=True)
        )
    return tunings


def resolve_tuning(head_dim, *, block_q=None, block_k=None, num_warps=None, num_stages=None,
                   hopper=False) -> tuple[KernelTuning, ...]:  # fmt: skip
    """Defaults with the caller's overrides applied to all three kernels."""
    overrides = {}
    if block_q is not None:
        overrides["block_m"] = _check_block("block_q", block_q)
    if block_k is not None:
        overrides["block_n"] = _check_block("block_k", block_k)
    if num_warps is not None:
        overrides["num_warps"] = int(num_warps)
    if num_stages is not None:
        overrides["num_stages"] = int(num_stages)
    return tuple(
        dataclasses.replace(t, **overrides) for t in default_tuning(head_dim, hopper=hopper)
    )


def make_problem(q, k, v, *, causal, scale, q_segment_ids, kv_segment_ids, precision="ieee"):
    """Validate the inputs (clear ValueErrors) and describe them as a `Problem`."""
    front.check_qkv(q, k, v, "triton_fa2", q_segment_ids, kv_segment_ids)
    batch, seq_q, heads, head_dim = q.shape
    dtype = jnp.dtype(q.dtype).name
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"triton_fa2 takes q, k, v of one dtype among {INPUT_DTYPES}, not {dtype}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"triton_fa2 takes head dims 1..{MAX_HEAD_DIM} (tiles of D rounded up to a power of "
            f"two stay in registers and shared memory); got D={head_dim}."
        )
    if precision not in PRECISIONS:
        raise ValueError(f"triton_fa2 dot_precision must be one of {PRECISIONS}; got {precision!r}")
    return Problem(
        batch, seq_q, k.shape[1], heads, k.shape[2], head_dim, dtype, bool(causal),
        default_scale(head_dim, scale), q_segment_ids is not None, precision,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one call (hashable: a static argument of `kernels.front`): the problem
    and the (forward, dK/dV, dQ) kernel tunings."""

    problem: Problem
    tunings: tuple[KernelTuning, KernelTuning, KernelTuning]


def _constexprs(p: Problem, t: KernelTuning) -> dict:
    return dict(
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=_block_d(p.head_dim), HEAD_DIM=p.head_dim,
        GROUP=p.group, CAUSAL=p.causal, HAS_SEGMENTS=p.has_segments, PRECISION=p.precision,
    )  # fmt: skip


def plan(p: Problem, t: KernelTuning, kernel, grid, inputs, scalars, outputs) -> LaunchPlan:
    """A `LaunchPlan` with the constexprs, warps and stages that `p` and `t` decide."""
    constexprs = _constexprs(p, t)
    return LaunchPlan(kernel, grid, inputs, scalars, outputs, constexprs, t.num_warps, t.num_stages)


def shapes(p: Problem):
    """The shapes of q, k (and v), lse and delta."""
    q = (p.batch, p.seq_q, p.heads, p.head_dim)
    kv = (p.batch, p.seq_k, p.kv_heads, p.head_dim)
    return q, kv, (p.batch, p.heads, p.seq_q), (p.batch, p.seq_q, p.heads)


def segment_strides(p: Problem) -> tuple[int, int]:
    return p.seq_q, p.seq_k  # [B, S] and [B, T] ids; unread dummies when there are none


Launch = Callable[[LaunchPlan, Mapping], tuple]


def jax_triton_launch(plan: LaunchPlan, arrays: Mapping) -> tuple:
    """Run a plan with jax_triton.triton_call (GPU only); the `Launch` forward and backward use
    unless given another."""
    import jax_triton as jt

    from kernels.triton_fa2 import kernels as triton_kernels

    dummy = jnp.zeros((1,), jnp.int32)  # segment ids the kernel never reads
    inputs = [dummy if arrays[name] is None else arrays[name] for name in plan.inputs]
    out_shapes = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for _, shape, dtype in plan.outputs]
    # jax-triton renamed out_shape to out_type (the old name still works, with a warning).
    params = inspect.signature(jt.triton_call).parameters
    out_kw = {"out_type" if "out_type" in params else "out_shape": out_shapes}
    outs = jt.triton_call(
        *inputs,
        *plan.scalars,
        kernel=getattr(triton_kernels, plan.kernel),
        grid=plan.grid,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        **out_kw,
        **plan.constexprs,
    )
    return tuple(outs)

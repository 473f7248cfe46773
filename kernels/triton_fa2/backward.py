"""The FlashAttention-2 Triton backward (Dao 2023, Algorithm 2): a dK/dV kernel and a dQ kernel.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D], G = H // K; lse
[B, H, S] float32 natural log, delta [B, S, H] float32. Both kernels recompute P from lse; GQA is
summed inside the dK/dV kernel, which loops over a kv head's G query heads. The kernels themselves
are in `kernels.triton_fa2.kernels`.
"""

import numpy as np

from kernels.common import LOG2_E
from kernels.triton_fa2 import common
from kernels.triton_fa2.common import Config, KernelTuning, Launch, LaunchPlan, Problem

_INPUTS = ("q", "k", "v", "do", "lse", "delta", "q_segment_ids", "kv_segment_ids")


def _input_strides(p: Problem) -> tuple[int, ...]:
    q, kv, lse, delta = common.shapes(p)
    st = common.strides
    return (*st(q), *st(kv), *st(kv), *st(q), *st(lse), *st(delta), *common.segment_strides(p))


def _plan(p: Problem, t: KernelTuning, kernel, outputs, rows, block, heads) -> LaunchPlan:
    """One program per (block of `rows` tokens, batch * one of `heads`); the kernel writes
    `outputs`, all of the first one's shape."""
    scalars = (
        *_input_strides(p), *common.strides(outputs[0][1]),
        p.seq_q, p.seq_k, heads, p.scale * LOG2_E, p.scale,
    )  # fmt: skip
    grid = (common.cdiv(rows, block), p.batch * heads)
    return common.plan(p, t, kernel, grid, _INPUTS, scalars, outputs)


def dkdv_plan(p: Problem, t: KernelTuning) -> LaunchPlan:
    """dK and dV, both [B, T, K, D]: one program per (key block, batch * kv head)."""
    _, kv, _, _ = common.shapes(p)
    outputs = (("dk", kv, p.dtype), ("dv", kv, p.dtype))
    return _plan(p, t, "dkdv_kernel", outputs, p.seq_k, t.block_n, p.kv_heads)


def dq_plan(p: Problem, t: KernelTuning) -> LaunchPlan:
    """dQ [B, S, H, D]: one program per (query block, batch * head)."""
    q, _, _, _ = common.shapes(p)
    return _plan(p, t, "dq_kernel", (("dq", q, p.dtype),), p.seq_q, t.block_m, p.heads)


def backward(q, k, v, q_ids, kv_ids, out, lse, do, dlse, cfg: Config, launch: Launch | None = None):
    """(dq, dk, dv): FA2 Algorithm 2 split into a dK/dV kernel and a dQ kernel, each recomputing
    P from lse. delta = rowsum(dO * O) [B, S, H] is one float32 XLA (or numpy) reduction.

    A cotangent of lse (dlse [B, H, S], or None) folds into delta: d lse_i / d s_ij = P_ij, so
    dS = P * (dP - (delta - dlse)), and the kernels need nothing extra. `launch` as in
    `kernels.triton_fa2.forward.forward`.
    """
    launch = launch or common.jax_triton_launch
    delta = (do.astype(np.float32) * out.astype(np.float32)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.astype(np.float32).transpose(0, 2, 1)
    arrays = dict(
        q=q, k=k, v=v, do=do, lse=lse, delta=delta, q_segment_ids=q_ids, kv_segment_ids=kv_ids
    )
    dk, dv = launch(dkdv_plan(cfg.problem, cfg.tunings[1]), arrays)
    (dq,) = launch(dq_plan(cfg.problem, cfg.tunings[2]), arrays)
    return dq, dk, dv

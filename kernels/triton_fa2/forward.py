"""The FlashAttention-2 Triton forward (Dao 2023, Algorithm 1): its launch plan and its run.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D]; lse [B, H, S] float32
natural log. The kernel itself is `kernels.triton_fa2.kernels.fwd_kernel`.
"""

from kernels.common import LOG2_E
from kernels.triton_fa2 import common
from kernels.triton_fa2.common import Config, KernelTuning, Launch, LaunchPlan, Problem


def forward_plan(p: Problem, t: KernelTuning) -> LaunchPlan:
    q, kv, lse, _ = common.shapes(p)
    st = common.strides
    scalars = (
        *st(q), *st(kv), *st(kv), *st(q), *st(lse), *common.segment_strides(p),
        p.seq_q, p.seq_k, p.heads, p.scale * LOG2_E,
    )  # fmt: skip
    return common.plan(
        p,
        t,
        kernel="fwd_kernel",
        grid=(common.cdiv(p.seq_q, t.block_m), p.batch * p.heads),
        inputs=("q", "k", "v", "q_segment_ids", "kv_segment_ids"),
        scalars=scalars,
        outputs=(("out", q, p.dtype), ("lse", lse, "float32")),
    )


def forward(q, k, v, q_ids, kv_ids, cfg: Config, launch: Launch | None = None):
    """(out [B, S, H, D], lse [B, H, S]) from one launch; `launch` defaults to jax-triton (looked
    up when called, so a test may swap it) and takes numpy arrays too (triton's interpreter)."""
    launch = launch or common.jax_triton_launch
    arrays = dict(q=q, k=k, v=v, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    return launch(forward_plan(cfg.problem, cfg.tunings[0]), arrays)

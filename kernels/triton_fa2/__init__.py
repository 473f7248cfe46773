"""FlashAttention-2 (Dao 2023) in Triton, called from JAX through jax-triton behind `kernels.front`.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D], H % K == 0, G = H // K.
Residuals saved for the backward pass (by the front): q, k, v, segment ids, out [B, S, H, D] and
lse [B, H, S] (float32, natural log) -- never an S x T matrix.

Modules: `common` (launch plans, pure Python from shapes, and the jax-triton launcher), `forward`
and `backward` (which plans run on which arrays), `kernels` (the @triton.jit code, imported only
by a launcher: the `kernels` package must import with jax alone). This module checks the
arguments and builds the `Config` (`configure` says what the kernels take); `kernels.front` wires
the custom VJP and the public `flash_attention` and `flash_attention_with_lse`. On a CPU,
tests/kernels/triton_host.py runs the same plans in triton's interpreter on numpy arrays.
"""

import jax

from kernels import front
from kernels.triton_fa2 import backward, forward
from kernels.triton_fa2.common import TUNING_KEYS, Config, make_problem, resolve_tuning

KERNELS = front.Kernels("triton", forward.forward, backward.backward, takes_d_lse=True)


def _is_hopper() -> bool:
    device = jax.devices()[0]
    return str(getattr(device, "compute_capability", "0")).startswith("9")


def configure(q, k, v, q_segment_ids, kv_segment_ids, options: front.Options) -> Config:
    """The checked static settings of one `flash_attention` call with the Triton kernels.

    float32, float16 or bfloat16 inputs, D up to 256. block_q / block_k override the
    per-head-dim default tiles (powers of two >= 16) of all three kernels. Tuning: num_warps,
    num_stages (all kernels), dot_precision ("ieee", the default: float32 inputs get float32
    matmuls; "tf32" or "tf32x3" trade accuracy for tensor-core speed; bf16/fp16 inputs ignore
    it). interpret=True is refused: jax-triton needs a GPU.
    """
    tuning = options.tuning
    if options.interpret:
        raise ValueError(
            "triton_fa2 has no JAX interpret mode: jax-triton needs a CUDA GPU. On a CPU its "
            "kernels run in triton's interpreter through tests/kernels/triton_host.py."
        )
    if unknown := set(tuning) - set(TUNING_KEYS):
        raise ValueError(
            f"triton_fa2 got unknown tuning options {sorted(unknown)}; known: {TUNING_KEYS}."
        )
    p = make_problem(
        q, k, v, causal=options.causal, scale=options.scale, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, precision=tuning.get("dot_precision", "ieee"),
    )  # fmt: skip
    tunings = resolve_tuning(
        p.head_dim, block_q=options.block_q, block_k=options.block_k,
        num_warps=tuning.get("num_warps"), num_stages=tuning.get("num_stages"), hopper=_is_hopper(),
    )  # fmt: skip
    return Config(p, tunings)


flash_attention, flash_attention_with_lse = front.flash_attention_api(KERNELS, configure)

__all__ = ["KERNELS", "Config", "configure", "flash_attention", "flash_attention_with_lse"]

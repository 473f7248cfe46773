"""FlashAttention for Hopper GPUs (sm90a) in Pallas Mosaic GPU, behind `kernels.front`.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D], H % K == 0.

Modules: `common` (the settings and the pieces every kernel uses: warpgroup layout, wgmma,
masks, the TMA producer), `forward` (FlashAttention-2's forward, FlashAttention-3's layout) and
`backward` (the dQ and dK/dV kernels). This module checks the arguments and builds the `Config`
(`configure` says what the kernels take); `kernels.front` wires the custom VJP and the public
`flash_attention` and `flash_attention_with_lse`.
"""

from kernels import front
from kernels.common import default_scale
from kernels.mosaic_gpu import backward, forward
from kernels.mosaic_gpu.common import DTYPES, Config

KERNELS = front.Kernels("mosaic_gpu", forward.forward, backward.backward, takes_d_lse=True)
TUNING = ("max_concurrent_steps", "pingpong", "bwd_block_q", "bwd_block_k")


def configure(q, k, v, q_segment_ids, kv_segment_ids, options: front.Options) -> Config:
    """The checked static settings of one `flash_attention` call on Hopper.

    bfloat16 or float16 inputs, D in 64/128/256 (backward: 64/128; the interpreter takes any
    D % 16 == 0), any S and T, causal, segment ids, GQA. block_q: query rows per consumer
    warpgroup (64); block_k: keys per forward step (128, 64 at D=256). Tuning:
    max_concurrent_steps (SMEM slots, 2), pingpong (stagger the two consumers, True),
    bwd_block_q / bwd_block_k (backward tiles, 64). interpret=True runs Mosaic GPU's CPU
    interpreter (see `kernels.mosaic_gpu.common`).
    """
    who = "flash_attention (Mosaic GPU)"
    front.check_qkv(q, k, v, who, q_segment_ids, kv_segment_ids)
    dim = q.shape[-1]
    if q.dtype not in DTYPES:
        raise ValueError(
            f"{who} takes bfloat16 or float16 q, k, v (wgmma multiplies 16-bit inputs); got "
            f"dtype {q.dtype}."
        )
    tuning, interpret = options.tuning, options.interpret
    if unknown := set(tuning) - set(TUNING):
        raise ValueError(f"{who} got unknown tuning arguments {sorted(unknown)}; known: {TUNING}.")
    if interpret:
        if dim % 16:  # the narrowest swizzle is 32 bytes of 16-bit values
            raise ValueError(f"{who} needs head dim % 16 == 0; got {dim}.")
    elif dim not in (64, 128, 256):
        raise ValueError(f"{who} takes head dim 64, 128 or 256; got {dim}.")
    # 64 rows per consumer is one m64 wgmma; 128 keys per step (64 at D=256, where 2 slots of K
    # and V at 128 keys would not fit next to Q in 227 KiB of SMEM) as in FlashAttention-3.
    cfg = Config(
        causal=options.causal,
        scale=default_scale(dim, options.scale),
        block_q=options.block_q or 64,
        block_k=options.block_k or (64 if dim > 128 else 128),
        bwd_block_q=tuning.get("bwd_block_q", 64),
        bwd_block_k=tuning.get("bwd_block_k", 64),
        max_concurrent_steps=tuning.get("max_concurrent_steps", 2),
        pingpong=tuning.get("pingpong", True),
        interpret=bool(interpret),
    )
    unit = 8 if interpret else 64  # wgmma rows; the interpreter has no such constraint
    for name in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"):
        if getattr(cfg, name) % unit:
            raise ValueError(f"{who} {name} must be a multiple of {unit}.")
    if cfg.max_concurrent_steps < 1:
        raise ValueError(f"{who} max_concurrent_steps must be >= 1.")
    return cfg


flash_attention, flash_attention_with_lse = front.flash_attention_api(KERNELS, configure)

__all__ = ["KERNELS", "Config", "configure", "flash_attention", "flash_attention_with_lse"]

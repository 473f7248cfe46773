"""FlashAttention for TPUs in Pallas (Mosaic TPU), behind `kernels.front`.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D], H % K == 0.

Modules: `common` (settings, tiling and layout helpers), `forward` (FlashAttention-2's forward)
and `backward` (a dK/dV kernel and a dQ kernel). This module checks the arguments and builds the
`Config` (`configure` says what the kernels take); `kernels.front` wires the custom VJP and the
public `flash_attention` and `flash_attention_with_lse`.

`interpret=True` runs everything on the CPU in TPU interpret mode with every buffer (VMEM scratch
and outputs) poisoned with NaN, so a block the kernel forgets to write shows up in the result.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from kernels import front
from kernels.common import default_scale, round_up
from kernels.pallas_tpu import backward, forward
from kernels.pallas_tpu.common import DTYPES, NUM_LANES, NUM_SUBLANES, Config

KERNELS = front.Kernels("pallas_tpu", forward.forward, backward.backward, takes_d_lse=True)
BLOCKS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
_WHO = "flash_attention (Pallas TPU)"


def _interpret_params(interpret):
    """pltpu.InterpretParams for interpret mode, None to compile (only on a TPU)."""
    if interpret is True:
        return pltpu.InterpretParams(uninitialized_memory="nan")
    if interpret is False:
        if jax.default_backend() != "tpu":
            raise ValueError(
                f"{_WHO} with interpret=False needs a TPU; this process runs on "
                f"{jax.default_backend()!r}. Pass interpret=True to run it on the CPU."
            )
        return None
    if not isinstance(interpret, pltpu.InterpretParams):
        raise ValueError(
            f"{_WHO} interpret must be a bool or pltpu.InterpretParams, not {interpret!r}."
        )
    return interpret


def _check_dtype_and_blocks(q, blocks, compiled):
    """A ValueError naming the argument for a dtype, head dim or block this backend cannot run."""
    dim = q.shape[3]
    if q.dtype not in DTYPES:
        raise ValueError(
            f"{_WHO} takes q, k, v of one dtype among float32, bfloat16, float16; got {q.dtype}."
        )
    if compiled:
        # TPU MXUs take bfloat16, not float16. Head dims below 64 (or between multiples of 64)
        # have never been compiled for a TPU here; interpret mode takes them for cheap tests.
        if q.dtype == jnp.float16:
            raise ValueError(
                f"{_WHO} takes float32 or bfloat16 on a TPU, not float16 (interpret mode takes "
                "float16)."
            )
        if dim % 64:
            raise ValueError(f"{_WHO} needs head dim D % 64 == 0, got {dim}.")
    elif dim % 8:
        raise ValueError(f"{_WHO} needs head dim D % 8 == 0, got {dim}.")
    # Blocks are the second-minor dim of q/k tiles (8 sublanes) and the lane dim of logits tiles
    # and segment-id rows (128 lanes); interpret mode only needs the former.
    multiple = NUM_LANES if compiled else NUM_SUBLANES
    for name, block in blocks.items():
        if block <= 0 or block % multiple:
            raise ValueError(
                f"{_WHO} {name}={block} must be a positive multiple of {multiple}"
                f"{' on a TPU' if compiled else ''}."
            )


def configure(q, k, v, q_segment_ids, kv_segment_ids, options: front.Options) -> Config:
    """The checked static settings of one `flash_attention` call with the TPU kernels.

    float32, bfloat16 (and float16 in interpret mode) inputs, D % 64 == 0 on a TPU (D % 8 == 0
    interpreted). block_q, block_k: forward blocks (default 512 and 128, capped at the sequence);
    tuning: block_q_bwd and block_k_bwd (both backward kernels', default 128). interpret: True
    runs TPU interpret mode on the CPU with NaN-poisoned buffers, a pltpu.InterpretParams picks
    other interpreter options, False compiles for the TPU.
    """
    blocks = {"block_q": options.block_q, "block_k": options.block_k, **options.tuning}
    if unknown := set(blocks) - set(BLOCKS):
        raise ValueError(
            f"{_WHO} got unknown tuning arguments {sorted(unknown)}; it takes {', '.join(BLOCKS)}."
        )
    front.check_qkv(q, k, v, _WHO, q_segment_ids, kv_segment_ids)
    params = _interpret_params(options.interpret)
    # Defaults: 512 queries a forward block (the [bq, D] accumulator and [bq, bk] logits stay
    # well inside the default scoped VMEM), 128 keys; 128 x 128 in the backward, whose dK/dV
    # tiles hold more live [bk, bq] float32 temporaries. Never more than the sequence, rounded up
    # to the 128 lanes a block needs.
    seq_q, seq_k = round_up(q.shape[1], NUM_LANES), round_up(k.shape[1], NUM_LANES)
    sizes = {
        "block_q": min(512, seq_q),
        "block_k": min(128, seq_k),
        "block_q_bwd": min(128, seq_q),
        "block_k_bwd": min(128, seq_k),
    }
    sizes |= {name: size for name, size in blocks.items() if size is not None}
    _check_dtype_and_blocks(q, sizes, compiled=params is None)
    scale = default_scale(q.shape[3], options.scale)
    return Config(options.causal, scale, interpret=params, **sizes)


flash_attention, flash_attention_with_lse = front.flash_attention_api(KERNELS, configure)

__all__ = ["KERNELS", "Config", "configure", "flash_attention", "flash_attention_with_lse"]

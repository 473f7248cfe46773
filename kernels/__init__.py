"""Attention kernels behind one entry point, `kernels.attention(q, k, v, impl=...)`.

Layout [B, S, H, D] (batch, tokens, heads, head dim). Implementations: `xla` (the reference, any
backend), `cudnn` (jax.nn.dot_product_attention on NVIDIA GPUs); `auto` picks per backend, dtype
and shape, including our own FlashAttention kernels (`mosaic_gpu/`, `triton_fa2/`, `pallas_tpu/`).
`kernels.neighborhood_attention(q, k, v, kernel_size=7)` is 2-D neighborhood attention on a token
grid [B, H, W, heads, D] (`neighborhood/`). Every kernel of ours sits behind `front.py`.
This package imports only jax (DESIGN.md): jax-triton, when used, is imported lazily inside it.
"""

from kernels.attention import IMPLEMENTATIONS, attention, choose_impl, device_class
from kernels.neighborhood import neighborhood_attention
from kernels.reference import attention_reference

__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "attention_reference",
    "choose_impl",
    "device_class",
    "neighborhood_attention",
]

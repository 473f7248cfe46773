"""`attention()`: one call, several implementations, chosen by name or automatically.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D].
"""

import jax
import jax.numpy as jnp

from kernels.reference import attention_reference


def _cudnn(q, k, v, *, causal=False, scale=None):
    """cuDNN's fused attention through jax.nn.dot_product_attention (NVIDIA GPUs, fp16/bf16)."""
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention impl='cudnn' needs an NVIDIA GPU; this process runs on "
            f"{jax.default_backend()!r}. Use impl='xla' or impl='auto'."
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention impl='cudnn' takes bfloat16 or float16 inputs, not {q.dtype}.")
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
    )


IMPLEMENTATIONS = {"xla": attention_reference, "cudnn": _cudnn}

# cuDNN's flash attention supports head dims that are multiples of 8 up to 128 (256 on sm90+ is
# version-dependent, so auto stays at 128 and leaves larger dims to XLA).
_CUDNN_MAX_HEAD_DIM = 128


def choose_impl(q, k, v) -> str:
    """The implementation `impl="auto"` runs for these inputs on the current backend."""
    dim = q.shape[-1]
    if (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and dim % 8 == 0
        and dim <= _CUDNN_MAX_HEAD_DIM
    ):
        return "cudnn"
    return "xla"


def attention(q, k, v, *, impl: str = "auto", causal: bool = False, scale: float | None = None):
    """Multi-head attention: q [B, S, H, D], k and v [B, T, K, D] -> [B, S, H, D].

    impl: "auto" (fastest available for the backend, dtype and shape), or one of IMPLEMENTATIONS.
    scale defaults to D ** -0.5; causal masks later keys; K < H is grouped-query attention.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention takes q, k, v as [B, S, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}."
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention needs k and v of one shape [B, T, K, D] matching q's B and D; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if impl == "auto":
        impl = choose_impl(q, k, v)
    if impl not in IMPLEMENTATIONS:
        known = ", ".join(["auto", *sorted(IMPLEMENTATIONS)])
        raise ValueError(f"attention impl={impl!r} is not known; known: {known}.")
    return IMPLEMENTATIONS[impl](q, k, v, causal=causal, scale=scale)

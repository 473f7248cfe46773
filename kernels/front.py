"""The one `custom_vjp` front every attention kernel here sits behind.

A backend supplies only its two kernels (`Kernels`); the front checks the arguments, saves what
the backward needs, reduces grouped-query gradients and says which inputs take no cotangent
(segment ids). Global attention (`kernels.attention`) and neighborhood attention
(`kernels.neighborhood_attention`) use it on every backend; a global-attention backend also gets
its public `flash_attention` and `flash_attention_with_lse` from `flash_attention_api`, so all of
them take one signature.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D], G = H / K.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from kernels.reference import check_segment_ids


@dataclasses.dataclass(frozen=True)
class Kernels:
    """A backend's kernels (hashable: a static argument of the custom_vjp).

    forward(q, k, v, q_ids, kv_ids, cfg) -> (out [B, S, H, D] in q's dtype, lse [B, H, S]
        float32 natural log, -inf for a query that sees no key).
    backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, cfg) -> (dq, dk, dv): dq like q;
        dk and dv either [B, T, K, D] or one per query head [B, T, H, D] (the front sums each
        group). d_lse (float32 [B, H, S]) is given only to a backend with `takes_d_lse=True`
        (it folds into FlashAttention's delta = rowsum(dO * O) - d_lse, as all of
        `kernels.attention`'s backends do); the others' lse is not differentiable (its cotangent
        is dropped), as their docs say.
    """

    name: str
    forward: Callable
    backward: Callable
    takes_d_lse: bool = False


def check_shapes(q, k, v, who: str, q_segment_ids=None, kv_segment_ids=None) -> None:
    """One clear error unless q [B, S, H, D], k and v [B, T, K, D] with H % K == 0, and segment
    ids, if any, [B, S] and [B, T] together. `kernels.attention` checks this much for every
    implementation (XLA takes mixed dtypes)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{who} takes q, k, v as [B, S, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}."
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{who} needs k and v of one shape [B, T, K, D] matching q's B and D; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{who}: {q.shape[2]} query heads cannot share {k.shape[2]} kv heads.")
    check_segment_ids(q, k, q_segment_ids, kv_segment_ids)


def check_qkv(q, k, v, who: str, q_segment_ids=None, kv_segment_ids=None) -> None:
    """`check_shapes`, and one dtype for q, k and v (what every kernel here multiplies)."""
    check_shapes(q, k, v, who, q_segment_ids, kv_segment_ids)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{who} takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")


def reduce_groups(grad, like):
    """A per-query-head dK or dV [B, T, H, D] summed over each group to `like`'s [B, T, K, D]
    (in float32, then `like`'s dtype); unchanged when it already has K heads."""
    if grad.shape == like.shape:
        return grad.astype(like.dtype)
    batch, seq, heads, dim = grad.shape
    kv_heads = like.shape[2]
    grad = grad.reshape(batch, seq, kv_heads, heads // kv_heads, dim).astype(jnp.float32)
    return grad.sum(3).astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _attend(kernels, q, k, v, q_ids, kv_ids, cfg):
    return kernels.forward(q, k, v, q_ids, kv_ids, cfg)


def _attend_fwd(kernels, q, k, v, q_ids, kv_ids, cfg):
    out, lse = kernels.forward(q, k, v, q_ids, kv_ids, cfg)
    return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


def _attend_bwd(kernels, cfg, residuals, cotangents):
    q, k, v, q_ids, kv_ids, out, lse = residuals
    d_out, d_lse = cotangents
    # Unused outputs arrive as instantiated zeros; only a backend that can use d_lse is given it.
    d_lse = d_lse if kernels.takes_d_lse else None
    dq, dk, dv = kernels.backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, cfg)
    # Integer segment ids take no cotangent.
    return dq.astype(q.dtype), reduce_groups(dk, k), reduce_groups(dv, v), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(kernels: Kernels, q, k, v, q_ids, kv_ids, cfg):
    """(out, lse) from `kernels`, differentiable in q, k, v (and in lse where the backend takes
    d_lse; elsewhere differentiate `out` only). cfg is the backend's hashable static config."""
    return _attend(kernels, q, k, v, q_ids, kv_ids, cfg)


def attend_out(kernels: Kernels, q, k, v, q_ids, kv_ids, cfg):
    """`attend`'s output alone: what `flash_attention` of every backend returns."""
    return attend(kernels, q, k, v, q_ids, kv_ids, cfg)[0]


@dataclasses.dataclass(frozen=True)
class Options:
    """The keyword arguments of every global-attention backend's `flash_attention`, as its
    `configure` sees them: causal (later keys masked, aligned at the end when S != T), scale
    (None: D ** -0.5), block_q and block_k (None: the backend's defaults), interpret (run the
    kernels on the CPU, for tests) and the backend's own tuning {name: value}."""

    causal: bool
    scale: float | None
    block_q: int | None
    block_k: int | None
    interpret: object
    tuning: Mapping[str, object]


def flash_attention_api(kernels: Kernels, configure: Callable) -> tuple[Callable, Callable]:
    """(flash_attention, flash_attention_with_lse) of a global-attention backend.

    configure(q, k, v, q_segment_ids, kv_segment_ids, options: Options) -> cfg checks what the
    backend cannot run (`check_qkv`, then its own dtypes, head dims, blocks, tuning names) and
    returns its static config; its docstring says what the backend takes.
    """

    def flash_attention_with_lse(
        q,
        k,
        v,
        *,
        causal=False,
        scale=None,
        q_segment_ids=None,
        kv_segment_ids=None,
        block_q=None,
        block_k=None,
        interpret=False,
        **tuning,
    ):
        options = Options(bool(causal), scale, block_q, block_k, interpret, tuning)
        cfg = configure(q, k, v, q_segment_ids, kv_segment_ids, options)
        return attend(kernels, q, k, v, q_segment_ids, kv_segment_ids, cfg)

    def flash_attention(q, k, v, **options):
        return flash_attention_with_lse(q, k, v, **options)[0]

    flash_attention.__signature__ = inspect.signature(flash_attention_with_lse)  # for help()

    where = f"{configure.__module__}.configure"
    flash_attention.__doc__ = (
        f"softmax(q k^T scale) v by the {kernels.name} kernels: q [B, S, H, D], k and v\n"
        f"[B, T, K, D] (H % K == 0) -> [B, S, H, D] in q's dtype, masked as `kernels.reference`\n"
        f"says; q_segment_ids [B, S] and kv_segment_ids [B, T] together.\n\n"
        f"Keyword arguments: `kernels.front.Options`; what this backend takes, and its tuning:\n"
        f"`{where}`."
    )
    differentiable = "both differentiable" if kernels.takes_d_lse else "out differentiable"
    flash_attention_with_lse.__doc__ = (
        f"(out [B, S, H, D], lse [B, H, S] float32 natural log, -inf for a query that sees no\n"
        f"key), {differentiable}; arguments as `flash_attention`."
    )
    for function in (flash_attention, flash_attention_with_lse):
        function.__module__ = configure.__module__
        function.__qualname__ = function.__name__
    return flash_attention, flash_attention_with_lse

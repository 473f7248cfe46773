"""The Mosaic GPU (Hopper) FlashAttention against the XLA reference.

On the CPU the kernels run in Mosaic GPU's interpreter (warpgroups, TMA, barriers and SMEM
simulated; outputs start as NaN, so an unwritten tile fails the NaN checks). The interpreter is
slow (seconds per CTA: Python threads per warpgroup and a callback per memory operation), so one
test that combines every feature runs by default and the broader ones need
MOSAIC_GPU_INTERPRET_ALL=1 (about 3 CPU-minutes). Compiled runs need an sm90 GPU.
Glossary: B batch, S/T query/key tokens, H/K query/key-value heads, D head dim.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.mosaic_gpu import flash_attention, flash_attention_with_lse
from kernels.reference import attention_reference, attention_reference_with_lse


def _inputs(shape_q, shape_kv, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], shape_q, dtype)
    k = jax.random.normal(keys[1], shape_kv, dtype)
    v = jax.random.normal(keys[2], shape_kv, dtype)
    d_out = jax.random.normal(keys[3], shape_q, dtype)
    return q, k, v, d_out


def _segments(batch, seq_q, seq_k):
    """Key padding (the last 5 keys) plus one query id no key has: that row sees nothing."""
    q_ids = jnp.ones((batch, seq_q), jnp.int32).at[:, 1].set(7)
    kv_ids = (jnp.arange(seq_k)[None] < seq_k - 5).astype(jnp.int32).repeat(batch, 0)
    return q_ids, kv_ids


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, atol=rtol * max(np.abs(want).max(), 1.0), rtol=0)


def _check(q, k, v, d_out, *, rtol, lse_cotangent=False, **kwargs):
    """Output, lse and the gradients of q, k, v against the float32 reference, from one run of
    the forward and one of the backward. lse_cotangent: differentiate lse too (only where every
    query sees a key: the reference's lse has no gradient elsewhere)."""
    blocks = {name: kwargs.pop(name) for name in list(kwargs) if "block" in name}
    kernel = functools.partial(flash_attention_with_lse, interpret=True, **blocks, **kwargs)
    (out, lse), vjp = jax.vjp(kernel, q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (want, want_lse), want_vjp = jax.vjp(
        functools.partial(attention_reference_with_lse, **kwargs), *f32
    )
    _close(out, want, rtol)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
    seen = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want_lse)[seen], atol=1e-3)
    d_out32 = d_out.astype(jnp.float32)
    if lse_cotangent:
        d_lse = jax.random.normal(jax.random.key(1), lse.shape)
        grads_want = want_vjp((d_out32, d_lse))
    else:
        d_lse = jnp.zeros(lse.shape)
        reference = functools.partial(attention_reference, **kwargs)
        grads_want = jax.vjp(reference, *f32)[1](d_out32)
    for got, want in zip(vjp((d_out, d_lse)), grads_want, strict=True):
        _close(got, want, rtol)


# Each of these takes 30-60 CPU-seconds in the interpreter.
broad = pytest.mark.skipif(
    not os.environ.get("MOSAIC_GPU_INTERPRET_ALL"),
    reason="slow in the Mosaic GPU interpreter; set MOSAIC_GPU_INTERPRET_ALL=1",
)


def test_causal_segments_gqa_one_cta():
    # S != T, T % 16 == 4, causal and segment ids (query 1 sees no key: zeros, lse -inf), H=2
    # query heads on K=1; one CTA per head and kernel, two key blocks per loop.
    q, k, v, d_out = _inputs((1, 24, 2, 16), (1, 20, 1, 16), jnp.float16)
    q_ids, kv_ids = _segments(1, 24, 20)
    _check(
        q,
        k,
        v,
        d_out,
        rtol=2e-3,
        causal=True,
        q_segment_ids=q_ids,
        kv_segment_ids=kv_ids,
        block_q=16,
        block_k=16,
        bwd_block_q=16,
        bwd_block_k=16,
    )


@broad
def test_forward_and_grads_several_ctas():
    # 2 query CTAs x 2 consumers of 16 rows, 3 key blocks through 2 slots, T % 16 == 8.
    q, k, v, d_out = _inputs((1, 40, 1, 16), (1, 40, 1, 16), jnp.float16)
    _check(q, k, v, d_out, rtol=2e-3, block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16)


@broad
def test_causal_gqa_more_queries_than_keys():
    # T < S: the first 17 queries see no key (zeros, lse -inf); H=2 share K=1 (MQA).
    q, k, v, d_out = _inputs((1, 40, 2, 32), (1, 23, 1, 32), jnp.float16)
    _check(
        q,
        k,
        v,
        d_out,
        rtol=2e-3,
        causal=True,
        block_q=16,
        block_k=16,
        bwd_block_q=16,
        bwd_block_k=16,
    )


@broad
def test_causal_fewer_queries_than_keys_bf16_lse_cotangent():
    # Every query sees a key, so lse is differentiable in the reference too.
    q, k, v, d_out = _inputs((1, 21, 2, 32), (1, 50, 2, 32), jnp.bfloat16)
    _check(
        q,
        k,
        v,
        d_out,
        rtol=2e-2,
        lse_cotangent=True,
        causal=True,
        scale=0.3,
        block_q=16,
        block_k=32,
        bwd_block_q=16,
        bwd_block_k=16,
    )


@broad
def test_segment_ids_gqa():
    q, k, v, d_out = _inputs((1, 30, 4, 16), (1, 37, 2, 16), jnp.float16)
    q_ids, kv_ids = _segments(1, 30, 37)
    _check(
        q,
        k,
        v,
        d_out,
        rtol=2e-3,
        q_segment_ids=q_ids,
        kv_segment_ids=kv_ids,
        block_q=16,
        block_k=32,
        bwd_block_q=16,
        bwd_block_k=32,
    )


@pytest.mark.parametrize(
    "dtype, dim, tuning, match",
    [
        (jnp.float32, 64, {}, "bfloat16 or float16"),
        (jnp.float16, 24, {}, "head dim"),
        (jnp.float16, 32, {"block_q": 20}, "block_q must be a multiple"),
        (jnp.float16, 32, {"pipelining": 3}, "unknown tuning"),
    ],
)
def test_rejects_what_it_cannot_run(dtype, dim, tuning, match):
    q, k, v, _ = _inputs((1, 8, 1, dim), (1, 8, 1, dim), dtype)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, interpret=True, **tuning)


def _on_hopper():
    if jax.default_backend() != "gpu":
        return False
    return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (H100/H200) GPU")
@pytest.mark.parametrize("shape", [(2, 2048, 8, 128), (2, 1000, 4, 64)])
def test_compiled_on_hopper(shape):
    batch, seq, heads, dim = shape
    q, k, v, d_out = _inputs(shape, (batch, seq, heads // 2, dim), jnp.bfloat16)
    kernel = jax.jit(functools.partial(flash_attention, causal=True))
    reference = functools.partial(attention_reference, causal=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _close(kernel(q, k, v), reference(*f32), 2e-2)
    grads_got = jax.vjp(kernel, q, k, v)[1](d_out)
    grads_want = jax.vjp(reference, *f32)[1](d_out.astype(jnp.float32))
    for got, want in zip(grads_got, grads_want, strict=True):
        _close(got, want, 5e-2)

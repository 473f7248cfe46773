"""The Pallas TPU FlashAttention against `attention_reference`, in TPU interpret mode on the CPU.

interpret=True poisons VMEM scratch and output buffers with NaN, so a block a kernel never writes
shows up as NaN (every case asserts finiteness). Blocks of 8-16 tokens make tiny shapes span
several blocks plus a remainder. Interpret mode costs ~3 s of XLA compilation a forward and
backward pair on a CPU core, plus ~5 ms a grid step, so cases are few and shapes small.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas_tpu import backward, common, flash_attention, flash_attention_with_lse, forward
from kernels.reference import attention_reference, attention_reference_with_lse

TOLERANCE = {jnp.float32: 5e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
SMALL_BLOCKS = {"block_q": 16, "block_k": 16, "block_q_bwd": 16, "block_k_bwd": 8}


def qkv(shape_q, shape_kv, dtype, seed=0):
    # numpy draws: jax.random would compile a threefry kernel per shape on the CPU.
    rng = np.random.default_rng(seed)
    shapes = (shape_q, shape_kv, shape_kv)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes]


def key_padding(batch, seq_q, seq_k):
    """Batch row 0: the last 9 keys are padding. Row 1: packed segments 1, 2 and a third query
    segment with no key at all (its queries must output 0 and pass no gradient)."""
    q_ids = np.ones((batch, seq_q), np.int32)
    kv_ids = np.ones((batch, seq_k), np.int32)
    kv_ids[0, -9:] = 0
    q_ids[1, seq_q // 3 :] = 2
    q_ids[1, 2 * seq_q // 3 :] = 3
    kv_ids[1, seq_k // 2 :] = 2
    return {"q_segment_ids": jnp.asarray(q_ids), "kv_segment_ids": jnp.asarray(kv_ids)}


def packed(batch, seq_q, seq_k):
    """Causal packing: the same segment boundaries for queries and keys, then key padding."""
    ids = np.ones((batch, seq_q), np.int32)
    ids[:, 13:] = 2
    ids[:, 30:] = 3
    kv_ids = ids.copy()
    kv_ids[:, -5:] = 0
    return {"q_segment_ids": jnp.asarray(ids), "kv_segment_ids": jnp.asarray(kv_ids)}


def relative_error(ours, theirs):
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    return np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-6)


def check_against_reference(
    shape_q, shape_kv, dtype=jnp.float32, segments=None, lse_cotangent=False, **kwargs
):
    """Output and the three gradients (random cotangent) against the float32 reference.

    lse_cotangent: differentiate `flash_attention_with_lse` with a random cotangent of lse as
    well (only where every query sees a key: the reference's lse has no gradient elsewhere).
    Both sides run under one jax.jit each: that checks the kernels compose with jit and vjp, and
    compiles two programs instead of dozens of eager ops (compiling dominates interpret mode).
    """
    q, k, v = qkv(shape_q, shape_kv, dtype)
    rng = np.random.default_rng(1)
    cotangent = jnp.asarray(rng.standard_normal(shape_q), jnp.float32)
    ids = segments(shape_q[0], shape_q[1], shape_kv[1]) if segments else {}
    options = {"causal": kwargs.pop("causal", False), "scale": kwargs.pop("scale", None), **ids}
    kwargs = {"interpret": True, **SMALL_BLOCKS, **kwargs}
    ours = functools.partial(flash_attention, **options, **kwargs)
    theirs = functools.partial(attention_reference, **options)
    if lse_cotangent:
        ours = functools.partial(flash_attention_with_lse, **options, **kwargs)
        theirs = functools.partial(attention_reference_with_lse, **options)
        lse_shape = (shape_q[0], shape_q[2], shape_q[1])  # [B, H, S]
        cotangent = (cotangent, jnp.asarray(rng.standard_normal(lse_shape), jnp.float32))

    @functools.partial(jax.jit, static_argnums=0)
    def out_and_grads(attend, q, k, v, cotangent):
        outs, vjp = jax.vjp(attend, q, k, v)
        cotangent = jax.tree.map(lambda c, o: c.astype(o.dtype), cotangent, outs)
        return jax.tree.leaves(outs)[0], *vjp(cotangent)

    got = out_and_grads(ours, q, k, v, cotangent)
    want = out_and_grads(theirs, *(x.astype(jnp.float32) for x in (q, k, v)), cotangent)
    for name, g, w, like in zip(("out", "dq", "dk", "dv"), got, want, (q, q, k, v), strict=True):
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name} has NaN/inf"
        error = relative_error(g, w)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


# Each case compiles one forward and backward program (~3 s on a CPU core), so each covers
# several features at once.
CASES = {
    # S, T: 2 and 3 blocks plus a remainder.
    "causal_longer_keys_mqa_lse_cotangent": dict(
        shape_q=(1, 40, 2, 16), shape_kv=(1, 56, 1, 16), causal=True, lse_cotangent=True
    ),
    # S > T: the first S - T queries see no key at all.
    "causal_shorter_keys": dict(shape_q=(1, 56, 2, 16), shape_kv=(1, 24, 2, 16), causal=True),
    "gqa_key_padding_and_empty_rows": dict(
        shape_q=(2, 24, 4, 16), shape_kv=(2, 40, 2, 16), segments=key_padding, scale=0.3
    ),
    "causal_packed_segments_gqa": dict(
        shape_q=(1, 40, 4, 32), shape_kv=(1, 40, 2, 32), segments=packed, causal=True
    ),
    "bfloat16_causal_gqa_key_padding": dict(
        shape_q=(2, 24, 4, 16),
        shape_kv=(2, 40, 2, 16),
        dtype=jnp.bfloat16,
        causal=True,
        segments=key_padding,
    ),
    # Backward blocks unlike the forward's: one kernel's padding must not leak into another's.
    "float16_head_dim_64_odd_blocks_mqa": dict(
        shape_q=(1, 33, 2, 64),
        shape_kv=(1, 47, 1, 64),
        dtype=jnp.float16,
        causal=True,
        block_q=8,
        block_k=32,
        block_q_bwd=32,
        block_k_bwd=16,
    ),
    # Default blocks (128 lanes, capped at the sequence): one block, mostly padding; the only
    # case whose keys are masked by padding alone.
    "default_blocks": dict(
        shape_q=(1, 17, 2, 64),
        shape_kv=(1, 29, 2, 64),
        block_q=None,
        block_k=None,
        block_q_bwd=None,
        block_k_bwd=None,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    check_against_reference(**CASES[case])


def test_lse_matches_reference_including_empty_rows():
    q, k, v = qkv((2, 24, 2, 16), (2, 40, 2, 16), jnp.float32)
    ids = key_padding(2, 24, 40)
    out, lse = flash_attention_with_lse(q, k, v, block_q=8, block_k=16, interpret=True, **ids)
    ref, ref_lse = jax.jit(attention_reference_with_lse)(q, k, v, **ids)
    assert np.isneginf(ref_lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    seen = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(ref_lse)[seen], atol=1e-5)
    assert relative_error(out, ref) <= TOLERANCE[jnp.float32]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=(1, 8, 2, 12)), "head dim D % 8"),
        (dict(dtype=jnp.int32), "one dtype among"),
        (dict(k=(1, 8, 3, 16)), "cannot share"),
        (dict(block_q=12), "block_q=12 must be a positive multiple of 8"),
        (dict(block_k_bwd=0), "block_k_bwd=0"),
        (dict(block_kv=16), "unknown tuning arguments"),
        (dict(interpret="yes"), "interpret must be a bool"),
        (dict(q_segment_ids=jnp.ones((1, 8), jnp.int32)), "together"),
    ],
)
def test_rejects_unsupported_inputs(kwargs, message):
    q = jnp.zeros(kwargs.pop("q", (1, 8, 2, 16)), kwargs.pop("dtype", jnp.float32))
    k = jnp.zeros(kwargs.pop("k", (1, 8, 2, q.shape[-1])), q.dtype)
    kwargs = {"interpret": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, k, **kwargs)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the error off a TPU")
def test_compiled_path_needs_a_tpu():
    q = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a TPU"):
        flash_attention(q, q, q)


@pytest.mark.parametrize(
    "shape_q, shape_kv, dtype, causal, segments",
    [
        ((2, 1000, 8, 64), (2, 777, 2, 64), jnp.bfloat16, True, True),
        ((1, 256, 4, 128), (1, 384, 4, 128), jnp.float32, False, False),
    ],
)
def test_kernels_lower_to_mosaic(shape_q, shape_kv, dtype, causal, segments):
    """Exporting for the TPU platform runs Pallas's Mosaic lowering on the CPU: every op has a TPU
    lowering rule and every BlockSpec passes the (8, 128) tiling check at the default blocks.
    What only a TPU can check is Mosaic's own compile (layouts, VMEM) and the numbers."""
    q, k = jax.ShapeDtypeStruct(shape_q, dtype), jax.ShapeDtypeStruct(shape_kv, dtype)
    ids = [jax.ShapeDtypeStruct(s[:2], jnp.int32) for s in (shape_q, shape_kv)]
    ids = ids if segments else [None, None]
    # The public function refuses interpret=False off a TPU, so build its compiled settings.
    config = common.Config(causal, 0.125, 512, 128, 128, 128, interpret=None)
    lse = jax.ShapeDtypeStruct((shape_q[0], shape_q[2], shape_q[1]), jnp.float32)

    def run_forward(q, k, v, *ids):
        return forward.forward(q, k, v, *ids, config)

    def run_backward(q, k, v, *ids_out_lse_dout_dlse):
        return backward.backward(q, k, v, *ids_out_lse_dout_dlse, config)

    grads_args = (q, k, k, *ids, q, lse, q, lse)
    for fn, args in ((run_forward, (q, k, k, *ids)), (run_backward, grads_args)):
        module = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        assert "tpu_custom_call" in module


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="the compiled Mosaic path needs a TPU")
@pytest.mark.parametrize("causal, segments", [(False, None), (True, None), (True, key_padding)])
def test_compiled_on_tpu(causal, segments):
    shape = (2, 1024, 8, 128)
    default_blocks = dict.fromkeys(SMALL_BLOCKS)
    check_against_reference(
        shape, shape, jnp.bfloat16, segments, causal=causal, interpret=False, **default_blocks
    )

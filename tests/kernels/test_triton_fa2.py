"""kernels.triton_fa2 against kernels.reference: forward, lse and dq/dk/dv.

On a CPU the Triton kernels run in triton's interpreter (numpy) through triton_host.launch, using
the same launch plans and the same forward/backward that flash_attention runs through jax-triton
behind kernels.front; outputs start as NaN so unwritten tiles fail. Tiny shapes and 16/32 tiles
keep the interpreter fast; sequence lengths are 1-3 tiles plus a remainder.

TRITON_INTERPRET must be 1 before triton is first imported (triton.jit reads it when decorating),
so this module sets it on import unless the process runs JAX on a GPU; there the interpreter tests
skip and the `gpu` test runs the compiled kernels through jax-triton:
    JAX_PLATFORMS=cuda python -m pytest -m gpu tests/kernels/test_triton_fa2.py
"""

import os

import jax

if jax.default_backend() != "gpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import importlib.util  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import triton_host  # noqa: E402

import kernels.triton_fa2 as fa2  # noqa: E402
from kernels import front  # noqa: E402
from kernels.reference import attention_reference, attention_reference_with_lse  # noqa: E402
from kernels.triton_fa2 import backward, common, forward  # noqa: E402

interpreted = pytest.mark.skipif(
    not triton_host.interpreter_ready(),
    reason="triton was imported before TRITON_INTERPRET=1 (or this process runs on a GPU), so "
    "its interpreter cannot run here; run this file alone on a CPU",
)

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Error bounds relative to the largest reference value: float32 runs float32 matmuls ("ieee");
# half precision rounds P and dS to 8 (bf16) or 11 (fp16) mantissa bits before the matmuls.
TOLERANCE = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}


def _inputs(shape_q, shape_kv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    cast = DTYPES[dtype]
    q = rng.standard_normal(shape_q).astype(cast)
    k = rng.standard_normal(shape_kv).astype(cast)
    v = rng.standard_normal(shape_kv).astype(cast)
    do = rng.standard_normal(shape_q).astype(cast)
    return q, k, v, do


def _key_padding(batch, seq_q, seq_k):
    """Key padding (kv ids 0 past a per-batch length), plus query 1 of batch 0 in a segment of
    its own, so it sees no key at all (zeros out, lse -inf, no gradient)."""
    q_ids = np.ones((batch, seq_q), np.int32)
    q_ids[0, 1] = 7
    kv_ids = np.ones((batch, seq_k), np.int32)
    for b in range(batch):
        kv_ids[b, seq_k - 3 - 5 * b :] = 0
    return q_ids, kv_ids


def _check(name, got, want, dtype):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert not np.isnan(got).any(), f"{name}: NaN (an unwritten tile or a NaN in the math)"
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert error < TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


@functools.partial(jax.jit, static_argnums=(6, 7))
def _reference(q, k, v, do, q_ids, kv_ids, causal, scale):
    kw = dict(causal=causal, scale=scale, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    out, lse = attention_reference_with_lse(q, k, v, **kw)
    _, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), q, k, v)
    return out, lse, vjp(do)


def _run_and_compare(
    batch, seq_q, seq_k, heads, kv_heads, dim, dtype, *, causal, segments=False, scale=None,
    block_q=16, block_k=16,
):  # fmt: skip
    q, k, v, do = _inputs((batch, seq_q, heads, dim), (batch, seq_k, kv_heads, dim), dtype)
    q_ids, kv_ids = _key_padding(batch, seq_q, seq_k) if segments else (None, None)
    options = front.Options(causal, scale, block_q, block_k, interpret=False, tuning={})
    cfg = fa2.configure(q, k, v, q_ids, kv_ids, options)

    # Exactly the front's forward and backward kernels, with the interpreter as the launcher.
    out, lse = forward.forward(q, k, v, q_ids, kv_ids, cfg, triton_host.launch)
    dq, dk, dv = backward.backward(
        q, k, v, q_ids, kv_ids, out, lse, do, None, cfg, triton_host.launch
    )

    # The reference runs in float32 on the same (rounded) inputs: the truth half precision
    # kernels are measured against. One jit: op-by-op dispatch would compile ~70 tiny programs.
    want_out, want_lse, (want_dq, want_dk, want_dv) = _reference(
        *(np.asarray(a, np.float32) for a in (q, k, v, do)), q_ids, kv_ids, causal, scale
    )

    assert out.dtype == q.dtype and dq.dtype == q.dtype and dk.dtype == k.dtype
    _check("out", out, want_out, dtype)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    seen = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(lse[seen], np.asarray(want_lse)[seen], atol=1e-4, rtol=1e-4)
    _check("dq", dq, want_dq, dtype)
    _check("dk", dk, want_dk, dtype)
    _check("dv", dv, want_dv, dtype)


@interpreted
@pytest.mark.parametrize(
    "shape, causal",
    [
        ((1, 20, 20, 2, 2, 16), False),  # MHA, 2 tiles with a remainder
        ((1, 37, 23, 4, 2, 16), True),  # S > T: the first S - T queries see nothing; GQA
        ((2, 23, 45, 4, 1, 16), True),  # T > S, MQA, 3 key tiles
        ((1, 9, 5, 2, 2, 16), True),  # less than one tile each way
    ],
)
def test_float32(shape, causal):
    _run_and_compare(*shape, "float32", causal=causal)


@interpreted
@pytest.mark.parametrize("causal", [False, True])
def test_segment_ids(causal):
    _run_and_compare(2, 19, 40, 4, 2, 16, "float32", causal=causal, segments=True)


@interpreted
def test_scale_blocks_and_odd_head_dim():
    """D = 24 pads tiles to 32 lanes with masks; unequal 16/32 tiles; a non-default scale."""
    _run_and_compare(1, 33, 50, 2, 1, 24, "float32", causal=True, scale=0.3, block_k=32)


@interpreted
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(dtype):
    _run_and_compare(1, 40, 27, 4, 2, 32, dtype, causal=True, segments=dtype == "bfloat16")


@interpreted
def test_default_tiles():
    """The per-head-dim default plan (D = 64: 128 x 64 forward, 32 x 128 dK/dV, 128 x 32 dQ)."""
    _run_and_compare(1, 150, 140, 2, 1, 64, "float16", causal=True, block_q=None, block_k=None)


@interpreted
def test_lse_cotangent_folds_into_delta():
    """flash_attention_with_lse is differentiable in lse too: dS = P (dP - (delta - dlse))."""
    q, k, v, do = _inputs((1, 21, 2, 16), (1, 30, 2, 16), "float32")
    dlse = np.random.default_rng(1).standard_normal((1, 2, 21)).astype(np.float32)
    options = front.Options(True, None, 16, 16, interpret=False, tuning={})
    cfg = fa2.configure(q, k, v, None, None, options)
    out, lse = forward.forward(q, k, v, None, None, cfg, triton_host.launch)
    grads = backward.backward(q, k, v, None, None, out, lse, do, dlse, cfg, triton_host.launch)
    reference = jax.jit(lambda *a: attention_reference_with_lse(*a, causal=True))
    _, vjp = jax.vjp(reference, q, k, v)
    for name, got, want in zip("qkv", grads, vjp((do, dlse)), strict=True):
        _check(f"d{name}", got, want, "float32")


def _callback_launch(plan, arrays):
    """The jax-triton launcher's stand-in on a CPU: the interpreter behind jax.pure_callback."""
    names = [name for name in plan.inputs if arrays[name] is not None]
    shapes = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for _, shape, dtype in plan.outputs]

    def host(*values):
        given = dict(zip(names, values, strict=True))
        return triton_host.launch(plan, {name: given.get(name) for name in plan.inputs})

    return tuple(jax.pure_callback(host, shapes, *(arrays[name] for name in names)))


@interpreted
def test_flash_attention_custom_vjp(monkeypatch):
    """flash_attention itself (kernels.front's custom_vjp, residuals, cotangent plumbing) under
    jax.jit and jax.vjp, with triton_call swapped for the interpreter."""
    monkeypatch.setattr(common, "jax_triton_launch", _callback_launch)
    q, k, v, do = _inputs((2, 21, 4, 16), (2, 34, 2, 16), "float32")
    q_ids, kv_ids = _key_padding(2, 21, 34)
    kw = dict(causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    attend = jax.jit(lambda q, k, v: fa2.flash_attention(q, k, v, block_q=16, block_k=16, **kw))
    out, vjp = jax.vjp(attend, q, k, v)
    want, want_vjp = jax.vjp(jax.jit(lambda q, k, v: attention_reference(q, k, v, **kw)), q, k, v)
    _check("out", out, want, "float32")
    for name, got, ref in zip("qkv", vjp(jnp.asarray(do)), want_vjp(jnp.asarray(do)), strict=True):
        _check(f"d{name}", got, ref, "float32")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dtype=np.float64), "one dtype among"),
        (dict(dim=300), "head dims 1..256"),
        (dict(kv_heads=3), "cannot share"),
        (dict(block_q=24), "power of two >= 16"),
        (dict(num_buffers=2), "unknown tuning options"),
        (dict(dot_precision="fast"), "dot_precision must be one of"),
        (dict(interpret=True), "no JAX interpret mode"),
    ],
)
def test_rejects_unsupported_inputs(change, message):
    dtype = change.pop("dtype", np.float32)
    dim = change.pop("dim", 16)
    kv_heads = change.pop("kv_heads", 2)
    q = np.zeros((1, 8, 4, dim), dtype)  # numpy keeps float64
    k = np.zeros((1, 8, kv_heads, dim), dtype)
    with pytest.raises(ValueError, match=message):
        fa2.flash_attention(q, k, k, **change)


def _gpu_ready():
    return (
        jax.default_backend() == "gpu"
        and importlib.util.find_spec("jax_triton") is not None
        and not triton_host.interpreter_ready()
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    not _gpu_ready(), reason="needs a CUDA GPU for JAX (JAX_PLATFORMS=cuda) and jax-triton"
)
@pytest.mark.parametrize(
    "shape, causal, dtype",
    [((2, 1000, 4, 64), True, jnp.bfloat16), ((2, 2048, 8, 128), False, jnp.bfloat16)],
)
def test_gpu_through_jax_triton(shape, causal, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
    attend = jax.jit(lambda q, k, v: fa2.flash_attention(q, k, v, causal=causal))
    reference = jax.jit(lambda q, k, v: attention_reference(q, k, v, causal=causal))
    out, vjp = jax.vjp(attend, q, k, v)
    want, want_vjp = jax.vjp(reference, *(a.astype(jnp.float32) for a in (q, k, v)))
    _check("out", out, want, "bfloat16")
    for name, got, ref in zip("qkv", vjp(do), want_vjp(do.astype(jnp.float32)), strict=True):
        _check(f"d{name}", got, ref, "bfloat16")

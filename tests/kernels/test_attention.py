import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels


def naive(q, k, v, causal=False, scale=None):
    """Attention in float64 numpy, one head at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kh = h // (heads // kv_heads)
            logits = q[b, :, h] @ k[b, :, kh].T * scale
            if causal:
                mask = np.arange(seq_q)[:, None] + seq_k - seq_q >= np.arange(seq_k)[None]
                logits = np.where(mask, logits, -np.inf)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, h] = (w / w.sum(-1, keepdims=True)) @ v[b, :, kh]
    return out


def qkv(shape_q, shape_kv, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, shape_q, dtype),
        jax.random.normal(kk, shape_kv, dtype),
        jax.random.normal(kv, shape_kv, dtype),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 17, 4, 16), (2, 17, 4, 16)),  # odd length
        ((1, 8, 4, 32), (1, 24, 2, 32)),  # GQA, longer keys
        ((2, 64, 2, 64), (2, 64, 1, 64)),
    ],
)  # MQA
def test_reference_matches_naive(causal, shapes):
    q, k, v = qkv(*shapes)
    out = kernels.attention(q, k, v, impl="xla", causal=causal)
    np.testing.assert_allclose(out, naive(q, k, v, causal), rtol=1e-4, atol=1e-5)


def test_scale_and_jax_reference_agree():
    q, k, v = qkv((2, 33, 4, 64), (2, 33, 4, 64))
    ours = kernels.attention(q, k, v, impl="xla", scale=0.3)
    theirs = jax.nn.dot_product_attention(q, k, v, scale=0.3, implementation="xla")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v = qkv((1, 16, 2, 64), (1, 16, 2, 64), jnp.bfloat16)
    out = kernels.attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), naive(q, k, v), atol=3e-2)


def test_gradients_match_naive_autodiff():
    q, k, v = qkv((1, 9, 2, 8), (1, 9, 2, 8))
    loss = lambda *a: jnp.sum(jnp.sin(kernels.attention(*a, impl="xla")))  # noqa: E731

    def loss_plain(q, k, v):
        logits = jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(8)
        out = jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(logits, -1), v)
        return jnp.sum(jnp.sin(out))

    for ours, theirs in zip(
        jax.grad(loss, (0, 1, 2))(q, k, v), jax.grad(loss_plain, (0, 1, 2))(q, k, v), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_auto_is_xla_off_gpu():
    q, k, v = qkv((1, 8, 2, 64), (1, 8, 2, 64), jnp.bfloat16)
    if jax.default_backend() != "gpu":
        assert kernels.choose_impl(q, k, v) == "xla"
    q32 = q.astype(jnp.float32)
    assert kernels.choose_impl(q32, q32, q32) == "xla"  # cuDNN takes only fp16/bf16


def test_bad_calls_are_refused():
    q, k, v = qkv((1, 8, 2, 16), (1, 8, 2, 16))
    with pytest.raises(ValueError, match="impl='flash' is not known; known: auto, cudnn, xla"):
        kernels.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        kernels.attention(q[0], k, v)
    with pytest.raises(ValueError, match="one shape"):
        kernels.attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="cannot share"):
        kernels.attention(*qkv((1, 8, 3, 16), (1, 8, 2, 16)))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            kernels.attention(q, k, v, impl="cudnn")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_matches_reference(causal):
    q, k, v = qkv((2, 256, 4, 64), (2, 256, 4, 64), jnp.bfloat16)
    fast = kernels.attention(q, k, v, impl="cudnn", causal=causal)
    ref = kernels.attention(q, k, v, impl="xla", causal=causal)
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(ref, np.float32), atol=2e-2)

"""Neighborhood attention: the window geometry against its definition, the dense oracle against a
literal loop, and every implementation (XLA halo tiles; our Pallas kernels in interpret mode)
against the oracle, forward and gradients.

Glossary: B batch, H and W the grid, N query heads, KV key/value heads, D head dim, K the kernel
size. Interpret mode is slow (seconds per call), so the Pallas cases are few and small.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import neighborhood as nb
from kernels.front import attend
from kernels.neighborhood.common import Axis, Config
from kernels.neighborhood.pallas import KERNELS
from kernels.neighborhood.reference import (
    neighborhood_attention_dense,
    neighborhood_attention_xla,
    neighborhood_mask,
    window_starts,
)


def _inputs(shape, kv_heads, dtype=jnp.float32, seed=0):
    """q [B, H, W, N, D], k and v [B, H, W, KV, D], and a projection of the output's shape."""
    batch, height, width, heads, dim = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    kv = (batch, height, width, kv_heads, dim)
    q = jax.random.normal(keys[0], shape, dtype)
    k = jax.random.normal(keys[1], kv, dtype)
    v = jax.random.normal(keys[2], kv, dtype)
    return q, k, v, jax.random.normal(keys[3], shape, jnp.float32)


def _out_and_grads(attention, q, k, v, cotangent):
    """attention(q, k, v) and the gradients of <its outputs, cotangent> (random projections, so
    the whole backward is checked), in one jitted program: eager autodiff compiles op by op."""

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(jax.tree.map(lambda c, o: c.astype(o.dtype), cotangent, out))

    return run(q, k, v)


def _close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


F32 = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
def test_window_starts_follow_the_definition(kernel_size):
    for length in range(1, 14):
        window = min(kernel_size, length)
        for i, start in enumerate(window_starts(length, kernel_size)):
            # The window centred on i where it fits, else the one flush with the nearer border.
            want = i - kernel_size // 2
            while want < 0:
                want += 1
            while want + window > length:
                want -= 1
            assert start == want, (length, kernel_size, i)


@pytest.mark.parametrize("height,width,kernel_size", [(9, 11, 3), (7, 7, 7), (5, 12, 7), (1, 4, 3)])
def test_mask_rows_see_exactly_a_window(height, width, kernel_size):
    mask = neighborhood_mask(height, width, kernel_size)
    want = min(kernel_size, height) * min(kernel_size, width)
    assert mask.shape == (height * width, height * width)
    assert (mask.sum(1) == want).all()


def test_oracle_matches_a_literal_loop():
    height, width, kernel_size = 4, 5, 3
    q, k, v, _ = _inputs((1, height, width, 2, 8), 2)
    out, _ = neighborhood_attention_dense(q, k, v, kernel_size=kernel_size)
    q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    want = np.zeros_like(q)
    for i in range(height):
        r0 = min(max(i - 1, 0), height - 3)
        for j in range(width):
            c0 = min(max(j - 1, 0), width - 3)
            keys = k[r0 : r0 + 3, c0 : c0 + 3].reshape(9, 2, 8)
            vals = v[r0 : r0 + 3, c0 : c0 + 3].reshape(9, 2, 8)
            logits = np.einsum("nd,tnd->nt", q[i, j], keys) / np.sqrt(8)
            p = np.exp(logits - logits.max(1, keepdims=True))
            want[i, j] = np.einsum("nt,tnd->nd", p / p.sum(1, keepdims=True), vals)
    _close(out[0], want, F32)


@pytest.mark.parametrize("kernel_size", [1, 3, 7, 9])
@pytest.mark.parametrize("length", [1, 2, 5, 7, 8, 9, 13, 16, 17, 23, 29])
def test_halos_cover_every_window(length, kernel_size):
    """The kernels' closed forms: each tile's key halo holds its queries' windows, and each key
    tile's query halo holds every query that sees one of its keys."""
    axis = Axis(length, kernel_size, 8)
    starts = window_starts(length, kernel_size)
    for t in range(axis.n_tiles):
        real = np.arange(t * 8, min(t * 8 + 8, length))
        first = int(axis.first_key(t))
        assert first >= 0 and first + axis.key_halo <= length
        assert (starts[real] >= first).all()
        assert (starts[real] + axis.window <= first + axis.key_halo).all()
        seen_by = [
            i
            for i in range(length)
            if (real >= starts[i]).any() and (real < starts[i] + axis.window).any()
        ]
        assert int(axis.first_seen_by(t)) == min(seen_by)
        assert int(axis.last_seen_by(t)) == max(seen_by)
        first = int(axis.first_query(t))
        assert first >= 0 and first + axis.query_halo <= length
        assert first <= min(seen_by) and max(seen_by) < first + axis.query_halo


XLA_CASES = [
    # (B, H, W, N, D), KV, K: odd sizes, sizes equal to K, smaller than K, GQA, K = 1.
    ((2, 9, 11, 2, 16), 2, 3),
    ((1, 9, 11, 4, 16), 2, 7),
    ((1, 7, 7, 2, 32), 1, 7),
    ((2, 5, 6, 2, 16), 2, 7),
    ((1, 17, 20, 2, 16), 2, 5),
    ((1, 3, 4, 2, 16), 2, 1),
]


@pytest.mark.parametrize("shape,kv_heads,kernel_size", XLA_CASES)
def test_xla_matches_the_oracle(shape, kv_heads, kernel_size):
    """Output, lse, and the gradients of both (lse is part of the front's contract)."""
    q, k, v, proj = _inputs(shape, kv_heads)
    lse_proj = jax.random.normal(jax.random.key(9), (shape[0], shape[3], shape[1] * shape[2]))
    cotangent = (proj, lse_proj)
    xla = functools.partial(neighborhood_attention_xla, kernel_size=kernel_size)
    dense = functools.partial(neighborhood_attention_dense, kernel_size=kernel_size)
    (got, got_grads), (want, want_grads) = (
        _out_and_grads(xla, q, k, v, cotangent),
        _out_and_grads(dense, q, k, v, cotangent),
    )
    for g, w in zip([*got, *got_grads], [*want, *want_grads], strict=True):
        _close(g, w, F32)


def test_xla_in_bfloat16_is_near_the_float32_oracle():
    q, k, v, proj = _inputs((2, 9, 11, 4, 32), 2, jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    def xla(q, k, v):
        return nb.neighborhood_attention(q, k, v, kernel_size=7, impl="xla", scale=0.3)

    def dense(q, k, v):
        return neighborhood_attention_dense(q, k, v, kernel_size=7, scale=0.3)[0]

    (out, got), (want_out, want) = (
        _out_and_grads(xla, q, k, v, proj),
        _out_and_grads(dense, *f32, proj),
    )
    assert out.dtype == jnp.bfloat16
    _close(out, want_out, dict(rtol=2e-2, atol=2e-2))
    for g, w in zip(got, want, strict=True):
        _close(g, w, dict(rtol=5e-2, atol=5e-2))


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_pallas_matches_the_oracle(backend):
    """Forward, and gradients of the output and of lse (the front's contract), GQA included,
    on a grid that is no multiple of the 8 x 8 tile."""
    height, width, kernel_size = 9, 11, 7
    q, k, v, proj = _inputs((1, height, width, 2, 16), 1)
    lse_proj = jax.random.normal(jax.random.key(9), (1, 2, height * width))
    cfg = Config(height, width, kernel_size, 16**-0.5, backend, interpret=True)

    def ours(q, k, v):
        flat = [x.reshape(1, height * width, *x.shape[3:]) for x in (q, k, v)]
        out, lse = attend(KERNELS[backend], *flat, None, None, cfg)
        return out.reshape(q.shape), lse

    def dense(q, k, v):
        return neighborhood_attention_dense(q, k, v, kernel_size=kernel_size)

    # One vjp gives both outputs and the gradients of <out, proj> + <lse, lse_proj>.
    (got_out, got_lse), got_vjp = jax.vjp(ours, q, k, v)
    (want_out, want_lse), want_vjp = jax.vjp(dense, q, k, v)
    _close(got_out, want_out, F32)
    _close(got_lse, want_lse, F32)
    for g, w in zip(got_vjp((proj, lse_proj)), want_vjp((proj, lse_proj)), strict=True):
        _close(g, w, F32)


@pytest.mark.parametrize(
    "shape,kernel_size,dtype,tol",
    [
        ((1, 5, 6, 2, 16), 7, jnp.float32, F32),
        ((1, 20, 17, 2, 32), 5, jnp.bfloat16, dict(rtol=2e-2, atol=2e-2)),
    ],
)
def test_pallas_forward_at_small_and_taller_grids(shape, kernel_size, dtype, tol):
    """Windows clamped to a 5 x 6 grid; and several tiles per axis with interior windows, in
    bfloat16 against the float32 oracle."""
    q, k, v, _ = _inputs(shape, shape[3], dtype)
    got = nb.neighborhood_attention(
        q, k, v, kernel_size=kernel_size, impl="pallas_triton", interpret=True
    )
    assert got.dtype == dtype
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _close(got, neighborhood_attention_dense(*f32, kernel_size=kernel_size)[0], tol)


BAD = [
    (dict(q=(1, 9, 2, 16)), "rank 5"),
    (dict(k=(1, 9, 9, 2, 8)), "one shape"),
    (dict(k=(1, 9, 9, 3, 16), v=(1, 9, 9, 3, 16)), "cannot share"),
    (dict(kernel_size=4), "odd int"),
    (dict(kernel_size=0), "odd int"),
    (dict(impl="flash"), "not known"),
    (dict(impl="pallas_tpu"), "needs a TPU"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_inputs_get_one_clear_error(bad, message):
    shapes = {"q": (1, 9, 9, 4, 16), "k": (1, 9, 9, 2, 16), "v": (1, 9, 9, 2, 16)}
    arrays = {n: jnp.zeros(bad.get(n, s)) for n, s in shapes.items()}
    options = {n: bad[n] for n in ("kernel_size", "impl") if n in bad}
    with pytest.raises(ValueError, match=message):
        nb.neighborhood_attention(**arrays, **options)


def test_auto_takes_the_fastest_measured_entry_it_can_run():
    q = k = v = jnp.zeros((1, 16, 16, 2, 16))
    assert nb.choose_impl(q, k, v, kernel_size=7, measured={}) == "xla"
    entry = {"dtype": "float32", "head_dim": 16, "tokens": 256, "kernel_size": 7}
    # pallas_tpu is faster on paper but cannot run here (no TPU, no interpret), so xla wins.
    measured = {"cpu": [{**entry, "ms": {"xla": 2.0, "pallas_tpu": 1.0}}]}
    assert nb.choose_impl(q, k, v, kernel_size=7, measured=measured) == "xla"


def _lower_forward_backward(backend, platform, shape, kv_heads, dtype):
    """Lowers the jitted forward+backward of our kernels for `platform` without running it."""
    q = jax.ShapeDtypeStruct(shape, dtype)
    kv = jax.ShapeDtypeStruct((*shape[:3], kv_heads, shape[4]), dtype)

    def run(q, k, v):
        out, vjp = jax.vjp(
            lambda q, k, v: nb.pallas.neighborhood_attention(
                q, k, v, kernel_size=7, backend=backend
            ),
            q,
            k,
            v,
        )
        return out, vjp(out)

    return jax.jit(run).trace(q, kv, kv).lower(lowering_platforms=(platform,)).as_text()


def test_kernels_lower_for_triton_and_mosaic_tpu(monkeypatch):
    """Compiling needs the hardware, but lowering does not: Pallas' Triton rules (power-of-two
    tensor sides, dot shapes) and Mosaic TPU's (block shapes) run here on HDiT-like shapes."""
    from jax._src.pallas.mosaic import tpu_info

    triton = _lower_forward_backward("triton", "cuda", (1, 64, 64, 4, 64), 4, jnp.bfloat16)
    assert triton.count("custom_call @__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV
    # Mosaic asks the device kind for tiling facts; pretend to be a v5e (private API, test only).
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    try:
        tpu = _lower_forward_backward("tpu", "tpu", (1, 24, 40, 4, 128), 2, jnp.bfloat16)
    finally:
        tpu_info.get_tpu_info.cache_clear()  # forget the pretend v5e once the patch is undone
    assert tpu.count("custom_call @tpu_custom_call") == 3


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton needs an NVIDIA GPU")
@pytest.mark.parametrize("shape,kv_heads", [((2, 64, 64, 4, 64), 4), ((1, 37, 45, 8, 64), 2)])
def test_compiled_on_gpu(shape, kv_heads):
    _check_compiled("pallas_triton", shape, kv_heads)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="compiled Mosaic needs a TPU")
@pytest.mark.parametrize("shape,kv_heads", [((2, 64, 64, 4, 128), 4), ((1, 37, 45, 8, 128), 2)])
def test_compiled_on_tpu(shape, kv_heads):
    _check_compiled("pallas_tpu", shape, kv_heads)


def _check_compiled(impl, shape, kv_heads):
    """bf16 compiled kernels against the float32 halo reference, output and gradients."""
    q, k, v, proj = _inputs(shape, kv_heads, jnp.bfloat16)
    got = _out_and_grads(
        lambda q, k, v: nb.neighborhood_attention(q, k, v, kernel_size=7, impl=impl), q, k, v, proj
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    xla = functools.partial(nb.neighborhood_attention, kernel_size=7, impl="xla")
    want = _out_and_grads(xla, *f32, proj)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        _close(g, w, dict(rtol=3e-2, atol=3e-2))

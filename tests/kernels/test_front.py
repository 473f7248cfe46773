"""`kernels.front` with a pure-JAX stand-in backend: what the front itself adds to a backend's
kernels (the GQA sum of per-query-head dK/dV, no cotangent for segment ids, d_lse only for a
backend that takes it), checked against plain autodiff of the reference.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D], lse [B, H, S].
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import front
from kernels.reference import attention_reference_with_lse


def _forward(q, k, v, q_ids, kv_ids, causal):
    return attention_reference_with_lse(
        q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids
    )


def _backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, causal):
    """dq, and dk/dv per query head [B, T, H, D], as the Mosaic GPU kernels write them."""
    del out  # the reference recomputes it
    groups = q.shape[2] // k.shape[2]
    k_h, v_h = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    _, vjp = jax.vjp(lambda *a: _forward(*a, q_ids, kv_ids, causal), q, k_h, v_h)
    return vjp((d_out, jnp.zeros_like(lse) if d_lse is None else d_lse))


@pytest.mark.parametrize("takes_d_lse", [True, False])
def test_front_sums_groups_and_gives_ids_no_cotangent(takes_d_lse):
    rng = np.random.default_rng(0)
    q, d_out = (jnp.asarray(rng.standard_normal((2, 6, 4, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, 9, 2, 8)), jnp.float32) for _ in range(2))
    d_lse = jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)
    # Key padding that leaves every query a key (the reference's lse has a gradient).
    q_ids = jnp.ones((2, 6), jnp.int32)
    kv_ids = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)
    kernels = front.Kernels("reference", _forward, _backward, takes_d_lse=takes_d_lse)

    # One jit a side: eager autodiff would compile each of its small ops on its own.
    @jax.jit
    def ours(q, k, v, q_ids, kv_ids):
        outs, vjp = jax.vjp(lambda *a: front.attend(kernels, *a, True), q, k, v, q_ids, kv_ids)
        return outs, vjp((d_out, d_lse))

    @jax.jit
    def reference(q, k, v):
        outs, vjp = jax.vjp(lambda *a: _forward(*a, q_ids, kv_ids, True), q, k, v)
        # A backend without d_lse ignores lse's cotangent, as its docs say.
        return outs, vjp((d_out, d_lse if takes_d_lse else jnp.zeros_like(d_lse)))

    outs, (dq, dk, dv, d_q_ids, d_kv_ids) = ours(q, k, v, q_ids, kv_ids)
    want_outs, want = reference(q, k, v)

    for got, ref in zip(outs, want_outs, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert dk.shape == k.shape and dv.shape == v.shape  # [B, T, K, D], summed over groups
    for got, ref in zip((dq, dk, dv), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert d_q_ids.dtype == jax.dtypes.float0 and d_kv_ids.dtype == jax.dtypes.float0

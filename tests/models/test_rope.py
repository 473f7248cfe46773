import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff.diffusion.patches import coordinate_grid
from patchdiff.models.rope import apply_rope, axial_rope_angles, rope_frequencies, token_positions

HEADS, HEAD_DIM = 4, 32


def qk_logits(q, k, pos):
    """q, k [B, S, heads, D] with RoPE at pos [B, S, 2] -> logits [B, heads, S, S]."""
    angles = axial_rope_angles(pos, HEADS, HEAD_DIM)
    return jnp.einsum("bshd,bthd->bhst", apply_rope(q, angles), apply_rope(k, angles))


def test_logits_depend_only_on_relative_positions():
    """Shifting every position by one constant (a crop moved in the image) leaves q.k as it was;
    moving one token's position does not."""
    kq, kk, kp = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 16, HEADS, HEAD_DIM))
    k = jax.random.normal(kk, (2, 16, HEADS, HEAD_DIM))
    pos = jax.random.uniform(kp, (2, 16, 2), minval=-1, maxval=1)
    logits = qk_logits(q, k, pos)
    shifted = qk_logits(q, k, pos + jnp.array([0.37, -0.81]))
    np.testing.assert_allclose(shifted, logits, atol=2e-5)
    moved = qk_logits(q, k, pos.at[:, 0].add(0.1))
    assert float(jnp.abs(moved - logits).max()) > 1e-2


def test_only_the_first_half_of_each_head_rotates():
    x = jax.random.normal(jax.random.key(1), (3, HEADS, HEAD_DIM))
    angles = axial_rope_angles(jnp.full((3, 2), 0.5), HEADS, HEAD_DIM)
    out = apply_rope(x, angles)
    np.testing.assert_array_equal(out[..., HEAD_DIM // 2 :], x[..., HEAD_DIM // 2 :])
    assert float(jnp.abs(out[..., : HEAD_DIM // 2] - x[..., : HEAD_DIM // 2]).min()) > 0
    # a rotation: each head's norm is kept
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), 1e-5)


def test_frequencies_log_spaced_from_pi_to_10pi_and_distinct_per_head():
    freqs = rope_frequencies(HEADS, HEAD_DIM)  # [heads, D/8]
    assert freqs.shape == (HEADS, HEAD_DIM // 8) and freqs.dtype == np.float32
    flat = np.sort(freqs.ravel())
    assert flat[0] == pytest.approx(np.pi) and flat[-1] < 10 * np.pi
    np.testing.assert_allclose(np.diff(np.log(flat)), np.log(10) / flat.size, rtol=1e-4)
    assert len({tuple(row) for row in freqs}) == HEADS


def test_angles_stay_float32_under_bfloat16():
    """Angles reach 10 pi x |pos|: in bfloat16 (8 bits of mantissa) they would be off by a tenth
    of a radian; RoPE's math runs in float32 and only its result takes x's dtype."""
    pos = jnp.linspace(-1, 1, 8 * 2).reshape(8, 2)
    angles = axial_rope_angles(pos.astype(jnp.bfloat16), HEADS, HEAD_DIM)
    assert angles.dtype == jnp.float32 and angles.shape == (8, HEADS, HEAD_DIM // 4)
    x = jax.random.normal(jax.random.key(2), (8, HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    out = apply_rope(x, angles)
    assert out.dtype == jnp.bfloat16
    exact = apply_rope(x.astype(jnp.float32), angles).astype(jnp.bfloat16)
    np.testing.assert_array_equal(out.astype(jnp.float32), exact.astype(jnp.float32))


def test_token_positions_are_patch_means():
    coords = jnp.broadcast_to(coordinate_grid(8), (2, 8, 8, 2))
    pos = token_positions(coords, 2)
    assert pos.shape == (2, 4, 4, 2) and pos.dtype == jnp.float32
    axis = np.linspace(-1, 1, 8).reshape(4, 2).mean(1)  # pixel pairs' means
    np.testing.assert_allclose(pos[0, 1, :, 0], axis, rtol=1e-6)  # x runs along a row
    np.testing.assert_allclose(pos[0, :, 2, 1], axis, rtol=1e-6)  # y down a column
    # merging twice by 2 is merging once by 4
    np.testing.assert_allclose(token_positions(pos, 2), token_positions(coords, 4), atol=1e-6)

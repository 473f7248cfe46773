"""FlashAttention-2's forward pass for TPUs in Pallas (Mosaic TPU): one kernel, one key block a
grid step.

Glossary as in `kernels.pallas_tpu.common`: B batch, S/T query/key tokens, H/K query/key-value
heads, G = H // K, D head dim, bq/bk block lengths, nq/nk block counts, Sp padded length.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import LN_2, LOG2_E, MASK_VALUE
from kernels.pallas_tpu.common import (
    NT,
    NUM_LANES,
    Tiles,
    compiler_params,
    heads_major,
    lanes,
    nbytes,
    positions,
    query_major_segments,
    run_tile,
)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, tiles, scale):
    """One (batch, head, query block) row of FlashAttention-2's forward (Dao 2023, Algorithm 1),
    one key block per grid step.

    The key loop is the innermost "arbitrary" grid axis, with m, l, acc in VMEM scratch, rather
    than a fori_loop inside the kernel: the grid lets Pallas double-buffer the k/v DMAs against
    the matmuls and keeps only two key blocks in VMEM, where a fori_loop would need all of k and v
    resident (or hand-written DMAs).
    """
    if tiles.segments:
        q_ids_ref, kv_ids_ref, *refs = refs
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    qi, kj = pl.program_id(2), pl.program_id(3)
    block_q, block_k = tiles.block_q, tiles.block_k

    @pl.when(kj == 0)
    def _init():
        # A finite start for the running max keeps exp2(m_old - m_new) from being inf - inf.
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked):
        v = v_ref[...]
        # Base-2 logits: exp2 of (q k^T) scale log2(e) is the softmax's exp (kernels.common).
        s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
        s = s * (scale * LOG2_E)  # [bq, bk]
        if masked:
            q_pos = positions(s.shape, 0, qi * block_q)
            k_pos = positions(s.shape, 1, kj * block_k)
            ids = (lanes(q_ids_ref[...], block_k), kv_ids_ref[:1, :]) if tiles.segments else ()
            # -inf, not MASK_VALUE: against the finite running max it gives p = 0 exactly, even
            # in a row whose every key so far is hidden.
            s = jnp.where(tiles.visible(q_pos, k_pos, *ids), s, -jnp.inf)
        m_prev, l_prev = m_ref[...], l_ref[...]  # [bq, 128]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp2(m_prev - m_new)  # rescales what was summed under the old max
        p = jnp.exp2(s - lanes(m_new, block_k))
        m_ref[...] = m_new
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = lanes(alpha, acc_ref.shape[1]) * acc_ref[...] + pv

    run_tile(tiles.runs(qi, kj), tiles.needs_mask(qi, kj), step)

    @pl.when(kj == tiles.num_k - 1)
    def _finish():
        # A row that saw no key has l = 0: output 0 and lse = -inf (kernels.reference).
        l = l_ref[...]
        seen = l > 0.0
        inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        o_ref[...] = (acc_ref[...] * lanes(inv_l, o_ref.shape[1])).astype(o_ref.dtype)
        lse = (m_ref[...] + jnp.log2(jnp.where(seen, l, 1.0))) * LN_2
        lse_ref[...] = jnp.where(seen, lse, -jnp.inf)


# Jitted so that eager callers compile the padding, transposes and kernel once per shape, not
# each small op on every call.
@functools.partial(jax.jit, static_argnums=5)
def forward(q, k, v, q_segment_ids, kv_segment_ids, config):
    """out [B, S, H, D] and lse [B, H, S] (float32, natural log)."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    segments = q_segment_ids is not None
    tiles = Tiles(seq_q, seq_k, config.block_q, config.block_k, config.causal, segments)
    block_q, block_k = tiles.block_q, tiles.block_k

    def q_map(b, h, i, j):
        return b, h, i, 0

    def kv_map(b, h, i, j):
        return b, lax.div(h, group), tiles.k_fetched(i, j), 0

    q_spec = pl.BlockSpec((None, None, block_q, dim), q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, dim), kv_map)
    stat_spec = pl.BlockSpec((None, None, block_q, NUM_LANES), q_map)
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [heads_major(q, block_q), heads_major(k, block_k), heads_major(v, block_k)]
    if segments:
        specs, ids = query_major_segments(q_segment_ids, kv_segment_ids, tiles, block_q, block_k)
        in_specs, args = in_specs + specs, args + ids

    padded_q = tiles.num_q * block_q
    pairs = batch * heads * seq_q * seq_k // (2 if config.causal else 1)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, tiles=tiles, scale=config.scale),
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, padded_q, dim), q.dtype),
            # Lane-broadcast lse (512 B a row in HBM, written once) so the kernel stores its
            # [bq, 128] statistics as they are; the wrapper keeps lane 0.
            jax.ShapeDtypeStruct((batch, heads, padded_q, NUM_LANES), jnp.float32),
        ],
        grid=(batch, heads, tiles.num_q, tiles.num_k),
        in_specs=in_specs,
        out_specs=[q_spec, stat_spec],
        scratch_shapes=[
            pltpu.VMEM((block_q, NUM_LANES), jnp.float32),  # m: running max (base 2)
            pltpu.VMEM((block_q, NUM_LANES), jnp.float32),  # l: running sum
            pltpu.VMEM((block_q, dim), jnp.float32),  # acc: unnormalised output
        ],
        compiler_params=compiler_params(),
        # For XLA's scheduling around the call: two matmuls a visible pair; q and o move once,
        # k and v once per query block of each query head.
        cost_estimate=pl.CostEstimate(
            flops=4 * pairs * dim,
            transcendentals=pairs,
            bytes_accessed=nbytes(q, q) + nbytes(k, v) * tiles.num_q * group,
        ),
        interpret=config.interpret or False,
        name="flash_attention_tpu_fwd",
    )(*args)
    return jnp.swapaxes(out[:, :, :seq_q], 1, 2), lse[:, :, :seq_q, 0]

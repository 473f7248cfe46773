"""FlashAttention-2's backward pass for TPUs in Pallas: a dK/dV kernel and a separate dQ kernel.

Glossary as in `kernels.pallas_tpu.common`: B batch, S/T query/key tokens, H/K query/key-value
heads, G = H // K, D head dim, bq/bk block lengths, nq/nk block counts, Sp/Tp padded lengths.

Dao 2023 (FlashAttention-2), Algorithm 2, adds each dQ contribution to HBM atomically inside
the loop over query blocks; a TPU grid step has no atomic adds, so dQ gets a kernel of its own:
dK/dV loop over query blocks for each key block, dQ over key blocks for each query block, and
every output is accumulated in VMEM by exactly one grid row. Both recompute P = exp2(s - lse) from
the saved log-sum-exp; the only inputs besides q, k, v, dO are two per-query rows:
- lse2 = lse log2(e), with +inf where the query saw no key, so P = exp2(s - inf) = 0 there
  instead of exp2(-inf + inf) = NaN;
- delta = rowsum(dO * O), FlashAttention-2's D_i, a small XLA reduction before the kernels,
  minus the cotangent of lse where one is given (d lse_i / d s_ij = P_ij, so it folds in there).
Both are stored [B, H, 1, Sp] (a row of S on lanes): the dK/dV kernel works on transposed
[bk, bq] tiles where a row broadcasts as it is, and the dQ kernel turns its (1, bq) row into a
(bq, 1) column once per query block.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import LOG2_E, pad_axis
from kernels.pallas_tpu.common import (
    NT,
    NUM_LANES,
    NUM_SUBLANES,
    Tiles,
    compiler_params,
    heads_major,
    ids_as_columns,
    ids_as_rows,
    lanes,
    nbytes,
    positions,
    query_major_segments,
    run_tile,
)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, tiles, scale, group):
    """dK and dV of one (batch, kv head, key block), one (query head of the group, query block)
    per grid step. Tiles are transposed, keys on sublanes and queries on lanes, so that every
    matmul is k q^T-shaped (NT) or plain (NN) and the MXU never needs a transposed left operand."""
    if tiles.segments:
        q_ids_ref, kv_ids_ref, *refs = refs
    dk_ref, dv_ref, dk_acc, dv_acc = refs
    kj, r = pl.program_id(2), pl.program_id(3)
    qi = lax.rem(r, tiles.num_q)

    @pl.when(r == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s = lax.dot_general(k_ref[...], q, NT, preferred_element_type=jnp.float32)
        s = s * (scale * LOG2_E)  # [bk, bq] base-2 logits, transposed
        if masked:
            k_pos = positions(s.shape, 0, kj * tiles.block_k)
            q_pos = positions(s.shape, 1, qi * tiles.block_q)
            ids = (
                (q_ids_ref[:1, :], lanes(kv_ids_ref[...], tiles.block_q)) if tiles.segments else ()
            )
            s = jnp.where(tiles.visible(q_pos, k_pos, *ids), s, -jnp.inf)
        p = jnp.exp2(s - lse_ref[...])  # [bk, bq] = P^T
        dv_acc[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(v_ref[...], do, NT, preferred_element_type=jnp.float32)  # dP^T
        ds = p * (dp - delta_ref[...])  # dS^T = P^T (dP^T - delta)
        dk_acc[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)

    run_tile(tiles.runs(qi, kj), tiles.needs_mask(qi, kj), step)

    @pl.when(r == group * tiles.num_q - 1)
    def _finish():
        # s carried scale inside the exp only; dS -> dK still owes it once.
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, tiles, scale):
    """dQ of one (batch, head, query block), one key block per grid step."""
    if tiles.segments:
        q_ids_ref, kv_ids_ref, *refs = refs
    dq_ref, dq_acc = refs
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def step(masked):
        k, do = k_ref[...], do_ref[...]
        s = lax.dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32)
        s = s * (scale * LOG2_E)  # [bq, bk]
        if masked:
            q_pos = positions(s.shape, 0, qi * tiles.block_q)
            k_pos = positions(s.shape, 1, kj * tiles.block_k)
            ids = (
                (lanes(q_ids_ref[...], tiles.block_k), kv_ids_ref[:1, :]) if tiles.segments else ()
            )
            s = jnp.where(tiles.visible(q_pos, k_pos, *ids), s, -jnp.inf)
        p = jnp.exp2(s - lse_ref[0][:, None])
        dp = lax.dot_general(do, v_ref[...], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[0][:, None])
        dq_acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    run_tile(tiles.runs(qi, kj), tiles.needs_mask(qi, kj), step)

    @pl.when(kj == tiles.num_k - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnums=9)
def backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, dout, dlse, config):
    """(dq, dk, dv) in the dtypes of q, k, v, from the residuals of `forward.forward` and the
    cotangents of its out and lse (dlse may be None)."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    segments = q_segment_ids is not None
    tiles = Tiles(seq_q, seq_k, config.block_q_bwd, config.block_k_bwd, config.causal, segments)
    block_q, block_k, num_q = tiles.block_q, tiles.block_k, tiles.num_q

    delta = jnp.einsum("bshd,bshd->bhs", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2_E)
    # Padded query rows get lse2 = +inf, so they add nothing to dK, dV (their dO is 0 as well).
    lse2 = pad_axis(lse2, 2, block_q, jnp.inf)[:, :, None, :]  # [B, H, 1, Sp]
    delta = pad_axis(delta, 2, block_q)[:, :, None, :]
    qh, doh = heads_major(q, block_q), heads_major(dout, block_q)
    kh, vh = heads_major(k, block_k), heads_major(v, block_k)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (kh, vh)]
    pairs = batch * heads * seq_q * seq_k // (2 if config.causal else 1)

    # dK/dV: grid (B, K, nk, G nq). The inner axis walks the G query heads of the kv head, each
    # over its query blocks, so the group's sum lands in one accumulator without atomics.
    def dkv_q_map(b, kvh, j, r):
        return b, kvh * group + lax.div(r, num_q), tiles.q_fetched(j, lax.rem(r, num_q)), 0

    def dkv_row_map(b, kvh, j, r):
        return b, kvh * group + lax.div(r, num_q), 0, tiles.q_fetched(j, lax.rem(r, num_q))

    q_spec = pl.BlockSpec((None, None, block_q, dim), dkv_q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, dim), lambda b, kvh, j, r: (b, kvh, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, block_q), dkv_row_map)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qh, kh, vh, doh, lse2, delta]
    if segments:
        in_specs += [
            pl.BlockSpec(
                (None, NUM_SUBLANES, block_q),
                lambda b, kvh, j, r: (b, 0, tiles.q_fetched(j, lax.rem(r, num_q))),
            ),
            pl.BlockSpec((None, block_k, NUM_LANES), lambda b, kvh, j, r: (b, j, 0)),
        ]
        args += [ids_as_rows(q_segment_ids, block_q), ids_as_columns(kv_segment_ids, block_k)]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, tiles=tiles, scale=config.scale, group=group),
        out_shape=shapes,
        grid=(batch, kv_heads, tiles.num_k, group * num_q),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[
            pltpu.VMEM((block_k, dim), jnp.float32),  # dK, before the scale
            pltpu.VMEM((block_k, dim), jnp.float32),  # dV
        ],
        compiler_params=compiler_params(),
        cost_estimate=pl.CostEstimate(  # four matmuls a pair; k, v move once, the rest per block
            flops=8 * pairs * dim,
            transcendentals=pairs,
            bytes_accessed=nbytes(k, v, k, v) + nbytes(q, dout, lse, lse) * tiles.num_k,
        ),
        interpret=config.interpret or False,
        name="flash_attention_tpu_dkv",
    )(*args)

    # dQ: grid (B, H, nq, nk), the forward's iteration order.
    def dq_kv_map(b, h, i, j):
        return b, lax.div(h, group), tiles.k_fetched(i, j), 0

    q_spec = pl.BlockSpec((None, None, block_q, dim), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, dim), dq_kv_map)
    row_spec = pl.BlockSpec((None, None, 1, block_q), lambda b, h, i, j: (b, h, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qh, kh, vh, doh, lse2, delta]
    if segments:
        specs, ids = query_major_segments(q_segment_ids, kv_segment_ids, tiles, block_q, block_k)
        in_specs, args = in_specs + specs, args + ids
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, tiles=tiles, scale=config.scale),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        grid=(batch, heads, num_q, tiles.num_k),
        in_specs=in_specs,
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((block_q, dim), jnp.float32)],
        compiler_params=compiler_params(),
        cost_estimate=pl.CostEstimate(  # three matmuls a pair
            flops=6 * pairs * dim,
            transcendentals=pairs,
            bytes_accessed=nbytes(q, dout, q) + nbytes(k, v) * num_q * group,
        ),
        interpret=config.interpret or False,
        name="flash_attention_tpu_dq",
    )(*args)

    def unpad(x, length):
        return jnp.swapaxes(x[:, :, :length], 1, 2)

    return unpad(dq, seq_q), unpad(dk, seq_k), unpad(dv, seq_k)

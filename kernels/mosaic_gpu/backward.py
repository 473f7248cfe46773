"""FlashAttention backward for Hopper GPUs (sm90a) in Pallas Mosaic GPU: the dQ and dK/dV kernels.

Glossary as in `kernels.mosaic_gpu.common`: B batch, S/T query/key tokens, H/K query/key-value
heads, D head dim; `bq`/`bk` query/key tile rows, a "slot" one of the producer's SMEM ring buffers.

FlashAttention-2's backward (Dao 2023, Algorithm 2) split in two kernels, as FlashAttention-3 does,
so neither needs atomics: with P = exp2(S log2(e) - lse2) rebuilt from the saved base-2 lse and
delta = rowsum(dO * O) - d_lse precomputed by XLA (a cotangent of lse folds into delta: d lse_i /
d s_ij = P_ij),
- dQ: each consumer warpgroup owns a query tile and loops over key blocks,
  dQ = scale * sum_j (P_j * (dO V_j^T - delta)) K_j;
- dK/dV: each consumer owns a key tile and loops over query blocks, dV = sum_i P_i^T dO_i,
  dK = scale * sum_i dS_i^T Q_i, one per query head (`kernels.front` sums each GQA group).
Both use the forward's layout: a producer warpgroup streams the loop's blocks with TMA while two
consumers compute with wgmma. Key tiles padded past T are masked in dQ and simply dropped in
dK/dV; padded query rows carry lse2 = +inf, so their P is 0 everywhere.
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from kernels.common import LOG2_E, pad_axis
from kernels.mosaic_gpu.common import (
    CONSUMERS,
    Config,
    call,
    drain,
    kv_range,
    layout,
    load_vector,
    mask,
    matmul,
    matmul_acc,
    produce,
    produce_keys,
    smem_transforms,
)


def _dq_kernel(cfg: Config, dims, refs, smem, bars):
    seq_k, has_seg = dims[1], dims[3]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
    q_smem, do_smem, lse_smem, delta_smem, qseg_smem, k_smem, v_smem, kseg_smem = smem
    tile_bars, k_bars, v_bars, k_done, v_done = bars
    bq, bk, interp = cfg.bwd_block_q, cfg.bwd_block_k, cfg.interpret
    slots = k_smem.shape[0]
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("head"), lax.axis_index("wg")
    cta_start = lax.axis_index("tile") * (CONSUMERS * bq)
    num_blocks = pl.cdiv(seq_k, bk)  # skips key blocks that are all padding
    bounds = functools.partial(kv_range, cfg=cfg, dims=dims, block_k=bk, num_blocks=num_blocks)
    cta_steps, _ = bounds(cta_start, CONSUMERS * bq)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_start = cta_start + wg * bq
        steps, full = bounds(q_start, bq)
        rows = pl.ds(q_start, bq)
        bar = tile_bars.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[wg], bar)
        plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[wg], bar)
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[wg], bar)
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[wg], bar)
        if has_seg:
            plgpu.copy_gmem_to_smem(qseg_ref.at[batch, rows], qseg_smem.at[wg], bar)
        plgpu.barrier_wait(bar)
        lse = load_vector(lse_smem.at[wg], "rows", interp)  # [bq] base 2, +inf: sees nothing
        delta = load_vector(delta_smem.at[wg], "rows", interp)
        q_ids = load_vector(qseg_smem.at[wg], "rows", interp) if has_seg else None

        def step(kv_step, dq, *, masked):
            slot = lax.rem(kv_step, slots)
            plgpu.barrier_wait(k_bars.at[slot])
            s = matmul(q_smem.at[wg], k_smem.at[slot], transpose_b=True, interpret=interp)
            s = s * (cfg.scale * LOG2_E)  # [bq, bk]
            if masked:
                k_ids = load_vector(kseg_smem.at[slot], "cols", interp) if has_seg else None
                s = mask(s, q_start, kv_step * bk, cfg, dims, q_ids, k_ids, keys_in_rows=False)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
            plgpu.barrier_wait(v_bars.at[slot])
            dp = matmul(do_smem.at[wg], v_smem.at[slot], transpose_b=True, interpret=interp)
            plgpu.barrier_arrive(v_done.at[slot])
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = matmul_acc(dq, ds.astype(q_ref.dtype), k_smem.at[slot], interpret=interp)
            plgpu.barrier_arrive(k_done.at[slot])
            return dq

        dq = layout(jnp.zeros((bq, q_ref.shape[-1]), jnp.float32), "tile", interp)
        dq = lax.fori_loop(0, full, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(full, steps, functools.partial(step, masked=True), dq)
        drain(steps, cta_steps, 0, slots, ((k_bars, k_done), (v_bars, v_done)))
        q_smem.at[wg][...] = (dq * cfg.scale).astype(q_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        rings, key_bars = (k_smem, v_smem, kseg_smem), (k_bars, v_bars, k_done, v_done)
        refs = (k_ref, v_ref, kseg_ref)
        produce_keys(refs, rings, key_bars, dims, steps=cta_steps, block_k=bk)


def _q_range(k_start, keys, cfg: Config, dims, *, block_q, num_blocks):
    """(first, full): the query blocks that see keys [k_start, k_start + keys) are first .. end;
    those from `full` on see all of them, so need no mask (causal: queries at or past the
    diagonal; FA2 section 3.1.1). With segment ids the caller masks every block."""
    if not cfg.causal:
        return 0, 0
    offset = dims[1] - dims[0]  # T - S
    first = jnp.minimum(lax.div(jnp.maximum(k_start - offset, 0), block_q), num_blocks)
    full = lax.div(jnp.maximum(k_start + keys - 1 - offset, 0) + block_q - 1, block_q)
    return first, jnp.clip(full, first, num_blocks)


def _dkv_kernel(cfg: Config, dims, refs, smem, bars):
    seq_q, _, groups, has_seg = dims
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    k_smem, v_smem, kseg_smem, q_smem, do_smem, lse_smem, delta_smem, qseg_smem = smem
    tile_bars, q_bars, do_bars, q_done, do_done = bars
    bq, bk, interp = cfg.bwd_block_q, cfg.bwd_block_k, cfg.interpret
    slots = q_smem.shape[0]
    num_blocks = pl.cdiv(seq_q, bq)  # skips query blocks that are all padding
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("head"), lax.axis_index("wg")
    cta_start = lax.axis_index("tile") * (CONSUMERS * bk)
    bounds = functools.partial(_q_range, cfg=cfg, dims=dims, block_q=bq, num_blocks=num_blocks)
    cta_first, _ = bounds(cta_start, CONSUMERS * bk)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        k_start = cta_start + wg * bk
        first, full = bounds(k_start, bk)
        if has_seg:
            full = num_blocks  # every block may hold pairs of different segments
        keys = pl.ds(k_start, bk)
        kv_head = lax.div(head, groups)
        bar = tile_bars.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem.at[wg], bar)
        plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem.at[wg], bar)
        if has_seg:
            plgpu.copy_gmem_to_smem(kseg_ref.at[batch, keys], kseg_smem.at[wg], bar)
        plgpu.barrier_wait(bar)
        k_ids = load_vector(kseg_smem.at[wg], "rows", interp) if has_seg else None

        def step(q_step, carry, *, masked):
            dk, dv = carry  # [bk, D] each
            slot = lax.rem(q_step - cta_first, slots)
            plgpu.barrier_wait(q_bars.at[slot])
            # S^T = K Q^T: keys in rows, so P^T feeds dV = P^T dO straight from registers.
            st = matmul(k_smem.at[wg], q_smem.at[slot], transpose_b=True, interpret=interp)
            st = st * (cfg.scale * LOG2_E)  # [bk, bq]
            if masked:
                q_ids = load_vector(qseg_smem.at[slot], "cols", interp) if has_seg else None
                st = mask(st, k_start, q_step * bq, cfg, dims, k_ids, q_ids, keys_in_rows=True)
            lse = load_vector(lse_smem.at[slot], "cols", interp)
            pt = jnp.exp2(st - lax.broadcast_in_dim(lse, st.shape, [1]))
            plgpu.barrier_wait(do_bars.at[slot])
            dv = matmul_acc(dv, pt.astype(q_ref.dtype), do_smem.at[slot], interpret=interp)
            dpt = matmul(v_smem.at[wg], do_smem.at[slot], transpose_b=True, interpret=interp)
            delta = load_vector(delta_smem.at[slot], "cols", interp)
            plgpu.barrier_arrive(do_done.at[slot])
            dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
            dk = matmul_acc(dk, dst.astype(q_ref.dtype), q_smem.at[slot], interpret=interp)
            plgpu.barrier_arrive(q_done.at[slot])
            return dk, dv

        zeros = layout(jnp.zeros((bk, q_ref.shape[-1]), jnp.float32), "tile", interp)
        drain(cta_first, first, cta_first, slots, ((q_bars, q_done), (do_bars, do_done)))
        carry = lax.fori_loop(first, full, functools.partial(step, masked=True), (zeros, zeros))
        dk, dv = lax.fori_loop(full, num_blocks, functools.partial(step, masked=False), carry)
        k_smem.at[wg][...] = (dk * cfg.scale).astype(k_ref.dtype)
        v_smem.at[wg][...] = dv.astype(v_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[batch, keys, head])
        plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[batch, keys, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        def q_copies(q_step):
            rows = pl.ds(q_step * bq, bq)
            yield q_ref.at[batch, rows, head], q_smem
            yield lse_ref.at[batch, head, rows], lse_smem
            if has_seg:
                yield qseg_ref.at[batch, rows], qseg_smem

        def do_copies(q_step):
            rows = pl.ds(q_step * bq, bq)
            yield do_ref.at[batch, rows, head], do_smem
            yield delta_ref.at[batch, head, rows], delta_smem

        stages = ((q_bars, q_done, q_copies), (do_bars, do_done, do_copies))
        produce(cta_first, num_blocks, slots, stages)


def backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, cfg: Config):
    """(dq [B, S, H, D], dk and dv per query head [B, T, H, D]) from the forward's residuals and
    the cotangents of out and lse (d_lse may be None)."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    if dim > 128 and not cfg.interpret:
        raise ValueError(
            f"flash_attention (Mosaic GPU) backward takes head dim <= 128 (Q, dO, K, V tiles "
            f"and their slots overflow 227 KiB of SMEM beyond); got {dim}."
        )
    bq, bk, dtype = cfg.bwd_block_q, cfg.bwd_block_k, q.dtype
    has_seg = q_ids is not None
    delta = jnp.einsum(
        "bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32)
    )  # [B, H, S]
    if d_lse is not None:
        delta = delta - d_lse
    # Base-2 lse; a query that saw no key gets +inf, so exp2(s - lse2) is 0, never NaN.
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2_E, jnp.inf)
    q_rows, k_rows = CONSUMERS * bq, CONSUMERS * bk  # both kernels tile both sequences
    q_mult, k_mult = max(q_rows, bq), max(k_rows, bk)
    q_p, do_p = pad_axis(q, 1, q_mult), pad_axis(d_out, 1, q_mult)
    k_p, v_p = pad_axis(k, 1, k_mult), pad_axis(v, 1, k_mult)
    lse_p, delta_p = pad_axis(lse2, 2, q_mult, jnp.inf), pad_axis(delta, 2, q_mult)
    seq_qp, seq_kp = q_p.shape[1], k_p.shape[1]
    if has_seg:
        segs = (pad_axis(q_ids, 1, q_mult, -1), pad_axis(kv_ids, 1, k_mult, -2))
    else:
        segs = (jnp.zeros((batch, seq_qp), jnp.int32), jnp.zeros((batch, seq_kp), jnp.int32))
    args = (q_p, k_p, v_p, do_p, lse_p, delta_p, *segs)
    dims = (seq_q, seq_k, heads // kv_heads, has_seg)
    tf = smem_transforms(dim, dtype)

    def tiles(n, rows, dt=dtype, transforms=tf):
        return plgpu.SMEM((n, rows, dim), dt, transforms=transforms)

    def vectors(n, rows, dt=jnp.float32):
        return plgpu.SMEM((n, rows), dt)

    def ids(n, rows):
        return vectors(n, rows, jnp.int32) if has_seg else None

    extra = int(has_seg)
    dq_slots = min(cfg.max_concurrent_steps, seq_kp // bk)
    dq = call(
        _dq_kernel,
        cfg,
        dims,
        args,
        jax.ShapeDtypeStruct(q_p.shape, dtype),
        (
            tiles(CONSUMERS, bq),
            tiles(CONSUMERS, bq),
            vectors(CONSUMERS, bq),
            vectors(CONSUMERS, bq),
            ids(CONSUMERS, bq),
            tiles(dq_slots, bk),
            tiles(dq_slots, bk),
            ids(dq_slots, bk),
        ),
        (
            plgpu.Barrier(num_arrivals=4 + extra, num_barriers=CONSUMERS),
            plgpu.Barrier(num_arrivals=1 + extra, num_barriers=dq_slots),
            plgpu.Barrier(num_barriers=dq_slots),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=dq_slots),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=dq_slots),
        ),
        (seq_qp // q_rows, heads, batch),
    )
    dkv_slots = min(cfg.max_concurrent_steps, seq_qp // bq)
    dk, dv = call(
        _dkv_kernel,
        cfg,
        dims,
        args,
        (jax.ShapeDtypeStruct((batch, seq_kp, heads, dim), dtype),) * 2,
        (
            tiles(CONSUMERS, bk),
            tiles(CONSUMERS, bk),
            ids(CONSUMERS, bk),
            tiles(dkv_slots, bq),
            tiles(dkv_slots, bq),
            vectors(dkv_slots, bq),
            vectors(dkv_slots, bq),
            ids(dkv_slots, bq),
        ),
        (
            plgpu.Barrier(num_arrivals=2 + extra, num_barriers=CONSUMERS),
            plgpu.Barrier(num_arrivals=2 + extra, num_barriers=dkv_slots),
            plgpu.Barrier(num_arrivals=2, num_barriers=dkv_slots),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=dkv_slots),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=dkv_slots),
        ),
        (seq_kp // k_rows, heads, batch),
    )
    # GQA: each query head wrote its own dK/dV; the front sums them over each group.
    return dq[:, :seq_q], dk[:, :seq_k], dv[:, :seq_k]

"""FlashAttention forward for Hopper GPUs (sm90a) in Pallas Mosaic GPU.

Glossary as in `kernels.mosaic_gpu.common`: B batch, S/T query/key tokens, H/K query/key-value
heads, D head dim; `bq`/`bk` query/key tile rows, a "slot" one of the producer's SMEM ring buffers.

FlashAttention-2 (Dao 2023, Algorithm 1) laid out the FlashAttention-3 way (Shah et al. 2024): the
producer warpgroup streams key/value blocks into a ring of SMEM slots; each of the two consumers
owns a `bq`-row query tile and, per key block, runs S = Q K^T on the tensor cores (wgmma), the
base-2 online softmax in registers, and O += P V (wgmma with P from registers). With `pingpong`, a
barrier between the two consumers staggers them so one's softmax overlaps the other's matmuls
(FA3 section 3.1).
"""

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from kernels.common import LN_2, LOG2_E, MASK_VALUE, pad_axis
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
    produce_keys,
    smem_transforms,
)


def _forward_kernel(cfg: Config, dims, refs, smem, bars):
    has_seg = dims[3]
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, out_ref, lse_ref = refs
    q_smem, k_smem, v_smem, qseg_smem, kseg_smem, lse_smem = smem
    q_bars, k_bars, v_bars, k_done, v_done, schedule = bars
    bq, bk, slots, interp = cfg.block_q, cfg.block_k, cfg.max_concurrent_steps, cfg.interpret
    dim, num_blocks = q_ref.shape[-1], k_ref.shape[1] // bk
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("head"), lax.axis_index("wg")
    cta_start = lax.axis_index("tile") * (CONSUMERS * bq)
    bounds = functools.partial(kv_range, cfg=cfg, dims=dims, block_k=bk, num_blocks=num_blocks)
    # The producer loads what the later tile needs; the earlier one drains what it skips.
    cta_steps, _ = bounds(cta_start, CONSUMERS * bq)

    def schedule_barrier():
        if cfg.pingpong:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_start = cta_start + wg * bq
        steps, full = bounds(q_start, bq)
        rows = pl.ds(q_start, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[wg], q_bars.at[wg])
        if has_seg:
            plgpu.copy_gmem_to_smem(qseg_ref.at[batch, rows], qseg_smem.at[wg], q_bars.at[wg])
        plgpu.barrier_wait(q_bars.at[wg])
        q_ids = load_vector(qseg_smem.at[wg], "rows", interp) if has_seg else None

        def step(kv_step, carry, *, masked):
            acc, m, l = carry  # [bq, D], [bq], [bq]: FA2 Algorithm 1's O, m and l (base 2)
            slot = lax.rem(kv_step, slots)
            plgpu.barrier_wait(k_bars.at[slot])
            s = matmul(q_smem.at[wg], k_smem.at[slot], transpose_b=True, interpret=interp)
            schedule_barrier()
            s = s * (cfg.scale * LOG2_E)  # [bq, bk] logits in base 2
            if masked:
                k_ids = load_vector(kseg_smem.at[slot], "cols", interp) if has_seg else None
                s = mask(s, q_start, kv_step * bk, cfg, dims, q_ids, k_ids, keys_in_rows=False)
            plgpu.barrier_arrive(k_done.at[slot])
            # m starts at MASK_VALUE, not -inf, so a row with every key masked so far keeps
            # alpha = exp2(0) and p = exp2(-inf) = 0 instead of NaN.
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(q_ref.dtype)
            if cfg.pingpong:
                plgpu.barrier_arrive(schedule)  # softmax done: the other consumer may issue wgmma
            plgpu.barrier_wait(v_bars.at[slot])
            if cfg.pingpong:
                plgpu.barrier_wait(schedule)
            acc = matmul_acc(acc, p16, v_smem.at[slot], interpret=interp)
            plgpu.barrier_arrive(v_done.at[slot])
            return acc, m_new, l

        carry = (
            layout(jnp.zeros((bq, dim), jnp.float32), "tile", interp),
            layout(jnp.full((bq,), MASK_VALUE, jnp.float32), "rows", interp),
            layout(jnp.zeros((bq,), jnp.float32), "rows", interp),
        )
        pl.when(wg == 1)(schedule_barrier)  # staggers the consumers by half a step
        carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)
        stages = ((k_bars, k_done), (v_bars, v_done))
        drain(steps, cta_steps, 0, slots, stages, between=schedule_barrier)
        pl.when(wg == 0)(schedule_barrier)

        # A query that saw no key (l == 0) outputs zeros and lse -inf, never NaN.
        seen = l > 0
        inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        q_smem.at[wg][...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(q_ref.dtype)
        lse_smem.at[wg][...] = jnp.where(
            seen, m * LN_2 + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf
        )
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], out_ref.at[batch, rows, head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        rings, key_bars = (k_smem, v_smem, kseg_smem), (k_bars, v_bars, k_done, v_done)
        refs = (k_ref, v_ref, kseg_ref)
        produce_keys(refs, rings, key_bars, dims, steps=cta_steps, block_k=bk)


def forward(q, k, v, q_ids, kv_ids, cfg: Config):
    """out [B, S, H, D] and natural-log lse [B, H, S] float32 (-inf where a query sees no key)."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    has_seg = q_ids is not None
    rows_per_cta = CONSUMERS * cfg.block_q
    q_p = pad_axis(q, 1, rows_per_cta)
    k_p, v_p = pad_axis(k, 1, cfg.block_k), pad_axis(v, 1, cfg.block_k)
    seq_qp, seq_kp = q_p.shape[1], k_p.shape[1]
    slots = min(cfg.max_concurrent_steps, seq_kp // cfg.block_k)
    cfg = dataclasses.replace(cfg, max_concurrent_steps=slots)
    if has_seg:
        # Padding rows and keys get ids -1 and -2: they match nothing real (masks hide them anyway).
        segs = (pad_axis(q_ids, 1, rows_per_cta, -1), pad_axis(kv_ids, 1, cfg.block_k, -2))
    else:
        segs = (jnp.zeros((batch, seq_qp), jnp.int32), jnp.zeros((batch, seq_kp), jnp.int32))

    tf = smem_transforms(dim, q.dtype)
    seg_q = plgpu.SMEM((CONSUMERS, cfg.block_q), jnp.int32) if has_seg else None
    seg_k = plgpu.SMEM((slots, cfg.block_k), jnp.int32) if has_seg else None
    smem = (
        plgpu.SMEM((CONSUMERS, cfg.block_q, dim), q.dtype, transforms=tf),  # Q, then O
        plgpu.SMEM((slots, cfg.block_k, dim), q.dtype, transforms=tf),
        plgpu.SMEM((slots, cfg.block_k, dim), q.dtype, transforms=tf),
        seg_q,
        seg_k,
        plgpu.SMEM((CONSUMERS, cfg.block_q), jnp.float32),
    )
    copies = 2 if has_seg else 1  # TMA copies that arrive on each Q and K barrier
    barriers = (
        plgpu.Barrier(num_arrivals=copies, num_barriers=CONSUMERS),
        plgpu.Barrier(num_arrivals=copies, num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS),
    )
    out, lse = call(
        _forward_kernel,
        cfg,
        (seq_q, seq_k, heads // kv_heads, has_seg),
        (q_p, k_p, v_p, *segs),
        (
            jax.ShapeDtypeStruct((batch, seq_qp, heads, dim), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, seq_qp), jnp.float32),
        ),
        smem,
        barriers,
        (seq_qp // rows_per_cta, heads, batch),
    )
    return out[:, :seq_q], lse[..., :seq_q]

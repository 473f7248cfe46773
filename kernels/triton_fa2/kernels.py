"""FlashAttention-2 (Dao 2023) forward and backward as Triton kernels: the @triton.jit code alone.

Glossary as in `kernels.reference`: B batch, S query tokens, T key tokens, H query heads, K
key/value heads, G = H // K query heads per key/value head, D head dim. Tiles: BLOCK_M query rows,
BLOCK_N key rows, BLOCK_D = D rounded up to a power of two (>= 16, what tl.dot takes), masked
past D.

Arrays keep the caller's [B, S, H, D] / [B, T, K, D] layout; kernels address them through strides
(last dim contiguous), so nothing is transposed or padded in HBM: sequence tails are load/store
masks. lse is [B, H, S] float32 in natural log; delta = rowsum(dO * O) is [B, S, H] float32.

Logits stay in base 2 (`qk_scale` = scale * log2(e)): exp2 is one MUFU instruction on NVIDIA GPUs.
Masked logits are -inf while the running max starts at the finite MASK_VALUE, so exp2 never sees
(-inf) - (-inf) and a query that sees no key keeps l = 0, which the epilogue turns into zeros and
lse = -inf (the reference's convention). Launch plans (grids, strides, constexprs) live in
`kernels.triton_fa2.forward` and `.backward`; this module is imported only by a launcher (jax-triton
on a GPU, triton's interpreter in the tests), where triton is.
"""

import triton
import triton.language as tl

from kernels.common import LN_2, LOG2_E, MASK_VALUE

# Globals read inside @triton.jit code must be constexpr.
_MASK_VALUE = tl.constexpr(MASK_VALUE)
_LOG2_E = tl.constexpr(LOG2_E)
_LN_2 = tl.constexpr(LN_2)


@triton.jit
def _key_range(
    q_lo, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """Key blocks for the query block starting at q_lo: [0, full_end) need no mask at all,
    [full_end, hi) need the causal and/or key-tail mask; keys >= hi are invisible (skipped)."""
    if CAUSAL:
        # End-aligned causal: query i sees keys 0 .. i + T - S.
        hi = tl.maximum(tl.minimum(seq_k, q_lo + BLOCK_M + seq_k - seq_q), 0)
        # A key block is visible to every row when its last key <= q_lo + T - S.
        full_end = tl.maximum(q_lo + seq_k - seq_q + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = seq_k
        full_end = seq_k
    full_end = tl.minimum(full_end, seq_k // BLOCK_N * BLOCK_N)
    return full_end, hi


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, q_seg, offs_m, k_base, v_base, kv_seg_base,
    stride_kt, stride_vt, seq_q, seq_k, qk_scale, lo, hi,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """FA2 Algorithm 1, inner loop (lines 6-10) over key blocks [lo, hi): online softmax."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN] base 2
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (seq_k - seq_q))
            s = tl.where(visible, s, float("-inf"))
        if HAS_SEGMENTS:
            kv_seg = tl.load(kv_seg_base + cols, mask=cols < seq_k, other=-1)
            s = tl.where(q_seg[:, None] == kv_seg[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        # P goes to the matmul in the input dtype (tensor cores), accumulation stays float32.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(
    Q, K, V, QSeg, KVSeg,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_qsb, stride_kvsb,
    seq_q, seq_k, heads, qk_scale,
    Out, Lse,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """FA2 Algorithm 1: one program per (query block, batch * head); writes O and lse."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)  # int64 batch offsets: B*S*H*D can pass 2**31
    h = bh % heads
    kvh = h // GROUP
    q_lo = start_m * BLOCK_M
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if HAS_SEGMENTS:
        q_seg = tl.load(QSeg + b * stride_qsb + offs_m, mask=row_ok, other=-2)
    else:
        q_seg = 0
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    kv_seg_base = KVSeg + b * stride_kvsb

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _MASK_VALUE
    full_end, hi = _key_range(q_lo, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    # Causal: blocks past `hi` are never touched; only the diagonal/tail blocks pay for masks.
    acc, l_i, m_i = _fwd_block(
        acc, l_i, m_i, q, q_seg, offs_m, k_base, v_base, kv_seg_base, stride_kt, stride_vt,
        seq_q, seq_k, qk_scale, 0, full_end,
        BLOCK_N, BLOCK_D, HEAD_DIM, False, CAUSAL, HAS_SEGMENTS, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_block(
        acc, l_i, m_i, q, q_seg, offs_m, k_base, v_base, kv_seg_base, stride_kt, stride_vt,
        seq_q, seq_k, qk_scale, full_end, hi,
        BLOCK_N, BLOCK_D, HEAD_DIM, True, CAUSAL, HAS_SEGMENTS, PRECISION,
    )  # fmt: skip

    # Epilogue (Algorithm 1, lines 12-13); a query that saw no key has l = 0 -> zeros, lse -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN_2, float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _load_lse2(lse_ptrs, mask):
    """lse in base 2 for P = exp2(s - lse2). Rows past S read +inf so their P is exactly 0 (no
    extra mask); a query that saw no key (-inf) reads 0, and its logits are all -inf anyway."""
    lse = tl.load(lse_ptrs, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), 0.0, lse * _LOG2_E)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, kv_seg, offs_n, q_base, do_base, lse_base, delta_base, q_seg_base,
    stride_qs, stride_dos, stride_ds, seq_q, seq_k, qk_scale, lo, hi,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """FA2 Algorithm 2 (dK, dV half): for a fixed key block, loop over query blocks [lo, hi).
    Works on transposed tiles (keys along rows) so P^T and dS^T need no transposes."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_q
        q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = _load_lse2(lse_base + rows, row_ok)
        delta = tl.load(delta_base + rows * stride_ds, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
        if MASKED:
            s_t = tl.where(offs_n[:, None] <= rows[None, :] + (seq_k - seq_q), s_t, float("-inf"))
        if HAS_SEGMENTS:
            q_seg = tl.load(q_seg_base + rows, mask=row_ok, other=-2)
            s_t = tl.where(kv_seg[:, None] == q_seg[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse2[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P * (dP - delta), FA2 eq. for softmax grad
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, Lse, Delta, QSeg, KVSeg,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_db, stride_ds,
    stride_qsb, stride_kvsb, stride_dkb, stride_dkt, stride_dkh,
    seq_q, seq_k, kv_heads, qk_scale, sm_scale,
    DK, DV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (key block, batch * kv head): dK, dV summed over the G query heads that
    share the kv head inside the program (float32 accumulators, no [B, T, H, D] temporaries)."""
    start_n = tl.program_id(0)
    bk = tl.program_id(1)
    b = (bk // kv_heads).to(tl.int64)
    kvh = bk % kv_heads
    n_lo = start_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_k
    kv_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if HAS_SEGMENTS:
        kv_seg = tl.load(KVSeg + b * stride_kvsb + offs_n, mask=col_ok, other=-1)
    else:
        kv_seg = 0
    if CAUSAL:
        # Query i sees key j iff i >= j - (T - S): skip query blocks before the first such i;
        # blocks from `full_start` on see the whole key block and need no causal mask.
        lo = tl.maximum(n_lo - (seq_k - seq_q), 0) // BLOCK_M * BLOCK_M
        first_full = tl.maximum(n_lo + BLOCK_N - 1 - (seq_k - seq_q), 0)
        full_start = tl.minimum((first_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seq_q)
    else:
        lo = 0
        full_start = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = Lse + b * stride_lb + h * stride_lh
        delta_base = Delta + b * stride_db + h  # [B, S, H], H contiguous
        q_seg_base = QSeg + b * stride_qsb
        dk, dv = _dkdv_block(
            dk, dv, k, v, kv_seg, offs_n, q_base, do_base, lse_base, delta_base, q_seg_base,
            stride_qs, stride_dos, stride_ds, seq_q, seq_k, qk_scale, lo, full_start,
            BLOCK_M, BLOCK_D, HEAD_DIM, CAUSAL, CAUSAL, HAS_SEGMENTS, PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_block(
            dk, dv, k, v, kv_seg, offs_n, q_base, do_base, lse_base, delta_base, q_seg_base,
            stride_qs, stride_dos, stride_ds, seq_q, seq_k, qk_scale, full_start, seq_q,
            BLOCK_M, BLOCK_D, HEAD_DIM, False, CAUSAL, HAS_SEGMENTS, PRECISION,
        )  # fmt: skip

    # dS was taken w.r.t. the scaled logits: dK = scale * dS^T Q.
    tile = b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + tile, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=kv_mask)  # dV has dK's [B, T, K, D]


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, q_seg, offs_m, k_base, v_base, kv_seg_base,
    stride_kt, stride_vt, seq_q, seq_k, qk_scale, lo, hi,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """FA2 Algorithm 2 (dQ half), split into its own kernel as in the FA2 Triton code: for a
    fixed query block, loop over key blocks [lo, hi), recomputing P from lse."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (seq_k - seq_q))
            s = tl.where(visible, s, float("-inf"))
        if HAS_SEGMENTS:
            kv_seg = tl.load(kv_seg_base + cols, mask=cols < seq_k, other=-1)
            s = tl.where(q_seg[:, None] == kv_seg[None, :], s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def dq_kernel(
    Q, K, V, DO, Lse, Delta, QSeg, KVSeg,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_db, stride_ds,
    stride_qsb, stride_kvsb, stride_dqb, stride_dqs, stride_dqh,
    seq_q, seq_k, heads, qk_scale, sm_scale,
    DQ,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, batch * head): dQ = scale * sum_j dS_j K_j."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    kvh = h // GROUP
    q_lo = start_m * BLOCK_M
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse2 = _load_lse2(Lse + b * stride_lb + h * stride_lh + offs_m, row_ok)
    delta = tl.load(Delta + b * stride_db + h + offs_m * stride_ds, mask=row_ok, other=0.0)
    if HAS_SEGMENTS:
        q_seg = tl.load(QSeg + b * stride_qsb + offs_m, mask=row_ok, other=-2)
    else:
        q_seg = 0
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    kv_seg_base = KVSeg + b * stride_kvsb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _key_range(q_lo, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_block(
        dq, q, do, lse2, delta, q_seg, offs_m, k_base, v_base, kv_seg_base, stride_kt, stride_vt,
        seq_q, seq_k, qk_scale, 0, full_end,
        BLOCK_N, BLOCK_D, HEAD_DIM, False, CAUSAL, HAS_SEGMENTS, PRECISION,
    )  # fmt: skip
    dq = _dq_block(
        dq, q, do, lse2, delta, q_seg, offs_m, k_base, v_base, kv_seg_base, stride_kt, stride_vt,
        seq_q, seq_k, qk_scale, full_end, hi,
        BLOCK_N, BLOCK_D, HEAD_DIM, True, CAUSAL, HAS_SEGMENTS, PRECISION,
    )  # fmt: skip
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)

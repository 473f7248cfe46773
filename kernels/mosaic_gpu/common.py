"""Pieces the Mosaic GPU (Hopper, sm90a) forward and backward kernels share.

Glossary as in `kernels.reference`: B batch, S query tokens, T key tokens, H query heads, K
key/value heads, D head dim. Inside kernels: `bq` query rows per consumer warpgroup, `bk` keys
per block, a "slot" one of the `max_concurrent_steps` SMEM buffers of the producer's ring.

Every kernel here is laid out the FlashAttention-3 way (Shah et al. 2024): a CTA runs three
warpgroups; the last one is the producer, which only issues TMA copies of the blocks its loop
streams into a ring of SMEM slots, and the first two are consumers computing with wgmma.

`interpret=True` runs the kernels in Mosaic GPU's CPU interpreter, which simulates warpgroups, SMEM,
TMA and barriers but (jax 0.10.2) cannot run three things the kernels use: wgmma with a transposed
operand (`transpose_ref`), wgmma with a register operand, and `pl.run_state` accumulation; nor
layout casts. `matmul` and friends swap exactly those for `lax.dot_general` and plain arrays when
interpreting, so everything else (copies, slots, barriers, masks, softmax, loop bounds) is what runs
on the GPU.
"""

import dataclasses

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

CONSUMERS = 2  # Consumer warpgroups per CTA; warpgroup index CONSUMERS is the producer.
DTYPES = (jnp.bfloat16, jnp.float16)  # what wgmma multiplies


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one attention call (hashable: a static argument of `kernels.front`)."""

    causal: bool
    scale: float
    block_q: int  # query rows per consumer warpgroup; a CTA covers CONSUMERS * block_q rows
    block_k: int  # keys per forward pipeline step
    bwd_block_q: int
    bwd_block_k: int
    max_concurrent_steps: int  # SMEM slots in the producer's ring
    pingpong: bool
    interpret: bool


def call(kernel, cfg: Config, dims, args, out_type, smem, bars, grid):
    """Runs kernel(cfg, dims, refs, smem_refs, barrier_refs) on a grid (tile, head, batch) of CTAs
    of CONSUMERS + 1 warpgroups, compiled or in the interpreter as cfg says."""

    def body(*refs):
        *refs, smem_refs, bar_refs = refs
        kernel(cfg, dims, refs, smem_refs, bar_refs)

    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=(smem, bars),
        grid=grid,
        grid_names=("tile", "head", "batch"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(cfg.interpret),
    )(*args)


def interpret_params(interpret: bool):
    """What plgpu.kernel's `interpret` takes: the GPU interpreter's params, or None (compile)."""
    if not interpret:
        return None
    # jax 0.10.2 keeps the class in _src; newer versions may export it from plgpu.
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def smem_transforms(dim: int, dtype) -> tuple:
    """Tiling and swizzle for a [rows, dim] SMEM tile feeding wgmma (widest swizzle that fits)."""
    row_bytes = dim * jnp.dtype(dtype).itemsize
    swizzle = next(s for s in (128, 64, 32) if row_bytes % s == 0)
    return (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )


def layout(x, kind: str, interpret: bool):
    """x cast to the wgmma register layout ("tile", "rows": [bq] per row, "cols": [bk] per column).

    The interpreter keeps plain arrays (it has no lowering for layout_cast) and layouts only say
    how a value is spread over registers, not what it is.
    """
    if interpret:
        return x
    wgmma = plgpu.Layout.WGMMA
    return plgpu.layout_cast(
        x, {"tile": wgmma, "rows": wgmma.reduce(1), "cols": wgmma.reduce(0)}[kind]
    )


def load_vector(ref, kind: str, interpret: bool):
    """A [n] SMEM vector (lse, delta, segment ids) in the layout of a tile's rows or columns."""
    if interpret:
        return ref[...]
    wgmma = plgpu.Layout.WGMMA
    return plgpu.load(ref, (), layout=wgmma.reduce(1) if kind == "rows" else wgmma.reduce(0))


def _iota(shape, dim: int, interpret: bool):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def matmul(a, b, *, transpose_b: bool, interpret: bool):
    """a @ b (or a @ b^T) in float32: a an SMEM ref or registers, b an SMEM ref, one wgmma."""
    rows = a.shape[0]
    cols = b.shape[0] if transpose_b else b.shape[1]
    if interpret:
        contract = (((1,), (1 if transpose_b else 0,)), ((), ()))
        # a[...] reads a ref and leaves an array as it is.
        return lax.dot_general(a[...], b[...], contract, preferred_element_type=jnp.float32)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b)
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((rows, cols), jnp.float32))


def matmul_acc(acc, a, b, *, interpret: bool):
    """acc + a @ b with a in registers: wgmma accumulates into acc's registers in place."""
    if interpret:
        return acc + matmul(a, b, transpose_b=False, interpret=True)

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(run)(plgpu.ACC.init(acc))


def mask(s, row_start, col_start, cfg: Config, dims, row_ids=None, col_ids=None, *, keys_in_rows):
    """The base-2 logits tile s with -inf at (query, key) pairs that do not attend.

    row_start/col_start: absolute positions of the tile's first row and column; keys_in_rows: the
    tile is [keys, queries] (the dK/dV kernel's transposed S). Causal masks are aligned at the end
    (offset T - S), as `kernels.reference` does; keys past T are padding.
    """
    seq_q, seq_k = dims[:2]
    rows = _iota(s.shape, 0, cfg.interpret) + row_start
    cols = _iota(s.shape, 1, cfg.interpret) + col_start
    q_pos, k_pos = (cols, rows) if keys_in_rows else (rows, cols)
    visible = k_pos < seq_k
    if cfg.causal:
        visible = visible & (q_pos + (seq_k - seq_q) >= k_pos)
    if row_ids is not None:
        visible = visible & (
            lax.broadcast_in_dim(row_ids, s.shape, [0])
            == lax.broadcast_in_dim(col_ids, s.shape, [1])
        )
    # -inf, not MASK_VALUE: against a finite running max (or the saved lse) it gives p = 0 exactly.
    return jnp.where(visible, s, -jnp.inf)


def kv_range(q_start, rows, cfg: Config, dims, *, block_k, num_blocks):
    """(steps, full): key blocks that query rows [q_start, q_start + rows) visit, and how many of
    the leading ones need no mask. Causal skips blocks past the diagonal (FA2 section 3.1.1).
    dims: the kernel's (S, T, G, has segment ids)."""
    seq_q, seq_k, _, segments = dims
    steps, full = num_blocks, num_blocks
    if cfg.causal:
        offset = seq_k - seq_q
        # Keys 0 .. last visible to the last row; lax.div truncates, so divide non-negatives only.
        ends = jnp.maximum(q_start + rows + offset, 0)
        steps = jnp.minimum(lax.div(ends + block_k - 1, block_k), num_blocks)
        full = lax.div(jnp.maximum(q_start + offset + 1, 0), block_k)
    if seq_k % block_k:
        full = jnp.minimum(full, seq_k // block_k)  # the last block holds padding keys
    if segments:
        full = 0
    return steps, jnp.minimum(full, steps)


def produce(start, stop, slots: int, stages):
    """The producer warpgroup: TMA copies of blocks start .. stop-1 into a ring of `slots` slots.

    stages: (ready, done, copies) per group of buffers that is released together; copies(step)
    yields (GMEM block, SMEM ring) pairs whose copies all arrive on ready[slot]. A slot is refilled
    once both consumers arrived on done[slot] for the block it held `slots` steps before.
    """
    plgpu.set_max_registers(40, action="decrease")  # the consumers take the registers

    def load(step, _):
        slot = lax.rem(step - start, slots)
        for ready, done, copies in stages:
            pl.when(step - start >= slots)(lambda done=done: plgpu.barrier_wait(done.at[slot]))
            for src, ring in copies(step):
                plgpu.copy_gmem_to_smem(src, ring.at[slot], ready.at[slot])

    def tail(step, _):
        # Nothing needs this on the GPU (consumers wait for the data they read), but it costs
        # nothing there and the interpreter insists that a thread waiting on a barrier sees all
        # of its phases.
        for _, done, _ in stages:
            plgpu.barrier_wait(done.at[lax.rem(step - start, slots)])

    lax.fori_loop(start, stop, load, None)
    lax.fori_loop(jnp.maximum(stop - slots, start), stop, tail, None)


def produce_keys(refs, rings, bars, dims, *, steps, block_k):
    """The producer of a kernel whose consumers loop over key blocks 0 .. steps-1 (the forward
    and dQ): K (with the key segment ids) and V blocks of this CTA's kv head, released apart.

    refs: (k, v, kv segment ids) in GMEM; rings: their SMEM rings; bars: (k ready, v ready,
    k done, v done); dims: the kernel's (S, T, G query heads per kv head, has segment ids)."""
    k_ref, v_ref, kseg_ref = refs
    k_smem, v_smem, kseg_smem = rings
    k_bars, v_bars, k_done, v_done = bars
    groups, has_seg = dims[2:]
    batch, kv_head = lax.axis_index("batch"), lax.div(lax.axis_index("head"), groups)

    def k_copies(kv_step):
        keys = pl.ds(kv_step * block_k, block_k)
        yield k_ref.at[batch, keys, kv_head], k_smem
        if has_seg:
            yield kseg_ref.at[batch, keys], kseg_smem

    def v_copies(kv_step):
        yield v_ref.at[batch, pl.ds(kv_step * block_k, block_k), kv_head], v_smem

    stages = ((k_bars, k_done, k_copies), (v_bars, v_done, v_copies))
    produce(0, steps, k_smem.shape[0], stages)


def drain(lo, hi, start, slots: int, stages, between=lambda: None):
    """A consumer's share of blocks lo .. hi-1 that it does not use but the other consumer does:
    wait for each copy before releasing it, so no slot is released twice in one phase."""

    def release(step, _):
        slot = lax.rem(step - start, slots)
        for ready, done in stages:
            plgpu.barrier_wait(ready.at[slot])
            plgpu.barrier_arrive(done.at[slot])
            between()

    lax.fori_loop(lo, hi, release, None)

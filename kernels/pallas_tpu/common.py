"""Pieces the Pallas TPU (Mosaic TPU) FlashAttention forward and backward kernels share.

Glossary: B batch, S query tokens, T key tokens, H query heads, K key/value heads, G = H // K query
heads per key/value head, D head dim; bq and bk the query and key block lengths, nq and nk the
block counts, Sp and Tp the lengths padded to whole blocks. Public arrays are [B, S, H, D] as in
`kernels.reference`; the kernels see [B, H, Sp, D] (see `heads_major`).

TPU tiling: the last two dims of every block must be multiples of (8, 128) (sublanes, lanes) or
the whole array dims. That decides every layout here:
- q, k, v, o blocks are (bq or bk, D): D is the whole last dim, so any D is legal; Mosaic pads
  D = 64 to 128 lanes in VMEM, which costs VMEM, not correctness.
- Per-query statistics (running max m, sum l, and the saved lse) are kept lane-broadcast as
  [bq, 128]: a column of per-row scalars in the layout the [bq, bk] logits broadcast against,
  so no sublane-to-lane relayout is needed inside the loop (jax's own TPU kernels do the same).
- Segment ids go in as [B, Sp, 128] for the rows of a tile (lane-broadcast columns) and as
  [B, 8, Tp] for its columns (sublane-broadcast rows); see `ids_as_columns` / `ids_as_rows`.
"""

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import pad_axis

NUM_LANES = 128
NUM_SUBLANES = 8
# Dot dimension numbers for x @ y^T (contract the last dims): the MXU takes the transposed
# right-hand side natively, so k is never transposed in memory.
NT = (((1,), (1,)), ((), ()))
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one call (hashable: a static argument of `kernels.front`)."""

    causal: bool
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: pltpu.InterpretParams | None  # None: compile with Mosaic for a real TPU


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Which (query block, key block) pairs run and which need the elementwise mask.

    Causal attention is aligned at the end (`kernels.reference`): query row r sees keys
    0 .. r + T - S. Block indices may be traced grid indices; the answers are then traced too.
    """

    seq_q: int
    seq_k: int
    block_q: int
    block_k: int
    causal: bool
    segments: bool

    @property
    def num_q(self):
        return -(-self.seq_q // self.block_q)

    @property
    def num_k(self):
        return -(-self.seq_k // self.block_k)

    @property
    def offset(self):
        return self.seq_k - self.seq_q

    def runs(self, qi, kj):
        """False for a causal pair whose every key lies after every query (skipped entirely)."""
        if not self.causal:
            return True
        return kj * self.block_k <= (qi + 1) * self.block_q - 1 + self.offset

    def last_k(self, qi):
        """The last key block any query of block qi sees (0 if it sees none)."""
        last_key = jnp.maximum((qi + 1) * self.block_q - 1 + self.offset, 0)
        return jnp.minimum(lax.div(last_key, self.block_k), self.num_k - 1)

    def first_q(self, kj):
        """The first query block that sees any key of block kj."""
        first_row = jnp.maximum(kj * self.block_k - self.offset, 0)
        return jnp.minimum(lax.div(first_row, self.block_q), self.num_q - 1)

    def k_fetched(self, qi, kj):
        """Key block to DMA at grid step (qi, kj). Skipped causal steps repeat the last block that
        ran, and Pallas does not re-fetch a block whose index did not change."""
        return jnp.minimum(kj, self.last_k(qi)) if self.causal else kj

    def q_fetched(self, kj, qi):
        """Query block to DMA at (kj, qi) in the key-major backward: skipped steps come first, so
        they prefetch the first block that runs."""
        return jnp.maximum(qi, self.first_q(kj)) if self.causal else qi

    def needs_mask(self, qi, kj):
        """Whether some entry of the pair is hidden: the causal diagonal, the padded last key
        block, or any block when segment ids are given (their pattern is data, not geometry)."""
        if self.segments:
            return True
        need = False
        if self.seq_k % self.block_k:
            need = kj == self.num_k - 1
        if self.causal:
            diagonal = (kj + 1) * self.block_k - 1 > qi * self.block_q + self.offset
            need = diagonal if need is False else jnp.logical_or(need, diagonal)
        return need

    def visible(self, q_pos, k_pos, q_ids=None, kv_ids=None):
        """Elementwise visibility from broadcastable positions (and segment ids)."""
        keep = k_pos < self.seq_k
        if self.causal:
            keep = jnp.logical_and(keep, k_pos <= q_pos + self.offset)
        if q_ids is not None:
            keep = jnp.logical_and(keep, q_ids == kv_ids)
        return keep


def run_tile(runs, needs_mask, step):
    """step(masked) under pl.when: the mask's iotas and selects only on pairs that need them."""
    if isinstance(needs_mask, bool):
        pl.when(runs)(functools.partial(step, needs_mask))
        return
    pl.when(jnp.logical_and(runs, needs_mask))(functools.partial(step, True))
    pl.when(jnp.logical_and(runs, jnp.logical_not(needs_mask)))(functools.partial(step, False))


def lanes(x, width):
    """A lane-broadcast [rows, 128] statistic as [rows, width]: whole 128-lane copies, then a
    prefix slice (for D = 64, or the small blocks of interpret tests), as Mosaic lays them out."""
    return jnp.tile(x, (1, -(-width // NUM_LANES)))[:, :width]


def nbytes(*arrays):
    return sum(x.size * x.dtype.itemsize for x in arrays)


def positions(shape, axis, start):
    """Token positions start + 0, 1, ... along `axis` of a 2-D tile (TPU iotas are >= 2-D)."""
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def heads_major(x, block):
    """[B, S, H, D] -> [B, H, Sp, D]. A block must end in (tokens, D) tiles: with heads in the
    middle, the last two block dims would be (1 head, D), neither a multiple of 8 sublanes nor the
    whole H, so one transpose in XLA (fused with the padding) buys dense (8, 128) tiles."""
    return pad_axis(jnp.swapaxes(x, 1, 2), 2, block)


def ids_as_columns(ids, block):
    """[B, S] -> [B, Sp, 128]: each token's id repeated along lanes, for the rows of a tile."""
    ids = pad_axis(ids.astype(jnp.int32), 1, block)
    return jnp.broadcast_to(ids[:, :, None], (*ids.shape, NUM_LANES))


def ids_as_rows(ids, block):
    """[B, T] -> [B, 8, Tp]: each token's id repeated along sublanes, for the columns of a tile."""
    ids = pad_axis(ids.astype(jnp.int32), 1, block)
    return jnp.broadcast_to(ids[:, None, :], (ids.shape[0], NUM_SUBLANES, ids.shape[1]))


def query_major_segments(q_segment_ids, kv_segment_ids, tiles, block_q, block_k):
    """(block specs, arrays) of the segment ids for a grid (b, h, query block i, key block j):
    the forward's and the dQ kernel's (the dK/dV kernel walks keys outermost)."""
    specs = [
        pl.BlockSpec((None, block_q, NUM_LANES), lambda b, h, i, j: (b, i, 0)),
        pl.BlockSpec(
            (None, NUM_SUBLANES, block_k), lambda b, h, i, j: (b, 0, tiles.k_fetched(i, j))
        ),
    ]
    ids = [ids_as_columns(q_segment_ids, block_q), ids_as_rows(kv_segment_ids, block_k)]
    return specs, ids


def compiler_params():
    """Batch, head and the outer block axis are independent (megacore may split them); the inner
    block axis carries the VMEM accumulators from step to step, so it runs in order."""
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )

"""Shared by the neighborhood-attention Pallas kernels (`forward.py`, `backward.py`): the tiling
geometry (`Axis`, `Config`), layouts, the query tile's loop over its key halo, and the
pallas_call per target (Triton for NVIDIA GPUs, Mosaic for TPUs).

The design, glossary and what is untested on hardware: `kernels/neighborhood/__init__.py`.
"""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels.neighborhood.reference import axis_mask

NT = (((1,), (1,)), ((), ()))  # x @ y^T
NN = (((1,), (0,)), ((), ()))  # x @ y
TN = (((0,), (0,)), ((), ()))  # x^T @ y
BACKENDS = ("triton", "tpu")


def pow2(n: int) -> int:
    """n rounded up to a power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, 1 << (n - 1).bit_length())


@functools.lru_cache(maxsize=64)
def query_halo_extent(length: int, kernel_size: int, tile: int) -> int:
    """The most queries, over key tiles, whose windows reach some key of one tile: counted on the
    definition's mask rather than derived, so the bound is exact for every shape."""
    sees = axis_mask(length, kernel_size)  # [queries, keys]
    spans = []
    for start in range(0, length, tile):
        queries = np.flatnonzero(sees[:, start : start + tile].any(1))
        spans.append(queries[-1] - queries[0] + 1)
    return int(max(spans))


@dataclasses.dataclass(frozen=True)
class Axis:
    """One grid axis of `length` tokens cut into tiles of `tile`: the window geometry, as static
    ints and as functions of (possibly traced) indices."""

    length: int
    kernel_size: int
    tile: int

    @property
    def window(self) -> int:
        return min(self.kernel_size, self.length)

    @property
    def n_tiles(self) -> int:
        return -(-self.length // self.tile)

    @property
    def key_halo(self) -> int:
        return min(self.tile + self.window - 1, self.length)

    @property
    def query_halo(self) -> int:
        return query_halo_extent(self.length, self.kernel_size, self.tile)

    def start(self, i):
        return jnp.clip(i - self.kernel_size // 2, 0, self.length - self.window)

    def sees(self, query, key):
        start = self.start(query)
        return (key >= start) & (key < start + self.window)

    def first_key(self, t):
        """First key of tile t's key halo (moved inward where the halo would overrun)."""
        return jnp.minimum(self.start(t * self.tile), self.length - self.key_halo)

    def first_seen_by(self, t):
        """The first query that sees a key of tile t: qmin(r0) = r0 - w + 1 + K // 2 where a
        window ending at r0 need not start at 0, else 0."""
        low = t * self.tile - self.window + 1
        return jnp.where(low > 0, low + self.kernel_size // 2, 0)

    def last_seen_by(self, t):
        """The last query that sees a key of tile t: qmax(r1) = r1 + K // 2 for r1 (the tile's
        last real key) short of the last window's start, else the axis' last query."""
        last = jnp.minimum(t * self.tile + self.tile - 1, self.length - 1)
        return jnp.where(
            last >= self.length - self.window, self.length - 1, last + self.kernel_size // 2
        )

    def first_query(self, t):
        """First query of tile t's query halo: `query_halo` queries from here hold every query
        that sees one of its keys (moved inward where they would overrun the axis)."""
        return jnp.minimum(self.first_seen_by(t), self.length - self.query_halo)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one call (hashable: a nondiff argument of the front's custom_vjp)."""

    height: int
    width: int
    kernel_size: int
    scale: float
    backend: str  # "triton" or "tpu"
    interpret: bool
    tile_h: int = 8
    tile_w: int = 8

    @property
    def rows(self) -> Axis:
        return Axis(self.height, self.kernel_size, self.tile_h)

    @property
    def cols(self) -> Axis:
        return Axis(self.width, self.kernel_size, self.tile_w)

    @property
    def tile(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def pad(self) -> int:
        """Zero tokens after the row-major side, so the last row's segment stays in bounds."""
        return max(pow2(self.cols.key_halo), pow2(self.cols.query_halo))


# ---- layouts (XLA) ---------------------------------------------------------------------------


def to_tiles(x, cfg: Config):
    """[B, N, S, C] -> [B, N, nT * tq, C] tile-major (tiles padded with zeros past the grid)."""
    b, n, _, c = x.shape
    rows, cols = cfg.rows, cfg.cols
    x = x.reshape(b, n, cfg.height, cfg.width, c)
    pad_h, pad_w = rows.n_tiles * rows.tile - rows.length, cols.n_tiles * cols.tile - cols.length
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    x = x.reshape(b, n, rows.n_tiles, rows.tile, cols.n_tiles, cols.tile, c)
    return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, n, -1, c)


def from_tiles(x, cfg: Config):
    """`to_tiles`' inverse: [B, N, nT * tq, C] -> [B, N, S, C]."""
    b, n, _, c = x.shape
    rows, cols = cfg.rows, cfg.cols
    x = x.reshape(b, n, rows.n_tiles, cols.n_tiles, rows.tile, cols.tile, c)
    x = x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, n, rows.n_tiles * rows.tile, -1, c)
    return x[:, :, : cfg.height, : cfg.width].reshape(b, n, cfg.height * cfg.width, c)


def to_rows(x, cfg: Config):
    """[B, N, S, C] -> [B, N, S + pad, C] row-major with zeros after the last token."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, cfg.pad), (0, 0)))


def heads_major(x):
    return jnp.swapaxes(x, 1, 2)  # [B, S, N, D] <-> [B, N, S, D]


def dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def tile_positions(cfg: Config, shape, dim):
    """Grid (row, col) of each token of this program's tile, as iotas of `shape` along `dim`."""
    t = pl.program_id(2)
    ti, tj = t // cfg.cols.n_tiles, t % cfg.cols.n_tiles
    local = lax.broadcasted_iota(jnp.int32, shape, dim)
    return ti, tj, ti * cfg.tile_h + local // cfg.tile_w, tj * cfg.tile_w + local % cfg.tile_w


def query_tile_loop(cfg: Config, k_ref, v_ref, step, carry):
    """Runs step(k_seg, v_seg, visible [tq, seg], carry) over this query tile's key halo rows."""
    rows, cols = cfg.rows, cfg.cols
    seg = pow2(cols.key_halo)
    ti, tj, qi, qj = tile_positions(cfg, (cfg.tile, 1), 0)  # qi, qj: [tq, 1]
    first_row, first_col = rows.first_key(ti), cols.first_key(tj)
    key_col = first_col + lax.broadcasted_iota(jnp.int32, (1, seg), 1)
    col_ok = cols.sees(qj, key_col)  # [tq, seg]

    def body(a, carry):
        row = first_row + a
        where = pl.ds(row * cfg.width + first_col, seg)
        return step(k_ref[where, :], v_ref[where, :], col_ok & rows.sees(qi, row), carry)

    return lax.fori_loop(0, rows.key_halo, body, carry)


def call(kernel, cfg: Config, grid, in_specs, out_specs, out_shape, name):
    if cfg.backend == "tpu":
        # Every program owns its output tile and loops inside: no grid axis carries state.
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid))
        interpret = pltpu.InterpretParams(uninitialized_memory="nan") if cfg.interpret else False
    else:
        # 4 warps for a 64-row tile, as jax's Triton flash attention uses for 64-128 row blocks.
        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
        interpret = cfg.interpret
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )


def specs(cfg: Config, rows_len: int, group: int):
    """Two BlockSpec makers over the grid (batch, query head, tile): `tile(width)`, this program's
    tile of a tile-major array ([tq, D], or [tq, 1] for statistics), and `whole(width, kv)`, one
    (batch, head)'s whole row-major array (the query head's kv head when `kv`)."""

    def tile(width):
        return pl.BlockSpec((None, None, cfg.tile, width), lambda b, n, t: (b, n, t, 0))

    def whole(width, kv):
        head = (lambda n: n // group) if kv else (lambda n: n)
        return pl.BlockSpec((None, None, rows_len, width), lambda b, n, t: (b, head(n), 0, 0))

    return tile, whole

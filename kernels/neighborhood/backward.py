"""Neighborhood attention's backward kernels: delta = rowsum(dO * O) - d_lse in XLA, a dQ pass
over each query tile's key halo (the forward's loop), and a dK/dV pass over each key tile's
query halo (the contiguous range of queries whose windows reach it).

Glossary and design: `kernels/neighborhood/__init__.py`.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.common import LOG2_E
from kernels.neighborhood.common import (
    NN,
    NT,
    TN,
    Config,
    call,
    dot,
    from_tiles,
    heads_major,
    pow2,
    query_tile_loop,
    specs,
    tile_positions,
    to_rows,
    to_tiles,
)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: Config):
    """One query tile's dQ: the forward's loop, recomputing p from the saved lse."""
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...] * LOG2_E, delta_ref[...]  # [tq, 1] each
    scale = cfg.scale * LOG2_E

    def step(k, v, visible, dq):
        p = jnp.where(visible, jnp.exp2(dot(q, k, NT) * scale - lse2), 0.0)
        ds = p * (dot(do, v, NT) - delta)
        return dq + dot(ds.astype(k.dtype), k, NN)

    dq = query_tile_loop(cfg, k_ref, v_ref, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: Config):
    """One key tile's dK and dV (for one query head) over its query halo, row by row."""
    rows, cols = cfg.rows, cfg.cols
    seg = pow2(cols.query_halo)
    k, v = k_ref[...], v_ref[...]  # [tq, D]
    ti, tj, ki, kj = tile_positions(cfg, (1, cfg.tile), 1)  # ki, kj: [1, tq]
    first_col = cols.first_query(tj)
    query_col = first_col + lax.broadcasted_iota(jnp.int32, (seg, 1), 0)
    # Segment tokens past the row's end belong to the next row: not these queries.
    col_ok = cols.sees(query_col, kj) & (query_col < cfg.width)  # [seg, tq]
    scale = cfg.scale * LOG2_E

    def body(row, carry):
        dk, dv = carry
        where = pl.ds(row * cfg.width + first_col, seg)
        q, do = q_ref[where, :], do_ref[where, :]
        lse2, delta = lse_ref[where, :] * LOG2_E, delta_ref[where, :]  # [seg, 1]
        visible = col_ok & rows.sees(row, ki)
        p = jnp.where(visible, jnp.exp2(dot(q, k, NT) * scale - lse2), 0.0)  # [seg, tq]
        dv = dv + dot(p.astype(do.dtype), do, TN)
        ds = p * (dot(do, v, NT) - delta)
        return dk + dot(ds.astype(q.dtype), q, TN), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    # Only the rows of queries that see this tile: interior tiles run th + w - 1 of them, border
    # tiles up to `query_halo` (a dynamic trip count, which scf.for takes on both targets).
    dk, dv = lax.fori_loop(rows.first_seen_by(ti), rows.last_seen_by(ti) + 1, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, cfg: Config):
    """The front's backward: (dq [B, S, N, D], dk and dv per query head [B, S, N, D])."""
    del q_ids, kv_ids
    batch, seq, heads, dim = q.shape
    group = heads // k.shape[2]
    tile, whole = specs(cfg, seq + cfg.pad, group)
    # delta - d_lse: lse's own cotangent enters ds as p * d_lse (d lse / d s = p).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, S, N]
    delta = heads_major(delta)[..., None]
    if d_lse is not None:
        delta = delta - d_lse[..., None]
    lse = lse[..., None]  # [B, N, S, 1]
    qh, doh, kh, vh = (heads_major(x) for x in (q, d_out, k, v))
    grid = (batch, heads, cfg.rows.n_tiles * cfg.cols.n_tiles)
    tiled = [to_tiles(x, cfg) for x in (qh, doh, lse, delta)]
    dq = call(
        _dq_kernel,
        cfg,
        grid,
        [tile(dim), whole(dim, True), whole(dim, True), tile(dim), tile(1), tile(1)],
        tile(dim),
        jax.ShapeDtypeStruct(tiled[0].shape, q.dtype),
        "neighborhood_dq",
    )(tiled[0], to_rows(kh, cfg), to_rows(vh, cfg), *tiled[1:])
    kt, vt = to_tiles(kh, cfg), to_tiles(vh, cfg)
    # dK and dV per query head (the front sums each group): a key tile's programs then write
    # disjoint blocks, with no cross-program accumulation, which Triton and TPU grids lack.
    # Float32 where the front still sums G heads, so that each is not rounded to bf16 first.
    grad_dtype = k.dtype if group == 1 else jnp.float32
    shape = jax.ShapeDtypeStruct((batch, heads, kt.shape[2], dim), grad_dtype)
    kv_tile = pl.BlockSpec((None, None, cfg.tile, dim), lambda b, n, t: (b, n // group, t, 0))
    dk, dv = call(
        _dkv_kernel,
        cfg,
        grid,
        [kv_tile, kv_tile, whole(dim, False), whole(dim, False), whole(1, False), whole(1, False)],
        [tile(dim), tile(dim)],
        [shape, shape],
        "neighborhood_dkv",
    )(kt, vt, *(to_rows(x, cfg) for x in (qh, doh, lse, delta)))
    return tuple(heads_major(from_tiles(x, cfg)) for x in (dq, dk, dv))

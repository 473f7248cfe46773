"""Neighborhood attention's forward kernel: per query tile, an online softmax in base 2 over
its key halo's rows, each logit masked to its query's window; saves lse (natural log).

Glossary and design: `kernels/neighborhood/__init__.py`.
"""

import jax
import jax.numpy as jnp

from kernels.common import LN_2, LOG2_E
from kernels.neighborhood.common import (
    NN,
    NT,
    Config,
    call,
    dot,
    from_tiles,
    heads_major,
    query_tile_loop,
    specs,
    to_rows,
    to_tiles,
)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: Config):
    """One query tile: online softmax (base 2) over its key halo, row by row."""
    q = q_ref[...]  # [tq, D]
    scale = cfg.scale * LOG2_E

    def step(k, v, visible, carry):
        m, l, acc = carry
        s = jnp.where(visible, dot(q, k, NT) * scale, -jnp.inf)  # [tq, seg]
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        # A halo row that none of a query's window crosses leaves m at -inf; keep exp2 finite.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - m_safe)
        alpha = jnp.exp2(m - m_safe)
        l = alpha * l + p.sum(axis=1, keepdims=True)
        return m_new, l, alpha * acc + dot(p.astype(v.dtype), v, NN)

    init = (
        jnp.full((cfg.tile, 1), -jnp.inf, jnp.float32),
        jnp.zeros((cfg.tile, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, l, acc = query_tile_loop(cfg, k_ref, v_ref, step, init)
    # Every query sees w x w real keys, so l >= 1 here, padded queries included.
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) * LN_2


def forward(q, k, v, q_ids, kv_ids, cfg: Config):
    """The front's forward: q [B, S, N, D], k, v [B, S, KV, D] -> (out, lse [B, N, S])."""
    del q_ids, kv_ids  # neighborhoods are geometry, not segments
    batch, _, heads, dim = q.shape
    tile, whole = specs(cfg, k.shape[1] + cfg.pad, heads // k.shape[2])
    qt = to_tiles(heads_major(q), cfg)
    kr, vr = to_rows(heads_major(k), cfg), to_rows(heads_major(v), cfg)
    grid = (batch, heads, cfg.rows.n_tiles * cfg.cols.n_tiles)
    out, lse = call(
        _forward_kernel,
        cfg,
        grid,
        [tile(dim), whole(dim, True), whole(dim, True)],
        [tile(dim), tile(1)],
        [
            jax.ShapeDtypeStruct(qt.shape, q.dtype),
            jax.ShapeDtypeStruct(qt.shape[:3] + (1,), jnp.float32),
        ],
        "neighborhood_fwd",
    )(qt, kr, vr)
    return heads_major(from_tiles(out, cfg)), from_tiles(lse, cfg)[..., 0]

"""Neighborhood attention in plain JAX: the window geometry, a dense oracle for tests, and the
exact halo-tiled XLA implementation behind `neighborhood_attention(impl="xla")`.

Glossary: B batch, H and W the token grid's height and width, S = H * W tokens, N query heads,
KV key/value heads (N % KV == 0; G = N // KV query heads share one), D head dim; `kernel_size`
(K in the docs) the window side; t the query tile side; hl and wl the key halo's height and width.

Definition (Hassani et al. 2023, "Neighborhood Attention Transformer", as NATTEN implements it):
along each axis of length L the query at i sees the keys start(i) .. start(i) + K - 1 with
start(i) = clamp(i - K // 2, 0, L - K). Windows shift inward at the borders, so every query sees
exactly K x K real keys and nothing is padded. Our extension: where L < K the window along that
axis is the whole axis (K is clamped to L per axis), so a model trained with K = 7 still runs on
a 5 x 5 crop.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Query tile side of the halo implementation: 8 x 8 queries share one (8 + K - 1)^2 key halo,
# (14 / 7)^2 = 4x the ideal logits at K = 7; 16 would be 5x and 4 keeps too many tiny tiles.
TILE = 8


def window_starts(length: int, kernel_size: int) -> np.ndarray:
    """First key index of each query's window along one axis of `length` tokens: int32 [length]."""
    window = min(kernel_size, length)
    return np.clip(np.arange(length) - kernel_size // 2, 0, length - window).astype(np.int32)


def axis_mask(length: int, kernel_size: int) -> np.ndarray:
    """[length (queries), length (keys)] bool: which keys of one axis each query sees."""
    start = window_starts(length, kernel_size)[:, None]
    keys = np.arange(length)[None, :]
    return (keys >= start) & (keys < start + min(kernel_size, length))


def neighborhood_mask(height: int, width: int, kernel_size: int) -> np.ndarray:
    """[S, S] bool over row-major tokens: True where query (row) sees key (column)."""
    rows = axis_mask(height, kernel_size)
    cols = axis_mask(width, kernel_size)
    # Token s = i * width + j; a query sees a key iff both its row and column windows do.
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(height * width, -1)


def _grouped(q, kv_heads):
    """q [..., N, D] -> [..., KV, G, D]: the query heads that share each key/value head."""
    return q.reshape(*q.shape[:-2], kv_heads, q.shape[-2] // kv_heads, q.shape[-1])


def neighborhood_attention_dense(q, k, v, *, kernel_size: int, scale: float | None = None):
    """The oracle: q [B, H, W, N, D], k and v [B, H, W, KV, D] -> ([B, H, W, N, D], lse [B, N, S]).

    Full S x S logits under `neighborhood_mask`, softmax in float32: O(S^2) time and memory, for
    tests and small benchmarks only.
    """
    batch, height, width, heads, dim = q.shape
    kv_heads = k.shape[3]
    scale = dim**-0.5 if scale is None else scale
    qf = _grouped(q.reshape(batch, height * width, heads, dim), kv_heads).astype(jnp.float32)
    kf = k.reshape(batch, height * width, kv_heads, dim).astype(jnp.float32)
    vf = v.reshape(batch, height * width, kv_heads, dim).astype(jnp.float32)
    logits = jnp.einsum("bskgd,btkd->bkgst", qf, kf) * scale  # [B, KV, G, S, S]
    mask = neighborhood_mask(height, width, kernel_size)
    logits = jnp.where(mask, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, KV, G, S]
    out = jnp.einsum("bkgst,btkd->bskgd", jnp.exp(logits - lse[..., None]), vf)
    out = out.reshape(batch, height, width, heads, dim).astype(q.dtype)
    return out, lse.reshape(batch, heads, height * width)


def halo_geometry(length: int, kernel_size: int, tile: int):
    """Along one axis: (halo start per tile int32 [n_tiles], halo length, query-in-halo mask bool
    [n_tiles, tile, halo length]) for tiles of `tile` queries (the last one padded).

    Window starts rise by at most one per query, so a tile's windows lie within tile + K - 1
    consecutive keys from its first query's start (moved inward where that would overrun the
    axis): the halo. Padded queries past the axis get the last real query's window.
    """
    window = min(kernel_size, length)
    halo = min(tile + window - 1, length)
    n_tiles = -(-length // tile)
    starts = window_starts(length, kernel_size)
    first = np.minimum(starts[np.arange(n_tiles) * tile], length - halo)
    query = np.minimum(np.arange(n_tiles * tile), length - 1).reshape(n_tiles, tile)
    key = first[:, None, None] + np.arange(halo)[None, None, :]
    lo = starts[query][..., None]
    return first.astype(np.int32), halo, (key >= lo) & (key < lo + window)


def _tiles(x, axis: int, tile: int):
    """x with `axis` padded to whole tiles and split into [n_tiles, tile] (zeros in the pad)."""
    extra = -x.shape[axis] % tile
    x = jnp.pad(x, [(0, extra) if a == axis else (0, 0) for a in range(x.ndim)])
    return x.reshape(*x.shape[:axis], -1, tile, *x.shape[axis + 1 :])


def _halos(x, axis: int, first, halo: int):
    """[..., L, ...] -> [..., n_tiles, halo, ...]: each tile's key halo along `axis` (a gather
    with static indices, whose transpose in the backward is a scatter-add)."""
    index = first[:, None] + np.arange(halo)[None, :]
    return jnp.take(x, index, axis=axis)


def neighborhood_attention_xla(q, k, v, *, kernel_size: int, scale: float | None = None):
    """Exact neighborhood attention by halo tiles: q [B, H, W, N, D], k and v [B, H, W, KV, D] ->
    (out [B, H, W, N, D] in q's dtype, lse [B, N, S] float32 natural log).

    Each t x t query tile meets its (t + K - 1)^2 key halo (gathered once per tile), masked to
    each query's own window: about 4x the ideal K^2 logits per query at K = 7, memory linear in S.
    Differentiable by autodiff (gathers transpose to scatter-adds); logits and softmax in float32,
    probabilities cast to v's dtype for the second matmul as a flash kernel does.
    """
    batch, height, width, heads, dim = q.shape
    kv_heads = k.shape[3]
    scale = dim**-0.5 if scale is None else scale
    tile_h, tile_w = min(TILE, height), min(TILE, width)
    row_first, row_halo, row_mask = halo_geometry(height, kernel_size, tile_h)
    col_first, col_halo, col_mask = halo_geometry(width, kernel_size, tile_w)

    qt = _tiles(
        _tiles(_grouped(q, kv_heads), 1, tile_h), 3, tile_w
    )  # [B, nH, th, nW, tw, KV, G, D]
    kt = _halos(
        _halos(k, 1, row_first, row_halo), 3, col_first, col_halo
    )  # [B, nH, hl, nW, wl, KV, D]
    vt = _halos(_halos(v, 1, row_first, row_halo), 3, col_first, col_halo)
    logits = jnp.einsum(
        "bxiyjkgd,bxuyvkd->bxykgijuv", qt, kt, preferred_element_type=jnp.float32
    )  # [B, nH, nW, KV, G, th, tw, hl, wl]
    mask = row_mask[:, None, :, None, :, None] & col_mask[None, :, None, :, None, :]
    logits = jnp.where(mask[:, :, None, None], logits * scale, -jnp.inf)
    flat = logits.reshape(*logits.shape[:7], -1)
    lse = jax.nn.logsumexp(flat, axis=-1)  # [B, nH, nW, KV, G, th, tw]
    probs = jnp.exp(flat - lse[..., None]).reshape(logits.shape).astype(v.dtype)
    out = jnp.einsum("bxykgijuv,bxuyvkd->bxiyjkgd", probs, vt, preferred_element_type=jnp.float32)
    out = out.reshape(batch, -1, width + -width % tile_w, heads, dim)[:, :height, :width]
    lse = lse.transpose(0, 3, 4, 1, 5, 2, 6).reshape(batch, heads, -1, width + -width % tile_w)
    lse = lse[:, :, :height, :width].reshape(batch, heads, height * width)
    return out.astype(q.dtype), lse

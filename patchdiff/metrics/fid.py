"""Frechet distance between feature distributions (Heusel et al. 2017), with EDM's statistics.

    python -m patchdiff.metrics.fid --images DIR_OR_NPZ --ref refs.npz [--num 50000] [--out r.json]

scores any folder of PNG/JPEG files or .npz of uint8 images (ours, EDM's, ADM's `arr_0`) against
reference statistics: EDM's published `.npz` files ({mu, sigma}) load as they are; ours
(`python -m patchdiff.metrics.ref`) add the extractor's name, the count and, for KID and
precision/recall, the reference features.

Statistics stream: `FeatureStats` accumulates float64 sums of f and f f^T batch by batch (as
EDM's `calc_metrics` does), so the figure does not depend on how many images a device held at a
time; across processes the sums are gathered bit-exactly (float64 travels as uint32 pairs, since
jax without x64 would round it) and added in process order. The covariance divides by n - 1.

`frechet_distance` is the symmetric form through `eigh` in float64: tr sqrt(S1 S2) =
tr sqrt(S1^1/2 S2 S1^1/2), whose argument is symmetric positive semi-definite, so no complex
parts appear (scipy's `sqrtm` has returned large imaginary parts in some versions).

Glossary: N images, D feature dimension.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

from patchdiff.metrics import MetricError


class FeatureStats:
    """Streaming float64 mean and covariance of features [N, D]; optionally keeps up to `keep`
    features with their image indices (KID and precision/recall need the features themselves)."""

    def __init__(self, dim: int, keep: int = 0):
        self.dim, self.keep = dim, keep
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)
        self._kept, self._kept_index = [], []

    def add(self, features, indices=None):
        """features [N, D]; indices [N] (image numbers, default consecutive) for kept rows."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}]; got {f.shape}.")
        if indices is None:
            indices = np.arange(self.count, self.count + len(f))
        self.count += len(f)
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f
        kept = sum(len(k) for k in self._kept)
        if kept < self.keep:
            take = min(self.keep - kept, len(f))
            self._kept.append(np.asarray(features, np.float32)[:take])
            self._kept_index.append(np.asarray(indices)[:take])

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased: (sum f f^T - n mu mu^T) / (n - 1), as EDM and StyleGAN's metrics."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images; got {self.count}.")
        mu = self.mean
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    @property
    def features(self) -> np.ndarray | None:
        """The kept features [min(N, keep), D] in image order, or None when none were kept."""
        if not self._kept:
            return None
        f, idx = np.concatenate(self._kept), np.concatenate(self._kept_index)
        return f[np.argsort(idx, kind="stable")]

    def gather(self) -> "FeatureStats":
        """The statistics over every process's images (the same object on one process)."""
        import jax

        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils as mh

        def exact(a):  # float64 as uint32 pairs: bit-exact through a float32-only jax
            a = np.ascontiguousarray(a)
            got = np.asarray(mh.process_allgather(a.view(np.uint32)))
            return got.view(a.dtype)

        out = FeatureStats(self.dim, self.keep)
        counts = np.asarray(mh.process_allgather(np.array([self.count], np.int32)))[:, 0]
        out.count = int(counts.sum())
        out.sum = exact(self.sum).sum(axis=0)
        out.outer = exact(self.outer).sum(axis=0)
        if self.keep:
            mine = self.features if self.features is not None else np.zeros((0, self.dim))
            index = np.sort(np.concatenate(self._kept_index)) if self._kept else np.zeros(0)
            width = int(np.max(np.asarray(mh.process_allgather(np.array([len(mine)])))))
            pad = width - len(mine)
            f = np.pad(np.asarray(mine, np.float32), ((0, pad), (0, 0)))
            i = np.pad(index.astype(np.int64), (0, pad), constant_values=-1)
            fs = np.asarray(mh.process_allgather(f)).reshape(-1, self.dim)
            ids = exact(i).reshape(-1)
            order = np.argsort(np.where(ids < 0, np.iinfo(np.int64).max, ids), kind="stable")
            ok = order[ids[order] >= 0][: self.keep]
            out._kept, out._kept_index = [fs[ok]], [ids[ok]]
        return out


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 (Heusel et al.,
    Eq. 6; Dowson & Landau 1982). mu [D], sigma [D, D] symmetric positive semi-definite."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}."
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


@dataclasses.dataclass
class Reference:
    """Reference statistics: mu [D], sigma [D, D], optionally features [M, D]."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    extractor: str = "inception"
    count: int = 0
    source: str = ""


def save_reference(path, stats: FeatureStats, extractor: str, source: str = "") -> pathlib.Path:
    """Writes EDM's {mu, sigma} plus our fields; atomically (a crash never leaves half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mean, "sigma": stats.covariance}
    arrays.update(extractor=np.array(extractor), count=np.array(stats.count))
    arrays["source"] = np.array(source)
    if stats.features is not None:
        arrays["features"] = stats.features
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_reference(path, extractor: str | None = None, dim: int | None = None) -> Reference:
    """A reference .npz (EDM's or ours); one sentence naming the file on any problem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics {path} do not exist: make them with `python -m "
            "patchdiff.metrics.ref --config CONFIG --out FILE`, or use EDM's published .npz."
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise MetricError(f"reference statistics {path} cannot be read as .npz ({e}).") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise MetricError(f"reference statistics {path} lack {missing}; it has {sorted(arrays)}.")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise MetricError(
            f"{path}: mu must be [D] and sigma [D, D]; got {mu.shape}, {sigma.shape}."
        )
    found = str(arrays["extractor"]) if "extractor" in arrays else "inception"
    if extractor is not None and found != extractor:
        raise MetricError(
            f"reference statistics {path} are of {found!r} features, not {extractor!r}."
        )
    if dim is not None and len(mu) != dim:
        raise MetricError(f"reference statistics {path} have dimension {len(mu)}, not {dim}.")
    features = arrays.get("features")
    return Reference(
        mu,
        sigma,
        None if features is None else features.astype(np.float32),
        found,
        int(arrays["count"]) if "count" in arrays else 0,
        str(arrays["source"]) if "source" in arrays else str(path),
    )


def image_batches(path, num: int = 0, batch: int = 500):
    """Yields uint8 [n, H, W, C] batches of the first `num` images (0: all) of a folder of
    PNG/JPEG files (sorted by name, decoded a batch at a time, so 50k images never sit in memory
    at once) or of an .npz holding `images` or `arr_0` (ADM's and EDM's sample files)."""
    from patchdiff.data.sources import CorruptImage, DataError, FolderSource

    path = pathlib.Path(path)
    if path.is_dir():
        source = FolderSource(path)
        total = _count(num, len(source), path)
        shape = None
        for start in range(0, total, batch):
            images = []
            for i in range(start, min(start + batch, total)):
                try:
                    image = source[i][0]
                except CorruptImage as e:
                    raise DataError(f"cannot read {e}") from None
                image = image[..., None] if image.ndim == 2 else image
                if shape is not None and image.shape != shape:
                    raise DataError(
                        f"images under {path} differ in size: {source.files[i].name} is "
                        f"{image.shape}, {source.files[0].name} {shape}."
                    )
                shape = image.shape
                images.append(image)
            yield _checked(np.stack(images), path)
    elif path.is_file():
        try:
            with np.load(path) as z:
                key = next((k for k in ("images", "arr_0") if k in z.files), None)
                if key is None:
                    raise DataError(f"{path} has no array 'images' or 'arr_0'; it has {z.files}.")
                images = z[key]
        except (OSError, ValueError) as e:
            raise DataError(f"{path} cannot be read as .npz ({e}).") from None
        images = _checked(images[..., None] if images.ndim == 3 else images, path)
        total = _count(num, len(images), path)
        for start in range(0, total, batch):
            yield images[start : min(start + batch, total)]
    else:
        raise DataError(f"--images {str(path)!r} is neither a folder nor an .npz file.")


def _count(num: int, available: int, path) -> int:
    from patchdiff.data.sources import DataError

    if num > available:
        raise DataError(f"--num {num}: {path} holds only {available} images.")
    return num or available


def _checked(images, path) -> np.ndarray:
    from patchdiff.data.sources import DataError

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: images must be uint8 [N, H, W, 1 or 3]; got {images.dtype} {images.shape}."
        )
    return images


def read_images(path, num: int = 0) -> np.ndarray:
    """All (or the first `num`) images of `image_batches(path)` as one uint8 [N, H, W, C]."""
    return np.concatenate(list(image_batches(path, num)))


def stats_of(features_fn, images, batch: int = 500, keep: int = 0) -> FeatureStats:
    """FeatureStats through `features_fn` of uint8 images [N, H, W, C], `batch` at a time, or
    of an iterable of such batches."""
    stats = FeatureStats(features_fn.dim, keep)
    chunks = images
    if isinstance(images, np.ndarray):
        chunks = (images[start : start + batch] for start in range(0, len(images), batch))
    for chunk in chunks:
        stats.add(features_fn(chunk))
    return stats


def score(stats: FeatureStats, ref: Reference, metrics=("fid",)) -> dict:
    """{name@count: value} of `metrics` for generated statistics against a reference."""
    from patchdiff.metrics import METRICS, kid, metric_names, precision_recall

    out = {}
    for name in metrics:
        metric = METRICS.get(name)
        if metric.needs_features and (ref.features is None or stats.features is None):
            raise MetricError(
                f"metric {name!r} needs features, not only statistics: the reference "
                f"{ref.source or ''} holds none (make it with `python -m patchdiff.metrics.ref`)."
            )
        names = metric_names(name, stats.count)
        if name == "kid":
            values = (kid.kernel_inception_distance(stats.features, ref.features),)
        elif name == "pr":
            values = precision_recall.precision_recall(ref.features, stats.features)
        else:
            values = (frechet_distance(stats.mean, stats.covariance, ref.mu, ref.sigma),)
        out.update(zip(names, values, strict=True))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m patchdiff.metrics.fid", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", required=True, help="a folder of PNG/JPEG or an .npz")
    parser.add_argument("--ref", required=True, help="reference statistics (.npz)")
    parser.add_argument("--num", type=int, default=0, help="score the first N images (0: all)")
    parser.add_argument("--weights", default=None, help="the extractor's weight file")
    parser.add_argument("--out", default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    from patchdiff.metrics import EXTRACTORS

    try:
        ref = load_reference(args.ref)
        features = EXTRACTORS.get(ref.extractor)(args.weights)
        metrics = ["fid" if ref.extractor == "inception" else "fd_fmnist"]
        if ref.features is not None and ref.extractor == "inception":
            metrics += ["kid", "pr"]
        keep = 10**9 if len(metrics) > 1 else 0  # KID and PR need every image's features
        result = score(stats_of(features, image_batches(args.images, args.num), keep=keep),
                       ref, metrics)  # fmt: skip
    except (OSError, ValueError) as e:  # DataError is a ValueError
        raise SystemExit(f"patchdiff: {e}") from None
    for name, value in result.items():
        print(f"{name}: {value:.4f}")
    if args.out:
        record = {"images": str(args.images), "ref": str(args.ref), **result}
        pathlib.Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

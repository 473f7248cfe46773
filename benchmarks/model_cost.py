"""Parameters, FLOPs per image and forward+backward time per image: of the U-Net at stem patch
sizes P = 1, 2, 4, or (--sweep resolution) of HDiT, HDiT with global attention, DiT and the U-Net
at 256, 512 and 1024 pixels.

    python -m benchmarks.model_cost                      # CIFAR-10 DDPM++ size, float32
    python -m benchmarks.model_cost --batch 128 --dtype bfloat16   # on a GPU
    python -m benchmarks.model_cost --config ml_collections_configs/base.py:runlocal
    python -m benchmarks.model_cost --sweep resolution --batch 1   # cost against resolution

P = 1 is the reference: the same network without the patchify stem, run on the same device and
inputs in the same process. Forward+backward is the gradient of the EDM denoising loss with
respect to all parameters (a training step without the optimizer update). Attention stays at the
same U-Net levels for every P (`patchdiff.config.with_patch_size`). Prints a table and writes
benchmarks/results/model_cost.json (or --out).
"""

import argparse
import functools
import importlib.util
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.common import environment, time_fn, write_json
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.losses import denoising_loss
from patchdiff.models import build_model, dummy_inputs, init_params
from patchdiff.models.cost import count_params, forward_flops_per_image, forward_macs_per_image
from patchdiff.summary import network_variant
from patchdiff.tables import format_table


def load_config(spec: str):
    """A config from 'path.py[:options]', as `--config` reads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def measure(config, batch: int, iters: int, memory_limit_gib: float | None = None) -> dict:
    """Params, forward FLOPs per image and the timed gradient of the denoising loss; with
    `memory_limit_gib`, a step whose compiled program needs more temporary memory than that is
    compiled but not run (its time is None and "skipped" says why)."""
    model = build_model(config)
    params = init_params(model, jax.random.key(0), config)
    loss_kwargs = diffusion_build.build_loss_kwargs(config.diffusion, config.data.resolution)
    x, _, kwargs = dummy_inputs(config, batch)
    x = jax.random.uniform(jax.random.key(1), x.shape, minval=-1, maxval=1)

    @jax.jit
    def grad_step(params, key):
        def loss(p):
            def net(x_in, c_noise, **kw):
                return model.apply(
                    {"params": p}, x_in, c_noise, train=True, rngs={"dropout": key}, **kw
                )

            return jnp.mean(denoising_loss(net, key, x, **loss_kwargs, **kwargs))

        return jax.grad(loss)(params)

    row = {
        "params": count_params(params),
        "gflops_per_image": forward_flops_per_image(model, params, config) / 1e9,
    }
    if memory_limit_gib is None:
        timing = time_fn(grad_step, params, jax.random.key(2), warmup=1, iters=iters)
        compile_s = timing["compile"]
    else:
        start = time.perf_counter()
        compiled = grad_step.lower(params, jax.random.key(2)).compile()
        compile_s = time.perf_counter() - start
        temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
        row["temp_gib"] = temp_gib
        if temp_gib > memory_limit_gib:
            row.update(
                fwd_bwd_ms_per_image=None,
                compile_s=compile_s,
                skipped=f"needs {temp_gib:.1f} GiB (limit {memory_limit_gib:g})",
            )
            return row
        timing = time_fn(compiled, params, jax.random.key(2), warmup=1, iters=iters)
    row.update(
        fwd_bwd_ms_per_image=timing["median"] / batch * 1e3,
        fwd_bwd_ms_per_image_min=timing["min"] / batch * 1e3,
        compile_s=compile_s,
    )
    return row


KEY = jax.random.key(0)
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "ml_collections_configs"
# --sweep resolution: each network as its config builds it, only the image size changing (and
# the U-Net's attention kept at the same levels). DiT-B/4 runs in pixel space, as HDiT does, so
# that tokens grow with pixels for both: 64x64 tokens at 256 pixels.
SWEEP_MODELS = {
    "hdit": ("hdit_ffhq1024.py", {}),
    "hdit_global": ("hdit_ffhq1024.py", {"neighborhood_kernel": 0}),
    "dit_b4": ("dit_b4_cifar10.py", {}),
    "unet_p4": ("lsun256_p4.py", {}),
}


def sweep_config(name: str, resolution: int, dtype: str):
    file, hdit_overrides = SWEEP_MODELS[name]
    config = load_config(str(CONFIGS / file))
    base_resolution = config.data.resolution
    config.data.resolution, config.data.channels = resolution, 3
    config.model.dtype = dtype
    config.model.hdit.update(hdit_overrides)
    if config.model.name == "unet":  # the same levels attend: their sizes scale with R
        scale = resolution // base_resolution
        config.model.attn_resolutions = tuple(r * scale for r in config.model.attn_resolutions)
    return config


def resolution_sweep(args, env):
    rows = []
    for name in args.models.split(","):
        for resolution in (int(r) for r in args.resolutions.split(",")):
            config = sweep_config(name, resolution, args.dtype)
            row = {"model": name, "resolution": resolution, "remat": False}
            row.update(measure(config, args.batch, args.iters, args.memory_limit_gib))
            if row.get("skipped") and config.model.name != "unet":
                # Recomputing each layer in the backward keeps one layer's attention at a time.
                config.model.remat = row["remat"] = True
                row.pop("skipped")
                row.update(measure(config, args.batch, args.iters, args.memory_limit_gib))
            model = build_model(config)
            params = jax.eval_shape(functools.partial(init_params, model, config=config), KEY)
            row["gmacs_per_image"] = forward_macs_per_image(model, params, config) / 1e9
            rows.append(row)
            print(f"{name} at {resolution} done", file=sys.stderr, flush=True)
    by_model = {}
    for row in rows:
        previous = by_model.get(row["model"])
        row["flops_x_per_doubling"] = (
            row["gflops_per_image"] / previous["gflops_per_image"] if previous else None
        )
        by_model[row["model"]] = row
    print(
        f"{env['device']} ({env['device_count']} devices), jax {env['jax']}, batch "
        f"{args.batch}, {args.dtype}, commit {env['commit']}, {env['date']}"
    )
    table = [
        {
            "model": r["model"],
            "pixels": f"{r['resolution']}^2",
            "params_M": r["params"] / 1e6,
            "GMACs/img": r["gmacs_per_image"],
            "XLA GFLOPs/img": r["gflops_per_image"],
            "x per doubling": r["flops_x_per_doubling"] or "",
            "fwd+bwd s/img": (
                r["fwd_bwd_ms_per_image"] / 1e3 if r["fwd_bwd_ms_per_image"] else r["skipped"]
            ),
            "remat": "yes" if r["remat"] else "",
        }
        for r in rows
    ]
    print(format_table(table))
    path = write_json(
        "model_cost_resolution",
        {"environment": env, "args": vars(args), "rows": rows},
        args.out,
    )
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml_collections_configs/base.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--patch-sizes", default="1,2,4")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", default="patch", choices=["patch", "resolution"])
    parser.add_argument("--models", default=",".join(SWEEP_MODELS))
    parser.add_argument("--resolutions", default="256,512,1024")
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=12.0,
        help="--sweep resolution: a transformer step needing more temporary memory is compiled "
        "again with remat, and not timed if it still needs more",
    )
    args = parser.parse_args(argv)
    env = environment()  # at the start: the commit that runs, not the one at the end
    if args.sweep == "resolution":
        unknown = set(args.models.split(",")) - set(SWEEP_MODELS)
        if unknown:
            parser.error(f"--models {sorted(unknown)} not known; known: {', '.join(SWEEP_MODELS)}")
        return resolution_sweep(args, env)

    config = load_config(args.config)
    config.model.dtype = args.dtype
    rows = []
    for p in (int(s) for s in args.patch_sizes.split(",")):
        variant = network_variant(config, p)
        row = {"patch_size": p, "attn_resolutions": tuple(variant.model.attn_resolutions)}
        row.update(measure(variant, args.batch, args.iters))
        rows.append(row)
        print(f"P={p} done", file=sys.stderr, flush=True)
    reference = rows[0]
    for row in rows:
        row["flops_vs_P1"] = row["gflops_per_image"] / reference["gflops_per_image"]
        row["speedup_vs_P1"] = reference["fwd_bwd_ms_per_image"] / row["fwd_bwd_ms_per_image"]

    print(
        f"{env['device']} ({env['device_count']} devices), jax {env['jax']}, batch "
        f"{args.batch}, {args.dtype}, commit {env['commit']}, {env['date']}"
    )
    table = [
        {
            "P": r["patch_size"],
            "params_M": r["params"] / 1e6,
            "GFLOPs/img": r["gflops_per_image"],
            "FLOPs vs P=1": r["flops_vs_P1"],
            "fwd+bwd ms/img": r["fwd_bwd_ms_per_image"],
            "speedup vs P=1": r["speedup_vs_P1"],
            "compile s": r["compile_s"],
        }
        for r in rows
    ]
    print(format_table(table))
    path = write_json(
        "model_cost",
        {"environment": env, "args": vars(args), "config": config.model.to_dict(), "rows": rows},
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

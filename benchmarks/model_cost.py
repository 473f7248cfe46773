"""Parameters, FLOPs per image and forward+backward time per image of the U-Net at P = 1, 2, 4.

    python -m benchmarks.model_cost                      # CIFAR-10 DDPM++ size, float32
    python -m benchmarks.model_cost --batch 128 --dtype bfloat16   # on a GPU
    python -m benchmarks.model_cost --config ml_collections_configs/base.py:runlocal

P = 1 is the reference: the same network without the patchify stem, run on the same device and
inputs in the same process. Forward+backward is the gradient of the EDM denoising loss with
respect to all parameters (a training step without the optimizer update). Attention stays at the
same U-Net levels for every P (`patchdiff.config.with_patch_size`). Prints a table and writes
benchmarks/results/model_cost.json (or --out).
"""

import argparse
import importlib.util
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import environment, time_fn, write_json
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.losses import denoising_loss
from patchdiff.models import build_model, dummy_inputs, init_params
from patchdiff.models.cost import count_params, forward_flops_per_image
from patchdiff.summary import network_variant
from patchdiff.tables import format_table


def load_config(spec: str):
    """A config from 'path.py[:options]', as `--config` reads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def measure(config, batch: int, iters: int) -> dict:
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

    timing = time_fn(grad_step, params, jax.random.key(2), warmup=1, iters=iters)
    return {
        "params": count_params(params),
        "gflops_per_image": forward_flops_per_image(model, params, config) / 1e9,
        "fwd_bwd_ms_per_image": timing["median"] / batch * 1e3,
        "fwd_bwd_ms_per_image_min": timing["min"] / batch * 1e3,
        "compile_s": timing["compile"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml_collections_configs/base.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--patch-sizes", default="1,2,4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()  # at the start: the commit that runs, not the one at the end

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

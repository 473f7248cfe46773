"""`--mode eval`: the newest checkpoint's EMA network, by sample quality and on held-out images.

Sample quality follows EDM's protocol: config.eval.metrics over config.eval.num_samples images,
config.eval.repeats times over disjoint seed ranges (seeds r * N .. (r + 1) * N - 1 after
eval.seed), each figure and the minimum of each (EDM quotes the minimum of three FIDs of 50k).
Then the denoising error E||D(x0 + sigma n, sigma) - x0||^2 (per pixel) at fixed noise levels
from sigma_min to sigma_max, and the training objective (the configured noise distribution and
weighting) with a fixed key, over config.eval.num_examples images of config.eval.split; writes
WORKDIR/eval/step_N.json. Every number is reproducible: same checkpoint, same result.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from patchdiff import data as data_lib
from patchdiff import xla_cpu
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.losses import denoising_loss
from patchdiff.metrics.evaluator import SampleEvaluator
from patchdiff.tables import format_table
from patchdiff.train.loop import make_mesh, restore_latest
from patchdiff.train.report import write_json


def sample_quality(config, model, params, workdir) -> dict:
    """{"repeats": [{metric: value} per seed range], "min": {metric: min}, ...}."""
    e = config.eval
    evaluator = SampleEvaluator(config, model, workdir, make_mesh(config)[0])
    repeats = []
    for r in range(e.repeats):
        first = r * e.num_samples
        result = evaluator(params, e.num_samples, first)
        repeats.append(result)
        seeds = f"seeds {e.seed + first}-{e.seed + first + e.num_samples - 1}"
        print(f"{seeds}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
    best = {k: (min if not k.startswith(("precision", "recall")) else max)(r[k] for r in repeats)
            for k in repeats[0]}  # fmt: skip
    print("best of the seed ranges: " + ", ".join(f"{k} {v:.4f}" for k, v in best.items()))
    return {
        "sampler": e.sampler,
        "steps": e.steps,
        "guidance_scale": e.guidance_scale,
        "seed": e.seed,
        "repeats": repeats,
        "best": best,
    }


def evaluate(config, workdir) -> dict:
    model, state, meta = restore_latest(config, workdir)
    quality = (
        sample_quality(config, model, state.ema, workdir) if config.eval.sample_quality else None
    )
    d, e, m = config.diffusion, config.eval, config.model
    loss_kwargs = diffusion_build.build_loss_kwargs(d, config.data.resolution)
    sigmas = np.exp(np.linspace(np.log(d.sigma_min), np.log(d.sigma_max), e.num_sigmas))
    loader = data_lib.build_loader(config, 0, split=e.split)
    loader.random_flip = False

    @xla_cpu.jit
    def losses(params, images, labels, key):
        kwargs = {"labels": labels} if m.num_classes else {}

        def net(x_in, c_noise, **kw):
            return model.apply({"params": params}, x_in, c_noise, **kw)

        def at(sigma):
            fixed = lambda k, shape: jnp.full(shape, sigma)  # noqa: E731
            return jnp.mean(
                denoising_loss(
                    net,
                    key,
                    images,
                    precond=loss_kwargs["precond"],
                    sample_sigma=fixed,
                    weighting=lambda s: jnp.ones_like(s),
                    **kwargs,
                )
            )

        per_sigma = jax.vmap(at)(jnp.asarray(sigmas, jnp.float32))
        objective = jnp.mean(denoising_loss(net, key, images, **loss_kwargs, **kwargs))
        return per_sigma, objective

    batch, per_sigma, objective = config.sample.batch_size, [], []
    for start in range(0, e.num_examples, batch):  # whole batches: one compiled shape
        b = loader.next(batch)
        key = jax.random.fold_in(jax.random.key(config.seed), start)
        errors, obj = losses(state.ema, b["image"], b["label"], key)
        per_sigma.append(np.asarray(errors))
        objective.append(float(obj))
    count = len(objective) * batch
    mean_errors = np.mean(per_sigma, axis=0)
    result = {
        "step": meta["step"],
        "split": e.split,
        "examples": count,
        "objective": float(np.mean(objective)),
        "mse_at_sigma": {f"{s:.4g}": float(v) for s, v in zip(sigmas, mean_errors, strict=True)},
        "sample_quality": quality,
    }
    print(
        format_table(
            [{"sigma": float(s), "mse": float(v)} for s, v in zip(sigmas, mean_errors, strict=True)]
        )
    )
    print(
        f"objective ({d.loss_weighting} weighting): {result['objective']:.5g} over {count} "
        f"{e.split} images at step {meta['step']}"
    )
    path = write_json(pathlib.Path(workdir) / "eval" / f"step_{meta['step']}.json", result)
    print(f"wrote {path}")
    return result

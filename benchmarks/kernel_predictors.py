"""Do the search's predictors rank U-Net kernels? Kernels trained from scratch to the end against
what each predictor said of them early (after White et al., "How powerful are performance
predictors in neural architecture search?", NeurIPS 2021: one rank correlation per predictor and
budget, the budget in seconds per kernel).

    C=ml_collections_configs/kernel_search_fashion_mnist.py
    python -m benchmarks.kernel_predictors --config $C --workdir runs/kernel_predictors
    # two processes, one core each (the small U-Net does not use two cores well), then the table:
    taskset -c 0 python -m benchmarks.kernel_predictors ... --stage train --shard 0/2 &
    taskset -c 1 python -m benchmarks.kernel_predictors ... --stage train --shard 1/2
    python -m benchmarks.kernel_predictors ... --stage all

Kernels: the 3x3 convolution (the config's model unchanged), the hand-made baselines of
`canvas_jax.baselines`, and `--sampled` draws of `canvas_jax.sample` under the config's
constraints (`config.kernel_search`, the search's own space `config.nag.ops`).

Ground truth, per kernel (`--stage train`): the model with the kernel at every placeholder,
trained from scratch with the config's recipe (config.train: steps, batch, crops, learning rate,
EMA; seed `--seed`) by the project's train step, then its EMA measured: the held-out loss (the
training objective on config.nag.finetune.eval_examples test images at fixed noise, as
`nag.main`'s report) and fd_fmnist of `--fd-samples` samples (config.eval's sampler). Each
training is one file WORKDIR/trained/NAME_seedS.json (+ .msgpack parameters, a sample grid), so
a killed run resumes at the kernel it was training and shards can run side by side.

Predictors, per kernel of the space (`--stage score`; the convolution is not a graph of the space):
- jacov and NASWOT (`canvas_jax.score_candidates`, the search's inputs: the trained 3x3 model
  around fresh kernels, config.nag.proxy_images images at config.nag.proxy_sigma);
- SoTL-E as the search runs it (`nag.sotl.SotlTrainer`, config.nag.sotl: from the trained 3x3
  model, distillation and all) for `--sotl-steps` steps: the loss curve of one long run gives
  SoTL-E at every shorter S (the learning rate is constant and batches are a function of the
  step), for E = S/4 and E = S/2;
- SoTL-E of the from-scratch training itself at steps S (the training loss summed over the E
  steps before S): what stopping the real training early would say;
- the neural predictor (`nag.predictors.NeuralPredictor`, config.nag.predictor) fitted on the
  graphs and their final held-out losses, scored out of fold (`--folds`).

Output: the table (Spearman and Kendall against the final held-out loss and fd_fmnist, and the
seconds each predictor costs per kernel), printed and written as JSON.
"""

import argparse
import ast
import dataclasses
import json
import pathlib
import sys
import time

import flax.serialization
import jax
import numpy as np

import canvas_jax
from benchmarks import common
from benchmarks.model_cost import load_config
from canvas_jax.baselines import BASELINES, apply_init
from canvas_jax.graph import KernelGraph
from canvas_jax.sample import Constraints, kernel_shapes
from canvas_jax.score import kendall, spearman
from nag import kernel_search as ks
from nag.predictors import NeuralPredictor, encode_graphs
from nag.search import write_atomic
from nag.sotl import SotlTrainer
from patchdiff import config as config_lib
from patchdiff.metrics.evaluator import SampleEvaluator
from patchdiff.models import build_model, init_params
from patchdiff.models.cost import count_params, forward_flops_per_image
from patchdiff.tables import format_table
from patchdiff.train.report import save_grid

CONV = "conv3x3"
STAGES = ("train", "score", "table", "all")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    graph: KernelGraph | None  # None: the 3x3 convolution
    init: tuple = ()
    source: str = "baseline"  # baseline, sampled, or a search's name


def kernel_set(config, sampled: int, seed: int = 0) -> list[Kernel]:
    """The convolution, the baselines, then `sampled` draws of the search's space."""
    settings = ks.read_settings(config)
    space = ks.search_space(config, settings.search)
    constraints = Constraints.from_config(config, kernel_shapes(config))
    kernels = [Kernel(CONV, None)]
    kernels += [Kernel(name, b.graph, b.init) for name, b in BASELINES.items()]
    if sampled:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 1234)
        graphs = canvas_jax.sample(key, space, constraints, sampled)
        kernels += [Kernel(f"sampled_{i:02d}", g, (), "sampled") for i, g in enumerate(graphs)]
    return kernels


def graph_json(graph: KernelGraph | None) -> dict | None:
    if graph is None:
        return None
    return {"ops": list(graph.ops), "inputs": [list(i) for i in graph.inputs], "text": str(graph)}


# -- ground truth: one kernel trained from scratch --------------------------------------------


def seed_config(config, seed: int):
    config = config.copy_and_resolve_references()
    config.seed = seed
    return config


def model_of(config, kernel: Kernel):
    return build_model(config) if kernel.graph is None else canvas_jax.replace(config, kernel.graph)


def trained_path(workdir, name: str, seed: int) -> pathlib.Path:
    return pathlib.Path(workdir) / "trained" / f"{name}_seed{seed}.json"


def load_params(workdir, name: str, seed: int):
    path = trained_path(workdir, name, seed).with_suffix(".msgpack")
    return flax.serialization.msgpack_restore(path.read_bytes())


def train_kernel(config, kernel: Kernel, seed: int, workdir, fd_samples: int, log=print) -> dict:
    """Trains (or reads back) `kernel`'s network from scratch and measures it; see the module
    docstring. The parameters are written first, the JSON naming them last."""
    path = trained_path(workdir, kernel.name, seed)
    training = {
        "graph": graph_json(kernel.graph),
        "init": [list(i) for i in kernel.init],
        "seed": seed,
        "steps": int(config.train.total_steps),
    }
    e = config.eval
    stamp = {**training, "fd_samples": fd_samples, "eval": [e.sampler, e.steps]}
    done = json.loads(path.read_text()) if path.exists() else None
    if done is not None and done["stamp"] == stamp:
        return done
    config = seed_config(config, seed)
    model = model_of(config, kernel)
    if done is not None and {k: done["stamp"].get(k) for k in training} == training:
        # the same training measured another way: its parameters are measured again
        ema = load_params(workdir, kernel.name, seed)
        result = {k: done[k] for k in ("curve", "patch_sizes", "train_s", "step_s", "step_s_full")}
        losses = None
    else:
        tic = time.perf_counter()
        params = init_params(model, jax.random.PRNGKey(seed), config)
        if kernel.init:
            params = apply_init(params, kernel.graph, kernel.init)
        record = []
        ema = ks.train_steps(model, params, config, record=record)
        train_s = time.perf_counter() - tic
        losses = np.array([r[0] for r in record])
        seconds = np.array([r[1] for r in record])
        sizes = np.array([r[2] for r in record])
        full = sizes == config.data.resolution
        steady = np.arange(len(record)) >= 10  # after the compiles
        result = {
            "curve": [float(v) for v in losses],
            "patch_sizes": [int(v) for v in sizes],
            "train_s": train_s,
            "step_s": float(np.median(seconds[steady])) if steady.any() else float(seconds.mean()),
            "step_s_full": (
                float(np.median(seconds[full & steady])) if (full & steady).any() else None
            ),
        }
    fs = ks.read_settings(config).finetune
    held_out = ks.load_images(config, fs.eval_examples, config.eval.split, flip=False)
    loss = ks.heldout_loss(model, config, held_out, fs.eval_batch, 0)(ema)
    tic = time.perf_counter()
    evaluator = SampleEvaluator(config, model, pathlib.Path(workdir))
    quality = evaluator(ema, fd_samples)
    eval_s = time.perf_counter() - tic
    # The grid: the evaluation's first images (its compiled sampler, its seeds).
    grid = np.concatenate([im for _, im in evaluator.images(ema, config.sample.num_images, 0)])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, path.with_suffix(".png"))
    if losses is not None:
        write_atomic(path.with_suffix(".msgpack"), flax.serialization.msgpack_serialize(ema))
    done = {
        "stamp": stamp,
        "name": kernel.name,
        "source": kernel.source,
        "params": count_params(ema),
        "flops_per_image": forward_flops_per_image(model, ema, config),
        "heldout_loss": loss,
        "fd_fmnist": float(next(iter(quality.values()))),
        "quality": quality,
        **result,
        "eval_s": eval_s,
        "commit": common.git_commit(),
    }
    write_atomic(path, json.dumps(done, indent=1) + "\n")
    log(
        f"{kernel.name} seed {seed}: held-out loss {loss:.4f}, fd_fmnist {done['fd_fmnist']:.2f}, "
        f"{result['train_s']:.0f} s training, {eval_s:.0f} s sampling"
    )
    return done


# -- predictors -------------------------------------------------------------------------------


def in_space(graph: KernelGraph, space) -> bool:
    try:
        graph.validate(space=space)
    except ValueError:
        return False
    return True


def sotl_settings(config, steps: int):
    sotl = ks.read_settings(config).sotl
    return dataclasses.replace(sotl, steps=steps, last=min(sotl.last, steps))


def score_kernels(config, kernels: list[Kernel], base, workdir, sotl_steps: int, log=print):
    """{name: {"jacov", "naswot", "sotl_curve", ...}} of the graph kernels, kept kernel by kernel
    in WORKDIR/scores.json (an entry is reused while its graph and the settings are the same),
    so a killed run continues where it stopped."""
    path = pathlib.Path(workdir) / "scores.json"
    settings = ks.read_settings(config)
    space = ks.search_space(config, settings.search)
    graphs = [k for k in kernels if k.graph is not None and in_space(k.graph, space)]
    for k in kernels:
        if k.graph is not None and k not in graphs:
            log(f"{k.name} is not a graph of the search's space: trained, not scored.")
    sotl = sotl_settings(config, sotl_steps)
    settings_stamp = {
        "sotl": dataclasses.asdict(sotl),
        "proxy_images": settings.search.proxy_images,
        "proxy_sigma": settings.search.proxy_sigma,
    }
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored.get("stamp", {}).get("settings") != settings_stamp:
        stored = {}
    kept = stored.get("scores", {})
    scores = {
        k.name: kept[k.name]
        for k in graphs
        if k.name in kept and kept[k.name].get("graph") == graph_json(k.graph)
    }

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        kernels = {k.name: graph_json(k.graph) for k in graphs}
        stamp = {"settings": settings_stamp, "kernels": kernels}
        write_atomic(path, json.dumps({"stamp": stamp, "scores": scores}, indent=1) + "\n")

    s = settings.search
    pool = ks.load_images(config, s.pool)
    images = pool["image"][: s.proxy_images]
    todo = [k for k in graphs if k.name not in scores]
    if todo:
        for k in todo:
            scores[k.name] = {"graph": graph_json(k.graph)}
        for proxy in ("jacov", "naswot"):
            tic = time.perf_counter()
            # the search's own proxy function (its inputs, its parameters around the kernels)
            proxy_fn = ks.make_proxy_fn(config, base, dataclasses.replace(s, proxy=proxy), images)
            values = proxy_fn([k.graph for k in todo])
            took = (time.perf_counter() - tic) / len(todo)
            for k, v in zip(todo, np.asarray(values), strict=True):
                scores[k.name][proxy] = float(v) if np.isfinite(v) else None
                scores[k.name][f"{proxy}_s"] = took
            log(f"{proxy}: {len(todo)} kernels in {took * len(todo):.1f} s")
        save()

    def write_prior():
        # The sampled kernels' curves so far, for a search's config.nag.prior (baselines left
        # out: a search should find its kernels, not be handed the hand-made ones).
        settings_json = dataclasses.asdict(sotl)
        lines = [
            json.dumps(
                {
                    "name": k.name,
                    **graph_json(k.graph),
                    "curve": scores[k.name]["sotl_curve"],
                    "sotl": settings_json,
                }
            )  # fmt: skip
            for k in graphs
            if k.source == "sampled" and "sotl_curve" in scores[k.name]
        ]
        prior, text = pathlib.Path(workdir) / "prior.jsonl", "".join(line + "\n" for line in lines)
        if not prior.exists() or prior.read_text() != text:
            write_atomic(prior, text)

    trainer = SotlTrainer(config, base, sotl, space=space)
    for k in sorted(graphs, key=lambda k: k.source != "sampled"):  # the prior's kernels first
        if "sotl_curve" in scores[k.name]:
            continue
        result = trainer.scores([k.graph], pool)
        scores[k.name]["sotl_curve"] = [float(v) for v in result.curves[0]]
        scores[k.name]["sotl_s"] = result.seconds
        save()
        write_prior()
        log(f"SoTL-E of {k.name}: {sotl_steps} steps in {result.seconds:.0f} s")
    write_prior()
    return scores


def sotl_budgets(sotl_steps: int, per_call: int) -> list[int]:
    steps, budgets = per_call, []
    while steps <= sotl_steps:
        budgets.append(steps)
        steps *= 2
    return budgets


def neural_cv(config, graphs, targets, folds: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of the neural predictor (config.nag.predictor) for `targets`."""
    p = ks.read_settings(config).predictor
    space = ks.search_space(config, ks.read_settings(config).search)
    adjacency, onehot, _ = encode_graphs(graphs, space)
    order = np.random.default_rng(seed).permutation(len(graphs))
    out = np.zeros(len(graphs))
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        predictor = NeuralPredictor(
            hidden=p.hidden, layers=p.layers, heads=p.heads, members=p.members, steps=p.steps,
            seed=seed + fold,
        )  # fmt: skip
        predictor.fit((adjacency[train], onehot[train]), targets[train])
        out[test] = predictor.predict((adjacency[test], onehot[test]))[0]
    return out


def correlations(predictions: dict, truth: dict, names: list[str]) -> list[dict]:
    """One row per predictor: Spearman and Kendall (higher prediction = better kernel) against
    each truth (lower = better), over the kernels both have."""
    rows = []
    for label, (values, cost) in predictions.items():
        row = {"predictor": label, "s/kernel": cost}
        for tname, tvalues in truth.items():
            keep = [
                i for i, n in enumerate(names)
                if values.get(n) is not None and tvalues.get(n) is not None
            ]  # fmt: skip
            a = np.array([values[names[i]] for i in keep])
            b = -np.array([tvalues[names[i]] for i in keep])
            row[f"spearman {tname}"] = spearman(a, b) if len(keep) > 2 else None
            row[f"kendall {tname}"] = kendall(a, b) if len(keep) > 2 else None
        row["kernels"] = len(keep)
        rows.append(row)
    return rows


def sotl_e(curve, steps: int, last: int) -> float | None:
    if curve is None:  # not scored (a run stopped before it)
        return None
    window = np.asarray(curve[steps - last : steps], np.float64)
    return None if not np.isfinite(window).all() else -float(window.sum())


def predictor_table(config, kernels, trained, scores, sotl_steps, folds, log=print) -> list[dict]:
    graphs = [k for k in kernels if k.name in scores and k.name in trained]
    names = [k.name for k in graphs]
    truth = {
        "loss": {n: trained[n]["heldout_loss"] for n in names},
        "fd": {n: trained[n]["fd_fmnist"] for n in names},
    }
    predictions = {}
    for proxy in ("jacov", "naswot"):
        predictions[proxy] = (
            {n: scores[n][proxy] for n in names},
            float(np.mean([scores[n][f"{proxy}_s"] for n in names])),
        )
    per_call = ks.read_settings(config).sotl.steps_per_call

    # seconds of a candidate's SoTL-E at S steps: its measured run of sotl_steps, less the
    # steps it did not need at its from-scratch training's step time (what is left is mostly
    # the compile)
    def sotl_cost(n, steps):
        return scores[n]["sotl_s"] - (sotl_steps - steps) * trained[n]["step_s"]

    for steps in sotl_budgets(sotl_steps, per_call):
        for last in sorted({max(steps // 4, 1), steps // 2}):
            predictions[f"SoTL-E search S={steps} E={last}"] = (
                {n: sotl_e(scores[n].get("sotl_curve"), steps, last) for n in names},
                float(np.mean([sotl_cost(n, steps) for n in names if "sotl_s" in scores[n]])),
            )
    total = int(config.train.total_steps)

    def scratch_cost(n, steps):  # the training's compile (what its steps do not explain) + S steps
        run = trained[n]
        return run["train_s"] - (total - steps) * run["step_s"]

    steps = total // 8
    while steps <= total:
        last = max(steps // 4, 1)
        predictions[f"SoTL-E scratch S={steps} E={last}"] = (
            {n: sotl_e(trained[n]["curve"], steps, last) for n in names},
            float(np.mean([scratch_cost(n, steps) for n in names])),
        )
        steps *= 2
    targets = -np.array([truth["loss"][n] for n in names])
    tic = time.perf_counter()
    cv = neural_cv(config, [k.graph for k in graphs], targets, folds)
    predictions[f"neural predictor ({folds}-fold CV, trained on final loss)"] = (
        dict(zip(names, cv.tolist(), strict=True)),
        (time.perf_counter() - tic) / len(names),
    )
    return correlations(predictions, truth, names)


# -- the command ------------------------------------------------------------------------------


def parse_shard(parser, text: str) -> tuple[int, int]:
    """--shard i/n as (i, n), or the parser's usage error."""
    try:
        index, count = (int(v) for v in text.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        parser.error(f"--shard {text!r}: i/n with 0 <= i < n, e.g. 0/2")
    return index, count


def load_with_overrides(spec: str, overrides):
    """`spec`'s config ('path.py[:options]') with each --set FIELD=VALUE applied."""
    config = load_config(spec)
    for item in overrides:
        override(config, item)
    return config


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a kernel-search config (with config.nag)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sampled", type=int, default=19, help="kernels drawn from the space")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every kernel")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the drawn kernels")
    parser.add_argument("--sotl-steps", type=int, default=128)
    parser.add_argument("--fd-samples", type=int, default=500)
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--stage", default="all", choices=STAGES)
    parser.add_argument("--shard", default="0/1", help="i/n: train every n-th kernel from i")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="a config override, e.g. --set train.total_steps=400 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.shard = parse_shard(parser, args.shard)
    for name in ("sampled", "sotl_steps", "fd_samples", "folds"):
        if getattr(args, name) < (0 if name == "sampled" else 1):
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be positive")
    return args


def override(config, item: str) -> None:
    """Sets FIELD=VALUE (VALUE a Python literal, else a string) on `config`."""
    field, sep, text = item.partition("=")
    *parents, leaf = field.split(".")
    node = config
    try:
        for name in parents:
            node = node[name]
        node[leaf]  # noqa: B018 (a KeyError names an unknown field)
    except (KeyError, AttributeError):
        raise config_lib.ConfigError(f"--set {item}: config.{field} is not a field.") from None
    if not sep:
        raise config_lib.ConfigError(f"--set {item}: write FIELD=VALUE.")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    node[leaf] = value


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_with_overrides(args.config, args.set)
        ks.read_settings(config)
    except config_lib.ConfigError as err:
        sys.exit(f"kernel_predictors: {err}")
    return run(config, args)


def run(config, args, log=print) -> dict:
    kernels = kernel_set(config, args.sampled, args.sample_seed)
    workdir = pathlib.Path(args.workdir)
    index, count = args.shard
    trained = {}
    if args.stage in ("train", "all"):
        for i, kernel in enumerate(kernels):
            if i % count == index:
                trained[kernel.name] = train_kernel(
                    config, kernel, args.seed, workdir, args.fd_samples, log
                )
        if args.stage == "train":
            return trained
    for kernel in kernels:
        path = trained_path(workdir, kernel.name, args.seed)
        if path.exists():
            trained[kernel.name] = json.loads(path.read_text())
    if CONV not in trained:
        sys.exit(f"kernel_predictors: {trained_path(workdir, CONV, args.seed)} is missing: run "
                 "--stage train first (shard 0 trains the 3x3 model first).")  # fmt: skip
    scores = None
    if args.stage in ("score", "all"):
        base = load_params(workdir, CONV, args.seed)
        scores = score_kernels(config, kernels, base, workdir, args.sotl_steps, log)
        if args.stage == "score":
            return scores
    if scores is None:
        scores = json.loads((workdir / "scores.json").read_text())["scores"]
    rows = predictor_table(config, kernels, trained, scores, args.sotl_steps, args.folds, log)
    columns = ["predictor", "s/kernel", "spearman loss", "kendall loss", "spearman fd",
               "kendall fd", "kernels"]  # fmt: skip
    log(format_table(rows, columns))
    kernel_rows = [
        {
            "kernel": k.name,
            "graph": graph_json(k.graph)["text"].splitlines()[1:] if k.graph else "3x3 conv",
            **{
                f: trained[k.name][f]
                for f in ("heldout_loss", "fd_fmnist", "params", "flops_per_image", "step_s")
            },  # fmt: skip
            "jacov": scores.get(k.name, {}).get("jacov"),
            "naswot": scores.get(k.name, {}).get("naswot"),
        }
        for k in kernels
        if k.name in trained
    ]
    payload = {
        "environment": common.environment(),
        "config": args.config,
        "seed": args.seed,
        "steps": int(config.train.total_steps),
        "fd_samples": args.fd_samples,
        "predictors": rows,
        "kernels": kernel_rows,
    }
    common.write_json("kernel_predictors", payload, args.out)
    return payload


if __name__ == "__main__":
    main()

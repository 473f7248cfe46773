"""The kernel search's report: the 3x3 convolution, the hand-made baselines, random search's
winner and ours, each trained from scratch with the same recipe at several seeds, in one table
and one figure.

    C=ml_collections_configs/kernel_search_fashion_mnist.py
    python -m benchmarks.kernel_search_report --config $C \
        --validation runs/kernel_predictors --search runs/ks_fmnist --random runs/ks_fmnist_random

--validation: `benchmarks/kernel_predictors.py`'s workdir (its trainings of seed 0 are reused,
the others are written beside them); --search / --random: `python -m nag.main` workdirs of ours
and of random search (`--config.nag.rank=random`), whose winners (report.json) are the last two
rows; or --random-draws N instead of --random: CANVAS's random search replayed on the
validation's first N sampled kernels (the sampler's draws, each scored by SoTL-E at the search's
S and E), its winner the best of them.

Every row is `kernel_predictors.train_kernel`: the config's recipe from scratch with seed s, the
held-out loss and fd_fmnist of its EMA; step times are measured apart (`step_times`).
`--shard i/n` trains every n-th missing training (two processes, one core each); a run without
--shard trains what is missing, then writes the table (BENCHMARKS.md's), the JSON and the PNG:
fd_fmnist against the network's FLOPs for every kernel trained (validation included), the rows'
sample grids side by side, and the winner's graph.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from benchmarks import common
from benchmarks import kernel_predictors as kp
from canvas_jax.baselines import BASELINES
from canvas_jax.graph import KernelGraph
from canvas_jax.sample import Constraints, kernel_shapes
from patchdiff import config as config_lib
from patchdiff.tables import format_table

COLUMNS = [
    "row", "kernel FLOPs", "FLOPs vs conv", "params", "step ms", "held-out loss", "fd_fmnist",
    "seeds",
]  # fmt: skip


def known_kernels(validation) -> dict:
    """{canonical hash: name} of the graphs trained in the validation's workdir."""
    known = {}
    for path in sorted((pathlib.Path(validation) / "trained").glob("*_seed0.json")):
        graph = json.loads(path.read_text())["stamp"]["graph"]
        if graph is not None:
            name = path.name.removesuffix("_seed0.json")
            known.setdefault(kp.ks.graph_of(graph).canonical_hash(), name)
    return known


def winner_of(workdir, label: str, known: dict) -> kp.Kernel:
    """A search's winner; named as the validation's kernel when it is one (its trainings are
    then reused)."""
    path = pathlib.Path(workdir) / "report.json"
    if not path.is_file():
        sys.exit(f"kernel_search_report: {path} is missing: run `python -m nag.main` there first.")
    winner = json.loads(path.read_text())["winner"]
    graph = kp.ks.graph_of(winner)
    return kp.Kernel(known.get(graph.canonical_hash(), label), graph, (), label)


def random_winner(config, args) -> kp.Kernel:
    """CANVAS's random search replayed on the validation's draws: of its first
    `--random-draws` sampled kernels (the sampler's draws in order, all scored by SoTL-E in
    scores.json), the best by SoTL-E at the search's own S and E (config.nag.sotl)."""
    sotl = kp.ks.read_settings(config).sotl
    stored = json.loads((pathlib.Path(args.validation) / "scores.json").read_text())
    scores, graphs = stored["scores"], stored["stamp"]["kernels"]
    names = [f"sampled_{i:02d}" for i in range(args.random_draws)]
    missing = [n for n in names if n not in scores]
    if missing:
        sys.exit(
            f"kernel_search_report: --random-draws {args.random_draws}: {missing[0]} has no "
            "SoTL-E in the validation's scores.json; score at least that many (--sampled)."
        )
    values = {n: kp.sotl_e(scores[n]["sotl_curve"], sotl.steps, sotl.last) for n in names}
    best = max((n for n in names if values[n] is not None), key=lambda n: values[n])
    return kp.Kernel(best, kp.ks.graph_of(graphs[best]), (), "random_winner")


def rows_of(config, args) -> list[tuple[str, kp.Kernel]]:
    rows = [("3x3 convolution", kp.Kernel(kp.CONV, None))]
    rows += [(name, kp.Kernel(name, b.graph, b.init)) for name, b in BASELINES.items()]
    known = known_kernels(args.validation)
    if args.random:
        rows.append(("random search's winner", winner_of(args.random, "random_winner", known)))
    elif args.random_draws:
        rows.append(("random search's winner", random_winner(config, args)))
    if args.search:
        rows.append(("ours (nag)", winner_of(args.search, "nag_winner", known)))
    return rows


def spread(values) -> str:
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{values.mean():.4g} ({values.min():.4g}-{values.max():.4g})"


def table(config, rows, trained, timed: dict | None = None) -> list[dict]:
    constraints = Constraints.from_config(config, kernel_shapes(config))
    conv_flops = np.mean([t["flops_per_image"] for t in trained[kp.CONV]])
    out = []
    for label, kernel in rows:
        runs = trained[kernel.name]
        flops = runs[0]["flops_per_image"]
        rel = constraints.relative_cost(kernel.graph)[1] if kernel.graph is not None else 1.0
        if timed:
            steps = timed[label]
        else:
            steps = [r["step_s_full"] or r["step_s"] for r in runs]
        out.append(
            {
                "row": label,
                "kernel": str(kernel.graph) if kernel.graph is not None else "3x3 conv",
                "kernel FLOPs": f"{rel:.3f}",
                "FLOPs vs conv": f"{flops / conv_flops:.3f}",
                "GFLOPs/image": flops / 1e9,
                "params": runs[0]["params"],
                "step ms": f"{1e3 * np.median(steps):.0f}",
                "held-out loss": spread([r["heldout_loss"] for r in runs]),
                "fd_fmnist": spread([r["fd_fmnist"] for r in runs]),
                "seeds": len(runs),
                "heldout_losses": [r["heldout_loss"] for r in runs],
                "fd_fmnists": [r["fd_fmnist"] for r in runs],
            }
        )
    return out


def step_times(config, rows, steps: int, rounds: int, log=print) -> dict:
    """{row label: [seconds per training step, median of each round]}: every row's train step
    compiled first, then timed `steps` steps at a time in alternating rounds, so the machine's
    drift falls on every row alike (the trainings' own step times ran beside other work)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from patchdiff import data as data_lib
    from patchdiff.models import init_params
    from patchdiff.train.loop import make_mesh
    from patchdiff.train.optim import build_optimizer
    from patchdiff.train.state import create_state, state_shardings
    from patchdiff.train.step import make_train_step

    mesh, rules = make_mesh(config)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    optimizer = build_optimizer(config.train)
    loader = data_lib.build_loader(config, 0)
    batch = data_lib.to_global(loader.next(config.train.batch_size), batch_sharding)
    programs = {}
    for label, kernel in rows:
        model = kp.model_of(config, kernel)
        params = init_params(model, jax.random.PRNGKey(0), config)
        shardings, _ = state_shardings(model, optimizer, config, mesh, rules)
        state = jax.device_put(create_state(model, optimizer, config, params), shardings)
        step = make_train_step(model, optimizer, config, shardings, batch_sharding)
        state, metrics = step(state, batch, config.data.resolution)  # compile
        jax.block_until_ready(metrics)
        programs[label] = [step, state]
    times = {label: [] for label in programs}
    for _ in range(rounds):
        for label, entry in programs.items():
            samples = []
            for _ in range(steps):
                tic = time.perf_counter()
                entry[1], metrics = entry[0](entry[1], batch, config.data.resolution)
                jax.block_until_ready(metrics)
                samples.append(time.perf_counter() - tic)
            times[label].append(float(np.median(samples)))
    log("step times: " + ", ".join(f"{k} {1e3 * np.median(v):.0f} ms" for k, v in times.items()))
    return times


def draw_graph(ax, graph: KernelGraph, title: str) -> None:
    """Nodes in topological layers, edges as lines: the kernel on one matplotlib axis."""
    depth = [0] * len(graph)
    for node, preds in enumerate(graph.inputs):
        depth[node] = max((depth[p] + 1 for p in preds), default=0)
    layers: dict[int, list[int]] = {}
    for node, d in enumerate(depth):
        layers.setdefault(d, []).append(node)
    pos = {}
    for d, nodes in layers.items():
        for i, node in enumerate(nodes):
            pos[node] = ((i + 1) / (len(nodes) + 1), 1 - d / max(max(layers), 1))
    for node, preds in enumerate(graph.inputs):
        for p in preds:
            (x0, y0), (x1, y1) = pos[p], pos[node]
            ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "0.4"})
    for node, (x, y) in pos.items():
        label = "x" if node == 0 else graph.ops[node]
        box = {"boxstyle": "round", "fc": "lightyellow" if node else "lightblue"}
        ax.text(x, y, label, ha="center", va="center", fontsize=8, bbox=box)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.1, 1.1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def figure(path, rows, report, validation_runs, workdir, seed: int) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    from PIL import Image

    grids = [(label, kernel) for label, kernel in rows]
    fig = plt.figure(figsize=(3 * max(len(grids), 4), 9))
    top = fig.add_gridspec(2, len(grids), height_ratios=[1.2, 1])
    ax = fig.add_subplot(top[0, : len(grids) // 2 + 1])
    conv = np.mean([r["flops_per_image"] for r in validation_runs if r["name"] == kp.CONV])
    sampled = [r for r in validation_runs if r["source"] == "sampled"]
    ax.scatter([r["flops_per_image"] / conv for r in sampled], [r["fd_fmnist"] for r in sampled],
               c="0.6", s=18, label="sampled kernels (validation)")  # fmt: skip
    for row in report:
        ax.errorbar(float(row["FLOPs vs conv"]), np.mean(row["fd_fmnists"]),
                    yerr=[[np.mean(row["fd_fmnists"]) - min(row["fd_fmnists"])],
                          [max(row["fd_fmnists"]) - np.mean(row["fd_fmnists"])]],
                    fmt="o", capsize=3, label=row["row"])  # fmt: skip
    ax.axvline(0.6, color="0.3", ls=":", lw=1)
    ax.set_xlabel("network FLOPs / the 3x3 convolution network's")
    ax.set_ylabel("fd_fmnist (lower is better)")
    ax.legend(fontsize=7)
    winner = next((k for label, k in rows if label == "ours (nag)"), None)
    if winner is not None:
        draw_graph(fig.add_subplot(top[0, len(grids) // 2 + 1 :]), winner.graph, "ours: the kernel")
    for i, (label, kernel) in enumerate(grids):
        ax = fig.add_subplot(top[1, i])
        png = kp.trained_path(workdir, kernel.name, seed).with_suffix(".png")
        ax.imshow(np.asarray(Image.open(png)), cmap="gray")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    common.save_figure(fig, path)
    return True


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--validation", required=True, help="kernel_predictors' --workdir")
    parser.add_argument("--search", default=None, help="nag.main workdir of ours")
    parser.add_argument("--random", default=None, help="nag.main workdir of random search")
    parser.add_argument(
        "--random-draws", type=int, default=0,
        help="without --random: random search as the best SoTL-E of the validation's first N draws",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--fd-samples", type=int, default=500)
    parser.add_argument("--shard", default=None, help="i/n: only train every n-th from i")
    parser.add_argument(
        "--time-steps",
        type=int,
        default=20,
        help="steps per round of the step-time comparison (0: the trainings' own)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument(
        "--only", default="", help="with --shard: train only these kernels (names, comma-separated;"
        " nag_winner and random_winner name the searches' winners)",
    )  # fmt: skip
    parser.add_argument(
        "--no-train", action="store_true",
        help="the table from the trainings there are (a row may then have fewer seeds)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    parser.add_argument("--figure", default="benchmarks/figures/kernel_search.png")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: at least 1")
    args.only = tuple(name for name in args.only.split(",") if name)
    if args.time_steps < 0 or args.rounds < 1:
        parser.error("--time-steps must be 0 (off) or more and --rounds at least 1")
    if args.shard is not None:
        args.shard = kp.parse_shard(parser, args.shard)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = kp.load_with_overrides(args.config, args.set)
    except config_lib.ConfigError as err:
        sys.exit(f"kernel_search_report: {err}")
    return run(config, args)


def run(config, args, log=print) -> dict | None:
    rows = rows_of(config, args)
    work = [(kernel, seed) for _, kernel in rows for seed in range(args.seeds)]
    if args.shard is not None:
        index, count = args.shard
        todo = [w for w in work if not kp.trained_path(args.validation, w[0].name, w[1]).exists()]
        if args.only:
            todo = [w for w in todo if w[0].name in args.only or w[0].source in args.only]
        for kernel, seed in todo[index::count]:
            kp.train_kernel(config, kernel, seed, args.validation, args.fd_samples, log)
        return None
    trained = {}
    for _, kernel in rows:
        runs = []
        for seed in range(args.seeds):
            path = kp.trained_path(args.validation, kernel.name, seed)
            if args.no_train and not path.exists():
                log(f"{kernel.name} seed {seed} is not trained (--no-train): left out")
                continue
            runs.append(
                kp.train_kernel(config, kernel, seed, args.validation, args.fd_samples, log)
            )
        if not runs:
            sys.exit(f"kernel_search_report: {kernel.name} has no training (--no-train).")
        trained[kernel.name] = runs
    timed = step_times(config, rows, args.time_steps, args.rounds, log) if args.time_steps else None
    report = table(config, rows, trained, timed)
    log(format_table(report, COLUMNS))
    validation = [
        json.loads(p.read_text())
        for p in sorted((pathlib.Path(args.validation) / "trained").glob("*_seed0.json"))
    ]
    drawn = figure(pathlib.Path(args.figure), rows, report, validation, args.validation, 0)
    payload = {
        "environment": common.environment(),
        "config": args.config,
        "steps": int(config.train.total_steps),
        "fd_samples": args.fd_samples,
        "step_times": timed,
        "rows": report,
        "figure": args.figure if drawn else None,
    }
    common.write_json("kernel_search_report", payload, args.out)
    return payload


if __name__ == "__main__":
    main()

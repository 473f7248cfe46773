"""Search on NAS-Bench-201: best validation accuracy found after 10, 20, 50, 100 evaluations by
each searcher (random search, regularised evolution, ours: `nag`, the guided graph diffusion
generator of `nag.nb201_generator`; also `predictor`, `nag.guided`), 10 seeds each, on CIFAR-10,
CIFAR-100 and ImageNet16-120.

    python -m benchmarks.nb201_search                          # 3 searchers x 3 datasets x 10 seeds
    python -m benchmarks.nb201_search --budget 20 --seeds 2    # a quick look
    python -m benchmarks.nb201_search --seeds 100 --searchers rea --population 10 --sample 3

An evaluation is one distinct cell looked up in the table (`nag.nb201.Oracle`); seed s drives
searcher s on every dataset. Each row gives mean ± std (over seeds, ddof 0) of the best so far;
the row "random (exact)" is the expectation of random search without replacement computed from
the table (`expected_random_best`), against which the sampled random rows are checked, and
"optimum" the table's best. Reference (NB201 / DiffusionNAG tables): random search's expected best
after 50 evaluations 90.52 / 71.11 / 45.20, optima 91.57 / 73.26 / 47.33 (C10 / C100 / IN16).
Writes benchmarks/results/nb201_search.json (every seed's curve) and, where matplotlib is
installed, nb201_search.png: best so far against evaluations, mean line and min-max band.
"""

import argparse
import pathlib

import numpy as np

from benchmarks.common import environment, pyplot, save_figure, write_json
from canvas_jax import nb201 as nb201_space
from nag import guided, nb201, nb201_generator  # noqa: F401 (they register "predictor", "nag")
from patchdiff.tables import format_table

CHECKPOINTS = (10, 20, 50, 100)
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet16_120": "ImageNet16-120"}
REFERENCE_RANDOM_50 = {"cifar10": 90.52, "cifar100": 71.11, "imagenet16_120": 45.20}


def run_curves(edge_ops, accuracy, name, options, seeds, budget) -> tuple[np.ndarray, dict]:
    """([seeds, budget] best-so-far curves of one searcher on one dataset's table, the mean
    valid / unique / novel fractions of its generated samples, unguided and guided, if any)."""
    curves, generated = [], []
    for seed in range(seeds):
        oracle = nb201.Oracle(edge_ops, accuracy, budget)
        searcher = nb201.seeded_searcher(name, seed, **options)
        history = nb201.run_search(searcher, oracle, np.random.default_rng(seed))
        curves.append(nb201.best_curve(history))
        generated += getattr(searcher, "generated", [])
    stats = {}
    for guided_, label in ((False, "unguided"), (True, "guided")):
        outs = [out for g, out in generated if g == guided_]
        if outs:
            stats[label] = {
                field: float(np.mean([getattr(out, field) for out in outs]))
                for field in ("valid_fraction", "unique_fraction", "novel_fraction")
            } | {"samplings": len(outs), "samples_each": int(outs[0].samples)}
    return np.stack(curves), stats


def summary_row(dataset, searcher, curves, checkpoints) -> dict:
    row = {"dataset": dataset, "searcher": searcher}
    for n in checkpoints:
        at = curves[:, n - 1]
        row[f"@{n}"] = f"{at.mean():.2f} ± {at.std():.2f}"
        row[f"mean_{n}"], row[f"std_{n}"] = float(at.mean()), float(at.std())
    return row


def plot(curves: dict, optima: dict, path: pathlib.Path) -> bool:
    """One panel per dataset: mean best-so-far per searcher with its seeds' min-max band."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (dataset, by_searcher) in zip(axes[0], curves.items(), strict=True):
        for searcher, runs in by_searcher.items():
            runs = np.asarray(runs)
            x = np.arange(1, runs.shape[1] + 1)
            (line,) = ax.plot(x, runs.mean(0), label=searcher)
            ax.fill_between(x, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2)
        ax.axhline(optima[dataset], color="black", linestyle=":", label="optimum")
        ax.set(title=TITLES[dataset], xlabel="evaluations", ylabel="best validation accuracy %")
        # From the worst seed's best after 10 evaluations up: the first few are off the chart.
        low = min(np.asarray(r)[:, min(9, len(r[0]) - 1)].min() for r in by_searcher.values())
        ax.set_ylim(low - 0.5, optima[dataset] + 0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searchers", nargs="+", default=["random", "rea", "nag"])
    parser.add_argument("--datasets", nargs="+", default=list(nb201_space.DATASETS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--population", type=int, default=10, help="REA's population P")
    parser.add_argument("--sample", type=int, default=5, help="REA's tournament size S")
    parser.add_argument("--data", default=None, help="the NB201 CSV (default: shared data)")
    parser.add_argument("--out", default=None, help="JSON path; the PNG goes beside it")
    args = parser.parse_args(argv)
    env = environment()  # at the start: the commit that runs, not the one at the end
    for name in args.searchers:
        nb201.SEARCHERS.get(name, "--searchers")  # an unknown name stops before any work
    datasets = [nb201.dataset_name(d) for d in args.datasets]
    options = {"rea": {"population": args.population, "sample": args.sample}}
    checkpoints = sorted({n for n in CHECKPOINTS if n < args.budget} | {args.budget})

    edge_ops, accuracies = nb201_space.load_nb201(args.data)
    rows, curves, optima, generated = [], {}, {}, {}
    for dataset in datasets:
        accuracy = accuracies[dataset]
        optima[dataset] = float(accuracy.max())
        curves[dataset] = {}
        for searcher in args.searchers:
            runs, stats = run_curves(
                edge_ops, accuracy, searcher, options.get(searcher, {}), args.seeds, args.budget
            )
            curves[dataset][searcher] = runs.tolist()
            if stats:
                generated.setdefault(dataset, {})[searcher] = stats
            rows.append(summary_row(dataset, searcher, runs, checkpoints))
        exact = {"dataset": dataset, "searcher": "random (exact)"}
        for n in checkpoints:
            exact[f"@{n}"] = f"{nb201.expected_random_best(accuracy, n):.2f}"
            exact[f"mean_{n}"] = nb201.expected_random_best(accuracy, n)
        rows.append(exact)
        best, at = f"{optima[dataset]:.2f}", [f"@{n}" for n in checkpoints]
        rows.append({"dataset": dataset, "searcher": "optimum"} | dict.fromkeys(at, best))

    print(
        f"{env['device']}, {args.seeds} seeds, budget {args.budget}, REA P={args.population} "
        f"S={args.sample}, commit {env['commit']}, {env['date']}"
    )
    print(format_table(rows, ["dataset", "searcher", *(f"@{n}" for n in checkpoints)]))
    for dataset, by_searcher in generated.items():
        for searcher, stats in by_searcher.items():
            for label, fractions in stats.items():
                print(
                    f"{searcher} generator on {dataset}, {label}: "
                    + ", ".join(
                        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in fractions.items()
                    )
                )
    reference = {d: REFERENCE_RANDOM_50[d] for d in datasets}
    print(f"reference: random @50 {reference}, optima (91.57 / 73.26 / 47.33 in NB201's paper)")

    payload = {
        "environment": env,
        "args": vars(args),
        "checkpoints": checkpoints,
        "rows": rows,
        "optima": optima,
        "reference_random_50": reference,
        "generated": generated,  # {dataset: {searcher: {unguided|guided: fractions}}}
        "curves": curves,  # {dataset: {searcher: [seed][evaluation - 1] best so far}}
    }
    path = write_json("nb201_search", payload, args.out)
    png = path.with_suffix(".png")
    if plot(curves, optima, png):
        print(f"wrote {path} and {png}")
    else:
        print(f"wrote {path} (matplotlib is not installed: no PNG; the curves are in the JSON)")


if __name__ == "__main__":
    main()

"""The U-Net kernel search, end to end (`python -m nag.main --config FILE --workdir DIR`):

1. original: the plain U-Net trained by the project's trainer in DIR/original (resumed there);
2. search, in rounds: propose (the graph diffusion generator, guided by the neural predictor
   once it is fitted, plus fresh `canvas_jax.sample` draws) -> keep graphs that meet the
   constraints and were never evaluated (canonical hash) -> pick the best few by the
   predictor's mean + kappa std, or, before the predictor has `min_fit` evaluations, by a
   zero-cost proxy scored on every proposal in one batch (the "proxy" of later rounds' records
   is null) -> train them briefly in one
   program and score them by SoTL-E (`nag.sotl`) -> refit the predictor on every evaluation so
   far; until `budget` evaluations or `seconds` of search. With `nag.prior`, kernels evaluated
   before the search (the predictor validation's) join the history from round 0: never
   evaluated again, fitted by the predictor, candidates for the winner, outside the budget.
   `nag.rank = "random"` is CANVAS's random search instead: the sampler's draws, evaluated in
   draw order, with no generator, proxy or predictor;
3. report: the best graph swapped into every placeholder and fine-tuned from the trained
   original (kernels fresh), the original fine-tuned for the same steps on the same batches,
   both measured on the same held-out batches and noise; DIR/report.json, a printed table,
   DIR/winner.txt and .dot, sample grids DIR/samples/{original,winner}.png.

Glossary: M proposals of a round, Q picks per round (`per_round`), T evaluation budget, N nodes,
K one-hot columns, S SoTL-E steps.

Files and resuming: DIR/search/results.jsonl holds one line per evaluated graph, appended and
fsynced as soon as its round's program returns: {"round", "picked", "evaluation", "hash", "ops",
"inputs", "source", "proxy", "predicted_mean", "predicted_std", "sotl", "curve",
"params_fraction", "flops_fraction", "best_sotl", "best_hash", "seconds"}. Round r's picks are a
function of the seed, r and the records of rounds before r (the generator is fitted from the
seed, the predictor refitted with a key of (seed, r), proposals drawn with keys of (seed, r)),
so a re-run replays the complete rounds from the file, recomputes an incomplete round's picks
and evaluates only those not recorded: nothing is evaluated twice and the records are those of
an uninterrupted run. A torn last line (a crash while writing) is dropped and redone. The
fine-tuned parameters (DIR/finetune/*.msgpack, with a .json that names what they are) and the
report are reused when they match the winner and the settings.
"""

import dataclasses
import json
import pathlib
import time

import flax.serialization
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import canvas_jax
from canvas_jax.batch import candidate_params, kernel_params, score_candidates
from canvas_jax.graph import KernelGraph
from canvas_jax.sample import Constraints, kernel_shapes, space_from_config
from nag.predictors import NeuralPredictor, encode_graphs
from nag.search import append_record, open_records, write_atomic
from nag.settings import (  # noqa: F401 (the settings are part of this module's interface)
    FinetuneSettings,
    GeneratorSettings,
    PredictorSettings,
    SearchSettings,
    Settings,
    SotlSettings,
    read_settings,
    search_space,
)
from nag.sotl import SotlTrainer
from patchdiff import data as data_lib
from patchdiff import generate, train, xla_cpu
from patchdiff.config import ConfigError
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.losses import denoising_loss
from patchdiff.models import build_model, init_params
from patchdiff.models.cost import count_params, forward_flops_per_image
from patchdiff.tables import format_table
from patchdiff.train.loop import make_mesh
from patchdiff.train.optim import build_optimizer
from patchdiff.train.report import save_grid
from patchdiff.train.state import create_state, state_shardings
from patchdiff.train.step import make_train_step

COLUMNS = ["model", "held-out loss", "params", "GFLOPs/image"]
# Independent random streams of a search, each folded with the round number.
STREAMS = ("generator_fit", "generate", "sample", "predictor", "train_graphs")


def _key(seed: int, stream: str, number: int = 0):
    return jax.random.fold_in(
        jax.random.fold_in(jax.random.PRNGKey(seed), STREAMS.index(stream)), number
    )


# -- the search loop ------------------------------------------------------------------------------


@dataclasses.dataclass
class Pick:
    graph: KernelGraph
    hash: str
    source: str  # "generator" or "sample"
    proxy: float
    predicted_mean: float | None
    predicted_std: float | None


def graph_of(record: dict) -> KernelGraph:
    return KernelGraph(tuple(record["ops"]), tuple(tuple(i) for i in record["inputs"]))


def _finite(value) -> float | None:
    """A float for JSON, None for NaN or inf."""
    return float(value) if value is not None and np.isfinite(value) else None


class Proposer:
    """Round r's picks from the records of rounds before r; see the module docstring.

    generator: a fitted object with `GraphDiffusion.generate`'s signature, or None to fit a
    `GraphDiffusion` from settings.generator when first needed (a re-run whose rounds are all
    recorded never fits it). The predictor is one object refitted per round, so its programs
    compile once per doubling of the data."""

    def __init__(self, space, constraints, settings: Settings, proxy_fn, generator=None, log=print):
        self.space, self.constraints, self.settings = space, constraints, settings
        self.proxy_fn, self.log = proxy_fn, log
        p = settings.predictor
        self.predictor = NeuralPredictor(
            hidden=p.hidden,
            layers=p.layers,
            heads=p.heads,
            members=p.members,
            steps=p.steps,
            seed=settings.search.seed,
        )
        self._generator = generator

    def check(self, graph) -> str | None:
        return self.constraints.check(graph, self.space)

    def generator(self):
        if self._generator is None:
            from nag.generator import GraphDiffusion

            g, seed = self.settings.generator, self.settings.search.seed
            start = time.perf_counter()
            graphs = canvas_jax.sample(
                _key(seed, "train_graphs"), self.space, self.constraints, g.train_graphs
            )
            self._generator = GraphDiffusion(
                self.space, hidden=g.hidden, layers=g.layers, heads=g.heads, seed=seed
            ).fit(graphs, steps=g.steps, batch_size=g.batch_size)
            self.log(
                f"generator: fitted on {len(graphs)} sampled graphs in "
                f"{time.perf_counter() - start:.1f} s (final loss "
                f"{float(np.mean(self._generator.losses[-50:])):.4g})"
            )
        return self._generator

    def _sample(self, key, n, taken) -> list[KernelGraph]:
        """Up to n new graphs from canvas_jax.sample (fewer when the space runs short)."""
        while n > 0:
            try:
                return canvas_jax.sample(key, self.space, self.constraints, n, seen=set(taken))
            except ValueError:
                n //= 2
        return []

    def picks(self, round_: int, history: list[dict], count: int) -> list[Pick]:
        s, g = self.settings.search, self.settings.generator
        seen = {r["hash"] for r in history}
        if s.rank == "random":  # CANVAS's random search: the sampler's draws, in draw order
            graphs = self._sample(_key(s.seed, "sample", round_), count, seen)
            return [Pick(g_, g_.canonical_hash(), "sample", None, None, None) for g_ in graphs]
        scored = [r for r in history if r["sotl"] is not None]
        fitted = len(scored) >= s.min_fit
        if fitted:
            self.predictor.key = _key(s.seed, "predictor", round_)
            encodings = encode_graphs([graph_of(r) for r in scored], self.space)
            self.predictor.fit(encodings[:2], np.array([r["sotl"] for r in scored]))

        proposals = []  # (graph, source)
        n_sample = s.proposals if not g.enabled else round(s.proposals * s.sampled_fraction)
        if s.proposals - n_sample:
            guided = fitted and g.guidance > 0
            n_generated = s.proposals - n_sample
            out = self.generator().generate(
                _key(s.seed, "generate", round_),
                n_generated,
                predictor=self.predictor if guided else None,
                guidance=g.guidance if guided else 0.0,
                num_steps=g.num_steps,
                sampler=g.sampler,
                seen=seen,
                check=self.check,
            )
            proposals += [(graph, "generator") for graph in out.graphs]
            self.log(
                f"round {round_}: generator{' (guided)' if guided else ''} gave "
                f"{len(out.graphs)} new graphs of {n_generated} samples (valid "
                f"{out.valid_fraction:.0%}, unique {out.unique_fraction:.0%}, novel "
                f"{out.novel_fraction:.0%})"
            )
        taken = seen | {graph.canonical_hash() for graph, _ in proposals}
        proposals += [
            (graph, "sample")
            for graph in self._sample(_key(s.seed, "sample", round_), n_sample, taken)
        ]
        if not proposals:
            return []
        graphs = [graph for graph, _ in proposals]
        if fitted:  # the predictor ranks: the proxy (4-11 s a proposal on a CPU) is not needed
            proxies = np.full(len(graphs), np.nan)
            mean, std = self.predictor.predict(encode_graphs(graphs, self.space)[:2])
            rank = mean + s.kappa * std
        else:
            tic = time.perf_counter()
            proxies = np.asarray(self.proxy_fn(graphs), np.float64)
            self.log(
                f"round {round_}: {s.proxy} of {len(graphs)} proposals in "
                f"{time.perf_counter() - tic:.1f} s"
            )
            mean = std = [None] * len(graphs)
            rank = np.where(np.isfinite(proxies), proxies, -np.inf)
        order = np.argsort(-np.asarray(rank, np.float64), kind="stable")[:count]
        return [
            Pick(
                graphs[i],
                graphs[i].canonical_hash(),
                proposals[i][1],
                _finite(proxies[i]),
                _finite(mean[i]),
                _finite(std[i]),
            )
            for i in order
        ]


def search(
    workdir,
    space,
    constraints,
    settings: Settings,
    *,
    evaluate,
    proxy_fn,
    generator=None,
    prior: list[dict] | None = None,
    log=print,
):
    """Runs (or resumes) the search in `workdir`; returns all records, one per evaluation.

    evaluate(graphs) -> an object with scores [Q] (SoTL-E, higher is better, NaN for a failed
    training) and curves [Q, S] (e.g. `SotlTrainer.scores`); proxy_fn(graphs) -> [M] scores;
    generator: see `Proposer`.
    prior: `read_prior`'s records (default: read from settings.search.prior).
    """
    s = settings.search
    path, records = open_records(workdir)  # a torn last line dropped
    if prior is None:
        prior = read_prior(s.prior, settings.sotl, space) if s.prior else []
    proposer = Proposer(space, constraints, settings, proxy_fn, generator, log)
    start = time.perf_counter() - (records[-1]["seconds"] if records else 0.0)
    best = max(
        (r for r in prior + records if r["sotl"] is not None), key=lambda r: r["sotl"], default=None
    )
    round_ = 0
    with path.open("a") as out:
        while True:
            own = [r for r in records if r["round"] < round_]
            if len(own) >= s.budget:
                break
            recorded = [r for r in records if r["round"] == round_]
            if recorded and len(recorded) == recorded[0]["picked"]:
                round_ += 1  # replayed from the file
                continue
            if not recorded and s.seconds and time.perf_counter() - start >= s.seconds:
                log(f"search: the time budget of {s.seconds:g} s is spent.")
                break
            picks = proposer.picks(round_, prior + own, min(s.per_round, s.budget - len(own)))
            if not picks:
                log(f"round {round_}: no new graph meets the constraints; the search stops.")
                break
            done = {r["hash"] for r in recorded}
            todo = [p for p in picks if p.hash not in done]
            tic = time.perf_counter()
            result = evaluate([p.graph for p in todo])
            for pick, value, curve in zip(todo, result.scores, result.curves, strict=True):
                value = _finite(value)
                params, flops = constraints.relative_cost(pick.graph)
                if value is not None and (best is None or value > best["sotl"]):
                    best = {"sotl": value, "hash": pick.hash}
                record = {
                    "round": round_,
                    "picked": len(picks),
                    "evaluation": len(records) + 1,
                    "hash": pick.hash,
                    "ops": list(pick.graph.ops),
                    "inputs": [list(i) for i in pick.graph.inputs],
                    "source": pick.source,
                    "proxy": pick.proxy,
                    "predicted_mean": pick.predicted_mean,
                    "predicted_std": pick.predicted_std,
                    "sotl": value,
                    "curve": [_finite(v) for v in np.asarray(curve).tolist()],
                    "params_fraction": float(params),
                    "flops_fraction": float(flops),
                    "best_sotl": None if best is None else best["sotl"],
                    "best_hash": None if best is None else best["hash"],
                    "seconds": time.perf_counter() - start,
                }
                append_record(out, record)
                records.append(record)
            log(
                f"round {round_}: SoTL-E of {len(todo)} graphs in {time.perf_counter() - tic:.1f} "
                f"s; best so far {records[-1]['best_sotl']} ({len(records)}/{s.budget} evaluated)"
            )
            round_ += 1
    return records


# SoTL-E settings that a prior curve must share with the search for their scores to compare.
PRIOR_MUST_MATCH = (
    "steps_per_call", "batch_size", "learning_rate", "grad_clip", "distill", "train_rest",
    "lora_rank", "seed",
)  # fmt: skip


def read_prior(path, sotl: SotlSettings, space) -> list[dict]:
    """Records of the kernels in the JSON-lines file `path` (see config.nag.prior), scored by
    SoTL-E with `sotl`'s steps and last; round -1, source "prior"."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config.nag.prior = {str(path)!r} is not allowed: no such file.")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"config.nag.prior {path}, line {number}"
        try:
            item = json.loads(line)
            graph = graph_of(item)
            graph.validate(space=space)
            curve = np.asarray(item["curve"], np.float64)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{where}: not a kernel record ({{'ops', 'inputs', 'curve'}} of this search's "
                f"space): {err}"
            ) from None
        theirs = item.get("sotl", {})
        for field in PRIOR_MUST_MATCH:
            if field in theirs and theirs[field] != getattr(sotl, field):
                raise ConfigError(
                    f"{where}: its curve was trained with sotl.{field} = {theirs[field]!r}, this "
                    f"search's nag.sotl.{field} is {getattr(sotl, field)!r}; their SoTL-E would "
                    "not compare."
                )
        if len(curve) < sotl.steps:
            raise ConfigError(
                f"{where}: its SoTL-E curve has {len(curve)} steps; nag.sotl.steps = "
                f"{sotl.steps} needs at least as many."
            )
        window = curve[sotl.steps - sotl.last : sotl.steps]
        records.append(
            {
                "round": -1,
                "hash": graph.canonical_hash(),
                "ops": list(graph.ops),
                "inputs": [list(i) for i in graph.inputs],
                "source": "prior",
                "name": item.get("name"),
                "sotl": -float(window.sum()) if np.isfinite(window).all() else None,
            }
        )
    return records


def best_record(records: list[dict]) -> dict:
    scored = [r for r in records if r["sotl"] is not None]
    if not scored:
        raise ValueError("search: no evaluated graph trained to a finite loss; nothing to report.")
    return max(scored, key=lambda r: r["sotl"])


# -- the end-to-end command -----------------------------------------------------------------------


def load_images(config, count: int, split: str | None = None, flip: bool = True) -> dict:
    """The first `count` images of the seeded stream of `split`: {"image" [count, R, R, C] in
    [-1, 1], "label" [count]}."""
    loader = data_lib.build_loader(config, 0, split=split)
    loader.random_flip = flip and loader.random_flip
    return loader.next(count)


def make_proxy_fn(config, base_params, settings: SearchSettings, images):
    """proxy_fn(graphs) -> [M]: `canvas_jax.score_candidates` on `images` at proxy_sigma, with
    the trained original's parameters around template kernels."""
    params = kernel_params(config, base_params, space_from_config(config), seed=settings.seed)
    key = jax.random.PRNGKey(settings.seed)

    def proxy_fn(graphs):
        return score_candidates(
            graphs,
            config,
            images,
            key,
            params=params,
            proxy=settings.proxy,
            sigma=settings.proxy_sigma,
            chunk=settings.proposals,
        )

    return proxy_fn


def run(config, workdir, log=print) -> dict:
    """The whole command; returns the report. A re-run on `workdir` reuses what is done."""
    settings = read_settings(config)
    workdir = pathlib.Path(workdir)
    s = settings.search
    space = search_space(config, s)
    prior = read_prior(s.prior, settings.sotl, space) if s.prior else []  # checked before work

    log("== 1. the original model")
    result = train.train_and_evaluate(config, workdir / "original")
    base, original_step = jax.device_get(result["state"].ema), int(result["step"])

    log("== 2. the search")
    constraints = Constraints.from_config(config, kernel_shapes(config))
    pool = load_images(config, s.pool)
    sotl = settings.sotl
    if not sotl.candidates_per_call:  # a short last round is padded: one compiled program
        sotl = dataclasses.replace(sotl, candidates_per_call=s.per_round)
    trainer = SotlTrainer(config, base, sotl, space=space)
    images = {k: v[: s.proxy_images] for k, v in pool.items()}
    records = search(
        workdir / "search",
        space,
        constraints,
        settings,
        evaluate=lambda graphs: trainer.scores(graphs, pool),
        proxy_fn=make_proxy_fn(config, base, s, images["image"]),
        prior=prior,
        log=log,
    )
    winner = best_record(prior + records)

    log("== 3. fine-tune and compare")
    return report(config, workdir, base, original_step, winner, settings, log)


def finetune(model, params, config, fs: FinetuneSettings):
    """`fs.steps` steps of the project's train step from `params` at learning rate `fs.lr`; see
    `train_steps`. Returns the EMA."""
    config = config.copy_and_resolve_references()
    config.train.lr, config.train.total_steps = fs.lr, fs.steps
    # The trainer's ramp-up is sized for training from scratch (20k images for Fashion-MNIST:
    # 625 steps of 32, longer than runlocal's whole fine-tune, which then never reached its
    # learning rate). Fine-tuning ramps up over its first tenth instead, for both models.
    images = fs.steps * config.train.batch_size
    config.train.lr_rampup_img = min(config.train.lr_rampup_img, max(images // 10, 1))
    return train_steps(model, params, config)


def train_steps(model, params, config, record: list | None = None):
    """config.train.total_steps steps of the project's train step from `params`: the trainer's
    batches (the seeded stream from its start, the patch schedule of `data.step_plan`) and
    per-step keys, so two models trained here see the same images, crops and noise. Returns the
    EMA. With `record` (a list), every step appends (loss, seconds, patch size); each step then
    waits for its loss."""
    steps = config.train.total_steps
    mesh, rules = make_mesh(config)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    optimizer = build_optimizer(config.train)
    shardings, _ = state_shardings(model, optimizer, config, mesh, rules)
    state = jax.device_put(create_state(model, optimizer, config, params), shardings)
    step_fn = make_train_step(model, optimizer, config, shardings, batch_sharding)
    loader = data_lib.build_loader(config, 0)
    for step in range(steps):
        patch_size, size = data_lib.step_plan(config, step)
        tic = time.perf_counter()
        batch = data_lib.to_global(loader.next(size), batch_sharding)
        state, metrics = step_fn(state, batch, patch_size)
        if record is not None:
            loss = float(metrics["loss"])
            record.append((loss, time.perf_counter() - tic, patch_size))
    if int(state.bad_step) >= 0:
        raise train.TrainingStopped(
            f"training {steps} steps: the loss became non-finite at step "
            f"{int(state.bad_step)}; lower the learning rate (config.nag.finetune.lr)."
        )
    return jax.device_get(state.ema)


def heldout_loss(model, config, held_out, batch: int, seed: int):
    """loss(params) -> float: the training objective (configured noise levels and weighting) on
    full held-out images, batch by batch with keys fixed by (seed, batch index), so every model
    and parameter set is measured on the same noise; compiled once per model."""
    loss_kwargs = diffusion_build.build_loss_kwargs(config.diffusion, config.data.resolution)
    classes = config.model.num_classes

    @xla_cpu.jit
    def one(params, images, labels, key):
        def net(x_in, c_noise, **kw):
            return model.apply({"params": params}, x_in, c_noise, **kw)

        kwargs = {"labels": labels} if classes else {}
        return denoising_loss(net, key, images, **loss_kwargs, **kwargs).mean()

    def loss(params) -> float:
        batches = len(held_out["image"]) // batch
        total = 0.0
        for i in range(batches):
            rows = slice(i * batch, (i + 1) * batch)
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            total += float(one(params, held_out["image"][rows], held_out["label"][rows], key))
        return total / batches

    return loss


def _finetuned(folder: pathlib.Path, name: str, meta: dict, make) -> dict:
    """Parameters saved under folder/name.msgpack when folder/name.json holds `meta`, else
    make() saved there (the parameters first, the .json naming them last)."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = folder / f"{name}.json"
    if stored.exists() and json.loads(stored.read_text()) == meta:
        return flax.serialization.msgpack_restore((folder / f"{name}.msgpack").read_bytes())
    params = make()
    write_atomic(folder / f"{name}.msgpack", flax.serialization.msgpack_serialize(params))
    write_atomic(stored, json.dumps(meta, indent=2) + "\n")
    return params


def report(config, workdir, base, original_step: int, winner: dict, settings: Settings, log=print):
    """Fine-tunes (or reuses) both models, measures them, writes the report; returns it."""
    fs, s = settings.finetune, settings.search
    workdir = pathlib.Path(workdir)
    graph = graph_of(winner)
    stamp = {
        "original_step": original_step,
        "winner": winner["hash"],
        "finetune": dataclasses.asdict(fs),
        "seed": s.seed,
    }
    path = workdir / "report.json"
    if path.exists() and json.loads(path.read_text()).get("stamp") == stamp:
        done = json.loads(path.read_text())
        log(format_table(done["table"], COLUMNS))
        log(done["winner"]["graph"])
        return done

    held_out = load_images(config, fs.eval_examples, config.eval.split, flip=False)
    space = search_space(config, s)
    fresh = kernel_params(config, base, space, seed=settings.sotl.seed)
    models = {
        "original": (build_model(config), base),
        "winner": (canvas_jax.replace(config, graph), candidate_params(graph, fresh, config)),
    }
    losses = {
        name: heldout_loss(model, config, held_out, fs.eval_batch, s.seed)
        for name, (model, _) in models.items()
    }
    rows = [{"model": "original, before fine-tuning", "held-out loss": losses["original"](base)}]
    for name, (model, init) in models.items():
        tic = time.perf_counter()
        meta = {**stamp, "model": name}
        ema = _finetuned(
            workdir / "finetune", name, meta, lambda m=model, p=init: finetune(m, p, config, fs)
        )
        rows.append(
            {
                "model": f"{name}, fine-tuned {fs.steps} steps",
                "held-out loss": losses[name](ema),
                "params": count_params(ema),
                "GFLOPs/image": forward_flops_per_image(model, ema, config) / 1e9,
            }
        )
        images, _ = generate.generate_all(
            generate.make_generator(model, config), ema, config, config.sample.num_images
        )
        save_grid(images, workdir / "samples" / f"{name}.png")
        log(f"{name}: fine-tuned and measured in {time.perf_counter() - tic:.1f} s")

    rows[0].update({k: rows[1][k] for k in ("params", "GFLOPs/image")})  # same network
    if fs.from_scratch:
        # The fair test of the architecture: the winner's whole network trained from a fresh
        # initialisation with the original's recipe and steps (the fine-tunes start from weights
        # that the original's convolutions were trained with).
        tic = time.perf_counter()
        model = models["winner"][0]
        meta = {**stamp, "model": "winner_scratch"}

        def scratch():
            params = init_params(model, jax.random.PRNGKey(config.seed), config)
            return train_steps(model, params, config)

        ema = _finetuned(workdir / "finetune", "winner_scratch", meta, scratch)
        rows.append(
            {
                "model": f"winner, trained from scratch {original_step} steps",
                "held-out loss": losses["winner"](ema),
                "params": rows[2]["params"],
                "GFLOPs/image": rows[2]["GFLOPs/image"],
            }
        )
        images, _ = generate.generate_all(
            generate.make_generator(model, config), ema, config, config.sample.num_images
        )
        save_grid(images, workdir / "samples" / "winner_scratch.png")
        log(f"winner from scratch: trained and measured in {time.perf_counter() - tic:.1f} s")
        rows[0]["model"] = f"original, trained {original_step} steps (before fine-tuning)"
    (workdir / "winner.txt").write_text(str(graph) + "\n")
    (workdir / "winner.dot").write_text(graph.to_dot("winner"))
    rel_params, rel_flops = Constraints.from_config(config, kernel_shapes(config)).relative_cost(
        graph
    )
    done = {
        "stamp": stamp,
        "table": rows,
        "winner": {
            "hash": winner["hash"],
            "graph": str(graph),
            "ops": winner["ops"],
            "inputs": winner["inputs"],
            "sotl": winner["sotl"],
            "params_fraction_of_convs": rel_params,
            "flops_fraction_of_convs": rel_flops,
        },
        "samples": {
            name: f"samples/{name}.png"
            for name in [*models, *(["winner_scratch"] if fs.from_scratch else [])]
        },
    }
    write_atomic(path, json.dumps(done, indent=2) + "\n")
    log(format_table(rows, COLUMNS))
    log(str(graph))
    return done

"""The U-Net kernel search: a search killed mid-way resumes without repeating evaluations and ends
with the records of an uninterrupted one (generator and predictor guidance included); the whole
command on made-up data, and its re-run that reuses everything; clear errors for bad configs.

Glossary: Q picks per round, S SoTL-E steps.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import canvas_jax
from canvas_jax.graph import Space
from canvas_jax.sample import Constraints
from conftest import tiny_config
from nag import kernel_search as ks
from nag.search import RESULTS
from nag.sotl import SotlResult
from patchdiff.config import ConfigError

ROOT = pathlib.Path(__file__).parents[2]
SPACE = Space(ops=("fc", "dwconv3", "relu", "scale", "shift_h+1", "add"), max_nodes=5)
CONSTRAINTS = Constraints(min_primitives=2, max_primitives=4, shapes=((8, 8, 16),))


def settings(**search):
    """Small everything: 8 evaluations in rounds of 3, 3 and 2, the predictor ranking round 2."""
    return ks.Settings(
        search=ks.SearchSettings(
            **{"budget": 8, "proposals": 10, "per_round": 3, "min_fit": 4, **search}
        ),
        generator=ks.GeneratorSettings(
            train_graphs=32, hidden=16, layers=1, heads=2, steps=20, batch_size=16, num_steps=3
        ),
        predictor=ks.PredictorSettings(hidden=8, layers=1, heads=2, members=2, steps=10),
        sotl=ks.SotlSettings(steps=3, last=2, steps_per_call=3),
        finetune=ks.FinetuneSettings(),
    )


class Counted:
    """evaluate(graphs): a made-up SoTL-E (a function of the graph alone), counting the graphs
    it evaluates and dying once `die_after` were evaluated."""

    def __init__(self, die_after=None):
        self.calls, self.die_after = [], die_after

    def __call__(self, graphs):
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.calls += [g.canonical_hash() for g in graphs]
        scores = np.array([g.num_weighted - 0.1 * len(g) for g in graphs], np.float32)
        return SotlResult(scores, np.repeat(-scores[:, None] / 3, 3, 1), [8], 0.0)


class FakeGenerator:
    """`GraphDiffusion.generate`'s interface, drawing from the sampler: the search's wiring
    without fitting a diffusion model three times. Remembers which calls were guided."""

    def __init__(self):
        self.guided = []

    def generate(
        self,
        key,
        n,
        predictor=None,
        guidance=0.0,
        num_steps=32,
        sampler="heun",
        seen=(),
        check=None,
    ):
        self.guided.append(predictor is not None and guidance > 0)
        graphs = canvas_jax.sample(key, SPACE, CONSTRAINTS, n // 2, seen=set(seen))
        assert all(check(g) is None for g in graphs)
        return types.SimpleNamespace(
            graphs=graphs, valid_fraction=0.5, unique_fraction=1.0, novel_fraction=1.0
        )


def proxy(graphs):
    return np.array([CONSTRAINTS.relative_cost(g)[0] for g in graphs])


def strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_killed_search_resumes_without_repeating_evaluations(tmp_path):
    def run(where, evaluate, generator=None):
        return ks.search(
            tmp_path / where,
            SPACE,
            CONSTRAINTS,
            settings(),
            evaluate=evaluate,
            proxy_fn=proxy,
            generator=generator or FakeGenerator(),
            log=lambda line: None,
        )

    whole, generator = Counted(), FakeGenerator()
    expected = run("a", whole, generator)
    assert generator.guided == [False, False, True]  # guided once the predictor is fitted
    dying = Counted(die_after=6)  # dies at round 2's call: rounds 0 and 1 are recorded
    with pytest.raises(KeyboardInterrupt):
        run("b", dying)
    rest = Counted()
    resumed = run("b", rest)
    assert len(dying.calls) == 6 and len(rest.calls) == 2
    assert not set(dying.calls) & set(rest.calls)  # nothing evaluated twice
    assert strip(resumed) == strip(expected)
    assert [r["round"] for r in resumed] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert len({r["hash"] for r in resumed}) == 8
    assert {r["source"] for r in resumed} == {"generator", "sample"}
    assert resumed[-1]["predicted_mean"] is not None  # the predictor ranked the last round
    assert resumed[0]["predicted_mean"] is None  # the proxy ranked the first ones
    assert resumed[-1]["best_sotl"] == max(r["sotl"] for r in resumed)
    # A finished search on its folder evaluates nothing and returns the same records.
    again = Counted()
    assert strip(run("b", again)) == strip(expected) and not again.calls


def test_the_diffusion_generator_proposes_guided_graphs_once_the_predictor_is_fitted():
    s = settings(proposals=16, sampled_fraction=0.25)
    s = dataclasses.replace(
        s, generator=dataclasses.replace(s.generator, train_graphs=64, steps=100, num_steps=8)
    )
    lines = []
    proposer = ks.Proposer(SPACE, CONSTRAINTS, s, proxy, log=lines.append)
    graphs = canvas_jax.sample(5, SPACE, CONSTRAINTS, 4)
    history = [
        {"hash": g.canonical_hash(), "ops": g.ops, "inputs": g.inputs, "sotl": float(i)}
        for i, g in enumerate(graphs)
    ]
    picks = proposer.picks(1, history, count=16)
    assert any("generator: fitted on 64 sampled graphs" in line for line in lines)
    assert any("round 1: generator (guided) gave" in line for line in lines)
    assert {p.source for p in picks} == {"generator", "sample"}
    assert not {p.hash for p in picks} & {r["hash"] for r in history}
    assert all(CONSTRAINTS.check(p.graph, SPACE) is None for p in picks)
    ranks = [p.predicted_mean + 0.5 * p.predicted_std for p in picks]
    assert ranks == sorted(ranks, reverse=True)  # by mean + kappa std


def test_a_torn_line_is_redone_once(tmp_path):
    evaluate = Counted()
    common = dict(evaluate=evaluate, proxy_fn=proxy, generator=FakeGenerator(), log=print)
    one_round = settings(budget=3)
    first = ks.search(tmp_path, SPACE, CONSTRAINTS, one_round, **common)
    path = tmp_path / RESULTS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # the third record torn
    again = ks.search(tmp_path, SPACE, CONSTRAINTS, one_round, **common)
    assert evaluate.calls[3:] == [first[2]["hash"]]  # only the torn one is evaluated again
    assert strip(again) == strip(first)


def end_to_end_config(data_path):
    """The tiniest U-Net at 8x8 on an npz of made-up images, everything a step or two long."""
    from ml_collections_configs import kernel_search_fashion_mnist as ksf

    config = tiny_config(resolution=8, channel_mult=(1,), attn_resolutions=())
    config.data.source, config.data.path, config.data.channels = "npz", str(data_path), 1
    config.model.placeholders = ("conv1",)
    config.model.num_classes = 2
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size, config.train.total_steps = 8, 2
    config.train.log_every, config.train.checkpoint_every, config.train.sample_every = 1, 2, 0
    config.sample.steps, config.sample.num_images, config.sample.batch_size = 2, 4, 4
    config.kernel_search.max_nodes, config.kernel_search.min_primitives = 5, 2
    config.nag = ksf.nag_section()
    nag = config.nag
    nag.ops = ("fc", "dwconv3", "relu")  # a short template compiles quickly
    # One round of two evaluations, ranked by the proxy (the search tests cover the rest).
    nag.budget, nag.proposals, nag.per_round, nag.min_fit = 2, 6, 2, 2
    nag.pool, nag.proxy_images = 16, 4
    nag.generator.enabled = False
    nag.sotl.steps, nag.sotl.last, nag.sotl.steps_per_call, nag.sotl.batch_size = 2, 1, 2, 4
    nag.finetune.steps, nag.finetune.eval_examples, nag.finetune.eval_batch = 2, 8, 8
    return config


def test_the_whole_command_on_made_up_data_and_its_re_run(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (32, 8, 8), np.uint8), labels=rng.integers(0, 2, 32))
    config = end_to_end_config(data)
    lines = []
    report = ks.run(config, tmp_path / "run", log=lines.append)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "search" / RESULTS).open()]
    assert [r["round"] for r in records] == [0, 0] and records[0]["source"] == "sample"
    assert all(np.isfinite(r["sotl"]) and len(r["curve"]) == 2 for r in records)
    # jacov of every graph (NaN = flagged, as the barely trained original's zero output conv is)
    assert all("proxy" in r for r in records)
    assert report["winner"]["sotl"] == max(r["sotl"] for r in records)
    names = [row["model"] for row in report["table"]]
    assert names == [
        "original, trained 2 steps (before fine-tuning)",
        "original, fine-tuned 2 steps",
        "winner, fine-tuned 2 steps",
        "winner, trained from scratch 2 steps",
    ]
    assert all(np.isfinite(row["held-out loss"]) for row in report["table"])
    winner, original = report["table"][2], report["table"][1]
    assert winner["params"] != original["params"] and winner["GFLOPs/image"] > 0
    for name in (
        "report.json",
        "winner.txt",
        "winner.dot",
        "samples/original.png",
        "samples/winner.png",
        "samples/winner_scratch.png",
        "finetune/winner.msgpack",
        "finetune/winner_scratch.msgpack",
    ):
        assert (run / name).exists(), name
    # The re-run trains, evaluates and fine-tunes nothing: the same records and report.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    again = ks.run(config, run, log=lines.append)
    assert again == json.loads((run / "report.json").read_text()) == report
    changed = [p for p in run.rglob("*") if p.is_file() and p.stat().st_mtime_ns != stamps.get(p)]
    assert all("original" in p.parts for p in changed), changed  # the trainer's own logs


def test_bad_config_values_are_named():
    from ml_collections_configs import kernel_search_fashion_mnist as ksf

    cases = [
        ("nag.budget", 0, "config.nag.budget = 0 is not allowed: it must be a positive"),
        ("nag.proxy", "fisher", "config.nag.proxy = 'fisher' .* one of grad_norm, jacov"),
        ("nag.ops", ("fc", "conv9"), r"config.nag.ops = \('fc', 'conv9'\) .* names among fc,"),
        ("nag.sotl.last", 100, r"config.nag.sotl.last = 100 .* in 1..steps = 32"),
        ("nag.generator.heads", 3, "config.nag.generator.heads = 3 .* dividing hidden = 32"),
        ("nag.finetune.eval_batch", 900, "config.nag.finetune.eval_batch = 900 .* up to"),
        ("model.placeholders", (), r"config.model.placeholders = \(\) .* convolutions to replace"),
    ]
    for field, value, match in cases:
        config = ksf.get_config("runlocal")
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
        with pytest.raises(ConfigError, match=match):
            ks.read_settings(config)
    config = ksf.get_config("runlocal")
    config.nag.sotl.lr = 1.0
    with pytest.raises(ConfigError, match="config.nag.sotl.lr is not a known field"):
        ks.read_settings(config)
    del config.nag
    with pytest.raises(ConfigError, match="config.nag is missing"):
        ks.read_settings(config)


def test_the_command_line_stops_on_a_bad_field_in_one_sentence(tmp_path):
    command = [
        sys.executable, "-m", "nag.main",
        "--config", "ml_collections_configs/kernel_search_fashion_mnist.py:runlocal",
        "--workdir", str(tmp_path), "--config.nag.per_round=0",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "nag: config.nag.per_round = 0 is not allowed: it must be a positive integer."
    )
    assert not any(tmp_path.iterdir())  # nothing was started

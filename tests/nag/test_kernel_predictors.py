"""Predictor validation (`benchmarks/kernel_predictors.py`) on a tiny space, end to end: kernels
trained from scratch and measured by fd_fmnist, the predictors scored, the table and the prior
file written, a re-run that trains nothing; the baselines build and run as graphs; a search that
starts from a prior file and CANVAS's random search.
"""

import json
import types

import jax
import numpy as np
import pytest

import canvas_jax
from benchmarks import common
from benchmarks import kernel_predictors as kp
from benchmarks import kernel_search_report as ksr
from canvas_jax.baselines import BASELINES, apply_init
from conftest import tiny_config
from ml_collections_configs import kernel_search_fashion_mnist as ksf
from nag import kernel_search as ks
from nag.search import RESULTS
from patchdiff.models import init_params


def grey_search_config(tmp_path):
    """A 32x32 grey U-Net (P = 2) on 48 made-up images, everything a step or two long."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=np.arange(48) % 2)
    config = tiny_config(resolution=32, patch_size=2, channel_mult=(1,), attn_resolutions=())
    config.model.num_classes = 2
    config.data.source, config.data.channels = "npz", 1
    config.data.path = str(tmp_path / "data.npz")
    config.model.placeholders = ("conv1",)
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size, config.train.total_steps = 8, 16
    config.sample.steps, config.sample.num_images, config.sample.batch_size = 2, 8, 8
    config.eval.metrics, config.eval.sampler, config.eval.steps = ("fd_fmnist",), "euler", 2
    config.eval.ref_split = "train"
    config.kernel_search.max_nodes, config.kernel_search.min_primitives = 4, 2
    config.nag = ksf.nag_section()
    nag = config.nag
    nag.ops = ("fc", "dwconv3", "relu", "scale", "unfold3_avg", "add")
    nag.budget, nag.proposals, nag.per_round, nag.min_fit = 2, 6, 2, 2
    nag.pool, nag.proxy_images = 16, 4
    nag.generator.enabled = False
    nag.predictor.hidden, nag.predictor.members, nag.predictor.steps = 8, 2, 5
    nag.sotl.steps, nag.sotl.last, nag.sotl.steps_per_call, nag.sotl.batch_size = 4, 2, 2, 8
    nag.sotl.batching = "compiled"
    nag.finetune.steps, nag.finetune.eval_examples, nag.finetune.eval_batch = 2, 8, 8
    return config


def kp_sampled(count):
    return [f"sampled_{i:02d}" for i in range(count)]


def test_the_baselines_build_and_run_as_graphs():
    config = tiny_config(resolution=8, channel_mult=(1,), attn_resolutions=())
    config.model.placeholders = ("conv0", "conv1")
    for name, baseline in BASELINES.items():
        baseline.graph.validate(channels=16)
        model = canvas_jax.replace(config, baseline.graph)
        params = apply_init(
            init_params(model, jax.random.PRNGKey(0), config), baseline.graph, baseline.init
        )
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
        out = model.apply({"params": params}, x, jax.numpy.zeros(2))
        assert out.shape == x.shape and np.isfinite(np.asarray(out)).all(), name
    # PoolFormer's mixer starts as pool(x) - x: every scale node of the kernel at -1
    pool = BASELINES["poolformer"]
    model = canvas_jax.replace(config, pool.graph)
    params = apply_init(init_params(model, jax.random.PRNGKey(0), config), pool.graph, pool.init)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    scales = [v for path, v in flat if "scale_s" in jax.tree_util.keystr(path)]
    assert len(scales) == len(canvas_jax.get_placeholders(config))
    assert all((np.asarray(v) == -1).all() for v in scales)
    with pytest.raises(ValueError, match="no parameters of \\['relu'\\]"):
        apply_init(params, pool.graph, (("relu", 0.0),))


def test_the_validation_end_to_end_and_its_re_run(tmp_path, monkeypatch):
    config = grey_search_config(tmp_path)
    # two baselines keep it short: one of the space, one too big for it
    monkeypatch.setattr(
        kp, "BASELINES", {n: BASELINES[n] for n in ("depthwise_separable", "canvas_02311")}
    )
    args = kp.parse_args(
        ["--config", "unused", "--workdir", str(tmp_path / "kp"), "--sampled", "3",
         "--sotl-steps", "4", "--fd-samples", "8", "--folds", "2",
         "--out", str(tmp_path / "kp.json")]
    )  # fmt: skip
    lines = []
    payload = kp.run(config, args, log=lines.append)
    names = [row["kernel"] for row in payload["kernels"]]
    assert names == [kp.CONV, "depthwise_separable", "canvas_02311", *kp_sampled(3)]
    assert payload["kernels"][1]["flops_per_image"] < payload["kernels"][0]["flops_per_image"]
    for row in payload["kernels"]:
        assert np.isfinite(row["heldout_loss"]) and np.isfinite(row["fd_fmnist"]), row
    # canvas_02311 needs 8 nodes (the space has 4): trained, not scored
    assert any("canvas_02311 is not a graph of the search's space" in line for line in lines)
    labels = [row["predictor"] for row in payload["predictors"]]
    assert labels[:2] == ["jacov", "naswot"]
    assert "SoTL-E search S=2 E=1" in labels and "SoTL-E search S=4 E=2" in labels
    assert "SoTL-E scratch S=16 E=4" in labels and labels[-1].startswith("neural predictor")
    scored = payload["predictors"][-1]
    assert scored["kernels"] == len(names) - 2  # every graph of the space
    assert all(
        -1 <= scored[f"{c} {t}"] <= 1 for c in ("spearman", "kendall") for t in ("loss", "fd")
    )
    on_disk = json.loads((tmp_path / "kp.json").read_text())
    assert on_disk["predictors"] == json.loads(json.dumps(payload["predictors"]))
    prior = [json.loads(line) for line in (tmp_path / "kp" / "prior.jsonl").open()]
    assert [p["name"] for p in prior] == ["sampled_00", "sampled_01", "sampled_02"]
    assert all(len(p["curve"]) == 4 for p in prior)
    # A re-run reads every training and score back.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "kp").rglob("*") if p.is_file()}
    again = kp.run(config, args, log=lines.append)
    assert again["kernels"] == payload["kernels"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # The report: rows trained at a second seed beside the validation's; a winner that the
    # validation trained is reused under its name.
    for name, graph in (("random", prior[0]), ("nag", prior[1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({"winner": graph}))
    monkeypatch.setattr(ksr, "BASELINES", {"depthwise_separable": BASELINES["depthwise_separable"]})
    report_args = ksr.parse_args(
        ["--config", "unused", "--validation", str(tmp_path / "kp"), "--search",
         str(tmp_path / "nag"), "--random", str(tmp_path / "random"), "--fd-samples", "8",
         "--time-steps", "2", "--rounds", "1", "--out", str(tmp_path / "report.json"),
         "--figure", str(tmp_path / "report.png")]
    )  # fmt: skip
    report = ksr.run(config, report_args, log=lines.append)
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == [
        "3x3 convolution", "depthwise_separable", "random search's winner", "ours (nag)"
    ]  # fmt: skip
    assert all(row["seeds"] == 2 and len(row["fd_fmnists"]) == 2 for row in rows.values())
    assert rows["3x3 convolution"]["FLOPs vs conv"] == "1.000"
    assert float(rows["depthwise_separable"]["FLOPs vs conv"]) < 1
    assert (tmp_path / "kp" / "trained" / "sampled_00_seed1.json").exists()
    assert not list((tmp_path / "kp" / "trained").glob("*winner*"))
    if common.pyplot() is not None:  # matplotlib is optional (CI has none): the JSON says so
        assert (tmp_path / "report.png").stat().st_size > 10_000
    else:
        assert report["figure"] is None and not (tmp_path / "report.png").exists()

    # A search from that prior: its kernels are never evaluated again, the predictor ranks
    # round 0, and they do not count against the budget.
    config.nag.prior = str(tmp_path / "kp" / "prior.jsonl")
    settings = ks.read_settings(config)
    space = ks.search_space(config, settings.search)
    evaluated = []

    def evaluate(graphs):
        evaluated.extend(g.canonical_hash() for g in graphs)
        scores = np.array([-float(len(g)) for g in graphs])
        return types.SimpleNamespace(scores=scores, curves=np.zeros((len(graphs), 4)))

    constraints = ks.Constraints.from_config(config, ks.kernel_shapes(config))
    records = ks.search(
        tmp_path / "search", space, constraints, settings, evaluate=evaluate,
        proxy_fn=lambda graphs: np.zeros(len(graphs)), log=lines.append,
    )  # fmt: skip
    prior_hashes = {ks.graph_of(p).canonical_hash() for p in prior}
    assert len(records) == 2 and not prior_hashes & set(evaluated)
    assert all(r["predicted_mean"] is not None for r in records)  # fitted on the prior

    # A prior trained with other SoTL-E settings is refused by name.
    config.nag.sotl.learning_rate = 0.5
    with pytest.raises(ValueError, match="sotl.learning_rate = 0.001, this search's"):
        ks.read_prior(config.nag.prior, ks.read_settings(config).sotl, space)


def test_random_search_evaluates_sampler_draws_in_order(tmp_path):
    config = grey_search_config(tmp_path)
    config.nag.rank = "random"
    config.nag.budget = 4
    settings = ks.read_settings(config)
    space = ks.search_space(config, settings.search)
    constraints = ks.Constraints.from_config(config, ks.kernel_shapes(config))

    def evaluate(graphs):
        return types.SimpleNamespace(
            scores=np.arange(len(graphs), dtype=float), curves=np.zeros((len(graphs), 4))
        )

    def no_proxy(graphs):
        raise AssertionError("random search scores no proxy")

    records = ks.search(
        tmp_path / "rs", space, constraints, settings, evaluate=evaluate, proxy_fn=no_proxy,
        log=lambda line: None,
    )  # fmt: skip
    assert len(records) == 4 and all(r["source"] == "sample" for r in records)
    assert all(r["proxy"] is None and r["predicted_mean"] is None for r in records)
    again = ks.search(
        tmp_path / "rs", space, constraints, settings, evaluate=evaluate, proxy_fn=no_proxy,
        log=lambda line: None,
    )  # fmt: skip
    assert [r["hash"] for r in again] == [r["hash"] for r in records]
    assert (tmp_path / "rs" / RESULTS).read_text().count("\n") == 4


def test_the_shipped_prior_fits_its_config():
    """The validation's curves beside kernel_search_fashion_mnist.py were trained with its SoTL-E
    settings and are graphs of its space (a config change that breaks this is refused by name)."""
    config = ksf.get_config()
    settings = ks.read_settings(config)
    prior = ks.read_prior(
        settings.search.prior, settings.sotl, ks.search_space(config, settings.search)
    )
    assert len(prior) == 8 and all(r["sotl"] is not None for r in prior)
    assert len({r["hash"] for r in prior}) == 8

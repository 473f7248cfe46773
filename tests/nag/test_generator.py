"""The graph diffusion generator: valid samples after a short training (free edges and a fixed
layout), guidance that raises the predicted score, the free-edge decoder, the VE -> VP view the
predictor sees, clear errors, and the generator-based NB201 searcher (better than its start on a
learnable table, exact resumption)."""

import jax
import numpy as np
import pytest
from test_search import Counted, toy_table

from canvas_jax import nb201 as cells
from canvas_jax.graph import KernelGraph, Space
from canvas_jax.sample import Constraints, sample
from nag import generator, guided, nb201, nb201_generator
from nag.predictor_net import vp_alpha_sigma
from nag.predictors import NeuralPredictor, ProxyPrior
from nag.search import run_search

SMALL = Space(ops=("fc", "dwconv3", "relu", "shift_h+1", "add", "mul"), max_nodes=7)


@pytest.fixture(scope="module")
def free_generator():
    constraints = Constraints(
        min_primitives=2,
        max_primitives=6,
        max_weighted_fraction=1.0,
        params_band=(0.0, 10.0),
        flops_band=(0.0, 10.0),
        min_receptive_field=1,
        shapes=((8, 8, 16),),
    )
    graphs = sample(0, SMALL, constraints, 600)
    return generator.GraphDiffusion(SMALL, hidden=32, layers=2).fit(graphs, steps=800), graphs


@pytest.fixture(scope="module")
def cell_generator():
    rng = np.random.default_rng(0)
    graphs = [cells.cell_graph(nb201.random_cell(rng)) for _ in range(500)]
    return generator.GraphDiffusion(cells.NB201_SPACE, hidden=32, layers=2).fit(graphs, steps=500)


def test_free_edge_samples_are_valid_distinct_and_mostly_novel(free_generator):
    gen, graphs = free_generator
    assert gen.free_edges and gen.dims == 21 + 7 * 7
    assert gen.losses[-50:].mean() < 0.5 * gen.losses[:50].mean()
    out = gen.generate(jax.random.PRNGKey(0), 200, num_steps=16)
    assert out.valid_fraction >= 0.95
    assert len({g.canonical_hash() for g in out.graphs}) == len(out.graphs)
    for graph in out.graphs:
        graph.validate(space=SMALL)
    assert 0 < out.novel_fraction <= 1 and 0 < out.unique_fraction <= 1
    # seen graphs are left out of the result, and do not count as novel
    again = gen.generate(
        jax.random.PRNGKey(0), 200, num_steps=16, seen={g.canonical_hash() for g in out.graphs}
    )
    assert again.graphs == [] and again.novel_fraction == 0


def test_a_fixed_layout_is_kept_and_sampled_validly_as_thresholded(cell_generator):
    gen = cell_generator
    assert not gen.free_edges and gen.dims == 10 * len(cells.NB201_SPACE.columns)
    out = gen.generate(
        jax.random.PRNGKey(1), 200, num_steps=16, check=nb201_generator.layout_problem
    )
    assert out.valid_fraction >= 0.95 and out.exact_fraction >= 0.95
    ops = np.array([cells.cell_edge_ops(g) for g in out.graphs])  # every one an NB201 cell
    assert len(np.unique(ops)) == 5  # all five edge ops appear


def test_guidance_raises_the_predicted_score_of_samples(cell_generator):
    rng = np.random.default_rng(1)
    data = [nb201.random_cell(rng) for _ in range(64)]
    score = lambda batch: np.array([sum(op == 2 for op in c) for c in batch], float)  # noqa: E731
    predictor = NeuralPredictor(members=2, steps=150).fit(guided.encode_cells(data), score(data))
    means, truths = [], []
    for scale in (0.0, 3.0):  # stronger guidance trades validity: 76% valid at 10 here
        out = cell_generator.generate(
            jax.random.PRNGKey(2),
            128,
            predictor=predictor,
            guidance=scale,
            num_steps=16,
            check=nb201_generator.layout_problem,
        )
        batch = [cells.cell_edge_ops(g) for g in out.graphs]
        assert len(batch) >= 100
        means.append(predictor.predict(guided.encode_cells(batch))[0].mean())
        truths.append(score(batch).mean())
    assert means[1] > means[0] + 0.5  # conv edges per cell: 1.2 unguided, 2.2 guided
    assert truths[1] > truths[0] + 0.5


def test_decode_free_respects_arity_and_drops_dead_nodes():
    columns = SMALL.columns
    onehot = np.zeros((7, len(columns)), np.float32)
    adjacency = np.zeros((7, 7), np.float32)
    for node, op in enumerate(["input", "relu", "fc", "add"]):
        onehot[node, columns.index(op)] = 0.9
    adjacency[0, 1], adjacency[0, 2], adjacency[1, 2] = 0.8, 0.3, 0.6  # fc reads relu (0.6)
    adjacency[0, 3], adjacency[2, 3], adjacency[1, 3] = 0.7, 0.2, 0.1  # add reads 0 and fc
    graph = generator.decode_free(adjacency, onehot, SMALL)
    assert graph == KernelGraph(("input", "relu", "fc", "add"), ((), (0,), (1,), (0, 2)))
    adjacency[2, 3] = 0.0  # add now reads 0 and relu (0.1): fc is dead and dropped
    graph = generator.decode_free(adjacency, onehot, SMALL)
    assert graph == KernelGraph(("input", "relu", "add"), ((), (0,), (0, 1)))
    onehot[1] = 0
    onehot[1, columns.index("mul")] = 0.9  # a binary op at node 1 has no two inputs
    with pytest.raises(ValueError, match="needs 2 earlier nodes"):
        generator.decode_free(adjacency, onehot, SMALL)


def test_vp_view_matches_the_predictors_noise_schedule():
    sigma = np.array([0.01, 0.5, 2.0, 10.0], np.float32)
    a, o, t = generator.vp_view(np.ones((4, 3, 3)), np.ones((4, 3, 2)), sigma)
    alpha, vp_sigma = vp_alpha_sigma(t)
    np.testing.assert_allclose(alpha, 1 / np.sqrt(1 + sigma**2), rtol=1e-4)
    np.testing.assert_allclose(vp_sigma / alpha, sigma, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(a)[:, 0, 0], alpha, rtol=1e-6)


def test_bad_inputs_give_one_clear_error(cell_generator):
    gen = generator.GraphDiffusion(cells.NB201_SPACE)
    with pytest.raises(ValueError, match="call fit"):
        gen.sample(jax.random.PRNGKey(0), 4)
    with pytest.raises(ValueError, match="at least 2 KernelGraphs"):
        gen.fit([cells.cell_graph((0,) * 6)])
    with pytest.raises(ValueError, match="heads"):
        generator.GraphDiffusion(cells.NB201_SPACE, heads=1)
    with pytest.raises(ValueError, match="sampler = 'nope'"):
        cell_generator.sample(jax.random.PRNGKey(0), 4, sampler="nope")
    prior = ProxyPrior(lambda a, o: o.sum((1, 2)))
    with pytest.raises(ValueError, match="differentiable"):
        cell_generator.sample(jax.random.PRNGKey(0), 4, predictor=prior, guidance=1.0)


def _searcher(**options):
    defaults = dict(
        initial=6, queue=3, samples=64, steps=40, members=2, train_cells=300, generator_steps=300
    )
    return nb201_generator.GeneratorSearch(**(defaults | options))


def test_generator_search_improves_on_its_start_on_a_learnable_table():
    table, accuracy = toy_table()  # accuracy counts conv edges: optimum 6.0x
    oracle = nb201.Oracle(table, accuracy, budget=15)
    searcher = _searcher(prior=None, seed=0)
    history = nb201.run_search(searcher, oracle, np.random.default_rng(0))
    assert len({e.cell for e in history}) == 15
    assert history[-1].best > max(e.accuracy for e in history[:6])
    assert history[-1].best >= 5
    assert sum(is_guided for is_guided, _ in searcher.generated) == 3  # one per refit


def test_generator_search_resumes_exactly(tmp_path):
    whole = run_search(_searcher(seed=1), Counted(), tmp_path / "a", budget=12, seed=1)
    with pytest.raises(KeyboardInterrupt):
        run_search(_searcher(seed=1), Counted(die_after=8), tmp_path / "b", budget=12, seed=1)
    counted = Counted()
    resumed = run_search(_searcher(seed=1), counted, tmp_path / "b", budget=12, seed=1)
    assert [r["candidate"] for r in resumed] == [r["candidate"] for r in whole]
    assert len(counted.calls) == 4  # only the evaluations the killed run had not made


def test_the_generator_searcher_checks_its_options():
    with pytest.raises(ValueError, match="prior"):
        _searcher(prior="flops")
    with pytest.raises(ValueError, match="local"):
        _searcher(local=1.0)

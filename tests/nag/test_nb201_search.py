"""The NAS-Bench-201 search harness: the oracle's counting and budget, the searchers' contracts
(random never repeats, REA mutates one edge), monotone and reproducible histories, and the
benchmark's main on the real table with a tiny budget."""

import itertools
import json
import os
import pathlib

import numpy as np
import pytest

from benchmarks import nb201_search
from nag import nb201

DATA = pathlib.Path(
    os.environ.get("PATCHDIFF_SHARED_DATA", pathlib.Path(__file__).parents[3] / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (DATA / "nb201_val_accuracy.csv").exists(), reason=f"no NB201 data under {DATA}"
)
ALL_CELLS = np.array(list(itertools.product(range(5), repeat=6)), np.int32)  # [15625, 6]


def made_up_oracle(budget: int) -> nb201.Oracle:
    """A table where accuracy grows with the number of conv3x3 edges, plus a tie-breaking term
    from the cell code, so that every cell has its own accuracy and the optimum is known."""
    accuracy = 10.0 * np.sum(ALL_CELLS == 2, axis=1) + nb201.cell_code(ALL_CELLS) / 15625
    return nb201.Oracle(ALL_CELLS, accuracy, budget)


def test_oracle_counts_distinct_cells_and_enforces_budget():
    oracle = made_up_oracle(budget=3)
    first = oracle.query((0, 1, 2, 3, 4, 0))
    assert oracle.query(np.array([0, 1, 2, 3, 4, 0])) == first  # a repeat is free
    assert oracle.evaluations == 1
    oracle.query((2, 2, 2, 2, 2, 2))
    oracle.query((1, 1, 1, 1, 1, 1))
    assert oracle.exhausted and oracle.evaluations == 3
    with pytest.raises(nb201.BudgetExhausted):
        oracle.query((4, 4, 4, 4, 4, 4))
    assert oracle.query((2, 2, 2, 2, 2, 2)) == oracle.optimum  # still free after the budget
    assert [e.number for e in oracle.history] == [1, 2, 3]
    assert [e.best for e in oracle.history] == [first, oracle.optimum, oracle.optimum]
    assert oracle.history[1].cell == (2, 2, 2, 2, 2, 2)


def test_oracle_errors():
    with pytest.raises(ValueError, match="edge_ops"):
        made_up_oracle(3).query((0, 1, 2, 3, 5, 0))
    with pytest.raises(ValueError, match="edge_ops"):
        made_up_oracle(3).query((0, 1, 2))
    with pytest.raises(ValueError, match="budget"):
        made_up_oracle(0)
    with pytest.raises(ValueError, match="not in the table"):
        nb201.Oracle(ALL_CELLS[:10], np.zeros(10), 5).query((4, 4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="dataset"):
        nb201.dataset_name("mnist")
    assert nb201.dataset_name("ImageNet16-120") == "imagenet16_120"
    with pytest.raises(ValueError, match="searcher"):
        nb201.make_searcher("annealing")
    with pytest.raises(ValueError, match="sample"):
        nb201.make_searcher("rea", population=5, sample=6)


def test_random_search_never_repeats_a_cell():
    oracle = made_up_oracle(budget=300)
    searcher = nb201.make_searcher("random")
    rng = np.random.default_rng(0)
    proposals = []
    while not oracle.exhausted:
        proposals.append(searcher.propose(rng))
        searcher.observe(proposals[-1], oracle.query(proposals[-1]))
    assert len(proposals) == len(set(proposals)) == 300


def test_rea_mutation_changes_exactly_one_edge():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cell = nb201.random_cell(rng)
        child = nb201.mutate(cell, rng)
        assert sum(a != b for a, b in zip(cell, child, strict=True)) == 1
        assert all(0 <= o < 5 for o in child)


def test_rea_proposes_mutants_of_its_population_after_the_start():
    searcher = nb201.make_searcher("rea", population=4, sample=2)
    oracle = made_up_oracle(budget=40)
    rng = np.random.default_rng(1)
    for step in range(40):
        members = {cell for cell, _ in searcher.members}
        cell = searcher.propose(rng)
        if step >= 4:  # after the random start: one edge away from a member
            assert any(sum(a != b for a, b in zip(cell, m, strict=True)) == 1 for m in members)
        searcher.observe(cell, oracle.query(cell))
        assert len(searcher.members) == min(step + 1, 4)  # the oldest leaves
        assert searcher.members[-1][0] == cell


@pytest.mark.parametrize("name", ["random", "rea"])
def test_histories_are_monotone_and_deterministic_per_seed(name):
    histories = [nb201.search(name, made_up_oracle(budget=60), seed) for seed in (0, 0, 1)]
    assert histories[0] == histories[1]
    assert [e.cell for e in histories[0]] != [e.cell for e in histories[2]]
    for history in histories:
        curve = nb201.best_curve(history)
        assert len(history) == 60 and len({e.cell for e in history}) == 60
        assert np.all(np.diff(curve) >= 0)
        assert np.allclose(curve, np.maximum.accumulate([e.accuracy for e in history]))


def test_rea_beats_random_on_a_smooth_table():
    # On this table every conv3x3 edge adds 10 points, so one-edge mutations climb quickly.
    best = {
        name: np.mean([nb201.search(name, made_up_oracle(60), s)[-1].best for s in range(5)])
        for name in ("random", "rea")
    }
    assert best["rea"] > best["random"]


def test_expected_random_best_matches_sampling():
    accuracy = np.random.default_rng(0).normal(size=50)
    draws = np.random.default_rng(1).permuted(np.tile(accuracy, (20000, 1)), axis=1)[:, :5]
    assert nb201.expected_random_best(accuracy, 5) == pytest.approx(draws.max(1).mean(), abs=0.01)
    assert nb201.expected_random_best(accuracy, 1) == pytest.approx(accuracy.mean())
    assert nb201.expected_random_best(accuracy, 50) == pytest.approx(accuracy.max())


@needs_data
def test_benchmark_main_tiny_budget(tmp_path, capsys):
    out = tmp_path / "nb201_search.json"
    # random and REA only: ours trains its generator first (tests/nag/test_generator.py has it)
    args = ["--budget", "12", "--seeds", "2", "--searchers", "random", "rea", "--out", str(out)]
    nb201_search.main(args)
    payload = json.loads(out.read_text())
    assert payload["checkpoints"] == [10, 12]
    assert set(payload["curves"]) == {"cifar10", "cifar100", "imagenet16_120"}
    runs = np.array(payload["curves"]["cifar10"]["rea"])
    assert runs.shape == (2, 12) and np.all(np.diff(runs, axis=1) >= 0)
    assert payload["optima"]["cifar10"] == pytest.approx(91.57, abs=0.01)
    assert "random (exact)" in capsys.readouterr().out

"""NAS-Bench-201 as a search problem: an oracle that looks accuracies up in the table and counts
evaluations under a budget, and the baseline searchers (random search, regularised evolution)
behind the one interface that the predictor-guided generator plugs into as well.

Glossary: E = 6 edges of a cell, a cell = its 6 op indices (one per edge, the CSV's order, see
`canvas_jax.nb201`), M cells in the table (15625), T budget in evaluations, P population, S
tournament sample size.

The interface (`Searcher`): `propose(rng) -> cell` and `observe(cell, accuracy)`; `run_search`
alternates the two until the oracle's budget is spent. A searcher that thinks in batches (a
generator sampling many graphs, a predictor keeping the best few) keeps its own queue and hands
them out one per `propose`. New searchers register a factory in `SEARCHERS`:

    SEARCHERS.register("nag")(lambda **options: MySearcher(**options))

An evaluation is the first look-up of a distinct cell; looking up a cell again returns the
recorded accuracy for free (NB201's convention: the table stands for a training that was already
paid for). So REA may re-create a cell it has met before without spending budget.
"""

import inspect
import math
from collections import deque
from typing import NamedTuple, Protocol

import numpy as np

from canvas_jax import nb201
from patchdiff.registry import Registry

NUM_EDGES, NUM_OPS = len(nb201.EDGES), len(nb201.NB201_OPS)
NUM_CELLS = NUM_OPS**NUM_EDGES
_PLACES = NUM_OPS ** np.arange(NUM_EDGES - 1, -1, -1)  # base-5 digits, first edge most significant


class BudgetExhausted(RuntimeError):
    """Raised by `Oracle.query` for a new cell once the budget of evaluations is spent."""


class Evaluation(NamedTuple):
    """One paid evaluation: its number (1-based), the cell, its accuracy, the best so far."""

    number: int
    cell: tuple[int, ...]
    accuracy: float
    best: float


def as_cell(edge_ops) -> tuple[int, ...]:
    """The 6 op indices of `edge_ops` (any sequence or array of 6 ints in 0..4) as a tuple."""
    ops = np.asarray(edge_ops).reshape(-1)
    if ops.size != NUM_EDGES or not np.all((ops >= 0) & (ops < NUM_OPS)):
        raise ValueError(f"edge_ops: {NUM_EDGES} op indices in 0..{NUM_OPS - 1}; got {edge_ops}.")
    return tuple(int(o) for o in ops)


def cell_code(edge_ops) -> np.ndarray:
    """edge_ops [..., 6] -> the cells' base-5 codes [...] in 0..15624 (an index into all cells)."""
    return np.asarray(edge_ops, np.int64) @ _PLACES


def dataset_name(dataset: str) -> str:
    """The table's column for a dataset: "ImageNet16-120" and "imagenet16_120" are one."""
    name = dataset.lower().replace("-", "_")
    if name not in nb201.DATASETS:
        raise ValueError(f"dataset: {dataset!r} is not in the table; known: {nb201.DATASETS}.")
    return name


class Oracle:
    """query(edge_ops [6]) -> validation accuracy %, counting distinct cells against a budget.

    `history` lists every paid evaluation in order; `edge_ops` [M, 6] and `accuracy` [M] are the
    table (any subset of the cells, so that tests can use a made-up one).
    """

    def __init__(self, edge_ops, accuracy, budget: int):
        edge_ops, accuracy = np.asarray(edge_ops), np.asarray(accuracy, np.float64)
        if edge_ops.ndim != 2 or edge_ops.shape[1] != NUM_EDGES or len(edge_ops) != len(accuracy):
            raise ValueError(
                f"edge_ops: shape [M, {NUM_EDGES}] with M = len(accuracy); got "
                f"{edge_ops.shape} and {accuracy.shape}."
            )
        if budget < 1:
            raise ValueError(f"budget: at least 1 evaluation; got {budget}.")
        self.budget = int(budget)
        self._table = np.full(NUM_CELLS, np.nan)  # [5^6] accuracy by cell code, NaN: not in table
        self._table[cell_code(edge_ops)] = accuracy
        self.optimum = float(np.nanmax(self._table))
        self._seen: dict[tuple[int, ...], float] = {}
        self.history: list[Evaluation] = []

    @classmethod
    def from_nb201(cls, dataset: str, budget: int, path=None) -> "Oracle":
        """The oracle of one dataset's column of the NB201 CSV (default: the shared data)."""
        edge_ops, accuracies = nb201.load_nb201(path)
        return cls(edge_ops, accuracies[dataset_name(dataset)], budget)

    @property
    def evaluations(self) -> int:
        return len(self.history)

    @property
    def exhausted(self) -> bool:
        return self.evaluations >= self.budget

    @property
    def best(self) -> float:
        """The best accuracy evaluated so far (-inf before the first)."""
        return self.history[-1].best if self.history else -math.inf

    def seen(self, edge_ops) -> bool:
        """Whether this cell was already evaluated (so that looking it up is free)."""
        return as_cell(edge_ops) in self._seen

    def query(self, edge_ops) -> float:
        """The cell's accuracy; a new cell costs one evaluation, raising BudgetExhausted if none
        is left, and a cell already evaluated costs nothing."""
        cell = as_cell(edge_ops)
        if cell in self._seen:
            return self._seen[cell]
        if self.exhausted:
            raise BudgetExhausted(f"all {self.budget} evaluations are spent.")
        accuracy = float(self._table[cell_code(cell)])
        if math.isnan(accuracy):
            raise ValueError(f"edge_ops: the cell {cell} is not in the table.")
        self._seen[cell] = accuracy
        best = max(accuracy, self.best)
        self.history.append(Evaluation(self.evaluations + 1, cell, accuracy, best))
        return accuracy


def best_curve(history: list[Evaluation]) -> np.ndarray:
    """[T] best accuracy after 1..T evaluations of a history."""
    return np.array([e.best for e in history])


def expected_random_best(accuracy, n: int) -> float:
    """The exact expected best of n cells drawn without replacement from the table accuracy [M].

    With the values sorted a_1 <= ... <= a_M, the best of n is a_k with probability
    C(k-1, n-1) / C(M, n); summed in logs, so that M = 15625 does not overflow. This is the
    reference that random search's mean over seeds should approach.
    """
    values = np.sort(np.asarray(accuracy, np.float64))
    total = len(values)
    if not 1 <= n <= total:
        raise ValueError(f"n: between 1 and {total} (the table's cells); got {n}.")
    k = np.arange(n, total + 1)
    log_p = (
        _log_comb(k - 1, n - 1) - _log_comb(np.array(total), n)
        if n > 1
        else np.full(k.shape, -math.log(total))
    )
    return float(np.sum(np.exp(log_p) * values[k - 1]))


def _log_comb(a, b: int):
    lgamma = np.vectorize(math.lgamma)
    return lgamma(a + 1.0) - lgamma(b + 1.0) - lgamma(a - b + 1.0)


# -- searchers ----------------------------------------------------------------------------------


class Searcher(Protocol):
    """Proposes one cell at a time and learns from each accuracy it is told."""

    def propose(self, rng: np.random.Generator) -> tuple[int, ...]: ...

    def observe(self, cell: tuple[int, ...], accuracy: float) -> None: ...


SEARCHERS: Registry = Registry("searcher")


def random_cell(rng: np.random.Generator) -> tuple[int, ...]:
    """A cell with every edge's op drawn uniformly (every one of the 5^6 cells equally likely)."""
    return tuple(int(o) for o in rng.integers(NUM_OPS, size=NUM_EDGES))


@SEARCHERS.register("random")
class RandomSearch:
    """Uniform random search without replacement (NB201's "RS" baseline, Li & Talwalkar 2019):
    never proposes a cell twice, so every proposal spends one evaluation."""

    def __init__(self):
        self.proposed: set[tuple[int, ...]] = set()

    def propose(self, rng):
        if len(self.proposed) >= NUM_CELLS:
            raise RuntimeError("random search has proposed every cell of the space.")
        # Rejection: while few cells are taken, a draw is new with probability ~1.
        cell = random_cell(rng)
        while cell in self.proposed:
            cell = random_cell(rng)
        self.proposed.add(cell)
        return cell

    def observe(self, cell, accuracy):
        # It learns nothing but which cells are taken: replaying observations into a fresh
        # searcher (nag.search resuming a run) must leave it as the proposals did.
        self.proposed.add(as_cell(cell))


def mutate(cell, rng: np.random.Generator) -> tuple[int, ...]:
    """The cell with one edge, drawn uniformly, given an op drawn uniformly from the other four
    (Real et al. 2019's op mutation; NB201 has no hidden-state mutation since every edge exists)."""
    ops = list(as_cell(cell))
    edge = int(rng.integers(NUM_EDGES))
    # Draw from 0..3 and skip over the current op: uniform over the other four.
    new = int(rng.integers(NUM_OPS - 1))
    ops[edge] = new + (new >= ops[edge])
    return tuple(ops)


@SEARCHERS.register("rea")
class RegularizedEvolution:
    """Regularised evolution (Real et al. 2019, "aging evolution", Algorithm 1).

    The first `population` proposals are random cells (without replacement); afterwards each
    proposal mutates the best of `sample` members drawn at random from the population, and each
    observed cell joins the population while the oldest member leaves (age, not fitness, decides
    who dies: the regularisation). Defaults P = 10, S = 5: NB201's own REA uses P = 10, S = 3
    (Dong & Yang 2020, xautodl `R-EA.sh`); over 100 seeds at a budget of 100 (benchmarks/
    nb201_search.py), S = 5 was ahead of S = 3 at every budget >= 20 on all three datasets, and
    P = 10 ahead of P = 20 and 30 up to 50 evaluations, so the baseline is the stronger of the
    usual settings. NASLib's NB201 default P = 100, S = 10 suits budgets of several hundred: at a
    budget of 100 it is random search (its population never leaves the random start).
    """

    def __init__(self, population: int = 10, sample: int = 5):
        if population < 2:
            raise ValueError(f"population: at least 2; got {population}.")
        if not 1 <= sample <= population:
            raise ValueError(f"sample: between 1 and population = {population}; got {sample}.")
        self.sample = sample
        self.members: deque[tuple[tuple[int, ...], float]] = deque(maxlen=population)
        self._initial = RandomSearch()

    def propose(self, rng):
        if len(self.members) < self.members.maxlen:
            return self._initial.propose(rng)
        picked = rng.choice(len(self.members), size=self.sample, replace=False)
        parent = max((self.members[i] for i in picked), key=lambda member: member[1])
        return mutate(parent[0], rng)

    def observe(self, cell, accuracy):
        self.members.append((as_cell(cell), float(accuracy)))  # a full deque drops its oldest


def make_searcher(name: str, **options) -> Searcher:
    """A searcher from its registered name and its options (e.g. population=10 for "rea")."""
    return SEARCHERS.get(name, "searcher")(**options)


def run_search(
    searcher: Searcher, oracle: Oracle, rng: np.random.Generator, max_free: int = 10_000
) -> list[Evaluation]:
    """Propose, look up, observe, until the oracle's budget is spent; returns its history.

    Proposals of cells already evaluated are free, so a searcher stuck on them would loop for
    ever: after `max_free` free proposals in a row this stops with a RuntimeError.
    """
    free = 0
    while not oracle.exhausted:
        cell = searcher.propose(rng)
        paid = not oracle.seen(cell)
        searcher.observe(cell, oracle.query(cell))
        free = 0 if paid else free + 1
        if free > max_free:
            raise RuntimeError(
                f"{type(searcher).__name__} proposed {max_free} evaluated cells in a row after "
                f"{oracle.evaluations} evaluations."
            )
    return oracle.history


def search(name: str, oracle: Oracle, seed: int, **options) -> list[Evaluation]:
    """Runs the searcher called `name` (with `options`) on `oracle` from numpy seed `seed`; a
    searcher whose constructor takes a `seed` (its own keys: predictor, generator) gets it too."""
    return run_search(seeded_searcher(name, seed, **options), oracle, np.random.default_rng(seed))


def seeded_searcher(name: str, seed: int, **options) -> Searcher:
    """`make_searcher`, passing `seed` to a searcher whose constructor takes one."""
    if "seed" in inspect.signature(SEARCHERS.get(name, "searcher")).parameters:
        options = {"seed": seed, **options}
    return make_searcher(name, **options)

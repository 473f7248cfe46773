"""Predictor-guided search on NAS-Bench-201: a neural predictor ranks a pool of nearby and random
cells and the best by an upper confidence bound are evaluated next (in the spirit of BANANAS,
White et al. 2021). A stand-in for "ours" until the graph diffusion generator proposes the pool.

Glossary: E = 6 edges, a cell = its 6 op indices, P pool size, Q cells queued per refit.
"""

import functools

import jax
import numpy as np

from canvas_jax import nb201 as cells
from nag import nb201
from nag.predictors import NeuralPredictor, encode_graphs


@functools.cache
def shared_predictor(steps: int, members: int) -> NeuralPredictor:
    """One predictor per setting for the whole process: its jitted training compiles once per
    padded data size, not once per refit or per search (a benchmark runs 30 searches). Sharing
    is safe: every refit trains from a key set by the searcher and fresh initial parameters."""
    return NeuralPredictor(steps=steps, members=members)


def encode_cells(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canvas_jax encodings of NB201 cells (adjacency, onehot, features), stacked."""
    return encode_graphs([cells.cell_graph(c) for c in batch], cells.NB201_SPACE)


@nb201.SEARCHERS.register("predictor")
class PredictorSearch:
    """`initial` random cells, then, every `queue` evaluations, refit the ensemble on all observed
    cells and queue the `queue` unseen cells of a pool (one- and two-edge mutations of the best
    `parents` cells, plus random cells) with the highest mean + kappa * std."""

    def __init__(
        self,
        initial: int = 10,
        queue: int = 5,
        pool: int = 400,
        parents: int = 10,
        kappa: float = 0.5,
        steps: int = 150,
        members: int = 3,
        seed: int = 0,
    ):
        if initial < 2 or queue < 1 or pool < queue:
            raise ValueError(
                f"PredictorSearch: initial >= 2, queue >= 1, pool >= queue; got "
                f"{initial}, {queue}, {pool}."
            )
        self.initial, self.queue_size, self.pool, self.parents = initial, queue, pool, parents
        self.kappa, self.steps, self.members, self.seed = kappa, steps, members, seed
        self.random = nb201.RandomSearch()
        self.observed: dict[tuple[int, ...], float] = {}  # in order of first observation
        self.queue: list[tuple[int, ...]] = []
        self.epoch = -1
        self.predictor = shared_predictor(steps, members)

    def propose(self, rng):
        if len(self.observed) < self.initial:
            return self._initial_proposal(rng)
        # The queue of epoch e is a function of the first initial + e * queue observations and
        # of e alone, never of the proposal rng: replaying observations into a fresh searcher
        # (a resumed search) rebuilds the very queue the first run was working through.
        epoch = (len(self.observed) - self.initial) // self.queue_size
        if epoch != self.epoch:
            self.epoch = epoch
            data = list(self.observed)[: self.initial + epoch * self.queue_size]
            self.queue = self._rank(data, np.random.default_rng([self.seed, epoch]))
        for cell in self.queue:
            if cell not in self.observed:
                return cell
        return self.random.propose(rng)  # the epoch's queue is used up by free re-proposals

    def _initial_proposal(self, rng):
        return self.random.propose(rng)

    def observe(self, cell, accuracy):
        self.random.observe(cell, accuracy)
        self.observed.setdefault(nb201.as_cell(cell), float(accuracy))

    def _rank(self, data, rng):
        predictor = self.predictor
        predictor.key = jax.random.PRNGKey(int(rng.integers(2**31)))  # a function of the epoch
        predictor.fit(encode_cells(data), np.array([self.observed[c] for c in data]))
        pool = sorted(self._pool(data, rng))
        mean, std = predictor.predict(encode_cells(pool))
        order = np.argsort(-(mean + self.kappa * std), kind="stable")
        return [pool[i] for i in order[: self.queue_size]]

    def _pool(self, data, rng) -> set:
        """`pool` unseen cells: one- and two-edge mutations of the best, and random cells."""
        best = sorted(data, key=self.observed.get, reverse=True)[: self.parents]
        taken, pool = set(data), set()
        while len(pool) < self.pool:
            if rng.random() < 0.8:
                child = nb201.mutate(best[int(rng.integers(len(best)))], rng)
                if rng.random() < 0.5:
                    child = nb201.mutate(child, rng)
            else:
                child = nb201.random_cell(rng)
            if child not in taken:
                pool.add(child)
        return pool

"""The search loop, checkpointed and resumable: propose -> evaluate -> observe, with budgets in
evaluations and seconds, and a results file holding every evaluated candidate, its score and the
running best.

Glossary: T budget in evaluations, a candidate = anything JSON can hold (an NB201 cell's 6 op
indices, a kernel graph's ops and inputs), a record = one observed proposal.

`workdir/results.jsonl` gets one line per observation, appended and fsynced before the next
proposal: {"step", "candidate", "value", "paid", "evaluations", "best", "seconds"}. "paid" marks a
new candidate's evaluation; a candidate proposed again is observed with its recorded value for
free. A search killed at any point resumes from the file: every recorded observation is replayed
into a fresh searcher (`observe` only), so its state is what it was, and proposal k after e paid
evaluations draws from `default_rng([seed, e, k])`, so the resumed search makes exactly the
proposals the uninterrupted one would have made, and evaluates nothing twice. A line cut short by
a crash is dropped (that evaluation is done again, once).
"""

import json
import os
import pathlib
import time
from collections.abc import Callable

import numpy as np

RESULTS = "results.jsonl"


def read_records(workdir) -> list[dict]:
    """The complete records of `workdir/results.jsonl` (a torn last line is left out)."""
    path = pathlib.Path(workdir) / RESULTS
    if not path.exists():
        return []
    records, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # cut short by a crash while writing: the evaluation is redone
            raise ValueError(
                f"{path}: line {number} is not a record; the file is damaged."
            ) from err
        records.append(record)
    return records


def write_atomic(path: pathlib.Path, text: str | bytes) -> None:
    """Writes beside `path`, syncs, then renames over it: a reader sees the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def open_records(workdir) -> tuple[pathlib.Path, list[dict]]:
    """(workdir/results.jsonl, its complete records), the workdir made and a torn last line
    dropped from the file, so that appending continues after the last complete record."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / RESULTS
    records = read_records(workdir)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.exists() and path.read_text() != text:
        write_atomic(path, text)
    return path, records


def append_record(out, record: dict) -> None:
    """One record as a line of the open results file, on disk before this returns."""
    out.write(json.dumps(record) + "\n")
    out.flush()
    os.fsync(out.fileno())


def run_search(
    searcher,
    evaluate: Callable,
    workdir,
    *,
    budget: int,
    seconds: float | None = None,
    seed: int = 0,
    to_candidate: Callable = tuple,
    max_free: int = 10_000,
) -> list[dict]:
    """Runs `searcher` (propose(rng) -> candidate, observe(candidate, value)) until `budget` paid
    evaluations or `seconds` of search time (summed over resumed runs); returns all records.

    evaluate(candidate) -> float, higher is better, called once per distinct candidate ever.
    to_candidate turns a candidate read back from JSON (lists) into what the searcher proposes.
    """
    if budget < 1:
        raise ValueError(f"budget: at least 1 evaluation; got {budget}.")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds: a positive time budget or None; got {seconds}.")
    path, records = open_records(workdir)
    known, best, spent = {}, -np.inf, 0.0
    for record in records:  # replay: the searcher's state as it was
        candidate = to_candidate(record["candidate"])
        searcher.observe(candidate, record["value"])
        known[candidate] = record["value"]
        best, spent = record["best"], record["seconds"]
    evaluations = sum(r["paid"] for r in records)
    free = 0  # free proposals since the last paid one: part of the next proposal's seed
    while free < len(records) and not records[-1 - free]["paid"]:
        free += 1
    start = time.perf_counter() - spent
    with path.open("a") as out:
        while evaluations < budget and (seconds is None or time.perf_counter() - start < seconds):
            rng = np.random.default_rng([seed, evaluations, free])
            candidate = to_candidate(searcher.propose(rng))
            paid = candidate not in known
            if paid:
                known[candidate] = float(evaluate(candidate))
                evaluations += 1
            value = known[candidate]
            best = max(best, value)
            searcher.observe(candidate, value)
            record = {
                "step": len(records) + 1,
                "candidate": list(candidate),
                "value": value,
                "paid": paid,
                "evaluations": evaluations,
                "best": best,
                "seconds": time.perf_counter() - start,
            }
            append_record(out, record)
            records.append(record)
            free = 0 if paid else free + 1
            if free > max_free:
                raise RuntimeError(
                    f"{type(searcher).__name__} proposed {max_free} evaluated candidates in a "
                    f"row after {evaluations} evaluations."
                )
    return records


def best_so_far(records: list[dict]) -> np.ndarray:
    """[T] the best value after each paid evaluation."""
    return np.array([r["best"] for r in records if r["paid"]])

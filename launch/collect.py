"""One table of a sweep's trials: their overrides and their final metrics.

    python -m launch.collect runs/sweep [--json out.json] [--csv out.csv] [--sort METRIC]

For every ROOT/NAME/ holding trial.json or metrics.jsonl (launch.sweep's trials, or any
patchdiff workdir): one column per swept key (keys with the same value in every trial are printed
once above the table), `status` (from trial.json: running, exit N, or not started), the last
step, the final loss (the mean over the last report's steps), img/s, every evaluation metric in
metrics.jsonl (`fd_fmnist@5k`: the latest value; `best fd_fmnist@5k`: the lowest, the highest for
precision and recall) and `--mode eval`'s newest WORKDIR/eval/step_N.json (`eval fid@50k`: the
best of its seed ranges, `eval objective`). A missing or garbled file is named in the `notes`
column of its trial; it never stops the table. `--sort fd_fmnist@5k` sorts by a column, lowest
first (`--sort=-img/s`: highest first); trials without that value go last.
"""

import argparse
import csv
import json
import pathlib
import re
import sys

from patchdiff.tables import format_table

HIGHER_IS_BETTER = ("precision", "recall")
NUMBER = re.compile(r"step_(\d+)\.json")


class CollectError(ValueError):
    """A command-line input that is not allowed."""


def _read_json(path: pathlib.Path, notes: list[str]):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} unreadable ({type(e).__name__})")
        return None


def read_metrics(path: pathlib.Path, notes: list[str]) -> dict:
    """metrics.jsonl -> {"step", "loss", "img/s", metric: latest, "best " + metric: best}."""
    out, bad = {}, 0
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        notes.append(f"metrics.jsonl unreadable ({type(e).__name__})")
        return out
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            bad += line.strip() != ""  # a line cut by a crash, or not ours
            continue
        out["step"] = max(step, out.get("step", step))
        if "loss" in record:  # a training report: the mean over its window of steps
            out["loss"] = record["loss"]
            out["img/s"] = record.get("img_per_s")
        for key, value in record.items():
            if "@" not in key or not isinstance(value, (int, float)):
                continue  # evaluation metrics carry their sample count: fid@50k
            out[key] = value
            better = max if key.startswith(HIGHER_IS_BETTER) else min
            out[f"best {key}"] = better(value, out.get(f"best {key}", value))
    if bad:
        notes.append(f"{bad} garbled line(s) in metrics.jsonl skipped")
    return out


def read_eval(workdir: pathlib.Path, notes: list[str]) -> dict:
    """The newest --mode eval result: {"eval step", "eval objective", "eval " + metric}."""
    found = sorted(
        (int(m.group(1)), p)
        for p in (workdir / "eval").glob("step_*.json")
        if (m := NUMBER.fullmatch(p.name))
    )
    if not found:
        return {}
    step, path = found[-1]
    result = _read_json(path, notes)
    if not isinstance(result, dict):
        return {}
    out = {"eval step": step, "eval objective": result.get("objective")}
    quality = result.get("sample_quality") or {}
    for key, value in (quality.get("best") or {}).items():
        out[f"eval {key}"] = value
    return out


def status(record: dict | None, step: int | None) -> str:
    if record is None:
        return "-"  # a workdir that launch.sweep did not start
    runs = record.get("runs") or []
    if not runs:
        return "not started"
    last = runs[-1]
    code, total = last.get("exit_code"), last.get("total_steps")
    if code is not None:
        return "done" if code == 0 else f"failed (exit {code})"
    if total and step is not None and step >= total:
        return "done"  # an srun or xmanager run, whose exit the record does not see
    if last.get("via"):
        return f"started ({last['via']})"  # their logs tell the rest
    return "running"  # or killed without a word: trial.json cannot tell


def collect(root) -> list[dict]:
    """One row per trial: {"name", "status", "overrides": {...}, metric columns..., "notes"}."""
    root = pathlib.Path(root)
    rows = []
    for workdir in sorted(p for p in root.iterdir() if p.is_dir()):
        has_record = (workdir / "trial.json").is_file()
        has_metrics = (workdir / "metrics.jsonl").is_file()
        if not (has_record or has_metrics):
            continue
        notes = []
        record = _read_json(workdir / "trial.json", notes) if has_record else None
        if record is not None and not isinstance(record, dict):
            notes.append("trial.json is not an object")
            record = None
        metrics = read_metrics(workdir / "metrics.jsonl", notes) if has_metrics else {}
        row = {"name": workdir.name, "status": status(record, metrics.get("step"))}
        row["index"] = (record or {}).get("index")
        row["overrides"] = _overrides(record.get("args") or []) if record else None
        row |= metrics | read_eval(workdir, notes)
        row["notes"] = "; ".join(notes)
        rows.append(row)
    rows.sort(key=lambda r: (r["index"] is None, r["index"] or 0, r["name"]))
    return rows


def _overrides(args: list[str]) -> dict:
    """["--config.train.lr=0.0003"] -> {"train.lr": "0.0003"}, as rendered on the command line."""
    out = {}
    for arg in args:
        if isinstance(arg, str) and arg.startswith("--config.") and "=" in arg:
            key, value = arg.removeprefix("--config.").split("=", 1)
            out[key] = value
    return out


def table(rows: list[dict]) -> tuple[list[dict], list[str], dict]:
    """Flat rows, their columns (swept keys first), and the keys every trial sets alike."""
    known = [r["overrides"] for r in rows if r["overrides"] is not None]  # trial.json read
    keys = list(dict.fromkeys(k for o in known for k in o))
    swept = [k for k in keys if len({o.get(k) for o in known}) > 1 or len(known) == 1]
    same = {k: known[0][k] for k in keys if k not in swept}
    metrics = list(
        dict.fromkeys(k for r in rows for k in r if k not in ("name", "overrides", "index"))
    )
    metrics.remove("notes")
    metrics.remove("status")
    columns = ["name", "status", *swept, *metrics, "notes"]
    flat = [
        {**(r["overrides"] or {}), **{k: v for k, v in r.items() if k != "overrides"}} for r in rows
    ]
    for r in flat:  # a cell with nothing says so
        for c in columns:
            if r.get(c) is None:
                r[c] = "-" if c != "notes" else ""
    return flat, columns, same


def sort_rows(flat: list[dict], columns: list[str], metric: str) -> list[dict]:
    descending = metric.startswith("-")
    name = metric.removeprefix("-")
    if name not in columns:
        raise CollectError(f"--sort {metric}: no such column; the columns: {', '.join(columns)}.")

    def number(value):  # overrides are as rendered: "0.001" sorts as 0.001
        try:
            return float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            return None

    have = [r for r in flat if number(r[name]) is not None]
    rest = [r for r in flat if number(r[name]) is None]
    return sorted(have, key=lambda r: number(r[name]), reverse=descending) + rest


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CollectError(f"{message} (python -m {self.prog} --help lists the options).")


def main(argv=None) -> int:
    p = _Parser(prog="launch.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the sweep's --root")
    p.add_argument("--json", help="write every row, with all its overrides, as JSON")
    p.add_argument("--csv", help="write the table as CSV")
    p.add_argument("--sort", help="a column to sort by (lowest first; -COLUMN: highest first)")
    try:
        args = p.parse_args(argv)
        root = pathlib.Path(args.root)
        if not root.is_dir():
            raise CollectError(f"{root} is not a directory (the --root of a sweep).")
        rows = collect(root)
        if not rows:
            raise CollectError(f"{root} holds no trial (no */trial.json or */metrics.jsonl).")
        flat, columns, same = table(rows)
        if args.sort:
            flat = sort_rows(flat, columns, args.sort)
    except CollectError as e:
        print(f"launch.collect: {e}", file=sys.stderr)
        return 2
    if same:
        print("every trial: " + " ".join(f"{k}={v}" for k, v in same.items()))
    print(format_table(flat, columns))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(flat)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the benchmark scripts: timing, the environment record, and JSON output.

Timing follows the usual rules for asynchronous dispatch: compile and warm up first, block on
every result, report the median of many runs (and the spread), never a single run.
"""

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax

RESULTS = pathlib.Path(__file__).parent / "results"


def time_fn(fn, *args, warmup: int = 2, iters: int = 10, reps: int = 1) -> dict:
    """Seconds per call of `fn(*args)`: {"median", "min", "max", "compile"}; blocks on results.

    The first call (compilation included) is timed apart as "compile". With reps > 1 each sample
    dispatches `reps` calls back to back and blocks on the last, so that calls of tens of
    microseconds are not measured as the host's dispatch latency.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(reps - 1):
            fn(*args)
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) / reps)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "compile": compile_s,
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=pathlib.Path(__file__).parent,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=pathlib.Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> dict:
    """Where and when a benchmark ran: device, versions, date, commit."""
    device = jax.devices()[0]
    kind = cpu_model() if device.platform == "cpu" else device.device_kind
    return {
        "device": f"{device.platform}: {kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
    }


def write_json(name: str, payload: dict, out: str | None = None) -> pathlib.Path:
    """Writes `payload` to `out`, or benchmarks/results/NAME.json; returns the path.

    The file is written beside its final name and renamed, so a crash never leaves half a file
    where an earlier result was.
    """
    path = pathlib.Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def merge_measured(path, section: str, where: str, entries: dict, key, dtype: str, script: str):
    """Writes device class `where`'s `entries` ({key(entry): entry}) into the `section` table of
    kernels/measured.json ("devices" for global attention, "neighborhood"), which `impl="auto"`
    reads: earlier entries of the same key and dtype are replaced, the rest and the other tables
    kept, and the file replaced atomically. Returns the path."""
    path = pathlib.Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault("devices", {})  # kernels.attention indexes it without a default
    env = environment()
    old = table.setdefault(section, {}).get(where, {}).get("entries", [])
    kept = [e for e in old if key(e) not in entries or e["dtype"] != dtype]
    table[section][where] = {
        "device": env["device"],
        "date": env["date"],
        "commit": env["commit"],
        "command": "python -m " + " ".join([script, *sys.argv[1:]]),
        "entries": kept + list(entries.values()),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(path)
    return path


def pyplot():
    """matplotlib.pyplot drawing to files (no display on a server), or None where matplotlib is
    not installed: the plots are optional, the JSON holds every figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: pathlib.Path) -> None:
    """Writes `fig` as a PNG at `path` (folders made) and frees it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

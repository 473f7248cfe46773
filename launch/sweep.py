"""Sweeps over config overrides, and a local runner for them.

A sweep is a Python file whose `get_sweep()` returns a `Sweep` built from five functions:

    from launch.sweep import chain, fixed, product, sweep, trial, zip_

    def get_sweep():
        return product(
            fixed({"train.total_steps": 2000}),        # in every trial, not in the names
            sweep("train.lr", [1e-3, 3e-4]),            # one key, several values
            zip_(sweep("train.batch_size", [32, 64]),   # side by side, equal lengths
                 sweep("train.ema_halflife_img", [5000, 10000])),
        )                                               # chain(a, b): a's trials, then b's

Keys are config paths WITHOUT the `config.` prefix (`"train.lr"`, as ml_collections'
`config_path` names them); `"config.train.lr"` is refused. Values are Python bools, ints, floats,
strings and tuples of them, rendered to what ml_collections' command-line parser reads back:
`--config.train.lr=0.0003`, `--config.model.channel_mult=(1,2,2)`, `--config.distributed=True`.

Every trial runs `python -m patchdiff.main --config CFG --workdir ROOT/NAME --config.K=V ...`.
NAME is `trial(NAME, ...)`'s, else made from the trial's overrides (`lr=0.0003,batch_size=32`:
the last part of each key, the whole key where two would clash; characters [A-Za-z0-9._=,+-]).
Names must be unique. ROOT/NAME/trial.json records the overrides, the config and each run's
command and exit code; ROOT/NAME/log.txt collects the trial's output. Running the same sweep
again resumes every trial (patchdiff.main resumes from the newest checkpoint).

    python -m launch.sweep --sweep launch/sweeps/fmnist_lr_batch.py \
        --config ml_collections_configs/fashion_mnist.py --root runs/sweep \
        [--parallel N] [--devices 0,1,2,3] [--dry-run] [--list] [--index I [--exec]] \
        [-- extra patchdiff.main args]

`--index I` runs trial I alone (a Slurm array task: `--index $SLURM_ARRAY_TASK_ID`); with
`--exec` this process becomes that trial's patchdiff.main, so that srun's signals and output
reach it directly (launch/slurm.py renders that).
"""

import argparse
import datetime
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SCALARS = (bool, int, float, str)
NAME_CHARS = re.compile(r"[A-Za-z0-9._=,+-]+")
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
REPO = str(pathlib.Path(__file__).resolve().parents[1])
MAX_DERIVED_NAME = 120  # directory names stay far below the 255 bytes filesystems allow


class SweepError(ValueError):
    """A sweep, or the command line that runs it, holds something not allowed."""


# ---------------------------------------------------------------------------- the language


@dataclass(frozen=True)
class Trial:
    """One run: overrides in the order they were given; `name` from trial(); `hidden`: keys the
    derived name leaves out (fixed() keys, and those a trial() name stands for)."""

    overrides: tuple[tuple[str, object], ...] = ()
    name: str | None = None
    hidden: frozenset = frozenset()

    def __add__(self, other: "Trial") -> "Trial":
        clash = set(dict(self.overrides)) & set(dict(other.overrides))
        if clash:
            raise SweepError(
                f"key {sorted(clash)[0]!r} is set by two parts of one trial (product or zip_ "
                "of sweeps that share a key); set each key in one part only."
            )
        names = [n for n in (self.name, other.name) if n]
        return Trial(
            self.overrides + other.overrides,
            ",".join(names) if names else None,
            self.hidden | other.hidden,
        )


class Sweep(tuple):
    """An ordered tuple of Trials; build it with sweep, fixed, trial, product, zip_, chain."""

    def __repr__(self):
        return f"Sweep({list(self)!r})"


def _check_key(key) -> str:
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise SweepError(f"sweep key {key!r} is not a config path such as 'train.lr'.")
    if key.startswith("config."):
        raise SweepError(
            f"sweep key {key!r}: write config paths without the 'config.' prefix, "
            f"as {key.removeprefix('config.')!r}."
        )
    return key


def _check_value(key: str, value):
    ok = isinstance(value, SCALARS) or (
        isinstance(value, tuple) and all(_check_value(key, v) is not None for v in value)
    )
    if not ok or (isinstance(value, float) and value != value):
        raise SweepError(
            f"sweep value {value!r} of {key!r} is not allowed: use a bool, int, float, str or a "
            "tuple of them (ml_collections' command line has no lists, dicts or None)."
        )
    return value


def _overrides(mapping) -> tuple[tuple[str, object], ...]:
    if not isinstance(mapping, Mapping):
        raise SweepError(f"overrides must be a dict such as {{'train.lr': 3e-4}}, not {mapping!r}.")
    return tuple((_check_key(k), _check_value(k, v)) for k, v in mapping.items())


def sweep(key: str, values: Sequence) -> Sweep:
    """One trial per value of `key`: sweep("train.lr", [1e-3, 3e-4])."""
    _check_key(key)
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise SweepError(f"sweep({key!r}, ...) needs a list of values, not {values!r}.")
    return Sweep(Trial(((key, _check_value(key, v)),)) for v in values)


def fixed(overrides: Mapping) -> Sweep:
    """One trial of overrides that every trial of a product shares; they stay out of names."""
    pairs = _overrides(overrides)
    return Sweep([Trial(pairs, None, frozenset(k for k, _ in pairs))])


def trial(name: str, overrides: Mapping | None = None) -> Sweep:
    """One named trial: its name stands for its overrides in every name it is part of."""
    if not isinstance(name, str) or not NAME_CHARS.fullmatch(name) or name[0] in ".-":
        raise SweepError(
            f"trial name {name!r} is not allowed: use letters, digits and . _ = , + - only, "
            "not starting with . or -."
        )
    pairs = _overrides(overrides or {})
    return Sweep([Trial(pairs, name, frozenset(k for k, _ in pairs))])


def _sweeps(what: str, parts) -> list[Sweep]:
    for part in parts:
        if not isinstance(part, Sweep):
            raise SweepError(f"{what}() takes sweeps (sweep, fixed, trial, ...), not {part!r}.")
    return list(parts)


def product(*sweeps: Sweep) -> Sweep:
    """Every combination; the last sweep varies fastest."""
    return _merged(itertools.product(*_sweeps("product", sweeps)))


def zip_(*sweeps: Sweep) -> Sweep:
    """Trial i of every sweep together; the sweeps must have equal lengths."""
    parts = _sweeps("zip_", sweeps)
    lengths = [len(p) for p in parts]
    if len(set(lengths)) > 1:
        raise SweepError(f"zip_() needs sweeps of equal lengths, got lengths {lengths}.")
    return _merged(zip(*parts, strict=True))


def _merged(combos) -> Sweep:
    """One trial per combination of trials, their overrides merged (a key set twice refused)."""
    out = []
    for combo in combos:
        merged = Trial()
        for part in combo:
            merged = merged + part
        out.append(merged)
    return Sweep(out)


def chain(*sweeps: Sweep) -> Sweep:
    """The trials of each sweep, one sweep after the other."""
    return Sweep(t for s in _sweeps("chain", sweeps) for t in s)


# ------------------------------------------------------------------- rendering and naming


def render_value(value) -> str:
    """What ml_collections' parsers read back as `value`: repr for floats (shortest round trip:
    3e-4 -> 0.0003), True/False, strings as they are, tuples without spaces: (1,2,2), ('a',)."""
    if isinstance(value, tuple):
        items = [repr(v) if isinstance(v, str) else render_value(v) for v in value]
        return "(" + ",".join(items) + ("," if len(items) == 1 else "") + ")"
    return value if isinstance(value, str) else repr(value)


def override_args(overrides) -> list[str]:
    """{"train.lr": 3e-4} or ((key, value), ...) -> ["--config.train.lr=0.0003"]."""
    pairs = overrides.items() if isinstance(overrides, Mapping) else overrides
    return [f"--config.{k}={render_value(v)}" for k, v in pairs]


def _name_value(value) -> str:
    if isinstance(value, tuple):
        return "-".join(_name_value(v) for v in value) or "empty"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value if isinstance(value, str) else repr(value))


def trial_name(t: Trial) -> str:
    """trial()'s name, then key=value for each overridden key it does not stand for."""
    shown = [(k, v) for k, v in t.overrides if k not in t.hidden]
    last = [k.rsplit(".", 1)[-1] for k, _ in shown]
    parts = [t.name] if t.name else []
    for (key, value), short in zip(shown, last, strict=True):
        parts.append(f"{short if last.count(short) == 1 else key}={_name_value(value)}")
    name = ",".join(parts) or "default"
    if len(name) > MAX_DERIVED_NAME:  # still unique: the hash covers every override
        digest = hashlib.sha1(repr(t.overrides).encode()).hexdigest()[:10]
        name = f"{name[: MAX_DERIVED_NAME - 11]}_{digest}"
    return name


def named_trials(trials: Sweep) -> list[tuple[str, Trial]]:
    """[(name, trial)] in sweep order; one clear error when two trials share a name."""
    if not isinstance(trials, Sweep):
        raise SweepError(f"a sweep must be a Sweep built by launch.sweep, not {type(trials)}.")
    seen = {}
    out = []
    for i, t in enumerate(trials):
        name = trial_name(t)
        if name in seen:
            raise SweepError(
                f"trials {seen[name]} and {i} are both named {name!r}; make their overrides "
                "differ or name them with trial(NAME, {...})."
            )
        seen[name] = i
        out.append((name, t))
    return out


def load_sweep(path) -> Sweep:
    """The Sweep that `get_sweep()` of the Python file at `path` returns."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SweepError(f"--sweep {path}: no such file (a Python file defining get_sweep()).")
    spec = importlib.util.spec_from_file_location(f"patchdiff_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(
            f"--sweep {path} defines no get_sweep(); it must define get_sweep() returning a "
            "Sweep (examples in launch/sweeps/)."
        )
    result = module.get_sweep()
    if not isinstance(result, Sweep):
        raise SweepError(
            f"get_sweep() of {path} returned {type(result).__name__}; it must return a Sweep "
            "made with launch.sweep's sweep, fixed, trial, product, zip_ or chain."
        )
    if not result:
        raise SweepError(f"get_sweep() of {path} returned an empty sweep.")
    return result


# ------------------------------------------------------------------------- configs


def config_args(argv: Sequence[str]) -> list[str]:
    """The --config.* arguments of a patchdiff.main command line (with a separate value)."""
    out, argv = [], list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith(("--config.", "--noconfig.")):
            out.append(arg)
            separate = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-")
            if separate and arg.startswith("--config."):
                out.append(argv[i + 1])
    return out


def resolve_config(config: str, argv: Sequence[str] = ()):
    """The ConfigDict that patchdiff.main would read from `--config config` and the --config.*
    overrides among `argv`: the same parser (ml_collections' config_flags, locked), so a
    misspelt key or a value its field cannot hold stops here, before any job starts."""
    from absl import flags
    from ml_collections import config_flags

    path = config.split(":", 1)[0]
    if not pathlib.Path(path).is_file():
        raise SweepError(f"--config {path}: no such file.")
    if REPO not in sys.path:  # configs import ml_collections_configs.base from the repository
        sys.path.insert(0, REPO)
    args = ["launch", "--config", config, *config_args(argv)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", values, lock_config=True, sys_argv=args)
    try:
        with warnings.catch_warnings():  # ml_collections loads config files by a deprecated API
            warnings.simplefilter("ignore", DeprecationWarning)
            values(args)
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(...))
            e = e.args[0]
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        text = " ".join(str(text).split())  # ml_collections' messages span lines
        raise SweepError(f"{config} with {' '.join(args[3:]) or 'no overrides'}: {text}") from None
    return values.config


# ------------------------------------------------------------------------- trial records


def write_json(path: pathlib.Path, record: dict):
    """Whole or not at all: several hosts may write the same record at once."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def _same_config(a: str, b: str) -> bool:
    def norm(c):
        path, _, options = c.partition(":")
        return os.path.realpath(path), options

    return norm(a) == norm(b)


def open_record(workdir: pathlib.Path, name: str, index: int, config: str, args: list[str]):
    """ROOT/NAME/trial.json, made or read; refuses a workdir recorded with other overrides."""
    path = workdir / "trial.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SweepError(f"{path} is unreadable ({e}); move it away to rerun.") from None
        if record.get("args") != args or not _same_config(record.get("config", ""), config):
            raise SweepError(
                f"{workdir} holds a trial with other overrides or config "
                f"({' '.join(record.get('args', []))} on {record.get('config')}); use another "
                "--root, or remove that workdir to start the trial afresh."
            )
        return record
    return {"name": name, "index": index, "config": config, "args": args, "runs": []}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------------- the runner


@dataclass
class Job:
    index: int
    name: str
    workdir: pathlib.Path
    command: list[str]
    args: list[str]  # the trial's own --config.K=V, as trial.json records them
    total_steps: int | None = None  # of the config with these overrides, once resolved


def record_start(job: Job, config: str, **run) -> dict:
    """Adds a run to ROOT/NAME/trial.json before it starts: its command, host, start and `run`
    ({"via": "srun"}: a run whose end this record will not see; "total_steps", by which
    collect tells such a run done). Returns the record, which finish() completes."""
    job.workdir.mkdir(parents=True, exist_ok=True)
    record = open_record(job.workdir, job.name, job.index, config, job.args)
    started = {"command": job.command, "started": _now(), "host": socket.gethostname()}
    record["runs"].append(started | {k: v for k, v in run.items() if v is not None})
    record["command"], record["exit_code"] = job.command, None
    write_json(job.workdir / "trial.json", record)
    return record


def plan(trials, config, root, extra=(), program=None) -> list[Job]:
    """The command of every trial, with its workdir; nothing is run or written."""
    program = list(program or [sys.executable, "-m", "patchdiff.main"])
    jobs = []
    for i, (name, t) in enumerate(named_trials(trials)):
        workdir = pathlib.Path(root) / name
        args = override_args(t.overrides)
        command = [*program, "--config", config, "--workdir", str(workdir), *args, *extra]
        jobs.append(Job(i, name, workdir, command, args))
    return jobs


def device_slots(devices: str | None, parallel: int) -> list[str | None]:
    """--devices 0,1,2,3 over --parallel 2 -> ["0,1", "2,3"]; no --devices: no pinning."""
    if parallel < 1:
        raise SweepError(f"--parallel {parallel}: give a positive number of trials at a time.")
    if devices is None:
        return [None] * parallel
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or not all(d.isdigit() for d in ids):
        raise SweepError(f"--devices {devices!r}: give GPU ids separated by commas, e.g. 0,1,2,3.")
    if parallel > len(ids) or len(ids) % parallel:
        raise SweepError(
            f"--parallel {parallel} cannot split --devices {devices} ({len(ids)} GPUs) evenly; "
            f"allowed: a --parallel that divides {len(ids)}."
        )
    per = len(ids) // parallel
    return [",".join(ids[s * per : (s + 1) * per]) for s in range(parallel)]


def _tpu_host() -> str | None:
    """The TPU device file of a TPU VM, if this is one (where --devices cannot pin chips)."""
    found = sorted(glob.glob("/dev/accel*")) or sorted(glob.glob("/dev/vfio/[0-9]*"))
    return found[0] if found else None


def _primary() -> bool:
    """Of the srun tasks that run one trial, only the first writes trial.json."""
    return os.environ.get("SLURM_PROCID", "0") == "0"


def start(job: Job, config: str, devices: str | None):
    """Records the run in trial.json and starts it with its output in log.txt."""
    record = record_start(job, config, devices=devices, total_steps=job.total_steps)
    env = dict(os.environ)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    with open(job.workdir / "log.txt", "a") as log:
        log.write(f"=== launch.sweep {_now()}: {shlex.join(job.command)}\n")
        log.flush()
        process = subprocess.Popen(
            job.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )  # own session: the runner forwards SIGINT/SIGTERM once, the child saves and leaves
    return process, record


def finish(job: Job, record: dict, code: int):
    record["runs"][-1] |= {"ended": _now(), "exit_code": code}
    record["exit_code"] = code
    write_json(job.workdir / "trial.json", record)


def run_jobs(jobs: list[Job], config: str, slots: list[str | None], poll_s: float = 0.1) -> int:
    """Runs the jobs, len(slots) at a time, each slot pinned to its devices. SIGINT/SIGTERM are
    passed to the running trials (which checkpoint and leave) and no further trial starts.
    Returns 0 when every trial that ran exited 0, else 1."""
    pending, running, failed = list(jobs), {}, []
    stop = {"signal": None}

    def forward(sig, frame):
        stop["signal"] = sig
        for process, *_ in running.values():
            process.send_signal(sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            free = [s for s in range(len(slots)) if s not in running]
            while free and pending and stop["signal"] is None:
                slot, job = free.pop(0), pending.pop(0)
                process, record = start(job, config, slots[slot])
                running[slot] = (process, job, record, time.time())
                where = f" on devices {slots[slot]}" if slots[slot] is not None else ""
                print(f"[{job.index}] {job.name}: started{where}, log {job.workdir}/log.txt")
            if stop["signal"] is not None and not running:
                break
            for slot, (process, job, record, t0) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                finish(job, record, code)
                del running[slot]
                print(f"[{job.index}] {job.name}: exit {code} after {time.time() - t0:.0f} s")
                if code:
                    failed.append(job.name)
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        print(f"stopped: {len(pending)} trial(s) not started; run the same command to go on.")
    if failed:
        print(f"failed: {', '.join(failed)} (see their log.txt)")
    return 1 if failed else 0


def exec_job(job: Job, config: str):
    """Becomes the trial's command (srun's tasks: signals and output go straight to it)."""
    if _primary():
        record_start(job, config, via="srun", total_steps=job.total_steps)
    else:  # the other tasks only check that the workdir is this trial's
        open_record(job.workdir, job.name, job.index, config, job.args)
    sys.stdout.flush()
    os.execv(job.command[0], job.command)


# ------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence and exit 2, not a usage dump
        raise SweepError(f"{message} (python -m {self.prog} --help lists the options).")


def _parser() -> _Parser:
    p = _Parser(prog="launch.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", required=True, help="Python file with get_sweep()")
    p.add_argument("--config", help="patchdiff config file, as for patchdiff.main")
    p.add_argument("--root", help="the trials' workdirs are ROOT/NAME")
    p.add_argument("--parallel", type=int, default=1, help="trials at a time")
    p.add_argument("--devices", help="GPU ids split over the --parallel slots (0,1,2,3)")
    p.add_argument("--index", type=int, help="run trial I only (Slurm: $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--exec", action="store_true", help="with --index: become the trial (srun)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--list", action="store_true", help="print the trials and their overrides")
    return p


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options, and the patchdiff.main arguments after `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _check_extra(extra: list[str]):
    for arg in extra:
        if arg.split("=", 1)[0] in ("--workdir", "--config"):
            raise SweepError(
                f"extra argument {arg!r} after -- is not allowed: the sweep sets --config and "
                "each trial's --workdir; pass --config.FIELD=VALUE overrides or --mode there."
            )


def _main(args, extra: list[str]) -> int:
    _check_extra(extra)
    trials = load_sweep(args.sweep)
    if args.list:
        names = named_trials(trials)
        for i, (name, t) in enumerate(names):
            print(f"{i:>4}  {name}  {' '.join(override_args(t.overrides))}")
        return 0
    for flag in ("config", "root"):
        if getattr(args, flag) is None:
            raise SweepError(f"--{flag} is required (except with --list).")
    jobs = plan(trials, args.config, args.root, extra)
    if args.index is not None:
        if not 0 <= args.index < len(jobs):
            raise SweepError(
                f"--index {args.index} is out of range: the sweep has {len(jobs)} trials, "
                f"allowed 0 to {len(jobs) - 1}."
            )
        jobs = [jobs[args.index]]
    elif args.exec:
        raise SweepError("--exec needs --index I: it runs one trial in this process.")
    if args.devices is not None and _tpu_host():
        raise SweepError(
            f"--devices pins GPUs (CUDA_VISIBLE_DEVICES), and this looks like a TPU VM "
            f"({_tpu_host()}), where a trial takes every chip: run without --devices and "
            "--parallel (launch/README.md, 'A local sweep')."
        )
    slots = device_slots(args.devices, args.parallel)
    for job in jobs:  # a misspelt key stops here, before any trial starts
        job.total_steps = resolve_config(args.config, job.args + extra).train.total_steps
    if args.dry_run:
        for job, slot in zip(jobs, itertools.cycle(slots)):
            pin = f"CUDA_VISIBLE_DEVICES={slot} " if slot is not None else ""
            log = shlex.quote(str(job.workdir / "log.txt"))
            print(f"{pin}{shlex.join(job.command)} >> {log} 2>&1")
        return 0
    if args.exec:
        exec_job(jobs[0], args.config)
    return run_jobs(jobs, args.config, slots)


def main(argv: Sequence[str] | None = None) -> int:
    ours, extra = split_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _main(_parser().parse_args(ours), extra)
    except SweepError as e:
        print(f"launch.sweep: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Through the importable module: sweep files build their Sweep from `launch.sweep`, whose
    # classes are not this __main__ copy's.
    from launch.sweep import main as _main_of_module

    sys.exit(_main_of_module())

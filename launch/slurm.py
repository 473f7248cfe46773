"""Renders launch/slurm/train.sbatch for one training run or a sweep, and submits it.

    python -m launch.slurm --config ml_collections_configs/cifar10_ddpmpp.py --workdir /shared/c10 \
        --nodes 4 --gpus-per-node 8 [--time 24:00:00] [--partition P] [--account A] \
        [--out c10.sbatch] [--submit] [-- --config.train.lr=3e-4 ...]
    python -m launch.slurm --config ml_collections_configs/fashion_mnist.py \
        --sweep launch/sweeps/fmnist_lr_batch.py --root /shared/sweep --nodes 1 --gpus-per-node 2

One Slurm task per GPU runs `python -m patchdiff.main ... --config.distributed=True`; with
--sweep, an array job (`--array=0-(T-1)`) whose task I runs trial I of the sweep on its own
nodes through `python -m launch.sweep --index $SLURM_ARRAY_TASK_ID --exec`. After srun returns,
the job (or array task) requeues itself while the newest WORKDIR/checkpoints/<step> is below
config.train.total_steps and this run advanced it. total_steps is that of the config with its
overrides, resolved here, at render time, by the parser patchdiff.main uses: render again after
changing it. The workdir must be on a filesystem every node reaches.
"""

import argparse
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

from launch import sweep as sweep_lib

TEMPLATE = pathlib.Path(__file__).parent / "slurm" / "train.sbatch"
SLURM_TIME = re.compile(r"\d+(-\d+)?(:\d+){0,2}")


class SlurmError(ValueError):
    """A command-line input that is not allowed."""


def _q(value) -> str:
    return shlex.quote(str(value))


def _bash_array(values) -> str:
    return "(" + " ".join(_q(v) for v in values) + ")"


def _absolute_config(config: str) -> str:
    path, sep, options = config.partition(":")
    return str(pathlib.Path(path).resolve()) + sep + options


def render(
    config: str,
    *,
    nodes: int,
    gpus_per_node: int,
    workdir: str | None = None,
    sweep: str | None = None,
    root: str | None = None,
    time: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    job_name: str | None = None,
    python: str = sys.executable,
    extra: tuple[str, ...] = (),
    rendered_by: str = "launch.slurm.render()",
) -> str:
    """The sbatch script's text. Exactly one of `workdir` or (`sweep`, `root`)."""
    if (workdir is None) == (sweep is None or root is None) or (sweep is None) != (root is None):
        raise SlurmError("give either --workdir DIR, or --sweep FILE with --root ROOT.")
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value < 1:
            raise SlurmError(f"{flag} {value}: give a positive number.")
    if not SLURM_TIME.fullmatch(time):
        raise SlurmError(f"--time {time}: give a Slurm time such as 24:00:00 or 2-00:00:00.")
    extra = list(extra)
    sweep_lib.resolve_config(config, extra)  # a bad --config or override stops here
    config = _absolute_config(config)
    distributed = [*extra, "--config.distributed=True"]
    directives = [f"--partition={partition}"] * bool(partition)
    directives += [f"--account={account}"] * bool(account)
    if workdir is not None:
        workdir = pathlib.Path(workdir).resolve()
        total = sweep_lib.resolve_config(config, extra).train.total_steps
        select = f"WORKDIR={_q(workdir)}\nTOTAL_STEPS={total}"
        program = ["-m", "patchdiff.main", "--config", config, "--workdir", '"$WORKDIR"']
        command = '"$PYTHON" ' + " ".join(p if p == '"$WORKDIR"' else _q(p) for p in program)
        output, name = workdir / "slurm-%j.out", job_name or f"patchdiff-{workdir.name}"
    else:
        root = pathlib.Path(root).resolve()
        jobs = sweep_lib.plan(sweep_lib.load_sweep(sweep), config, root, extra)
        totals = [sweep_lib.resolve_config(config, j.args + extra).train.total_steps for j in jobs]
        select = "\n".join(
            [
                "# Array task I runs trial I of the sweep (python -m launch.sweep --list).",
                f"WORKDIRS={_bash_array(j.workdir for j in jobs)}",
                f"TOTAL_STEPS_OF={_bash_array(totals)}",
                "WORKDIR=${WORKDIRS[$SLURM_ARRAY_TASK_ID]}",
                "TOTAL_STEPS=${TOTAL_STEPS_OF[$SLURM_ARRAY_TASK_ID]}",
            ]
        )
        program = ["-m", "launch.sweep", "--sweep", pathlib.Path(sweep).resolve(), "--config"]
        program += [config, "--root", root, "--index"]
        command = '"$PYTHON" ' + " ".join(_q(p) for p in program)
        command += ' "$SLURM_ARRAY_TASK_ID" --exec --'
        directives.append(f"--array=0-{len(jobs) - 1}")
        output, name = root / "slurm-%A_%a.out", job_name or f"sweep-{root.name}"
    command += "".join(f" {_q(a)}" for a in distributed)
    fields = {
        "RENDERED_BY": rendered_by,
        "JOB_NAME": re.sub(r"[^A-Za-z0-9._-]", "_", name),
        "NODES": nodes,
        "GPUS_PER_NODE": gpus_per_node,
        "TIME": time,
        "OUTPUT": output,
        "DIRECTIVES": "\n".join(f"#SBATCH {d}" for d in directives),
        "REPO": _q(sweep_lib.REPO),
        "PYTHON": _q(python),
        "SELECT": select,
        "COMMAND": command,
    }
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", str(value))
    assert not re.search(r"\{\{[A-Z_]+\}\}", text), "a template field was left unfilled"
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SlurmError(f"{message} (python -m {self.prog} --help lists the options).")


def _parser() -> _Parser:
    p = _Parser(prog="launch.slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="patchdiff config file (FILE[:options])")
    p.add_argument("--workdir", help="one run's workdir, on a filesystem all nodes share")
    p.add_argument("--sweep", help="a sweep file: one array task per trial")
    p.add_argument("--root", help="with --sweep: the trials' workdirs are ROOT/NAME")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--time", default="24:00:00", help="Slurm time limit per job (or array task)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--python", default=sys.executable, help="the nodes' python (a venv's)")
    p.add_argument("--out", help="write the script here (default: print it)")
    p.add_argument("--submit", action="store_true", help="sbatch the script (needs --out's dir)")
    return p


def main(argv=None) -> int:
    ours, extra = sweep_lib.split_args(list(sys.argv[1:] if argv is None else argv))
    try:
        args = _parser().parse_args(ours)
        if args.submit and shutil.which("sbatch") is None:
            raise SlurmError(
                "--submit needs `sbatch` on PATH, and this machine has none: render with --out "
                "FILE here and run `sbatch FILE` on the cluster's login node."
            )
        text = render(
            args.config,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            workdir=args.workdir,
            sweep=args.sweep,
            root=args.root,
            time=args.time,
            partition=args.partition,
            account=args.account,
            job_name=args.job_name,
            python=args.python,
            extra=tuple(extra),
            rendered_by="python -m launch.slurm " + shlex.join(argv),
        )
    except (SlurmError, sweep_lib.SweepError) as e:
        print(f"launch.slurm: {e}", file=sys.stderr)
        return 2
    logs = pathlib.Path(args.workdir or args.root).resolve()
    out = args.out or (logs / "train.sbatch" if args.submit else None)
    if out is None:
        print(text, end="")
        return 0
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if not args.submit:
        print(f"wrote {out}; submit it with: mkdir -p {_q(logs)} && sbatch {_q(out)}")
        return 0
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not make the --output folder
    return subprocess.run(["sbatch", str(out)]).returncode


if __name__ == "__main__":
    sys.exit(main())

"""An xmanager experiment over a sweep's trials: one work unit per trial, on this machine or on
Vertex AI.

    pip install -e ".[launch]"   # xmanager
    python -m launch.xm_launch --backend local --config ml_collections_configs/fashion_mnist.py \
        --sweep launch/sweeps/fmnist_lr_batch.py --root runs/xm_sweep \
        [-- --config.train.total_steps=200]
    python -m launch.xm_launch --backend vertex --accelerator a100 --accelerator_count 8 \
        --config ml_collections_configs/cifar10_ddpmpp.py --sweep launch/sweeps/X.py \
        --root /gcs/BUCKET/runs/c10      # Vertex mounts buckets under /gcs (Cloud Storage FUSE)
    python -m launch.xm_launch ... --dry_run   # the work units, without xmanager

Each work unit runs `python -m patchdiff.main --config CFG --workdir WORKDIR` with its trial's
overrides as arguments ({"config.train.lr": "0.0003"}, rendered as launch.sweep renders them),
WORKDIR from --workdir_template (default {root}/{name}: the same ROOT/NAME as launch.sweep, so
launching again resumes; {xid} and {wid}, the experiment and work-unit ids, make a fresh one per
launch). `local` runs each work unit as a process here, all at once (launch.sweep queues them);
`vertex` builds one image of this repository (pip install -e ".[gpu]" or ".[tpu]") and runs each
work unit on one machine with the requested accelerators. Flags of xmanager itself (--xm_*)
pass through. Everything that makes the jobs is a pure function here; xmanager is imported in
main() only.
"""

import argparse
import pathlib
import re
import sys

from launch import sweep as sweep_lib

BACKENDS = ("local", "vertex")
# Vertex AI's machine accelerators as xmanager names them (xm.ResourceType, case-insensitive).
VERTEX_GPUS = ("t4", "p4", "p100", "v100", "l4_24th", "a100", "a100_80gib", "h100", "h200", "b200")
VERTEX_TPUS = ("tpu_v2", "tpu_v3")
DEFAULT_BASE_IMAGE = "python:3.12"


class XmError(ValueError):
    """A command-line input that is not allowed."""


def extra_args(argv) -> dict[str, str]:
    """patchdiff.main arguments after `--` as xmanager's args: --config.train.lr=3e-4 ->
    {"config.train.lr": "3e-4"}; only --name=value forms (xmanager renders a dict so)."""
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise XmError(f"extra argument {arg!r}: write patchdiff.main's flags as --name=value.")
        key, value = arg[2:].split("=", 1)
        if key in ("config", "workdir"):
            raise XmError(f"extra argument {arg!r}: --config and --workdir are set per work unit.")
        out[key] = value
    return out


def config_path(config: str, backend: str = "local") -> str:
    """The --config a work unit reads: absolute here; on Vertex, relative to the repository,
    which the image holds at its working directory."""
    path, sep, options = config.partition(":")
    full = pathlib.Path(path).resolve()
    if backend == "local":
        return str(full) + sep + options
    if not full.is_relative_to(sweep_lib.REPO):
        raise XmError(f"--config {path}: on Vertex the config must be inside {sweep_lib.REPO}.")
    return str(full.relative_to(sweep_lib.REPO)) + sep + options


def root_path(root: str, backend: str = "local") -> str:
    if backend == "local":
        return str(pathlib.Path(root).resolve())
    if not root.startswith("/"):
        raise XmError(
            f"--root {root}: on Vertex give an absolute path in the container, such as "
            "/gcs/BUCKET/runs (a Cloud Storage bucket mounted by Vertex)."
        )
    return root


def trial_args(config: str, overrides, extra: dict[str, str]) -> dict[str, str]:
    """The args of one work unit, but its workdir: {"config": CFG, "config.train.lr": "0.0003"}."""
    args = {"config": config}
    args |= {f"config.{k}": sweep_lib.render_value(v) for k, v in overrides}
    return args | extra


def workdir_for(template: str, root: str, name: str, xid="{xid}", wid="{wid}") -> str:
    """--workdir_template filled: {root}, {name}, {xid} (experiment id), {wid} (work unit id)."""
    try:
        return template.format(root=root, name=name, xid=xid, wid=wid)
    except (KeyError, IndexError, ValueError) as e:
        raise XmError(
            f"--workdir_template {template!r}: {e}; use {{root}}, {{name}}, {{xid}}, {{wid}}."
        ) from None


def work_units(trials, config, root, template, extra, backend="local") -> list[dict]:
    """[{"index", "name", "args", "workdir", "overrides"}] per trial, in sweep order; workdir
    keeps {xid} and {wid} open; overrides as launch.sweep's trial.json records them."""
    config, root = config_path(config, backend), root_path(root, backend)
    workdir_for(template, root, "name")  # a bad template stops here, not in the first work unit
    return [
        {
            "index": i,
            "name": name,
            "args": trial_args(config, t.overrides, extra),
            "workdir": workdir_for(template, root, name),
            "overrides": sweep_lib.override_args(t.overrides),
            "total_steps": None,  # main() fills it in from the resolved config
        }
        for i, (name, t) in enumerate(sweep_lib.named_trials(trials))
    ]


def requirements(backend: str, accelerator: str | None, count: int) -> dict[str, int]:
    """xm.JobRequirements(**requirements(...)): {"a100": 8} on Vertex; none locally."""
    if backend not in BACKENDS:
        raise XmError(f"--backend {backend}: allowed: {', '.join(BACKENDS)}.")
    if accelerator is None:
        return {}
    if backend == "local":
        raise XmError("--accelerator is for --backend vertex; local work units use this machine.")
    name = accelerator.lower()
    if name not in VERTEX_GPUS + VERTEX_TPUS:
        raise XmError(
            f"--accelerator {accelerator}: Vertex AI offers {', '.join(VERTEX_GPUS + VERTEX_TPUS)}."
        )
    if count < 1:
        raise XmError(f"--accelerator_count {count}: give a positive number.")
    return {name: count}


def docker_instructions(repo: str, accelerator: str | None) -> list[str]:
    """The image: this repository at /workdir/NAME, installed with the accelerator's extra."""
    directory = pathlib.Path(repo).name
    extra = "tpu" if accelerator and accelerator.lower().startswith("tpu") else "gpu"
    return [
        "ENV LANG=C.UTF-8",
        "RUN python -m pip install --upgrade pip",
        f"COPY {directory}/ /workdir/{directory}",
        f"WORKDIR /workdir/{directory}",
        f'RUN python -m pip install -e ".[{extra}]"',
    ]


def display_name(name: str) -> str:
    """A trial name as a job name Vertex accepts (lower-case letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:100] or "trial"


# ---------------------------------------------------------------------------- xmanager


def launch(units: list[dict], options) -> None:
    """One experiment, one work unit per entry of `units` (the only xmanager code here)."""
    from absl import flags
    from xmanager import xm, xm_local

    flags.FLAGS(["launch.xm_launch", *options.xm_flags], known_only=True)  # xmanager's --xm_*
    repo = sweep_lib.REPO
    if options.backend == "local":
        spec, executor = xm_local.Local.Spec(), xm_local.Local()
        # A prebuilt program (xm.binary): this Python, run from anywhere with the repository on
        # its path (configs import ml_collections_configs, which is not an installed package).
        packageable = xm.binary(
            executor_spec=spec,
            path=sys.executable,
            args=["-m", "patchdiff.main"],
            env_vars={"PYTHONPATH": repo},
        )
    else:
        spec = xm_local.Vertex.Spec()
        req = requirements("vertex", options.accelerator, options.accelerator_count)
        executor = xm_local.Vertex(requirements=xm.JobRequirements(**req))
        packageable = xm.python_container(
            executor_spec=spec,
            path=repo,
            base_image=options.base_image,
            docker_instructions=docker_instructions(repo, options.accelerator),
            entrypoint=xm.ModuleName("patchdiff.main"),
        )
    with xm_local.create_experiment(experiment_title=options.title) as experiment:
        [executable] = experiment.package([packageable])

        async def make_job(work_unit, *, index, name, args, workdir, overrides, total_steps):
            xid, wid = work_unit.experiment_id, work_unit.work_unit_id
            workdir = workdir.format(xid=xid, wid=wid)
            if options.backend == "local":  # trial.json as launch.sweep writes it, for collect
                command = [sys.executable, "-m", "patchdiff.main", f"--workdir={workdir}"]
                command += [f"--{k}={v}" for k, v in args.items()]
                job = sweep_lib.Job(index, name, pathlib.Path(workdir), command, overrides)
                via = f"xm {xid}/{wid}"
                sweep_lib.record_start(job, args["config"], via=via, total_steps=total_steps)
            work_unit.add(
                xm.Job(
                    executable=executable,
                    executor=executor,
                    args={**args, "workdir": workdir},
                    name=display_name(name),
                )
            )

        for unit in units:
            experiment.add(make_job, args=unit)
        print(f"experiment {experiment.experiment_id}: {len(units)} work unit(s)")


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise XmError(f"{message} (python -m {self.prog} --help lists the options).")

    p = Parser(prog="launch.xm_launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="local", help="local or vertex")
    p.add_argument("--config", required=True, help="patchdiff config file (FILE[:options])")
    p.add_argument("--sweep", help="sweep file; without it, one work unit of the config as is")
    p.add_argument("--root", required=True, help="workdirs are ROOT/NAME (--workdir_template)")
    p.add_argument("--workdir_template", default="{root}/{name}")
    p.add_argument("--accelerator", help="Vertex: a100, h100, tpu_v3, ...")
    p.add_argument("--accelerator_count", type=int, default=1)
    p.add_argument("--base_image", default=DEFAULT_BASE_IMAGE, help="Vertex: the image's FROM")
    p.add_argument("--title", default="patchdiff", help="the experiment's title")
    p.add_argument("--dry_run", action="store_true", help="print the work units, launch nothing")
    return p


def main(argv=None) -> int:
    ours, extra = sweep_lib.split_args(list(sys.argv[1:] if argv is None else argv))
    try:
        options, xm_flags = _parser().parse_known_args(ours)
        unknown = [a for a in xm_flags if not a.startswith(("--xm_", "--noxm_"))]
        if unknown:
            raise XmError(f"unrecognized arguments: {' '.join(unknown)} (see --help).")
        requirements(options.backend, options.accelerator, options.accelerator_count)
        trials = sweep_lib.load_sweep(options.sweep) if options.sweep else sweep_lib.trial("run")
        extra_dict = extra_args(extra)
        units = work_units(
            trials,
            options.config,
            options.root,
            options.workdir_template,
            extra_dict,
            options.backend,
        )
        overrides = [f"--{k}={v}" for k, v in extra_dict.items()]
        for unit, t in zip(units, trials, strict=True):  # a misspelt key stops here
            args = sweep_lib.override_args(t.overrides) + overrides
            unit["total_steps"] = sweep_lib.resolve_config(options.config, args).train.total_steps
        if options.backend == "local":  # before the experiment: a workdir of another trial
            for unit in units:
                workdir = pathlib.Path(unit["workdir"])
                if "{" not in str(workdir):  # {xid}/{wid}: a fresh folder each launch
                    sweep_lib.open_record(
                        workdir, unit["name"], unit["index"], options.config, unit["overrides"]
                    )
        if options.dry_run:
            for unit in units:
                args = " ".join(f"--{k}={v}" for k, v in unit["args"].items())
                print(
                    f"{unit['name']}: python -m patchdiff.main {args} --workdir={unit['workdir']}"
                )
            return 0
        try:
            import xmanager  # noqa: F401
        except ImportError:
            raise XmError(
                'xmanager is not installed: pip install -e ".[launch]", or run the sweep with '
                "python -m launch.sweep."
            ) from None
    except (XmError, sweep_lib.SweepError) as e:
        print(f"launch.xm_launch: {e}", file=sys.stderr)
        return 2
    options.xm_flags = xm_flags
    launch(units, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())

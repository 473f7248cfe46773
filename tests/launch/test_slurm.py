"""launch.slurm: the rendered sbatch scripts (1 node x 1 GPU, 4 x 8, a sweep array), their
directives and syntax, and their requeue decision, run with stand-ins for srun and scontrol."""

import os
import pathlib
import re
import subprocess

import pytest

from launch import slurm

ROOT = pathlib.Path(__file__).parents[2]
FMNIST = "ml_collections_configs/fashion_mnist.py"
SWEEP = "launch/sweeps/fmnist_batch_lr_zip.py"


def directives(text) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)", text, re.M)


def srun_line(text) -> str:
    [line] = [line for line in text.splitlines() if line.startswith("srun ")]
    return line


def bash_syntax_ok(text, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return path


@pytest.mark.parametrize("nodes, gpus", [(1, 1), (4, 8)])
def test_one_task_per_gpu_signal_requeue_and_append(tmp_path, nodes, gpus):
    text = slurm.render(
        FMNIST,
        nodes=nodes,
        gpus_per_node=gpus,
        workdir=str(tmp_path / "run"),
        partition="gpu" if nodes > 1 else None,
        account="proj" if nodes > 1 else None,
        extra=("--config.train.total_steps=300", "--config.train.lr=3e-4"),
    )
    bash_syntax_ok(text, tmp_path)
    expected = [
        "--job-name=patchdiff-run",
        f"--nodes={nodes}",
        f"--ntasks-per-node={gpus}",
        f"--gpus-per-node={gpus}",
        "--time=24:00:00",
        "--signal=TERM@120",
        "--requeue",
        "--open-mode=append",
        f"--output={tmp_path}/run/slurm-%j.out",
    ] + (["--partition=gpu", "--account=proj"] if nodes > 1 else [])
    assert directives(text) == expected
    assert "--gpus-per-task" not in "\n".join(directives(text))
    line = srun_line(text)
    assert line.startswith('srun --kill-on-bad-exit=1 "$PYTHON" -m patchdiff.main --config ')
    assert f'--config {ROOT / FMNIST} --workdir "$WORKDIR"' in line
    assert line.endswith("--config.train.lr=3e-4 --config.distributed=True")
    assert f"WORKDIR={tmp_path}/run\nTOTAL_STEPS=300\n" in text  # the override's, not 1000
    assert f"cd {ROOT} " in text


def test_a_sweep_renders_an_array_job_of_multi_gpu_trials(tmp_path):
    text = slurm.render(
        FMNIST, nodes=2, gpus_per_node=4, sweep=SWEEP, root=str(tmp_path / "sw"), time="2-00:00:00"
    )
    bash_syntax_ok(text, tmp_path)
    assert "--array=0-5" in directives(text) and "--ntasks-per-node=4" in directives(text)
    assert f"--output={tmp_path}/sw/slurm-%A_%a.out" in directives(text)
    line = srun_line(text)
    assert f"-m launch.sweep --sweep {ROOT / SWEEP} --config {ROOT / FMNIST} --root " in line
    assert line.endswith('--index "$SLURM_ARRAY_TASK_ID" --exec -- --config.distributed=True')
    assert "TOTAL_STEPS_OF=(1000 1000 1000 1000 1000 1000)" in text
    assert f"{tmp_path}/sw/batch_size=64,lr=0.002 " in text


FAKE_SRUN = """#!/bin/bash
echo "$@" > "$FAKE_DIR/srun_args"
[ -n "${FAKE_STEP:-}" ] && mkdir -p "$FAKE_WORKDIR/checkpoints/$FAKE_STEP"
exit "${FAKE_RC:-0}"
"""
FAKE_SCONTROL = '#!/bin/bash\necho "$@" >> "$FAKE_DIR/scontrol_args"\n'


def run_script(path, tmp_path, workdir, step=None, rc=0, task=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "scontrol_args").unlink(missing_ok=True)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_DIR=str(tmp_path),
        FAKE_WORKDIR=str(workdir),
        FAKE_STEP="" if step is None else str(step),
        FAKE_RC=str(rc),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[01-04]",
        http_proxy="",
        https_proxy="",
        HTTP_PROXY="",
        HTTPS_PROXY="",
        grpc_proxy="",
    )
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    result = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    requeued = (
        (tmp_path / "scontrol_args").read_text() if (tmp_path / "scontrol_args").exists() else ""
    )
    return result, requeued


def test_the_job_requeues_itself_only_after_progress_short_of_total_steps(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "100").mkdir(parents=True)
    (workdir / "checkpoints" / "900.orbax-checkpoint-tmp-1").mkdir()  # not a checkpoint
    text = slurm.render(
        FMNIST,
        nodes=1,
        gpus_per_node=1,
        workdir=str(workdir),
        extra=("--config.train.total_steps=500",),
    )
    path = bash_syntax_ok(text, tmp_path)

    result, requeued = run_script(path, tmp_path, workdir, step=200)  # stopped at SIGTERM
    assert result.returncode == 0 and requeued == "requeue 4242\n", result.stdout + result.stderr
    assert "checkpoint at step 200 of 500" in result.stdout
    assert "--workdir" in (tmp_path / "srun_args").read_text()

    result, requeued = run_script(path, tmp_path, workdir, step=None, rc=1)  # failed at once
    assert result.returncode == 1 and requeued == ""
    assert "not requeueing: no checkpoint past step 200" in result.stderr

    result, requeued = run_script(path, tmp_path, workdir, step=500)  # finished
    assert result.returncode == 0 and requeued == ""


def test_an_array_task_picks_its_trial_and_requeues_alone(tmp_path):
    root = tmp_path / "sw"
    text = slurm.render(
        FMNIST, nodes=1, gpus_per_node=2, sweep=SWEEP, root=str(root),
        extra=("--config.train.total_steps=50",),
    )  # fmt: skip
    path = bash_syntax_ok(text, tmp_path)
    workdir = root / "batch_size=64,lr=0.002"  # trial 2
    result, requeued = run_script(path, tmp_path, workdir, step=20, task=2)
    assert requeued == "requeue 4242\n", result.stdout + result.stderr
    assert f"{workdir} from step 0" in result.stdout
    args = (tmp_path / "srun_args").read_text()
    assert "--index 2 --exec -- --config.train.total_steps=50 --config.distributed=True" in args


def cli(capsys, *argv):
    code = slurm.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_prints_writes_and_submits(tmp_path, capsys, monkeypatch):
    base = ["--config", FMNIST, "--workdir", str(tmp_path / "run"), "--nodes", "1"]
    code, out, _ = cli(capsys, *base, "--gpus-per-node", "2")
    assert (
        code == 0 and out.startswith("#!/bin/bash") and "# python -m launch.slurm --config" in out
    )
    code, out, _ = cli(capsys, *base, "--gpus-per-node", "2", "--out", str(tmp_path / "j.sbatch"))
    assert code == 0 and (tmp_path / "j.sbatch").read_text().startswith("#!/bin/bash")
    assert f"sbatch {tmp_path}/j.sbatch" in out

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch here
    code, out, err = cli(capsys, *base, "--gpus-per-node", "2", "--submit")
    assert code == 2 and err.count("\n") == 1
    assert "--submit needs `sbatch` on PATH, and this machine has none" in err

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 7 ($1)"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code, out, err = cli(capsys, *base, "--gpus-per-node", "2", "--submit")
    assert code == 0, err
    assert (tmp_path / "run" / "train.sbatch").is_file()  # beside the logs, which Slurm needs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "1", "--gpus-per-node", "1"], "give either --workdir DIR, or --sweep FILE"),
        (["--workdir", "w", "--sweep", SWEEP, "--root", "r", "--nodes", "1", "--gpus-per-node",
          "1"], "give either --workdir DIR, or --sweep FILE"),
        (["--workdir", "w", "--nodes", "0", "--gpus-per-node", "1"], "--nodes 0: give a positive"),
        (["--workdir", "w", "--nodes", "1", "--gpus-per-node", "1", "--time", "1 day"],
         "--time 1 day: give a Slurm time"),
        (["--workdir", "w", "--nodes", "1"], "the following arguments are required"),
        (["--workdir", "w", "--nodes", "1", "--gpus-per-node", "1", "--", "--config.trainn.lr=1"],
         'Did you mean "train"'),
        (["--sweep", "nowhere.py", "--root", "r", "--nodes", "1", "--gpus-per-node", "1"],
         "--sweep nowhere.py: no such file"),
    ],
)  # fmt: skip
def test_bad_inputs_get_one_sentence_and_exit_2(capsys, argv, message):
    code, out, err = cli(capsys, "--config", FMNIST, *argv)
    assert code == 2 and out == "" and err.startswith("launch.slurm: ")
    assert message in err and err.count("\n") == 1, err

"""launch/tpu/run_pod.sh: its syntax, and the gcloud commands its dry run prints, read back as a
shell would read them."""

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parents[2]
SCRIPT = ROOT / "launch" / "tpu" / "run_pod.sh"
ARGS = ["--config", "ml_collections_configs/imagenet64_adm.py", "--workdir", "/mnt/shared/my run",
        "--config.train.lr=3e-4"]  # fmt: skip


def pod(*argv, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=60,
    )


def commands(result) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def remote(command: list[str]) -> str:
    """The --command of a `gcloud compute tpus tpu-vm ssh NAME ... --worker=all` line."""
    assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in command and command[-2] == "--command"
    return command[-1]


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_a_dry_run_prints_copy_install_and_the_same_command_on_every_worker():
    lines = commands(pod("--dry-run", "my-pod", "us-west4-a", "--", *ARGS))
    assert len(lines) == 5
    assert lines[0][:2] == ["(cd", str(ROOT)] and "git ls-files" in " ".join(lines[0])
    assert lines[1][:6] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "/tmp/patchdiff-src.tar.gz",
    ]
    assert lines[1][6:] == ["my-pod:patchdiff-src.tar.gz", "--zone=us-west4-a", "--worker=all"]
    assert lines[2][5:7] == ["my-pod", "--zone=us-west4-a"]
    assert remote(lines[2]) == "mkdir -p patchdiff && tar xzf patchdiff-src.tar.gz -C patchdiff"
    setup = remote(lines[3])
    assert "python3 -m venv .venv && . .venv/bin/activate" in setup
    assert setup.endswith('pip install -q -e ".[tpu]"')
    train = remote(lines[4])
    prefix = "cd patchdiff && . .venv/bin/activate && "
    assert train.startswith(prefix)
    assert shlex.split(train[len(prefix) :]) == [
        "python", "-m", "patchdiff.main", *ARGS, "--config.distributed=True"
    ]  # fmt: skip


def test_clone_background_stop_and_skip_setup_variants():
    env = {"DRY_RUN": "1"}
    options = ["--repo", "https://example.org/p.git", "--branch", "v1", "--project", "proj",
               "--dir", "src", "--background"]  # fmt: skip
    lines = commands(pod(*options, "pod", "z", "--", *ARGS, env=env))
    assert len(lines) == 3 and all("--project=proj" in line for line in lines)
    assert "git clone --depth=1 --branch v1 https://example.org/p.git src" in remote(lines[0])
    assert "cd src &&" in remote(lines[1])
    background = remote(lines[2])
    assert "nohup python -m patchdiff.main" in background
    assert background.endswith(
        "> ~/patchdiff-train.log 2>&1 < /dev/null & echo $! > ~/patchdiff-train.pid"
    )
    lines = commands(pod("--skip-setup", "pod", "z", "--", *ARGS, env=env))
    assert len(lines) == 1 and "patchdiff.main" in remote(lines[0])
    lines = commands(pod("--stop", "pod", "z", env=env))
    assert remote(lines[0]) == 'kill -TERM "$(cat ~/patchdiff-train.pid)"'


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pod", "z", "--", "--config", "c.py", "--workdir", "gs://b/run"],
         "--workdir gs://b/run: patchdiff needs a local path that every worker shares"),
        (["pod", "z", "--", "--config", "c.py", "--workdir=gs://b/run"], "not gs://"),
        (["pod"], "give TPU_NAME and ZONE"),
        (["pod", "z"], "give patchdiff.main's arguments after --"),
        (["--bogus", "pod", "z"], "unknown option --bogus"),
    ],
)  # fmt: skip
def test_bad_inputs_get_one_sentence_and_exit_2(argv, message):
    result = pod("--dry-run", *argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("run_pod.sh: ") and message in result.stderr

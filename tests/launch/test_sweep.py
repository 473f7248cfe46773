"""launch.sweep: the sweep language, names, trial records, the runner (with a cheap fake program
in place of patchdiff.main) and its command line. The real sweep of a tiny training is in
test_collect.py."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from launch import sweep as S

ROOT = pathlib.Path(__file__).parents[2]
FMNIST = "ml_collections_configs/fashion_mnist.py"

# Stands in for patchdiff.main: prints its arguments and devices, fails on --config.seed=2, and
# on SIGTERM says so and exits 0 (as patchdiff.main does after its checkpoint).
FAKE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda s, f: (print("saved on SIGTERM", flush=True), sys.exit(0)))
print("args", " ".join(sys.argv[1:]), flush=True)
print("devices", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
if "--config.seed=2" in sys.argv:
    sys.exit(3)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""


# ---------------------------------------------------------------------------- the language


@pytest.mark.parametrize(
    "value, text",
    [
        (3e-4, "0.0003"),
        (1e-5, "1e-05"),
        (2.0, "2.0"),
        (64, "64"),
        (True, "True"),
        (False, "False"),
        ("dpmpp_2m", "dpmpp_2m"),
        ((1, 2, 2), "(1,2,2)"),
        (("fid",), "('fid',)"),
        ((), "()"),
        ((1.0, 0.5), "(1.0,0.5)"),
    ],
)
def test_values_render_as_ml_collections_reads_them(value, text):
    assert S.render_value(value) == text


def test_rendered_overrides_parse_back_to_the_values_through_ml_collections():
    overrides = {
        "train.lr": 3e-4,
        "train.batch_size": 32,
        "distributed": True,
        "data.random_flip": False,
        "sample.sampler": "dpmpp_2m",
        "model.channel_mult": (1, 2, 4),
        "eval.metrics": ("fid", "kid"),
        "diffusion.patch_scales": (1.0,),
    }
    config = S.resolve_config(FMNIST, S.override_args(overrides))
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        got = getattr(config[section] if section else config, field)
        assert got == value and type(got) is type(value), key


def test_keys_are_config_paths_without_the_config_prefix():
    with pytest.raises(S.SweepError, match="without the 'config.' prefix, as 'train.lr'"):
        S.sweep("config.train.lr", [1e-3])
    with pytest.raises(S.SweepError, match="not a config path"):
        S.fixed({"train..lr": 1})
    for bad in ([1, 2], None, {"a": 1}, float("nan")):
        with pytest.raises(S.SweepError, match="is not allowed: use a bool, int, float, str"):
            S.sweep("model.channel_mult", [bad])
    with pytest.raises(S.SweepError, match="needs a list of values"):
        S.sweep("train.lr", 3e-4)


def test_product_zip_chain_fixed_and_named_trials_compose():
    lrs = S.sweep("train.lr", [1e-3, 3e-4])
    pairs = S.zip_(S.sweep("train.batch_size", [32, 64]), S.sweep("model.channels", [16, 32]))
    swept = S.product(S.fixed({"train.total_steps": 200}), lrs, pairs)
    assert len(swept) == 4
    assert dict(swept[1].overrides) == {
        "train.total_steps": 200,
        "train.lr": 1e-3,
        "train.batch_size": 64,
        "model.channels": 32,
    }  # the last factor varies fastest
    both = S.chain(S.trial("baseline"), swept, S.product(S.trial("big", {"model.channels": 64})))
    names = [n for n, _ in S.named_trials(both)]
    assert names == [
        "baseline",
        "lr=0.001,batch_size=32,channels=16",  # fixed keys stay out of the names
        "lr=0.001,batch_size=64,channels=32",
        "lr=0.0003,batch_size=32,channels=16",
        "lr=0.0003,batch_size=64,channels=32",
        "big",
    ]
    named = S.product(S.trial("small", {"model.channels": 8}), lrs)
    assert [n for n, _ in S.named_trials(named)] == ["small,lr=0.001", "small,lr=0.0003"]
    with pytest.raises(S.SweepError, match="key 'train.lr' is set by two parts"):
        S.product(lrs, S.sweep("train.lr", [1.0]))
    with pytest.raises(S.SweepError, match=r"equal lengths, got lengths \[2, 3\]"):
        S.zip_(lrs, S.sweep("train.batch_size", [1, 2, 3]))
    with pytest.raises(S.SweepError, match="takes sweeps"):
        S.product(lrs, [{"train.lr": 1}])


def test_names_are_filesystem_safe_stable_and_unique():
    clash = S.product(S.sweep("train.lr", [0.1]), S.sweep("nag.finetune.lr", [0.2]))
    assert S.trial_name(clash[0]) == "train.lr=0.1,nag.finetune.lr=0.2"  # same last part
    odd = S.sweep("data.path", ["/data/my set"])
    assert S.trial_name(odd[0]) == "path=_data_my_set"
    long = S.product(*[S.sweep(f"a.k{i}", ["x" * 20]) for i in range(10)])
    name = S.trial_name(long[0])
    assert len(name) <= S.MAX_DERIVED_NAME and S.NAME_CHARS.fullmatch(name)
    assert name == S.trial_name(long[0])  # the same overrides, the same name
    assert S.trial_name(S.fixed({})[0]) == "default"
    with pytest.raises(S.SweepError, match="trials 0 and 2 are both named 'lr=0.1'"):
        S.named_trials(S.sweep("train.lr", [0.1, 0.2, 0.1]))
    with pytest.raises(S.SweepError, match="trial name '../x' is not allowed"):
        S.trial("../x")


def test_the_example_sweeps_load_with_unique_names():
    sweeps = sorted((ROOT / "launch" / "sweeps").glob("*.py"))
    assert len(sweeps) >= 2
    for path in sweeps:
        names = [n for n, _ in S.named_trials(S.load_sweep(path))]
        assert len(set(names)) == len(names) > 1
    grid = S.load_sweep(ROOT / "launch" / "sweeps" / "fmnist_lr_batch.py")
    assert len(grid) == 6
    for t in grid:  # every trial's overrides are fields the demo config holds, of their types
        S.resolve_config(FMNIST, S.override_args(t.overrides))


# ------------------------------------------------------------------------- trial records


def test_a_workdir_recorded_with_other_overrides_is_refused(tmp_path):
    record = S.open_record(tmp_path, "a", 0, FMNIST, ["--config.train.lr=0.1"])
    S.write_json(tmp_path / "trial.json", record)
    assert [p.name for p in tmp_path.iterdir()] == ["trial.json"]  # no temporary left
    again = S.open_record(tmp_path, "a", 0, str(ROOT / FMNIST), ["--config.train.lr=0.1"])
    assert again["args"] == ["--config.train.lr=0.1"]  # the same config by another path
    with pytest.raises(S.SweepError, match=f"{tmp_path} holds a trial with other overrides"):
        S.open_record(tmp_path, "a", 0, FMNIST, ["--config.train.lr=0.2"])


# ------------------------------------------------------------------------- the runner


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    return [sys.executable, str(path)]


def test_trials_run_in_parallel_slots_pinned_to_their_devices(tmp_path, fake, capsys):
    trials = S.sweep("seed", [0, 1, 2, 3])
    jobs = S.plan(trials, FMNIST, tmp_path / "runs", ["--mode=train"], program=fake)
    code = S.run_jobs(jobs, FMNIST, S.device_slots("0,1,2,3", 2), poll_s=0.01)
    assert code == 1 and "failed: seed=2" in capsys.readouterr().out
    for job in jobs:
        record = json.loads((job.workdir / "trial.json").read_text())
        log = (job.workdir / "log.txt").read_text()
        assert record["args"] == [f"--config.seed={job.index}"]
        assert record["exit_code"] == (3 if job.index == 2 else 0)
        assert record["runs"][-1]["devices"] in ("0,1", "2,3")
        assert f"devices {record['runs'][-1]['devices']}" in log
        assert f"--workdir {job.workdir} --config.seed={job.index} --mode=train" in log
    # Again: each trial's record gains a run (patchdiff.main would resume).
    S.run_jobs(jobs[:1], FMNIST, [None], poll_s=0.01)
    record = json.loads((jobs[0].workdir / "trial.json").read_text())
    assert len(record["runs"]) == 2 and record["exit_code"] == 0


def test_sigterm_reaches_the_running_trials_and_no_other_starts(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "60")
    jobs = S.plan(S.sweep("seed", [0, 1, 3]), FMNIST, tmp_path, program=fake)
    log = jobs[0].workdir / "log.txt"

    def stop_when_running():
        while "devices" not in (log.read_text() if log.exists() else ""):
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_running, daemon=True).start()
    assert S.run_jobs(jobs, FMNIST, [None], poll_s=0.01) == 0
    assert "saved on SIGTERM" in log.read_text()
    assert not jobs[1].workdir.exists() and not jobs[2].workdir.exists()


def test_exec_makes_the_process_the_trial_with_one_record(tmp_path):
    script = textwrap.dedent(f"""
        import pathlib, sys
        from launch import sweep as S
        job = S.Job(0, "t", pathlib.Path({str(tmp_path)!r}) / "t",
                    [sys.executable, "-c", "print('trial ran')"], ["--config.seed=0"])
        S.exec_job(job, {FMNIST!r})
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout == "trial ran\n", out.stderr
    record = json.loads((tmp_path / "t" / "trial.json").read_text())
    assert record["args"] == ["--config.seed=0"] and len(record["runs"]) == 1


@pytest.mark.parametrize(
    "devices, parallel, message",
    [
        ("0,1", 3, "--parallel 3 cannot split --devices 0,1"),
        ("0,1,2", 2, "--parallel 2 cannot split --devices 0,1,2"),
        ("a,b", 1, "--devices 'a,b': give GPU ids"),
        (None, 0, "--parallel 0: give a positive number"),
    ],
)
def test_device_slots_refuse_what_cannot_be_split(devices, parallel, message):
    with pytest.raises(S.SweepError, match=message):
        S.device_slots(devices, parallel)


# ------------------------------------------------------------------------- command line


def cli(capsys, *argv):
    code = S.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_and_dry_run_print_the_trials(tmp_path, capsys):
    sweep = "launch/sweeps/fmnist_lr_batch.py"
    code, out, _ = cli(capsys, "--sweep", sweep, "--list")
    assert code == 0 and len(out.splitlines()) == 6
    assert out.splitlines()[1].split()[:2] == ["1", "lr=0.001,batch_size=64"]
    code, out, _ = cli(
        capsys, "--sweep", sweep, "--config", FMNIST, "--root", str(tmp_path), "--dry-run",
        "--parallel", "2", "--devices", "0,1,2,3", "--", "--config.train.total_steps=5",
    )  # fmt: skip
    lines = out.splitlines()
    assert code == 0 and len(lines) == 6 and not any(tmp_path.iterdir())
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=0,1 ")
    assert lines[1].startswith("CUDA_VISIBLE_DEVICES=2,3 ")
    assert "-m patchdiff.main --config ml_collections_configs/fashion_mnist.py --workdir" in out
    assert (
        "--config.train.lr=0.001 --config.train.batch_size=32 --config.train.total_steps=5" in out
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "nowhere.py", "--list"], "--sweep nowhere.py: no such file"),
        (["--sweep", "{empty}", "--list"], "defines no get_sweep()"),
        (["--sweep", "{sweep}", "--list", "--bogus"], "unrecognized arguments: --bogus"),
        (["--sweep", "{sweep}"], "--config is required"),
        (["--sweep", "{sweep}", "--config", "no.py", "--root", "r"], "--config no.py: no such"),
        (
            ["--sweep", "{sweep}", "--config", FMNIST, "--root", "r", "--parallel", "4",
             "--devices", "0,1"],
            "--parallel 4 cannot split --devices 0,1 (2 GPUs) evenly",
        ),
        (
            ["--sweep", "{sweep}", "--config", FMNIST, "--root", "r", "--index", "6"],
            "--index 6 is out of range: the sweep has 6 trials, allowed 0 to 5",
        ),
        (
            ["--sweep", "{sweep}", "--config", FMNIST, "--root", "r", "--", "--config.train.lrr=1"],
            'Did you mean "lr"',
        ),
        (
            ["--sweep", "{sweep}", "--config", FMNIST, "--root", "r", "--", "--workdir=x"],
            "the sweep sets --config and each trial's --workdir",
        ),
        (["--sweep", "{sweep}", "--config", FMNIST, "--root", "r", "--exec"], "--exec needs"),
    ],
)  # fmt: skip
def test_bad_inputs_get_one_sentence_and_exit_2(tmp_path, capsys, argv, message):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    sweep = str(ROOT / "launch" / "sweeps" / "fmnist_lr_batch.py")
    argv = [a.format(empty=empty, sweep=sweep) for a in argv]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == "", err
    assert err.startswith("launch.sweep: ") and message in err and len(err.splitlines()) == 1


def test_devices_are_refused_on_a_tpu_vm(capsys, monkeypatch):
    monkeypatch.setattr(S, "_tpu_host", lambda: "/dev/accel0")
    sweep = "launch/sweeps/fmnist_lr_batch.py"
    code, _, err = cli(
        capsys, "--sweep", sweep, "--config", FMNIST, "--root", "r", "--devices", "0"
    )
    assert code == 2 and "looks like a TPU VM (/dev/accel0)" in err


def test_the_module_runs_as_a_program_and_reads_sweeps_that_import_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "--sweep", "launch/sweeps/fmnist_batch_lr_zip.py",
         "--list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "full_images  --config.diffusion.patch_scales=(1.0,)" in out.stdout

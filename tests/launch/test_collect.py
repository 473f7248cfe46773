"""launch.collect: the table of a sweep's trials from made-up workdirs (done, failed, running,
garbled), and from a real 2-trial sweep of a tiny training run by launch.sweep."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from launch import collect as C

ROOT = pathlib.Path(__file__).parents[2]


def trial(root, name, args, exit_code="absent", metrics=None, index=0, **run):
    workdir = root / name
    workdir.mkdir(parents=True)
    runs = [] if exit_code == "absent" else [{"command": ["x"], "exit_code": exit_code, **run}]
    record = {"name": name, "index": index, "config": "c.py", "args": args, "runs": runs}
    (workdir / "trial.json").write_text(json.dumps(record))
    if metrics is not None:
        (workdir / "metrics.jsonl").write_text("".join(m + "\n" for m in metrics))
    return workdir


def made_up_sweep(root):
    report = '{{"step": {s}, "loss": {l}, "img_per_s": 100.0, "lr": 0.001}}'
    done = trial(
        root,
        "lr=0.001",
        ["--config.train.lr=0.001", "--config.train.total_steps=20"],
        0,
        [
            report.format(s=10, l=0.5),
            '{"step": 10, "fd_fmnist@5k": 40.0, "precision@5k": 0.5, "eval_seconds": 3.0}',
            report.format(s=20, l=0.4),
            '{"step": 20, "fd_fmnist@5k": 45.0, "precision@5k": 0.7, "eval_seconds": 3.0}',
            '{"step": 2',  # a line cut by a crash
        ],
    )
    (done / "eval").mkdir()
    quality = {"best": {"fd_fmnist@5k": 38.0}, "repeats": []}
    (done / "eval" / "step_20.json").write_text(
        json.dumps({"step": 20, "objective": 0.25, "sample_quality": quality})
    )
    (done / "eval" / "step_10.json").write_text("{}")  # older: not read
    (done / "eval" / "fmnist_test.npz").write_text("")  # cached statistics: not a result
    trial(root, "lr=0.01", ["--config.train.lr=0.01", "--config.train.total_steps=20"], 1, index=1)
    trial(
        root,
        "lr=0.1",
        ["--config.train.lr=0.1", "--config.train.total_steps=20"],
        None,
        [report.format(s=5, l=0.9)],
        index=2,
    )
    for i, step in enumerate((20, 10)):  # srun runs: the record has no exit code
        trial(root, f"srun{i}", ["--config.train.lr=1.0", "--config.train.total_steps=20"], None,
              [report.format(s=step, l=0.3)], index=3 + i, via="srun", total_steps=20)  # fmt: skip
    garbled = root / "garbled"
    garbled.mkdir()
    (garbled / "trial.json").write_text("{not json")
    (root / "empty").mkdir()  # neither file: not a trial


def test_the_table_shows_every_trial_and_never_stops_at_a_bad_file(tmp_path, capsys):
    made_up_sweep(tmp_path)
    rows = {r["name"]: r for r in C.collect(tmp_path)}
    assert sorted(rows) == ["garbled", "lr=0.001", "lr=0.01", "lr=0.1", "srun0", "srun1"]
    done = rows["lr=0.001"]
    assert done["status"] == "done" and done["step"] == 20 and done["loss"] == 0.4
    assert done["img/s"] == 100.0
    assert done["fd_fmnist@5k"] == 45.0 and done["best fd_fmnist@5k"] == 40.0  # lower is better
    assert done["precision@5k"] == 0.7 and done["best precision@5k"] == 0.7  # higher is better
    assert done["eval step"] == 20 and done["eval fd_fmnist@5k"] == 38.0
    assert done["eval objective"] == 0.25
    assert "1 garbled line(s) in metrics.jsonl skipped" in done["notes"]
    assert rows["lr=0.01"]["status"] == "failed (exit 1)" and "step" not in rows["lr=0.01"]
    assert rows["lr=0.1"]["status"] == "running" and rows["lr=0.1"]["step"] == 5
    assert "trial.json unreadable" in rows["garbled"]["notes"]
    assert rows["srun0"]["status"] == "done"  # its metrics reached total_steps
    assert rows["srun1"]["status"] == "started (srun)"

    assert C.main([str(tmp_path), "--sort", "loss", "--json", str(tmp_path / "o.json"),
                   "--csv", str(tmp_path / "o.csv")]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "every trial: train.total_steps=20"  # the same in every trial
    header = out[1].split()
    assert header[:3] == ["name", "status", "train.lr"] and "best" in header
    names = [line.split()[0] for line in out[3:]]
    assert names == ["srun0", "srun1", "lr=0.001", "lr=0.1", "lr=0.01", "garbled"]  # no loss last
    assert len({len(line) for line in out[1:]}) == 1  # aligned
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved[0]["overrides"] == {"train.lr": "0.001", "train.total_steps": "20"}
    table = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert table[2]["name"] == "lr=0.001" and table[2]["fd_fmnist@5k"] == "45.0"


def test_sorting_by_an_unknown_column_or_a_missing_root_is_one_sentence(tmp_path, capsys):
    made_up_sweep(tmp_path)
    assert C.main([str(tmp_path), "--sort=-fid@50k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch.collect: --sort -fid@50k: no such column; the columns: name")
    assert C.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert C.main([str(tmp_path / "empty")]) == 2
    assert "holds no trial" in capsys.readouterr().err
    assert C.main([str(tmp_path), "--sort=-loss"]) == 0
    first = capsys.readouterr().out.splitlines()[3]
    assert first.split()[0] == "lr=0.1"  # highest loss first


TINY = """
from ml_collections_configs import base


def get_config(arg=None):
    config = base.get_config()
    config.data.source = "npz"
    config.data.path = {data!r}
    config.data.resolution = 8
    config.data.threads = 1
    config.model.channels = 8
    config.model.channel_mult = (1,)  # one level, no attention: a quick compile
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.head_dim = 8
    config.model.dropout = 0.0
    config.model.num_classes = 0
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size = 8
    config.train.total_steps = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.sample_every = 0
    config.train.grad_noise_scale = False
    config.eval.sample_quality = False
    return config
"""


def test_a_real_sweep_of_a_tiny_training_runs_and_is_collected(tmp_path, capsys):
    """Two trials of 2 steps (seeds 0 and 1: the same programs), both at once, through
    `python -m launch.sweep --parallel 2`, then the table. On 2 cores: 28 s with a cold
    compilation cache, 15 s with a warm one (50 and 98 s with a 2-level U-Net, in sequence)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(32) % 3)
    (tmp_path / "tiny.py").write_text(TINY.format(data=str(tmp_path / "d.npz")))
    (tmp_path / "sweep.py").write_text(
        "from launch.sweep import sweep\n\n\ndef get_sweep():\n    return sweep('seed', [0, 1])\n"
    )
    # One CPU device: compiling for the suite's 8 fake devices is slower (tests/train does so).
    from conftest import TEST_XLA_FLAGS

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {TEST_XLA_FLAGS}")
    command = [sys.executable, "-m", "launch.sweep", "--sweep", str(tmp_path / "sweep.py"),
               "--config", str(tmp_path / "tiny.py"), "--root", str(tmp_path / "runs"),
               "--parallel", "2"]  # fmt: skip
    t0 = time.time()
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    print(f"2-trial sweep: {time.time() - t0:.0f} s")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[1] seed=1: exit 0" in out.stdout
    for seed in (0, 1):
        workdir = tmp_path / "runs" / f"seed={seed}"
        assert (workdir / "checkpoints" / "2").is_dir(), (workdir / "log.txt").read_text()
        assert json.loads((workdir / "trial.json").read_text())["exit_code"] == 0

    capsys.readouterr()
    assert C.main([str(tmp_path / "runs"), "--sort", "seed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "status", "seed", "step", "loss"]
    assert [line.split()[:4] for line in lines[2:]] == [
        ["seed=0", "done", "0", "2"],
        ["seed=1", "done", "1", "2"],
    ]

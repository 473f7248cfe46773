"""launch.xm_launch without xmanager: the pure functions that make the work units (args, names,
workdirs, requirements, the image), and the command line's dry run and refusals."""

import pathlib
import sys

import pytest

from launch import sweep as S
from launch import xm_launch as X

ROOT = pathlib.Path(__file__).parents[2]
FMNIST = "ml_collections_configs/fashion_mnist.py"
SWEEP = "launch/sweeps/fmnist_batch_lr_zip.py"


def test_work_units_carry_the_trials_overrides_and_their_own_workdirs(tmp_path):
    trials = S.load_sweep(ROOT / SWEEP)
    extra = X.extra_args(["--config.train.total_steps=200", "--mode=train"])
    units = X.work_units(trials, FMNIST + ":runlocal", str(tmp_path), "{root}/{name}", extra)
    assert [u["name"] for u in units] == [n for n, _ in S.named_trials(trials)]
    assert units[1]["args"] == {
        "config": f"{ROOT / FMNIST}:runlocal",
        "config.train.batch_size": "32",
        "config.train.lr": "0.001",
        "config.train.total_steps": "200",
        "mode": "train",
    }
    assert units[4]["args"]["config.diffusion.patch_scales"] == "(1.0,)"
    assert units[1]["workdir"] == f"{tmp_path}/batch_size=32,lr=0.001"  # launch.sweep's
    per_launch = X.work_units(trials, FMNIST, str(tmp_path), "{root}/{xid}/{wid}-{name}", {})
    assert per_launch[0]["workdir"] == f"{tmp_path}/{{xid}}/{{wid}}-demo"
    filled = per_launch[0]["workdir"].format(xid=17, wid=3)
    assert filled == f"{tmp_path}/17/3-demo"
    with pytest.raises(X.XmError, match=r"--workdir_template '\{root\}/\{trial\}'"):
        X.work_units(trials, FMNIST, str(tmp_path), "{root}/{trial}", {})
    # Vertex: the config inside the image's copy of the repository, the root a container path.
    vertex = X.work_units(trials, f"{ROOT / FMNIST}:runlocal", "/gcs/b/r", "{root}/{name}", {},
                          "vertex")  # fmt: skip
    assert vertex[0]["args"]["config"] == f"{FMNIST}:runlocal"
    assert vertex[0]["workdir"] == "/gcs/b/r/demo"
    with pytest.raises(X.XmError, match="--root runs: on Vertex give an absolute path"):
        X.work_units(trials, FMNIST, "runs", "{root}/{name}", {}, "vertex")
    outside = tmp_path / "c.py"
    with pytest.raises(X.XmError, match=f"--config {outside}: on Vertex the config must be"):
        X.work_units(trials, str(outside), "/gcs/b", "{root}/{name}", {}, "vertex")


def test_extra_args_are_name_value_flags_and_never_config_or_workdir():
    assert X.extra_args([]) == {}
    for bad, message in (("--config.train.lr", "--name=value"), ("x=1", "--name=value"),
                         ("--workdir=/w", "set per work unit")):  # fmt: skip
        with pytest.raises(X.XmError, match=message):
            X.extra_args([bad])


def test_requirements_images_and_names_for_vertex():
    assert X.requirements("vertex", "A100", 8) == {"a100": 8}
    assert X.requirements("vertex", None, 1) == {} == X.requirements("local", None, 1)
    with pytest.raises(X.XmError, match="--accelerator is for --backend vertex"):
        X.requirements("local", "a100", 1)
    with pytest.raises(X.XmError, match="--accelerator z80: Vertex AI offers t4, p4"):
        X.requirements("vertex", "z80", 1)
    with pytest.raises(X.XmError, match="--backend gke: allowed: local, vertex"):
        X.requirements("gke", None, 1)
    with pytest.raises(X.XmError, match="--accelerator_count 0"):
        X.requirements("vertex", "h100", 0)
    gpu = X.docker_instructions("/src/patchdiff", "h100")
    assert gpu[-3:] == ["COPY patchdiff/ /workdir/patchdiff", "WORKDIR /workdir/patchdiff",
                        'RUN python -m pip install -e ".[gpu]"']  # fmt: skip
    assert X.docker_instructions("/src/patchdiff", "tpu_v3")[-1].endswith('".[tpu]"')
    assert X.display_name("batch_size=32,lr=0.001") == "batch-size-32-lr-0-001"


def test_the_vertex_accelerators_are_xmanager_resource_types():
    xm = pytest.importorskip("xmanager.xm", reason="xmanager is not installed (as in CI)")
    for name in X.VERTEX_GPUS + X.VERTEX_TPUS:
        assert xm.ResourceType[name] in set(xm.GpuType) | set(xm.TpuType)


def test_dry_run_prints_the_work_units_without_xmanager(tmp_path, capsys):
    code = X.main(["--config", FMNIST, "--sweep", SWEEP, "--root", str(tmp_path), "--dry_run",
                   "--", "--config.train.total_steps=5"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 6
    assert out[0] == (
        f"demo: python -m patchdiff.main --config={ROOT / FMNIST} "
        f"--config.train.total_steps=5 --workdir={tmp_path}/demo"
    )


def test_missing_xmanager_and_bad_inputs_get_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "xmanager", None)  # as in CI: `import xmanager` fails
    base = ["--config", FMNIST, "--root", str(tmp_path)]
    for argv, message in (
        (base, 'xmanager is not installed: pip install -e ".[launch]"'),
        (base + ["--bogus"], "unrecognized arguments: --bogus"),
        (base + ["--sweep", "nowhere.py"], "--sweep nowhere.py: no such file"),
        (base + ["--", "--config.train.lrr=1"], 'Did you mean "lr"'),
        (["--root", "r"], "the following arguments are required: --config"),
    ):
        assert X.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("launch.xm_launch: ") and message in err and err.count("\n") == 1

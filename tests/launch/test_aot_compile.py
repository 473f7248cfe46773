"""launch/aot_compile.py: the real train step lowered for abstract meshes of 8 and 64 devices
(state bytes against the parameter count, the batch shard, FLOPs, the XLA:CPU estimate where the
process has the devices), the refusals (a batch that does not split, a mesh.model that does not
divide, an unknown topology, a capacity too small: exit code 1, one sentence), and, where libtpu
imports, a compile for v5e-8 and XLA:TPU's own out-of-memory refusal."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import tiny_config
from launch import aot_compile as aot
from patchdiff import config as config_lib
from patchdiff.models import build_model, dummy_inputs

ROOT = pathlib.Path(__file__).parents[2]
FMNIST = "ml_collections_configs/fashion_mnist.py:runlocal"


def small_config(batch_size=64):
    """The tests' tiny U-Net at 8x8, one level, no attention, one patch size: one program per
    mesh, compiled by XLA:CPU in seconds."""
    config = tiny_config(resolution=8, attn_resolutions=(), channel_mult=(1,))
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size = batch_size
    return config_lib.validate(config)


def parameter_count(config) -> int:
    x, c_noise, kwargs = dummy_inputs(config)
    shapes = jax.eval_shape(build_model(config).init, jax.random.key(0), x, c_noise, **kwargs)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


@pytest.fixture(scope="module")
def analysed():
    """{devices: (prepared, reports)}: 8 devices compiled for XLA:CPU (the process has 8), 64
    lowered only (it has not)."""
    out = {}
    for devices in (8, 64):
        prepared = aot.prepare(small_config(), aot.abstract_mesh(small_config(), devices))
        out[devices] = prepared, aot.analyse(prepared, compile_for="cpu")
    return out


def aot_command(*argv):
    return subprocess.run(
        [sys.executable, "-m", "launch.aot_compile", "--config", FMNIST, *map(str, argv)],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_state_and_batch_bytes_per_device_are_exact(analysed):
    config = small_config()
    # params, EMA, Adam's two moments: 4 float32 copies; then the scalars: step, nimg, bad_step
    # (int32), the key (uint32 [2]), optax's two step counts (int32) and the learning rate.
    expected_state = 4 * 4 * parameter_count(config) + 4 + 4 + 4 + 8 + 4 + 4 + 4
    image = 8 * 8 * 3 * 4 + 4  # float32 [8, 8, 3] and its int32 label
    for devices, (_, [report]) in analysed.items():
        assert report.patch_size == 8 and report.global_batch == 64
        assert report.batch_per_device == 64 // devices
        assert report.state_bytes == expected_state  # replicated: the same on 8 and 64
        assert report.batch_bytes == 64 // devices * image


def test_flops_and_the_xla_cpu_estimate(analysed):
    prepared8, [on8] = analysed[8]
    prepared64, [on64] = analysed[64]
    # The unpartitioned program is the same arithmetic whatever the mesh.
    assert on8.flops_global > 1e6 and on8.flops_global == pytest.approx(on64.flops_global, 1e-3)
    assert on8.compiler == "XLA:CPU estimate" and on8.temporaries > 0
    assert on8.flops_per_device > 0 and not on8.lower_bound
    assert on8.total == (on8.arguments + on8.outputs - on8.aliased + on8.temporaries
                         + on8.generated_code)  # fmt: skip
    # jit drops the inputs that the program does not read (an unconditional model's labels).
    assert on8.state_bytes <= on8.arguments <= on8.state_bytes + on8.batch_bytes
    # This process has 8 CPU devices, not 64: lowered only, the total a lower bound, and said.
    assert on64.lower_bound and on64.temporaries is None and on64.compiler == ""
    assert on64.total == on64.state_bytes + on64.batch_bytes
    assert any("temporaries not estimated" in note for note in prepared64.notes)
    assert not prepared8.notes

    table = aot.format_table([on8], 8)
    assert "patch 8" in table and "temporaries" in table and "per device (compiled)" in table
    assert f"{on8.temporaries / aot.MIB:,.1f}" in table
    assert ">= " in aot.format_table([on64], 64)


def test_fit_message(analysed):
    _, [on8] = analysed[8]
    assert aot.fit_message([on8], None, "--memory-gib") is None
    assert aot.fit_message([on8], 80, "--memory-gib") is None
    message = aot.fit_message([on8], 1e-6, "a v5e chip")
    assert message.count(". ") == 0 and message.endswith(".")
    assert f"{on8.total / aot.GIB:.3g} GiB per device" in message and "v5e chip" in message
    for field in ("batch_size", "grad_accum", "mesh.model", "model.dtype"):
        assert field in message
    _, [on64] = analysed[64]
    assert "at least" in aot.fit_message([on64], 1e-6, "--memory-gib")


def test_patch_plan_is_the_loops():
    config = config_lib.load_file(str(ROOT / FMNIST))  # Patch Diffusion's three sizes
    assert aot.patch_plan(config) == ({32: 16, 16: 32, 8: 64}, set())
    config.diffusion.patch_probs = (1.0, 0.0, 0.0)  # a size never drawn is never compiled
    assert aot.patch_plan(config) == ({32: 16}, set())


def test_a_batch_that_does_not_split_is_refused():
    config = small_config(batch_size=32)
    with pytest.raises(aot.AotError) as e:
        aot.prepare(config, aot.abstract_mesh(config, 64))
    assert str(e.value) == (
        "config.train.batch_size = 32 gives a global batch of 32 images at patch size 8, which "
        "does not split over the 64-way data axis of 64 devices: make config.train.batch_size a "
        "multiple of 64, or raise config.mesh.model."
    )


def test_the_model_axis_must_divide_the_devices_and_the_parameters():
    config = small_config()
    config.mesh.model = 3
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh.model = 3 .* the 8 devices\."):
        aot.abstract_mesh(config, 8)
    config.mesh.model = 2  # the output convolution's 3 channels do not split in two
    with pytest.raises(aot.AotError) as e:
        aot.abstract_state(config, aot.abstract_mesh(config, 8))
    assert str(e.value) == (
        "config.mesh.model = 2 does not split the state's .params['conv_out']['bias'] of shape "
        "(3,) (sharded as P('model',)): choose a config.mesh.model that divides its sharded axis, "
        "or 1."
    )
    config.data.channels = 4
    *_, state = aot.abstract_state(config, aot.abstract_mesh(config, 8))
    n = parameter_count(config)
    assert 8 * n < aot.shard_bytes(state) < 16 * n  # the wide axes halved, the rest replicated


def test_topology_names():
    for name, chip, chips, shape, hosts in [
        ("v5e-256", "v5e", 256, "16x16", (2, 2, 1)),
        ("v5litepod-8", "v5e", 8, "2x4", (2, 4, 1)),
        ("v4-32", "v4", 16, "2x2x4", (2, 2, 1)),
        ("v5p-128", "v5p", 64, "4x4x4", (2, 2, 1)),
        ("v6e-8", "v6e", 8, "2x4", (2, 4, 1)),
    ]:
        topology = aot.parse_topology(name)
        assert (topology.chip, topology.chips, topology.shape) == (chip, chips, shape)
        assert topology.host_bounds == hosts
    for bad in ("v5e-12", "v4-4", "h100-8", "v5e"):
        with pytest.raises(aot.AotError, match=r"is not known; known: v4-8, .*v5e-256, .*\.$"):
            aot.parse_topology(bad)


needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_installed(), reason='libtpu is not installed (pip install -e ".[aot]")'
)


@pytest.fixture
def jax_config_kept():
    """Undoes what choose_target sets in jax's config, for the tests that follow."""
    names = ("jax_enable_compilation_cache", "jax_platforms")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture
def libtpu_environment(monkeypatch, jax_config_kept):
    """topology_mesh's defaults for libtpu's environment, set here so that they are undone."""
    defaults = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
                "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # fmt: skip
    for name, value in defaults.items():
        monkeypatch.setenv(name, os.environ.get(name, value))
    # As the command line does: a compile-only client cannot load a cached executable.
    jax.config.update("jax_enable_compilation_cache", False)


def test_choose_target(monkeypatch, jax_config_kept):
    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    topology, devices, compile_for = aot.choose_target("v5e-8", None, cpu_estimate=True)
    assert (topology.name, devices, compile_for) == ("v5e-8", 8, "cpu")  # the abstract fallback
    assert aot.choose_target(None, 64, cpu_estimate=False) == (None, 64, None)
    monkeypatch.setattr(aot, "libtpu_installed", lambda: True)
    assert aot.choose_target("v4-32", None, cpu_estimate=True)[1:] == (16, "tpu")
    for topology, devices, message in [
        (None, None, "give one of --topology NAME or --devices N."),
        ("v5e-8", 8, "give one of --topology NAME or --devices N."),
        (None, 0, "--devices must be a positive number of devices, not 0."),
    ]:
        with pytest.raises(aot.AotError) as e:
            aot.choose_target(topology, devices, cpu_estimate=True)
        assert str(e.value) == message


def test_the_command_line_refuses_with_one_sentence_and_exit_code_1(tmp_path):
    # The state and batch shards overflow before anything is lowered.
    result = aot_command("--devices", "8", "--memory-gib", "0.001", "--json", tmp_path / "a.json")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("aot_compile: the train step at patch size 8 needs at least ")
    assert "more than the 0.001 GiB of --memory-gib" in last
    assert "state (shardings)" in result.stdout and "5.3" in result.stdout
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["refusal"] == last.removeprefix("aot_compile: ")
    assert record["mesh"] == {"data": 8, "model": 1} and record["capacity_gib"] == 0.001
    assert [p["patch_size"] for p in record["patch_sizes"]] == [32, 16, 8]  # the runlocal plan
    assert all(p["total_is_lower_bound"] and p["state_bytes"] > 5e6 for p in record["patch_sizes"])
    # A config that patchdiff.config.validate refuses: one line, as patchdiff.main says it.
    result = aot_command("--devices", "8", "--config.train.batch_size=0")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "patchdiff: config.train.batch_size = 0 is not allowed: it must be a positive integer."
    )


@needs_libtpu
def test_compiles_for_v5e_8(libtpu_environment):
    config = small_config()
    mesh = aot.topology_mesh(config, aot.parse_topology("v5e-8"))
    assert mesh.size == 8 and mesh.devices.flat[0].platform == "tpu"
    [report] = aot.analyse(aot.prepare(config, mesh), compile_for="tpu")
    assert report.compiler == "XLA:TPU" and not report.lower_bound
    assert report.arguments >= report.state_bytes  # XLA:TPU pads small arrays to its tiles
    assert report.temporaries > 0 and report.generated_code > 0
    assert report.flops_per_device > 0 and report.flops_global > 0
    assert aot.fit_message([report], aot.CHIPS["v5e"].hbm_gib, "a v5e chip") is None


@needs_libtpu
def test_xla_tpu_out_of_memory_is_refused(libtpu_environment):
    config = small_config(batch_size=2**18)  # temporaries far beyond one v5e chip
    mesh = aot.topology_mesh(config, aot.parse_topology("v5e-1"))
    with pytest.raises(aot.AotError, match=r"^XLA:TPU ran out of memory compiling the train step "
                       r"at patch size 8 \(its temporaries need .* of HBM it may use per device\): "
                       r"lower config.train.batch_size, .*'bfloat16'\.$"):  # fmt: skip
        aot.analyse(aot.prepare(config, mesh), compile_for="tpu")

"""Ahead-of-time compile of the real train step for a pod this machine is not on: memory per
device and FLOPs per step at every patch size a config trains at, and a refusal (exit code 1, one
sentence) when the step will not fit, before a pod is booked.

    pip install -e ".[aot]"   # libtpu: compiles for TPU topologies on a CPU-only machine
    python -m launch.aot_compile --config ml_collections_configs/cifar10_ddpmpp.py --topology v5e-8
    python -m launch.aot_compile --config ml_collections_configs/fashion_mnist.py --devices 64 \
        --memory-gib 80 --config.train.batch_size=1024 --json /tmp/aot.json

- `--topology NAME` (a Cloud TPU slice: v4-32, v5e-256, v5p-128, v6e-8, ...) compiles for that
  slice's compile-only devices (`jax.experimental.topologies`, libtpu needed, no TPU): the numbers
  are XLA:TPU's own. Without libtpu it falls back to the abstract target below, for as many
  devices as the slice has chips, and says so.
- `--devices N` lowers against a `jax.sharding.AbstractMesh` of N devices: shapes and shardings
  are checked, state and batch bytes per device are exact (from the shardings), FLOPs come from
  the lowered program; temporaries are an XLA:CPU estimate, from compiling the same partitioned
  program for N CPU devices (`--nocpu-estimate` skips it). XLA:CPU fuses, schedules and keeps
  buffers unlike XLA:TPU or XLA:GPU: for cifar10_ddpmpp.py at 64 images per device it kept 8.6x
  the temporaries XLA:TPU did, so a refusal on its estimate says to compile for the target.
  GPU targets need a GPU to compile.

Memory per device is XLA's accounting: arguments (state shards + batch shard) + outputs - aliased
(the donated state's outputs reuse its buffers) + temporaries + generated code. The capacity is
`--memory-gib`, by default the chip's HBM for a topology (none for --devices: nothing is checked).
Glossary: B global batch, R resolution, p patch size, C channels, N devices.
"""

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from patchdiff import config as config_lib
from patchdiff import data as data_lib
from patchdiff.diffusion.build import build_patch_schedule
from patchdiff.models import build_model
from patchdiff.models.partitioning import REPLICATED_RULES
from patchdiff.train.loop import MODEL_PARALLEL_RULES
from patchdiff.train.optim import build_optimizer
from patchdiff.train.state import state_shardings
from patchdiff.train.step import make_train_step

GIB, MIB = 2**30, 2**20


class AotError(ValueError):
    """A target or a config that this tool refuses, in one sentence."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: HBM per chip, and how libtpu names its slices."""

    hbm_gib: float
    cores_in_name: int  # slice names count TensorCores (v4, v5p: 2 per chip) or chips (1)
    chip_config: str  # libtpu's chip_config_name; "megacore": one JAX device per chip
    shapes: dict  # chips -> topology, as the Cloud TPU docs' configuration tables give them


_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}  # fmt: skip
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}  # fmt: skip
# HBM per chip from the Cloud TPU system-architecture pages: v4 "32 GiB", v5e "16 GB", v5p
# "95 GB", v6e "32 GB" (the pages write GB for the GiB that jax's memory_stats reports). The
# runtime keeps part of it: XLA:TPU (libtpu 0.0.52) lets a v5e program use 15.75 GiB of 16.
CHIPS = {
    "v4": Chip(hbm_gib=32, cores_in_name=2, chip_config="megacore", shapes=_SHAPES_3D),
    "v5e": Chip(hbm_gib=16, cores_in_name=1, chip_config="default", shapes=_SHAPES_2D),
    "v5p": Chip(hbm_gib=95, cores_in_name=2, chip_config="megacore", shapes=_SHAPES_3D),
    "v6e": Chip(hbm_gib=32, cores_in_name=1, chip_config="default", shapes=_SHAPES_2D),
}
ALIASES = {"v5litepod": "v5e"}  # the accelerator-type spelling of v5e slices
_ADVICE = ("lower config.train.batch_size, raise config.train.grad_accum or config.mesh.model, "
           "or set config.model.dtype = 'bfloat16'")  # fmt: skip
# Measured on EDM's DDPM++ (cifar10_ddpmpp.py, batch 512; libtpu 0.0.52): temporaries per device
# of 24.2 GiB by XLA:CPU and 2.8 GiB by XLA:TPU on v5e-8 (64 images per device), 961 and 593
# MiB on v5e-256 (2 per device).
_CPU_VS_TPU = "XLA:CPU's temporaries were 8.6x XLA:TPU's for cifar10_ddpmpp.py on v5e-8"
MARGINAL = 0.9  # fraction of the capacity above which a fit is reported as marginal


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # "v5e-256"
    chip: str  # "v5e"
    chips: int
    shape: str  # "16x16", as libtpu takes it after "v5e:"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host, as (x, y, z). v4 and v5p hosts hold 2x2x1 chips; v5e and v6e slices
        of up to 8 chips sit on one host (the 8-chip VM types), larger ones on 4-chip hosts."""
        if CHIPS[self.chip].shapes is _SHAPES_3D or self.chips > 8:
            return (2, 2, 1)
        x, y = (int(d) for d in self.shape.split("x"))
        return (x, y, 1)


def known_topologies() -> list[str]:
    return [f"{c}-{n * chip.cores_in_name}" for c, chip in CHIPS.items() for n in chip.shapes]


def parse_topology(name: str) -> Topology:
    """'v5e-256' (or 'v5litepod-256', 'v4-32', ...) -> its chip and libtpu topology."""
    generation, _, count = name.partition("-")
    generation = ALIASES.get(generation, generation)
    chip = CHIPS.get(generation)
    number = int(count) if count.isdigit() else 0
    chips = number // chip.cores_in_name if chip else 0
    if chip is None or chips not in chip.shapes or chips * chip.cores_in_name != number:
        raise AotError(f"--topology {name!r} is not known; known: {', '.join(known_topologies())}.")
    return Topology(f"{generation}-{number}", generation, chips, chip.shapes[chips])


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None or "TPU_LIBRARY_PATH" in os.environ


def _mesh_shape(config, devices: int) -> tuple[int, int]:
    """(data, model) for `devices`, refused as patchdiff.train.loop.make_mesh refuses it."""
    model = config.mesh.model
    if model < 1 or devices % model:
        raise config_lib.ConfigError(
            f"config.mesh.model = {model} is not allowed: it must divide the {devices} devices."
        )
    return devices // model, model


def topology_mesh(config, topology: Topology) -> Mesh:
    """A mesh over the slice's compile-only devices, laid out as make_mesh lays out
    jax.devices()."""
    # On a machine that is not a TPU VM, libtpu looks for the VM's accelerator type and worker
    # names and logs half a dozen alarming lines without them; name the slice being compiled for.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name.replace("v5e", "v5litepod"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling opens no chip: let it run beside another libtpu process (a training job on a
    # TPU VM, a second aot_compile) instead of stopping at libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(
            f"{topology.chip}:{topology.shape}",
            "tpu",
            chips_per_host_bounds=topology.host_bounds,
            chip_config_name=CHIPS[topology.chip].chip_config,
        ).devices
    except Exception as e:  # noqa: BLE001 - libtpu missing, too old, or refusing the name
        raise AotError(
            f"libtpu could not describe {topology.name} ({str(e).splitlines()[0][:160]}); "
            'install or update it with pip install -e ".[aot]".'
        ) from None
    data, model = _mesh_shape(config, len(devices))
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def abstract_mesh(config, devices: int) -> AbstractMesh:
    if devices < 1:
        raise AotError(f"--devices must be a positive number of devices, not {devices}.")
    return AbstractMesh(_mesh_shape(config, devices), ("data", "model"))


def patch_plan(config) -> tuple[dict[int, int], set[int]]:
    """({patch size p: global batch B}, sizes not drawn) for every size the patch schedule draws
    with a positive probability (a short run may not draw them all; its sequel will), read off
    data.step_plan, the loop's own plan, so that the two cannot drift apart."""
    schedule = build_patch_schedule(config)
    wanted = {s for s, prob in zip(schedule.sizes, schedule.probs, strict=True) if prob > 0}
    plan = {}
    # A size of probability q turns up within ~1/q steps; 10k steps of plan take ~1 s.
    for step in range(10_000):
        size, batch = data_lib.step_plan(config, step)
        plan[size] = batch
        if set(plan) == wanted:
            break
    return dict(sorted(plan.items(), reverse=True)), wanted - set(plan)


@dataclasses.dataclass
class Report:
    """One patch size's program: bytes per device and FLOPs per step."""

    patch_size: int
    global_batch: int
    batch_per_device: int
    state_bytes: int  # exact, from the state's shardings
    batch_bytes: int  # exact, from the batch's sharding
    compiler: str  # "XLA:TPU", "XLA:CPU estimate", or "" (lowered only)
    arguments: int | None = None
    outputs: int | None = None
    aliased: int | None = None
    temporaries: int | None = None
    generated_code: int | None = None
    # XLA's counts: of the lowered, unpartitioned program (the model's arithmetic), and of the
    # compiled per-device program (with the work every device repeats, and whatever padding
    # and rewriting the compiler adds).
    flops_global: float | None = None
    flops_per_device: float | None = None
    seconds: float | None = None  # lowering and compiling

    @property
    def total(self) -> int:
        """XLA's arguments + outputs - aliased + temporaries + code; lowered only, the shards."""
        if self.temporaries is None:
            return self.state_bytes + self.batch_bytes
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @property
    def lower_bound(self) -> bool:
        return self.temporaries is None


def shard_bytes(tree) -> int:
    """Bytes per device of a pytree of ShapeDtypeStructs carrying (even) shardings."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def abstract_state(config, mesh):
    """(model, optimizer, state shardings, the state as sharded ShapeDtypeStructs)."""
    model = build_model(config)
    optimizer = build_optimizer(config.train)
    rules = REPLICATED_RULES if config.mesh.model == 1 else MODEL_PARALLEL_RULES
    shardings, abstract = state_shardings(model, optimizer, config, mesh, rules)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    # jit takes only shardings that split every axis evenly; the logical rules do not check.
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        try:
            leaf.sharding.shard_shape(leaf.shape)
        except ValueError:
            raise AotError(
                f"config.mesh.model = {config.mesh.model} does not split the state's "
                f"{jax.tree_util.keystr(path)} of shape {leaf.shape} (sharded as "
                f"{leaf.sharding.spec}): choose a config.mesh.model that divides its sharded "
                "axis, or 1."
            ) from None
    return model, optimizer, shardings, state


def abstract_batch(config, batch: int, sharding):
    """The loader's global batch as ShapeDtypeStructs: {"image": f32 [B, R, R, C], "label": i32
    [B]} (the step crops to p itself)."""
    r, c = config.data.resolution, config.data.channels
    return {
        "image": jax.ShapeDtypeStruct((batch, r, r, c), jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding),
    }


def _lower(step, args, mesh):
    """step.lower(*args); an abstract mesh names no platform, so it is lowered for the CPU
    (whose compiler gives the estimate), which only platform-dependent kernels notice."""
    if isinstance(mesh, AbstractMesh):
        return step.trace(*args).lower(lowering_platforms=("cpu",))
    return step.lower(*args)


def _flops(analysis) -> float | None:
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _single_pass(config):
    """A copy of `config` whose step computes the same gradient without the grad_accum loop: the
    lowered program's cost analysis counts a loop body once, not once per micro-batch."""
    copy = config.copy_and_resolve_references()
    with copy.unlocked():
        copy.train.grad_accum = 1
        copy.train.grad_noise_scale = copy.train.grad_noise_scale and copy.train.batch_size % 2 == 0
    return copy


@dataclasses.dataclass
class Prepared:
    """What every patch size's program shares: the plan, the sharded state, the jitted step."""

    config: object
    mesh: Mesh | AbstractMesh
    plan: dict  # patch size -> global batch
    notes: list
    state: object  # ShapeDtypeStructs with shardings
    batch_sharding: NamedSharding
    step: object
    flops_step: object  # the step whose lowering counts the unpartitioned program's FLOPs


def prepare(config, mesh) -> Prepared:
    """Checks the batches against the mesh, builds the sharded state and the jitted step (a
    second or two; nothing is lowered yet)."""
    (plan, rare), data = patch_plan(config), mesh.shape["data"]
    for size, batch in plan.items():
        if batch % data:
            factors = [config.data.resolution // s for s in plan]
            multiple = math.lcm(*(data // math.gcd(data, f) for f in factors))
            raise AotError(
                f"config.train.batch_size = {config.train.batch_size} gives a global batch of "
                f"{batch} images at patch size {size}, which does not split over the {data}-way "
                f"data axis of {mesh.size} devices: make config.train.batch_size a multiple of "
                f"{multiple}, or raise config.mesh.model."
            )
    notes = [f"patch sizes {sorted(rare)} not analysed: not drawn in 10k steps."] if rare else []
    model, optimizer, shardings, state = abstract_state(config, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    step = make_train_step(model, optimizer, config, shardings, batch_sharding)
    flops_step = step
    if config.train.grad_accum > 1:
        flops_step = make_train_step(
            model, optimizer, _single_pass(config), shardings, batch_sharding
        )
        notes.append(
            "the unpartitioned program's FLOPs are those of the same step without the "
            "grad_accum loop (the lowered program's cost analysis counts a loop body once)."
        )
    return Prepared(config, mesh, plan, notes, state, batch_sharding, step, flops_step)


def shard_reports(prepared: Prepared, compiler: str = "") -> list[Report]:
    """Per patch size, the exact state and batch bytes per device (a lower bound on the total)."""
    data = prepared.mesh.shape["data"]
    state = shard_bytes(prepared.state)
    return [
        Report(
            patch_size=size,
            global_batch=batch,
            batch_per_device=batch // data,
            state_bytes=state,
            batch_bytes=shard_bytes(
                abstract_batch(prepared.config, batch, prepared.batch_sharding)
            ),
            compiler=compiler,
        )
        for size, batch in prepared.plan.items()
    ]


def _arguments(prepared: Prepared, report: Report) -> tuple:
    """The step's (state, batch, patch size) for `report`'s patch size, as sharded shapes."""
    batch = abstract_batch(prepared.config, report.global_batch, prepared.batch_sharding)
    return prepared.state, batch, report.patch_size


def _compile_for_tpu(lowered, report: Report):
    """lowered.compile(); XLA:TPU itself refuses a program that overflows HBM, refused here in
    one sentence with the compiler's own figures."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # libtpu 0.0.52: "... the total memory required for HLO temporaries (40.31G) exceeds
        # available HBM (15.75G)."
        found = re.search(r"\(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)", str(e))
        why = str(e).splitlines()[0][:200]
        if found:
            why = f"its temporaries need {found[1]} of the {found[2]} of HBM it may use per device"
        raise AotError(
            f"XLA:TPU ran out of memory compiling the train step at patch size "
            f"{report.patch_size} ({why}): {_ADVICE}."
        ) from None


def analyse(prepared: Prepared, *, compile_for: str | None, progress=None) -> list[Report]:
    """Lowers (and, with `compile_for` "tpu" or "cpu", compiles) the train step for each patch
    size. "cpu" compiles the partitioned program for mesh.size CPU devices and needs that many
    (the command line creates them); with fewer it adds a note and lowers only."""
    progress = progress or (lambda message: None)
    mesh = prepared.mesh
    cpu_devices = jax.devices("cpu") if compile_for == "cpu" else []
    if compile_for == "cpu" and len(cpu_devices) < mesh.size:
        prepared.notes.append(
            f"temporaries not estimated: XLA:CPU needs {mesh.size} CPU devices and this process "
            f"has {len(cpu_devices)} (the command line creates them)."
        )
        compile_for = None
    compiler = {"tpu": "XLA:TPU", "cpu": "XLA:CPU estimate"}.get(compile_for, "")
    # The unpartitioned program's FLOPs come from a lowering for the CPU on an abstract mesh:
    # a lowering for a topology's devices has no cost analysis before it is compiled.
    counting = prepared
    if not isinstance(mesh, AbstractMesh):
        counting = prepare(
            prepared.config, AbstractMesh(tuple(mesh.shape.values()), tuple(mesh.shape))
        )
    reports = shard_reports(prepared, compiler)
    for report in reports:
        t = time.perf_counter()
        progress(f"patch size {report.patch_size}, global batch {report.global_batch}: lowering"
                 + (f" and compiling ({compiler})" if compiler else ""))  # fmt: skip
        lowered = _lower(prepared.step, _arguments(prepared, report), mesh)
        if counting is prepared and prepared.flops_step is prepared.step:
            report.flops_global = _flops(lowered.cost_analysis())
        else:
            counted = _lower(counting.flops_step, _arguments(counting, report), counting.mesh)
            report.flops_global = _flops(counted.cost_analysis())
        if compile_for == "tpu":
            compiled = _compile_for_tpu(lowered, report)
        elif compile_for == "cpu":
            # LLVM's optimiser off: the program never runs, and buffer assignment, which the
            # memory analysis reads, comes before it. device_assignment places the abstract
            # mesh's program on real devices (jax 0.10; a jax without it estimates nothing).
            try:
                compiled = lowered.compile(
                    {"xla_backend_optimization_level": 0},
                    device_assignment=tuple(cpu_devices[: mesh.size]),
                )
            except TypeError as e:
                prepared.notes.append(f"temporaries not estimated: this jax cannot ({e}).")
                compile_for, report.compiler = None, ""
        if compile_for:
            stats = compiled.memory_analysis()
            report.arguments = stats.argument_size_in_bytes
            report.outputs = stats.output_size_in_bytes
            report.aliased = stats.alias_size_in_bytes
            report.temporaries = stats.temp_size_in_bytes
            report.generated_code = stats.generated_code_size_in_bytes
            report.flops_per_device = _flops(compiled.cost_analysis())
        report.seconds = time.perf_counter() - t
    return reports


def fit_message(reports: list[Report], capacity_gib: float | None, where: str) -> str | None:
    """None if every patch size fits `capacity_gib` per device; else the one-sentence refusal.
    `where` names the capacity: "a v5e chip", "--memory-gib"."""
    if capacity_gib is None:
        return None
    worst = max(reports, key=lambda r: r.total)
    if worst.total <= capacity_gib * GIB:
        return None
    needs = f"{worst.total / GIB:.3g} GiB per device"
    if worst.lower_bound:
        needs = f"at least {needs} (its state and batch shards alone)"
    elif worst.compiler == "XLA:CPU estimate":
        needs += " by XLA:CPU's estimate"
    advice = _ADVICE
    if worst.compiler == "XLA:CPU estimate":  # pessimistic where measured: say how to check
        advice += f" (or compile for the target: {_CPU_VS_TPU})"
    return (
        f"the train step at patch size {worst.patch_size} needs {needs}, more than the "
        f"{capacity_gib:g} GiB of {where}: {advice}."
    )


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def _gflop(value) -> str:
    return "-" if value is None else f"{value / 1e9:,.1f}"


def format_table(reports: list[Report], devices: int) -> str:
    """Rows of quantities, one column per patch size."""
    rows = [
        ("global batch", [str(r.global_batch) for r in reports]),
        ("batch per device", [str(r.batch_per_device) for r in reports]),
        ("MiB per device", None),
        ("  state (shardings)", [_mib(r.state_bytes) for r in reports]),
        ("  batch shard", [_mib(r.batch_bytes) for r in reports]),
        ("  arguments", [_mib(r.arguments) for r in reports]),
        ("  outputs", [_mib(r.outputs) for r in reports]),
        ("  aliased (donated)", [_mib(r.aliased and -r.aliased) for r in reports]),
        ("  temporaries", [_mib(r.temporaries) for r in reports]),
        ("  generated code", [_mib(r.generated_code) for r in reports]),
        ("  total", [(">= " if r.lower_bound else "") + _mib(r.total) for r in reports]),
        ("GFLOP per step", None),
        ("  program (unpartitioned)", [_gflop(r.flops_global) for r in reports]),
        ("  per device (compiled)", [_gflop(r.flops_per_device) for r in reports]),
        (
            f"  all devices (x {devices})",
            [_gflop(r.flops_per_device and r.flops_per_device * devices) for r in reports],
        ),
        ("seconds", ["-" if r.seconds is None else f"{r.seconds:.1f}" for r in reports]),
    ]
    head = [f"patch {r.patch_size}" for r in reports]
    width = max(10, *(len(c) for _, cells in rows if cells for c in cells))
    lines = [" " * 26 + "".join(h.rjust(width + 2) for h in head)]
    for label, cells in rows:
        lines.append(label.ljust(26) + "".join(c.rjust(width + 2) for c in cells or []))
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags():
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("topology", None, f"A TPU slice: {', '.join(known_topologies())}.")
    flags.DEFINE_integer("devices", None, "Lower for an abstract mesh of this many devices.")
    flags.DEFINE_float("memory-gib", None, "Capacity per device (default: the chip's HBM).")
    flags.DEFINE_bool("cpu-estimate", True, "Abstract mesh: estimate temporaries with XLA:CPU.")
    flags.DEFINE_string("json", None, "Also write the reports to this JSON file.")
    flags.mark_flags_as_required(["config"])


def choose_target(topology_name: str | None, devices: int | None, cpu_estimate: bool):
    """(topology or None, devices, compile_for) from the flags, before jax starts a backend:
    an XLA:CPU estimate compiles for as many CPU devices as the target has."""
    if (topology_name is None) == (devices is None):
        raise AotError("give one of --topology NAME or --devices N.")
    # Only the CPU backend runs anything; libtpu is loaded for its compiler alone, and a TPU
    # backend started on a machine without TPUs only logs its failure.
    jax.config.update("jax_platforms", "cpu")
    topology = None
    if topology_name is not None:
        topology = parse_topology(topology_name)
        if libtpu_installed():
            # A compile-only client cannot load a cached executable: a cache would only warn.
            jax.config.update("jax_enable_compilation_cache", False)
            return topology, topology.chips, "tpu"
        devices = topology.chips
    elif devices < 1:
        raise AotError(f"--devices must be a positive number of devices, not {devices}.")
    if cpu_estimate:
        # Refused once a backend has started (in-process use): analyse then says that it
        # estimated nothing.
        with contextlib.suppress(RuntimeError, AttributeError):
            jax.config.update("jax_num_cpu_devices", devices)
    return topology, devices, "cpu" if cpu_estimate else None


def run(config, config_name, topology, devices, compile_for, capacity, json_path) -> str | None:
    """Prints the table (progress on stderr); returns the refusal sentence, or None."""
    notes = []
    if compile_for == "tpu":
        mesh = topology_mesh(config, topology)
        target = f"{topology.name}, compiled by XLA:TPU"
    else:
        mesh = abstract_mesh(config, devices)
        target = f"{devices} devices (abstract mesh)"
        if topology is not None:
            target = f"{topology.name} as {target}"
            notes.append(
                'libtpu is not installed (pip install -e ".[aot]"), so nothing was compiled for '
                f"TPU: shapes and shardings were checked on an abstract mesh of its {devices} "
                "chips."
            )
    where = "--memory-gib"
    if topology is not None and capacity is None:
        capacity, where = CHIPS[topology.chip].hbm_gib, f"a {topology.chip} chip"
    header = (
        f"{config_name} on {target}: mesh data {mesh.shape['data']} x model {mesh.shape['model']}"
    )
    print(header, file=sys.stderr)
    prepared = prepare(config, mesh)
    # The shards are known before anything compiles (minutes for a large model): a config
    # whose state and batch alone overflow is refused at once, with the lower bound.
    reports = shard_reports(prepared)
    refusal = fit_message(reports, capacity, where)
    if refusal is None:
        reports = analyse(
            prepared, compile_for=compile_for, progress=lambda m: print(m, file=sys.stderr)
        )
        refusal = fit_message(reports, capacity, where)
    notes += prepared.notes
    if reports[0].compiler == "XLA:CPU estimate":
        notes.append(f"arguments to generated code: XLA:CPU's estimate ({_CPU_VS_TPU}).")
    if reports[0].arguments and reports[0].arguments > 1.05 * reports[0].state_bytes:
        notes.append("arguments exceed the exact shards: layouts pad small arrays to tiles.")
    print(header)
    print(format_table(reports, mesh.size))
    for note in notes:
        print(f"note: {note}")
    if capacity is None:
        print("capacity: none given (--memory-gib), nothing checked.")
    elif refusal is None:
        worst = max(reports, key=lambda r: r.total)
        share = f"{worst.total / (capacity * GIB):.1%} of {capacity:g} GiB per device ({where})"
        if worst.lower_bound:
            print(f"fits so far: the shards take {share}; temporaries not estimated.")
        else:
            marginal = worst.total > MARGINAL * capacity * GIB
            print(f"fits: {share} at worst (patch {worst.patch_size})"
                  + (", which is marginal." if marginal else "."))  # fmt: skip
    if json_path:
        sizes = [{**dataclasses.asdict(r), "total": r.total, "total_is_lower_bound":
                  r.lower_bound} for r in reports]  # fmt: skip
        record = {"config": config_name, "target": target, "mesh": dict(mesh.shape),
                  "capacity_gib": capacity, "refusal": refusal, "notes": notes,
                  "patch_sizes": sizes}  # fmt: skip
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
    return refusal


def main(argv):
    del argv
    # jax logs at INFO each accelerator plugin it did not find: keep the console for the table.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        target = choose_target(FLAGS.topology, FLAGS.devices, FLAGS["cpu-estimate"].value)
        config = config_lib.validate(FLAGS.config)
        config_name = config_flags.get_config_filename(FLAGS["config"])
        refusal = run(config, config_name, *target, FLAGS["memory-gib"].value, FLAGS.json)
    except config_lib.ConfigError as e:
        raise SystemExit(f"patchdiff: {e}") from None
    except AotError as e:
        raise SystemExit(f"aot_compile: {e}") from None
    if refusal:
        raise SystemExit(f"aot_compile: {refusal}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

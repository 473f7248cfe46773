"""XLA:CPU compile options that make this project's programs faster on a CPU, and `jit`: jax.jit
with them when the program compiles for the CPU.

XLA:CPU (jax 0.10) hands every convolution to YNNPACK ("individual convolution" library fusions)
by default. On the 2-core CPU of this project's CI, YNNPACK's weight-gradient convolutions ran at
21-83 GFLOP/s where XLA's own (Eigen) run at 64-157, and its forward and input-gradient
convolutions were no faster (`benchmarks/cpu_convs.py`): EDM's DDPM++ train step at batch 8
took 13.1 s with them and 8.5 s without (`benchmarks/profile_step.py`; BENCHMARKS.md, "Training
step on the CPU"). YNNPACK keeps the kinds that pay off: reductions (without them the step took
11.6 s) and matrix products.

A user's own `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS wins: then nothing is set
here. On an XLA without the option (another jaxlib) a warning says so once and jax's defaults
stay.
"""

import functools
import logging
import os

import jax
import jax.numpy as jnp

YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default list (DOT, REDUCE, INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION) without the last.
CPU_OPTIONS = {
    YNN_FUSION_TYPES: ",".join(
        f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("DOT", "REDUCE", "INDIVIDUAL_DOT")
    )
}


@functools.cache
def _accepted() -> bool:
    """Whether this XLA takes CPU_OPTIONS (checked once by compiling a trivial program)."""
    try:
        jax.jit(jnp.sin, compiler_options=CPU_OPTIONS).lower(jnp.zeros(2)).compile()
        return True
    except Exception as e:  # noqa: BLE001 - any refusal means: keep jax's defaults
        logging.warning(
            "patchdiff: this XLA does not take %s (%s); convolutions keep XLA's default "
            "library on the CPU.",
            CPU_OPTIONS,
            str(e).splitlines()[0][:200],
        )
        return False


def compiler_options() -> dict | None:
    """CPU_OPTIONS when programs compile for the CPU and the user has not chosen otherwise."""
    if jax.default_backend() != "cpu" or YNN_FUSION_TYPES in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU_OPTIONS) if _accepted() else None


def jit(fun=None, **kwargs):
    """jax.jit(fun, **kwargs) with `compiler_options()`; usable as a decorator, bare or with
    arguments (`@jit(static_argnums=1)`)."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    options = compiler_options()
    if options:
        kwargs["compiler_options"] = {**options, **kwargs.get("compiler_options", {})}
    return jax.jit(fun, **kwargs)

"""What a model costs: parameter count and FLOPs per image.

`xla_flops` is XLA's cost analysis of the lowered program (a multiply-add counts 2; elementwise
work counts too, by XLA's own rules). `matmul_flops` counts only convolutions and matrix products,
2 per multiply-add, from the jaxpr: the rule of torch's flop counter and of papers' tables, so a
network ported from PyTorch can be checked against the original's figure. Nothing is compiled or
run to get either.
"""

import functools

import jax
import jax.extend
import numpy as np

from patchdiff.models import build_model, dummy_inputs, init_params


def count_params(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def xla_flops(fn, *args, **kwargs) -> float:
    """FLOPs that XLA counts for `fn(*args, **kwargs)`, from its lowering (no compilation)."""
    analysis = jax.jit(fn).lower(*args, **kwargs).cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returned one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def matmul_flops(fn, *args, **kwargs) -> float:
    """2 x the multiply-adds of every convolution and dot_general that `fn` traces to, sub-programs
    (scan bodies times their length, remat, custom derivatives) included; pooling, norms and
    activations are not counted."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return float(_count_matmuls(closed.jaxpr))


def _count_matmuls(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...) positions
            taps = np.prod([kernel[i] for i in spec[2:]]) * kernel[spec[1]]
            total += 2 * int(np.prod(out)) * int(taps)  # taps: in-channels per group x window
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            depth = int(np.prod([lhs[i] for i in contract]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * depth
        # A scan's body runs `length` times (nn.scan over a transformer's layers).
        repeats = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += repeats * _count_matmuls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += repeats * _count_matmuls(sub)
    return total


def forward_flops_per_image(model, params, config, batch: int = 1) -> float:
    """Forward FLOPs of `model` on one full-size image (the batch's total divided by its size).

    XLA's cost analysis counts a loop's body once, so a transformer built with `scan=True` is
    counted as its unrolled twin (the same layers and FLOPs, parameters laid out per layer)."""
    if getattr(model, "scan", False):
        model = model.clone(scan=False)
        params = jax.eval_shape(
            functools.partial(init_params, model, config=config), jax.random.key(0)
        )
    x, c_noise, kwargs = dummy_inputs(config, batch)
    return xla_flops(lambda p: model.apply({"params": p}, x, c_noise, **kwargs), params) / batch


def forward_macs_per_image(model, params, config, batch: int = 1) -> float:
    """Multiply-adds of convolutions and matrix products per full-size image (`matmul_flops` / 2):
    the unit of papers' "GFLOPs" columns (DiT, HDiT)."""
    x, c_noise, kwargs = dummy_inputs(config, batch)
    fn = lambda p: model.apply({"params": p}, x, c_noise, **kwargs)  # noqa: E731
    return matmul_flops(fn, params) / 2 / batch


def model_cost(config, key=None) -> dict:
    """{"params", "gflops_per_image"} of the model that `config` builds."""
    model = build_model(config)
    params = jax.eval_shape(lambda k: init_params(model, k, config), key or jax.random.key(0))
    return {
        "params": count_params(params),
        "gflops_per_image": forward_flops_per_image(model, params, config) / 1e9,
    }

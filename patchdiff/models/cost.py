"""What a model costs: parameter count and XLA-counted FLOPs per image.

FLOPs come from XLA's cost analysis of the lowered forward pass (a multiply-add counts 2), so they
include every conv, matmul and attention einsum, and nothing is compiled or run to get them.
"""

import jax
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


def forward_flops_per_image(model, params, config, batch: int = 1) -> float:
    """Forward FLOPs of `model` on one full-size image (the batch's total divided by its size)."""
    x, c_noise, kwargs = dummy_inputs(config, batch)
    return xla_flops(lambda p: model.apply({"params": p}, x, c_noise, **kwargs), params) / batch


def model_cost(config, key=None) -> dict:
    """{"params", "gflops_per_image"} of the model that `config` builds."""
    model = build_model(config)
    params = jax.eval_shape(lambda k: init_params(model, k, config), key or jax.random.key(0))
    return {
        "params": count_params(params),
        "gflops_per_image": forward_flops_per_image(model, params, config) / 1e9,
    }

"""Hand-made token mixers written as kernel graphs of the space, the baselines that a searched
kernel is judged against (the 3x3 convolution itself is the model with no replacement).

| name | graph | after |
| --- | --- | --- |
| depthwise_separable | fc(dwconv3(x)) | MobileNet's depthwise 3x3 then pointwise |
| poolformer | unfold3_avg(x) + scale(x), scale starting at -1 | PoolFormer: avg pool 3x3 minus x |
| identity | scale(x) | no mixer: a per-channel gain only |
| canvas_02311 | channel_mix(fc(t) + tanh(t)), t = fc(dwconv5_d2(dwconv5(x))) | CANVAS 02311 |

`unfold3_avg` averages the 3x3 neighbourhood over zero padding (divides by 9 at the border too),
where PoolFormer's pool divides by the pixels inside the image; the learned `scale` of the
pooling graph starts at -1 (`init`), so the kernel starts as PoolFormer's pool(x) - x and may
learn any pool(x) + s x. The identity needs one primitive (a graph has at least one); `scale`
starts at ones, so it starts as the identity.

CANVAS's found kernels (tsinghua-ideal/Canvas, branch `darts`, commit b4d25ce,
`experiments/collections/previous_collections/`, searched in VAN-tiny on ImageNet; its ResNet
kernels are not published as files): of the six, 02401 (the best by its 1-epoch top-1) needs 15
nodes and 02311 (the third) fits this space's 8, so 02311 is the baseline. Its pieces map as:
VAN's large-kernel projection (depthwise 5x5, then 7x7 dilated by 3) -> dwconv5, dwconv5_d2 (the
widest dilated depthwise here); FC -> fc; sin(pi x / 2) -> tanh (odd and bounded; no sin here);
the elementwise max of two branches -> add (no binary max); and its channel attention
(x x^T / sqrt(HW) times learned [C, C] weights, applied to another branch) -> channel_mix, which
builds softmax-normalised attention from the tensor it mixes. An approximation in spirit:
depthwise large-field spatial mixing, two FCs and input-dependent channel mixing.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from canvas_jax.compile import param_name
from canvas_jax.graph import KernelGraph
from canvas_jax.primitives import PRIMITIVES


@dataclasses.dataclass(frozen=True)
class Baseline:
    graph: KernelGraph
    # Primitive parameter name -> initial value, for every node of that primitive: e.g.
    # {"scale": -1.0} sets each scale node's `s` to -1.
    init: tuple[tuple[str, float], ...] = ()
    about: str = ""


BASELINES = {
    "depthwise_separable": Baseline(
        KernelGraph(("input", "dwconv3", "fc"), ((), (0,), (1,))),
        about="depthwise 3x3 then fc (MobileNet)",
    ),
    "poolformer": Baseline(
        KernelGraph(("input", "unfold3_avg", "scale", "add"), ((), (0,), (0,), (1, 2))),
        init=(("scale", -1.0),),
        about="avg pool 3x3 minus identity (PoolFormer)",
    ),
    "identity": Baseline(
        KernelGraph(("input", "scale"), ((), (0,))),
        about="no mixer (a per-channel gain)",
    ),
    "canvas_02311": Baseline(
        KernelGraph(
            ("input", "dwconv5", "dwconv5_d2", "fc", "fc", "tanh", "add", "channel_mix"),
            ((), (0,), (1,), (2,), (3,), (3,), (4, 5), (6,)),
        ),
        about="CANVAS's kernel 02311 (VAN-tiny, ImageNet) in this space's primitives",
    ),
}


def apply_init(params, graph: KernelGraph, init) -> dict:
    """`params` of a model running `graph`'s compiled kernel at its placeholders, with every node
    of the primitives named in `init` set to its value (see `Baseline.init`)."""
    if not init:
        return params
    values = dict(init)
    names = {
        param_name(node, op, name): values[op]
        for node, op in enumerate(graph.ops)
        if op in values
        for name in PRIMITIVES.get(op).params(1)
    }
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    changed = 0
    for path, leaf in flat.items():
        leaf_name = path.rsplit("/", 1)[-1]
        if leaf_name in names:
            flat[path] = jnp.full_like(leaf, names[leaf_name])
            changed += 1
    if not changed:
        raise ValueError(
            f"apply_init: no parameters of {sorted(values)} nodes found; the model does not run "
            f"{graph} at any placeholder."
        )
    return traverse_util.unflatten_dict(flat, sep="/")

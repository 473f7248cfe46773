"""Our DDPM++ against NVlabs/edm's `SongUNet` with the same weights: the same output?

    EDM_SRC=/path/to/edm python -m benchmarks.edm_equivalence --peer-python ~/tv/bin/python

The peer (a Python with torch and the edm checkout at EDM_SRC; neither is a dependency of this
project) builds edm's SongUNet with `train.py --arch=ddpmpp` settings (`peers/edm_step.py`'s
DDPMPP, the same that the training-step comparison uses), fills every parameter with
random values (so that near-zero initialisations cannot hide a wrong mapping) and writes them
with an input batch and its output. This script maps edm's names and layouts onto ours (OIHW
kernels to HWIO, Linear weights transposed, qkv rows from edm's [C, 3] order to our [3, C]),
checks that the two parameter trees have the same paths and shapes, runs our network at the
highest matmul precision and prints the largest difference relative to edm's largest output,
unconditional and with 10 classes. Writes benchmarks/results/edm_equivalence.json (or --out).
"""

import argparse
import os
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json
from benchmarks.model_cost import load_config
from patchdiff.models import build_model, dummy_inputs

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")  # edm_step.DDPMPP
PEER_SCRIPT = r"""
import os, sys, numpy as np, torch
sys.path[:0] = [os.environ["EDM_SRC"], sys.argv[3]]
from training.networks import SongUNet
from edm_step import DDPMPP
label_dim, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
net = SongUNet(img_resolution=32, in_channels=3, out_channels=3, label_dim=label_dim,
               **DDPMPP).eval()
with torch.no_grad():
    for name, p in net.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
        else:
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0))
x, c_noise = torch.randn(2, 3, 32, 32), torch.tensor([0.3, -1.1])
labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), label_dim).float() if label_dim else None
with torch.no_grad():
    y = net(x, c_noise, labels)
order = ["enc." + k for k in net.enc] + ["dec." + k for k in net.dec]
arrays = {k: v.numpy() for k, v in net.state_dict().items() if "resample_filter" not in k}
np.savez(out, x=x.numpy(), c_noise=c_noise.numpy(), out=y.numpy(), order=np.array(order), **arrays)
"""


def ours_from_edm(d) -> dict:
    """edm's state dict (an npz) as our parameter tree."""
    params = {}

    def put(path, value):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(value, np.float32)

    def conv(prefix, ours):  # OIHW -> HWIO
        put((*ours, "kernel"), np.transpose(d[prefix + ".weight"], (2, 3, 1, 0)))
        put((*ours, "bias"), d[prefix + ".bias"])

    def linear(prefix, ours):
        put((*ours, "kernel"), d[prefix + ".weight"].T)
        put((*ours, "bias"), d[prefix + ".bias"])

    def norm(prefix, ours):
        put((*ours, "scale"), d[prefix + ".weight"])
        put((*ours, "bias"), d[prefix + ".bias"])

    linear("map_layer0", ("emb0",))
    linear("map_layer1", ("emb1",))
    if "map_label.weight" in d.files:
        linear("map_label", ("label_embed",))
    blocks = attentions = 0
    for name in (str(n) for n in d["order"]):
        if name.endswith("aux_norm"):
            norm(name, ("norm_out",))
        elif name.endswith("aux_conv"):
            conv(name, ("conv_out",))
        elif name.endswith("_conv"):
            conv(name, ("conv_in",))
        else:  # a UNetBlock: our next ResBlock, and our next AttentionBlock if it attends
            block = f"ResBlock_{blocks}"
            blocks += 1
            norm(name + ".norm0", (block, "norm0"))
            norm(name + ".norm1", (block, "norm1"))
            conv(name + ".conv0", (block, "conv0"))
            conv(name + ".conv1", (block, "conv1"))
            linear(name + ".affine", (block, "affine"))
            if name + ".skip.weight" in d.files:
                conv(name + ".skip", (block, "skip"))
            if name + ".qkv.weight" in d.files:
                attention = f"AttentionBlock_{attentions}"
                attentions += 1
                norm(name + ".norm2", (attention, "norm"))
                width = d[name + ".proj.weight"].shape[0]
                qkv = d[name + ".qkv.weight"][:, :, 0, 0].reshape(width, 3, width)
                put((attention, "qkv", "kernel"), qkv.transpose(1, 0, 2).reshape(3 * width, -1).T)
                put((attention, "qkv", "bias"), d[name + ".qkv.bias"].reshape(width, 3).T.ravel())
                put((attention, "proj", "kernel"), d[name + ".proj.weight"][:, :, 0, 0].T)
                put((attention, "proj", "bias"), d[name + ".proj.bias"])
    return params


def compare(args, label_dim: int, folder: str) -> dict:
    path = os.path.join(folder, f"edm_{label_dim}.npz")
    peer = subprocess.run(
        [args.peer_python, "-c", PEER_SCRIPT, str(label_dim), path, PEERS],
        capture_output=True,
        text=True,
    )
    if peer.returncode:
        sys.exit(f"edm_equivalence: the edm side failed:\n{peer.stderr[-2000:]}")
    d = np.load(path)
    config = load_config("ml_collections_configs/cifar10_ddpmpp.py")
    config.model.num_classes = label_dim
    model = build_model(config)
    x, c_noise, kwargs = dummy_inputs(config, 2)
    shapes = jax.eval_shape(
        lambda k: nn.meta.unbox(model.init(k, x, c_noise, **kwargs)["params"]), jax.random.key(0)
    )
    params = ours_from_edm(d)
    ours = jax.tree.map(lambda a: a.shape, shapes)
    theirs = jax.tree.map(lambda a: a.shape, params)
    if ours != theirs:
        sys.exit("edm_equivalence: the parameter trees differ in paths or shapes.")
    kwargs = {"labels": jnp.array([3, 7])} if label_dim else {}
    with jax.default_matmul_precision("highest"):
        out = model.apply(
            {"params": params},
            jnp.asarray(np.transpose(d["x"], (0, 2, 3, 1))),
            jnp.asarray(d["c_noise"]),
            **kwargs,
        )
    ref = np.transpose(d["out"], (0, 2, 3, 1))
    return {
        "label_dim": label_dim,
        "parameters": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
        "max_relative_difference": float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="a Python with torch")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    source = os.environ.get("EDM_SRC", "")
    if not os.path.isfile(os.path.join(source, "training", "networks.py")):
        sys.exit(f"edm_equivalence: EDM_SRC={source!r} is not an NVlabs/edm checkout.")
    env = environment()
    with tempfile.TemporaryDirectory() as folder:
        rows = [compare(args, label_dim, folder) for label_dim in (0, 10)]
    for row in rows:
        print(
            f"label_dim {row['label_dim']}: {row['parameters']:,} parameters, max |ours - edm| / "
            f"max |edm| = {row['max_relative_difference']:.2e}"
        )
    path = write_json("edm_equivalence", {"environment": env, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The demo with an Hourglass Diffusion Transformer: class-conditional Fashion-MNIST at 32x32
(fashion_mnist.py's data, sampling and fd_fmnist evaluation) with a two-level HDiT: 2x2 patches
(16x16 tokens), widths (64, 128), 2 layers per level, 32-channel heads, 7x7 neighborhood
attention at 16x16 and global attention at 8x8, and HDiT's recipe (hdit_ffhq1024.py) at the
demo's batch of 64. Patch Diffusion's 8-pixel crops give 4x4 tokens at the first level, fewer than
the 7x7 window: each axis is then one window. A step costs about twice the U-Net demo's (a
batch-64 gradient at 32x32: 5.1 s against 2.6 s on a loaded 2-core CPU; neighborhood attention's
XLA reference is 40% of it), so the 1000 steps take some 20 minutes where the U-Net's take 10.

    sudo apt-get install dataset-fashion-mnist   # the data, once
    python -m patchdiff.main --config ml_collections_configs/hdit_fashion_mnist.py --workdir runs/fmnist_hdit
    python -m patchdiff.main --config ml_collections_configs/hdit_fashion_mnist.py:runlocal --workdir /tmp/fmnist_hdit
"""

from ml_collections_configs import base, fashion_mnist, hdit_ffhq1024


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = fashion_mnist.get_config("runlocal" if "runlocal" in options else None)
    hdit_ffhq1024.hdit(config, (64, 128), (2, 2), patch_size=2, mapping_width=128)
    config.model.hdit.head_dim = 32
    batch, steps = config.train.batch_size, config.train.total_steps  # the demo's
    hdit_ffhq1024.recipe(config)
    config.train.batch_size, config.train.total_steps = batch, steps
    config.train.ema_decay = 0.999  # 0.9999 averages over more steps than the demo has
    if "runlocal" in options:
        hdit_ffhq1024.hdit(config, (32, 64), (1, 1), patch_size=2, mapping_width=64)
        config.model.hdit.head_dim = 16
    return config

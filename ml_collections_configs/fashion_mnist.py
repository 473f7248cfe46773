"""The demo: class-conditional Fashion-MNIST at 32x32 (zero-padded from 28) with Patch Diffusion
and a P=2 patchify stem, a few minutes on a 2-core CPU to recognisable garments.

    sudo apt-get install dataset-fashion-mnist   # the data, once
    python -m patchdiff.main --config ml_collections_configs/fashion_mnist.py --workdir runs/fmnist
    python -m patchdiff.main --config ml_collections_configs/fashion_mnist.py --workdir runs/fmnist --mode sample

`:runlocal` makes it a seconds-long smoke run.
"""

from ml_collections_configs import base


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = base.get_config()
    config.data.source = "fashion_mnist"
    config.data.name = "fashion_mnist"
    config.data.channels = 1
    config.data.fit = "pad"

    # ADM-style blocks (scale-shift conditioning, attention after every block at 8x8): at 1000
    # steps they scored fd_fmnist@5k 231.6 where EDM's DDPM++ block scored 263.0, in about the
    # same time (562 s against 546 s; BENCHMARKS.md, "The demo's sample quality").
    config.model.arch = "adm"
    config.model.channels = 32
    config.model.channel_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.patch_size = 2  # convolutions at 16x16: 4x fewer FLOPs than P=1
    config.model.attn_resolutions = (8,)
    config.model.head_dim = 32
    config.model.dropout = 0.0
    config.model.num_classes = 10

    config.train.batch_size = 64
    config.train.total_steps = 1000
    config.train.lr = 2e-3
    config.train.lr_rampup_img = 20_000
    config.train.ema_halflife_img = 10_000
    config.train.log_every = 50
    config.train.checkpoint_every = 250
    config.train.sample_every = 500

    config.sample.num_images = 100  # a 10x10 grid: column k shows class k
    config.sample.batch_size = 100

    # Sample quality: fd_fmnist (our Fashion-MNIST classifier's features; never "FID") of 5k
    # samples against the test split: the classifier was trained on the train split, whose
    # features it has fitted, so held-out images are the fair reference.
    config.eval.metrics = ("fd_fmnist",)
    config.eval.num_samples = 5000
    config.eval.ref_split = "test"

    if "runlocal" in options:
        config.model.channels = 16
        config.model.head_dim = 16
        config.train.batch_size = 16
        config.train.total_steps = 10
        config.train.log_every = 5
        config.train.checkpoint_every = 5
        config.train.sample_every = 10
        config.sample.num_images = 20
        config.sample.batch_size = 20
        config.sample.steps = 6
        config.eval.num_samples = 100
        config.eval.steps = 6
    return config

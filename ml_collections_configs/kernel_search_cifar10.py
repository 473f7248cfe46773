"""Kernel search in the CIFAR-10 U-Net on a GPU: EDM's DDPM++ with Patch Diffusion
(cifar10_ddpmpp_patch.py, TFDS cifar10), trained 20k steps as the original, then the search
of kernel_search_fashion_mnist.py at this model's size, its SoTL-E rest adapting by LoRA.

    python -m patchdiff.data.prepare cifar10   # once (needs the [prepare] extra)
    python -m nag.main --config ml_collections_configs/kernel_search_cifar10.py --workdir runs/ks_cifar10
    python -m nag.main --config ml_collections_configs/kernel_search_cifar10.py:runlocal --workdir /tmp/ks_c10

Its numbers (rounds, steps, batch sizes) are untested at full size: no GPU run has been made.
"""

from ml_collections_configs import base, cifar10_ddpmpp, cifar10_ddpmpp_patch
from ml_collections_configs import kernel_search_fashion_mnist as fashion


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = cifar10_ddpmpp_patch.get_config()
    config.model.placeholders = ("conv1",)
    config.kernel_search.max_nodes = 12
    config.train.total_steps = 20_000
    config.train.checkpoint_every = 5000
    config.train.sample_every = 20_000
    config.nag = fashion.nag_section()
    nag = config.nag
    nag.budget, nag.proposals, nag.per_round = 128, 256, 8
    nag.pool = 16_384
    nag.sotl.steps, nag.sotl.last, nag.sotl.steps_per_call = 200, 50, 50
    nag.sotl.batch_size = 64
    # 8 stacked copies of a 56 M-parameter rest with Adam's two moments would take ~5 GB; a
    # rank-8 update of its Dense/Conv kernels takes a few percent of that.
    nag.sotl.lora_rank = 8
    nag.finetune.steps = 20_000
    nag.finetune.eval_examples, nag.finetune.eval_batch = 10_000, 500
    if "runlocal" in options:
        cifar10_ddpmpp.shrink(config)
        config.train.total_steps = 200
        fashion.shrink_search(config)
    return config

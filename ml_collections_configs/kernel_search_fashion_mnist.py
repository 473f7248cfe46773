"""Kernel search in the Fashion-MNIST U-Net (nag): train the original, search a kernel for both
3x3 convolutions of its residual blocks (`conv0`, `conv1`) at <= 0.25 of their FLOPs by SoTL-E,
with candidates proposed by a graph diffusion generator guided by a neural predictor (fitted
from round 0 on the predictor validation's kernels, `nag.prior`) and by the random sampler,
then fine-tune the winner beside the original and train it from scratch.

    sudo apt-get install dataset-fashion-mnist   # the data, once
    python -m nag.main --config ml_collections_configs/kernel_search_fashion_mnist.py --workdir runs/ks_fmnist
    # CANVAS's random search with the same budget and prior, for comparison:
    python -m nag.main --config ml_collections_configs/kernel_search_fashion_mnist.py \
        --config.nag.rank=random --workdir runs/ks_fmnist_random
    python -m nag.main --config ml_collections_configs/kernel_search_fashion_mnist.py:runlocal --workdir runs/ks_fmnist_local

The full config runs on a 2-core CPU (BENCHMARKS.md, "Kernel search that pays off", has its
time and result); `:runlocal` is the earlier conv1-only demo. `nag_section()` holds the search's
GPU-sized defaults, which other kernel-search configs derive from.
"""

import pathlib

import ml_collections

from ml_collections_configs import base, fashion_mnist

# SoTL-E curves of the predictor validation's sampled kernels (benchmarks/kernel_predictors.py).
PRIOR = pathlib.Path(__file__).with_name("kernel_search_fashion_mnist.prior.jsonl")


def nag_section() -> ml_collections.ConfigDict:
    """config.nag: the search, its generator, predictor, SoTL-E training and the fine-tune."""
    nag = ml_collections.ConfigDict()
    nag.budget = 64  # SoTL-E evaluations in all
    nag.seconds = 0.0  # search time budget, summed over resumed runs; 0 = none
    nag.proposals = 128  # candidates proposed per round (generator + sampler)
    nag.sampled_fraction = (
        0.25  # of the proposals drawn by canvas_jax.sample (all without generator)
    )
    nag.per_round = 8  # best-ranked proposals evaluated by SoTL-E per round, in one program
    nag.kappa = 0.5  # rank by predicted mean + kappa * std
    nag.min_fit = 8  # evaluations before the predictor ranks (before: the proxy's rank)
    nag.proxy = "jacov"  # zero-cost proxy scored on every proposal
    nag.proxy_images = 16  # training images the proxy is scored on
    nag.proxy_sigma = 1.0  # noise level of the proxy's inputs
    nag.pool = 4096  # training images the SoTL-E batches are drawn from
    nag.ops = ()  # primitives of the space; () = all of canvas_jax's
    nag.seed = 0
    # "predictor" (ours) or "random" (CANVAS's random search: sampler draws in draw order).
    nag.rank = "predictor"
    # Kernels evaluated before the search (JSON lines of {"ops", "inputs", "curve"}: SoTL-E loss
    # curves at least nag.sotl.steps long, as `benchmarks/kernel_predictors.py` writes them):
    # scored with this search's S and E, never evaluated again, and fitted by the predictor from
    # round 0; they do not count against `budget`. "" = none.
    nag.prior = ""

    nag.generator = ml_collections.ConfigDict()
    nag.generator.enabled = True
    nag.generator.train_graphs = 2048  # canvas_jax.sample draws it learns from
    nag.generator.hidden = 64
    nag.generator.layers = 3
    nag.generator.heads = 4
    nag.generator.steps = 2000
    nag.generator.batch_size = 128
    nag.generator.num_steps = 32  # sampler steps
    nag.generator.sampler = "heun"
    nag.generator.guidance = 1.0  # predictor guidance scale (z-score units)

    nag.predictor = ml_collections.ConfigDict()
    nag.predictor.hidden = 32
    nag.predictor.layers = 2
    nag.predictor.heads = 4
    nag.predictor.members = 5
    nag.predictor.steps = 300

    # SoTL-E (nag.sotl.SotlSettings): the rest of the network starts from the trained original
    # and trains fully; the target mixes in the original's denoised output (distill), a
    # lower-variance signal for short trainings. `map` runs the candidates one after another in
    # one compiled program: on CPU the vmapped template (every primitive at every node) measured
    # ~25x slower per step.
    nag.sotl = ml_collections.ConfigDict()
    nag.sotl.steps = 100
    nag.sotl.last = 25
    nag.sotl.steps_per_call = 25
    nag.sotl.batch_size = 32
    nag.sotl.learning_rate = 1e-3
    nag.sotl.grad_clip = 1.0
    nag.sotl.distill = 0.5
    nag.sotl.train_rest = True
    nag.sotl.lora_rank = 0
    nag.sotl.batching = "map"
    nag.sotl.candidates_per_call = 0
    nag.sotl.seed = 0

    nag.finetune = ml_collections.ConfigDict()
    nag.finetune.steps = 2000  # for the winner and the original alike
    nag.finetune.lr = 1e-3
    nag.finetune.eval_examples = 2000  # held-out images of config.eval.split
    nag.finetune.eval_batch = 250
    nag.finetune.from_scratch = True  # also train the winner's network from scratch
    return nag


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = fashion_mnist.get_config()
    # The recipe every kernel is trained with (the original, the validation's kernels, the
    # report's rows): the demo's U-Net at 16 channels, 400 steps of 32 full-size images (one
    # compiled step per kernel: each crop size would compile its own), ~1.5 minutes on a
    # 2-core CPU.
    config.model.channels = 16
    config.model.head_dim = 16
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.batch_size = 32
    config.train.total_steps = 400
    config.train.lr_rampup_img = 3200
    config.train.ema_halflife_img = 3200
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.train.sample_every = 400
    config.sample.num_images = 40  # 4 per class
    config.sample.batch_size = 40
    # fd_fmnist of 500 samples by Heun at 12 steps (23 evaluations): the validation and the
    # report measure dozens of networks; the demo's fd_fmnist@5k at 18 steps costs 15x more.
    config.eval.num_samples = 500
    config.eval.steps = 12

    # Both 3x3 convolutions of the residual blocks that map C channels to C (23 placeholders):
    # with all of them the identity leaves 0.46 of the network's FLOPs, so a kernel at <= 0.25
    # of the convolutions' FLOPs (flops_band) keeps the network at <= 0.6 of the original's.
    config.model.placeholders = ("conv0", "conv1")
    config.kernel_search.max_nodes = 8
    config.kernel_search.min_primitives = 3
    config.kernel_search.params_band = (0.02, 0.5)
    config.kernel_search.flops_band = (0.02, 0.25)
    config.nag = nag_section()
    cpu_search(config)

    if "runlocal" in options:
        config.model.placeholders = ("conv1",)
        config.kernel_search.params_band = (0.05, 1.0)
        config.kernel_search.flops_band = (0.05, 1.0)
        config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0, 0.5), (0.5, 0.5)
        config.train.total_steps = 800
        config.train.lr_rampup_img = 20_000
        config.train.ema_halflife_img = 10_000
        config.train.log_every = 100
        config.train.checkpoint_every = 400
        config.train.sample_every = 800
        shrink_search(config)
    return config


def cpu_search(config):
    """The search sized for a 2-core CPU, its budgets set by the predictor validation
    (BENCHMARKS.md, "Kernel search that pays off"): 16 SoTL-E evaluations of 32 steps, the first
    8 of them the validation's first 8 sampled kernels (`nag.prior`: their SoTL-E curves, shipped
    beside this file, so the predictor ranks and guides from round 0), then 8 in rounds of 4.
    Random search with the same 16 evaluations is the validation's first 16 draws."""
    nag = config.nag
    nag.budget, nag.per_round, nag.proposals, nag.min_fit = 8, 4, 32, 8
    nag.pool = 2048
    nag.prior = str(PRIOR)
    nag.generator.train_graphs, nag.generator.steps = 1024, 1000
    nag.generator.hidden, nag.generator.layers, nag.generator.num_steps = 32, 2, 16
    nag.sotl.steps, nag.sotl.last, nag.sotl.steps_per_call = 32, 8, 16
    nag.sotl.batching = "compiled"  # one compiled kernel per candidate (see SotlSettings)
    nag.finetune.steps, nag.finetune.eval_examples, nag.finetune.eval_batch = 100, 1000, 250
    return config


def shrink_search(config):
    """`runlocal`'s search: 8-node kernels, 4 rounds of 4 SoTL-E evaluations of 32 steps, a
    small generator and predictor, 300 fine-tuning steps."""
    config.kernel_search.max_nodes = 8
    config.kernel_search.min_primitives = 3
    nag = config.nag
    nag.prior = ""
    nag.budget, nag.proposals, nag.per_round, nag.min_fit = 16, 32, 4, 4
    nag.sampled_fraction = 0.5
    nag.pool = 1024
    nag.generator.train_graphs, nag.generator.steps = 256, 300
    nag.generator.hidden, nag.generator.layers, nag.generator.num_steps = 32, 2, 16
    nag.predictor.members, nag.predictor.steps = 3, 200
    nag.sotl.steps, nag.sotl.last, nag.sotl.steps_per_call = 32, 8, 8
    nag.sotl.batch_size = 16
    nag.finetune.steps, nag.finetune.eval_examples, nag.finetune.eval_batch = 300, 500, 100
    return config

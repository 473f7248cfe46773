"""Kernel search in the Fashion-MNIST U-Net (nag): train the demo model, search a kernel for its
residual blocks' second convolutions (conv1) by SoTL-E, with candidates proposed by a graph
diffusion generator (guided by a neural predictor once one is fitted) and by the random sampler,
then fine-tune the winner beside the original for the same steps and compare them.

    sudo apt-get install dataset-fashion-mnist   # the data, once
    python -m nag.main --config ml_collections_configs/kernel_search_fashion_mnist.py --workdir runs/ks_fmnist
    python -m nag.main --config ml_collections_configs/kernel_search_fashion_mnist.py:runlocal --workdir runs/ks_fmnist_local

`:runlocal` is sized for a 2-core CPU (well under an hour); the full setting is for a GPU.
`nag_section()` holds the search's defaults, which other kernel-search configs derive from.
"""

import ml_collections

from ml_collections_configs import base, fashion_mnist


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
    config.model.placeholders = ("conv1",)
    config.kernel_search.max_nodes = 12
    config.train.total_steps = 4000
    config.train.sample_every = 4000
    config.train.checkpoint_every = 1000
    config.nag = nag_section()

    if "runlocal" in options:
        # The runlocal demo's U-Net (16 channels), trained 800 steps, crops of 32 and 16 only
        # (each crop size compiles its own programs).
        config.model.channels = 16
        config.model.head_dim = 16
        config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0, 0.5), (0.5, 0.5)
        config.train.batch_size = 32
        config.train.total_steps = 800
        config.train.log_every = 100
        config.train.checkpoint_every = 400
        config.train.sample_every = 800
        config.sample.num_images = 40  # 4 per class
        config.sample.batch_size = 40
        shrink_search(config)
    return config


def shrink_search(config):
    """`runlocal`'s search: 8-node kernels, 4 rounds of 4 SoTL-E evaluations of 32 steps, a
    small generator and predictor, 300 fine-tuning steps."""
    config.kernel_search.max_nodes = 8
    config.kernel_search.min_primitives = 3
    nag = config.nag
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

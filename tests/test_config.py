import subprocess
import sys

import pytest

from ml_collections_configs import base
from patchdiff import config as config_lib


def test_base_configs_are_valid():
    config_lib.validate(base.get_config())
    config_lib.validate(base.get_config("runlocal"))


def test_unknown_config_option():
    with pytest.raises(ValueError, match=r"\['fast'\] are not known; known: runlocal"):
        base.get_config("runlocal,fast")


# (field path, bad value, words the one-sentence error must contain)
BAD = [
    (
        "model.patch_size",
        3,
        "config.model.patch_size = 3 is not allowed: it must be one of 1, 2, 4, 8",
    ),
    (
        "data.resolution",
        36,
        "config.model.patch_size = 8 is not allowed: it must divide config.data.resolution = 36",
    ),
    (
        "data.resolution",
        18,
        "config.data.resolution = 18 is not allowed: a U-Net with patch size 1 and 3 levels needs a multiple of 4",
    ),
    (
        "diffusion.parameterisation",
        "ddpm",
        "config.diffusion.parameterisation = 'ddpm' is not allowed: it must be one of edm, flow, v, ve, vp",
    ),
    (
        "diffusion.sigma_min",
        -0.1,
        "config.diffusion.sigma_min = -0.1 is not allowed: it must be positive",
    ),
    (
        "diffusion.sigma_data",
        0.0,
        "config.diffusion.sigma_data = 0.0 is not allowed: it must be positive",
    ),
    (
        "diffusion.sigma_max",
        0.001,
        "config.diffusion.sigma_max = 0.001 is not allowed: it must exceed",
    ),
    (
        "model.attn_resolutions",
        (12,),
        "12 is not a feature-map size of this U-Net, whose levels run at 32, 16, 8",
    ),
    (
        "diffusion.loss_weighting",
        "lpips",
        "config.diffusion.loss_weighting = 'lpips' is not allowed: it must be one of default, edm, min_snr",
    ),
    (
        "diffusion.noise_distribution",
        "uniform",
        "config.diffusion.noise_distribution = 'uniform' is not allowed",
    ),
    (
        "diffusion.noise_distribution",
        "vp_uniform",
        "'vp_uniform' needs the discrete levels of parameterisation 'vp'",
    ),
    ("diffusion.noise_distribution", "logit_normal", "needs a parameterisation with a time axis"),
    ("diffusion.patch_probs", (0.5, 0.3, 0.3), "they must be non-negative and sum to 1"),
    ("diffusion.patch_probs", (0.5, 0.5), "it must give one probability per patch scale"),
    ("diffusion.patch_scales", (1.0, 0.5, 0.1), "scale 0.1 gives crops of 3.2 pixels"),
    ("model.head_dim", 96, "it must divide the width 256 of every attention layer"),
    ("model.dropout", 1.0, "config.model.dropout = 1.0 is not allowed: it must lie in [0, 1)"),
    (
        "model.channels",
        0,
        "config.model.channels = 0 is not allowed: it must be a positive even integer",
    ),
    ("model.channel_mult", (), "config.model.channel_mult = () is not allowed"),
    ("model.num_classes", -1, "config.model.num_classes = -1 is not allowed"),
    ("model.noise_embedding", "learned", "it must be one of fourier, positional"),
    (
        "model.attention_impl",
        "flash",
        "it must be one of auto, cudnn, mosaic_gpu, pallas_tpu, triton, xla",
    ),
    (
        "model.placeholders",
        ("conv1", "conv2"),
        "it must be a tuple of distinct names among conv0, conv1",
    ),
    ("model.dtype", "float8", "it must be one of float32, bfloat16, float16"),
    (
        "model.name",
        "vit",
        "config.model.name = 'vit' is not allowed: it must be one of dit, hdit, unet",
    ),
    ("diffusion.vp_schedule", "sigmoid", "it must be one of cosine, linear"),
    ("diffusion.p_std", -1.0, "config.diffusion.p_std = -1.0 is not allowed: it must be positive"),
    (
        "sample.sampler",
        "dpm3",
        "config.sample.sampler = 'dpm3' is not allowed: it must be one of ddim, ddpm",
    ),
    ("sample.steps", 0, "config.sample.steps = 0 is not allowed: it must be a positive integer"),
    ("train.lr_schedule", "step", "it must be one of constant, edm_rampup, warmup_cosine"),
    ("train.grad_accum", 3, "it must divide config.train.batch_size = 512"),
    ("train.batch_size", 511, "it must be even while config.train.grad_noise_scale is on"),
    ("train.time_limit_s", -1.0, "it must be 0 (no limit) or a positive number of training"),
    ("train.batch_size", 0, "config.train.batch_size = 0 is not allowed"),
    ("train.ema_decay", 1.0, "config.train.ema_decay = 1.0 is not allowed: it must lie in [0, 1)"),
    (
        "data.source",
        "hub",
        "config.data.source = 'hub' is not allowed: it must be one of fashion_mnist, folder, idx, latents, npz, tfds",
    ),
    ("data.fit", "stretch", "it must be one of crop_resize, pad"),
    ("mesh.reduction", "tree", "it must be one of allreduce, fixed_order"),
    (
        "multihost.cluster",
        "k8s",
        "config.multihost.cluster = 'k8s' is not allowed: it must be one of auto, manual, slurm",
    ),
    ("multihost.coordinator", "localhost", 'it must be "host:port"'),
    ("multihost.num_processes", -2, "it must be 0 (from the cluster) or a positive number"),
    ("multihost.process_id", -3, "it must be -1 (from the cluster) or lie in"),
    ("multihost.local_device_ids", (0, 0), "it must be () (all) or distinct non-negative"),
    ("multihost.timeout_s", 0, "it must be a positive number of seconds"),
    (
        "multihost.coordinator",
        "10.0.0.1:1234",
        "config.multihost.coordinator = '10.0.0.1:1234' is not allowed: it only applies to several processes: add --config.distributed=True",
    ),
]


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_each_bad_value_gives_one_sentence_naming_the_field(field, value, message):
    config = base.get_config()
    if field == "data.resolution" and value == 36:
        config.model.patch_size = 8
        config.model.attn_resolutions = ()
    group, name = field.split(".")
    setattr(config[group], name, value)
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(config)
    text = str(info.value)
    assert message in text
    assert text.count(". ") == 0 and text.endswith(".")  # one sentence


def test_multihost_fields_that_go_together():
    config = base.get_config()
    config.distributed = True
    config.multihost.cluster = "manual"
    with pytest.raises(config_lib.ConfigError, match='cluster = "manual" needs coordinator'):
        config_lib.validate(config)
    config.multihost.update(coordinator="127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(config_lib.ConfigError, match=r"lie in \[0, config.multihost.num_proc"):
        config_lib.validate(config)
    config.multihost.process_id = 1
    config_lib.validate(config)
    config.mesh.update(reduction="fixed_order", model=2)
    with pytest.raises(config_lib.ConfigError, match="it needs config.mesh.model = 1"):
        config_lib.validate(config)


def test_main_names_a_missing_cluster_or_coordinator_in_one_line():
    result = run_main(
        "--config",
        "ml_collections_configs/base.py:runlocal",
        "--config.distributed=True",
        "--workdir",
        "unused",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("patchdiff: config.distributed = True, but no cluster (Slurm, a Cloud TPU VM")
    ), result.stderr
    result = run_main(
        "--config",
        "ml_collections_configs/base.py:runlocal",
        "--config.distributed=True",
        "--config.multihost.cluster=manual",
        "--config.multihost.coordinator=127.0.0.1:1",
        "--config.multihost.num_processes=2",
        "--config.multihost.process_id=1",
        "--config.multihost.timeout_s=1",
        "--workdir",
        "unused",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "patchdiff: config.multihost.coordinator = '127.0.0.1:1' did not answer within "
            "config.multihost.timeout_s = 1 s"
        )
    ), result.stderr


def test_vp_linear_needs_more_than_twenty_steps():
    config = base.get_config()
    config.diffusion.parameterisation = "vp"
    config.diffusion.vp_timesteps = 10
    with pytest.raises(config_lib.ConfigError, match="needs T > 20"):
        config_lib.validate(config)


def test_every_parameterisation_validates_with_its_defaults():
    for name in ("edm", "vp", "ve", "v", "flow"):
        config = base.get_config()
        config.diffusion.parameterisation = name
        config_lib.validate(config)


def test_with_patch_size_keeps_attention_at_the_same_level():
    config = base.get_config()
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    for p, expect in ((1, (16,)), (2, (8,)), (4, (4,))):
        variant = config_lib.with_patch_size(config, p)
        assert tuple(variant.model.attn_resolutions) == expect
        config_lib.validate(variant)
    assert config.model.patch_size == 1  # the original is untouched


def run_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "patchdiff.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_main_prints_model_cost():
    result = run_main("--config", "ml_collections_configs/base.py:runlocal", "--mode", "summary")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "gflops_per_image" in line)
    rows = [line.split() for line in lines[header + 2 :] if line.strip()]
    assert [r[0] for r in rows] == ["1", "2", "4"]
    gflops = [float(r[2]) for r in rows]
    assert gflops[0] > gflops[1] > gflops[2] > 0


def test_main_reports_a_bad_field_in_one_line():
    result = run_main(
        "--config",
        "ml_collections_configs/base.py:runlocal",
        "--config.model.patch_size=3",
        "--mode",
        "summary",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "patchdiff: config.model.patch_size = 3 is not allowed: it must be one of 1, 2, 4, 8."
    ]


CONFIGS = [
    "base",
    "fashion_mnist",
    "cifar10_ddpmpp",
    "cifar10_ddpmpp_patch",
    "celeba64_patch",
    "ffhq64_patch",
    "imagenet64_adm",
    "lsun256_p4",
    "dit_b4_cifar10",
    "dit_xl2_imagenet256",
    "hdit_fashion_mnist",
    "hdit_ffhq1024",
    "hdit_imagenet256",
    "latent_fashion_mnist",
    "imagenet256_patch_latent",
    "flow_dit_imagenet256",
]

# What "runlocal" keeps small, per network.
WIDTHS = {
    "unet": lambda m: m.channels,
    "dit": lambda m: m.dit.width,
    "hdit": lambda m: max(m.hdit.widths),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_experiment_config_is_valid(name, arg):
    import importlib

    module = importlib.import_module(f"ml_collections_configs.{name}")
    config = module.get_config(arg)
    config_lib.validate(config)
    assert f"ml_collections_configs/{name}.py" in module.__doc__ or name == "base"
    if arg == "runlocal":
        assert config.train.total_steps <= 20
        assert WIDTHS[config.model.name](config.model) <= (
            32 if config.model.name == "unet" else 128
        )

"""ImageNet 256x256 pixels, class-conditional (1000 classes), with the Hourglass Diffusion
Transformer at the paper's ImageNet-256 size (Crowson et al. 2024): 4x4 patches, three levels of
widths (384, 768, 1536) and depths (2, 2, 16), 64-channel heads, 7x7 neighborhood attention at
the first two levels and global attention at the deepest (16x16 tokens), a 2-block mapping
network of width 256: 557.4 M parameters (the paper's 557 M; tests/models/test_hdit.py). HDiT's
recipe as hdit_ffhq1024.py (`recipe`), Patch Diffusion's crops through `use_coords`, label dropout
0.1, and classifier-free guidance 1.3 for samples and evaluation.

    python -m patchdiff.data.prepare imagenet2012   # once; TFDS wants ILSVRC2012's tars in its manual_dir
    python -m patchdiff.main --config ml_collections_configs/hdit_imagenet256.py --workdir runs/in256_hdit
    python -m patchdiff.main --config ml_collections_configs/hdit_imagenet256.py:runlocal --workdir /tmp/in256_hdit
"""

from ml_collections_configs import base, hdit_ffhq1024


def get_config(arg=None):
    options = base.parse_arg(arg)
    config = base.get_config()
    config.data.name = "imagenet2012"
    config.data.resolution = 256
    hdit_ffhq1024.hdit(config, (384, 768, 1536), (2, 2, 16), patch_size=4)
    hdit_ffhq1024.recipe(config)
    config.model.num_classes = 1000
    config.train.label_dropout = 0.1  # k-diffusion's cond_dropout_rate
    config.train.total_steps = 2_000_000
    config.train.checkpoint_every = 10_000
    config.sample.guidance_scale = config.eval.guidance_scale = 1.3
    return hdit_ffhq1024.shrink(config) if "runlocal" in options else config

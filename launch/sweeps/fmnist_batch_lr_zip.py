"""Batch size and learning rate scaled together (zip_ pairs the i-th values), then two named
patch-size recipes (tuple values), after the demo as it is: chain appends. 6 trials.

    python -m launch.sweep --sweep launch/sweeps/fmnist_batch_lr_zip.py \
        --config ml_collections_configs/fashion_mnist.py --root runs/fmnist_zip --list
"""

from launch.sweep import chain, sweep, trial, zip_


def get_sweep():
    return chain(
        trial("demo"),  # the config unchanged
        zip_(
            sweep("train.batch_size", [32, 64, 128]),
            sweep("train.lr", [1e-3, 2e-3, 4e-3]),  # lr in proportion to the batch
        ),
        trial("full_images", {"diffusion.patch_scales": (1.0,), "diffusion.patch_probs": (1.0,)}),
        trial(
            "patches_half",
            {"diffusion.patch_scales": (1.0, 0.5), "diffusion.patch_probs": (0.5, 0.5)},
        ),
    )

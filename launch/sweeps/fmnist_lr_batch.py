"""Learning rate x batch size for the Fashion-MNIST demo: 3 x 2 = 6 trials.

    python -m launch.sweep --sweep launch/sweeps/fmnist_lr_batch.py \
        --config ml_collections_configs/fashion_mnist.py --root runs/fmnist_lr_batch
    python -m launch.collect runs/fmnist_lr_batch --sort fd_fmnist@5k

Every trial trains the demo's 1000 steps and measures fd_fmnist@5k at the end (and, at batch 64,
after its 64k images, which is the end too); the names are lr=0.001,batch_size=32 and so on.
"""

from launch.sweep import fixed, product, sweep


def get_sweep():
    return product(
        # Evaluations every 64k training images and at the end; fixed keys stay out of the names.
        fixed({"eval.every_images": 64_000}),
        sweep("train.lr", [1e-3, 2e-3, 4e-3]),
        sweep("train.batch_size", [32, 64]),
    )

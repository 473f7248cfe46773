"""patchdiff: patch diffusion training, sampling and evaluation in JAX/Flax.

Subpackages: `diffusion` (preconditioning, noise levels, loss weightings, patch crops, the
denoising loss; pure functions), `models` (Flax U-Net with a patchify stem, `build_model`).
"""

__version__ = "0.1.0"

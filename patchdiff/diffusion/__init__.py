"""Diffusion math as pure functions: arrays in, arrays out.

- `precond`: parameterisations (`edm`, `vp`, `ve`, `v`, `flow`) as one denoiser D(x, sigma) in
  the VE convention x = x0 + sigma n; `edm_scalings`; `denoise`.
- `noise`: training noise-level distributions.
- `weighting`: loss weightings lambda(sigma).
- `patches`: random crops with pixel-coordinate channels (Patch Diffusion).
- `losses`: the denoising loss.
- `build`: makes the above from `config.diffusion` (the only config-aware module here).
"""

from patchdiff.diffusion.losses import denoising_loss
from patchdiff.diffusion.precond import PRECONDITIONINGS, denoise, edm_scalings

__all__ = ["PRECONDITIONINGS", "denoise", "denoising_loss", "edm_scalings"]

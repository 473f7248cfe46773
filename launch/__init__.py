"""How users run patchdiff: sweeps, Slurm, TPU pods, xmanager, ahead-of-time compile, Colab.

Nothing in patchdiff/, nag/, canvas_jax/ or kernels/ imports this package; it imports their
configs and entry points only (launch/README.md).
"""

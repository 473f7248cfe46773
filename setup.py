"""Installs the patchdiff, kernels and canvas_jax packages.

    pip install -e ".[test]"     # CPU, with what the tests need
    pip install -e ".[gpu]"      # NVIDIA GPUs: CUDA build of jax, and jax-triton for kernels/
    pip install -e ".[tpu]"      # TPU VMs
    pip install -e ".[launch]"   # launch/xm_launch.py (xmanager)
    pip install -e ".[aot]"      # launch/aot_compile.py --topology (libtpu, on any machine)

The lower bounds are the versions the test suite was run with (CPU, Python 3.11, 2026-11); the
GPU machines run jax 0.11.2 with Python 3.12. TensorFlow is deliberately absent: tfds reads
array_record files through `tfds.data_source` and grain without it, and it would add about 2 GB
to every install.
"""

import setuptools

CORE = [
    "absl-py>=2.5.1",
    "chex>=0.1.92",
    "diffrax>=0.7.2",
    "einops>=0.8.2",
    "flax>=0.12.8",
    "grain>=0.2.18",
    "jax>=0.10.2",
    "ml-collections>=1.1.0",
    "numpy>=2.4",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "pillow>=13.0",
    "safetensors>=0.8",
    "tensorboardX>=2.6",
    "tensorflow-datasets>=4.9.10",
    "tqdm>=4.66",
]

EXTRAS = {
    # ruff's formatting rules change between minor releases: a new one must not fail CI.
    # triton runs kernels/triton_fa2/kernels.py in its CPU interpreter in the tests (no GPU).
    "test": [
        "pytest>=9.0",
        "pytest-xdist>=3.8",
        "ruff>=0.15,<0.18",
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
        # launch/colab/: the notebook runs in the suite (nbmake) and stays paired with its
        # jupytext .py (a test compares them).
        "nbmake>=1.5",
        "ipykernel>=6.29",
        "jupytext>=1.16",
        # the notebook plots the loss and fd_fmnist; the kernel-search report draws its figure
        "matplotlib>=3.8",
    ],
    # jax-triton refuses to import without a CUDA build of jax: only kernels/ may import it, lazily.
    "gpu": ["jax[cuda13]>=0.10.2", "jax-triton>=0.3.1"],
    "tpu": ["jax[tpu]>=0.10.2"],
    # launch/xm_launch.py: xmanager's local and Vertex AI backends (~90 packages, ~620 MB).
    "launch": ["xmanager>=0.8.5"],
    # launch/aot_compile.py --topology: compiles for a TPU pod from a CPU-only machine.
    "aot": ["libtpu"],
    # Only to prepare TFDS datasets once (tfds encodes images with TF); training never needs it.
    "prepare": ["tensorflow-cpu>=2.16"],
}

setuptools.setup(
    name="patchdiff",
    version="0.1.0",
    description="Patch diffusion training and kernel search in JAX/Flax.",
    packages=setuptools.find_packages(
        include=[
            "patchdiff",
            "patchdiff.*",
            "kernels",
            "kernels.*",
            "canvas_jax",
            "canvas_jax.*",
            "nag",
            "nag.*",
        ]
    ),
    package_data={"patchdiff.metrics": ["*.npz"]},  # the fd_fmnist classifier's weights
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)

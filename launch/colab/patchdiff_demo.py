# ---
# jupyter:
#   accelerator: GPU
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # patchdiff on Colab: train, sample, measure, search a kernel
#
# This notebook trains the project's demo, a class-conditional diffusion model of Fashion-MNIST
# (`ml_collections_configs/fashion_mnist.py`), with the library's own
# `patchdiff.train.train_and_evaluate`; shows its sample grids; samples it with several samplers
# and guidance scales; plots its loss and its sample quality (`fd_fmnist`, the Frechet distance
# in the features of the project's Fashion-MNIST classifier); and runs a tiny kernel search
# (`nag.kernel_search`) inside the trained network.
#
# **In Colab**: Runtime > Change runtime type > a GPU (T4 or better) or a TPU; set `REPO_URL` in
# the first code cell; Runtime > Run all. That cell clones the repository, installs it with the
# JAX build for the accelerator, and installs Debian/Ubuntu's `dataset-fashion-mnist` package
# (the real Fashion-MNIST, in `/usr/share/datasets/fashion-mnist/`). The full sizes of the
# parameter cell are meant for a few minutes of training on a Colab GPU or TPU. Outside Colab
# nothing is installed: run the notebook from a checkout where `pip install -e ".[test]"` was
# done.
#
# **Sizes**: the code cell tagged `parameters` holds the full sizes and `RUNLOCAL`. With
# `RUNLOCAL = True` everything shrinks (the configs' `:runlocal` option, a smaller network, a
# few steps, a few dozen samples) and the whole notebook runs in about a minute on a 2-core CPU.
#
# **CI** (`tests/launch/test_colab.py`) runs this notebook with nbmake
# (`pytest --nbmake launch/colab/patchdiff_demo.ipynb`) at the `RUNLOCAL` sizes, through the
# parameter cell: that cell's metadata holds `"nbmake": {"mock": {"RUNLOCAL": true}}`, and nbmake
# runs `RUNLOCAL = True` right after the cell. CI machines need not have Fashion-MNIST and may
# download nothing, so the test also sets the environment variable `PATCHDIFF_NOTEBOOK_DATA` to
# a folder of made-up images in Fashion-MNIST's IDX format, which the parameter cell reads into
# `DATA_PATH`.
#
# Imports of the project come after the install, hence the E402 exemptions in the paired
# `.py` file.

# %% [markdown]
# ## 1. Install (only in Colab)
#
# `REPO_URL` is the repository to clone: no public URL is decided yet, so set it before running.
# In Colab the cell clones it into `/content/patchdiff`, installs it with `pip install -e`
# (`.[gpu]` on a GPU runtime, `.[tpu]` on a TPU runtime) and installs the data with `apt-get`.
# Anywhere else it only finds the checkout this notebook lives in. Should Colab ask to restart
# the session after the install (pip upgraded a package it had loaded), restart and run all
# again: the clone is reused.

# %%
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from IPython.display import Image, display

REPO_URL = "https://github.com/OWNER/patchdiff.git"  # set me: no public URL is decided yet

if "google.colab" in sys.modules:
    checkout = pathlib.Path("/content/patchdiff")
    if not checkout.exists():
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, str(checkout)], check=True)
    tpu = pathlib.Path("/dev/accel0").exists() or "TPU_ACCELERATOR_TYPE" in os.environ
    extra = "[gpu]" if shutil.which("nvidia-smi") else "[tpu]" if tpu else ""
    pip = [sys.executable, "-m", "pip", "install", "-q", "-e", f".{extra}"]
    subprocess.run(pip, cwd=checkout, check=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)
    os.chdir(checkout)

# The repository root: the configs are files there, and they import `ml_collections_configs`.
here = pathlib.Path.cwd()
ROOT = next(p for p in (here, *here.parents) if (p / "ml_collections_configs").is_dir())
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
print("repository:", ROOT)

# %% [markdown]
# ## 2. Parameters
#
# The full sizes are for a Colab GPU or TPU: 2000 training steps of the demo (its config trains
# 1000, after which README.md quotes fd_fmnist@5k = 231.6), fd_fmnist over 5000 samples every
# 100k training images (crops), grids from three samplers at two guidance scales, and a kernel
# search of two rounds of two candidates, each trained 32 steps. `WORKDIR` keeps the run:
# running the notebook again resumes from its newest checkpoint (Colab sessions end, so put it
# on a mounted Drive to keep it).

# %% tags=["parameters"] nbmake={"mock": {"RUNLOCAL": true}}
RUNLOCAL = False  # True: every size below shrinks to a seconds-long CPU run
WORKDIR = "runs/colab_fmnist"  # relative to the repository root
# A folder of Fashion-MNIST's IDX files; "" = Debian's dataset-fashion-mnist package.
DATA_PATH = os.environ.get("PATCHDIFF_NOTEBOOK_DATA", "")
TRAIN_STEPS = 2000
EVAL_SAMPLES = 5000  # fd_fmnist@5k, the README's figure
EVAL_EVERY_IMAGES = 100_000
SAMPLERS = ("heun", "dpmpp_2m", "euler_ancestral")
GUIDANCE_SCALES = (1.0, 3.0)
SEARCH_BUDGET = 4  # SoTL-E evaluations, in rounds of two
SEARCH_STEPS = 32  # SoTL-E training steps per candidate

# %% [markdown]
# With `RUNLOCAL` the sizes shrink to a smoke run, and the run goes to a fresh temporary folder
# (nothing to resume from).

# %%
if RUNLOCAL:
    TRAIN_STEPS, EVAL_SAMPLES, EVAL_EVERY_IMAGES = 10, 40, 80
    SAMPLERS = ("heun", "dpmpp_2m")
    SEARCH_BUDGET, SEARCH_STEPS = 2, 2
    WORKDIR = tempfile.mkdtemp(prefix="patchdiff_colab_")
CONFIG = "ml_collections_configs/fashion_mnist.py" + (":runlocal" if RUNLOCAL else "")
WORKDIR = pathlib.Path(WORKDIR).absolute()
print(f"RUNLOCAL = {RUNLOCAL}: {CONFIG}, {TRAIN_STEPS} steps, workdir {WORKDIR}")

# %% [markdown]
# ## 3. The accelerator
#
# JAX takes the best backend it finds: `gpu` or `tpu` when the Colab runtime has one (choose it
# under Runtime > Change runtime type before running), else `cpu`. The project's code runs on
# all three unchanged; training splits each batch over all the devices listed here (a TPU has
# several).

# %%
import jax  # noqa: E402

print("backend:", jax.default_backend())
print("devices:", jax.devices())

# %% [markdown]
# ## 4. Train the demo
#
# The config is the demo's file, read as `--config` reads it (`patchdiff.config.load_file`),
# with a few fields changed: the number of steps, where the data is, and fd_fmnist measured by
# the project's evaluator during training, every `EVAL_EVERY_IMAGES` training images and at the
# end (`config.eval.every_images`, `config.eval.metrics`). `RUNLOCAL` also makes every compiled
# program small (one U-Net level, no attention, one crop size): on a CPU, compiling is most of
# a short run.

# %%
from patchdiff import config as config_lib  # noqa: E402
from patchdiff import train  # noqa: E402

config = config_lib.load_file(str(ROOT / CONFIG))
config.data.path = DATA_PATH
config.train.total_steps = TRAIN_STEPS
config.eval.metrics = ("fd_fmnist",)
config.eval.num_samples = EVAL_SAMPLES
config.eval.every_images = EVAL_EVERY_IMAGES
if RUNLOCAL:
    config.model.channel_mult, config.model.attn_resolutions = (1,), ()
    config.diffusion.patch_scales, config.diffusion.patch_probs = (1.0,), (1.0,)
    config.train.grad_noise_scale = False
    config.eval.ref_num = 500  # test images in fd_fmnist's reference (default: all 10k)
config_lib.validate(config)
print(config.model)

# %% [markdown]
# One call trains: `patchdiff.train.train_and_evaluate(config, workdir)`, the function behind
# `python -m patchdiff.main`. It writes checkpoints, `metrics.jsonl`, TensorBoard files and
# sample grids to `WORKDIR`, and returns the final train state.

# %%
result = train.train_and_evaluate(config, WORKDIR)
print("trained to step", result["step"])

# %% [markdown]
# The sample grids written during training (`WORKDIR/samples/step_*.png`), drawn from the EMA
# parameters with the config's sampler (Heun). Image i (left to right, top to bottom) is of
# class i mod 10: T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle
# boot; in the full-size 10x10 grid, column k is class k.

# %%
for grid in sorted((WORKDIR / "samples").glob("step_*.png")):
    print(grid.name)
    display(Image(filename=str(grid), width=320))

# %% [markdown]
# ## 5. Samplers and guidance scales
#
# `patchdiff.generate.make_generator` turns the trained network into a jitted sampler for any
# name in `patchdiff.sampling.SAMPLERS` (Heun's 2nd-order method as in EDM, DPM++(2M), Euler
# ancestral, ...) and a classifier-free guidance scale (1 = none; 3 pulls each image towards
# its class). Every grid is drawn from the same seeds: images at the same place start from the
# same noise.

# %%
import matplotlib.pyplot as plt  # noqa: E402

from patchdiff import generate  # noqa: E402
from patchdiff.models import build_model  # noqa: E402
from patchdiff.train.report import save_grid  # noqa: E402

model, ema = build_model(config), result["state"].ema
rows, cols = len(GUIDANCE_SCALES), len(SAMPLERS)
fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
for row, scale in enumerate(GUIDANCE_SCALES):
    for col, sampler in enumerate(SAMPLERS):
        generator = generate.make_generator(model, config, sampler=sampler, guidance_scale=scale)
        images, _ = generate.generate_all(generator, ema, config, config.sample.num_images)
        path = save_grid(images, WORKDIR / "compare" / f"{sampler}_cfg{scale:g}.png")
        axes[row, col].imshow(plt.imread(path), cmap="gray")
        axes[row, col].set_title(f"{sampler}, {config.sample.steps} steps, guidance {scale:g}")
        axes[row, col].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Loss and sample quality
#
# `metrics.jsonl` holds a line per report (the loss averaged since the last one, its value per
# crop size, the learning rate, images per second, ...) and a line per evaluation
# (`fd_fmnist@N`, with the training images seen so far). Lower fd_fmnist is better; only figures
# at the same sample count N compare (README.md, "Sample quality").

# %%
records = [json.loads(line) for line in (WORKDIR / "metrics.jsonl").read_text().splitlines()]
losses = [r for r in records if "loss" in r]
fd_name = next(k for r in records for k in r if k.startswith("fd_fmnist@"))
fds = [r for r in records if fd_name in r]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
left.plot([r["step"] for r in losses], [r["loss"] for r in losses])
left.set(xlabel="step", ylabel="training loss", title="loss")
right.plot([r["images_seen"] for r in fds], [r[fd_name] for r in fds], "o-")
right.set(xlabel="training images (crops)", ylabel=fd_name, title="sample quality")
plt.tight_layout()
plt.show()

# %% [markdown]
# The last figure above is the final network's at guidance 1 (`config.eval.guidance_scale`).
# The same evaluator that training ran (`patchdiff.metrics.evaluator.SampleEvaluator`) measures
# it at the other guidance scales, from the same seeds, against the reference statistics that
# training computed once and cached in `WORKDIR/eval/`. `python -m patchdiff.main --mode eval`
# measures with EDM's full protocol (several seed ranges, then the denoising error on held-out
# images).

# %%
from patchdiff.metrics.evaluator import SampleEvaluator  # noqa: E402
from patchdiff.train.loop import make_mesh  # noqa: E402

print(f"guidance {config.eval.guidance_scale:g}: {fd_name} {fds[-1][fd_name]:.2f}")
for scale in GUIDANCE_SCALES:
    if scale != config.eval.guidance_scale:
        scaled = config.copy_and_resolve_references()
        scaled.eval.guidance_scale = scale
        evaluator = SampleEvaluator(scaled, model, WORKDIR, make_mesh(scaled)[0])
        print(f"guidance {scale:g}: {fd_name} {evaluator(ema)[fd_name]:.2f}")

# %% [markdown]
# ## 7. A tiny kernel search
#
# The search of `python -m nag.main` (`nag.kernel_search`), run here inside the network just
# trained: the search settings are `kernel_search_fashion_mnist.py:runlocal`'s (kernel graphs of
# up to 8 nodes replacing the second 3x3 convolution of every residual block), with our
# network, data and diffusion (whole images only) in place of its own. Each round proposes
# kernel graphs (the graph diffusion generator and random draws), ranks them by a zero-cost
# proxy (Jacobian covariance), trains the best two briefly inside the network and scores them by
# SoTL-E (minus the sum of the last training losses: higher is better). `RUNLOCAL` keeps the
# space to five primitives and five nodes, leaves the generator out, and trains both candidates
# in one compiled program on batches of four.

# %%
from ml_collections_configs import kernel_search_fashion_mnist  # noqa: E402

search = kernel_search_fashion_mnist.get_config("runlocal")
placeholders = search.model.placeholders
for section in ("data", "model", "diffusion"):
    search[section] = config[section].copy_and_resolve_references()
search.model.placeholders = placeholders
# One crop size, as that config's own recipe: each crop size compiles its own SoTL-E program.
search.diffusion.patch_scales, search.diffusion.patch_probs = (1.0,), (1.0,)
nag = search.nag
nag.budget, nag.per_round, nag.proposals = SEARCH_BUDGET, 2, 8
nag.sotl.steps, nag.sotl.last = SEARCH_STEPS, max(1, SEARCH_STEPS // 4)
nag.sotl.steps_per_call = min(SEARCH_STEPS, nag.sotl.steps_per_call)
nag.sotl.candidates_per_call = nag.per_round
if RUNLOCAL:
    nag.ops, search.kernel_search.max_nodes = ("fc", "dwconv3", "relu", "add", "scale"), 5
    nag.generator.enabled = False
    nag.sotl.batching, nag.sotl.batch_size = "map", 4
    nag.proposals, nag.pool, nag.proxy_images = 4, 16, 2

# %% [markdown]
# The search itself: the pieces `nag.kernel_search.run` wires together for its step 2 (SoTL-E
# training from our EMA parameters, the proxy on a few training images), then
# `nag.kernel_search.search`, which records every evaluation in
# `WORKDIR/kernel_search/results.jsonl` and resumes from it.

# %%
from canvas_jax.sample import Constraints, kernel_shapes  # noqa: E402
from nag import kernel_search  # noqa: E402
from nag.sotl import SotlTrainer  # noqa: E402

settings = kernel_search.read_settings(search)  # checks every field
space = kernel_search.search_space(search, settings.search)
constraints = Constraints.from_config(search, kernel_shapes(search))
pool = kernel_search.load_images(search, nag.pool)
trainer = SotlTrainer(search, ema, settings.sotl, space=space)
proxy_fn = kernel_search.make_proxy_fn(
    search, ema, settings.search, pool["image"][: nag.proxy_images]
)
records = kernel_search.search(
    WORKDIR / "kernel_search",
    space,
    constraints,
    settings,
    evaluate=lambda graphs: trainer.scores(graphs, pool),
    proxy_fn=proxy_fn,
)

# %% [markdown]
# The best kernel: its graph (each line one primitive of `canvas_jax/primitives.py`; `x` is the
# convolution's input) and its SoTL-E score, with its cost relative to the convolution it
# replaces. `python -m nag.main` would go on to fine-tune it beside the original and compare
# them on held-out images.

# %%
best = kernel_search.best_record(records)
print(kernel_search.graph_of(best))
print(
    f"SoTL-E {best['sotl']:.4f} (best of {len(records)}), at {best['flops_fraction']:.2f} of "
    f"the FLOPs and {best['params_fraction']:.2f} of the parameters of the convolution"
)

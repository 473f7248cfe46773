"""launch/colab: the demo notebook runs end to end at its RUNLOCAL sizes (nbmake, RUNLOCAL set
through the parameter cell's nbmake mock), stays paired with its jupytext .py file, and is
committed without outputs.

The run reads made-up images in Fashion-MNIST's IDX format: CI machines need not have Debian's
dataset-fashion-mnist package, and nothing may be downloaded.
"""

import json
import os
import pathlib
import subprocess
import sys

import jupytext
import numpy as np

ROOT = pathlib.Path(__file__).parents[2]
NOTEBOOK = ROOT / "launch" / "colab" / "patchdiff_demo.ipynb"
PAIRED = NOTEBOOK.with_suffix(".py")
SYNC = "run `jupytext --sync launch/colab/patchdiff_demo.py` after editing either file"


def write_idx(path, array):
    """An IDX file of unsigned bytes (the MNIST format): magic 0x0800 + ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.write_bytes(header + np.asarray(array, np.uint8).tobytes())


def fake_fashion_mnist(folder, n=512):
    """train- and t10k- IDX files of n 28x28 images, each a bright blob whose height is its class
    (0-9), with noise. The notebook's RUNLOCAL reference takes 500 test images."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    for prefix in ("train", "t10k"):
        labels = rng.integers(0, 10, n)
        rows = 4 + 2 * labels[:, None, None]
        images = 255 * np.exp(-((yy - rows) ** 2 + (xx - 14) ** 2) / 30.0)
        images = np.clip(images + rng.normal(0, 10, images.shape), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def test_the_notebook_runs_at_runlocal_sizes(tmp_path):
    env = dict(os.environ)
    env["PATCHDIFF_NOTEBOOK_DATA"] = str(fake_fashion_mnist(tmp_path / "fmnist"))
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # the RUNLOCAL run's workdir is a fresh temp folder
    # One CPU device, as a Colab GPU is one (the last flag wins over conftest's 8): on 8 fake
    # devices every program compiles and runs about twice as long; tests/train covers sharding.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
    command = [
        sys.executable, "-m", "pytest", "--nbmake", str(NOTEBOOK), "-p", "no:cacheprovider",
        "-q", "--nbmake-timeout=400",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout


def test_runlocal_comes_from_the_parameter_cell():
    """CI's sizes come from nbmake's mock on the cell tagged "parameters": nbmake runs
    `RUNLOCAL = True` right after that cell, which itself keeps Colab's full sizes."""
    notebook = jupytext.read(NOTEBOOK)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    assert cells[0].metadata["nbmake"] == {"mock": {"RUNLOCAL": True}}
    assert "RUNLOCAL = False" in cells[0].source


def test_the_ipynb_and_the_py_are_in_sync():
    ipynb, py = jupytext.read(NOTEBOOK), jupytext.read(PAIRED)
    assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent", SYNC
    assert len(ipynb.cells) == len(py.cells), SYNC
    for number, (a, b) in enumerate(zip(ipynb.cells, py.cells, strict=True)):
        assert (a.cell_type, a.source) == (b.cell_type, b.source), f"cell {number}: {SYNC}"
        if a.cell_type == "code":
            assert a.metadata == b.metadata, f"cell {number}'s metadata: {SYNC}"


def test_the_committed_notebook_has_no_outputs():
    raw = json.loads(NOTEBOOK.read_text())
    assert "widgets" not in raw["metadata"]
    for number, cell in enumerate(raw["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {number} has outputs"
            assert cell["execution_count"] is None, f"cell {number} has an execution count"
            assert "execution" not in cell["metadata"], f"cell {number} has run timings"

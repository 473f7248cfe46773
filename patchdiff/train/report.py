"""What a person sees: a JSON-lines metrics file, TensorBoard event files (tensorboardX, no
TensorFlow), and sample grids as PNG."""

import json
import math
import pathlib

import numpy as np
from PIL import Image


class MetricsWriter:
    """Appends {"step": s, ...} lines to metrics.jsonl and scalars to TensorBoard (process 0)."""

    def __init__(self, workdir, enabled=True):
        self.enabled = enabled
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        self.file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        for name, value in clean.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


def write_json(path, payload) -> pathlib.Path:
    """Writes `payload` as indented JSON beside `path` and renames it into place, so a crash
    never leaves half a result where a whole one was."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 [N, H, W, C], EDM's rule: (x * 127.5 + 128) clipped to
    [0, 255] and truncated (`generate.py` of NVlabs/edm), so that quantised samples, and the
    metrics measured on them, are the ones EDM's figures are made from."""
    scaled = np.asarray(images, np.float32) * 127.5 + 128
    return np.clip(scaled, 0, 255).astype(np.uint8)


def save_grid(images, path) -> pathlib.Path:
    """Tiles uint8 [N, H, W, C] into a near-square grid PNG (grey for C = 1)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path

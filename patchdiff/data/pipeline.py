"""From a source to global batches on the mesh: a seeded, resumable order, preprocessing, a
per-process shard, and a prefetch thread.

Order: epoch e visits the dataset in the permutation `default_rng([seed, e])`; the stream
position (examples consumed so far, all processes together) is the whole state, so a checkpoint
stores one integer and a restart continues the same stream. Each global batch [G, ...] is the next
G positions; process p reads its slice [p G/P, (p+1) G/P) only. An undecodable image is replaced,
deterministically, by the next decodable one in index order, with a counted warning.

A latent source (`source.latent`, patchdiff/data/latents.py) takes the same path with VAE latents
in place of decoded images: example i is a posterior draw seeded by (seed, position), flipped by
the images' rule, in model space (z - shift) * scale, so its stream resumes just as exactly.

Glossary: G global batch, P processes, R resolution, C channels.
"""

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from PIL import Image

from patchdiff.data.sources import CorruptImage, DataError

FITS = ("crop_resize", "pad")


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, c] -> [H, W, channels]: grey <-> RGB (ITU-R 601 luma), alpha dropped."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[-1] == channels:
        return image
    if channels == 3 and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and image.shape[-1] == 3:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"cannot turn an image with {image.shape[-1]} channels into {channels}.")


def fit(image: np.ndarray, resolution: int, how: str) -> np.ndarray:
    """uint8 [H, W, C] -> [R, R, C]. "crop_resize": centre square crop, then bicubic resize
    (ADM's `center_crop_arr` without its box pre-shrink); "pad": zero-pad a smaller image to R
    (Fashion-MNIST's 28 -> 32 keeps its pixels exact), centre-crop a larger one."""
    h, w = image.shape[:2]
    if how == "pad":
        top, left = (resolution - h) // 2, (resolution - w) // 2
        if top >= 0 and left >= 0:
            return np.pad(
                image, ((top, resolution - h - top), (left, resolution - w - left), (0, 0))
            )
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    if side == resolution:
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = pil.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(pil, np.uint8).reshape(resolution, resolution, image.shape[-1])


class Loader:
    """Batches of {"image": float32 [G/P, R, R, C] in [-1, 1], "label": int32 [G/P]} for this
    process, read from position `position` of the seeded stream.

    From a latent source "image" holds latents in model space, (z - shift_factor) *
    scaling_factor: the source's, unless set on the loader after construction (a config's own
    scale overrides the VAE's).
    """

    def __init__(
        self,
        source,
        *,
        resolution,
        channels,
        seed=0,
        how="crop_resize",
        random_flip=True,
        position=0,
        threads=4,
    ):
        if how not in FITS:
            raise DataError(
                f"config.data.fit = {how!r} is not allowed: it must be one of {', '.join(FITS)}."
            )
        self.source, self.resolution, self.channels = source, resolution, channels
        self.seed, self.how, self.random_flip = seed, how, random_flip
        self.position = position
        self.skipped = 0
        self.latent = getattr(source, "latent", False)
        if self.latent:
            h, w, c = source.latent_shape
            if (h, w, c) != (resolution, resolution, channels):
                raise DataError(
                    f"config.data.resolution = {resolution} and config.data.channels = "
                    f"{channels} do not match the latents in {source.folder} ({h} x {w} x {c}): "
                    f"set them to {h} and {c}."
                )
            self.scaling_factor, self.shift_factor = source.scaling_factor, source.shift_factor
        self._perms = {}
        self._pool = ThreadPoolExecutor(threads)

    def index_at(self, position: int) -> int:
        """The dataset index at a stream position."""
        epoch, offset = divmod(position, len(self.source))
        if epoch not in self._perms:
            self._perms = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            }
        return int(self._perms[epoch][offset])

    def example(self, position: int, index: int):
        """The preprocessed example at a stream position (`index` = index_at(position))."""
        if self.latent:
            return self.latent_example(position, index)
        for attempt in range(len(self.source)):
            try:
                image, label = self.source[(index + attempt) % len(self.source)]
                break
            except CorruptImage as e:
                self.skipped += 1
                logging.warning("skipping an unreadable image (%d so far): %s", self.skipped, e)
        else:
            raise DataError("no image of the data source could be decoded.")
        image = fit(to_channels(np.asarray(image), self.channels), self.resolution, self.how)
        if self.random_flip and np.random.default_rng([self.seed, position, 1]).random() < 0.5:
            image = image[:, ::-1]
        return image, label

    def latent_example(self, position: int, index: int):
        """(float32 [R, R, C] in model space, label): the same flip rule as images, and the
        posterior's noise from its own generator, both functions of (seed, position)."""
        flip = self.random_flip and np.random.default_rng([self.seed, position, 1]).random() < 0.5
        noise = np.random.default_rng([self.seed, position, 2])
        z, label = self.source.latent_at(index, flip, noise)
        return (z - self.shift_factor) * self.scaling_factor, label

    def local_batch(self, global_size: int, position: int):
        """This process's slice of the global batch that starts at `position`."""
        count, index = jax.process_count(), jax.process_index()
        if global_size % count:
            raise DataError(
                f"a global batch of {global_size} does not split over {count} processes."
            )
        local = global_size // count
        start = position + index * local
        positions = range(start, start + local)
        # Indices first, on this thread: the permutation cache is not shared with the decoders.
        indices = [self.index_at(p) for p in positions]
        examples = list(self._pool.map(self.example, positions, indices))
        images = np.stack([e[0] for e in examples]).astype(np.float32)
        if not self.latent:
            images = images / 127.5 - 1
        labels = np.array([e[1] for e in examples], np.int32)
        return {"image": images, "label": labels}

    def next(self, global_size: int):
        batch = self.local_batch(global_size, self.position)
        self.position += global_size
        return batch


def to_global(batch, sharding):
    """Host batch (this process's rows) -> global jax.Arrays laid out by `sharding`."""

    def put(local):
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(put, batch)


class Prefetcher:
    """Runs `produce(step)` for steps start, start+1, ... in a thread, `depth` steps ahead, so
    that the device never waits on decoding. `get()` returns the next step's result."""

    def __init__(self, produce, start: int, depth: int = 2):
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, start), daemon=True)
        self._thread.start()

    def _run(self, produce, step):
        while not self._stop.is_set():
            try:
                item = produce(step)
            except Exception as e:  # handed to the consumer, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            step += 1

    def get(self):
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

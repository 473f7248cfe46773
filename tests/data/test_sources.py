import gzip
import logging

import numpy as np
import pytest
from PIL import Image

from patchdiff import data as data_lib
from patchdiff.data import pipeline, sources


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_read_back(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8) % 10
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    source = sources.idx_source(tmp_path)
    assert len(source) == 7
    image, label = source[3]
    np.testing.assert_array_equal(image[..., 0], images[3])
    assert label == 3


def test_bad_idx_and_missing_fashion_mnist(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x08\x08\x08\x08junk")
    with pytest.raises(sources.DataError, match="magic number"):
        sources.idx_source(tmp_path)
    with pytest.raises(sources.DataError, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist_source(tmp_path / "nowhere")


def test_npz_source(tmp_path):
    images = np.zeros((5, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(5))
    source = sources.npz_source(tmp_path / "d.npz")
    assert len(source) == 5 and source[4][1] == 4
    np.savez(tmp_path / "bad.npz", pictures=images)
    with pytest.raises(sources.DataError, match=r"has no array 'images'; it has \['pictures'\]"):
        sources.npz_source(tmp_path / "bad.npz")
    with pytest.raises(sources.DataError, match="is not a file"):
        sources.npz_source(tmp_path / "missing.npz")


def make_folder(root):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls / "deep").mkdir(parents=True)
        for i in range(3):
            image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / cls / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
            root / cls / "deep" / "x.jpg"
        )
    (root / "dogs" / "broken.png").write_bytes(b"not a png at all")


def test_folder_source_labels_and_corrupt_files(tmp_path):
    make_folder(tmp_path)
    source = sources.folder_source(tmp_path)
    assert len(source) == 9
    labels = [source.class_index[p.relative_to(tmp_path).parts[0]] for p in source.files]
    assert labels == [0] * 4 + [1] * 5
    broken = [i for i, p in enumerate(source.files) if p.name == "broken.png"][0]
    with pytest.raises(sources.CorruptImage):
        source[broken]
    image, label = source[0]
    assert image.shape == (12, 10, 3) and label == 0


def test_loader_skips_a_corrupt_image_with_a_counted_warning(tmp_path, caplog):
    make_folder(tmp_path)
    loader = pipeline.Loader(sources.folder_source(tmp_path), resolution=8, channels=3)
    with caplog.at_level(logging.WARNING):
        batch = loader.next(18)  # two epochs: the broken file is met twice
    assert batch["image"].shape == (18, 8, 8, 3)
    assert loader.skipped == 2
    assert "skipping an unreadable image (2 so far)" in caplog.text


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        source = sources.tfds_source("cifar10", split="train")
        assert len(source) == 6
        image, label = source[2]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and 0 <= label < 10


def test_tfds_not_prepared_is_one_sentence(tmp_path):
    with pytest.raises(sources.DataError, match="is not prepared in .*patchdiff.data.prepare"):
        sources.tfds_source("cifar10", split="train", data_dir=str(tmp_path))


def test_prepare_without_tensorflow_is_one_sentence():
    from patchdiff.data import prepare

    with pytest.raises(SystemExit, match=r"needs TensorFlow .*pip install -e \"\.\[prepare\]\""):
        prepare.main(["cifar10"])


def array_source(n=10, size=6):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, size, size, 1), np.uint8
    )
    return sources.ArraySource(images, np.arange(n), "test")


def test_order_is_seeded_and_resumable():
    a = pipeline.Loader(array_source(), resolution=6, channels=1, seed=3, random_flip=False)
    first = [a.next(4)["label"] for _ in range(5)]  # 20 examples: two epochs
    b = pipeline.Loader(
        array_source(), resolution=6, channels=1, seed=3, random_flip=False, position=8
    )
    np.testing.assert_array_equal(b.next(4)["label"], first[2])
    assert sorted(np.concatenate(first[:2] + [first[2][:2]])) == list(range(10))  # one epoch
    c = pipeline.Loader(array_source(), resolution=6, channels=1, seed=4, random_flip=False)
    assert not np.array_equal(c.next(10)["label"], np.concatenate(first)[:10])


def test_images_are_scaled_fitted_and_flipped_deterministically():
    image = np.zeros((28, 28, 1), np.uint8)
    image[:, :14] = 255
    padded = pipeline.fit(image, 32, "pad")
    assert padded.shape == (32, 32, 1) and padded[:2].max() == 0 and padded[2, 2, 0] == 255
    resized = pipeline.fit(np.zeros((40, 60, 3), np.uint8), 32, "crop_resize")
    assert resized.shape == (32, 32, 3)
    assert pipeline.to_channels(np.zeros((4, 4, 3), np.uint8), 1).shape == (4, 4, 1)
    assert pipeline.to_channels(np.zeros((4, 4), np.uint8), 3).shape == (4, 4, 3)
    source = sources.ArraySource(np.repeat(image[None], 50, 0), None, "t")
    loader = pipeline.Loader(source, resolution=28, channels=1, seed=0)
    batch = loader.next(50)
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    flipped = batch["image"][:, 0, 0, 0] < 0  # left half dark after a flip
    assert 10 < flipped.sum() < 40
    again = pipeline.Loader(source, resolution=28, channels=1, seed=0).next(50)
    np.testing.assert_array_equal(batch["image"], again["image"])


def test_step_plan_scales_the_batch_with_the_patch_size():
    from ml_collections_configs import base

    config = base.get_config()
    config.train.batch_size = 8
    seen = {data_lib.step_plan(config, s) for s in range(200)}
    assert seen == {(32, 8), (16, 16), (8, 32)}
    assert data_lib.step_plan(config, 17) == data_lib.step_plan(config, 17)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff.data import sources
from patchdiff.metrics import EXTRACTORS, MetricError, fd_fmnist, fid


@pytest.fixture(scope="module")
def features():
    return fd_fmnist.load()


@pytest.fixture(scope="module")
def fmnist_test():
    try:
        return sources.fashion_mnist_source(split="test")
    except sources.DataError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_committed_weights_load(features):
    assert features.name == "fmnist" and features.dim == 128
    assert features.version == fd_fmnist.VERSION
    assert features.test_accuracy >= 0.9  # what training measured on all 10k test images
    out = features(random_images(7))
    assert out.shape == (7, 128) and out.dtype == np.float32 and np.isfinite(out).all()
    assert features(random_images(0)).shape == (0, 128)
    assert EXTRACTORS.get("fmnist")(None).name == "fmnist"  # how the evaluator finds it


def test_deterministic_and_batch_independent(features):
    images = random_images(7, seed=1)
    first = features(images)
    np.testing.assert_array_equal(features(images), first)
    # One compiled batch shape: a row's features do not depend on its neighbours, its position
    # or the zero rows that pad the batch, to the bit.
    np.testing.assert_array_equal(features(images[3:6]), first[3:6])
    # Another batch size is another XLA program, which may round differently (about 1e-6 on
    # XLA:CPU): equal to float32 rounding, not bit for bit.
    small = fd_fmnist.load(batch_size=4)
    np.testing.assert_allclose(small(images[:3]), first[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small(images), first, rtol=1e-5, atol=1e-5)  # 4 + 3, padded


def test_test_split_accuracy(features, fmnist_test):
    # The committed model reached 0.9186 on all 10k test images (its meta/test_accuracy); the
    # first 2000 leave room for sampling noise (a standard error of about 0.006).
    labels = fmnist_test.labels[:2000]
    assert np.mean(features.classify(fmnist_test.images[:2000]) == labels) >= 0.89


def test_28_pixel_and_rgb_inputs_match_the_padded_grey(features, fmnist_test):
    raw = fmnist_test.images[:50]  # [50, 28, 28, 1], as the IDX files hold them
    padded = np.pad(raw, ((0, 0), (2, 2), (2, 2), (0, 0)))  # what the demo's pipeline makes
    want = features(padded)
    np.testing.assert_array_equal(features(raw), want)
    np.testing.assert_array_equal(features(np.repeat(padded, 3, axis=-1)), want)


def test_features_tell_real_from_damaged_images(features, fmnist_test):
    """fd_fmnist between two disjoint sets of real images is far below that between real images
    and the same images with their pixels shuffled in 4x4 blocks (texture kept, shape lost)."""

    def stats(images):
        f = features(images).astype(np.float64)
        return f.mean(0), np.cov(f, rowvar=False)

    a, b = fmnist_test.images[:1000], fmnist_test.images[1000:2000]
    blocks = b.reshape(1000, 7, 4, 7, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(1000, 49, 16)
    order = np.random.default_rng(0).permutation(49)
    damaged = blocks[:, order].reshape(1000, 7, 7, 4, 4, 1).transpose(0, 1, 3, 2, 4, 5)
    real = fid.frechet_distance(*stats(a), *stats(b))
    fake = fid.frechet_distance(*stats(a), *stats(damaged.reshape(1000, 28, 28, 1)))
    assert 0 <= real < fake / 10


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 32, 32, 1), np.float32),  # floats: quantise first, as the generator does
        np.zeros((2, 32, 32), np.uint8),  # no channel axis
        np.zeros((2, 30, 30, 1), np.uint8),
        np.zeros((2, 32, 28, 1), np.uint8),
        np.zeros((2, 32, 32, 2), np.uint8),
    ],
)
def test_bad_inputs(features, images):
    with pytest.raises(ValueError, match=r"uint8 images \[N, 32, 32, 1\] or \[N, 28, 28, 1\]"):
        features(images)


def test_bad_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="fd_fmnist --train --out"):
        fd_fmnist.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(MetricError, match="cannot be read.*fd_fmnist --train"):
        fd_fmnist.load(tmp_path / "junk.npz")
    meta = {"meta/version": np.array(fd_fmnist.VERSION), "meta/feature_dim": np.array(128)}
    np.savez(tmp_path / "no_meta.npz", **meta)
    with pytest.raises(MetricError, match=r"lack meta/\['seed', 'test_accuracy'\]"):
        fd_fmnist.load(tmp_path / "no_meta.npz")
    meta.update({"meta/seed": np.array(0), "meta/test_accuracy": np.array(0.9)})
    np.savez(tmp_path / "other.npz", **meta, **{"params/w": np.zeros(3, np.float32)})
    with pytest.raises(MetricError, match="do not fit the architecture"):
        fd_fmnist.load(tmp_path / "other.npz")
    np.savez(tmp_path / "old.npz", **{"meta/version": np.array("fmnist-cnn-v0")})
    with pytest.raises(MetricError, match="version 'fmnist-cnn-v0'"):
        fd_fmnist.load(tmp_path / "old.npz")


def test_train_step_and_save_load_round_trip(tmp_path):
    model = fd_fmnist.Classifier()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    tx = fd_fmnist.make_optimizer(fd_fmnist.Recipe(warmup_steps=0), total_steps=10)
    step = fd_fmnist.make_train_step(model, tx, max_shift=2)
    images, labels = random_images(32, seed=2), np.arange(32, dtype=np.int32) % 10
    new, _, loss = step(params, tx.init(params), images, labels, jax.random.key(1))
    assert np.isfinite(float(loss))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, new)
    assert all(jax.tree.leaves(changed))

    path = fd_fmnist.save(tmp_path / "w.npz", new, test_accuracy=0.5, seed=3)
    loaded = fd_fmnist.load(path, batch_size=8)
    assert loaded.test_accuracy == 0.5 and loaded.dim == 128
    _, want = model.apply({"params": new}, images.astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(loaded(images), want, rtol=1e-5, atol=1e-5)


def test_random_shift_moves_content_within_the_border():
    image = np.zeros((1, 32, 32, 1), np.uint8)
    image[0, 2:30, 2:30] = 7  # a 28x28 garment inside the 2-pixel zero border
    shifted = np.asarray(fd_fmnist.random_shift(jnp.asarray(image), jax.random.key(0), 2))
    assert shifted.shape == image.shape and shifted.sum() == image.sum()  # nothing falls off

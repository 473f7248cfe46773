"""Frechet distance, streaming statistics, KID, precision/recall, references and image reading,
on made-up features (the extractors have their own tests)."""

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from patchdiff.data import DataError
from patchdiff.metrics import MetricError, count_tag, fid, kid, metric_names, precision_recall


def gaussian(n, d, shift=0.0, seed=0):
    """n draws of one correlated Gaussian in d dimensions (the same for every seed)."""
    mix = np.random.default_rng(123).standard_normal((d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).standard_normal((n, d)) @ mix + shift


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = gaussian(500, 16, seed=0), gaussian(400, 16, shift=0.3, seed=1)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="statistics do not match"):
        fid.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_streaming_statistics_equal_numpy_whatever_the_batches():
    f = gaussian(301, 8)
    whole = fid.FeatureStats(8)
    whole.add(f)
    parts = fid.FeatureStats(8, keep=50)
    for start in range(0, 301, 37):
        parts.add(f[start : start + 37])
    np.testing.assert_allclose(parts.mean, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(parts.covariance, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(parts.covariance, whole.covariance, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(parts.features, f[:50].astype(np.float32))
    assert parts.gather() is parts  # one process: nothing to gather


def test_kid_is_unbiased_and_separates():
    x, y = gaussian(600, 16, seed=0), gaussian(600, 16, seed=1)
    same = kid.kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
    other = kid.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=300)
    assert abs(same) < 0.02 * other
    # unbiased: averaged over many independent pairs of one distribution it is ~0 (can be < 0)
    values = [kid.mmd2_unbiased(gaussian(50, 4, seed=2 * i), gaussian(50, 4, seed=2 * i + 1))
              for i in range(40)]  # fmt: skip
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    assert min(values) < 0 < max(values)


def test_precision_recall_on_known_sets():
    real = gaussian(300, 8, seed=0)
    p, r = precision_recall.precision_recall(real, real.copy())
    assert p == 1.0 and r == 1.0
    p, r = precision_recall.precision_recall(real, real + 100.0)
    assert p == 0.0 and r == 0.0
    # generated samples on a quarter of the real support: high precision, low recall
    narrow = real[np.linalg.norm(real - real.mean(0), axis=1) < np.median(
        np.linalg.norm(real - real.mean(0), axis=1)) / 2]  # fmt: skip
    p, r = precision_recall.precision_recall(real, narrow)
    assert p > 0.9 and r < 0.5


def test_metric_names_carry_the_count():
    assert count_tag(50_000) == "50k" and count_tag(2500) == "2500"
    assert metric_names("fid", 10_000) == ("fid@10k",)
    assert metric_names("pr", 5000) == ("precision@5k", "recall@5k")
    assert metric_names("fd_fmnist", 5000) == ("fd_fmnist@5k",)


def test_references_in_edm_and_our_format(tmp_path):
    f = gaussian(100, 6)
    stats = fid.FeatureStats(6, keep=100)
    stats.add(f)
    ours = fid.save_reference(tmp_path / "ours.npz", stats, "fmnist", "made up")
    ref = fid.load_reference(ours, "fmnist", 6)
    assert ref.count == 100 and ref.features.shape == (100, 6) and ref.extractor == "fmnist"
    np.savez(tmp_path / "edm.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    edm = fid.load_reference(tmp_path / "edm.npz")
    assert edm.extractor == "inception" and edm.features is None
    assert fid.score(stats, edm, ["fid"])["fid@100"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(MetricError, match="needs features"):
        fid.score(stats, edm, ["kid"])
    with pytest.raises(FileNotFoundError, match="patchdiff.metrics.ref"):
        fid.load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=f.mean(0))
    with pytest.raises(MetricError, match=r"lack \['mu', 'sigma'\]"):
        fid.load_reference(tmp_path / "bad.npz")
    with pytest.raises(MetricError, match="of 'fmnist' features, not 'inception'"):
        fid.load_reference(ours, "inception")


def test_read_images_from_folder_and_npz(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    np.testing.assert_array_equal(fid.read_images(tmp_path), images)
    np.savez(tmp_path / "s.npz", arr_0=images)
    np.testing.assert_array_equal(fid.read_images(tmp_path / "s.npz"), images)
    np.savez(tmp_path / "f.npz", images=images.astype(np.float32))
    with pytest.raises(DataError, match="must be uint8"):
        fid.read_images(tmp_path / "f.npz")
    with pytest.raises(DataError, match="neither a folder nor an .npz"):
        fid.read_images(tmp_path / "nothing")
    # a folder streams in batches (grey PNGs get their channel axis), and --num takes the first N
    grey = tmp_path / "grey"
    grey.mkdir()
    for i, im in enumerate(images[..., 0]):
        Image.fromarray(im).save(grey / f"{i:03d}.png")
    batches = list(fid.image_batches(grey, batch=2))
    assert [len(b) for b in batches] == [2, 1] and batches[0].shape[1:] == (8, 8, 1)
    np.testing.assert_array_equal(np.concatenate(batches)[..., 0], images[..., 0])
    np.testing.assert_array_equal(fid.read_images(tmp_path / "s.npz", num=2), images[:2])
    with pytest.raises(DataError, match="--num 4: .* holds only 3 images"):
        fid.read_images(grey, num=4)
    Image.fromarray(images[0, :4]).save(tmp_path / "004.png")  # a 4x8 image among 8x8 ones
    with pytest.raises(DataError, match="differ in size: 004.png"):
        fid.read_images(tmp_path)


def test_fid_command_scores_a_folder(tmp_path, capsys):
    """`python -m patchdiff.metrics.fid` end to end, with the fmnist extractor when its weights
    are present (the command is the same for Inception statistics)."""
    fd_fmnist = pytest.importorskip("patchdiff.metrics.fd_fmnist")
    try:
        features = fd_fmnist.load()
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"no fmnist weights: {e}")
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1), dtype=np.uint8)
    stats = fid.stats_of(features, images)
    fid.save_reference(tmp_path / "ref.npz", stats, "fmnist")
    np.savez(tmp_path / "same.npz", images=images)
    result = fid.main(["--images", str(tmp_path / "same.npz"), "--ref", str(tmp_path / "ref.npz")])
    # Identical statistics give 0 up to rounding: 40 images span at most 39 of 128 dimensions,
    # and the square roots of the ~89 eigenvalues that should be 0 but come out ~1e-15 add up
    # to ~1e-6 (seen: -1.5e-6). Train vs test Fashion-MNIST is 1.3, so 1e-4 is still a zero.
    assert result["fd_fmnist@40"] == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(SystemExit, match="patchdiff: .*missing.npz do not exist"):
        fid.main(["--images", str(tmp_path / "same.npz"), "--ref", str(tmp_path / "missing.npz")])


def test_ref_command_then_fid_command(tmp_path, capsys):
    """The README's two commands: reference statistics of a dataset from a config file, then a
    folder scored against them (the fmnist extractor; Inception statistics take the same path).
    The dataset scored against itself gives 0; its first half against the whole, more."""
    from patchdiff.metrics import fd_fmnist, ref

    try:
        fd_fmnist.load()
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"no fmnist weights: {e}")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 32, 32, 1), dtype=np.uint8)
    images[30:] //= 4  # two kinds of image, so half of the set is far from the whole
    np.savez(tmp_path / "data.npz", images=images, labels=np.zeros(60, np.int64))
    config = tmp_path / "data_config.py"
    config.write_text(
        "from ml_collections_configs import base\n\n\ndef get_config(arg=None):\n"
        "    config = base.get_config()\n    config.data.source = 'npz'\n"
        f"    config.data.path = '{tmp_path / 'data.npz'}'\n"
        "    config.data.channels = 1\n    return config\n"
    )
    out = tmp_path / "refs" / "data.npz"
    ref.main(["--config", str(config), "--extractor", "fmnist", "--out", str(out)])
    assert "wrote fmnist statistics of 60 images" in capsys.readouterr().out
    reference = fid.load_reference(out, "fmnist", 128)
    assert reference.features.shape == (60, 128)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    same = fid.main(["--images", str(folder), "--ref", str(out)])
    half = fid.main(["--images", str(folder), "--ref", str(out), "--num", "30"])
    assert same["fd_fmnist@60"] == pytest.approx(0.0, abs=1e-4)
    assert half["fd_fmnist@30"] > 1.0
    with pytest.raises(SystemExit, match=r"patchdiff: --config .*nowhere.py' is not a file"):
        ref.main(["--config", str(tmp_path / "nowhere.py"), "--out", str(out)])

import dataclasses
import json
import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest

from patchdiff import data as data_lib
from patchdiff.data import encode, latents, pipeline, sources

CONFIG = """
from ml_collections_configs import base


def get_config(arg=None):
    config = base.get_config()
    config.data.source = {source!r}
    config.data.path = {path!r}
    config.data.resolution = 8
    config.data.channels = 1
    config.data.fit = "pad"
    config.data.threads = 2
    return config
"""


@dataclasses.dataclass
class FakeConfig:
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: tuple = (8, 16)
    latent_channels: int = 4


class FakeVAE:
    """`patchdiff.models.vae.VAE`'s encoding interface in numpy: 2x2 pooling and a channel
    ramp, plus a column ramp so that a mirror's latent differs from a mirrored latent."""

    scaling_factor, shift_factor, downsample_factor, latent_channels = 0.5, 0.25, 2, 4

    def __init__(self, path, in_channels=1):
        self.config, self.source = FakeConfig(in_channels=in_channels), str(path)

    def encode_moments(self, images):
        b, h, w, c = images.shape
        x = np.asarray(images).reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))[..., :1]
        ramp = 0.1 * np.arange(w // 2, dtype=np.float32)[:, None]  # [w, 1]
        mean = x * np.arange(1, 5, dtype=np.float32) + ramp
        return mean, 0.1 + 0.05 * np.abs(mean)


def pixel_config(tmp_path, n=10, source="npz"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)  # padded to 8x8
    np.savez(tmp_path / "pixels.npz", images=images, labels=np.arange(n) % 3)
    path = tmp_path / "config.py"
    path.write_text(CONFIG.format(source=source, path=str(tmp_path / "pixels.npz")))
    return str(path), images


@pytest.fixture
def fake_vae(monkeypatch):
    monkeypatch.setattr(encode, "load_vae", FakeVAE)


def open_latents(folder):
    d = {"source": "latents", "name": "", "path": str(folder), "split": "train"}
    return sources.open_source(ml_collections.ConfigDict(d))


def run(config, out, *flags):
    encode.main(["--config", config, "--vae", "vae", "--out", str(out), *flags])


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir())}


def test_encode_moments_with_flips(tmp_path, fake_vae, capsys):
    config, images = pixel_config(tmp_path)
    run(config, tmp_path / "z", "--flips", "--shard_size", "4", "--batch", "3")
    assert "encoded 10 images of train into" in capsys.readouterr().out.splitlines()[-1]
    meta = latents.read_meta(tmp_path / "z", "train")
    assert meta["count"] == 10 and meta["latent_shape"] == [4, 4, 4] and meta["flips"]
    assert meta["vae"]["path"] == str(pathlib.Path("vae").absolute())
    assert meta["vae"]["config"]["block_out_channels"] == [8, 16]
    assert meta["pixel_data"]["resolution"] == 8 and meta["pixel_data"]["fit"] == "pad"
    assert sorted(p.name for p in (tmp_path / "z/train").iterdir()) == [
        "meta.json",
        "shard_00000.npz",
        "shard_00001.npz",
        "shard_00002.npz",
    ]
    pixels = np.pad(images, ((0, 0), (1, 1), (1, 1)))[..., None].astype(np.float32) / 127.5 - 1
    want_mean, want_std = FakeVAE("").encode_moments(pixels)
    flip_mean, _ = FakeVAE("").encode_moments(pixels[:, :, ::-1])
    with np.load(tmp_path / "z/train/shard_00001.npz") as shard:
        np.testing.assert_allclose(shard["mean"], want_mean[4:8], rtol=1e-6)
        np.testing.assert_allclose(shard["std"], want_std[4:8], rtol=1e-6)
        np.testing.assert_allclose(shard["mean_flip"], flip_mean[4:8], rtol=1e-6)
        np.testing.assert_array_equal(shard["label"], np.arange(4, 8) % 3)
        assert shard["label"].dtype == np.int64
    # The mmap reader sees what np.load sees.
    mapped = latents.map_shard(tmp_path / "z/train/shard_00002.npz")
    np.testing.assert_allclose(mapped["mean"], want_mean[8:], rtol=1e-6)


def test_encode_samples_with_flips_draws_from_seeded_noise(tmp_path, fake_vae):
    config, images = pixel_config(tmp_path, n=5)
    run(config, tmp_path / "z", "--store", "samples", "--samples", "2", "--flips")
    first = folder_bytes(tmp_path / "z/train")
    run(config, tmp_path / "z", "--store", "samples", "--samples", "2", "--flips")  # idempotent
    assert folder_bytes(tmp_path / "z/train") == first
    meta = latents.read_meta(tmp_path / "z", "train")
    assert meta["store"] == "samples" and meta["samples"] == 2 and meta["seed"] == 0
    shard = latents.map_shard(tmp_path / "z/train/shard_00000.npz")
    assert shard["samples"].shape == (5, 4, 4, 4, 4)  # [n, V = 2K, h, w, C]
    pixels = np.pad(images, ((0, 0), (1, 1), (1, 1)))[..., None].astype(np.float32) / 127.5 - 1
    mirror_mean, mirror_std = FakeVAE("").encode_moments(pixels[:, :, ::-1])
    eps = np.random.default_rng([0, 3, 3]).standard_normal((4, 4, 4), np.float32)
    np.testing.assert_allclose(shard["samples"][3, 3], mirror_mean[3] + mirror_std[3] * eps)

    source = open_latents(tmp_path / "z")
    rng = np.random.default_rng(1)
    z, label = source.latent_at(3, True, rng)
    assert label == 0 and any(np.array_equal(z, s) for s in shard["samples"][3, 2:])


def test_resume_after_a_lost_shard_or_a_crash_gives_the_same_files(tmp_path, fake_vae):
    config, _ = pixel_config(tmp_path)
    flags = ("--shard_size", "4", "--store", "samples", "--samples", "2", "--seed", "5")
    run(config, tmp_path / "z", *flags)
    split = tmp_path / "z/train"
    whole = folder_bytes(split)
    (split / "shard_00001.npz").unlink()
    run(config, tmp_path / "z", *flags)
    assert folder_bytes(split) == whole
    # A crash while writing the last shard: its temporary file left, meta.json unfinished.
    (split / "shard_00002.npz").rename(split / "shard_00002.tmp.npz")
    meta = json.loads(whole["meta.json"])
    (split / "meta.json").write_text(json.dumps({**meta, "count": 8, "complete": False}))
    with pytest.raises(sources.DataError, match="unfinished .*rerun"):
        latents.LatentSource(tmp_path / "z", "train")
    run(config, tmp_path / "z", *flags)
    assert folder_bytes(split) == whole


def test_a_rerun_with_other_settings_is_refused_untouched(tmp_path, fake_vae):
    config, _ = pixel_config(tmp_path)
    run(config, tmp_path / "z", "--num", "6")
    before = folder_bytes(tmp_path / "z/train")
    with pytest.raises(SystemExit, match=r"with dtype = 'float32', not 'float16' as now"):
        run(config, tmp_path / "z", "--num", "6", "--dtype", "float16")
    with pytest.raises(SystemExit, match="with pixel_data.path = "):
        run(pixel_config(tmp_path / "z", n=6)[0], tmp_path / "z")
    assert folder_bytes(tmp_path / "z/train") == before
    run(config, tmp_path / "z")  # --num may grow: the encoding goes on to all 10
    assert latents.read_meta(tmp_path / "z", "train")["count"] == 10


def test_encode_refuses_what_it_cannot_encode(tmp_path, monkeypatch):
    config, _ = pixel_config(tmp_path)
    monkeypatch.setattr(encode, "load_vae", lambda path: FakeVAE(path, in_channels=3))
    with pytest.raises(SystemExit, match="encodes 3-channel images but the config's data.ch"):
        run(config, tmp_path / "z")
    latent_config, _ = pixel_config(tmp_path, source="latents")
    with pytest.raises(SystemExit, match="must describe the pixel images to encode"):
        run(latent_config, tmp_path / "z")


def test_encode_skips_undecodable_images(tmp_path, fake_vae, monkeypatch):
    config, _ = pixel_config(tmp_path, n=6)

    class Broken(sources.ArraySource):
        def __getitem__(self, i):
            if i == 2:
                raise sources.CorruptImage("image 2")
            return super().__getitem__(i)

    opened = encode.open_source
    monkeypatch.setattr(
        encode, "open_source", lambda d, s: Broken(opened(d, s).images, np.arange(6), "t")
    )
    run(config, tmp_path / "z", "--shard_size", "4")
    source = latents.LatentSource(tmp_path / "z", "train")
    assert len(source) == 5 and [source.label(i) for i in range(5)] == [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(
        latents.map_shard(tmp_path / "z/train/shard_00000.npz")["index"], [0, 1, 3, 4]
    )


def write_latents(folder, n=10, flips=True, split="train", shard_size=4, std=0.0):
    """A finished encoding of made-up moments: mean[i] is i everywhere (so rows can be told
    apart) but 100 + i in its first column, mean_flip[i] is -mean[i], std is `std`."""
    split_dir = pathlib.Path(folder) / split
    split_dir.mkdir(parents=True)
    meta = {
        "format": "patchdiff-latents",
        "version": 1,
        "split": split,
        "count": n,
        "shard_size": shard_size,
        "latent_shape": [3, 3, 4],
        "store": "moments",
        "samples": 1,
        "flips": flips,
        "dtype": "float16",
        "seed": None,
        "scaling_factor": 0.5,
        "shift_factor": 1.0,
        "vae": {"path": "/vae", "config": {}},
        "pixel_data": {"source": "npz"},
        "labels": True,
        "num": 0,
        "complete": True,
    }
    (split_dir / "meta.json").write_text(json.dumps(meta))
    mean = np.arange(n, dtype=np.float16)[:, None, None, None] * np.ones((1, 3, 3, 4), np.float16)
    mean[:, :, 0] += 100  # the first column marks the left side
    for k, lo in enumerate(range(0, n, shard_size)):
        rows = slice(lo, min(lo + shard_size, n))
        arrays = {"label": np.arange(n)[rows] % 3, "index": np.arange(n)[rows]}
        stds = np.full_like(mean[rows], std)
        arrays |= {"mean": mean[rows], "std": stds}
        if flips:
            arrays |= {"mean_flip": -mean[rows], "std_flip": stds}
        latents.write_shard(latents.shard_path(split_dir, k), arrays)
    return meta


def loader(folder, **kw):
    source = open_latents(folder)
    kw = {"resolution": 3, "channels": 4, "seed": 3, **kw}
    with pytest.raises(sources.DataError, match=r"resolution = 2 .* \(3 x 3 x 4\): set them to 3"):
        pipeline.Loader(source, **{**kw, "resolution": 2})
    return pipeline.Loader(source, **kw)


def test_latent_source_lengths_labels_and_draws(tmp_path):
    write_latents(tmp_path)
    source = data_lib.LatentSource(tmp_path, "train")
    assert len(source) == 10 and source.latent_shape == (3, 3, 4)
    assert (source.scaling_factor, source.shift_factor, source.vae_path) == (0.5, 1.0, "/vae")
    assert [source.label(i) for i in range(10)] == [i % 3 for i in range(10)]
    rng = np.random.default_rng(0)
    z, label = source.latent_at(6, False, rng)
    assert z.dtype == np.float32 and label == 0 and z[0, 1, 0] == 6 and z[0, 0, 0] == 106
    assert source.latent_at(6, True, rng)[0][0, 0, 0] == -106  # the stored mirror's
    write_latents(tmp_path / "noflip", flips=False)
    z, _ = latents.LatentSource(tmp_path / "noflip").latent_at(6, True, rng)
    assert z[0, 2, 0] == 106 and z[0, 0, 0] == 6  # mirrored along the width


def test_latent_source_posterior_draw(tmp_path):
    write_latents(tmp_path, n=3, shard_size=3, flips=False)
    shard = latents.shard_path(tmp_path / "train", 0)
    arrays = dict(latents.map_shard(shard))
    arrays["std"] = np.full_like(arrays["mean"], 0.5)
    latents.write_shard(shard, arrays)
    z, _ = latents.LatentSource(tmp_path).latent_at(1, False, np.random.default_rng(7))
    eps = np.random.default_rng(7).standard_normal((3, 3, 4), np.float32)
    np.testing.assert_allclose(z, arrays["mean"][1].astype(np.float32) + 0.5 * eps)


def test_latent_folder_errors(tmp_path):
    with pytest.raises(sources.DataError, match="no meta.json.*python -m patchdiff.data.encode"):
        latents.latents_source(str(tmp_path), "train")
    write_latents(tmp_path)
    latents.shard_path(tmp_path / "train", 1).unlink()
    latents.shard_path(tmp_path / "train", 2).write_bytes(b"not a zip")
    source = latents.LatentSource(tmp_path)
    assert source.label(3) == 0
    with pytest.raises(sources.DataError, match="shard_00001.npz is missing"):
        source.label(4)
    with pytest.raises(sources.DataError, match="shard_00002.npz is corrupt"):
        source.label(9)


def test_loader_resumes_exactly_in_model_space(tmp_path):
    write_latents(tmp_path, std=0.01)
    a = loader(tmp_path)
    batches = [a.next(5) for _ in range(4)]  # two epochs
    b = loader(tmp_path, position=10)
    for want in batches[2:]:
        got = b.next(5)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    image = np.concatenate([x["image"] for x in batches])
    label = np.concatenate([x["label"] for x in batches])
    assert image.dtype == np.float32 and label.dtype == np.int32
    # Every row is (z - 1) * 0.5 of a posterior draw of a stored latent or of its mirror.
    z = image / 0.5 + 1
    index = np.rint(np.abs(z[:, 0, 0, 0])).astype(int) - 100
    assert set(np.sign(z[:, 0, 0, 0])) == {-1.0, 1.0}  # both flips, with seed 3
    np.testing.assert_array_equal(label, index % 3)
    assert sorted(index[:10]) == sorted(index[10:]) == list(range(10))
    # Each position draws afresh: an example's two epochs differ by more than their flips.
    first, second = (np.abs(z[e * 10 + np.argsort(index[e * 10 : e * 10 + 10])]) for e in (0, 1))
    assert 0 < np.abs(first - second).max() < 0.2
    a.scaling_factor = 2.0
    np.testing.assert_allclose(a.local_batch(5, 0)["image"], (z[:5] - 1) * 2, rtol=1e-6)


def test_loader_latents_split_over_processes(tmp_path, monkeypatch):
    write_latents(tmp_path)
    whole = loader(tmp_path).local_batch(8, 4)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    halves = []
    for p in range(2):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        halves.append(loader(tmp_path).local_batch(8, 4))
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_loader_flips_follow_the_images_rule(tmp_path):
    write_latents(tmp_path, flips=False)
    flat = loader(tmp_path, random_flip=False).local_batch(10, 0)["image"]
    assert (flat[:, 0, 0, 0] > 40).all()  # the marked column stays left
    flipped = loader(tmp_path).local_batch(10, 0)["image"]
    right = flipped[:, 0, 2, 0] > 40
    flip = [np.random.default_rng([3, p, 1]).random() < 0.5 for p in range(10)]
    np.testing.assert_array_equal(right, flip)


def test_encode_with_a_real_vae_matches_its_own_moments(tmp_path, capsys):
    from patchdiff.models.vae import VAEConfig, from_pretrained, init_vae, save_pretrained

    tiny = VAEConfig(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    save_pretrained(init_vae(tiny, jax.random.key(0)), tmp_path / "vae")
    config, images = pixel_config(tmp_path, n=5)
    out = tmp_path / "z"
    # --batch 5: the command's VAE call has this test's shape, so the two share one compilation.
    encode.main(
        ["--config", config, "--vae", str(tmp_path / "vae"), "--out", str(out), "--batch", "5"]
    )
    assert re.fullmatch(
        rf"encoded 5 images of train into {out}/train \(1 shards, latents 4 x 4 x 4, [\d.]+ s\)",
        capsys.readouterr().out.strip(),
    )
    vae = from_pretrained(tmp_path / "vae")
    meta = latents.read_meta(tmp_path / "z", "train")
    assert meta["vae"]["config"] == json.loads(json.dumps(dataclasses.asdict(vae.config)))
    assert meta["scaling_factor"] == vae.scaling_factor and meta["latent_shape"] == [4, 4, 4]
    pixels = np.pad(images, ((0, 0), (1, 1), (1, 1)))[..., None].astype(np.float32) / 127.5 - 1
    mean, std = vae.encode_moments(pixels)
    shard = latents.map_shard(tmp_path / "z/train/shard_00000.npz")
    np.testing.assert_allclose(shard["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shard["std"], std, rtol=1e-5, atol=1e-6)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff.diffusion import patches


def test_coordinate_grid_corners_and_axes():
    grid = np.asarray(patches.coordinate_grid(8))  # [R, R, 2], (x, y)
    assert grid.shape == (8, 8, 2)
    np.testing.assert_allclose(grid[0, 0], [-1, -1])
    np.testing.assert_allclose(grid[0, 7], [1, -1])  # x runs along columns
    np.testing.assert_allclose(grid[7, 0], [-1, 1])  # y runs along rows
    np.testing.assert_allclose(grid[3, 5], [5 / 7 * 2 - 1, 3 / 7 * 2 - 1], rtol=1e-6)


@pytest.mark.parametrize("size", [4, 8, 16])
def test_crop_coordinates_equal_the_same_crop_of_the_full_grid(size):
    resolution, batch = 16, 6
    key = jax.random.key(size)
    images = jax.random.normal(key, (batch, resolution, resolution, 3))
    crops, coords = patches.random_patches(jax.random.key(1), images, size)
    assert crops.shape == (batch, size, size, 3) and coords.shape == (batch, size, size, 2)
    grid = np.asarray(patches.coordinate_grid(resolution))
    for b in range(batch):
        # recover the offset from the top-left coordinate, then compare both crops
        col, row = np.rint((np.asarray(coords[b, 0, 0]) + 1) / 2 * (resolution - 1)).astype(int)
        np.testing.assert_allclose(coords[b], grid[row : row + size, col : col + size], atol=1e-6)
        np.testing.assert_allclose(crops[b], images[b, row : row + size, col : col + size])


def test_offsets_cover_every_position():
    images = jnp.zeros((4000, 8, 8, 1))
    _, coords = patches.random_patches(jax.random.key(0), images, 4)
    starts = np.rint((np.asarray(coords[:, 0, 0]) + 1) / 2 * 7).astype(int)
    assert set(map(tuple, starts)) == {(c, r) for c in range(5) for r in range(5)}


def test_patches_compile_once_per_size():
    fn = jax.jit(patches.random_patches, static_argnums=2)
    images = jnp.ones((2, 16, 16, 3))
    for size in (4, 8, 4, 8):
        fn(jax.random.key(0), images, size)
    assert fn._cache_size() == 2


def test_paper_schedule_and_draws():
    schedule = patches.paper_schedule(32)
    assert schedule.sizes == (32, 16, 8)
    np.testing.assert_allclose(schedule.probs, (0.5, 0.3, 0.2))
    draws = [schedule.draw(np.random.default_rng(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = np.random.default_rng(0)
    sizes = np.array([schedule.draw(rng) for _ in range(20_000)])
    for size, p in zip(schedule.sizes, schedule.probs, strict=True):
        assert np.mean(sizes == size) == pytest.approx(p, abs=0.015)


@pytest.mark.parametrize(
    "scales, probs, match",
    [
        ((1.0, 0.3), (0.5, 0.5), "whole crop size"),
        ((1.0, 0.5), (0.6, 0.6), "sum to 1"),
        ((1.0, 1.5), (0.5, 0.5), r"\(0, 1\]"),
        ((1.0,), (0.5, 0.5), "one per scale"),
    ],
)
def test_bad_schedules_are_refused(scales, probs, match):
    with pytest.raises(ValueError, match=match):
        patches.patch_schedule(32, scales, probs)


def test_bad_patch_size_is_refused():
    with pytest.raises(ValueError, match="must lie in 1..8"):
        patches.random_patches(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), 16)


def test_the_default_config_builds_the_papers_schedule():
    from ml_collections_configs import base
    from patchdiff.diffusion.build import build_patch_schedule

    assert build_patch_schedule(base.get_config()) == patches.paper_schedule(32)


@pytest.mark.parametrize("name", ["latent_fashion_mnist", "imagenet256_patch_latent"])
def test_latent_configs_use_wangs_latent_schedule(name):
    """Patch Diffusion on latents: R with p = 0.5, else R/2, and twice the batch at R/2 (their
    batch_mul for a 16-pixel crop of a 32-pixel latent)."""
    import importlib

    from patchdiff.data import step_plan
    from patchdiff.diffusion.build import build_patch_schedule

    config = importlib.import_module(f"ml_collections_configs.{name}").get_config()
    resolution = config.data.resolution
    assert build_patch_schedule(config) == patches.paper_latent_schedule(resolution)
    assert patches.paper_latent_schedule(32).sizes == (32, 16)
    plans = {step_plan(config, step) for step in range(40)}
    batch = config.train.batch_size
    assert plans == {(resolution, batch), (resolution // 2, 2 * batch)}

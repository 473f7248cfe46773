import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff import sampling
from patchdiff.diffusion.precond import VP


def test_karras_closed_form():
    n, lo, hi, rho = 10, 0.002, 80.0, 7.0
    got = np.asarray(sampling.get_sigmas_karras(n, lo, hi, rho), np.float64)
    i = np.arange(n)
    expect = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    assert got.shape == (n + 1,) and got[-1] == 0
    np.testing.assert_allclose(got[:-1], expect, rtol=1e-5)
    assert got[0] == pytest.approx(hi, rel=1e-6) and got[-2] == pytest.approx(lo, rel=1e-5)


def test_exponential_closed_form():
    got = np.asarray(sampling.get_sigmas_exponential(5, 0.01, 100.0))
    np.testing.assert_allclose(got, [100, 10, 1, 0.1, 0.01, 0], rtol=1e-5)


def test_polyexponential_closed_form():
    n, lo, hi, rho = 7, 0.1, 50.0, 2.0
    got = np.asarray(sampling.get_sigmas_polyexponential(n, lo, hi, rho))
    ramp = np.linspace(1, 0, n) ** rho
    np.testing.assert_allclose(got[:-1], np.exp(np.log(lo) + ramp * np.log(hi / lo)), rtol=1e-5)
    assert got[-1] == 0
    np.testing.assert_allclose(  # rho = 1 is the exponential grid
        sampling.get_sigmas_polyexponential(n, lo, hi, 1.0),
        sampling.get_sigmas_exponential(n, lo, hi),
        rtol=1e-6,
    )


def test_vp_closed_form():
    n, beta_d, beta_min, eps_s = 6, 19.9, 0.1, 1e-3
    got = np.asarray(sampling.get_sigmas_vp(n, beta_d, beta_min, eps_s), np.float64)
    t = np.linspace(1, eps_s, n)
    np.testing.assert_allclose(
        got[:-1], np.sqrt(np.exp(beta_d * t**2 / 2 + beta_min * t) - 1), rtol=1e-5
    )
    assert got[-1] == 0


def test_space_timesteps_matches_adm():
    assert sampling.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert sampling.space_timesteps(1000, "1000") == list(range(1000))
    # one section: ends included, evenly spread, rounded
    assert sampling.space_timesteps(10, "4") == [0, 3, 6, 9]
    assert sampling.space_timesteps(1000, "250")[:4] == [0, 4, 8, 12]
    assert len(sampling.space_timesteps(1000, "250")) == 250
    # three sections of 334, 333, 333 steps with 2, 3 and 1 steps
    assert sampling.space_timesteps(1000, "2,3,1") == [0, 333, 334, 500, 666, 667]


@pytest.mark.parametrize(
    "spacing, match",
    [("ddim37", "no stride gives exactly 37"), ("abc", "use 'N'"), ("600,600", "cannot take 600")],
)
def test_bad_spacing(spacing, match):
    with pytest.raises(ValueError, match=match):
        sampling.space_timesteps(1000, spacing)


def test_respaced_sigmas_are_the_trained_levels_descending():
    trained = VP().sigmas
    got = np.asarray(sampling.get_sigmas_respaced(trained, "ddim50"))
    assert got.shape == (51,) and got[-1] == 0
    np.testing.assert_allclose(got[:-1], trained[np.arange(0, 1000, 20)[::-1]])
    assert np.all(np.diff(got) < 0)
    assert jnp.asarray(got).dtype == jnp.float32

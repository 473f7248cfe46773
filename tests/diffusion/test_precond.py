import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff.diffusion import precond as pc

SIGMAS = np.array([0.002, 0.05, 0.5, 1.0, 3.0, 80.0])


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_scalings_closed_form(sigma_data):
    c_skip, c_out, c_in, c_noise = pc.edm_scalings(jnp.asarray(SIGMAS), sigma_data)
    s, sd = SIGMAS, sigma_data
    np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)


def network_target(precond, x0, n, sigma):
    """What F must output for D to return x0 exactly: (x0 - c_skip x) / c_out."""
    c_skip, c_out, _, _ = (np.asarray(c, np.float64) for c in precond.scalings(sigma))
    x = x0 + sigma * n
    return (x0 - c_skip * x) / c_out


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(64) * 0.5
    n = rng.standard_normal(64)
    return x0, n


@pytest.mark.parametrize("sigma", [0.1, 1.0, 7.0])
def test_each_parameterisation_learns_its_papers_target(sample, sigma):
    x0, n = sample
    # VP/DDPM predicts eps; VE predicts -n (D = x + sigma F); flow predicts n - x0.
    np.testing.assert_allclose(network_target(pc.VP(), x0, n, sigma), n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(network_target(pc.VE(), x0, n, sigma), -n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        network_target(pc.Flow(), x0, n, sigma), n - x0, rtol=1e-4, atol=1e-4
    )
    # v = alpha n - s x0 / sd, alpha = sd / sqrt(sigma^2 + sd^2), s = sigma / sqrt(...).
    for sd in (0.5, 1.0):
        norm = np.sqrt(sigma**2 + sd**2)
        v = sd / norm * n - sigma / norm * x0 / sd
        np.testing.assert_allclose(network_target(pc.V(sd), x0, n, sigma), v, rtol=1e-4, atol=1e-4)


def test_network_inputs_are_the_papers_latents(sample):
    x0, n = sample
    sigma = 2.0
    x = x0 + sigma * n
    # flow: c_in x = (1 - t) x0 + t n with t = sigma / (1 + sigma).
    t = sigma / (1 + sigma)
    np.testing.assert_allclose(pc.Flow().scalings(sigma)[2] * x, (1 - t) * x0 + t * n, rtol=1e-5)
    # vp: c_in x = sqrt(abar) x0 + sqrt(1 - abar) n with abar = 1 / (1 + sigma^2).
    abar = 1 / (1 + sigma**2)
    np.testing.assert_allclose(
        pc.VP().scalings(sigma)[2] * x, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * n, rtol=1e-5
    )


def test_vp_linear_table_matches_ddpm():
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(pc.vp_sigmas("linear", 1000), np.sqrt((1 - abar) / abar))
    # ADM scales the linear betas by 1000 / T, so T = 250 spans about the same range of noise
    # levels (sigma_max 175 against 157 in log scale: 5.16 against 5.06).
    short, full = pc.vp_sigmas("linear", 250), pc.vp_sigmas("linear", 1000)
    assert np.log(short[-1]) == pytest.approx(np.log(full[-1]), rel=0.03)
    assert np.log(short[0]) == pytest.approx(np.log(full[0]) + np.log(2), rel=0.03)


def test_vp_cosine_table_matches_nichol_dhariwal():
    T, s = 1000, 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(1, 900)  # betas are clipped at 0.999 only near t = T
    abar = f(t + 1) / f(0)
    np.testing.assert_allclose(pc.vp_sigmas("cosine", T)[t], np.sqrt((1 - abar) / abar), rtol=1e-9)


def test_vp_c_noise_is_the_timestep():
    vp = pc.VP()
    steps = np.array([0, 1, 10, 500, 999])
    c_noise = vp.scalings(jnp.asarray(vp.sigmas[steps]))[3]
    np.testing.assert_allclose(c_noise, steps, atol=2e-3)
    # between two trained levels the timestep interpolates in log sigma
    mid = np.sqrt(vp.sigmas[10] * vp.sigmas[11])
    assert float(vp.scalings(mid)[3]) == pytest.approx(10.5, abs=1e-2)


@pytest.mark.parametrize("precond", [pc.V(0.5), pc.V(1.0), pc.Flow()])
def test_time_maps_invert(precond):
    t = jnp.linspace(0.01, 0.99, 9)
    c_noise = precond.scalings(precond.sigma_from_t(t))[3]
    np.testing.assert_allclose(c_noise / 1000, t, rtol=1e-4)


def test_denoise_applies_scalings_and_returns_float32():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    sigma = jnp.array([0.1, 1.0, 10.0])
    net = lambda x_in, c_noise: (2 * x_in + c_noise[:, None, None, None]).astype(jnp.bfloat16)  # noqa: E731
    out = pc.denoise(net, pc.EDM(), x, sigma)
    c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in pc.edm_scalings(sigma))
    expect = c_skip * x + c_out * (2 * c_in * x + c_noise)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expect, rtol=2e-2, atol=2e-2)  # F ran in bfloat16
    # a scalar sigma broadcasts over the batch
    np.testing.assert_allclose(
        pc.denoise(net, pc.EDM(), x, 1.0), pc.denoise(net, pc.EDM(), x, jnp.ones(3))
    )


def test_parameterisations_are_registered_and_hashable():
    assert pc.PRECONDITIONINGS.names() == ["edm", "flow", "v", "ve", "vp"]
    for name in pc.PRECONDITIONINGS:
        hash(pc.PRECONDITIONINGS.get(name)())
    with pytest.raises(ValueError, match="known: edm, flow, v, ve, vp"):
        pc.PRECONDITIONINGS.get("ddpm")

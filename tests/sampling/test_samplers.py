import functools

import gaussian
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff import sampling

ALL = sampling.SAMPLERS.names()
# Options that make each sampler solve the probability-flow ODE (no noise).
DETERMINISTIC = {
    "euler": {},
    "heun": {},
    "dpm_2": {},
    "lms": {},
    "dpmpp_2m": {},
    "ddim": {},
    "plms": {},
    "prk": {},
    "euler_ancestral": dict(eta=0.0),
    "dpm_2_ancestral": dict(eta=0.0),
    "dpmpp_2s_ancestral": dict(eta=0.0),
    "dpmpp_sde": dict(eta=0.0),
    "dpmpp_2m_sde": dict(eta=0.0),
    "dpmpp_3m_sde": dict(eta=0.0),
    "dpm_fast": {},
    "dpm_adaptive": dict(rtol=1e-4, atol=1e-5),
}
# Options that make each stochastic sampler draw noise, and the steps it needs to be accurate:
# first-order SDE steps carry an O(1/n) bias in the variance, second-order ones much less.
STOCHASTIC = {
    "euler": (dict(s_churn=40.0), 4000),
    "heun": (dict(s_churn=40.0), 1000),
    "dpm_2": (dict(s_churn=40.0), 1000),
    "euler_ancestral": ({}, 4000),
    "dpm_2_ancestral": ({}, 400),
    "dpmpp_2s_ancestral": ({}, 400),
    "dpmpp_sde": ({}, 400),
    "dpmpp_2m_sde": ({}, 400),
    "dpmpp_3m_sde": ({}, 400),
    "ddim": (dict(eta=1.0), 4000),
    "ddpm": ({}, 4000),
    "dpm_fast": (dict(eta=1.0), 400),
    "dpm_adaptive": (dict(eta=1.0, rtol=1e-2, atol=1e-3), 10),
}


def test_every_sampler_is_covered():
    assert set(DETERMINISTIC) | {"ddpm"} == set(ALL)
    assert set(STOCHASTIC) | {"lms", "dpmpp_2m", "plms", "prk"} == set(ALL)


def ode_error(name, n, options=DETERMINISTIC):
    """Max error against the exact ODE solution, in float64 so that orders show cleanly."""
    with jax.enable_x64(True):
        x = gaussian.SIGMA_MAX * jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
        sigmas = sampling.get_sigmas_karras(n, gaussian.SIGMA_MIN, gaussian.SIGMA_MAX)
        out = sampling.sample(name, gaussian.denoiser, x, sigmas, **options[name])
        if name in ("dpm_fast", "dpm_adaptive"):  # they stop at sigma_min, not denoised
            expect = gaussian.flow(x, gaussian.SIGMA_MAX, gaussian.SIGMA_MIN)
        else:
            expect = gaussian.exact_sample(x)
        return float(jnp.max(jnp.abs(out - expect)))


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpm_2", 2), ("dpmpp_2m", 2)])
def test_convergence_order(name, order):
    steps = [8, 16, 32, 64]
    errors = [ode_error(name, n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order - 0.3 <= slope <= order + 0.4, (slope, errors)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_samplers_reach_the_ode_solution(name):
    coarse, fine = ode_error(name, 8), ode_error(name, 64)
    # 8x the steps: a first-order method's error shrinks 8x, a second-order one's 64x
    assert fine < 0.2 * coarse or fine < 1e-3, (coarse, fine)
    assert fine < 0.07  # final values have std 0.5


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_reproduce_the_data_moments(name):
    options, n = STOCHASTIC[name]
    size = 16384
    x = gaussian.SIGMA_MAX * jax.random.normal(jax.random.key(1), (size // 8, 8))
    sigmas = sampling.get_sigmas_karras(n, gaussian.SIGMA_MIN, gaussian.SIGMA_MAX)
    run = jax.jit(lambda x, s, k: sampling.sample(name, gaussian.denoiser, x, s, key=k, **options))
    out = np.asarray(run(x, sigmas, jax.random.key(2)), np.float64)
    mean_se = gaussian.STD / np.sqrt(size)
    var_se = gaussian.STD**2 * np.sqrt(2 / size)
    assert abs(out.mean() - gaussian.MU) < 4.5 * mean_se, out.mean()
    assert abs(out.var() - gaussian.STD**2) < 4.5 * var_se, out.var()


def noisy_options(name):
    return STOCHASTIC[name][0] if name in STOCHASTIC else {}


@pytest.mark.parametrize("name", sorted(set(STOCHASTIC) - {"dpm_adaptive"}))
def test_noise_argument_reproduces_the_key_path(name):
    x = 10.0 * jax.random.normal(jax.random.key(3), (4, 3))
    sigmas = sampling.get_sigmas_karras(6, 0.01, 10.0)
    key = jax.random.key(4)
    draws = 2 if name == "dpmpp_sde" else 1
    noise = sampling.noise_from_key(key, 6, x.shape, draws)
    options = noisy_options(name)
    from_key = sampling.sample(name, gaussian.denoiser, x, sigmas, key=key, **options)
    from_noise = sampling.sample(name, gaussian.denoiser, x, sigmas, noise=noise, **options)
    np.testing.assert_allclose(from_key, from_noise, rtol=1e-6, atol=1e-6)
    other = sampling.sample(name, gaussian.denoiser, x, sigmas, key=jax.random.key(5), **options)
    assert not np.allclose(from_key, other)


def test_noise_may_be_a_numpy_array():
    x = jnp.ones((2, 3))
    sigmas = sampling.get_sigmas_karras(6, 0.01, 10.0)
    noise = np.asarray(sampling.noise_from_key(jax.random.key(0), 6, x.shape))
    for name in ("dpm_fast", "euler_ancestral"):
        options = dict(eta=1.0) if name == "dpm_fast" else {}
        from_numpy = sampling.sample(name, gaussian.denoiser, x, sigmas, noise=noise, **options)
        from_key = sampling.sample(
            name, gaussian.denoiser, x, sigmas, key=jax.random.key(0), **options
        )
        np.testing.assert_allclose(from_numpy, from_key, rtol=1e-5, atol=1e-6)


def test_noise_rows_are_used_step_by_step():
    # Euler-ancestral by hand with the same rows: row i is step i's draw.
    x = 5.0 * jax.random.normal(jax.random.key(6), (2, 3))
    sigmas = sampling.get_sigmas_karras(4, 0.05, 5.0)
    noise = jax.random.normal(jax.random.key(7), (4, 2, 3))
    expect = x
    for i in range(4):
        s, s_next = sigmas[i], sigmas[i + 1]
        sd, su = sampling.ancestral_step(s, s_next)
        d = (expect - gaussian.denoiser(expect, jnp.full((2,), s))) / s
        expect = expect + d * (sd - s) + noise[i] * su
    got = sampling.sample_euler_ancestral(gaussian.denoiser, x, sigmas, noise=noise)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


def counting_denoiser(counter):
    def denoise(x, sigma):
        jax.debug.callback(lambda: counter.append(1))
        return gaussian.denoiser(x, sigma)

    return denoise


@pytest.mark.parametrize(
    "name, nfe",  # evaluations for n = 10 steps, as k-diffusion spends them
    [
        ("euler", 10),
        ("heun", 19),
        ("dpm_2", 19),
        ("lms", 10),
        ("dpmpp_2m", 10),
        ("dpmpp_2s_ancestral", 19),
        ("dpmpp_sde", 19),
        ("prk", 37),
        ("plms", 4 * 3 + 7),
        ("dpm_fast", 10),
        ("ddim", 10),
    ],
)
def test_evaluations_per_sampler(name, nfe):
    counter = []
    x = jnp.ones((2, 3))
    sigmas = sampling.get_sigmas_karras(10, 0.01, 10.0)
    options = {"key": jax.random.key(0)} if name in ("dpmpp_2s_ancestral", "dpmpp_sde") else {}
    jax.block_until_ready(
        jax.jit(lambda x, s: sampling.sample(name, counting_denoiser(counter), x, s, **options))(
            x, sigmas
        )
    )
    assert len(counter) == nfe


@pytest.mark.parametrize("name", ALL)
def test_each_sampler_compiles_once_for_a_fixed_number_of_steps(name):
    x = jnp.ones((2, 3))
    options = dict(noisy_options(name), key=jax.random.key(0)) if name in STOCHASTIC else {}
    run = jax.jit(functools.partial(sampling.sample, name, gaussian.denoiser, **options))
    outs = [run(x, sampling.get_sigmas_karras(5, lo, hi)) for lo, hi in ((0.01, 10), (0.1, 3))]
    assert run._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])
    run(x, sampling.get_sigmas_karras(7, 0.01, 10))
    assert run._cache_size() == 2  # n is the one static quantity


def test_churn_and_eta_may_be_traced():
    run = jax.jit(
        lambda churn, eta, key: (
            sampling.sample_heun(
                gaussian.denoiser,
                jnp.ones((2, 3)),
                sampling.get_sigmas_karras(5, 0.01, 10.0),
                key=key,
                s_churn=churn,
            ),
            sampling.sample_dpmpp_2m_sde(
                gaussian.denoiser,
                jnp.ones((2, 3)),
                sampling.get_sigmas_karras(5, 0.01, 10.0),
                key=key,
                eta=eta,
            ),
        )
    )
    a = run(0.0, 0.0, jax.random.key(0))
    b = run(10.0, 1.0, jax.random.key(0))
    assert run._cache_size() == 1
    assert not np.allclose(a[0], b[0]) and not np.allclose(a[1], b[1])


def test_callback_reports_every_step_under_jit():
    seen = []
    sigmas = sampling.get_sigmas_karras(5, 0.01, 10.0)
    jax.block_until_ready(
        jax.jit(lambda x: sampling.sample_heun(gaussian.denoiser, x, sigmas, callback=seen.append))(
            jnp.ones((2, 3))
        )
    )
    assert sorted(int(info["i"]) for info in seen) == [0, 1, 2, 3, 4]
    assert {"i", "sigma", "sigma_next", "x", "denoised"} <= set(seen[0])
    assert seen[0]["x"].shape == (2, 3)


def test_dpm_adaptive_reports_its_work():
    x = gaussian.SIGMA_MAX * jax.random.normal(jax.random.key(0), (8, 4))
    sigmas = sampling.get_sigmas_karras(10, gaussian.SIGMA_MIN, gaussian.SIGMA_MAX)
    loose = sampling.sample_dpm_adaptive(gaussian.denoiser, x, sigmas, return_info=True)[1]
    tight = sampling.sample_dpm_adaptive(
        gaussian.denoiser, x, sigmas, rtol=1e-3, atol=1e-4, return_info=True
    )[1]
    assert int(tight["nfe"]) > int(loose["nfe"]) > 0
    assert int(loose["nfe"]) == 3 * int(loose["steps"])
    assert int(loose["n_accept"]) + int(loose["n_reject"]) == int(loose["steps"])


def test_lms_weights_integrate_polynomials_exactly():
    sigmas = np.array([9.0, 5.0, 2.5, 1.2, 0.5])
    for order in (1, 2, 3, 4):
        i = order - 1
        coeffs = sampling.k_samplers.lms_coefficients(jnp.asarray(sigmas), i, order)
        poly = np.polynomial.Polynomial(np.arange(1.0, order + 1))  # degree order - 1
        points = sigmas[i - np.arange(order)]
        integral = poly.integ()(sigmas[i + 1]) - poly.integ()(sigmas[i])
        assert float(np.sum(np.asarray(coeffs) * poly(points))) == pytest.approx(integral, rel=1e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, s: sampling.sample("dpm3", gaussian.denoiser, x, s), "known: ddim, ddpm"),
        (
            lambda x, s: sampling.sample_euler_ancestral(gaussian.denoiser, x, s),
            "draws noise with these options: pass key=",
        ),
        (
            lambda x, s: sampling.sample_ddpm(gaussian.denoiser, x, s, noise=jnp.ones((3, 2, 3))),
            r"noise must have shape \(4, 2, 3\)",
        ),
        (
            lambda x, s: sampling.sample_dpmpp_2m_sde(
                gaussian.denoiser, x, s, eta=0.0, solver_type="rk4"
            ),
            "known: heun, midpoint",
        ),
        (
            lambda x, s: sampling.sample_ddpm(
                gaussian.denoiser, x, s, key=jax.random.key(0), variance="learned"
            ),
            "known: large, small",
        ),
        (
            lambda x, s: sampling.sample_dpm_adaptive(gaussian.denoiser, x, s, order=4),
            "order must be 2 or 3",
        ),
        (lambda x, s: sampling.sample_lms(gaussian.denoiser, x, s[:1]), "at least 2 values"),
    ],
)
def test_bad_calls_are_refused_in_one_sentence(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((2, 3)), sampling.get_sigmas_karras(4, 0.01, 10.0))

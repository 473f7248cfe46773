import gaussian
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdiff import sampling


def conditional_denoiser(calls):
    """A class-conditional Gaussian: class c has mean c / 4; labels [B] int."""

    def denoise(x, sigma, labels):
        calls.append(x.shape[0])
        mean = labels.astype(x.dtype)[:, None] / 4
        s = sigma[:, None]
        return mean + gaussian.STD**2 / (gaussian.STD**2 + s**2) * (x - mean)

    return denoise


def test_cfg_scale_one_is_the_conditional_denoiser_in_one_call():
    calls = []
    denoise = conditional_denoiser(calls)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    sigma = jnp.full((4,), 0.7)
    labels, null = jnp.array([1, 2, 3, 0]), jnp.zeros(4, jnp.int32)
    guided = sampling.classifier_free_guidance(denoise, labels, null, 1.0)
    np.testing.assert_allclose(guided(x, sigma), denoise(x, sigma, labels), rtol=1e-6)
    assert calls[0] == 4  # scale 1 is D_c: the unconditional half is not computed
    unguided = sampling.classifier_free_guidance(denoise, labels, null, 0.0)(x, sigma)
    assert calls[-1] == 4  # scale 0 is D_u alone
    np.testing.assert_allclose(unguided, denoise(x, sigma, null), rtol=1e-6)
    strong = sampling.classifier_free_guidance(denoise, labels, null, 3.0)(x, sigma)
    assert calls[-1] == 8  # both halves in one batched call
    d_c, d_u = denoise(x, sigma, labels), denoise(x, sigma, null)
    np.testing.assert_allclose(strong, d_u + 3.0 * (d_c - d_u), rtol=1e-5, atol=1e-6)


def test_cfg_drives_a_sampler():
    denoise = conditional_denoiser([])
    labels = jnp.full((512,), 2)
    guided = sampling.classifier_free_guidance(denoise, labels, jnp.zeros(512, jnp.int32), 1.0)
    x = 80.0 * jax.random.normal(jax.random.key(1), (512, 2))
    out = jax.jit(
        lambda x: sampling.sample_heun(guided, x, sampling.get_sigmas_karras(30, 0.002, 80.0))
    )(x)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.05)  # class 2's mean


def make_split(per_example=False):
    # three "models", each a Gaussian denoiser with its own mean, as parameter sets
    def denoise_fn(params, x, sigma):
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        return params["mean"] + gaussian.STD**2 / (gaussian.STD**2 + s**2) * (x - params["mean"])

    stacked = {"mean": jnp.array([0.0, 10.0, 20.0])}
    return sampling.snr_split_denoiser(denoise_fn, stacked, [0.5, 5.0], per_example=per_example)


def test_snr_split_sends_each_sigma_to_its_model():
    routed = make_split()
    x = jnp.zeros((2, 3))
    for sigma, mean in [
        (0.1, 0.0),
        (0.5, 10.0),
        (1.0, 10.0),
        (4.99, 10.0),
        (5.0, 20.0),
        (50, 20.0),
    ]:
        out = routed(x, jnp.full((2,), sigma))
        s2 = sigma**2
        expect = mean - gaussian.STD**2 / (gaussian.STD**2 + s2) * mean
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_snr_split_per_example_routes_a_mixed_batch():
    routed = make_split(per_example=True)
    sigma = jnp.array([0.1, 1.0, 10.0])
    out = routed(jnp.zeros((3, 2)), sigma)
    means = np.array([0.0, 10.0, 20.0])
    shrink = gaussian.STD**2 / (gaussian.STD**2 + np.asarray(sigma) ** 2)
    np.testing.assert_allclose(
        out, np.broadcast_to(((1 - shrink) * means)[:, None], (3, 2)), rtol=1e-5, atol=1e-5
    )
    # and it jits inside a sampler
    jax.jit(
        lambda x: sampling.sample_euler(make_split(), x, sampling.get_sigmas_karras(4, 0.1, 10.0))
    )(jnp.ones((2, 2)))


def test_snr_split_needs_one_boundary_fewer_than_models():
    with pytest.raises(ValueError, match="3 models need 2 sigma boundaries; got 1"):
        sampling.snr_split_denoiser(lambda p, x, s: x, {"w": jnp.ones((3, 2))}, [1.0])

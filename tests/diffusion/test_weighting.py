import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ml_collections_configs import base
from patchdiff.diffusion import build
from patchdiff.diffusion import weighting as w

S = np.array([0.002, 0.02, 0.3, 1.0, 4.0, 80.0])
SNR = 1 / S**2

FORMULAS = {
    "edm": lambda s: (s**2 + 0.25) / (s * 0.5) ** 2,
    "uniform": lambda s: np.ones_like(s),
    "snr": lambda s: 1 / s**2,
    "sqrt_snr": lambda s: 1 / s,
    "snr+1": lambda s: 1 / s**2 + 1,
    "truncated_snr": lambda s: np.maximum(1 / s**2, 1.0),
    "p2": lambda s: (1 / s**2) / (1 + 1 / s**2),  # k = 1, gamma = 1
    "min_snr": lambda s: np.minimum(1 / s**2, 5.0),
    "soft_min_snr": lambda s: 1 / (s**2 + 0.25),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_weighting_matches_its_formula(name):
    assert set(FORMULAS) == set(w.WEIGHTINGS.names())
    got = w.WEIGHTINGS.get(name)(jnp.asarray(S, jnp.float32))
    np.testing.assert_allclose(got, FORMULAS[name](S), rtol=1e-5)


def test_p2_with_gamma_half():
    got = w.p2(jnp.asarray(S), k=2.0, gamma=0.5)
    np.testing.assert_allclose(got, SNR / np.sqrt(2.0 + SNR), rtol=1e-5)


def diffusion_config(**overrides):
    d = base.get_config().diffusion
    d = ml_collections.ConfigDict(d.to_dict())
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    "param, named",
    [("edm", "edm"), ("vp", "snr"), ("ve", "snr")],
)
def test_default_weighting_is_the_parameterisations_own_loss(param, named):
    # "default" = 1 / c_out^2: EDM's lambda for edm, and the eps-MSE (SNR) for vp and ve.
    d = diffusion_config(parameterisation=param, loss_weighting="default")
    default = build.build_weighting(d, build.build_precond(d))
    d.loss_weighting = named
    explicit = build.build_weighting(d, build.build_precond(d))
    s = jnp.asarray(S, jnp.float32)
    np.testing.assert_allclose(default(s), explicit(s), rtol=1e-5)


def test_v_objective_with_unit_data_is_snr_plus_one():
    d = diffusion_config(parameterisation="v", sigma_data=1.0)
    default = build.build_weighting(d, build.build_precond(d))
    np.testing.assert_allclose(default(jnp.asarray(S)), FORMULAS["snr+1"](S), rtol=1e-5)


def test_soft_min_snr_is_k_diffusions_f_space_weight():
    # k-diffusion weights the F-space loss by (sigma sd)^2 / (sigma^2 + sd^2)^2; F-space loss is
    # the x0 loss divided by c_out^2 = (sigma sd)^2 / (sigma^2 + sd^2).
    sd = 0.5
    c_out_sq = (S * sd) ** 2 / (S**2 + sd**2)
    kdiff = (S * sd) ** 2 / (S**2 + sd**2) ** 2
    np.testing.assert_allclose(w.soft_min_snr(jnp.asarray(S)), kdiff / c_out_sq, rtol=1e-5)

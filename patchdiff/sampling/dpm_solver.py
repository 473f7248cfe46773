"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) with a fixed budget (`dpm_fast`) and with
embedded error control (`dpm_adaptive`), after k-diffusion's `DPMSolver`.

The solver integrates in t = -log sigma with the noise prediction eps = (x - D) / sigma. Both
samplers use only the ends of `sigmas`: sigma_max = sigmas[0] and sigma_min = the last non-zero
level, and return x at sigma_min (not denoised further), as k-diffusion's do.
"""

import jax
import jax.numpy as jnp
from jax import lax

from patchdiff.sampling.core import ancestral_step, call, is_zero, noise_inputs, register


def _sigma(t):
    return jnp.exp(-t)


def _t(sigma):
    return -jnp.log(sigma)


def _ends(sigmas):
    """(sigma_max, sigma_min): the first level and the last non-zero one."""
    return sigmas[0], jnp.where(sigmas[-1] > 0, sigmas[-1], sigmas[-2])


class _Solver:
    """DPM-Solver-1/2/3 updates from x at t to t_next; eps at t is computed by the caller so that
    the adaptive sampler can share it (and the first stage) between its two orders."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def eps(self, x, t):
        sigma = _sigma(t)
        return (x - call(self.denoiser, x, sigma)) / sigma

    @staticmethod
    def order_1(x, t, t_next, eps):
        return x - _sigma(t_next) * jnp.expm1(t_next - t) * eps

    def stage(self, x, t, h, eps, r1):
        """(s1, eps at the first intermediate point s1 = t + r1 h)."""
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * jnp.expm1(r1 * h) * eps
        return s1, self.eps(u1, s1)

    @staticmethod
    def order_2(x, t_next, h, eps, eps_r1, r1):
        sig, em1 = _sigma(t_next), jnp.expm1(h)
        return x - sig * em1 * eps - sig / (2 * r1) * em1 * (eps_r1 - eps)

    def order_3(self, x, t, t_next, eps, eps_r1, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        s2 = t + r2 * h
        u2 = (
            x
            - _sigma(s2) * jnp.expm1(r2 * h) * eps
            - _sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = self.eps(u2, s2)
        sig = _sigma(t_next)
        return x - sig * jnp.expm1(h) * eps - sig / r2 * (jnp.expm1(h) / h - 1) * (eps_r2 - eps)

    def step(self, x, t, t_next, order: int, eps):
        """One DPM-Solver step of `order` (1, 2 or 3) from t to t_next."""
        if order == 1:
            return self.order_1(x, t, t_next, eps)
        h = t_next - t
        r1 = 1 / 2 if order == 2 else 1 / 3
        _, eps_r1 = self.stage(x, t, h, eps, r1)
        if order == 2:
            return self.order_2(x, t_next, h, eps, eps_r1, r1)
        return self.order_3(x, t, t_next, eps, eps_r1)


def _ancestral_target(t, t_next, t_end, eta):
    """(t_next_, su): the deterministic target and the noise std of an ancestral step in t."""
    if is_zero(eta):
        return t_next, 0.0
    sd, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = jnp.minimum(t_end, _t(sd))
    return t_next_, jnp.sqrt(jnp.maximum(_sigma(t_next) ** 2 - _sigma(t_next_) ** 2, 0.0))


def fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's orders for a budget of `nfe` evaluations (Lu et al., Sec. 3.4)."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


@register("dpm_fast")
def sample_dpm_fast(
    denoiser, x, sigmas, *, key=None, noise=None, callback=None, eta=0.0, s_noise=1.0
):
    """DPM-Solver-fast: len(sigmas) - 1 evaluations spent on third-order steps evenly spaced in
    log sigma between sigmas[0] and the last non-zero sigma (then a 2nd/1st-order tail)."""
    nfe = sigmas.shape[0] - 1
    orders = fast_orders(nfe)
    sigma_max, sigma_min = _ends(sigmas)
    t_start, t_end = _t(sigma_max), _t(sigma_min)
    ts = jnp.linspace(t_start, t_end, len(orders) + 1)
    solver = _Solver(denoiser)
    source, from_keys = (None, False)
    if not is_zero(eta):
        source, from_keys = noise_inputs("dpm_fast", x, nfe, key, noise, 1)

    def one(x, i, order):
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _ancestral_target(t, t_next, t_end, eta)
        eps = solver.eps(x, t)
        denoised = x - _sigma(t) * eps
        x = solver.step(x, t, t_next_, order, eps)
        if source is not None:
            z = jax.random.normal(source[i], x.shape, x.dtype) if from_keys else source[i]
            x = x + su * s_noise * z
        if callback is not None:
            info = {
                "i": i,
                "sigma": _sigma(t),
                "sigma_next": _sigma(t_next),
                "x": x,
                "denoised": denoised,
            }
            jax.debug.callback(callback, info)
        return x

    num_third = orders.count(3)
    if num_third:
        x, _ = lax.scan(lambda x, i: (one(x, i, 3), None), x, jnp.arange(num_third))
    for i, order in enumerate(orders[num_third:], start=num_third):
        x = one(x, i, order)
    return x


@register("dpm_adaptive")
def sample_dpm_adaptive(
    denoiser,
    x,
    sigmas,
    *,
    key=None,
    noise=None,
    callback=None,
    order=3,
    rtol=0.05,
    atol=0.0078,
    h_init=0.05,
    pcoeff=0.0,
    icoeff=1.0,
    dcoeff=0.0,
    accept_safety=0.81,
    eta=0.0,
    s_noise=1.0,
    max_steps=1000,
    return_info=False,
):
    """DPM-Solver-12 or -23 with embedded error control and a PID step-size controller, from
    sigmas[0] to the last non-zero sigma. Each attempt compares orders (order - 1, order) from
    shared evaluations; a step is kept when the controller's factor >= accept_safety.

    Returns x, or (x, info) with `return_info` (info: steps, nfe, n_accept, n_reject). Noise
    (eta > 0) comes from `key` folded with the accepted-step count; a `noise` array cannot be
    given, since the number of steps is not known in advance.
    """
    if order not in (2, 3):
        raise ValueError(f"sample_dpm_adaptive: order must be 2 or 3; got {order}.")
    if noise is not None:
        raise ValueError(
            "sample_dpm_adaptive takes key=, not noise=: its number of steps is found as it runs."
        )
    stochastic = not is_zero(eta)
    if stochastic and key is None:
        raise ValueError("sample_dpm_adaptive draws noise when eta > 0: pass key=.")
    sigma_max, sigma_min = _ends(sigmas)
    t_start, t_end = _t(sigma_max), _t(sigma_min)
    solver = _Solver(denoiser)
    # PID coefficients (k-diffusion's PIDStepSizeController); an SDE step is order 1.5.
    controller_order = 1.5 if stochastic else order
    b1 = (pcoeff + icoeff + dcoeff) / controller_order
    b2 = -(pcoeff + 2 * dcoeff) / controller_order
    b3 = dcoeff / controller_order
    atol = jnp.asarray(atol, x.dtype)

    def attempt(carry):
        s, x, x_prev, h, errs, info = carry
        t = jnp.minimum(t_end, s + h)
        t_, su = _ancestral_target(s, t, t_end, eta)
        eps = solver.eps(x, s)
        step_h = t_ - s
        if order == 2:
            x_low = solver.order_1(x, s, t_, eps)
            _, eps_r1 = solver.stage(x, s, step_h, eps, 1 / 2)
            x_high = solver.order_2(x, t_, step_h, eps, eps_r1, 1 / 2)
        else:
            _, eps_r1 = solver.stage(x, s, step_h, eps, 1 / 3)
            x_low = solver.order_2(x, t_, step_h, eps, eps_r1, 1 / 3)
            x_high = solver.order_3(x, s, t_, eps, eps_r1)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
        error = jnp.linalg.norm(((x_low - x_high) / delta).ravel()) / jnp.sqrt(x.size)
        inv_error = 1 / (error + 1e-8)
        errs = jnp.where(info["n_steps"] == 0, inv_error, errs).at[0].set(inv_error)
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + jnp.arctan(factor - 1)  # the controller's limiter
        accept = factor >= accept_safety
        if stochastic:
            z = jax.random.normal(jax.random.fold_in(key, info["n_accept"]), x.shape, x.dtype)
            x_high = x_high + su * s_noise * z
        if callback is not None:
            jax.debug.callback(
                callback,
                {
                    "i": info["n_steps"],
                    "sigma": _sigma(s),
                    "sigma_next": _sigma(t),
                    "x": x_high,
                    "denoised": x - _sigma(s) * eps,
                },
            )
        info = {
            "n_steps": info["n_steps"] + 1,
            "nfe": info["nfe"] + order,
            "n_accept": info["n_accept"] + accept,
            "n_reject": info["n_reject"] + (1 - accept),
        }
        return (
            jnp.where(accept, t, s),
            jnp.where(accept, x_high, x),
            jnp.where(accept, x_low, x_prev),
            h * factor,
            jnp.where(accept, jnp.stack([errs[0], errs[0], errs[1]]), errs),
            info,
        )

    def running(carry):
        s, info = carry[0], carry[-1]
        return (s < t_end - 1e-5) & (info["n_steps"] < max_steps)

    zero = jnp.zeros((), jnp.int32)
    info = {"n_steps": zero, "nfe": zero, "n_accept": zero, "n_reject": zero}
    dtype = jnp.result_type(t_start)
    carry = (t_start, x, x, jnp.asarray(abs(h_init), dtype), jnp.ones(3, dtype), info)
    _, x, _, _, _, info = lax.while_loop(running, attempt, carry)
    if return_info:
        return x, {
            "steps": info["n_steps"],
            "nfe": info["nfe"],
            "n_accept": info["n_accept"],
            "n_reject": info["n_reject"],
        }
    return x

"""What every sampler shares: the step loop, noise, the registry and the `sample` dispatcher.

A sampler is `sample_NAME(denoiser, x, sigmas, *, key=None, noise=None, callback=None,
**options) -> x0`, where `denoiser(x, sigma)` maps x [B, ...] and sigma [B] to the denoised
estimate (the VE convention x = x0 + sigma n of `patchdiff.diffusion.precond`). Steps run inside
one `lax.scan`, so a sampler traces once and compiles to one program for a given number of steps
n = len(sigmas) - 1; the sigma values, churn, eta and the like are ordinary traced inputs.

Noise: a stochastic sampler draws step i's noise from `jax.random.split(key, n)[i]`, or takes
`noise`, an array [n, *x.shape] whose row i is step i's standard-normal draw ([n, 2, *x.shape]
for the samplers that draw twice per step). `noise_from_key` returns exactly the rows that a key
gives, so that both paths can be checked against each other and against other implementations.

Glossary: B batch, n steps, sigma noise level (VE).
"""

import jax
import jax.numpy as jnp
from jax import lax

from patchdiff.registry import Registry

SAMPLERS = Registry("sampler")


def to_d(x, sigma, denoised):
    """The probability-flow ODE's derivative dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion's `get_ancestral_step`; eta = 1 is the
    DDPM posterior, eta = 0 the ODE)."""
    variance = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(jnp.maximum(variance, 0.0)))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def call(denoiser, x, sigma):
    """denoiser(x, sigma) with a scalar sigma broadcast to the batch [B]. Sigma keeps its own
    dtype (float32 from the grids), also when x is bfloat16: c_noise needs its precision."""
    return denoiser(x, jnp.full(x.shape[:1], sigma))


def is_zero(value) -> bool:
    """True for a Python number equal to 0: the option is off and the sampler is deterministic.
    A traced value may be anything, so it counts as non-zero."""
    return isinstance(value, int | float) and value == 0


def noise_from_key(key, num_steps: int, shape, draws: int = 1, dtype=jnp.float32):
    """The standard-normal rows a sampler draws from `key`: [n, *shape] ([n, draws, *shape])."""
    keys = jax.random.split(key, num_steps)
    step_shape = tuple(shape) if draws == 1 else (draws, *shape)
    return jax.vmap(lambda k: jax.random.normal(k, step_shape, dtype))(keys)


def noise_inputs(name, x, num_steps, key, noise, draws):
    """Per-step inputs of the scan: the given noise rows, or one key per step."""
    expect = (num_steps, *x.shape) if draws == 1 else (num_steps, draws, *x.shape)
    if noise is not None:
        noise = jnp.asarray(noise)  # a numpy array cannot be indexed by a traced step number
        if tuple(noise.shape) != expect:
            raise ValueError(
                f"sample_{name}: noise must have shape {expect} (one row of standard-normal "
                f"draws per step); got {tuple(noise.shape)}."
            )
        return noise, False
    if key is None:
        raise ValueError(
            f"sample_{name} draws noise with these options: pass key= (a jax.random key) or "
            f"noise= of shape {expect}."
        )
    return jax.random.split(key, num_steps), True


def run_steps(name, step, x, sigmas, state=(), *, key=None, noise=None, draws=0, callback=None):
    """The loop shared by the fixed-grid samplers.

    `step(x, state, i, sigma, sigma_next, z) -> (x, state, denoised)` advances one step; z is the
    step's noise ([*x.shape], or [draws, *x.shape]) or None when `draws` is 0. `callback`, if
    given, receives {"i", "sigma", "sigma_next", "x", "denoised"} on the host after every step
    (through `jax.debug.callback`, so it works under jit; the arrays are copied to the host).
    """
    num_steps = sigmas.shape[0] - 1
    if num_steps < 1:
        raise ValueError(f"sample_{name}: sigmas must hold at least 2 values; got {num_steps + 1}.")
    source, from_keys = (None, False)
    if draws:
        source, from_keys = noise_inputs(name, x, num_steps, key, noise, draws)
    z_shape = x.shape if draws == 1 else (draws, *x.shape)

    def body(carry, inputs):
        x, state = carry
        i, src = inputs
        z = jax.random.normal(src, z_shape, x.dtype) if from_keys else src
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, state, denoised = step(x, state, i, sigma, sigma_next, z)
        if callback is not None:
            info = {"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised}
            jax.debug.callback(callback, info)
        return (x, state), None

    (x, _), _ = lax.scan(body, (x, state), (jnp.arange(num_steps), source))
    return x


def register(name: str):
    """Registers `sample_NAME` under NAME."""
    return SAMPLERS.register(name)


def sample(name: str, denoiser, x, sigmas, **options):
    """Runs the sampler registered as `name` (see `SAMPLERS.names()`)."""
    return SAMPLERS.get(name)(denoiser, x, sigmas, **options)

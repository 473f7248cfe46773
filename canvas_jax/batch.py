"""`score_candidates`: zero-cost scores of many kernel graphs in the U-Net, one compiled program.

Glossary: M candidates, B batch, H/W height/width, C channels, N nodes, K one-hot columns.

All candidates share the model's other parameters and draw their kernels' parameters from one
template parameter set per placeholder (a random initialisation either way: the proxies score
networks at initialisation). Two ways to run M candidates in one program:

- routed (jacov, naswot): the candidates are folded into the batch, x [M * B, H, W, C], and run
  through ONE model whose placeholders are `RoutedTemplate`s: each primitive runs only on the
  rows of the candidates that chose it. Exact because no layer mixes examples.
- vmapped (snip, grad_norm, synflow): one candidate's model (TemplateKernel bound to its
  encoding, every node a `lax.switch`, under vmap a select over all K primitives) vmapped over
  encodings [M, N, N], [M, N, K]; these proxies need each candidate's own parameter gradient,
  which a folded batch with shared parameters would sum over candidates.

Either runs in chunks of `chunk` candidates with one compilation (the last chunk is padded).
`score_loop`, which builds `canvas_jax.replace(config, graph)` for one graph at a time with the
same parameters, gives the same scores: that is the check, and the per-candidate baseline the
benchmark times.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from canvas_jax.graph import Space
from canvas_jax.placeholders import get_placeholders, replace, slot_factory
from canvas_jax.sample import space_from_config
from canvas_jax.score import (
    PROXIES,
    collect_sown,
    input_jacobian,
    jacov_from_jacobian,
    naswot_from_kernel,
    noised_batch,
)
from canvas_jax.template import (
    RoutedTemplate,
    TemplateKernel,
    compiled_params,
    relu_mask,
    route_capacities,
    routing_table,
    template_params,
)
from patchdiff import xla_cpu
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.precond import denoise
from patchdiff.models import DTYPES, build_model, dummy_inputs


def _set_kernels(config, params, make):
    """A copy of `params` whose every placeholder's "graph" entry is make(number, slot, entry):
    placeholders are found once, and their paths walked in one place."""
    params = jax.tree.map(lambda a: a, params)  # a copy to edit
    for number, slot in enumerate(get_placeholders(config)):
        *parents, leaf = slot.path.split("/")
        node = params
        for name in parents:
            node = node[name]
        node[leaf] = {"graph": make(number, slot, node[leaf].get("graph"))}
    return params


def kernel_params(config, base_params, space: Space, seed: int = 0):
    """The template model's parameters: `base_params` (of `build_model(config)`) everywhere but
    at the placeholders, which get template parameters drawn with numpy (seed + slot number)."""
    return _set_kernels(
        config,
        base_params,
        lambda number, slot, _: template_params(space, slot.channels, seed + number),
    )


def candidate_params(graph, params, config):
    """The parameters `canvas_jax.replace(config, graph)` runs with, taken from `kernel_params`."""
    return _set_kernels(config, params, lambda _, __, template: compiled_params(graph, template))


def _denoiser_fn(model, config, sigma, kwargs, with_relus):
    """apply_fn(params, x) of the preconditioned denoiser D(x; sigma) (EDM eq. 7)."""
    precond = diffusion_build.build_precond(config.diffusion)

    def apply_fn(params, x):
        state = {}

        def net(x_in, c_noise):
            out, inter = model.apply(
                {"params": params}, x_in, c_noise, mutable=["intermediates"], **kwargs
            )
            state.update(inter)
            return out

        out = denoise(net, precond, x, jnp.full((x.shape[0],), sigma))
        if not with_relus:
            return out
        return out, collect_sown(state, "relu_inputs")

    return apply_fn


def _inputs(config, images, sigma, key):
    x = noised_batch(jnp.asarray(images, jnp.float32), sigma, key)
    _, _, kwargs = dummy_inputs(config, batch=x.shape[0], resolution=x.shape[1])
    return (x, jnp.asarray(images, jnp.float32)), kwargs


# Proxies that need only input gradients or activations. Their candidates share every parameter,
# so they are folded into the batch and routed (`RoutedTemplate`); proxies that differentiate by
# the parameters (snip, grad_norm, synflow) need one parameter gradient per candidate, which a
# shared, folded parameter set would sum over candidates: those run vmapped over candidates.
ROUTED_PROXIES = ("jacov", "naswot")


def score_candidates(
    graphs,
    config,
    images,
    key,
    *,
    params,
    proxy: str = "jacov",
    sigma: float = 1.0,
    chunk: int = 32,
    seed: int = 0,
):
    """[M] scores of `graphs` swapped into every placeholder of `build_model(config)`.

    images [B, H, W, C] in [-1, 1] are noised at `sigma` (one noise draw for all candidates);
    params: `kernel_params(config, base_params, space)`. NaN marks a flagged candidate. `chunk`
    candidates run per call (the last chunk padded, so all calls share one compilation).
    """
    PROXIES.get(proxy, "proxy")  # an unknown name fails here, listing the known ones
    space = space_from_config(config)
    placeholders = get_placeholders(config)
    if not placeholders:
        raise ValueError("score_candidates: config.model.placeholders declares no placeholders.")
    if chunk < 1:
        raise ValueError(f"score_candidates: chunk must be a positive integer; got {chunk}.")
    for graph in graphs:
        for slot in placeholders:
            graph.validate(channels=slot.channels, space=space)
    encodings = [graph.encode(space) for graph in graphs]
    adjacency = np.stack([e[0] for e in encodings])
    onehot = np.stack([e[1] for e in encodings])
    batch, kwargs = _inputs(config, images, sigma, key)
    if proxy in ROUTED_PROXIES:
        program = _routed_program(config, proxy, float(sigma))
        return _score_routed(
            program, adjacency, onehot, space, params, batch[0], kwargs, proxy, chunk
        )
    run = _vmapped_program(config, params, batch, kwargs, proxy, sigma, key)
    return _score_vmapped(run, adjacency, onehot, chunk)


def _chunks(count, chunk):
    """(size, pad): calls of `size` candidates, the last padded by `pad`."""
    size = min(chunk, count)
    return size, -count % size


def _vmapped_program(config, params, batch, kwargs, proxy, sigma, key):
    """jit(vmap(score one candidate)) over encodings [M, N, N], [M, N, K]: each candidate's model
    runs TemplateKernel bound to its encoding, with its own parameter gradient."""
    proxy_fn = PROXIES.get(proxy, "proxy")
    space = space_from_config(config)
    placeholders = get_placeholders(config)
    dtype = DTYPES[config.model.dtype]
    with_relus = proxy == "naswot"

    def score_one(adj, hot):
        # nn.remat: the backward pass recomputes one placeholder's template at a time, so the
        # per-node carries of all placeholders are never alive together.
        make = lambda name: nn.remat(TemplateKernel)(space, dtype, adj, hot, name=name)  # noqa: E731
        model = build_model(config, conv3x3=slot_factory(config, make))
        apply_fn = _denoiser_fn(model, config, sigma, kwargs, with_relus)
        if with_relus:
            mask = jnp.concatenate([relu_mask(hot, space)] * len(placeholders))
            relus_fn = apply_fn

            def apply_fn(p, x):
                out, relus = relus_fn(p, x)
                return out, [r for stacked in relus for r in stacked], mask

        return proxy_fn(apply_fn, params, batch, key)

    return xla_cpu.jit(jax.vmap(score_one))


def _score_vmapped(run, adjacency, onehot, chunk):
    count = len(adjacency)
    size, pad = _chunks(count, chunk)
    adjacency = np.concatenate([adjacency, np.repeat(adjacency[:1], pad, 0)])
    onehot = np.concatenate([onehot, np.repeat(onehot[:1], pad, 0)])
    scores = [
        np.asarray(run(adjacency[i : i + size], onehot[i : i + size]))
        for i in range(0, len(adjacency), size)
    ]
    return np.concatenate(scores)[:count]


# jit caches compilations per function object: one routed program per (config, proxy, sigma), so
# that later calls (the next proposals of a search) reuse the compilations of earlier ones.
_ROUTED_PROGRAMS: dict = {}


def _routed_program(config, proxy: str, sigma: float):
    """jit(program(params, x [B, H, W, C], kwargs, routes) -> [M] scores): the M routed
    candidates folded into one batch [M * B, ...] of one model (every placeholder a
    RoutedTemplate). Examples stay independent in the U-Net (GroupNorm, attention and the noise
    embedding act per example), so the input gradient of sum(outputs) holds each candidate's
    per-example Jacobian rows (jacov), and each candidate's relu codes are its own (naswot)."""
    cache_key = (config.to_json_best_effort(sort_keys=True), proxy, sigma)
    if cache_key in _ROUTED_PROGRAMS:
        return _ROUTED_PROGRAMS[cache_key]
    space = space_from_config(config)
    dtype = DTYPES[config.model.dtype]
    with_relus = proxy == "naswot"

    def program(params, x, kwargs, routes):
        count, batch = routes["last"].shape[0], x.shape[0]
        make = lambda name: nn.remat(RoutedTemplate)(space, dtype, routes, with_relus, name=name)  # noqa: E731
        model = build_model(config, conv3x3=slot_factory(config, make))
        fold = lambda a: jnp.tile(a, (count,) + (1,) * (a.ndim - 1))  # noqa: E731 [M * B, ...]
        apply_fn = _denoiser_fn(model, config, sigma, jax.tree.map(fold, kwargs), with_relus)
        if not with_relus:
            grad = input_jacobian(apply_fn, params, fold(x))  # [M * B, P]
            return jax.vmap(jacov_from_jacobian)(grad.reshape(count, batch, -1))
        _, relus = apply_fn(params, fold(x))
        if not relus:  # no candidate has a relu
            return jnp.full((count,), jnp.nan)
        rows = routes["gather"]["relu"]
        kernel = sum(_routed_hamming(r, rows, count) for r in relus)  # [M + 1, B, B]
        return jax.vmap(naswot_from_kernel)(kernel[:count])

    _ROUTED_PROGRAMS[cache_key] = xla_cpu.jit(program)
    return _ROUTED_PROGRAMS[cache_key]


def _routed_hamming(relu_inputs, rows, count):
    """Each candidate's NASWOT kernel [M + 1, B, B] (score.hamming_kernel) from one placeholder's
    routed relu inputs [N - 1, cap, B, H, W, C] and their candidates rows [N - 1, cap]; padding
    rows add into row M."""
    batch = relu_inputs.shape[2]
    signs = jnp.where(relu_inputs.reshape(*relu_inputs.shape[:3], -1) > 0, 1.0, -1.0)
    agree = (jnp.einsum("ncbp,ncdp->ncbd", signs, signs) + signs.shape[-1]) / 2
    kernel = jnp.zeros((count + 1, batch, batch), jnp.float32)
    return kernel.at[rows.reshape(-1)].add(agree.reshape(-1, batch, batch))


def _score_routed(program, adjacency, onehot, space, params, x, kwargs, proxy, chunk):
    count = len(onehot)
    size, pad = _chunks(count, chunk)
    # Padding candidates are empty graphs (the input alone): they take no routing capacity.
    adjacency = np.concatenate([adjacency, np.zeros((pad, *adjacency.shape[1:]), np.float32)])
    empty = np.zeros((pad, *onehot.shape[1:]), np.float32)
    empty[:, 0, 0] = 1.0
    onehot = np.concatenate([onehot, empty])
    capacities = route_capacities(onehot, space)  # over all chunks: one shape, one compilation
    scores = [
        np.asarray(
            program(
                params,
                x,
                kwargs,
                routing_table(adjacency[i : i + size], onehot[i : i + size], space, capacities),
            )
        )
        for i in range(0, len(onehot), size)
    ]
    scores = np.concatenate(scores)[:count]
    if proxy == "naswot":  # no ReLU codes: flagged, as score_loop does
        has_relu = onehot[:count, :, space.columns.index("relu")].max(axis=1) > 0.5
        scores = np.where(has_relu, scores, np.nan)
    return scores


def score_loop(graphs, config, images, key, *, params, proxy="jacov", sigma=1.0, timings=None):
    """The per-candidate way (CANVAS, NASLib): build and jit each candidate's model in turn.

    timings: a list that receives (compile seconds, run seconds) per candidate, if given.
    """
    proxy_fn = PROXIES.get(proxy, "proxy")
    batch, kwargs = _inputs(config, images, sigma, key)
    scores = []
    for graph in graphs:
        if proxy == "naswot" and "relu" not in graph.ops:
            scores.append(np.nan)  # no ReLU codes: flagged, as the template's empty kernel gives
            continue
        apply_fn = _denoiser_fn(replace(config, graph), config, sigma, kwargs, proxy == "naswot")
        own = candidate_params(graph, params, config)
        start = time.perf_counter()
        program = xla_cpu.jit(lambda p, f=apply_fn: proxy_fn(f, p, batch, key)).lower(own).compile()
        compiled = time.perf_counter()
        scores.append(float(program(own)))
        if timings is not None:
            timings.append((compiled - start, time.perf_counter() - compiled))
    return np.asarray(scores)


def base_model(config):
    """The plain model (placeholders as ordinary convs), whose parameters `kernel_params` reuses."""
    return build_model(config)

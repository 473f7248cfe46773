"""A score-based diffusion model over kernel-graph encodings, sampled with predictor guidance
(DiffusionNAG, An et al. ICLR 2024), through the project's own EDM machinery and samplers.

Glossary: M graphs, N nodes (the space's max_nodes), K op columns (input + primitives), F free
coordinates of one graph (the strict upper triangle of the adjacency when edges are free, then
the N x K op weights), H hidden width, sigma noise level (VE: x = x0 + sigma n).

The data: a graph's encoding `e = (adjacency [N, N], onehot [N, K])` in {0, 1} (rows past the
graph are zero), flattened to its free coordinates x0 [F]. In a space whose graphs all share one
adjacency (NAS-Bench-201's cell: only the ops vary) the adjacency is fixed and not diffused.

The denoiser: EDM's preconditioning (Karras et al. 2022, Table 1; `patchdiff.diffusion.precond`)
around `GraphScoreNet`, a transformer over the N nodes. Its attention respects the graph as
DiffusionNAG's does: half of the heads see only the nodes that a directed path joins to the
query (reachability of the fixed adjacency, or the noisy-OR closure of the current noisy
adjacency, `predictor_net.soft_reachability`); the other half see every node, which the free-edge
case needs while the noisy adjacency says little. Every head gets a learned bias from the pair's
entries (a_ij, a_ji). Edge logits come from a bilinear read-out of the node states.

Sampling: any sampler of `patchdiff.sampling` (Euler, Heun, DPM++, ...) on a Karras grid. The
score is (D(x, sigma) - x) / sigma^2, so predictor guidance `score + lambda grad_x log p(y | x)`
(DiffusionNAG eq. 7) is the denoiser D + lambda sigma^2 grad_x mu(x, sigma), with mu the
predictor's ensemble mean in z-score units (`NeuralPredictor.mean_fn(..., standardized=True)`):
the log-likelihood of a high target under a Gaussian of fixed width, up to a constant. The
predictor was trained on VP-noised encodings (`predictor_net.perturb`); a VE state x at sigma is
the VP state alpha x at the level t where sigma_vp / alpha = sigma, so the generator hands the
predictor exactly the noise statistics it learned on (`vp_view`).

Decoding thresholds at 0.5 (`KernelGraph.decode`), validates against the space (and an optional
`check`, e.g. `Constraints.check`), and deduplicates by canonical hash. Reported: the fraction of
samples that are valid, of valid samples that are distinct, and of distinct ones that are novel
(in neither the training set nor `seen`).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from canvas_jax.graph import KernelGraph, Space
from canvas_jax.primitives import PRIMITIVES
from nag.predictor_net import MASK_EPS, biased_attention, soft_reachability
from patchdiff.diffusion.precond import edm_scalings
from patchdiff.sampling import grids
from patchdiff.sampling.core import SAMPLERS
from patchdiff.sampling.core import sample as run_sampler


def noise_embedding(c_noise, dim: int):
    """c_noise [M] (EDM's ln(sigma) / 4, about -1.6..1.1) -> [M, dim] Fourier features whose
    frequencies span 1..100 cycles per unit, so both ends of the sigma range resolve."""
    freqs = jnp.exp(jnp.linspace(0.0, math.log(100.0), dim // 2))
    angles = c_noise[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class GraphScoreNet(nn.Module):
    """apply(params, adjacency [M, N, N], onehot [M, N, K], raw_adjacency [M, N, N], c_noise [M])
    -> (adjacency [M, N, N], onehot [M, N, K]): the network F of the preconditioned denoiser.
    `adjacency`, `onehot` are c_in-scaled; `raw_adjacency` (unscaled, noisy or fixed) gives the
    reachability mask."""

    hidden: int = 64
    layers: int = 3
    heads: int = 4

    @nn.compact
    def __call__(self, adjacency, onehot, raw_adjacency, c_noise):
        m, n, k = onehot.shape
        reach = jnp.log(soft_reachability(raw_adjacency) + MASK_EPS)  # [M, N, N]
        masked = jnp.arange(self.heads) < self.heads // 2  # [heads]: these see paths only
        mask_bias = jnp.where(masked[None, :, None, None], reach[:, None], 0.0)
        pairs = jnp.stack([adjacency, jnp.swapaxes(adjacency, 1, 2)], -1)  # [M, N, N, 2]
        pair_bias = jnp.moveaxis(nn.Dense(self.heads)(pairs), -1, 1)  # [M, heads, N, N]
        bias = mask_bias + pair_bias

        position = self.param("position", nn.initializers.normal(0.02), (n, self.hidden))
        noise = nn.Dense(self.hidden)(noise_embedding(c_noise, self.hidden))
        noise = nn.Dense(self.hidden)(nn.gelu(noise))  # [M, H]
        # A node's row of the adjacency (its inputs) and column (its consumers) as features.
        edges = jnp.concatenate([adjacency, jnp.swapaxes(adjacency, 1, 2)], -1)  # [M, N, 2N]
        h = nn.Dense(self.hidden)(jnp.concatenate([onehot, edges], -1))
        h = h + position + noise[:, None]  # [M, N, H]
        for _ in range(self.layers):
            y = nn.LayerNorm()(h)
            h = h + biased_attention(y, bias, self.hidden, self.heads)
            y = nn.LayerNorm()(h)
            y = y * (1 + nn.Dense(self.hidden)(noise)[:, None])  # noise-level modulation
            h = h + nn.Dense(self.hidden)(nn.gelu(nn.Dense(2 * self.hidden)(y)))
        h = nn.LayerNorm()(h)
        ops = nn.Dense(k)(h)  # [M, N, K]
        source = nn.Dense(self.hidden)(h)
        target = nn.Dense(self.hidden)(h)
        edge = jnp.einsum("mih,mjh->mij", source, target) / math.sqrt(self.hidden)
        edge = edge + nn.Dense(1)(pairs)[..., 0]  # [M, N, N]
        return edge, ops


def vp_view(x_adjacency, x_onehot, sigma, beta_min: float = 0.1, beta_max: float = 20.0):
    """A VE state (x = e + sigma n) as the VP state the noise-aware predictor was trained on:
    (alpha x_adjacency, alpha x_onehot, t) with alpha = 1 / sqrt(1 + sigma^2) and t solving
    `predictor_net.vp_alpha_sigma(t) = alpha` (a quadratic in t). sigma [M] -> t [M]."""
    sigma = jnp.asarray(sigma, jnp.float32)
    alpha = jax.lax.rsqrt(1.0 + sigma**2)
    a, b, c = 0.25 * (beta_max - beta_min), 0.5 * beta_min, 0.5 * jnp.log1p(sigma**2)
    t = jnp.clip((-b + jnp.sqrt(b * b + 4 * a * c)) / (2 * a), 0.0, 1.0)
    scale = alpha[:, None, None]
    return scale * x_adjacency, scale * x_onehot, t


def decode_free(adjacency, onehot, space: Space) -> KernelGraph:
    """A graph from a continuous free-edge encoding (adjacency [N, N], onehot [N, K]): nodes up
    to the last row with an op weight above 0.5, node 0 the input, every other node the argmax
    primitive reading its arity's strongest earlier nodes; nodes that do not reach the output
    are dropped. Raises ValueError when that is no valid graph of the space."""
    adjacency, onehot = np.asarray(adjacency), np.asarray(onehot)
    present = np.flatnonzero(onehot.max(axis=1) > 0.5)
    count = int(present.max()) + 1 if present.size else 0
    if count < 2:
        raise ValueError("decode_free: fewer than 2 nodes.")
    ops, inputs = ["input"], [()]
    for node in range(1, count):
        op = space.columns[1 + int(onehot[node, 1:].argmax())]
        arity = PRIMITIVES.get(op).arity
        if node < arity:
            raise ValueError(f"decode_free: node {node} ({op}) needs {arity} earlier nodes.")
        strongest = np.argsort(-adjacency[:node, node], kind="stable")[:arity]
        ops.append(op)
        inputs.append(tuple(sorted(int(j) for j in strongest)))
    keep = {0, count - 1}
    for node in range(count - 1, 0, -1):  # ancestors of the output, walking back
        if node in keep:
            keep.update(inputs[node])
    index = {old: new for new, old in enumerate(sorted(keep))}
    graph = KernelGraph(
        tuple(ops[i] for i in sorted(keep)),
        tuple(tuple(index[j] for j in inputs[i]) for i in sorted(keep)),
    )
    graph.validate(space=space)
    return graph


@dataclasses.dataclass
class Generated:
    """What `GraphDiffusion.generate` returns: the valid, distinct graphs not in `seen` (in
    sample order), and the fractions over the n samples."""

    graphs: list
    valid_fraction: float
    unique_fraction: float
    novel_fraction: float
    exact_fraction: float  # valid as thresholded, before `decode_free`'s repairs
    samples: int


class GraphDiffusion:
    """The generator: fit on valid graphs of a space, then `generate` (optionally guided).

    Defaults: EDM's sigma_data = 0.5 (a {0, 1} coordinate's std at p = 1/2), sigma in
    [0.002, 10] (10 is twenty data stds: pure noise for {0, 1} data), the lognormal training
    sigma of EDM (P_mean = -1.2, P_std = 1.2), Heun on 32 Karras steps."""

    def __init__(
        self,
        space: Space,
        hidden: int = 64,
        layers: int = 3,
        heads: int = 4,
        learning_rate: float = 1e-3,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 10.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        seed: int = 0,
    ):
        if not isinstance(space, Space):
            raise ValueError(f"space: a canvas_jax Space; got {type(space).__name__}.")
        if heads < 2 or hidden % heads:
            raise ValueError(
                f"GraphDiffusion.heads = {heads}: at least 2 (half of them masked by "
                f"reachability), dividing hidden = {hidden}."
            )
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max = {sigma_min}, {sigma_max}: 0 < min < max.")
        self.space = space
        self.net = GraphScoreNet(hidden, layers, heads)
        self.learning_rate = learning_rate
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.p_mean, self.p_std = p_mean, p_std
        self.key = jax.random.PRNGKey(seed)
        n, k = space.max_nodes, len(space.columns)
        self.nodes, self.columns = n, k
        self.upper = np.triu_indices(n, k=1)
        self.adjacency = None  # [N, N] when the training graphs share one
        self.params = None
        self.train_hashes: set[str] = set()
        self.losses = None
        self._programs = {}  # compiled samplers by static settings

    # -- encodings <-> flat coordinates -----------------------------------------------------

    @property
    def free_edges(self) -> bool:
        return self.adjacency is None

    @property
    def dims(self) -> int:
        """F: the free coordinates of one graph."""
        edges = len(self.upper[0]) if self.free_edges else 0
        return edges + self.nodes * self.columns

    def flatten(self, adjacency, onehot):
        """(adjacency [M, N, N], onehot [M, N, K]) -> x [M, F]."""
        parts = [onehot.reshape(onehot.shape[0], -1)]
        if self.free_edges:
            parts.insert(0, adjacency[:, self.upper[0], self.upper[1]])
        return jnp.concatenate(parts, -1)

    def unflatten(self, x):
        """x [M, F] -> (adjacency [M, N, N], onehot [M, N, K]); a fixed adjacency is broadcast."""
        m, n = x.shape[0], self.nodes
        if self.free_edges:
            count = len(self.upper[0])
            adjacency = (
                jnp.zeros((m, n, n), x.dtype).at[:, self.upper[0], self.upper[1]].set(x[:, :count])
            )
            x = x[:, count:]
        else:
            adjacency = jnp.broadcast_to(jnp.asarray(self.adjacency, x.dtype), (m, n, n))
        return adjacency, x.reshape(m, n, self.columns)

    # -- the denoiser ------------------------------------------------------------------------

    def denoise(self, params, x, sigma):
        """EDM's D(x, sigma): x [M, F], sigma [M] -> denoised [M, F]."""
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        adjacency, onehot = self.unflatten(x)
        scale = c_in[:, None, None]
        # A fixed adjacency is not noisy: it enters unscaled, as the graph it is.
        net_adjacency = adjacency * scale if self.free_edges else adjacency
        edge, ops = self.net.apply(
            {"params": params}, net_adjacency, onehot * scale, adjacency, c_noise
        )
        return c_skip[:, None] * x + c_out[:, None] * self.flatten(edge, ops)

    def _loss(self, params, key, x0):
        """EDM's weighted denoising loss (Karras et al. 2022, eq. 2 with Table 1's lambda)."""
        key_sigma, key_noise = jax.random.split(key)
        m = x0.shape[0]
        sigma = jnp.exp(self.p_mean + self.p_std * jax.random.normal(key_sigma, (m,)))
        x = x0 + sigma[:, None] * jax.random.normal(key_noise, x0.shape)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        error = (self.denoise(params, x, sigma) - x0) ** 2
        return jnp.mean(weight[:, None] * error)

    # -- training ----------------------------------------------------------------------------

    def fit(self, graphs, steps: int = 2000, batch_size: int = 128) -> "GraphDiffusion":
        """Trains on `graphs` (valid KernelGraphs of the space; duplicates allowed) for `steps`
        Adam steps of `batch_size` graphs drawn with replacement; returns self."""
        graphs = list(graphs)
        if len(graphs) < 2 or not all(isinstance(g, KernelGraph) for g in graphs):
            raise ValueError("graphs: at least 2 KernelGraphs of the space to learn from.")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps, batch_size = {steps}, {batch_size}: both >= 1.")
        encodings = [g.encode(self.space) for g in graphs]  # validates against the space
        adjacency = np.stack([e[0] for e in encodings])
        onehot = np.stack([e[1] for e in encodings])
        # One adjacency shared by every training graph (NB201's cell) is fixed, not diffused.
        self.adjacency = adjacency[0] if (adjacency == adjacency[0]).all() else None
        self.train_hashes = {g.canonical_hash() for g in graphs}
        data = np.asarray(self.flatten(adjacency, onehot), np.float32)  # [M, F]

        self.key, init_key, train_key = jax.random.split(self.key, 3)
        n = self.nodes
        zeros = (jnp.zeros((1, n, n)), jnp.zeros((1, n, self.columns)), jnp.zeros((1, n, n)))
        params = jax.jit(self.net.init)(init_key, *zeros, jnp.zeros((1,)))["params"]
        optimizer = optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, steps // 20 + 1, steps),
            weight_decay=1e-4,
        )
        rng = np.random.default_rng(np.asarray(jax.random.key_data(train_key)))
        batches = rng.integers(len(data), size=(steps, batch_size))  # [S, B]

        @jax.jit
        def train(params, key, data, batches):
            def step(carry, idx):
                params, opt_state, key = carry
                key, sub = jax.random.split(key)
                loss, grads = jax.value_and_grad(self._loss)(params, sub, data[idx])
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state, key), loss

            carry = (params, optimizer.init(params), key)
            (params, _, _), losses = jax.lax.scan(step, carry, batches)
            return params, losses

        self.params, losses = train(params, train_key, data, batches)
        self.losses = np.asarray(losses)
        return self

    # -- sampling ----------------------------------------------------------------------------

    def guided_denoiser(self, params, predictor=None, predictor_params=None, guidance=0.0):
        """D(x, sigma) [M, F] with the generator's `params`, plus guidance * sigma^2 *
        grad_x mu_z with a differentiable predictor's `predictor_params` (see the module
        docstring). Pure: jit it with the parameters and `guidance` as arguments."""
        if predictor is None:
            return lambda x, sigma: self.denoise(params, x, sigma)
        beta = (predictor.beta_min, predictor.beta_max)

        def predicted(x, sigma):
            adjacency, onehot = self.unflatten(x)
            adjacency, onehot, t = vp_view(adjacency, onehot, sigma, *beta)
            return predictor.standardized_mean(predictor_params, adjacency, onehot, t).sum()

        def denoiser(x, sigma):
            gradient = jax.grad(predicted)(x, sigma)  # samples are independent: per-row grads
            return self.denoise(params, x, sigma) + guidance * sigma[:, None] ** 2 * gradient

        return denoiser

    def _program(self, predictor, n: int, num_steps: int, sampler: str, options: dict):
        """The jitted sampler for these static settings, compiled once and reused (parameters,
        guidance scale and key are its arguments, so refits do not recompile it)."""
        static = (id(predictor), n, num_steps, sampler, tuple(sorted(options.items())))
        if static not in self._programs:

            def run(params, predictor_params, guidance, x, sigmas, key):
                denoiser = self.guided_denoiser(params, predictor, predictor_params, guidance)
                return run_sampler(sampler, denoiser, x, sigmas, key=key, **options)

            self._programs[static] = jax.jit(run)
        return self._programs[static]

    def sample(
        self,
        key,
        n: int,
        predictor=None,
        guidance: float = 0.0,
        num_steps: int = 32,
        sampler: str = "heun",
        **sampler_options,
    ) -> tuple[np.ndarray, np.ndarray]:
        """n continuous samples (adjacency [n, N, N], onehot [n, N, K]) as numpy arrays."""
        if self.params is None:
            raise ValueError("GraphDiffusion: call fit before sampling.")
        if n < 1 or num_steps < 1:
            raise ValueError(f"n, num_steps = {n}, {num_steps}: both >= 1.")
        SAMPLERS.get(sampler, "sampler")
        predictor_params = None
        if predictor is not None and guidance != 0.0:
            if not getattr(predictor, "differentiable", False) or predictor.params is None:
                raise ValueError(
                    f"predictor: guidance needs a fitted differentiable predictor (a "
                    f"NeuralPredictor after fit); got {type(predictor).__name__}."
                )
            predictor_params = predictor.params
        else:
            predictor = None
        run = self._program(predictor, n, num_steps, sampler, sampler_options)
        sigmas = grids.get_sigmas_karras(num_steps, self.sigma_min, self.sigma_max)
        key_start, key_sampler = jax.random.split(key)
        x = self.sigma_max * jax.random.normal(key_start, (n, self.dims))
        out = run(self.params, predictor_params, jnp.float32(guidance), x, sigmas, key_sampler)
        adjacency, onehot = self.unflatten(out)
        return np.asarray(adjacency), np.asarray(onehot)

    def decode(self, adjacency, onehot, check=None) -> tuple[list, int]:
        """(one KernelGraph per sample, or None where there is no valid graph of the space or
        `check(graph)` gives a reason; how many samples were valid graphs as thresholded).

        A fixed adjacency: the thresholded decoding (`KernelGraph.decode`), which keeps the
        space's layout. Free edges: `decode_free`, which reads the ops by argmax and each node's
        inputs as its arity's strongest incoming edges, then drops the nodes that do not reach
        the output: thresholding alone must get every arity and every consumer right at once."""
        graphs, exact = [], 0
        for a, o in zip(adjacency, onehot, strict=True):
            try:
                graph = KernelGraph.decode(a, o, self.space)
                exact += 1
            except ValueError:
                graph = None
            if graph is None and self.free_edges:
                try:
                    graph = decode_free(a, o, self.space)
                except ValueError:
                    graph = None
            if graph is not None and check is not None and check(graph) is not None:
                graph = None
            graphs.append(graph)
        return graphs, exact

    def generate(
        self,
        key,
        n: int,
        predictor=None,
        guidance: float = 0.0,
        num_steps: int = 32,
        sampler: str = "heun",
        seen=(),
        check=None,
        **sampler_options,
    ) -> Generated:
        """Samples n graphs and keeps the valid, distinct ones whose canonical hash is not in
        `seen`; the fractions are of the n samples (valid), of the valid (unique) and of the
        distinct valid ones outside the training set and `seen` (novel)."""
        adjacency, onehot = self.sample(
            key, n, predictor, guidance, num_steps, sampler, **sampler_options
        )
        decoded, exact = self.decode(adjacency, onehot, check)
        decoded = [g for g in decoded if g is not None]
        distinct = {}
        for graph in decoded:
            distinct.setdefault(graph.canonical_hash(), graph)
        seen = set(seen)
        novel = [h for h in distinct if h not in self.train_hashes and h not in seen]
        return Generated(
            graphs=[g for h, g in distinct.items() if h not in seen],
            valid_fraction=len(decoded) / n,
            unique_fraction=len(distinct) / max(len(decoded), 1),
            novel_fraction=len(novel) / max(len(distinct), 1),
            exact_fraction=exact / n,
            samples=n,
        )

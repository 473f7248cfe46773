"""The network of the neural predictor: a small graph transformer over a continuous relaxation of
`KernelGraph.encode` arrays, conditioned on a diffusion noise level, plus the noise schedule that
its noise-aware training and a guided sampler share.

Glossary: M graphs, N nodes (the space's max_nodes), K op columns (input + primitives), H hidden
width, E ensemble members, t noise level in [0, 1] (t = 0: a clean encoding).

Why a relaxation: a predictor-guided diffusion sampler (DiffusionNAG, An et al. ICLR 2024) adds
lambda * grad_G log p(y | G_t) to the score at every step, so the predictor must be a smooth
function of a noisy, real-valued adjacency [M, N, N] and op weights [M, N, K]. Nothing here
thresholds or argmaxes; clipping to [0, 1] is the only kink, and inside (0, 1) it passes
gradients through.

Attention is masked by reachability, as DiffusionNAG's graph transformer does: node i may attend
to node j when a directed path joins them (either way) or i == j. The soft version is a noisy-OR
closure of the clipped, strictly upper-triangular adjacency (`soft_reachability`): exactly the 0/1
closure on a hard graph, smooth on a soft one. It enters as an additive bias log(mask + eps), so
it masks hard graphs (up to eps) and stays differentiable for soft ones. A node's presence (its op
row's mass, capped at 1) masks padded rows the same way, and weights the mean-pooled readout.

Node features (`KernelGraph.encode`'s third array) are not an input: every feature is a fixed
function of the node's op column except the output flag, which is the last present node; the
one-hot row and the position embedding already carry them, and the relaxation has no features.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

MASK_EPS = 1e-3  # log(1e-3) = -6.9: unreachable pairs keep ~0.1% of a reachable pair's weight


def vp_alpha_sigma(t, beta_min: float = 0.1, beta_max: float = 20.0):
    """(alpha(t), sigma(t)) of the variance-preserving SDE with a linear beta schedule
    (Song et al. ICLR 2021, eq. 33): x_t = alpha x_0 + sigma eps, alpha = exp(-1/4 t^2
    (beta_max - beta_min) - 1/2 t beta_min), sigma = sqrt(1 - alpha^2). The defaults are the
    paper's; at t = 1, alpha = 0.0066 (pure noise). Any shape of t."""
    t = jnp.asarray(t, jnp.float32)
    log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    alpha = jnp.exp(log_alpha)
    return alpha, jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


def soft_reachability(adjacency):
    """adjacency [M, N, N] (any reals) -> mask [M, N, N] in [0, 1]: I + R + R^T, where R[i, j]
    is a noisy-OR probability that a path leads from i to j when each edge i -> j (i < j) exists
    with probability clip(adjacency[i, j], 0, 1) independently. Path doubling,
    R <- 1 - (1 - R) prod_k (1 - R[i, k] R[k, j]), covers paths of length 2^s after s rounds,
    so log2(N) rounds suffice in a DAG. Hard graphs give the 0/1 transitive closure (to 1e-5);
    soft ones never saturate, so the gradient reaches every edge in (0, 1) (a capped sum of
    matrix powers would clip to 1 and stop it)."""
    n = adjacency.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), adjacency.dtype), k=1)
    reach = jnp.clip(adjacency, 0.0, 1.0) * upper  # [M, N, N]
    for _ in range(max(n - 2, 0).bit_length()):  # 2^s >= N - 1
        # The product in log space: jnp.prod's gradient (an associative scan) compiles slowly;
        # the 1e-6 keeps log finite where a hard path makes a factor exactly 0.
        pairs = reach[..., :, :, None] * reach[..., None, :, :]  # [M, N (i), N (k), N (j)]
        via = -jnp.expm1(jnp.log1p(-pairs * (1.0 - 1e-6)).sum(-2))
        reach = 1.0 - (1.0 - reach) * (1.0 - via)
    return reach + jnp.swapaxes(reach, -1, -2) + jnp.eye(n, dtype=adjacency.dtype)


def timestep_embedding(t, dim: int):
    """t [M] in [0, 1] -> [M, dim] sinusoids (Vaswani et al. 2017), t scaled by 1000 as DDPM's
    integer steps are, so the lowest frequencies resolve the whole interval."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half) / half)  # [dim / 2]
    angles = 1000.0 * t[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class GraphTransformer(nn.Module):
    """apply(params, adjacency [M, N, N], onehot [M, N, K], t [M]) -> predicted score [M].

    Pre-LayerNorm transformer blocks; the per-head attention bias is the reachability mask's log
    plus the key's presence's log, shared by every head (a hard mask, softened)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4

    @nn.compact
    def __call__(self, adjacency, onehot, t):
        m, n, _ = onehot.shape
        presence = jnp.clip(onehot.sum(-1), 0.0, 1.0)  # [M, N]
        bias = jnp.log(soft_reachability(adjacency) + MASK_EPS)  # [M, N, N]
        bias = bias + jnp.log(presence + MASK_EPS)[:, None, :]
        bias = jnp.broadcast_to(bias[:, None], (m, self.heads, n, n))  # [M, heads, N, N]

        # Nodes are in topological order, so the position is part of a node's identity.
        position = self.param("position", nn.initializers.normal(0.02), (n, self.hidden))
        noise = nn.Dense(self.hidden)(timestep_embedding(t, self.hidden))
        noise = nn.Dense(self.hidden)(nn.gelu(noise))  # [M, H]
        h = nn.Dense(self.hidden)(onehot) + position + noise[:, None]  # [M, N, H]
        for _ in range(self.layers):
            y = nn.LayerNorm()(h)
            h = h + biased_attention(y, bias, self.hidden, self.heads)
            y = nn.LayerNorm()(h)
            h = h + nn.Dense(self.hidden)(nn.gelu(nn.Dense(2 * self.hidden)(y)))
        weights = (presence + MASK_EPS) / (presence + MASK_EPS).sum(-1, keepdims=True)
        pooled = jnp.einsum("mn,mnh->mh", weights, nn.LayerNorm()(h))  # [M, H]
        pooled = nn.gelu(nn.Dense(self.hidden)(jnp.concatenate([pooled, noise], -1)))
        return nn.Dense(1)(pooled)[:, 0]


def biased_attention(x, bias, hidden: int, heads: int):
    """Multi-head self-attention of x [M, N, H] with an additive bias [M, heads, N, N], inside the
    calling module's compact `__call__` (its Dense layers are the caller's submodules); the
    predictor's and the generator's graph transformers share it."""
    m, n, _ = x.shape
    dim = hidden // heads  # D
    q, k, v = jnp.split(nn.Dense(3 * hidden)(x).reshape(m, n, 3 * heads, dim), 3, 2)
    logits = jnp.einsum("mihd,mjhd->mhij", q, k) / jnp.sqrt(dim) + bias
    out = jnp.einsum("mhij,mjhd->mihd", jax.nn.softmax(logits, -1), v)  # [M, N, heads, D]
    return nn.Dense(hidden)(out.reshape(m, n, hidden))


def ensemble_apply(model: nn.Module, params, adjacency, onehot, t):
    """Every member's prediction [E, M]; params are the members' trees stacked on axis 0."""
    return jax.vmap(lambda p: model.apply({"params": p}, adjacency, onehot, t))(params)


def ensemble_init(model: nn.Module, key, members: int, nodes: int, columns: int):
    """E independently initialised parameter trees, stacked on axis 0 (one vmapped init)."""
    adjacency = jnp.zeros((1, nodes, nodes), jnp.float32)
    onehot = jnp.zeros((1, nodes, columns), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    keys = jax.random.split(key, members)
    # Jitted: an eager vmapped init dispatches every op on its own (seconds on a CPU).
    return jax.jit(jax.vmap(lambda k: model.init(k, adjacency, onehot, t)["params"]))(keys)


def perturb(key, adjacency, onehot, t, beta_min: float = 0.1, beta_max: float = 20.0):
    """(adjacency_t, onehot_t): each graph noised at its own level t [M] by `vp_alpha_sigma`.
    Only the strictly upper triangle of the adjacency is noised: the rest is fixed at 0 by the
    encoding's topological order, and a sampler need not diffuse it."""
    alpha, sigma = vp_alpha_sigma(t, beta_min, beta_max)  # [M], [M]
    key_a, key_o = jax.random.split(key)
    n = adjacency.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), adjacency.dtype), k=1)
    noise_a = jax.random.normal(key_a, adjacency.shape) * upper
    noise_o = jax.random.normal(key_o, onehot.shape)
    adjacency_t = alpha[:, None, None] * adjacency + sigma[:, None, None] * noise_a
    onehot_t = alpha[:, None, None] * onehot + sigma[:, None, None] * noise_o
    return adjacency_t, onehot_t

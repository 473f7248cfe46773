"""SoTL-E: the sum of a candidate's training losses over the last E steps of a short training, a
cheap estimate of how well it trains (Ru et al., "Speedy Performance Estimation for Neural
Architecture Search", NeurIPS 2021, eq. 2). Scores here are "higher is better": minus that sum.

Glossary: M candidates, S training steps, E last steps summed, B images per step at full size
(B R / p at patch size p, as the trainer scales it), R resolution, p patch size, C channels,
N nodes, K one-hot columns, P images in the data pool, r LoRA rank.

`SotlTrainer.scores` trains M kernel graphs in ONE compiled program per patch size: every
candidate is the U-Net with a `TemplateKernel` bound to its encoding at every placeholder (the
pattern of `canvas_jax.batch`'s vmapped path), its trainable parameters and Adam states stacked
on a leading M axis, and the steps of a call run in one `lax.scan`. Every candidate sees the same
batches, crops, noise levels and noise (common random numbers), so differences in the scores are
the kernels'. `sotl_loop` trains one `canvas_jax.replace(config, graph)` model at a time with the
compiled kernel: the reference that the tests hold the batched scores to.

Steps run in calls of `steps_per_call` steps; each call draws one Patch Diffusion crop size from
`config.diffusion`'s schedule (a scan needs one shape), so a training of S steps compiles at most
one program per crop size and reuses them for every later batch of candidates.

What trains (a choice between cost and faithfulness):
- kernels: always, from the template's initialisation (the same draw for every candidate);
- the rest of the network (`train_rest`, default True): fully, as SoTL-E trains the whole
  network and as it must when the rest is itself untrained; or, with `lora_rank` r > 0, as a
  rank-r update W + A B of every Dense/Conv kernel outside the placeholders (Hu et al. 2022,
  "LoRA"; A ~ N(0, 1/fan_in), B = 0, biases and norms frozen), which keeps the M stacked
  optimizer states small when the rest comes from a trained model; or not at all
  (`train_rest=False`): only the kernels learn to fill the convolutions' role.

Distillation (`distill` = w in [0, 1]): the denoiser's target is (1 - w) x0 + w D_orig(x; sigma),
D_orig being the original model (`base_params`, plain convolutions) at the same noised input.
For the student this equals the loss (1 - w) |D - x0|^2 + w |D - D_orig|^2 up to a term that
does not depend on the student (w (1 - w) |x0 - D_orig|^2), so w = 1 is distillation instead of
the denoising loss, 0 < w < 1 both at once. D_orig, the posterior mean that the original
learned, is a lower-variance target than x0 at high noise, so short trainings rank kernels with
less noise when a trained original exists; without one, keep w = 0.
"""

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from canvas_jax.batch import candidate_params, kernel_params
from canvas_jax.graph import KernelGraph, Space
from canvas_jax.placeholders import get_placeholders, replace, slot_factory
from canvas_jax.sample import space_from_config
from canvas_jax.template import TemplateKernel
from nag.fields import check_fields, count, first_problem, number, positive, read_section
from patchdiff import xla_cpu
from patchdiff.diffusion import build as diffusion_build
from patchdiff.diffusion.losses import denoising_loss
from patchdiff.diffusion.precond import broadcast_to, denoise
from patchdiff.models import DTYPES, build_model
from patchdiff.train.step import training_inputs

BATCHINGS = ("vmap", "map", "compiled")


@dataclasses.dataclass(frozen=True)
class SotlSettings:
    """How a candidate is trained and scored; see the module docstring.

    batching: "vmap" runs the M candidates side by side (every template node evaluates every
    primitive and selects, the price of one program for all graphs; for accelerators), "map"
    runs them one after another inside the same compiled program (`lax.map`), so each node runs
    only its own primitive: same numbers, several times less work on a CPU. "compiled" trains
    each candidate's own compiled kernel (`sotl_loop`: a compile per candidate, then only its
    primitives): in the 23-placeholder Fashion-MNIST U-Net on a 2-core CPU a "map" step took
    ~10 s a candidate, a compiled one 0.3-1 s after a ~40 s compile.
    """

    steps: int = 60  # S
    last: int = 20  # E
    steps_per_call: int = 20  # steps per compiled scan; one crop size each
    batch_size: int = 32  # B, images per step at full resolution
    learning_rate: float = 1e-3
    grad_clip: float = 1.0  # global norm per candidate; 0 = off
    distill: float = 0.0  # w
    train_rest: bool = True
    lora_rank: int = 0  # r; 0 = the rest trains fully (if train_rest)
    batching: str = "vmap"
    candidates_per_call: int = 0  # M per compiled call (last call padded); 0 = all at once
    seed: int = 0

    def __post_init__(self):
        check_fields(self, _problem)

    @classmethod
    def from_config(cls, section, where: str = "nag.sotl") -> "SotlSettings":
        """From a config section (e.g. config.nag.sotl); ConfigError names `config.{where}.X`."""
        return read_section(cls, section, where, _problem)


def _problem(f: dict) -> tuple[str, object, str] | None:
    """The first (field, value, what is allowed) of SotlSettings fields `f` that is wrong."""

    steps = f["steps"]
    checks = (  # in order, each test run only when the ones before passed
        ("steps", lambda: count(steps, 1), "a positive integer"),
        ("last", lambda: count(f["last"], 1) and f["last"] <= steps, f"in 1..steps = {steps}"),
        (
            "steps_per_call",
            lambda: count(f["steps_per_call"], 1) and steps % f["steps_per_call"] == 0,
            f"a positive integer dividing steps = {steps}",
        ),
        ("batch_size", lambda: count(f["batch_size"], 1), "a positive integer"),
        ("learning_rate", lambda: positive(f["learning_rate"]), "a positive number"),
        ("grad_clip", lambda: f["grad_clip"] == 0 or positive(f["grad_clip"]), "0 or positive"),
        ("distill", lambda: number(f["distill"]) and 0 <= f["distill"] <= 1, "a number in [0, 1]"),
        ("train_rest", lambda: isinstance(f["train_rest"], bool), "True or False"),
        (
            "lora_rank",
            lambda: count(f["lora_rank"], 0) and (f["train_rest"] or f["lora_rank"] == 0),
            "a non-negative integer, and 0 when train_rest is False (nothing to adapt)",
        ),
        ("batching", lambda: f["batching"] in BATCHINGS, f"one of {', '.join(BATCHINGS)}"),
        ("candidates_per_call", lambda: count(f["candidates_per_call"], 0), "0 (all) or positive"),
        ("seed", lambda: count(f["seed"], 0), "a non-negative integer"),
    )
    return first_problem(checks, f)


@dataclasses.dataclass
class SotlResult:
    """scores [M] (minus the summed last-E losses; NaN for a candidate whose loss went
    non-finite), curves [M, S] (every step's loss), patch_sizes [S / steps_per_call]."""

    scores: np.ndarray
    curves: np.ndarray
    patch_sizes: list
    seconds: float


# -- pure pieces --------------------------------------------------------------------------------


def distillation_loss(
    net_fn, teacher_fn, key, x0, *, precond, sample_sigma, weighting, weight, **net_kwargs
):
    """Per-example loss [B] of x0 [B, H, W, C]: lambda(sigma) mean_pixels (D(x; sigma) - y)^2
    with y = (1 - weight) x0 + weight D_teacher(x; sigma), x = x0 + sigma n; sigma and n drawn
    as `losses.denoising_loss` draws them (the same key gives the same x), so weight = 0 is that
    loss exactly. The teacher's output is a constant of the student's gradient."""
    sigma_key, noise_key = jax.random.split(key)
    sigma = sample_sigma(sigma_key, x0.shape[:1])  # [B]
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x = x0 + broadcast_to(sigma, x0) * noise
    teacher = jax.lax.stop_gradient(denoise(teacher_fn, precond, x, sigma, **net_kwargs))
    target = (1.0 - weight) * x0 + weight * teacher
    denoised = denoise(net_fn, precond, x, sigma, **net_kwargs)
    squared = jnp.mean(jnp.square(denoised - target), axis=tuple(range(1, x0.ndim)))
    return weighting(sigma) * squared


def split_params(params, train_rest: bool, lora_rank: int, seed: int = 0):
    """(trainable, frozen): trainable = {"kernel": {path: leaf}, "rest": {path: leaf},
    "lora": {path: {"a": [fan_in, r], "b": [r, out]}}}, frozen = {path: leaf}; paths are
    "/"-joined. Kernel leaves are the placeholders' ("graph" in the path). LoRA factors: A drawn
    with numpy (seed), B zeros, so W + A B starts at W."""
    flat = traverse_util.flatten_dict(params, sep="/")
    kernel = {p: v for p, v in flat.items() if "graph" in p.split("/")}
    rest = {p: v for p, v in flat.items() if p not in kernel}
    trainable = {"kernel": kernel, "rest": {}, "lora": {}}
    if train_rest and lora_rank == 0:
        trainable["rest"] = rest
        return trainable, {}
    if train_rest:
        rng = np.random.default_rng(seed)
        for path, value in sorted(rest.items()):
            if path.endswith("/kernel") and np.ndim(value) >= 2:
                fan_in, out = int(np.prod(np.shape(value)[:-1])), np.shape(value)[-1]
                a = rng.normal(size=(fan_in, lora_rank)) / np.sqrt(fan_in)
                b = np.zeros((lora_rank, out))
                trainable["lora"][path] = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
    return trainable, rest


def merge_params(trainable, frozen):
    """The model's nested parameters from `split_params`' two halves (LoRA updates added)."""
    flat = {**frozen, **trainable["kernel"], **trainable["rest"]}
    for path, factors in trainable["lora"].items():
        base = flat[path]
        flat[path] = base + (factors["a"] @ factors["b"]).reshape(base.shape).astype(base.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def make_optimizer(settings: SotlSettings):
    """Adam at a constant rate, after per-candidate global-norm clipping if grad_clip > 0. Both
    act elementwise (or on the norm, to which zero gradients add nothing), so a template node
    the graph does not use keeps its initial parameters, as the compiled kernel never has them."""
    adam = optax.adam(settings.learning_rate)
    if settings.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(settings.grad_clip), adam)
    return adam


def make_loss(model, config, distill: float, teacher_model=None):
    """loss(params, teacher_params, batch, key, patch_size) -> scalar: the trainer's loss
    (`patchdiff.train.step.make_loss_fn`: random crops with coordinate channels, label dropout,
    the configured denoising loss), with the distillation target when distill > 0."""
    loss_kwargs = diffusion_build.build_loss_kwargs(config.diffusion, config.data.resolution)

    def loss_fn(params, teacher_params, batch, key, patch_size):
        net, images, kwargs, k_loss = training_inputs(config, model, params, batch, key, patch_size)
        if distill == 0:
            return jnp.mean(denoising_loss(net, k_loss, images, **loss_kwargs, **kwargs))

        def teacher(x_in, c_noise, **kw):
            return teacher_model.apply({"params": teacher_params}, x_in, c_noise, **kw)

        per_example = distillation_loss(
            net, teacher, k_loss, images, **loss_kwargs, weight=distill, **kwargs
        )
        return jnp.mean(per_example)

    return loss_fn


def train_steps(
    loss_fn,
    optimizer,
    patch_size,
    trainable,
    opt_state,
    frozen,
    teacher_params,
    images,
    labels,
    steps,
    key,
):
    """One candidate's steps in a `lax.scan`: images [T, B, R, R, C], labels [T, B], steps [T]
    (global step numbers; step s uses fold_in(key, s)) -> (trainable, opt_state, losses [T])."""

    def step(carry, inputs):
        trainable, opt_state = carry
        image, label, number = inputs
        batch = {"image": image, "label": label}
        step_key = jax.random.fold_in(key, number)

        def objective(t):
            return loss_fn(merge_params(t, frozen), teacher_params, batch, step_key, patch_size)

        loss, grads = jax.value_and_grad(objective)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), loss

    (trainable, opt_state), losses = jax.lax.scan(
        step, (trainable, opt_state), (images, labels, steps)
    )
    return trainable, opt_state, losses


# -- the plan: crops and batches of every step -----------------------------------------------


def check_data(data, config) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [P, R, R, C], labels int32 [P]) from data = {"image", "label"}."""
    if not isinstance(data, dict) or "image" not in data:
        raise ValueError('data: a dict {"image": [P, R, R, C] in [-1, 1], "label": [P]}.')
    images = np.asarray(data["image"], np.float32)
    r, c = config.data.resolution, config.data.channels
    if images.ndim != 4 or images.shape[1:] != (r, r, c) or len(images) < 1:
        raise ValueError(
            f"data['image']: [P, {r}, {r}, {c}] for config.data (resolution {r}, {c} channels) "
            f"with P >= 1; got {images.shape}."
        )
    labels = np.asarray(data.get("label", np.zeros(len(images))), np.int32)
    if labels.shape != (len(images),):
        raise ValueError(f"data['label']: one per image, [{len(images)}]; got {labels.shape}.")
    return images, labels


def plan(config, settings: SotlSettings, pool: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(patch size p, steps [T], pool indices [T, B R / p])] per call: a function of the seed
    only, so every candidate, batched or looped, sees the same crops and images."""
    schedule = diffusion_build.build_patch_schedule(config)
    resolution, t = config.data.resolution, settings.steps_per_call
    calls = []
    for call in range(settings.steps // t):
        size = schedule.draw(np.random.default_rng([settings.seed, call, 7]))
        batch = settings.batch_size * (resolution // size)
        steps = np.arange(call * t, (call + 1) * t)
        indices = np.stack(
            [np.random.default_rng([settings.seed, s]).integers(pool, size=batch) for s in steps]
        )
        calls.append((size, steps.astype(np.int32), indices))
    return calls


def _check_graphs(graphs, config, space) -> list[KernelGraph]:
    graphs = list(graphs)
    if not graphs:
        raise ValueError("graphs: at least one KernelGraph to score; got none.")
    placeholders = get_placeholders(config)
    if not placeholders:
        raise ValueError(
            "SoTL-E: config.model.placeholders declares no placeholders; name ('conv1',) or "
            "('conv0', 'conv1')."
        )
    for index, graph in enumerate(graphs):
        if not isinstance(graph, KernelGraph):
            raise ValueError(f"graphs[{index}]: a KernelGraph; got {type(graph).__name__}.")
        for slot in placeholders:
            try:
                graph.validate(channels=slot.channels, space=space)
            except ValueError as err:
                raise ValueError(f"graphs[{index}] is not in the search space: {err}") from None
    return graphs


def _score(curves: np.ndarray, last: int) -> np.ndarray:
    finite = np.isfinite(curves).all(axis=1)
    return np.where(finite, -curves[:, -last:].sum(axis=1), np.nan)


# -- batched ------------------------------------------------------------------------------------


class SotlTrainer:
    """SoTL-E of kernel graphs in `config`'s U-Net, many per compiled program.

    base_params: parameters of `build_model(config)` (a trained original, or fresh ones): the
    rest of every candidate starts from them, the kernels from template parameters (numpy,
    settings.seed), and with distill > 0 they are the teacher. Compiled programs are kept, so
    later calls with as many candidates reuse them. space: the graphs' space (default
    `space_from_config(config)`; a search may restrict its primitives).
    """

    def __init__(self, config, base_params, settings: SotlSettings, space: Space | None = None):
        if not isinstance(settings, SotlSettings):
            raise ValueError(f"settings: a SotlSettings; got {type(settings).__name__}.")
        self.config, self.settings = config, settings
        self.space = space or space_from_config(config)
        if not get_placeholders(config):
            _check_graphs([None], config, self.space)  # raises the placeholder sentence
        self.base_params = base_params
        self.params = kernel_params(config, base_params, self.space, seed=settings.seed)
        self.trainable, self.frozen = split_params(
            self.params, settings.train_rest, settings.lora_rank, settings.seed
        )
        self.optimizer = make_optimizer(settings)
        self.teacher_params = base_params if settings.distill > 0 else {}
        self._programs: dict = {}
        self._init = jax.jit(jax.vmap(self.optimizer.init))  # one compile, not one per leaf

    def _program(self, patch_size: int):
        if patch_size in self._programs:
            return self._programs[patch_size]
        config, settings, space = self.config, self.settings, self.space
        dtype = DTYPES[config.model.dtype]
        teacher_model = build_model(config) if settings.distill > 0 else None

        def one(adjacency, onehot, trainable, opt_state, frozen, teacher, *data):
            # nn.remat: the backward pass recomputes one placeholder's template at a time, so
            # the node carries of all placeholders are never alive together (as batch.py does).
            make = lambda name: nn.remat(TemplateKernel)(  # noqa: E731
                space, dtype, adjacency, onehot, name=name
            )
            model = build_model(config, conv3x3=slot_factory(config, make))
            loss_fn = make_loss(model, config, settings.distill, teacher_model)
            return train_steps(
                loss_fn, self.optimizer, patch_size, trainable, opt_state, frozen, teacher, *data
            )

        def program(adjacency, onehot, trainable, opt_state, frozen, teacher, *data):
            if settings.batching == "vmap":
                shared = (None,) * (2 + len(data))
                return jax.vmap(one, in_axes=(0, 0, 0, 0, *shared))(
                    adjacency, onehot, trainable, opt_state, frozen, teacher, *data
                )
            return jax.lax.map(
                lambda own: one(*own, frozen, teacher, *data),
                (adjacency, onehot, trainable, opt_state),
            )

        self._programs[patch_size] = xla_cpu.jit(program, donate_argnums=(2, 3))
        return self._programs[patch_size]

    def scores(self, graphs, data) -> SotlResult:
        """SoTL-E of `graphs` trained on data = {"image": [P, R, R, C] in [-1, 1], "label": [P]}
        (batches drawn from the pool by `plan`)."""
        if self.settings.batching == "compiled":
            return sotl_loop(
                graphs, self.config, self.base_params, data, self.settings, space=self.space
            )
        start = time.perf_counter()
        graphs = _check_graphs(graphs, self.config, self.space)
        images, labels = check_data(data, self.config)
        calls = plan(self.config, self.settings, len(images))
        count = len(graphs)
        group = self.settings.candidates_per_call or count
        graphs = graphs + graphs[:1] * (-count % group)  # padding repeats the first candidate
        encodings = [g.encode(self.space) for g in graphs]
        adjacency = np.stack([e[0] for e in encodings])
        onehot = np.stack([e[1] for e in encodings])
        key = jax.random.PRNGKey(self.settings.seed)
        curves = []
        for first in range(0, len(graphs), group):

            def stacked(tree):
                return jax.tree.map(
                    lambda a: jnp.array(np.broadcast_to(a, (group, *a.shape))), tree
                )

            trainable = stacked(self.trainable)
            opt_state = self._init(trainable)
            losses = []
            for patch_size, steps, indices in calls:
                trainable, opt_state, loss = self._program(patch_size)(
                    adjacency[first : first + group],
                    onehot[first : first + group],
                    trainable,
                    opt_state,
                    self.frozen,
                    self.teacher_params,
                    images[indices],
                    labels[indices],
                    steps,
                    key,
                )
                losses.append(np.asarray(loss))  # [group, T]
            curves.append(np.concatenate(losses, axis=1))
        curves = np.concatenate(curves)[:count]
        return SotlResult(
            scores=_score(curves, self.settings.last),
            curves=curves,
            patch_sizes=[size for size, _, _ in calls],
            seconds=time.perf_counter() - start,
        )


# -- one candidate at a time --------------------------------------------------------------------


def sotl_loop(
    graphs, config, base_params, data, settings: SotlSettings, space: Space | None = None
) -> SotlResult:
    """The per-candidate reference: for each graph, `canvas_jax.replace(config, graph)` with the
    compiled kernel, its parameters taken from the same template draw, trained on the same plan
    by the same step function, jitted anew per graph (so per-candidate compilation included)."""
    start = time.perf_counter()
    space = space or space_from_config(config)
    graphs = _check_graphs(graphs, config, space)
    images, labels = check_data(data, config)
    calls = plan(config, settings, len(images))
    params = kernel_params(config, base_params, space, seed=settings.seed)
    optimizer = make_optimizer(settings)
    teacher_model = build_model(config) if settings.distill > 0 else None
    teacher_params = base_params if settings.distill > 0 else {}
    key = jax.random.PRNGKey(settings.seed)
    curves = []
    for graph in graphs:
        model = replace(config, graph)
        loss_fn = make_loss(model, config, settings.distill, teacher_model)
        own = candidate_params(graph, params, config)
        trainable, frozen = split_params(
            own, settings.train_rest, settings.lora_rank, settings.seed
        )
        opt_state = optimizer.init(trainable)
        run = xla_cpu.jit(
            lambda *args, f=loss_fn: train_steps(f, optimizer, *args), static_argnums=0
        )
        losses = []
        for patch_size, steps, indices in calls:
            trainable, opt_state, loss = run(
                patch_size,
                trainable,
                opt_state,
                frozen,
                teacher_params,
                images[indices],
                labels[indices],
                steps,
                key,
            )
            losses.append(np.asarray(loss))
        curves.append(np.concatenate(losses))
    curves = np.stack(curves)
    return SotlResult(
        scores=_score(curves, settings.last),
        curves=curves,
        patch_sizes=[size for size, _, _ in calls],
        seconds=time.perf_counter() - start,
    )

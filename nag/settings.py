"""The kernel search's settings: config.nag and its sections (generator, predictor, sotl,
finetune), read and checked once at the edge (`read_settings`); see
ml_collections_configs/kernel_search_fashion_mnist.py for every field and its default.
"""

import dataclasses

from canvas_jax.graph import Space
from canvas_jax.primitives import DEFAULT_OPS
from canvas_jax.sample import Constraints, kernel_shapes, space_from_config
from nag.fields import check_fields, count, first_problem, number, positive, read_section
from nag.sotl import SotlSettings
from patchdiff import config as config_lib
from patchdiff.config import ConfigError
from patchdiff.sampling import SAMPLERS

# Proxies that score_candidates batches (params and flops are host-side baselines).
SEARCH_PROXIES = ("grad_norm", "jacov", "naswot", "snip", "synflow")
# How a round picks what to evaluate: "predictor" (the generator and the sampler propose, the
# predictor or the proxy ranks) or "random" (CANVAS's random search: the sampler's draws, in
# draw order; no generator, proxy or predictor).
RANKS = ("predictor", "random")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """config.nag's own fields; see ml_collections_configs/kernel_search_fashion_mnist.py."""

    budget: int = 64
    seconds: float = 0.0
    proposals: int = 128
    sampled_fraction: float = 0.25
    per_round: int = 8
    kappa: float = 0.5
    min_fit: int = 8
    proxy: str = "jacov"
    proxy_images: int = 16
    proxy_sigma: float = 1.0
    pool: int = 4096
    ops: tuple = ()
    seed: int = 0
    rank: str = "predictor"
    prior: str = ""

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        check_fields(self, _search_problem)


def _search_problem(f):
    ops = f["ops"]
    return first_problem(
        (
            ("budget", lambda: count(f["budget"], 1), "a positive number of evaluations"),
            ("seconds", lambda: number(f["seconds"]) and f["seconds"] >= 0, "0 (none) or more"),
            ("proposals", lambda: count(f["proposals"], 1), "a positive integer"),
            ("sampled_fraction", lambda: _fraction(f["sampled_fraction"]), "a number in [0, 1]"),
            ("per_round", lambda: count(f["per_round"], 1), "a positive integer"),
            ("kappa", lambda: number(f["kappa"]) and f["kappa"] >= 0, "a number >= 0"),
            ("min_fit", lambda: count(f["min_fit"], 2), "an integer >= 2 (a fit needs two)"),
            ("proxy", lambda: f["proxy"] in SEARCH_PROXIES, f"one of {', '.join(SEARCH_PROXIES)}"),
            ("proxy_images", lambda: count(f["proxy_images"], 2), "an integer >= 2"),
            ("proxy_sigma", lambda: positive(f["proxy_sigma"]), "a positive number"),
            ("pool", lambda: count(f["pool"], 1), "a positive number of images"),
            (
                "ops",
                lambda: isinstance(ops, (tuple, list)) and set(ops) <= set(DEFAULT_OPS),
                "() (all primitives) or a tuple of names among " + ", ".join(DEFAULT_OPS),
            ),
            ("seed", lambda: count(f["seed"], 0), "a non-negative integer"),
            ("rank", lambda: f["rank"] in RANKS, f"one of {', '.join(RANKS)}"),
            ("prior", lambda: isinstance(f["prior"], str), "'' (none) or a path to a .jsonl file"),
        ),
        f,
    )


def _fraction(value) -> bool:
    return number(value) and 0 <= value <= 1


@dataclasses.dataclass(frozen=True)
class GeneratorSettings:
    """config.nag.generator: `nag.generator.GraphDiffusion`'s size, fit and sampling."""

    enabled: bool = True
    train_graphs: int = 2048
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    steps: int = 2000
    batch_size: int = 128
    num_steps: int = 32
    sampler: str = "heun"
    guidance: float = 1.0

    def __post_init__(self):
        check_fields(self, _generator_problem)


def _generator_problem(f):
    heads = f["heads"]
    return first_problem(
        (
            ("enabled", lambda: isinstance(f["enabled"], bool), "True or False"),
            ("train_graphs", lambda: count(f["train_graphs"], 2), "an integer >= 2"),
            ("hidden", lambda: count(f["hidden"], 2), "an integer >= 2"),
            ("layers", lambda: count(f["layers"], 1), "a positive integer"),
            (
                "heads",
                lambda: count(heads, 2) and f["hidden"] % heads == 0,
                f"an integer >= 2 dividing hidden = {f['hidden']}",
            ),
            ("steps", lambda: count(f["steps"], 1), "a positive integer"),
            ("batch_size", lambda: count(f["batch_size"], 1), "a positive integer"),
            ("num_steps", lambda: count(f["num_steps"], 1), "a positive integer"),
            ("sampler", lambda: f["sampler"] in SAMPLERS, f"one of {', '.join(SAMPLERS.names())}"),
            ("guidance", lambda: number(f["guidance"]) and f["guidance"] >= 0, "a number >= 0"),
        ),
        f,
    )


@dataclasses.dataclass(frozen=True)
class PredictorSettings:
    """config.nag.predictor: the `NeuralPredictor` ensemble."""

    hidden: int = 32
    layers: int = 2
    heads: int = 4
    members: int = 5
    steps: int = 300

    def __post_init__(self):
        check_fields(self, _predictor_problem)


def _predictor_problem(f):
    return first_problem(
        (
            ("hidden", lambda: count(f["hidden"], 1), "a positive integer"),
            ("layers", lambda: count(f["layers"], 1), "a positive integer"),
            (
                "heads",
                lambda: count(f["heads"], 1) and f["hidden"] % f["heads"] == 0,
                f"a positive integer dividing hidden = {f['hidden']}",
            ),
            ("members", lambda: count(f["members"], 2), "an integer >= 2 (an ensemble)"),
            ("steps", lambda: count(f["steps"], 1), "a positive integer"),
        ),
        f,
    )


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """config.nag.finetune: steps and learning rate of both fine-tunes, and the held-out set."""

    steps: int = 2000
    lr: float = 1e-3
    eval_examples: int = 2000
    eval_batch: int = 250
    from_scratch: bool = True  # also train the winner's network from scratch, like the original

    def __post_init__(self):
        check_fields(self, _finetune_problem)


def _finetune_problem(f):
    return first_problem(
        (
            ("steps", lambda: count(f["steps"], 1), "a positive integer"),
            ("lr", lambda: positive(f["lr"]), "a positive number"),
            ("eval_examples", lambda: count(f["eval_examples"], 1), "a positive integer"),
            ("from_scratch", lambda: isinstance(f["from_scratch"], bool), "True or False"),
            (
                "eval_batch",
                lambda: count(f["eval_batch"], 1) and f["eval_batch"] <= f["eval_examples"],
                f"a positive integer up to eval_examples = {f['eval_examples']}",
            ),
        ),
        f,
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    search: SearchSettings
    generator: GeneratorSettings
    predictor: PredictorSettings
    sotl: SotlSettings
    finetune: FinetuneSettings


# config.nag's sub-sections: name -> (settings class, its problem function)
SECTIONS = {
    "generator": (GeneratorSettings, _generator_problem),
    "predictor": (PredictorSettings, _predictor_problem),
    "finetune": (FinetuneSettings, _finetune_problem),
}


def read_settings(config) -> Settings:
    """Validates `config` (the model, data, kernel_search and nag sections) and unpacks
    config.nag; the first bad field stops with one ConfigError sentence naming it."""
    config_lib.validate(config)
    if "nag" not in config:
        raise ConfigError(
            "config.nag is missing: a kernel search config defines it (see "
            "ml_collections_configs/kernel_search_fashion_mnist.py)."
        )
    if not tuple(config.model.placeholders):
        raise ConfigError(
            "config.model.placeholders = () is not allowed: the search needs convolutions to "
            "replace, names among ('conv0', 'conv1')."
        )
    Constraints.from_config(config, kernel_shapes(config))  # kernel_search.* fields
    nag = config.nag
    own = {k: nag[k] for k in nag.keys() if k not in (*SECTIONS, "sotl")}
    parts = {"search": read_section(SearchSettings, own, "nag", _search_problem)}
    for name, (cls, problem) in SECTIONS.items():
        parts[name] = read_section(cls, nag.get(name, {}), f"nag.{name}", problem)
    parts["sotl"] = SotlSettings.from_config(nag.get("sotl", {}), "nag.sotl")
    return Settings(**parts)


def search_space(config, settings: SearchSettings) -> Space:
    """config.kernel_search's space, restricted to `settings.ops` when it names any."""
    space = space_from_config(config)
    return Space(ops=settings.ops, max_nodes=space.max_nodes) if settings.ops else space

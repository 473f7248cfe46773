"""Reading and checking settings dataclasses from config sections: every bad field stops with
one sentence that names it (`config.nag.sotl.steps = 0 is not allowed: it must be ...`) and what
is allowed. Shared by `nag.sotl` and `nag.settings`.

A problem function maps a dict of fields to the first (field, value, what is allowed) that is
wrong, or None; `first_problem` builds one from ordered (field, test, allowed) checks.
"""

import dataclasses

import numpy as np

from patchdiff.config import ConfigError


def check_fields(settings, problem_fn) -> None:
    """Raises ValueError naming the first field of a settings dataclass that `problem_fn`
    (fields dict -> (field, value, what is allowed) or None) refuses."""
    bad = problem_fn(dataclasses.asdict(settings))
    if bad:
        name = type(settings).__name__
        raise ValueError(f"{name}.{bad[0]} = {bad[1]!r} is not allowed: it must be {bad[2]}.")


def read_section(cls, section, where: str, problem_fn):
    """The dataclass `cls` from a config section: unset fields keep their defaults; an unknown
    or refused field stops with one ConfigError sentence naming `config.{where}.{field}`."""
    given = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in given:
        if name not in known:
            raise ConfigError(
                f"config.{where}.{name} is not a known field; known: {', '.join(sorted(known))}."
            )
    fields = {name: given.get(name, f.default) for name, f in known.items()}
    bad = problem_fn(fields)
    if bad:
        raise ConfigError(
            f"config.{where}.{bad[0]} = {bad[1]!r} is not allowed: it must be {bad[2]}."
        )
    return cls(**fields)


def first_problem(checks, fields: dict) -> tuple[str, object, str] | None:
    """The first (field, value, allowed) of checks ((field, test() -> bool, allowed), ...)
    whose test fails, or None."""
    for field, ok, allowed in checks:
        if not ok():
            return field, fields[field], allowed
    return None


def count(value, low: int) -> bool:
    """An int (not a bool) of at least `low`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def positive(value) -> bool:
    return number(value) and value > 0

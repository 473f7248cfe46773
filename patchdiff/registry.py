"""Name -> component registries, so that configs choose components by string.

An unknown name fails with one sentence that lists the known names (STYLE.md, item 4).
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of components; `kind` names what it holds in error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice.")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str, field: str | None = None) -> T:
        """The entry called `name`; `field` is the config field it came from, for the error."""
        if name not in self._entries:
            where = f"{field} = {name!r}" if field else repr(name)
            raise ValueError(
                f"{where} is not a known {self.kind}; known: {', '.join(self.names())}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

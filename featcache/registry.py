"""One small registry helper shared by backbones, dataset readers, augmentations, fusions and losses.

An entry is declared where the thing is defined (timm's `@register_model`):

    FUSIONS = Registry("fusion")

    @FUSIONS.register("film")
    class FiLMHead(FusionHead): ...

`names()` lists the entries in registration order (what `list_*()` returns), `get(name)` returns one or
raises `UnknownName` (a ValueError, so CLI commands report it as a user mistake) that lists the valid names,
as open_clip's `list_pretrained()` does. There is no default entry and no fallback: an unknown name is an error.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class UnknownName(ConfigError):
    """A name that is not in a registry; the message lists the valid ones."""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for messages: "backbone", "fusion", "loss", ...
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: the decorated class or function is the entry."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownName(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

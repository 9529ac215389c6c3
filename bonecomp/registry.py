"""One registry type for every extension point.

Loss terms, TTA views, architectures, validation metrics, sample fields, trackers,
preprocessing steps, clean-up rules and fold stratifiers are each a ``Registry``: a
dict of name -> entry with one way to register (a call or a decorator), look up, list,
and word an unknown name. A config key that names entries takes its allowed values from
the registry (``bonecomp.checks`` asks ``Registry.get`` / ``check``), never from a second
list, so a name a user registers from a module under ``extensions:`` is valid everywhere
the built-in ones are (docs/extending.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar, overload

from bonecomp.config import ConfigError

T = TypeVar("T")

_LIVE: weakref.WeakSet[Registry] = weakref.WeakSet()  # every registry, for ``restore_point``


class Registry(Generic[T]):
    """Named entries of one kind (``kind``: "loss term"), chosen by the config key ``key``
    ("loss.terms"); names are case-insensitive when ``fold_case`` (architectures)."""

    def __init__(self, kind: str, key: str, *, fold_case: bool = False) -> None:
        self.kind, self.key, self.fold_case = kind, key, fold_case
        self._entries: dict[str, T] = {}
        _LIVE.add(self)

    def _norm(self, name: str) -> str:
        return name.lower() if self.fold_case else name

    @overload
    def register(
        self, name: str, entry: None = None, *, replace: bool = False
    ) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T, *, replace: bool = False) -> T: ...

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """Add ``entry`` as ``name``: ``register(name, entry)``, or ``@register(name)`` over
        it; returns the entry. A name already registered is refused (``ValueError``: a
        programming error, raised at import) unless ``replace=True``."""

        def add(e: T) -> T:
            key = self._norm(name)
            if not isinstance(name, str) or not name:
                raise ValueError(f"{self.kind}: a name must be a non-empty string, got {name!r}")
            if key in self._entries and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True)")
            self._entries[key] = e
            return e

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry)."""
        self._entries.pop(self._norm(name), None)

    def get(self, name: str, key: str | None = None) -> T:
        """The entry ``name``; an unknown one is a ``ConfigError`` naming ``key`` (default
        the registry's config key) and the valid names."""
        try:
            return self._entries[self._norm(name)]
        except (KeyError, AttributeError, TypeError):
            raise self.unknown(name, key) from None

    def check(self, names: Iterable[str], key: str | None = None) -> None:
        """``ConfigError`` for the first unknown name of ``names``; ``key`` gets the list
        index appended (``train.trackers[1]``) when it names a list."""
        for i, name in enumerate(names):
            if name not in self:
                raise self.unknown(name, f"{key or self.key}[{i}]")

    def unknown(self, name: object, key: str | None = None) -> ConfigError:
        """The one wording of an unknown name: ``<key>: unknown <kind> 'x'; valid: a, b``."""
        key = key or self.key
        return ConfigError(
            f"{key}: unknown {self.kind} {name!r}; valid: {', '.join(self.names())}", key
        )

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._norm(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.key!r}: {', '.join(self._entries)})"


def restore_point() -> Callable[[], None]:
    """The entries of every registry as they are now; calling the result puts them back
    (tests that register temporary entries, or import an extension module, undo it so)."""
    saved = [(reg, dict(reg._entries)) for reg in list(_LIVE)]

    def restore() -> None:
        for reg, entries in saved:
            reg._entries = dict(entries)

    return restore

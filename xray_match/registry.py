"""Name -> object registries: ``RECIPES`` (one :class:`~xray_match.train.recipe.Recipe` per
method) and ``SPACES`` (Tune search spaces, ``fn(cfg) -> {"dotted.key": ray.tune domain}``).

A module registers with ``@RECIPES.register("rdan")`` / ``@SPACES.register("rdan")``; ``grep -r
'RECIPES.register'`` finds them all. The built-in recipes are known by name without importing
them (:data:`xray_match.recipes.BUILTIN`): checking a config's ``model.name`` imports nothing, and
looking a recipe up imports its module only (torch comes with it).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


def _builtin() -> dict[str, str]:
    from xray_match.recipes import BUILTIN

    return BUILTIN


class Registry(Generic[T]):
    """``by_name``: the built-in map's keys are this registry's names (RECIPES), so one module is
    imported per lookup; otherwise (SPACES) a miss imports every built-in module."""

    def __init__(self, kind: str, by_name: bool):
        self.kind = kind
        self.by_name = by_name
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def _import_builtin(self, name: str | None) -> None:
        """Import the built-in module that registers ``name`` (every built-in module for None, or
        when names are not keys of the built-in map)."""
        builtin = _builtin()
        if self.by_name and name is not None:
            modules = [builtin[name]] if name in builtin else []
        else:
            modules = sorted(set(builtin.values()))
        for module in modules:
            importlib.import_module(module)

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._import_builtin(name)
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        if self.by_name:
            return sorted(set(self._entries) | set(_builtin()))
        self._import_builtin(None)
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self.names()


RECIPES: Registry[Any] = Registry("recipe", by_name=True)
SPACES: Registry[Callable[..., Any]] = Registry("search space", by_name=False)

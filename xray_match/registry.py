"""Name -> object registries: ``RECIPES`` (one :class:`~xray_match.train.recipe.Recipe` per
method) and ``SPACES`` (Tune search spaces, ``fn(cfg) -> {"dotted.key": ray.tune domain}``).

A module registers with ``@RECIPES.register("rdan")`` / ``@SPACES.register("rdan")``; ``grep -r
'RECIPES.register'`` finds them all. Recipes are known by name without importing them: each is an
entry point of the group ``xray_match.recipes`` (``name = "module"``: the built-in ones in
``pyproject.toml``, and any other installed package may add its own), read from the installed
package metadata. Checking a config's ``model.name`` therefore imports nothing, and looking a
recipe up imports its module only (torch comes with it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")

#: the entry-point group that names the recipes: ``name = "module that registers it"``
RECIPE_GROUP = "xray_match.recipes"


@functools.cache
def recipe_modules() -> dict[str, str]:
    """Recipe name -> the module that registers it, from the installed entry points (the package
    metadata only: no recipe is imported). Empty when the package is not installed (``uv sync``)."""
    out: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=RECIPE_GROUP):
        if out.setdefault(ep.name, ep.module) != ep.module:
            raise KeyError(f"recipe {ep.name!r} is named by two installed entry points of {RECIPE_GROUP!r}: "
                           f"{out[ep.name]} and {ep.module}")
    return out


class Registry(Generic[T]):
    """``by_name``: the names of :func:`recipe_modules` are this registry's names (RECIPES), so one
    module is imported per lookup; otherwise (SPACES) a miss imports every recipe module."""

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

    def _import_recipes(self, name: str | None) -> None:
        """Import the recipe module that registers ``name`` (every recipe module for None, or when
        names are not recipe names)."""
        known = recipe_modules()
        if self.by_name and name is not None:
            modules = [known[name]] if name in known else []
        else:
            modules = sorted(set(known.values()))
        for module in modules:
            importlib.import_module(module)

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._import_recipes(name)
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            hint = "" if recipe_modules() else f"; no {RECIPE_GROUP} entry points: install the package (uv sync)"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known}{hint})") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        if self.by_name:
            return sorted(set(self._entries) | set(recipe_modules()))
        self._import_recipes(None)
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self.names()


RECIPES: Registry[Any] = Registry("recipe", by_name=True)
SPACES: Registry[Callable[..., Any]] = Registry("search space", by_name=False)

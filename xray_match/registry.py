"""Name -> builder registries.

A method (moco, rdan, grounding, dspe) plugs into the shared loop by registering a
:class:`~xray_match.train.recipe.Recipe` under its name; ``grep -r 'RECIPES.register'``
finds them all. Models and losses have registries of their own so that a recipe can
swap one of them by config without a code change.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        _import_builtin()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        _import_builtin()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _import_builtin()
        return name in self._entries


MODELS: Registry[Callable[..., Any]] = Registry("model")
LOSSES: Registry[Callable[..., Any]] = Registry("loss")
RECIPES: Registry[Any] = Registry("recipe")
#: Tune search spaces: ``fn(cfg) -> {"dotted.key": ray.tune domain}``
SPACES: Registry[Callable[..., Any]] = Registry("search space")

_BUILTIN_LOADED = False


def _import_builtin() -> None:
    """Import the modules that register the built-in methods (lazily: torch is heavy)."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import importlib

    for mod in ("xray_match.recipes",):
        importlib.import_module(mod)

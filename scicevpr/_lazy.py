"""Attributes of a package that import their module on first use (PEP 562), so that importing
the package (``import scicevpr``, the command line's ``--help``) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, exports: dict[str, tuple[str, str]], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports[name] = (submodule, attribute)``; any
    other name that is a submodule is imported as such. The value is cached in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            module, attribute = exports[name]
            value = getattr(importlib.import_module(f"{package}.{module}"), attribute)
        elif not name.startswith("_"):
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise  # a submodule that exists but lacks a dependency
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    return __getattr__

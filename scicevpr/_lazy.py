"""Attributes of a package that import their module on first use (PEP 562), so that importing
the package (``import scicevpr``, the command line's ``--help``) does not import torch."""

from __future__ import annotations

import dis
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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


def moved_attributes(module: str, moves: dict[str, tuple[str, ...]], removed: dict[str, str] | None = None,
                     fallback: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` whose names moved: ``moves[new_module]`` are the
    names now in ``new_module`` (``"old=new"`` where the name changed too). Each still imports
    from the old place, with one DeprecationWarning naming the new one. A name in ``removed`` raises
    AttributeError with its entry, what to use instead (ImportError in ``from module import
    name``, where Python would replace an AttributeError's message with "cannot import name");
    any other name goes to ``fallback``."""
    where = {old: (new_module, new or old) for new_module, names in moves.items()
             for old, _, new in (n.partition("=") for n in names)}  # old name -> (module, name there)

    def __getattr__(name: str) -> Any:
        caller = sys._getframe(1)
        if name in where:
            new_module, new = where[name]
            if caller.f_code.co_name != "_handle_fromlist":  # import's probe before ``from package import name``
                warnings.warn(f"{module}.{name} moved to {new_module}.{new}; import it from there.",
                              DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(new_module), new)
        if removed and name in removed:
            message = f"{module}.{name} was removed: {removed[name]}"
            if _runs_import_from(caller):  # Python turns an AttributeError there into "cannot import name"
                raise ImportError(message, name=module)
            raise AttributeError(message)
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def _runs_import_from(frame) -> bool:
    """Whether ``frame`` is executing ``from module import name`` (the opcode at its last instruction)."""
    code = frame.f_code.co_code
    return 0 <= frame.f_lasti < len(code) and code[frame.f_lasti] == dis.opmap.get("IMPORT_FROM")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module's old name as its new module (one object under both names)."""

    def __init__(self, moved: dict[str, str]) -> None:
        self.moved = moved

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in self.moved else None

    def create_module(self, spec):
        new = self.moved[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there.", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the new module is already executed


def install_moved_modules(moved: dict[str, str]) -> None:
    """Let ``import old`` give the module now at ``moved[old]`` (once per process)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder(moved))  # before any finder that might find a stale copy

"""The package's layout: the method in ``scicevpr/``, the offline world in ``scicevpr/offline/``,
the notebooks' helpers in ``scicevpr/lab/``. The method imports neither wing; the command line,
search, index and hub sit beside it; old module names still import, as the new module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scicevpr"
WINGS = ("offline", "lab")
BESIDE = ("cli", "search", "index", "hub")  # the applications beside the method, allowed to use the wings


def _imports(path: Path) -> set[str]:
    """Absolute names of the scicevpr modules that ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    else:
        package = package.rsplit(".", 1)[0] if package.endswith(".__init__") else package
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "scicevpr" or n.startswith("scicevpr.")}


def _core_modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if p.relative_to(PACKAGE).parts[0] not in WINGS and p.stem not in BESIDE]


def test_the_method_imports_no_wing_and_no_application():
    bad = {}
    for path in _core_modules():
        wrong = sorted(n for n in _imports(path) if any(n == f"scicevpr.{w}" or n.startswith(f"scicevpr.{w}.")
                                                        for w in (*WINGS, *BESIDE)))
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = wrong
    assert not bad, f"core modules importing the wings or the applications: {bad}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule above can fail: a core module that imports the lab is caught."""
    fake = tmp_path / "scicevpr"
    (fake / "lab").mkdir(parents=True)
    (fake / "fusion.py").write_text("from .lab.viz import plot\nfrom . import pooling\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _imports(fake / "fusion.py") >= {"scicevpr.lab.viz", "scicevpr.lab.viz.plot"}
    with pytest.raises(AssertionError, match="fusion.py"):
        test_the_method_imports_no_wing_and_no_application()


@pytest.mark.parametrize("old", ["scicevpr.notebook", "scicevpr.viz", "scicevpr.data.synthetic", "scicevpr.pretrain",
                                 "scicevpr.offline_models", "scicevpr.claims"])
def test_an_old_module_name_imports_the_moved_module_with_a_warning(old):
    import importlib

    from scicevpr import MOVED_MODULES

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {MOVED_MODULES[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED_MODULES[old])


def test_importing_the_package_and_the_method_changes_no_environment_variable():
    """The package's own imports set nothing. Its dependencies are imported first: importing
    torchvision sets ``TORCHINDUCTOR_CACHE_DIR`` (torch's inductor cache), which the test would
    otherwise see only when no earlier test of the session had imported torchvision."""
    code = ("import os, sys\nimport torch, torchvision, numpy, pandas, faiss\nbefore = dict(os.environ)\n"
            "import scicevpr, scicevpr.models, scicevpr.evaluate, scicevpr.train\n"
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
            "sys.exit(f'changed: {sorted(changed)}' if changed else 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("old, new, name", [
    ("scicevpr.evaluate", "scicevpr.stability", "batch_stability"),  # the batch-stability sweep
    ("scicevpr.evaluate", "scicevpr.lab.baselines", "pixel_baseline_result"),  # the floors without learning
    ("scicevpr.evaluate", "scicevpr.lab.analysis", "informative_recall_values"),  # the notebooks' choice of N
    ("scicevpr.config", "scicevpr.offline.config", "OFFLINE_BACKBONE"),  # the offline world's model and recipe
    ("scicevpr.train", "scicevpr.offline.config", "offline_train_config"),
    ("scicevpr.train", "scicevpr.runtime", "is_main_process"),  # the process helpers
    ("scicevpr.backbone", "scicevpr.weights", "file_sha256"),  # the weight files
    ("scicevpr.evaluate", "scicevpr.offline.cache", "BackboneCache"),
    ("scicevpr.offline.pretrain", "scicevpr.offline.objectives", "koleo_loss"),  # the pretraining's parts
    ("scicevpr.offline.pretrain", "scicevpr.offline.augment", "random_masks"),
    ("scicevpr.lab.notebook", "scicevpr.weights", "weights_record"),
    ("scicevpr.data", "scicevpr.offline.synthetic", "generate"),
])
def test_a_moved_name_imports_from_its_old_module_with_a_warning(old, new, name):
    import importlib

    before, after = importlib.import_module(old), importlib.import_module(new)
    with pytest.warns(DeprecationWarning, match=rf"{old}.{name} moved to {new}.{name}"):
        value = getattr(before, name)
    assert value is getattr(after, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        before.no_such_name  # noqa: B018


# Names of the package before the layout that no longer import, each with the reason.
REMOVED_NAMES = {
    ("scicevpr.config", "PretrainConfig"): "one import path for each config class: scicevpr.offline.config",
    ("scicevpr.config", "ClaimsConfig"): "one import path for each config class: scicevpr.offline.config",
    ("scicevpr.evaluate", "BACKBONE_CACHE"): "module state: a BackboneCache is created and passed as cache=",
    ("scicevpr.evaluate", "feature_extractor"): "it read BACKBONE_CACHE",
    ("scicevpr.evaluate", "pixel_baseline_recall"): "one baseline function: pixel_baseline_result(...).recalls",
    ("scicevpr.cli", "WIDGET_VIEW"): "the command line's helpers; its interface is its commands and flags",
    ("scicevpr.cli", "require_folders"): "the command line's helpers; its interface is its commands and flags",
    ("scicevpr.cli", "strip_widget_state"): "the command line's helpers; its interface is its commands and flags",
}


def _names_before_layout() -> list[tuple[str, str]]:
    lines = (Path(__file__).parent / "names_before_layout.txt").read_text().splitlines()
    return [tuple(line.split()) for line in lines if line and not line.startswith("#")]


def test_every_name_of_the_package_before_the_layout_still_imports():
    """Every public name each module had before the layout imports from its old module (moved
    ones with a DeprecationWarning), except the removed ones listed above; those of the library
    say in the error what to use instead."""
    import importlib
    import warnings

    names = _names_before_layout()
    assert len(names) > 500 and set(REMOVED_NAMES) <= set(names)
    missing = []
    for module, name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                getattr(importlib.import_module(module), name)
            except AttributeError as e:
                if (module, name) not in REMOVED_NAMES:
                    missing.append(f"{module}.{name}")
                elif module != "scicevpr.cli":
                    assert f"{module}.{name} was removed: " in str(e)
            else:
                assert (module, name) not in REMOVED_NAMES, f"{module}.{name} imports: take it off REMOVED_NAMES"
    assert not missing, f"no longer import from their old module: {missing}"


def test_from_import_of_a_removed_name_says_what_to_use_and_a_moved_name_warns_once():
    """``from scicevpr.config import PretrainConfig`` (a module) and ``from scicevpr.evaluate import
    BACKBONE_CACHE`` raise ImportError with the reason, not Python's bare "cannot import name";
    ``from scicevpr.data import generate`` (a package, which import probes with ``hasattr`` first)
    warns once, at the caller's line."""
    import warnings

    for module, name, fix in [("scicevpr.config", "PretrainConfig", "import it from scicevpr.offline.config"),
                              ("scicevpr.evaluate", "BACKBONE_CACHE", "create a scicevpr.offline.cache.BackboneCache")]:
        with pytest.raises(ImportError, match=rf"{module}.{name} was removed: .*{fix}"):
            exec(f"from {module} import {name}", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("from scicevpr.data import generate", "user_cell.py", "exec"), {})
    moved = [w for w in caught if "scicevpr.data.generate moved to" in str(w.message)]
    assert [w.filename for w in moved] == ["user_cell.py"], [(w.filename, str(w.message)) for w in caught]


def test_a_renamed_name_and_the_fallback_of_a_package():
    """``scicevpr.data.SYNTHETIC_PRESETS`` is ``scicevpr.offline.synthetic.PRESETS`` and
    ``scicevpr.checkpoint.build_model`` is ``create_model``, each with the warning naming the new
    name; the package's own names still load lazily without a warning."""
    import warnings

    import scicevpr.checkpoint
    import scicevpr.data
    from scicevpr.data.vg import VGSplit
    from scicevpr.factory import create_model
    from scicevpr.offline.synthetic import PRESETS

    moved = r"scicevpr.data.SYNTHETIC_PRESETS moved to scicevpr.offline.synthetic.PRESETS"
    with pytest.warns(DeprecationWarning, match=moved):
        assert scicevpr.data.SYNTHETIC_PRESETS is PRESETS
    with pytest.warns(DeprecationWarning, match=r"checkpoint.build_model moved to scicevpr.factory.create_model"):
        assert scicevpr.checkpoint.build_model is create_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scicevpr.data.VGSplit is VGSplit
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        scicevpr.data.no_such_name  # noqa: B018


def _module_level_instances(path: Path, package_classes: set[str]) -> list[str]:
    """Module-level assignments in ``path`` whose value is an instance of a class of the package
    (``CACHE = BackboneCache()``), frozen configurations (dataclasses with ``frozen=True``) left out."""
    found = []
    for node in ast.parse(path.read_text()).body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.Call):
            name = value.func.id if isinstance(value.func, ast.Name) else getattr(value.func, "attr", "")
            if name in package_classes:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)[:80]}")
    return found


def _mutable_package_classes() -> set[str]:
    """Every class defined in the package that is not a frozen dataclass."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                frozen = any(isinstance(d, ast.Call) and any(k.arg == "frozen" and getattr(k.value, "value", False)
                                                             for k in d.keywords) for d in node.decorator_list)
                if not frozen:
                    names.add(node.name)
    return names


def test_the_method_holds_no_module_level_object():
    """No object of the package lives at module level in the method (the backbone cache was
    ``evaluate.BACKBONE_CACHE``; now its user creates one and passes it as ``cache=``)."""
    classes = _mutable_package_classes()
    assert "BackboneCache" in classes and "BackboneConfig" not in classes
    found = [f for path in _core_modules() for f in _module_level_instances(path, classes)]
    assert not found, f"module-level objects in the method: {found}"


def test_the_object_check_can_fail(tmp_path):
    fake = tmp_path / "scicevpr"
    fake.mkdir()
    (fake / "evaluate.py").write_text("class Cache:\n    pass\n\n\nCACHE = Cache()\nSIZES = (1, 2)\n")
    global PACKAGE
    real, PACKAGE = PACKAGE, fake
    try:
        assert _module_level_instances(fake / "evaluate.py", _mutable_package_classes()) == ["evaluate.py:5 CACHE = Cache()"]
    finally:
        PACKAGE = real


_MUTATING_METHODS = {"add", "append", "clear", "discard", "extend", "insert", "pop", "popitem", "remove",
                     "setdefault", "update"}


def _module_state_written_by_functions(path: Path) -> list[str]:
    """Names bound at module level in ``path`` that a function rebinds (``global``) or changes in
    place (``NAME.add(...)``, ``NAME[k] = ...``, ``del NAME[k]``): state that one call leaves for
    the next. Constants (``PRESETS``, tables) are read, never written, and pass."""
    tree = ast.parse(path.read_text())
    module_names = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    found = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                found.update(f"global {n}" for n in node.names)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATING_METHODS
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in module_names):
                found.add(f"{node.func.value.id}.{node.func.attr}()")
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                found.update(f"{t.value.id}[...]" for t in targets
                             if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in module_names)
    return sorted(f"{path.relative_to(PACKAGE)}: {f}" for f in found)


def test_no_function_of_the_method_writes_module_level_state():
    """What a call leaves behind lives in an object its caller holds, never in the module: a
    failed download, for one, is not remembered by ``scicevpr.weights`` for the next call."""
    found = [f for path in _core_modules() for f in _module_state_written_by_functions(path)]
    assert not found, f"module-level state written by functions of the method: {found}"


def test_the_module_state_check_can_fail(tmp_path):
    module = tmp_path / "scicevpr" / "weights.py"
    module.parent.mkdir()
    module.write_text("FAILED: set[str] = set()\nTABLE = {'a': 1}\nCOUNT = 0\n\n\n"
                      "def resolve(url):\n    global COUNT\n    FAILED.add(url)\n    return TABLE['a']\n\n\n"
                      "def forget(url):\n    del FAILED[url]\n")
    global PACKAGE
    real, PACKAGE = PACKAGE, tmp_path / "scicevpr"
    try:
        assert _module_state_written_by_functions(module) == [
            "weights.py: FAILED.add()", "weights.py: FAILED[...]", "weights.py: global COUNT"]
    finally:
        PACKAGE = real


def test_every_section_of_the_method_a_docstring_cites_exists():
    """The docstrings cite ``docs/method.md, "Section", step N``: the file, each section and each step
    named must be there for a reader who follows the reference."""
    import re

    method = (PACKAGE.parent / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## (.+)$", method, flags=re.M))
    cited = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for m in re.finditer(r'docs/method\.md(?:, "([^"]+)"(?:, step (\d+))?)?', path.read_text()):
            cited.append((path.name, m.group(1), m.group(2)))
    assert len(cited) >= 10, cited  # the method's modules cite it
    for name, section, step in cited:
        assert section is None or section in sections, f"{name} cites the section {section!r}; docs/method.md has {sorted(sections)}"
        if step is not None:
            body = method.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
            assert re.search(rf"^{step}\. \*\*", body, flags=re.M), f"{name} cites {section!r} step {step}, which is not there"

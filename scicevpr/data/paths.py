"""Where things live: the data root, the weights folder variable and the repository itself.

One environment variable each, never a hard-coded absolute path. The notebooks' switch, the
figures and the command line all take their folders from here.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SCICEVPR_DATA"
"""Environment variable naming the root folder of all datasets (real and synthetic)."""

WEIGHTS_ENV = "SCICEVPR_WEIGHTS"
"""Environment variable naming a folder of DINOv2 weight files (``weights="auto"`` looks there first)."""

DEFAULT_DATA_DIR = "data"
"""Used when ``SCICEVPR_DATA`` is unset: ``data/`` relative to the working directory."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$SCICEVPR_DATA``, else ``./data``.

    Nothing is checked here; readers check the folders they need when they use them.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path(DEFAULT_DATA_DIR)


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The scicevpr repository: the first folder holding a ``pyproject.toml`` that names the
    project, walking up from ``start`` (default: the working directory), else the folder above
    the installed package. Notebooks run with the working directory ``notebooks/`` under
    Jupyter and nbval, and the repository root under other runners: both resolve here."""
    here = Path(start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[2]]
    for d in candidates:
        py = d / "pyproject.toml"
        if py.is_file() and 'name = "scicevpr"' in py.read_text(errors="ignore"):
            return d
    raise FileNotFoundError(
        f"no scicevpr repository above {str(here)!r} (a folder with the project's pyproject.toml). "
        "Start Jupyter (or the command) inside the repository (`make lab`)."
    )


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
"""What a folder of the user's own photos may hold (any case): ``search``, ``index``, ``extract``,
``eval --pca-images``. A dataset of the VG benchmark holds ``.jpg`` files (``data.vg.list_images``'s default)."""

"""Where datasets live: one environment variable, never a hard-coded absolute path."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SCICEVPR_DATA"
"""Environment variable naming the root folder of all datasets (real and synthetic)."""

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

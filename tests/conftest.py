"""Data fixtures shared by the tests: tiny image folders in the real layouts, and the ``tiny``
synthetic benchmark generated once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_jpeg(path: Path, size=(64, 48), seed: int = 0, quality: int = 90) -> Path:
    """A small deterministic JPEG (smooth colours plus texture) at ``path``; returns the path."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)[None, None, :] * (0.5 + 0.5 * np.sin(xx / rng.uniform(3, 9) + yy / rng.uniform(3, 9)))[..., None]
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality)
    return path


@pytest.fixture
def make_jpeg():
    return write_jpeg


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """The ``tiny`` synthetic benchmark (about a second to generate), shared by the session."""
    from scicevpr.offline.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "tiny", preset="tiny", seed=0, progress=False)


@pytest.fixture
def quiet_random_weights():
    """Silence the random-backbone warning (``usefixtures`` it in modules that build many random models)."""
    import warnings

    from scicevpr.backbone import RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


@pytest.fixture
def cache():
    """A fresh :class:`scicevpr.offline.cache.BackboneCache` of 256 MiB, for a test to pass as ``cache=``."""
    from scicevpr.offline.cache import BackboneCache

    return BackboneCache(2**28)

"""Baselines without learning: the floors a learned descriptor must beat on a split.

Raw pixels (:func:`pixel_descriptors`: each image shrunk to a thumbnail) and hue histograms in
vertical strips (:func:`colour_histogram_descriptors`: which colours lie left, ahead and right),
each scored through the same exact search and Recall@N as every model
(:func:`scicevpr.evaluate.score`), so that a floor has intervals and a chance level like the
models. Notebooks 01 and 05 show them beside the models
(:func:`scicevpr.lab.analysis.pixel_baseline_row`, :func:`~scicevpr.lab.analysis.colour_baseline_row`);
they are not part of SciceVPR.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from ..config import EvalConfig
from ..data.decode import load_rgb
from ..data.vg import VGSplit
from ..evaluate import EvalResult, score

PathLike = str | os.PathLike


def pixel_descriptors(paths: Sequence[PathLike], thumb: int = 32, grayscale: bool = False) -> np.ndarray:
    """(N, thumb * thumb * channels) float32 descriptors: each image bilinearly shrunk to
    ``thumb`` x ``thumb`` pixels, values in [0, 1]."""
    out = []
    for p in paths:
        im = load_rgb(p).convert("L" if grayscale else "RGB").resize((thumb, thumb), Image.BILINEAR)
        out.append(np.asarray(im, dtype=np.float32).ravel() / 255.0)
    return np.stack(out)


def pixel_baseline_result(split: VGSplit, thumb: int = 32, grayscale: bool = False,
                          recall_values: Sequence[int] = (1, 5, 10)) -> EvalResult:
    """Raw pixels (:func:`pixel_descriptors`) scored through the same exact
    :func:`~scicevpr.evaluate.search` and :func:`~scicevpr.evaluate.recall_at_n` as every model
    (:func:`~scicevpr.evaluate.score`): an :class:`EvalResult`, so the floor any
    learned descriptor must beat has intervals and a chance level like the models."""
    db, q = pixel_descriptors(split.database_paths, thumb, grayscale), pixel_descriptors(split.query_paths, thumb, grayscale)
    name = f"raw pixels {thumb}x{thumb}{' grey' if grayscale else ''} (baseline)"
    return score(None, split, db, q, EvalConfig(recall_values=tuple(recall_values)), name=name)


def colour_histogram_descriptors(paths: Sequence[PathLike], strips: int = 6, bins: int = 12, thumb: int = 64,
                                 min_saturation: float = 0.15) -> np.ndarray:
    """(N, strips * bins) float32 descriptors of colour layout without any learning: each image
    shrunk to ``thumb`` x ``thumb`` pixels and cut into ``strips`` vertical strips (left to right);
    per strip, the histogram of hue (HSV, ``bins`` bins over the colour wheel) of the pixels whose
    saturation exceeds ``min_saturation`` (grey road, sky haze and night are left out), L1-normalised
    and square-rooted (so L2 distances are Hellinger distances). A strip without a coloured pixel
    is all zeros. It sees which colours lie left, ahead and right, not where edges are, so it
    survives the small shifts of viewpoint that defeat raw pixels, not the changes of light."""
    if strips < 1 or bins < 1 or thumb < strips:
        raise ValueError(f"strips={strips}, bins={bins}, thumb={thumb}: need strips, bins >= 1 and thumb >= strips")
    edges = np.linspace(0, thumb, strips + 1).round().astype(int)
    out = []
    for p in paths:
        hsv = np.asarray(load_rgb(p).resize((thumb, thumb), Image.BILINEAR).convert("HSV"), dtype=np.float32) / 255.0
        parts = []
        for a, b in zip(edges[:-1], edges[1:]):
            strip = hsv[:, a:b].reshape(-1, 3)  # (thumb * width, 3) H, S, V in [0, 1]
            hue = strip[strip[:, 1] > min_saturation, 0]
            hist = np.histogram(hue, bins=bins, range=(0.0, 1.0))[0].astype(np.float32)  # (bins,)
            parts.append(np.sqrt(hist / max(hist.sum(), 1.0)))
        out.append(np.concatenate(parts))
    return np.stack(out)


def colour_baseline_result(split: VGSplit, strips: int = 6, bins: int = 12,
                           recall_values: Sequence[int] = (1, 5, 10)) -> EvalResult:
    """Hue histograms in vertical strips (:func:`colour_histogram_descriptors`) scored like every
    model (:func:`~scicevpr.evaluate.score`). A second floor beside raw pixels: on the synthetic
    benchmark, whose facades are flat colours, it measures how far colour layout alone identifies
    a place."""
    db = colour_histogram_descriptors(split.database_paths, strips, bins)
    q = colour_histogram_descriptors(split.query_paths, strips, bins)
    name = f"hue histograms, {strips} strip{'' if strips == 1 else 's'} (baseline)"
    return score(None, split, db, q, EvalConfig(recall_values=tuple(recall_values)), name=name)


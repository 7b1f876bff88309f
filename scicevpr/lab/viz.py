"""Plots for the notebooks: every figure of the project is drawn here.

Conventions (checked by ``tests/test_viz.py``):

- every panel that has axes has a title and labelled axes, with units where they apply
  (pixels, %, images, epochs); image panels have a title and no axes;
- every figure that depends on a model or on data carries a label saying which weights and
  which data produced it (:func:`stamp`; ``label=`` of each plotting function), e.g.
  "random DINOv2 backbone (offline), synthetic data";
- no legend covers a bar or a value label (:func:`legend_overlaps`): legends of bar charts sit
  outside the axes;
- :func:`save_figure` writes ``figures/NN_<name>.png`` at the repository root with fixed DPI
  and no timestamp or version metadata, so that the same data give the same file.

Nothing here computes model outputs; the numbers come from :mod:`scicevpr.evaluate`,
:mod:`scicevpr.stability` and the measurements of :mod:`scicevpr.lab.analysis` (an explorer that
needs new ones is given a function that computes them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle
from PIL import Image

FIGURE_NAME = re.compile(r"^\d\d_[a-z0-9][a-z0-9_]*$")
DPI = 100
CORRECT_COLOUR = "#1a9850"  # green frame: a true positive (within the radius)
WRONG_COLOUR = "#d73027"  # red frame: a false positive
QUERY_COLOUR = "#4575b4"
_LABEL_ATTR = "_scicevpr_label"
_IMAGE_PANEL_ATTR = "_scicevpr_image_panel"


# ---------------------------------------------------------------------------------------------
# style, labels, saving
# ---------------------------------------------------------------------------------------------


def set_style() -> None:
    """The notebooks' plotting style: white grid, readable fonts, fixed DPI."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    matplotlib.rcParams.update({
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
        "axes.titleweight": "bold",
        "axes.titlesize": 11,
        "figure.titlesize": 12,
        "image.interpolation": "nearest",
    })


def stamp(fig: plt.Figure, label: str | None) -> plt.Figure:
    """Write ``label`` (which weights and which data made the figure) in the figure's bottom
    right corner, once, wrapped to the figure's width. A figure built on a randomly initialised
    backbone must carry it."""
    if not label:
        return fig
    old = getattr(fig, _LABEL_ATTR, None)
    if old is not None:
        if old[0] == label:
            return fig
        old[1].remove()
    # wrap=True: a label wider than the figure breaks into lines instead of widening the saved canvas
    text = fig.text(0.995, 0.003, label, ha="right", va="bottom", fontsize=8, color="0.3", style="italic", wrap=True)
    setattr(fig, _LABEL_ATTR, (label, text))
    return fig


def figure_label(fig: plt.Figure) -> str | None:
    """The label stamped on ``fig``, or None."""
    old = getattr(fig, _LABEL_ATTR, None)
    return None if old is None else old[0]


def missing_labels(fig: plt.Figure) -> list[str]:
    """Descriptions of what a figure lacks: an axes panel without title, x label or y label
    (image panels and panels with their axis turned off need only a title, which the figure's
    title may provide; colour bars are exempt). Empty when the figure is complete."""
    problems = []
    colorbars = {getattr(getattr(im, "colorbar", None), "ax", None) for ax in fig.axes for im in ax.images + ax.collections}
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    for i, ax in enumerate(fig.axes):
        if ax in colorbars or ax.get_label() == "<colorbar>" or not ax.get_visible():
            continue
        name = ax.get_title() or ax.get_title(loc="left") or f"panel {i}"
        if not (ax.get_title() or ax.get_title(loc="left") or suptitle):
            problems.append(f"panel {i}: no title")
        if ax.axison and not getattr(ax, _IMAGE_PANEL_ATTR, False):
            if not ax.get_xlabel():
                problems.append(f"{name}: no x label")
            if not ax.get_ylabel():
                problems.append(f"{name}: no y label")
    return problems


def legend_overlaps(fig: plt.Figure) -> list[str]:
    """Descriptions of what a legend of ``fig`` covers: a bar (a patch of a bar chart) or a text
    (a value label) of any panel, compared by their window extents on the figure's renderer
    (Agg). Empty when every legend is clear of them."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [(f"legend of {ax.get_title() or f'panel {i}'!r}", ax.get_legend()) for i, ax in enumerate(fig.axes)]
    legends += [(f"figure legend {i}", leg) for i, leg in enumerate(fig.legends)]
    problems = []
    for where, leg in legends:
        if leg is None or not leg.get_visible():
            continue
        box = leg.get_window_extent(renderer)
        for i, ax in enumerate(fig.axes):
            bars = [p for c in ax.containers for p in getattr(c, "patches", ()) if p is not None]
            for kind, artists in (("bar", bars), ("text", ax.texts)):
                for a in artists:
                    if not a.get_visible() or (kind == "text" and not a.get_text()):
                        continue
                    ext = a.get_window_extent(renderer)
                    if np.all(np.isfinite(ext.get_points())) and ext.width * ext.height > 0 and box.overlaps(ext):
                        name = a.get_text() if kind == "text" else a.get_label()
                        problems.append(f"{where} covers a {kind} of panel {i} ({name!r})")
    return problems


def figures_dir() -> Path:
    """``<repository>/figures`` (created on demand)."""
    from ..data.paths import find_repo_root

    return find_repo_root() / "figures"


def save_figure(
    fig: plt.Figure,
    name: str,
    label: str | None = None,
    folder: str | os.PathLike | None = None,
    check: bool = True,
) -> Path:
    """Save ``fig`` as ``<folder>/<name>.png`` (default folder: ``figures/`` at the repository
    root) and return the path.

    Args:
        name: ``NN_<name>``: the notebook number and a lower-case name, e.g. ``"03_stability"``.
        label: stamped on the figure first (see :func:`stamp`).
        check: raise if a panel lacks a title or axis labels (:func:`missing_labels`).

    The file has a fixed DPI (100) and no timestamp or software metadata: re-running a
    notebook on the same data rewrites the same bytes.
    """
    name = name[:-4] if name.endswith(".png") else name
    if not FIGURE_NAME.match(name):
        raise ValueError(f"figure name {name!r} must look like 'NN_some_name' (notebook number, lower case, "
                         f"underscores), e.g. '03_stability'.")
    folder = Path(folder) if folder is not None else figures_dir()
    return save_png(fig, folder / f"{name}.png", label, check)


def save_png(fig: plt.Figure, path: str | os.PathLike, label: str | None = None, check: bool = True) -> Path:
    """Save ``fig`` at ``path`` (any name; the folder is created) as :func:`save_figure` does:
    stamped with ``label``, checked for titles and axis labels, fixed DPI, no metadata."""
    path = Path(path)
    stamp(fig, label)
    if check:
        problems = missing_labels(fig)
        if problems:
            raise ValueError(f"figure {path.stem!r} is incomplete: {'; '.join(problems)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15, metadata={"Software": None})
    return path


def save_table(table: pd.DataFrame, name: str, label: str | None = None, title: str | None = None,
               folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``table`` as ``<name>.csv`` and ``<name>.md`` (a Markdown table preceded by its title
    and its label) into ``figures/``; returns both paths. Recalls with ``R@N lo`` / ``R@N hi``
    columns stay numbers in the CSV and are written "11.4 [8.8, 14.2]" in the Markdown
    (:func:`format_recalls`)."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / f"{name}.csv", folder / f"{name}.md"
    table.to_csv(csv_path, index=False, lineterminator="\n")
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    if label:
        lines += [f"_{label}_", ""]
    has_intervals = any(f"{c} lo" in table for c in recall_columns(table))
    lines.append(markdown_table(format_recalls(table) if has_intervals else table))
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    cols = [str(c) for c in table.columns]
    rows = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        rows.append("| " + " | ".join(fmt(v) for v in r.tolist()) + " |")
    return "\n".join(rows)


def recall_columns(table: pd.DataFrame) -> list[str]:
    """The ``R@N`` columns of ``table`` in order (not their ``lo`` / ``hi`` companions)."""
    return [c for c in table.columns if re.fullmatch(r"R@\d+", str(c))]


def format_recalls(table: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """A copy of ``table`` for display: each ``R@N`` with ``R@N lo`` / ``R@N hi`` columns
    (:meth:`scicevpr.evaluate.EvalResult.table` with ``intervals=True``) becomes one text column
    "11.4 [8.8, 14.2]" (the recall and its 95% bootstrap interval over queries); the ``lo`` /
    ``hi`` columns are dropped. ``R@N`` without an interval are written with ``decimals``."""
    out = table.copy()
    for c in recall_columns(table):
        lo, hi = f"{c} lo", f"{c} hi"
        if lo in table and hi in table:
            out[c] = [f"{v:.{decimals}f} [{a:.{decimals}f}, {b:.{decimals}f}]"
                      for v, a, b in zip(table[c], table[lo], table[hi])]
            out = out.drop(columns=[lo, hi])
        else:
            out[c] = table[c].map(lambda v: f"{v:.{decimals}f}")
    return out


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def to_display(x) -> np.ndarray:
    """A normalised image tensor (3, S, S) (or batch (N, 3, S, S)) -> (S, S, 3) / (N, S, S, 3)
    floats in [0, 1] for ``imshow``."""
    from ..data.transforms import denormalize

    return denormalize(x.detach().float().cpu()).movedim(-3, -1).numpy()


def read_thumbnail(path: str | os.PathLike, size: int = 112) -> np.ndarray:
    """An image file as (size, size, 3) uint8 (hard resize, as the evaluation does)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


def _image_panel(ax, image, title: str | None = None, frame: str | None = None, lw: float = 4.0) -> None:
    """Show an image without ticks; a coloured frame when ``frame`` is given. Image panels
    need a title (or the figure's) but no axis labels (:func:`missing_labels`)."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(frame is not None)
        if frame is not None:
            s.set_edgecolor(frame)
            s.set_linewidth(lw)
    if title is not None:
        ax.set_title(title, fontsize=9, fontweight="normal")
    setattr(ax, _IMAGE_PANEL_ATTR, True)


# ---------------------------------------------------------------------------------------------
# notebook 01: multi-layer DINOv2 features
# ---------------------------------------------------------------------------------------------


def pca_rgb(features, clip: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """PCA-to-RGB maps: (N, C, H, W) patch features -> (N, H, W, 3) colours in [0, 1].

    One PCA is fitted on all N * H * W patch vectors together, so the same colour means the
    same feature direction in every image. Each of the first 3 principal components
    (:func:`scicevpr.evaluate.principal_components`, exact, float64) becomes a colour channel,
    scaled between its ``clip`` percentiles. Deterministic (signs fixed so that each component's
    largest loading is positive).
    """
    from ..evaluate import principal_components

    f = np.asarray(features.detach().float().cpu() if hasattr(features, "detach") else features, dtype=np.float64)
    if f.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) features, got shape {f.shape}")
    n, c, h, w = f.shape
    x = f.transpose(0, 2, 3, 1).reshape(-1, c)  # (N, C, H, W) -> (N*H*W, C)
    mean, comps, _ = principal_components(x, 3)
    x = x - mean
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
    y = x @ comps.T  # (N*H*W, 3)
    lo, hi = np.percentile(y, clip[0], axis=0), np.percentile(y, clip[1], axis=0)
    y = np.clip((y - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    if y.shape[1] < 3:
        y = np.pad(y, ((0, 0), (0, 3 - y.shape[1])))
    return y.reshape(n, h, w, 3)


def plot_layer_pca(images: np.ndarray, layer_maps: Mapping[int, np.ndarray], fused: Sequence[int] = (),
                   captions: Sequence[str] | None = None, label: str | None = None,
                   title: str | None = None) -> plt.Figure:
    """Rows: images; columns: the image, then one PCA-to-RGB map per DINOv2 block.

    Args:
        images: (N, S, S, 3) in [0, 1].
        layer_maps: block index (0-based) -> (N, H, W, 3) from :func:`pca_rgb`.
        fused: blocks fused by SciceVPR (their column titles are marked).
        captions: one per image, shown above it.
    """
    layers = list(layer_maps)
    n = images.shape[0]
    fig, axes = plt.subplots(n, 1 + len(layers), figsize=(1.7 * (1 + len(layers)), 1.85 * n + 0.6), squeeze=False)
    for i in range(n):
        _image_panel(axes[i, 0], images[i], captions[i] if captions is not None else ("input" if i == 0 else None))
        for j, layer in enumerate(layers):
            t = f"block {layer}" + (" (fused)" if layer in fused else "") if i == 0 else None
            _image_panel(axes[i, 1 + j], layer_maps[layer][i], t)
    fig.suptitle(title or "DINOv2 patch features per block, first 3 principal components as RGB")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_layer_similarity(matrix: np.ndarray | Mapping[str, np.ndarray], layers: Sequence[int], fused: Sequence[int] = (),
                          label: str | None = None, title: str | None = None) -> plt.Figure:
    """Heat map of a layer-by-layer similarity (linear CKA, 0 to 1) of patch features; a mapping
    name -> matrix draws one panel per backbone, side by side, on the same colour scale."""
    panels = dict(matrix) if isinstance(matrix, Mapping) else {None: matrix}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 0.6, 5.2), squeeze=False)
    ticks = [f"{l}*" if l in fused else str(l) for l in layers]
    for ax, (name, m) in zip(axes[0], panels.items()):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(layers)), ticks)
        ax.set_yticks(range(len(layers)), ticks)
        ax.grid(False)
        if len(layers) <= 14:
            for i in range(len(layers)):
                for j in range(len(layers)):
                    v = m[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5 if len(layers) > 6 else 10,
                            color="white" if v < 0.6 else "black")
        ax.set_xlabel("block (* fused by SciceVPR)")
        ax.set_ylabel("block (* fused by SciceVPR)")
        if name is not None:
            ax.set_title(name, fontsize=10)
    fig.suptitle(title or "Similarity of patch features between blocks (linear CKA)")
    fig.subplots_adjust(left=0.08 / len(panels) ** 0.5, right=0.86, bottom=0.14, top=0.86, wspace=0.35)
    cb = fig.colorbar(im, cax=fig.add_axes((0.89, 0.14, 0.02, 0.72)))
    cb.set_label("linear CKA (1 = same representation)")
    return stamp(fig, label)


def plot_layer_recall(table: pd.DataFrame, metric: str = "R@1", highlight: Sequence[str] = (),
                      label: str | None = None, title: str | None = None, chance: float | None = None,
                      baselines: Mapping[str, float] | None = None) -> plt.Figure:
    """Bars of Recall@N for descriptors built from single blocks and from fused blocks.

    ``table``: columns ``features`` (bar name) and ``metric`` (percent); with a ``backbone``
    column, one bar per backbone in each group (e.g. random and pretrained side by side);
    with ``<metric> lo`` / ``<metric> hi`` columns, their interval as an error bar.
    ``chance``: the Recall@N of a random ranking, drawn dashed. ``baselines``: name -> the
    Recall@N of a descriptor without a backbone (e.g. raw pixels), each drawn dotted. The legend
    sits outside the axes, clear of the bars and their values.
    """
    groups = list(dict.fromkeys(table["backbone"])) if "backbone" in table else [None]
    features = list(dict.fromkeys(table["features"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(features) * len(groups) + 2.5), 4.0))
    width = 0.8 / len(groups)
    palettes = [("#91bfdb", "#4575b4"), ("#fee090", "#fc8d59"), ("#d9f0d3", "#5aae61")]
    top = 5.0
    labels = []
    for k, g in enumerate(groups):
        t = table if g is None else table[table["backbone"] == g]
        t = t.set_index("features").reindex(features)
        vals = t[metric].astype(float).values
        plain, strong = palettes[k % len(palettes)]
        colours = [strong if f in highlight else "#bdbdbd" if "baseline" in f else plain for f in features]
        x = np.arange(len(features)) + (k - (len(groups) - 1) / 2) * width
        err = None
        if f"{metric} lo" in t and f"{metric} hi" in t:
            err = np.vstack([vals - t[f"{metric} lo"].astype(float).values, t[f"{metric} hi"].astype(float).values - vals])
            top = max(top, float(np.nanmax(t[f"{metric} hi"].astype(float))))
        bars = ax.bar(x, vals, width, color=colours, edgecolor="0.3", yerr=err, capsize=2,
                      error_kw={"lw": 0.8, "ecolor": "0.3"}, label=g)
        labels.append((bars, vals, vals if err is None else vals + err[1]))  # values go above their error bars
        top = max(top, float(np.nanmax(vals)))
    for bars, vals, tops in labels:
        for b, v, y in zip(bars, vals, tops):
            ax.text(b.get_x() + b.get_width() / 2, y + 0.02 * top, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="0.4", ls="--", lw=1.0, label=f"random ranking ({chance:.1f})")
        top = max(top, float(chance))  # the line stays inside the axes
    for k, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, color=("#762a83", "#1b7837", "0.2")[k % 3], ls=":", lw=1.5, label=f"{name} ({value:.1f})")
        top = max(top, float(value))
    ax.set_xticks(range(len(features)), features, rotation=45, ha="right")
    ax.set_xlabel("features pooled into the descriptor (GeM of backbone block outputs)")
    ax.set_ylabel(f"Recall@{metric[2:]} (%)")
    ax.set_ylim(0, top * 1.15)  # headroom for the values above the bars
    ax.set_title(title or f"Recall@{metric[2:]} of single blocks and of fused blocks")
    if len(groups) > 1 or chance is not None or baselines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


# ---------------------------------------------------------------------------------------------
# notebook 02: fusion module, regions, GeM
# ---------------------------------------------------------------------------------------------


def plot_regions(image: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], grid: tuple[int, int],
                 label: str | None = None, title: str | None = None) -> plt.Figure:
    """The 14 pooling regions drawn over an image: whole map, 2 x 2 split, 3 x 3 split.

    Args:
        image: (S, S, 3) in [0, 1] or uint8.
        boxes: (row0, row1, col0, col1) in patch units, from :func:`scicevpr.pooling.region_boxes`.
        grid: (H, W) patch grid of the image.
    """
    S = image.shape[0]
    H, W = grid
    ph, pw = S / H, S / W
    groups = [("whole map: region 0", boxes[:1], 0), ("2 x 2 split: regions 1-4", boxes[1:5], 1),
              ("3 x 3 split: regions 5-13", boxes[5:14], 5)]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.1))
    for ax, (name, bxs, first) in zip(axes, groups):
        ax.imshow(image, extent=(0, S, S, 0))
        for k in range(1, W):
            ax.axvline(k * pw, color="white", lw=0.4, alpha=0.5)
        for k in range(1, H):
            ax.axhline(k * ph, color="white", lw=0.4, alpha=0.5)
        for i, (r0, r1, c0, c1) in enumerate(bxs):
            colour = cmap(i % 10)
            inset = 1.5
            ax.add_patch(Rectangle((c0 * pw + inset, r0 * ph + inset), (c1 - c0) * pw - 2 * inset,
                                   (r1 - r0) * ph - 2 * inset, fill=False, edgecolor=colour, lw=2.5))
            ax.text((c0 + c1) / 2 * pw, (r0 + r1) / 2 * ph, f"{first + i}\n{r1 - r0}x{c1 - c0}", color="white",
                    ha="center", va="center", fontsize=9, fontweight="bold",
                    bbox=dict(facecolor=colour, alpha=0.75, edgecolor="none", boxstyle="round,pad=0.2"))
        ax.set_xlim(0, S)
        ax.set_ylim(S, 0)
        ax.grid(False)
        ax.set_title(name)
        ax.set_xlabel(f"x (pixels; {W} patches of {pw:.0f} px)")
        ax.set_ylabel(f"y (pixels; {H} patches of {ph:.0f} px)")
    fig.suptitle(title or f"The 14 GeM pooling regions on the {H} x {W} patch grid (region index, size in patches)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_influence(maps: Mapping[str, np.ndarray], token: tuple[int, int], label: str | None = None,
                   title: str | None = None, floor: float = 1e-5) -> plt.Figure:
    """Where a change of one input token shows up after each fusion step.

    ``maps``: step name -> (H, W) map of the mean absolute output change per token. Shown on
    a log scale relative to the largest change; exact zeros (and anything below ``floor``)
    take the darkest colour.
    """
    fig, axes = plt.subplots(1, len(maps), figsize=(4.3 * len(maps), 3.9), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        m = np.asarray(m, dtype=np.float64)
        rel = m / max(m.max(), 1e-30)
        im = ax.imshow(np.log10(np.maximum(rel, floor)), cmap="magma", vmin=np.log10(floor), vmax=0)
        ax.add_patch(Rectangle((token[1] - 0.5, token[0] - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=2))
        ax.grid(False)
        changed = int((m > 0).sum())
        ax.set_title(f"{name}\n{changed} of {m.size} tokens change")
        ax.set_xlabel("token column (patches)")
        ax.set_ylabel("token row (patches)")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label("log10 of the change / largest change")
    fig.suptitle(title or f"Perturbing one input token (cyan, row {token[0]}, column {token[1]}): what each step mixes")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_gem_p(ps: Sequence[float], position: np.ndarray, weights: Mapping[float, np.ndarray],
               label: str | None = None, title: str | None = None) -> plt.Figure:
    """The role of GeM's p.

    Args:
        ps: the exponents of the curve.
        position: (len(ps),) mean over channels of ``(GeM_p - mean) / (max - mean)``: 0 is average
            pooling, 1 is max pooling.
        weights: a few p -> (H, W) share of each token in the GeM of one channel (sums to 1).
    """
    fig = plt.figure(figsize=(4.4 + 3.0 * len(weights), 3.9), layout="constrained")
    gs = fig.add_gridspec(1, 1 + len(weights), width_ratios=[1.4] + [1] * len(weights))
    ax = fig.add_subplot(gs[0, 0])
    ax.plot(ps, position, marker="o", color="#4575b4")
    ax.axhline(0, color="0.5", ls="--", lw=1)
    ax.axhline(1, color="0.5", ls="--", lw=1)
    ax.text(ps[-1], 0.02, "average pooling", ha="right", va="bottom", fontsize=8, color="0.35")
    ax.text(ps[0], 0.98, "max pooling", ha="left", va="top", fontsize=8, color="0.35")
    ax.set_xscale("log")
    ax.set_xlabel("GeM exponent p (log scale)")
    ax.set_ylabel("(GeM - mean) / (max - mean)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("GeM moves from mean to max")
    vmax = max(float(np.max(w)) for w in weights.values())
    panels = []
    for k, (p, w) in enumerate(weights.items()):
        a = fig.add_subplot(gs[0, 1 + k])
        im = a.imshow(w, cmap="viridis", vmin=0, vmax=vmax)
        a.grid(False)
        a.set_title(f"p = {p:g}: share per token\n(largest {100 * np.max(w):.0f}%)")
        a.set_xlabel("token column (patches)")
        a.set_ylabel("token row (patches)")
        panels.append(a)
    cb = fig.colorbar(im, ax=panels, fraction=0.03, pad=0.02)
    cb.set_label("share of the pooled value")
    fig.suptitle(title or "GeM pooling: p sets how much the strongest activations dominate")
    return stamp(fig, label)


# ---------------------------------------------------------------------------------------------
# notebook 03 and 05: batch stability (paper Fig. 2)
# ---------------------------------------------------------------------------------------------


def plot_stability(table: pd.DataFrame, metric: str = "R@1", label: str | None = None,
                   title: str | None = None, chance: float | None = None) -> plt.Figure:
    """Paper Fig. 2: ``metric`` per query batch size and order, one colour per model.

    Left: the recall; solid line = queries in file order, dashed = random orders. Right: the
    largest change of any descriptor component compared with encoding the queries one at a
    time (0 means bit-identical descriptors). ``table``: :func:`scicevpr.stability.batch_stability`
    output (several models concatenated). ``chance``: the chance level of ``metric`` (a dashed line).
    With ``{metric} lo`` / ``hi`` columns (``batch_stability(..., intervals=True)``), a band draws
    the file-order line's 95% interval over queries.
    """
    models = list(dict.fromkeys(table["model"]))
    sizes = sorted(table["batch_size"].unique())
    xpos = {b: i for i, b in enumerate(sizes)}
    colours = plt.get_cmap("tab10")
    band = False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.6), gridspec_kw={"width_ratios": [1.5, 1]})
    for m_i, model in enumerate(models):
        t = table[table["model"] == model]
        for order in sorted(t["order"].unique()):
            o = t[t["order"] == order].sort_values("batch_size")
            x = [xpos[b] + 0.04 * (order - 1) for b in o["batch_size"]]
            ax.plot(x, o[metric], color=colours(m_i), lw=2.2 if order == 0 else 1.2, ls="-" if order == 0 else "--",
                    marker="o" if order == 0 else "x", ms=6 if order == 0 else 5, alpha=1 if order == 0 else 0.8,
                    label=f"{model}, {'file order' if order == 0 else f'random order {order}'}")
            if order == 0 and f"{metric} lo" in o and f"{metric} hi" in o:
                ax.fill_between(x, o[f"{metric} lo"], o[f"{metric} hi"], color=colours(m_i), alpha=0.12, lw=0)
                band = True
        worst = t.groupby("batch_size")["max_abs_change"].max().reindex(sizes)
        ax2.plot([xpos[b] for b in sizes], worst.values, color=colours(m_i), marker="o", lw=2, label=model)
    for a in (ax, ax2):
        a.set_xticks(range(len(sizes)), [str(b) for b in sizes])
        a.set_xlabel("query batch size (images per forward pass)")
    lo, hi = float(table[metric].min()), float(table[metric].max())
    if band:
        lo, hi = min(lo, float(table[f"{metric} lo"].min())), max(hi, float(table[f"{metric} hi"].max()))
        ax.fill_between([], [], [], color="gray", alpha=0.2, label="95% interval over queries (file order)")
    if chance is not None:
        ax.axhline(chance, color="dimgray", ls="--", lw=1.2, label="chance (random ranking)")
        lo, hi = min(lo, chance), max(hi, chance)
    ax.set_ylim(max(0.0, lo - 3), min(100.0, hi + 3))
    ax.set_ylabel(f"Recall@{metric[2:]} (%)")
    ax.set_title(f"Recall@{metric[2:]} per query batch size and order")
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax2.set_yscale("symlog", linthresh=1e-7)
    ax2.set_ylim(bottom=-1e-8)
    ax2.set_ylabel("max |descriptor change| vs batch size 1")
    ax2.set_title("How much the descriptors move")
    ax2.legend(fontsize=8)
    fig.suptitle(title or "Query descriptors under other batch sizes and orders (database: file order, batches of 16)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def _png(fig: plt.Figure) -> bytes:
    """A figure as PNG bytes (closed afterwards), for an ``ipywidgets.Image``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _explorer(controls: Sequence, render) -> "object":
    """Controls above an image and a line of text; ``render(**values) -> (figure, text)`` runs
    now and on every change. The figure is sent as PNG bytes to an ``ipywidgets.Image``: no
    output capture is involved, so headless execution cannot deadlock on it."""
    import html

    import ipywidgets as widgets

    image = widgets.Image(format="png")
    text = widgets.HTML()

    def update(_=None) -> None:
        fig, line = render(**{c.description.replace(" ", "_"): c.value for c in controls})
        image.value = _png(fig)
        text.value = f"<pre>{html.escape(line)}</pre>"

    for c in controls:
        c.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox(list(controls)), image, text])


def stability_explorer(table: pd.DataFrame, metrics: Sequence[str] = ("R@1", "R@5", "R@10"),
                       label: str | None = None):
    """An ipywidgets control: pick the query batch size and order, see every model's recall.

    Returns the widget (display it as a cell's last expression). Needs a live kernel; the
    static :func:`plot_stability` shows the same numbers in non-interactive runs.
    """
    import ipywidgets as widgets

    sizes = sorted(int(b) for b in table["batch_size"].unique())
    orders = sorted(int(o) for o in table["order"].unique())
    models = list(dict.fromkeys(table["model"]))

    def render(batch_size: int, order: int):
        t = table[(table["batch_size"] == batch_size) & (table["order"] == order)].set_index("model").reindex(models)
        fig, ax = plt.subplots(figsize=(7, 3.2))
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            vals = [float(t.loc[model, m]) for m in metrics]
            bars = ax.bar(np.arange(len(metrics)) + i * width, vals, width, label=model)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
        ax.set_xticks(np.arange(len(metrics)) + width * (len(models) - 1) / 2, metrics)
        ax.set_xlabel("metric")
        ax.set_ylabel("recall (%)")
        ax.set_ylim(0, 105)
        order_name = "file order" if order == 0 else f"random order {order}"
        ax.set_title(f"queries in batches of {batch_size}, {order_name}")
        ax.legend(fontsize=8)
        stamp(fig, label)
        change = t["max_abs_change"].map(lambda v: f"{v:.2e}")
        return fig, "max |descriptor change| vs batch size 1: " + ", ".join(f"{m}: {change[m]}" for m in models)

    controls = [
        widgets.Dropdown(options=sizes, value=16 if 16 in sizes else sizes[0], description="batch size"),
        widgets.SelectionSlider(options=orders, value=orders[0], description="order"),
    ]
    return _explorer(controls, render)


# ---------------------------------------------------------------------------------------------
# notebook 04: training
# ---------------------------------------------------------------------------------------------


def read_log(run: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """A run's ``log.csv`` (a run folder, the file, or a DataFrame already read)."""
    if isinstance(run, pd.DataFrame):
        return run
    path = Path(run)
    path = path / "log.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {str(path)!r}; train first (notebook 04 or `scicevpr train-teacher`).")
    return pd.read_csv(path)


def plot_training_curves(runs: Mapping[str, str | os.PathLike | pd.DataFrame], recalls: Sequence[str] = ("R@1", "R@5", "R@10"),
                         label: str | None = None, title: str | None = None, best_by: str = "R@5") -> plt.Figure:
    """Training curves from runs' ``log.csv``: losses per epoch (left) and validation recall
    per epoch (right), one colour per run; the best epoch (kept checkpoint) is circled on the
    curve of ``best_by``, the recall it was chosen by (the training loop keeps the best R@5)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = plt.get_cmap("tab10")
    styles = {"loss": "-", "loss_ms": "--", "loss_d": ":"}
    names = {"loss": "total", "loss_ms": "L_MS", "loss_d": "L_D"}
    rstyles = ["-", "--", ":", "-."]
    for i, (run_name, run) in enumerate(runs.items()):
        log = read_log(run)
        c = colours(i)
        for col, ls in styles.items():
            if col in log and log[col].notna().any() and not (col == "loss_ms" and not log.get("loss_d", pd.Series(dtype=float)).notna().any()):
                ax.plot(log["epoch"], log[col], ls=ls, marker="o", ms=3, color=c, label=f"{run_name}: {names[col]}")
        for j, r in enumerate(recalls):
            if r in log and log[r].notna().any():
                ax2.plot(log["epoch"], log[r], ls=rstyles[j % 4], marker="o", ms=3, color=c, label=f"{run_name}: {r}")
        if "best" in log:
            best = log[log["best"].astype(str).str.lower() == "true"]
            if len(best) and best_by in log:
                b = best.iloc[-1]
                ax2.scatter([b["epoch"]], [b[best_by]], s=160, facecolors="none", edgecolors=c, lw=2, zorder=5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean over the epoch)")
    ax.set_title("Losses: L_MS (stage 1); L_T = L_MS + L_D (stage 2)")
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation recall (%)")
    ax2.set_title(f"Validation Recall@N (circle: kept checkpoint, chosen by {best_by})")
    ax2.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    for a in (ax, ax2):
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or "Training: stage 1 (teacher) and stage 2 (distilled student)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_agreement(cosines: Mapping[str, np.ndarray], label: str | None = None, title: str | None = None) -> plt.Figure:
    """Histograms of the per-image cosine similarity between two models' descriptors
    (e.g. student vs teacher before and after distillation)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    lo = min(float(np.min(c)) for c in cosines.values())
    bins = np.linspace(min(lo, 0.0), 1.0, 41)
    for name, c in cosines.items():
        ax.hist(c, bins=bins, alpha=0.6, label=f"{name} (mean {np.mean(c):.2f})")
    ax.set_xlabel("cosine similarity of student and teacher descriptors of the same image")
    ax.set_ylabel("images (count)")
    ax.set_title(title or "Teacher-student agreement on the test images")
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


# ---------------------------------------------------------------------------------------------
# notebook 05: recalls, conditions, galleries
# ---------------------------------------------------------------------------------------------


def _zero_marks(ax, bars, vals) -> None:
    """A zero bar has no height: draw a short dark line and a "0" on it, so that it reads as a
    measured zero and not as missing data."""
    for b, v in zip(bars, vals):
        if np.isfinite(v) and v == 0:
            ax.plot([b.get_x(), b.get_x() + b.get_width()], [0, 0], color="black", lw=3, solid_capstyle="butt", zorder=4)


def plot_recalls(table: pd.DataFrame, metrics: Sequence[str] | None = None, by: str = "model",
                 label: str | None = None, title: str | None = None,
                 chance: Mapping[int, float] | None = None) -> plt.Figure:
    """Grouped bars of Recall@N, one bar per row of ``table`` (named by column ``by``).

    ``metrics``: default every ``R@N`` column. Where ``table`` has ``R@N lo`` / ``R@N hi``
    (``EvalResult.table(intervals=True)``), error bars draw the 95% interval over queries.
    ``chance``: N -> chance Recall@N (``EvalResult.chance()``), a dashed line over each group.
    The legend sits outside the axes, clear of the bars and their values.
    """
    metrics = list(metrics) if metrics is not None else recall_columns(table)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(metrics) * max(1, len(table)) / 2 + 3), 4.0))
    width = 0.8 / max(1, len(table))
    colours = plt.get_cmap("tab10")
    intervals = False
    for i, (_, row) in enumerate(table.iterrows()):
        vals = [float(row[m]) for m in metrics]
        x = np.arange(len(metrics)) + i * width
        bars = ax.bar(x, vals, width, label=str(row[by]), color=colours(i))
        tops = vals
        if all(f"{m} lo" in row and f"{m} hi" in row for m in metrics):
            lo = np.array([float(row[f"{m} lo"]) for m in metrics])
            hi = np.array([float(row[f"{m} hi"]) for m in metrics])
            ax.errorbar(x, vals, yerr=[np.maximum(np.array(vals) - lo, 0), np.maximum(hi - np.array(vals), 0)],
                        fmt="none", ecolor="black", elinewidth=1, capsize=2)
            tops, intervals = hi.tolist(), True
        _zero_marks(ax, bars, vals)
        for b, v, t in zip(bars, vals, tops):
            ax.text(b.get_x() + b.get_width() / 2, t + 1.0, f"{v:.1f}", ha="center", fontsize=7)
    if chance:
        for j, m in enumerate(metrics):
            n = int(m[2:])
            if n in chance:
                ax.plot([j - width / 2, j + width * (len(table) - 0.5)], [chance[n]] * 2, color="dimgray", ls="--", lw=1.3,
                        label="chance (random ranking)" if j == 0 else None)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(table) - 1) / 2, [f"Recall@{m[2:]}" for m in metrics])
    ax.set_xlabel("metric (a query is correct at N if a true positive is among its N nearest"
                  + ("; bars: 95% interval)" if intervals else ")"))
    ax.set_ylabel("queries correct (%)")
    ax.set_ylim(0, 112)
    ax.set_title(title or "Recall@N")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # clear of every bar
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_recall_by_condition(tables: Mapping[str, pd.DataFrame], metric: str | Sequence[str] = "R@1",
                             label: str | None = None, title: str | None = None,
                             chance: Mapping[int, float] | None = None) -> plt.Figure:
    """Grouped bars of Recall@N per query condition (night, fog, ...), one colour per model and
    one panel per metric.

    ``tables``: model name -> :func:`scicevpr.evaluate.recall_by_condition` output
    (``EvalResult.per_condition``); ``metric``: one column name or several. ``R@N lo`` /
    ``R@N hi`` columns (``recall_by_condition(..., intervals=True)``) become error bars; a zero
    bar is drawn as a dark line with a "0". ``chance``: N -> chance Recall@N, a dashed line.
    One legend, beside the first panel, outside the axes.
    """
    metrics = [metric] if isinstance(metric, str) else list(metric)
    names = list(tables)
    conditions = list(dict.fromkeys(c for t in tables.values() for c in t["condition"]))
    counts = {c: int(t.set_index("condition")["queries"].get(c, 0)) for t in tables.values() for c in t["condition"]}
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8.0, 1.1 * len(conditions) + 2), 3.6 * len(metrics) + 0.4),
                             squeeze=False)
    width = 0.8 / len(names)
    colours = plt.get_cmap("tab10")
    for row, (ax, m) in enumerate(zip(axes[:, 0], metrics)):
        top = 0.0
        for i, name in enumerate(names):
            t = tables[name].set_index("condition").reindex(conditions)
            vals = t[m].astype(float).values
            x = np.arange(len(conditions)) + i * width
            bars = ax.bar(x, vals, width, label=name, color=colours(i))
            if f"{m} lo" in t and f"{m} hi" in t:
                lo, hi = t[f"{m} lo"].astype(float).values, t[f"{m} hi"].astype(float).values
                ax.errorbar(x, vals, yerr=[np.maximum(vals - lo, 0), np.maximum(hi - vals, 0)], fmt="none",
                            ecolor="black", elinewidth=1, capsize=2)
                top = max(top, float(np.nanmax(hi)))
            top = max(top, float(np.nanmax(vals)))
            _zero_marks(ax, bars, vals)
            for b, v in zip(bars, vals):
                if np.isfinite(v) and v == 0:
                    ax.text(b.get_x() + b.get_width() / 2, 1.0, "0", ha="center", fontsize=7)
        if chance and int(m[2:]) in chance:
            ax.axhline(chance[int(m[2:])], color="dimgray", ls="--", lw=1.2, label="chance (random ranking)")
            top = max(top, float(chance[int(m[2:])]))  # the line stays inside the axes
        ax.set_xticks(np.arange(len(conditions)) + width * (len(names) - 1) / 2,
                      [f"{c}\n({counts[c]} q.)" for c in conditions])
        ax.set_xlabel("query condition (number of queries)")
        ax.set_ylabel(f"Recall@{m[2:]} (%)")
        ax.set_ylim(0, min(105.0, top * 1.25 + 5))
        ax.set_title(f"Recall@{m[2:]} by query condition")
        if row == 0:  # one legend for every panel (the same colours), outside the axes, clear of the bars
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_recall_curves(curves: Mapping[str, Sequence[float]], label: str | None = None,
                       title: str | None = None, chance: Sequence[float] | None = None) -> plt.Figure:
    """Recall@N against N = 1..len(curve), one line per model, as VPR papers draw them.

    ``curves``: model name -> Recall@N in percent for N = 1, 2, ... (:func:`scicevpr.evaluate.recall_curve`);
    ``chance``: the Recall@N of a random ranking, drawn dashed (:func:`scicevpr.evaluate.chance_recall`).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.get_cmap("tab10")
    longest = 1
    for i, (name, curve) in enumerate(curves.items()):
        curve = np.asarray(curve, dtype=float)
        n = np.arange(1, len(curve) + 1)
        longest = max(longest, len(curve))
        ax.plot(n, curve, color=colours(i % 10), lw=1.8, label=f"{name} (R@1 {curve[0]:.1f})")
    if chance is not None:
        chance = np.asarray(chance, dtype=float)
        ax.plot(np.arange(1, len(chance) + 1), chance, color="0.5", ls="--", lw=1.2, label="random ranking")
    ax.set_xscale("log")
    ax.set_xlim(1, longest)
    ax.set_ylim(0, 101)
    ax.set_xlabel("N, number of retrieved database images (log scale)")
    ax.set_ylabel("Recall@N (% of queries)")
    ax.set_title(title or "Recall@N")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_matches(query_paths: Sequence[str | os.PathLike], database_paths: Sequence[str | os.PathLike],
                 predictions: np.ndarray, similarities: np.ndarray, queries: Sequence[int], k: int = 5,
                 correct: np.ndarray | None = None, label: str | None = None, title: str | None = None,
                 thumb: int = 112) -> plt.Figure:
    """Contact sheet of a search without labels: each row a query, then its ``k`` nearest
    database images with their similarity and file name; framed green / red when ``correct``
    ((N_q, >= k) bool, from UTM file names) is known, grey otherwise.

    ``predictions`` / ``similarities``: (N_q, >= k) database indices (-1: none) and similarities.
    """
    queries = list(queries)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.75 * (k + 1), 2.05 * len(queries) + 0.5), squeeze=False)
    for row, q in enumerate(queries):
        _image_panel(axes[row, 0], read_thumbnail(query_paths[q], thumb), f"query {q}\n{_short(query_paths[q])}",
                     frame=QUERY_COLOUR)
        for j in range(k):
            ax = axes[row, 1 + j]
            d = int(predictions[q, j]) if j < predictions.shape[1] else -1
            if d < 0:
                ax.set_visible(False)
                continue
            frame = "0.6" if correct is None else (CORRECT_COLOUR if correct[q, j] else WRONG_COLOUR)
            _image_panel(ax, read_thumbnail(database_paths[d], thumb),
                         f"#{j + 1} sim {similarities[q, j]:.3f}\n{_short(database_paths[d])}", frame=frame)
    default = f"Top-{k} database images per query" + (" (green: within the radius, red: not)" if correct is not None else "")
    fig.suptitle(title or default)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def _short(path: str | os.PathLike, n: int = 22) -> str:
    name = Path(path).name
    return name if len(name) <= n else name[: n // 2 - 1] + "..." + name[-(n // 2 - 2):]


def _utm_distance(split, q: int, d: int) -> float:
    return float(np.linalg.norm(split.query_utms[q] - split.database_utms[d]))


def plot_gallery(split, result, queries: Sequence[int], k: int = 5, label: str | None = None,
                 title: str | None = None, thumb: int = 112) -> plt.Figure:
    """Retrieval gallery: each row a query, then its ``k`` nearest database images, framed
    green when within the positive radius (correct) and red otherwise, with their distance
    to the query in metres."""
    conditions = split.query_conditions
    queries = list(queries)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.75 * (k + 1), 1.95 * len(queries) + 0.5), squeeze=False)
    for row, q in enumerate(queries):
        cond = f" ({conditions[q]})" if conditions is not None else ""
        _image_panel(axes[row, 0], read_thumbnail(split.query_paths[q], thumb), f"query {q}{cond}", frame=QUERY_COLOUR)
        for j in range(k):
            ax = axes[row, 1 + j]
            if j >= result.predictions.shape[1]:
                ax.set_visible(False)
                continue
            d = int(result.predictions[q, j])
            ok = bool(result.correct[q, j])
            _image_panel(ax, read_thumbnail(split.database_paths[d], thumb),
                         f"#{j + 1}: {_utm_distance(split, q, d):.0f} m {'ok' if ok else 'wrong'}",
                         frame=CORRECT_COLOUR if ok else WRONG_COLOUR)
    fig.suptitle(title or f"{result.model_name}: top-{k} retrievals (green: within {split.radius:.0f} m, red: not)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def retrieval_explorer(split, results: Mapping[str, object], k: int = 5, label: str | None = None):
    """An ipywidgets control: pick a query and a model, see its top-``k`` retrievals.

    Returns the widget (display it as a cell's last expression); :func:`plot_gallery` is the
    static counterpart for non-interactive runs.
    """
    import ipywidgets as widgets

    names = list(results)

    def render(query: int, model: str):
        res = results[model]
        fig = plot_gallery(split, res, [query], k=k, label=label,
                           title=f"{model}: query {query}, top-{k} (green: within {split.radius:.0f} m)")
        pos = split.positives[query]
        first = int(np.argmax(res.correct[query])) + 1 if res.correct[query].any() else "none in the list"
        return fig, f"{len(pos)} true positives in the database; first correct rank: {first}"

    controls = [
        widgets.IntSlider(min=0, max=split.num_queries - 1, value=0, description="query"),
        widgets.Dropdown(options=names, value=names[-1], description="model"),
    ]
    return _explorer(controls, render)


def plot_training_batch(images, place_ids, label: str | None = None, title: str | None = None) -> plt.Figure:
    """A P x K training batch: one row per place, its K augmented views.

    ``images``: (P, K, 3, S, S) normalised tensors; ``place_ids``: (P, K).
    """
    P, K = images.shape[:2]
    fig, axes = plt.subplots(P, K, figsize=(1.7 * K, 1.75 * P + 0.5), squeeze=False)
    shown = to_display(images.reshape(P * K, *images.shape[2:])).reshape(P, K, *images.shape[-2:], 3)
    for i in range(P):
        for j in range(K):
            _image_panel(axes[i, j], shown[i, j], f"place {int(place_ids[i, j])}, view {j + 1}")
    fig.suptitle(title or f"A training batch: P = {P} places x K = {K} images (RandAugment applied)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


# ---------------------------------------------------------------------------------------------
# notebooks 03 and 05: the paper's Fig. 1 (top-1 flips), similarity and positions
# ---------------------------------------------------------------------------------------------


def plot_top1_flips(table: pd.DataFrame, num_queries: int, label: str | None = None,
                    title: str | None = None) -> plt.Figure:
    """Paper Fig. 1 in numbers: per query batch size and order (``batch_stability`` output),
    left the queries whose nearest database image differs from batch size 1 (``top1_changed``),
    right the mean cosine similarity of a query's descriptor to its batch-size-1 descriptor
    (1: unchanged). One colour per model; solid = file order, dashed = random orders."""
    models = list(dict.fromkeys(table["model"]))
    sizes = sorted(table["batch_size"].unique())
    xpos = {b: i for i, b in enumerate(sizes)}
    colours = plt.get_cmap("tab10")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.3))
    for m_i, model in enumerate(models):
        t = table[table["model"] == model]
        for order in sorted(t["order"].unique()):
            o = t[t["order"] == order].sort_values("batch_size")
            x = [xpos[b] + 0.05 * order for b in o["batch_size"]]
            kw = dict(color=colours(m_i), lw=2.2 if order == 0 else 1.2, ls="-" if order == 0 else "--",
                      marker="o" if order == 0 else "x", alpha=1 if order == 0 else 0.8)
            name = f"{model}, {'file order' if order == 0 else f'random order {order}'}"
            ax.plot(x, o["top1_changed"], label=name, **kw)
            ax2.plot(x, o["mean_cosine"], label=name, **kw)
    for a in (ax, ax2):
        a.set_xticks(range(len(sizes)), [str(b) for b in sizes])
        a.set_xlabel("query batch size (images per forward pass)")
    ax.set_ylim(bottom=-0.5)
    ax.set_ylabel(f"queries whose top-1 changed (of {num_queries})")
    ax.set_title("Queries with another best match than at batch size 1")
    ax.legend(fontsize=7, loc="best")
    ax2.set_ylabel("mean cosine to the batch-size-1 descriptor")
    ax2.set_title("How far the query descriptors move (1 = not at all)")
    fig.suptitle(title or "The paper's Fig. 1, counted: best matches that depend on the batch")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_flip_example(split, example: Mapping, label: str | None = None, title: str | None = None,
                      thumb: int = 112, max_companions: int = 4) -> plt.Figure:
    """One query beside its best database match under two batchings (paper Fig. 1), with the
    batch companions that changed it. ``example``: :func:`scicevpr.lab.analysis.flip_example`."""
    q = int(example["query"])
    comps = list(example["companions"])[:max_companions]
    n = 3 + max(len(comps), 1)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.6), squeeze=False)
    axes = axes[0]
    cond = f" ({split.query_conditions[q]})" if split.query_conditions is not None else ""
    _image_panel(axes[0], read_thumbnail(split.query_paths[q], thumb), f"query {q}{cond}", frame=QUERY_COLOUR)
    for ax, key, name in ((axes[1], "top1_a", example.get("name_a", "alone")), (axes[2], "top1_b", example.get("name_b", "in batch"))):
        d = int(example[key])
        ok = d in set(int(i) for i in split.positives[q])
        _image_panel(ax, read_thumbnail(split.database_paths[d], thumb),
                     f"top-1 {name}:\ndb {d}, {_utm_distance(split, q, d):.0f} m {'ok' if ok else 'wrong'}",
                     frame=CORRECT_COLOUR if ok else WRONG_COLOUR)
    for j in range(n - 3):
        ax = axes[3 + j]
        if j < len(comps):
            _image_panel(ax, read_thumbnail(split.query_paths[comps[j]], thumb), f"companion: query {comps[j]}", frame="gray")
        else:
            ax.set_visible(False)
    more = len(example["companions"]) - len(comps)
    fig.suptitle(title or (f"Query {q}: best match {example.get('name_a', 'alone')} vs "
                           f"{example.get('name_b', 'in batch')}" + (f" (+{more} more companions)" if more > 0 else "")))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def flip_explorer(flip, split, label: str | None = None):
    """An ipywidgets control for the paper's Fig. 1: pick a query and its batch companions
    (query indices, comma-separated), see the model's best match alone and in that batch.

    ``flip``: ``flip(query, companions) -> example`` (:func:`scicevpr.lab.analysis.companion_flipper`
    of the model and its stability features), called on every change. Needs a live kernel.
    """
    import ipywidgets as widgets

    def render(query: int, companions: str):
        try:
            comps = [int(c) for c in companions.replace(";", ",").split(",") if c.strip()]
        except ValueError:
            comps = []
        ex = flip(query, comps)
        fig = plot_flip_example(split, ex, label=label)
        verdict = "changed" if ex["top1_a"] != ex["top1_b"] else "unchanged"
        return fig, (f"top-1 {verdict}: db {ex['top1_a']} alone, db {ex['top1_b']} in the batch; cosine to the alone "
                     f"descriptor {ex['cosine']:.4f}")

    controls = [
        widgets.IntSlider(min=0, max=split.num_queries - 1, value=0, description="query"),
        widgets.Text(value="1, 2, 3", description="companions"),
    ]
    return _explorer(controls, render)


def plot_similarity_matrix(result, label: str | None = None, title: str | None = None,
                           max_queries: int = 60) -> plt.Figure:
    """The query x database cosine similarity matrix of ``result`` (an ``EvalResult``), rows and
    columns sorted by street and position along it (by UTM east without metadata), the true
    positives (within the radius) dotted and each query's top-1 crossed: retrieval picks the
    brightest cell of each row. At most ``max_queries`` rows (evenly spaced) are drawn."""
    split = result.split
    qi = np.arange(split.num_queries)
    if len(qi) > max_queries:
        qi = qi[np.linspace(0, len(qi) - 1, max_queries).round().astype(int)]

    def order(meta, utms, idx):
        if meta is not None and {"street", "along_m"} <= set(meta.columns):
            m = meta.iloc[idx]
            return idx[np.lexsort((m["along_m"].to_numpy(), m["street"].to_numpy()))]
        return idx[np.argsort(utms[idx, 0], kind="stable")]

    qi = order(split.query_metadata, split.query_utms, qi)
    di = order(split.database_metadata, split.database_utms, np.arange(split.num_database))
    qd, dd = result.query_descriptors[qi], result.database_descriptors[di]
    sim = (qd / np.linalg.norm(qd, axis=1, keepdims=True)) @ (dd / np.linalg.norm(dd, axis=1, keepdims=True)).T
    col = {int(d): j for j, d in enumerate(di)}
    fig, ax = plt.subplots(figsize=(11, 4.8))
    im = ax.imshow(sim, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    pr, pc, tr, tc = [], [], [], []
    for r, q in enumerate(qi):
        for d in split.positives[q]:
            pr.append(r)
            pc.append(col[int(d)])
        tr.append(r)
        tc.append(col[int(result.predictions[q, 0])])
    ax.scatter(pc, pr, s=6, c="white", marker="o", label=f"true positive (within {split.radius:.0f} m)")
    ax.scatter(tc, tr, s=22, c=WRONG_COLOUR, marker="x", label="top-1 retrieved")
    ax.set_xlabel("database image (sorted by street and position along it)")
    ax.set_ylabel("query (sorted the same way)")
    ax.set_title(title or f"{result.model_name}: query x database similarity ({len(qi)} of {split.num_queries} queries)")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)


def plot_positions(split, result, query: int, label: str | None = None, title: str | None = None,
                   window: float = 150.0) -> plt.Figure:
    """A map (UTM metres) around ``query``: database and query camera positions, the circle of
    the positive radius (``split.radius``, 25 m by default), the query's true positives, and its top-1 retrieval (green
    inside the circle, red outside; an arrow when it lies off the map)."""
    from matplotlib.patches import Circle

    qx, qy = split.query_utms[query]
    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    near = lambda u: (np.abs(u[:, 0] - qx) <= window) & (np.abs(u[:, 1] - qy) <= window)  # noqa: E731
    db, qs = split.database_utms, split.query_utms
    ax.scatter(db[near(db), 0] - qx, db[near(db), 1] - qy, s=10, c="lightgray", label="database images")
    ax.scatter(qs[near(qs), 0] - qx, qs[near(qs), 1] - qy, s=10, c="#91bfdb", marker="^", label="other queries")
    pos = np.asarray(split.positives[query], dtype=int)
    if len(pos):
        ax.scatter(db[pos, 0] - qx, db[pos, 1] - qy, s=22, c=CORRECT_COLOUR, label="true positives")
    ax.add_patch(Circle((0, 0), split.radius, fill=False, ls="--", color=QUERY_COLOUR, lw=1.5))
    ax.scatter([0], [0], s=120, c=QUERY_COLOUR, marker="*", zorder=5, label=f"query {query}")
    d = int(result.predictions[query, 0])
    dx, dy = db[d, 0] - qx, db[d, 1] - qy
    ok = bool(result.correct[query, 0])
    dist = float(np.hypot(dx, dy))
    if max(abs(dx), abs(dy)) <= window:
        ax.scatter([dx], [dy], s=110, facecolors="none", edgecolors=CORRECT_COLOUR if ok else WRONG_COLOUR, lw=2.2,
                   zorder=6, label=f"top-1: db {d}, {dist:.0f} m")
    else:
        ang = np.arctan2(dy, dx)
        tip = (0.9 * window * np.cos(ang), 0.9 * window * np.sin(ang))
        ax.annotate("", xy=tip, xytext=(0.3 * tip[0], 0.3 * tip[1]),
                    arrowprops=dict(arrowstyle="->", color=WRONG_COLOUR, lw=1.8))
        ax.plot([], [], color=WRONG_COLOUR, lw=1.8, label=f"top-1: db {d}, {dist:.0f} m away (off the map)")
    ax.set_xlim(-window, window)
    ax.set_ylim(-window, window)
    ax.set_aspect("equal")
    ax.set_xlabel("UTM east - query (m)")
    ax.set_ylabel("UTM north - query (m)")
    ax.set_title(title or f"{result.model_name}: query {query} and the {split.radius:.0f} m radius")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return stamp(fig, label)

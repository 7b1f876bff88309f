"""The notebooks' measurements: what they compute about the models and the data, beside the
plots (:mod:`scicevpr.lab.viz`) and the notebooks' switch (:mod:`scicevpr.lab.notebook`).

- **Notebook 01, multi-layer DINOv2 features** (paper Sec. III-A): :func:`layer_features`,
  :func:`linear_cka` / :func:`layer_similarity` (how alike the blocks are), :func:`probe_descriptor`,
  :func:`layer_descriptors`
  / :func:`layer_recall_table` (Recall@N of single and fused blocks), :func:`demo_pairs`.
- **Notebook 02, the fusion module** (paper Fig. 5): :func:`influence_maps` (channel fusion vs
  token mixing), :func:`gem_analysis` (GeM's p between mean and max), :func:`parameter_counts`,
  :func:`preset_table`.
- **Notebook 04, distillation**: :func:`training_batch`, :func:`initial_student`,
  :func:`descriptor_cosines`, :func:`agreement` (how closely the student follows the teacher),
  :func:`agreement_difference` (which of two students follows it more closely, with a paired interval).
- **Notebook 03, the paper's Fig. 1**: :func:`flip_example` (a query whose best match changes with the batch).
- **Notebooks 04-05, evaluation**: :func:`informative_recall_values` (the N a split can inform),
  :func:`pixel_baseline_row` (the raw-pixel floor), :func:`colour_baseline_row` (the colour-layout floor), :func:`pick_queries`,
  :func:`failure_breakdown` (where wrong matches lie), :func:`conditions_with_enough_queries`.

Every function takes models, splits and tensors; the ones that need the notebooks' sizes take the
:class:`~scicevpr.lab.notebook.NotebookSettings`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..stability import descriptor_cosines
from ..precision import autocast, model_device

if TYPE_CHECKING:
    from .notebook import NotebookSettings


def load_images(paths, image_size: int, device: str | torch.device | None = None) -> torch.Tensor:
    """Image files -> (N, 3, S, S) normalised tensor, with the evaluation transform, on
    ``device`` (default the CPU; pass ``settings.device`` to feed a model directly)."""
    from ..data.decode import load_rgb
    from ..data.transforms import eval_transform

    t = eval_transform(image_size)
    x = torch.stack([t(load_rgb(p)) for p in paths])
    return x if device is None else x.to(device)


def patch_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1 + H*W, C) ViT tokens (CLS first) -> (B, C, H, W) patch-feature maps."""
    B, N, C = tokens.shape
    H, W = grid
    if N != 1 + H * W:
        raise ValueError(f"{N} tokens do not fit a CLS token + a {H} x {W} grid")
    return tokens[:, 1:].transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, HW) -> (B, C, H, W)


@torch.no_grad()
def layer_features(backbone, images: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """Patch features of several DINOv2 blocks (after the final LayerNorm, as SciceVPR takes
    them): block -> (N, C, H, W), float32 on the CPU. ``images`` may be on any device: they are
    moved to the backbone's."""
    layers = list(layers)
    images = images.to(model_device(backbone))
    grid = backbone.grid_size(images.shape[-2], images.shape[-1])
    outs = backbone.get_intermediate_layers(images, layers)  # M x (N, 1 + HW, C)
    return {l: patch_maps(o, grid).float().cpu() for l, o in zip(layers, outs)}


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) of two (n, d1), (n, d2)
    representations of the same n samples: 1 = the same up to rotation and scale."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    cross = (b.T @ a).norm() ** 2
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()))


def layer_similarity(features: dict[int, torch.Tensor]) -> np.ndarray:
    """Linear CKA between the patch features of every pair of blocks: (L, L) matrix.
    ``features``: block -> (N, C, H, W) (all patches of all images are the samples)."""
    flat = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features.values()]  # (N*H*W, C)
    n = len(flat)
    m = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            m[i, j] = m[j, i] = linear_cka(flat[i], flat[j])
    return m


def _gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM over the tokens of (B, C, H, W) maps -> (B, C), through the project's pooling."""
    from ..pooling import MultiRegionGeM

    pool = MultiRegionGeM(tuple(x.shape[-2:]), p, eps, normalize_output=False).to(x.device)
    return pool(x)[:, 0]  # region 0: the whole map


def probe_descriptor(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """The per-block probe's descriptor of (B, C, H, W) block outputs -> (B, 2C), L2-normalised.

    GeM needs non-negative inputs, and a block's output (after the final LayerNorm) is signed:
    clamping it at ``eps`` would drop its negative half, which the model never does. The model
    pools ``F = ReLU(W_1x1 * X)`` (notebook 02); the probe applies the same form with a fixed,
    untrained ``W_1x1 = [I; -I]`` (2C x C): ``ReLU(X)`` and ``ReLU(-X)`` together hold ``X``
    exactly (``X = ReLU(X) - ReLU(-X)``), so both halves reach GeM and nothing is learned.
    """
    signed = torch.cat([x, -x], dim=1).relu()  # (B, C, H, W) -> (B, 2C, H, W), [ReLU(X); ReLU(-X)]
    return torch.nn.functional.normalize(_gem(signed.float(), p), dim=-1)


@torch.no_grad()
def layer_descriptors(model, paths, layers, settings: "NotebookSettings", fusions=None) -> dict[str, np.ndarray]:
    """Simple global descriptors from single DINOv2 blocks and from fused blocks.

    Each block's patch features go through :func:`probe_descriptor` (ReLU of the fixed 1x1
    fusion ``[I; -I]``, then GeM with p = 3 over the whole image, L2-normalised: 2C dimensions
    per block); ``"blocks a-b fused"`` concatenates the descriptors of a group of blocks
    before normalising (``fusions``: groups of block indices, default the model's
    ``config.layers``). No trained weight is involved, so this measures what the frozen
    backbone's blocks carry. Returns name -> (N, D) float32.
    """
    from ..evaluate import iterate_images

    fusions = [tuple(model.config.layers)] if fusions is None else [tuple(f) for f in fusions]
    layers = sorted(set(layers).union(*map(set, fusions)))
    backbone = model.backbone
    device = model_device(backbone)
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for x, _ in iterate_images(paths, model.image_size, settings.eval_batch_size, device, settings.num_workers,
                               False, progress=False):
        with autocast(device, settings.amp):
            feats = layer_features(backbone, x, layers)
        for l, f in feats.items():
            out[l].append(probe_descriptor(f))
    desc = {f"block {l}": torch.cat(v).numpy() for l, v in out.items()}
    for fused in dict.fromkeys(fusions):
        cat = torch.cat([torch.cat(out[l]) for l in fused], dim=1)
        desc[fusion_name(fused)] = torch.nn.functional.normalize(cat, dim=-1).numpy()
    return desc


def fusion_name(layers) -> str:
    """``"blocks 8-11 fused"`` for consecutive blocks, ``"blocks 2+5+9 fused"`` otherwise."""
    layers = list(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"blocks {layers[0]}-{layers[-1]} fused"
    return "blocks " + "+".join(map(str, layers)) + " fused"


def layer_recall_table(model, split, layers, settings: "NotebookSettings", fusions=None) -> pd.DataFrame:
    """Recall@N on ``split`` of each :func:`layer_descriptors` descriptor (exact L2 search), with
    the bootstrap 95% interval of R@1 over queries (columns ``R@1 lo``, ``R@1 hi``)."""

    from ..evaluate import recall_columns, score

    db = layer_descriptors(model, split.database_paths, layers, settings, fusions)
    q = layer_descriptors(model, split.query_paths, layers, settings, fusions)
    rows = []
    for name in db:
        res = score(None, split, db[name], q[name], settings.eval_config())
        r1 = {1: res.intervals(seed=settings.seed)[1]}
        rows.append({"features": name, "dim": db[name].shape[1], **recall_columns(res.recalls, r1)})
    return pd.DataFrame(rows)


@torch.no_grad()
def influence_maps(fusion, x: torch.Tensor, token: tuple[int, int], delta: float = 1.0) -> dict[str, np.ndarray]:
    """Which output tokens change when one input token changes, after each fusion step.

    ``x``: (1, M*C, H, W) concatenated block features. The token at ``token`` = (row, col) is
    shifted by ``delta`` times a fixed random direction; returns step name -> (H, W) mean
    absolute change per output token, after the 1x1 channel fusion and after the token mixers.
    """
    g = torch.Generator().manual_seed(0)
    d = torch.randn(x.shape[1], generator=g).to(x) * delta
    x2 = x.clone()
    x2[0, :, token[0], token[1]] += d
    c1, c2 = fusion.channel_fusion(x), fusion.channel_fusion(x2)
    m1, m2 = fusion.mix_tokens(c1), fusion.mix_tokens(c2)
    return {
        "after 1x1 channel fusion": (c2 - c1).abs().mean(1)[0].cpu().numpy(),
        "after the token mixers": (m2 - m1).abs().mean(1)[0].cpu().numpy(),
    }


@torch.no_grad()
def gem_analysis(fmap: torch.Tensor, ps=(1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32), shown=(1, 3, 16), eps: float = 1e-6):
    """How GeM's exponent p moves the pooled value from the mean to the max.

    ``fmap``: (C, H, W) non-negative map (the fused features). Returns ``(ps, position,
    weights)``: ``position[i]`` is the mean over channels of ``(GeM_p - mean) / (max - mean)``
    (0 = average pooling, 1 = max pooling); ``weights[p]`` the (H, W) share of each token in
    ``GeM_p`` of a typical channel (median spread) (``x^p / sum x^p``).
    """
    x = fmap.detach().float().cpu().clamp(min=eps)  # (C, H, W), any device in; a small map
    mean = x.mean((1, 2))
    mx = x.amax((1, 2))
    ok = (mx - mean) > 1e-6
    position = []
    for p in ps:
        g = _gem(x[None], p, eps)[0]
        position.append(float(((g - mean)[ok] / (mx - mean)[ok]).mean()))
    valid = torch.nonzero(ok).flatten()
    spread = (mx - mean)[valid] / mean[valid].clamp(min=eps)  # peakiness of each channel
    c = int(valid[torch.argsort(spread)[len(valid) // 2]])  # the median channel
    weights = {}
    for p in shown:
        w = x[c].double() ** p
        weights[p] = (w / w.sum()).numpy()
    return list(ps), np.array(position), weights


def parameter_counts(model) -> pd.DataFrame:
    """Parameters of each part of a model: name, parameters, trainable (in millions too)."""

    parts = [("DINOv2 backbone (frozen)", model.backbone)]
    fusion = getattr(model, "fusion", None)
    if fusion is not None:
        parts += [("1x1 channel fusion", fusion.conv), ("token mixers", fusion.token_mixers)]
    parts += [("GeM p", model.pool), (f"{type(model.encoder).__name__}", model.encoder)]
    rows = []
    for name, module in parts:
        n = sum(p.numel() for p in module.parameters())
        t = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append({"part": name, "parameters": n, "trainable": t})
    df = pd.DataFrame(rows)
    total = pd.DataFrame([{"part": "total", "parameters": int(df["parameters"].sum()), "trainable": int(df["trainable"].sum())}])
    return pd.concat([df, total], ignore_index=True)


def agreement(student, teacher) -> dict[str, float]:
    """How closely a student's evaluation result follows its teacher's on the same split:
    mean cosine similarity of the query descriptors, L_D (mean squared L2 distance), and the
    share of queries whose nearest database image is the same (percent)."""
    cos = descriptor_cosines(student.query_descriptors, teacher.query_descriptors)
    l_d = float(((student.query_descriptors - teacher.query_descriptors) ** 2).sum(1).mean())
    same = float(100.0 * (student.predictions[:, 0] == teacher.predictions[:, 0]).mean())
    return {"mean cosine": round(float(cos.mean()), 3), "L_D": round(l_d, 3), "same top-1 (%)": round(same, 1)}


def agreement_difference(a, b, teacher, level: float = 0.95, num_samples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How much more closely student ``a`` follows ``teacher`` than student ``b`` does, on both
    measures of :func:`agreement` that are per query: the cosine of a query's descriptor to the
    teacher's, and whether its nearest database image is the teacher's (percent). All three are
    evaluation results on the same split.

    One row per measure: ``a``, ``b``, ``difference`` (a - b), its paired percentile-bootstrap
    interval ``lo`` / ``hi`` (the queries resampled with replacement, the same resample for a
    and b; seeded) and ``verdict``: "higher" / "lower" when the interval excludes 0, else
    "not distinguishable"."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    per_query = {
        "mean cosine to the teacher": (descriptor_cosines(a.query_descriptors, teacher.query_descriptors),
                                       descriptor_cosines(b.query_descriptors, teacher.query_descriptors)),
        "same top-1 as the teacher (%)": (100.0 * (a.predictions[:, 0] == teacher.predictions[:, 0]),
                                          100.0 * (b.predictions[:, 0] == teacher.predictions[:, 0])),
    }
    n_q = len(teacher.predictions)
    sample = np.random.default_rng(seed).integers(0, n_q, size=(num_samples, n_q))  # (S, N_q) query indices
    rows = []
    for measure, (x, y) in per_query.items():
        d = np.asarray(x, np.float64) - np.asarray(y, np.float64)  # (N_q,) paired differences
        lo, hi = np.quantile(d[sample].mean(1), [(1 - level) / 2, (1 + level) / 2])
        verdict = "higher" if lo > 0 else "lower" if hi < 0 else "not distinguishable"
        rows.append({"measure": measure, "a": float(np.mean(x)), "b": float(np.mean(y)), "difference": float(d.mean()),
                     "lo": float(lo), "hi": float(hi), "verdict": verdict})
    return pd.DataFrame(rows)


def pick_queries(result, n: int = 4, success: bool = True, conditions=None) -> list[int]:
    """``n`` queries whose first retrieval is correct (``success``) or wrong, spread over the
    query conditions when the split has them; deterministic."""
    ok = result.correct[:, 0] if result.correct.shape[1] else np.zeros(len(result.correct), bool)
    idx = np.flatnonzero(ok if success else ~ok)
    if len(idx) == 0:
        return []
    conditions = conditions if conditions is not None else result.split.query_conditions
    if conditions is None:
        return idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int)].tolist()
    chosen: list[int] = []
    by_cond: dict[str, list[int]] = {}
    for i in idx:
        by_cond.setdefault(conditions[i], []).append(int(i))
    while len(chosen) < min(n, len(idx)):
        for cond in sorted(by_cond):
            if by_cond[cond] and len(chosen) < n:
                chosen.append(by_cond[cond].pop(0))
    return sorted(chosen)


def demo_pairs(split, n_pairs: int = 2, conditions=("night", "fog", "snow", "rain", "dusk", "autumn")):
    """Example images: ``n_pairs`` queries in hard conditions, each followed by its nearest
    true-positive database image (the same place seen by day). Returns ``(paths, captions)``."""
    conds = split.query_conditions or ["query"] * split.num_queries
    paths, captions = [], []
    for cond in conditions:
        for q in range(split.num_queries):
            if conds[q] == cond and len(split.positives[q]):
                d = int(split.positives[q][0])
                dist = float(np.linalg.norm(split.query_utms[q] - split.database_utms[d]))
                paths += [split.query_paths[q], split.database_paths[d]]
                captions += [f"query {q} ({cond})", f"database {d} ({dist:.0f} m away)"]
                break
        if len(paths) >= 2 * n_pairs:
            break
    return paths, captions


def preset_table(presets=("SciceVPR-S", "SciceVPR-B", "SciceVPR-L"), per_preset=None, **overrides) -> pd.DataFrame:
    """Sizes of each preset at its image size: backbone blocks, channels, grid, descriptor
    dimension and parameter counts of every part (models built on the ``meta`` device: nothing
    is allocated or loaded). Parameter counts are in millions.

    ``overrides``: ModelConfig fields replaced in every preset; ``per_preset``: preset -> fields
    replaced in that preset only, e.g. ``{settings.preset: settings.model_overrides}`` so that the
    row of the preset a notebook runs is the model it builds (offline: 4 backbone blocks, 112 px)."""

    from ..factory import create_model

    rows = []
    for name in presets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                kw = {**overrides, **dict((per_preset or {}).get(name, {}))}
                teacher = create_model("SuperCricaVPR", name, weights=None, **kw)
                student = create_model("SciceVPR", name, weights=None, **kw)
        cfg = teacher.config

        def millions(module) -> float:
            return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)

        rows.append({
            "preset": name, "DINOv2": cfg.backbone.arch, "blocks": cfg.backbone.depth,
            "blocks fused": fusion_name(cfg.layers).removeprefix("blocks ").removesuffix(" fused"),
            "image (px)": cfg.image_size, "M*C": cfg.in_channels, "C_mix": cfg.mix_dim,
            "grid": f"{cfg.grid_size}x{cfg.grid_size}",
            "descriptor": cfg.descriptor_dim, "backbone (M)": millions(teacher.backbone),
            "1x1 conv (M)": millions(teacher.fusion.conv), "token mixers (M)": millions(teacher.fusion.token_mixers),
            "teacher encoder (M)": millions(teacher.encoder), "student encoder (M)": millions(student.encoder),
        })
    return pd.DataFrame(rows)


def initial_student(teacher, seed: int = 0):
    """The stage-2 student before any distillation step, exactly as training starts it:
    :meth:`SciceVPR.from_teacher` under ``torch.manual_seed(seed)`` (shared frozen backbone,
    frozen copy of the teacher's 1x1 conv, fresh token mixers, GeM and encoder)."""
    from ..models import SciceVPR

    return SciceVPR.from_teacher(teacher, seed=seed).eval()


def training_batch(dataset, places, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (P, K, 3, S, S) images and (P, K) place ids that ``dataset`` (a GSVCitiesDataset)
    yields for the place indices ``places`` at ``epoch``, augmentations included."""
    dataset.set_epoch(epoch)
    items = [dataset[i] for i in places]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def pixel_baseline_row(split, thumb: int = 32, ns=(1, 5, 10, 100), intervals: bool = False) -> dict[str, Any]:
    """Recall@N (percent) of nearest neighbours on raw ``thumb`` x ``thumb`` RGB thumbnails
    (:func:`scicevpr.lab.baselines.pixel_baseline_result`): the floor any learned descriptor should
    beat. A table row (``features``/``model`` = name); ``intervals``: with ``R@N lo`` / ``R@N hi``
    (the bootstrap interval over queries, as ``EvalResult.table(intervals=True)``)."""
    from .baselines import pixel_baseline_result

    return _baseline_row(pixel_baseline_result(split, thumb=thumb, recall_values=ns), thumb * thumb * 3, intervals)


def colour_baseline_row(split, strips: int = 6, bins: int = 12, ns=(1, 5, 10, 100), intervals: bool = False) -> dict[str, Any]:
    """Recall@N (percent) of hue histograms in ``strips`` vertical strips
    (:func:`scicevpr.lab.baselines.colour_baseline_result`): how far colour layout alone, without any
    learning, identifies a place. A table row like :func:`pixel_baseline_row`."""
    from .baselines import colour_baseline_result

    return _baseline_row(colour_baseline_result(split, strips, bins, recall_values=ns), strips * bins, intervals)


def _baseline_row(result, dim: int, intervals: bool) -> dict[str, Any]:
    row = result.table(intervals=intervals).iloc[0].to_dict()
    recalls = {k: v for k, v in row.items() if k.startswith("R@")}
    return {"features": result.model_name, "model": result.model_name, "dim": dim, **recalls}


def flip_example(model, features, split, batch_size: int = 2, num_orders: int = 3, seed: int = 0) -> dict[str, Any] | None:
    """The paper's Fig. 1 on ``split``: a query whose nearest database image alone (batch size 1)
    differs from the one in a batch of ``batch_size`` (file order first, then the random orders
    of :func:`scicevpr.stability.batch_orders`). Prefers a query that is right one way and wrong
    the other; else the first flip. Returns ``query``, ``companions`` (the other queries of its
    batch), ``top1_a`` (alone), ``top1_b`` (in the batch), ``order``, ``cosine`` (of the two
    descriptors), or None when no query changes its top-1.

    ``features``: :func:`scicevpr.stability.stability_features` of ``model``; the settings that
    :func:`scicevpr.stability.batch_stability` has already encoded with them are not encoded again."""
    from ..stability import batch_companions, batch_orders

    top_alone = features.top1(features.alone)
    fallback = None
    for o, order in enumerate(batch_orders(split.num_queries, num_orders, seed)):
        top, cosine = features.setting(model, batch_size, order)
        for i in np.flatnonzero(top != top_alone):
            pos = set(int(d) for d in split.positives[i])
            ex = {"query": int(i), "companions": batch_companions(order, batch_size, int(i)), "order": o,
                  "batch_size": batch_size, "top1_a": int(top_alone[i]), "top1_b": int(top[i]),
                  "name_a": "alone", "name_b": f"in a batch of {batch_size}", "cosine": float(cosine[i])}
            if (int(top_alone[i]) in pos) != (int(top[i]) in pos):
                return ex
            fallback = fallback or ex
    return fallback


def companion_flipper(model, features):
    """``flip(query, companions) -> example``: the paper's Fig. 1 for any choice of batch, what
    :func:`scicevpr.lab.viz.flip_explorer` shows. ``query`` is encoded in one batch with
    ``companions`` (query indices; out-of-range ones and the query itself are left out) by
    ``model``'s encoder (:func:`scicevpr.stability.encode_with_companions`); the example holds
    its best database match alone (``top1_a``) and in that batch (``top1_b``) and the cosine of
    the two descriptors, as :func:`flip_example` does. ``features``:
    :func:`scicevpr.stability.stability_features` of ``model``."""
    from ..stability import descriptor_cosines, encode_with_companions

    num_queries = len(features.alone)

    def flip(query: int, companions: Sequence[int]) -> dict[str, Any]:
        comps = [int(c) for c in companions if 0 <= int(c) < num_queries and int(c) != int(query)]
        d_batch = encode_with_companions(model, features, query, comps)  # (D,)
        return {"query": int(query), "companions": comps, "top1_a": int(features.top1(features.alone[query : query + 1])[0]),
                "top1_b": int(features.top1(d_batch[None])[0]), "name_a": "alone",
                "name_b": f"with {len(comps)} companions",
                "cosine": float(descriptor_cosines(d_batch[None], features.alone[query : query + 1])[0])}

    return flip


def failure_breakdown(result, near: float = 50.0) -> pd.DataFrame:
    """Where the wrong top-1 retrievals of ``result`` (an ``EvalResult``) lie: a near miss
    (farther than the positive radius but within ``near`` metres), the same street farther away,
    or another street (the ``street`` column of the split's metadata; without it, "farther").
    Counts and shares of the wrong queries. Far-away matches on other streets are where
    look-alike places (perceptual aliasing) can act; this table does not say they did."""
    split = result.split
    wrong = np.flatnonzero(~result.correct[:, 0])
    top = result.predictions[wrong, 0]
    dist = np.linalg.norm(split.query_utms[wrong] - split.database_utms[top], axis=1)
    qm, dm = split.query_metadata, split.database_metadata
    has_street = qm is not None and dm is not None and "street" in qm and "street" in dm
    kinds = []
    for k, (i, d) in enumerate(zip(wrong, top)):
        if dist[k] <= near:
            kinds.append(f"near miss ({split.radius:.0f}-{near:.0f} m)")
        elif has_street and qm["street"].iloc[i] == dm["street"].iloc[d]:
            kinds.append(f"same street, > {near:.0f} m")
        else:
            kinds.append("another street" if has_street else f"> {near:.0f} m")
    counts = pd.Series(kinds, dtype=object).value_counts()
    order = [c for c in (f"near miss ({split.radius:.0f}-{near:.0f} m)", f"same street, > {near:.0f} m",
                         "another street", f"> {near:.0f} m") if c in counts.index]
    out = pd.DataFrame({"wrong top-1": [int(counts[c]) for c in order]}, index=pd.Index(order, name="where"))
    out["share (%)"] = (100.0 * out["wrong top-1"] / max(len(wrong), 1)).round(1)
    out["median distance (m)"] = [round(float(np.median(dist[np.array(kinds) == c])), 0) for c in order]
    return out


def informative_recall_values(
    num_database: int, chance: dict[int, float], recall_values: Sequence[int] = (1, 5, 10, 100),
    max_share: float = 0.1, max_chance: float = 90.0,
) -> tuple[int, ...]:
    """The N of ``recall_values`` worth reporting on a split: those whose top N is at most
    ``max_share`` of the database (R@100 needs 1,000 database images) and whose chance level
    (:func:`~scicevpr.evaluate.chance_recall`) is at most ``max_chance`` percent. A recall that a
    random ranking nearly reaches says nothing about the model. N = 1 is always kept."""
    keep = [int(n) for n in recall_values
            if int(n) == 1 or (int(n) <= max_share * num_database and chance.get(int(n), 0.0) <= max_chance)]
    return tuple(keep)


def conditions_with_enough_queries(table: pd.DataFrame, min_queries: int = 20) -> pd.DataFrame:
    """The rows of a per-condition recall table (``recall_by_condition``) with at least
    ``min_queries`` queries ("all" always kept): a recall over a handful of queries moves by
    many points with one query, and its interval says so."""
    return table[(table["queries"] >= min_queries) | (table["condition"] == "all")].reset_index(drop=True)

"""DINOv2 weight files (docs/method.md, "Architecture", step 1): where they are found, how they are
checked and how a backbone loads them. :func:`scicevpr.backbone.build_backbone` uses this module
to turn ``weights=`` into a loaded backbone; the backbone's constructor reads no file.

**Resolution** (:func:`resolve_weights`). ``weights=`` is a path (a folder stands for its
``<hub name>_pretrain.pth``), ``"auto"`` (``$SCICEVPR_WEIGHTS/``, then torch hub's checkpoint
cache, then the official download :data:`WEIGHTS_URL`), or ``None`` (a
random initialisation, flagged by ``model.is_random_init`` and a
:class:`~scicevpr.backbone.RandomWeightsWarning`). A compact backbone trained by ``scicevpr
pretrain-backbone`` (``BackboneConfig.num_blocks``, e.g. ``offline.config.OFFLINE_BACKBONE``) is one fp16
state dict in the same official naming; ``"auto"`` looks for it in ``$SCICEVPR_WEIGHTS/``, then in
the package's ``weights/`` folder (:data:`PACKAGE_WEIGHTS_DIR`) and the hub cache, and never
downloads it.

**Manifests** (:func:`check_manifest`, :func:`weights_record`). When a manifest ``<name>.json``
(format :data:`MANIFEST_FORMAT`) lies beside a weight file, loading checks the file's SHA-256
against it and refuses a file that differs, or one of another backbone than the one built.

**Hashes.** :func:`file_sha256` hashes a file once per process and version of it;
:func:`hash_tensors` feeds named tensors to a hash (the backbone's fingerprint, an index's model
identity and the evaluation's backbone cache all hash weights this way).

**Loading** (:func:`load_weights`). A DINOv2 state dict is read with ``weights_only=True``,
checked against the backbone's names and shapes (a clear error, not a long key list, when it
does not fit) and loaded strictly; the backbone then records where its weights came from
(``weights_path``, ``provenance``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import torch

from .config import BackboneConfig
from .data.paths import WEIGHTS_ENV
from .files import atomic_write, load_torch_file

WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/{hub_name}/{hub_name}_pretrain.pth"
PACKAGE_WEIGHTS_DIR = Path(__file__).parent / "weights"  # compact backbones shipped with scicevpr
MANIFEST_FORMAT = "scicevpr-backbone"  # the "format" entry of a weight file's manifest


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any device; row-major), for hashing."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def hash_tensors(h: Any, named: Iterable[tuple[str, torch.Tensor]], with_layout: bool = False) -> Any:
    """Feed named tensors to the hash ``h`` in the order given: each name (``with_layout``: its
    dtype and shape too), then its bytes. The backbone's fingerprint, an index's model identity
    and the backbone cache's key all hash weights this way; returns ``h``."""
    for name, t in named:
        h.update((f"{name} {t.dtype} {tuple(t.shape)}" if with_layout else name).encode())
        h.update(tensor_bytes(t))
    return h


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, hex. Read once per process and version of the file (its
    resolved path, inode, size and modification time): building several models on one 15 MB
    weight file, or labelling every figure with it, hashes it once. A file modified in the last
    :data:`_SETTLE_NS` is hashed every time (a second write within the file system's timestamp
    granularity could keep size and time), as git treats "racy" index entries."""
    path = Path(path).resolve()
    st = path.stat()
    if time.time_ns() - st.st_mtime_ns < _SETTLE_NS:
        return _sha256_of_version.__wrapped__(str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    return _sha256_of_version(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


_SETTLE_NS = 2_000_000_000  # files younger than 2 s are not cached (see file_sha256)


@functools.lru_cache(maxsize=32)
def _sha256_of_version(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def manifest_path(weights_path: str | os.PathLike) -> Path:
    """The manifest beside a weight file: ``x/name.pth`` -> ``x/name.json``."""
    return Path(weights_path).with_suffix(".json")


def check_manifest(weights_path: str | os.PathLike, config: BackboneConfig | None = None,
                   manifest_format: str = MANIFEST_FORMAT) -> dict | None:
    """Verify a weight file against the manifest beside it, if there is one (else None).

    ``manifest_format``: the manifest's ``format`` entry this kind of file has (a backbone's,
    or ``scicevpr.offline.objectives.CNN_MANIFEST_FORMAT`` for the distillation's CNN teacher); a JSON
    file of another format beside it is no manifest of it.

    The manifest is read on every call; the file's hash is computed once per version of the file
    (:func:`file_sha256`).

    Raises ValueError when the file's SHA-256 differs from the manifest's (a modified or
    swapped file) or when the manifest describes another backbone than ``config``.
    """
    mpath = manifest_path(weights_path)
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise ValueError(f"the weights manifest {str(mpath)!r} is not valid JSON ({e}); restore it or delete it.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != manifest_format:
        return None  # some other JSON file that happens to share the name
    digest = file_sha256(weights_path)
    if digest != manifest.get("sha256"):
        raise ValueError(
            f"{str(weights_path)!r} does not match its manifest {mpath.name}: SHA-256 {digest[:16]}... but the "
            f"manifest records {str(manifest.get('sha256'))[:16]}.... The file was modified or replaced. Restore the "
            f"file the manifest describes, or export it again (scicevpr pretrain-backbone --export)."
        )
    recorded = manifest.get("backbone")
    if config is not None and isinstance(recorded, dict):
        try:
            same = BackboneConfig(**recorded) == config
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"{str(weights_path)!r} holds a backbone built as BackboneConfig(**{recorded}) (its manifest), not "
                f"{config}. Build the model with that backbone, e.g. get_config(..., backbone=BackboneConfig(**manifest['backbone']))."
            )
    return manifest


def weights_record(path: str | os.PathLike) -> tuple[str, dict | None]:
    """``(sha256, manifest)`` of a weight file: its manifest verified against the file
    (:func:`check_manifest`; None when it has none). The file is hashed once per process and
    version (:func:`file_sha256`), however many run folders, figure labels and model builds
    ask. Do not modify the returned manifest."""
    manifest = check_manifest(path)  # hashes the file when it has a manifest: its sha256 is then the file's
    return (file_sha256(path) if manifest is None else manifest["sha256"]), manifest


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, dst: Path, timeout: float = 20.0) -> None:
    """Download ``url`` to ``dst`` atomically (:func:`scicevpr.files.atomic_write`)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        atomic_write(dst, lambda f: shutil.copyfileobj(r, f))


def resolve_weights(weights: str | os.PathLike | None, config: BackboneConfig) -> Path | None:
    """Find the DINOv2 weight file for ``weights`` (a path, ``"auto"`` or ``None``).

    ``"auto"`` looks for ``<hub name>_pretrain.pth`` in ``$SCICEVPR_WEIGHTS/``, then in torch
    hub's checkpoint cache, then tries the official download. Offline, the download fails and
    so does the call, with a message naming the file and where to put it (each call tries again:
    the module keeps no memory of a failure). A compact backbone (``not config.is_official``) is looked for in the
    package's ``weights/`` folder after ``$SCICEVPR_WEIGHTS/`` and is never downloaded: it is
    made by ``scicevpr pretrain-backbone``. A folder given as ``weights`` stands for its
    ``<hub name>_pretrain.pth``.
    """
    if weights is None:
        return None
    fname = f"{config.hub_name}_pretrain.pth"
    if str(weights) != "auto":
        path = Path(weights).expanduser()
        if path.is_dir():
            if (path / fname).is_file():
                return path / fname
            raise FileNotFoundError(
                f"DINOv2 weights {path} is a folder without {fname} (this model's file). Pass the path of the file, "
                f"a folder that holds {fname}, weights='auto', or weights=None for a random initialisation."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"DINOv2 weights file {path} does not exist. Pass the path to {fname}, "
                f"weights='auto' to search ${WEIGHTS_ENV} and the torch hub cache, or "
                f"weights=None for a random initialisation."
            )
        return path
    candidates = []
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env and env.lower() != "random":  # "random": the notebooks' setting for weights=None
        candidates.append(Path(env).expanduser() / fname)  # the user's folder first, before the shipped backbones
    if not config.is_official:
        candidates.append(PACKAGE_WEIGHTS_DIR / fname)
    hub_dir = _hub_checkpoint_dir()
    candidates.append(hub_dir / fname)
    for c in candidates:
        if c.is_file():
            return c
    if not config.is_official:
        raise FileNotFoundError(
            f"weights {fname} of the compact backbone {config} not found (looked in "
            f"{', '.join(str(c.parent) for c in candidates)}). It is not one of Meta's DINOv2 models: make it with "
            f"`scicevpr pretrain-backbone ... --export <folder>/{fname}` and put it in one of these folders (or set "
            f"${WEIGHTS_ENV}), pass its path as weights=, or pass weights=None for a random initialisation."
        )
    url = WEIGHTS_URL.format(hub_name=config.hub_name)
    where = " or ".join(str(c) for c in candidates)
    hint = (
        f"Download {fname} from {url} on a machine with internet access and put it at {where} "
        f"(or set ${WEIGHTS_ENV} to its folder), or pass weights=None for a random "
        f"initialisation."
    )
    try:
        _download(url, hub_dir / fname)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise FileNotFoundError(
            f"DINOv2 weights {fname} not found locally and the download failed ({e}). {hint}"
        ) from None
    return hub_dir / fname


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _preview(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def load_weights(backbone: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load the DINOv2 state dict at ``path`` (official names; fp16 or fp32) into ``backbone``, a
    :class:`~scicevpr.backbone.DinoVisionTransformer` (not imported here: the backbone imports this
    module), strictly, after checking the file against the manifest beside it when there is one
    (:func:`check_manifest`, with ``backbone.config``). The file is read with
    ``weights_only=True``: a weight file holds tensors only. A file that is no state dict of
    tensors, or one with missing, unexpected or differently shaped entries, is refused with a
    summary of what differs. Afterwards ``backbone.is_random_init`` is False and
    ``backbone.weights_path`` / ``backbone.provenance`` name the file. Returns ``backbone``.

    ``path`` is a weight file, e.g. as :func:`resolve_weights` found it.
    """
    config = backbone.config
    check_manifest(path, config)
    state = load_torch_file(path, "DINOv2 weight file", opt_in=None)
    expected = f"{config.hub_name}_pretrain.pth"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"DINOv2 weight file {str(path)!r} does not hold a state dict of tensors (a "
            f"{type(state).__name__}{' with keys ' + _preview(sorted(map(str, state)), 5) if isinstance(state, dict) else ''}). "
            f"Pass {expected} or a file exported by `scicevpr pretrain-backbone --export`; a scicevpr "
            f"checkpoint loads with scicevpr.load_model (--checkpoint), an authors' one with load_official (--official)."
        )
    ours = backbone.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    shapes = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        found = []
        if missing:
            found.append(f"{len(missing)} missing key(s), e.g. {_preview(missing)}")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected key(s), e.g. {_preview(unexpected)}")
        if shapes:
            k = shapes[0]
            found.append(f"{len(shapes)} of another shape, e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(ours[k].shape)} here")
        raise ValueError(
            f"{str(path)!r} is not a DINOv2 {config.arch} state dict (expected {expected}): "
            f"{'; '.join(found)}. Pass the weights of the backbone the preset uses, or a preset whose "
            f"backbone these weights are."
        )
    backbone.load_state_dict(state, strict=True)
    backbone.is_random_init = False
    backbone.weights_path = Path(path)
    backbone.provenance = {"source": "file", "path": str(path), "hub_name": config.hub_name}
    return backbone

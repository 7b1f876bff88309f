"""The two protocols: ``"default"`` (what serves users best) and ``"official"`` (the authors' code).

Every config that computes descriptors, trains or fits a PCA has a ``protocol`` field; this
module holds the decisions that differ, so each is made in one place. The table in
``docs/protocol.md`` lists them with their measured effects.

Under ``"official"`` (read from shuimushan/SciceVPR and Lu-Feng/CricaVPR):

1. evaluation transform: ToTensor -> Normalize -> ``resize([S, S])`` of the float tensor,
   *not* antialiased (torchvision 0.15, their pin) (``datasets_ws.py``, ``BaseDataset`` and
   ``PCADataset``) -> :class:`scicevpr.data.transforms.OfficialEvalTransform`;
2. the cross-image teacher attends within groups of the batch, because ``nn.DataParallel``
   splits every batch over the GPUs that ``CUDA_VISIBLE_DEVICES`` names: 2 in
   ``train_super_cricavpr.py`` (groups of 144 of 288 in training, 8 of 16 in validation), 4 in
   ``train_scicevpr.py`` (the teacher's distillation targets in groups of 72), 1 in ``eval.py``
   (the whole batch). The group sizes are an *inference from their scripts* (the number of
   GPUs each script makes visible), not a number the authors state -> :data:`OFFICIAL_GROUP_SIZES`;
3. training order: ``DataLoader(shuffle=False, drop_last=False)`` over places listed city by
   city in their fixed list (``dataloaders/GSVCities.py``, ``TRAIN_CITIES``), each city's rows
   shuffled once when the dataset is built (``GSVCitiesDataset.__getdataframes``) ->
   ``PlaceBatchSampler(order="official")``;
4. PCA fitted on ``pitts30k/images/train`` (database and queries), at most 2^14 images drawn
   by a shuffled loader (``util.compute_pca``) -> :func:`scicevpr.evaluate.select_pca_images`;
5. fp32 everywhere (no autocast in their code);
6. CricaVPR on Pitts30k/250k evaluated with batch 8: ``infer_batch_size // 2``
   (CricaVPR ``eval.py``; SciceVPR's ``eval.py`` has the lines commented out);
7. stage 2's teacher is stage 1's *last* checkpoint (``--crica_path`` default ``.../last_model.pth``
   in SciceVPR's ``parser.py``);
8. SciceVPR's test dataset casts the UTM coordinates to float32 before the 25 m radius search
   (``datasets_ws.py``: ``.astype(np.float32)``); CricaVPR's keeps float64 (``np.float``).
"""

from __future__ import annotations

import math

PROTOCOLS = ("default", "official")

# Point 2: how many images the cross-image teacher attends across under the authors' scripts
# (global batch / visible GPUs). An inference from CUDA_VISIBLE_DEVICES and nn.DataParallel.
OFFICIAL_GROUP_SIZES = {
    "train": 144,  # stage 1 training: 288 images over "0,1"
    "targets": 72,  # stage 2 distillation targets: 288 images over "0,1,2,3"
    "validation": 8,  # stage 1 validation at batch 16 over "0,1"
}

# Point 3: the authors' city list, in their order (dataloaders/GSVCities.py, TRAIN_CITIES).
OFFICIAL_CITIES = (
    "Bangkok", "BuenosAires", "LosAngeles", "MexicoCity", "OSL", "Rome", "Barcelona", "Chicago",
    "Madrid", "Miami", "Phoenix", "TRT", "Boston", "Lisbon", "Medellin", "Minneapolis", "PRG",
    "WashingtonDC", "Brussels", "London", "Melbourne", "Osaka", "PRS",
)

# Point 4: the folder (relative to the VG root) and the count the authors fit the PCA on.
OFFICIAL_PCA_FOLDER = ("pitts30k", "images", "train")
OFFICIAL_PCA_MAX_IMAGES = 2**14


def check_protocol(protocol: str, where: str = "protocol") -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else a ValueError with the choices."""
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"{where}={protocol!r}: expected one of {PROTOCOLS} ('official' reproduces the authors' "
            f"code; see the table of differences in docs/protocol.md)."
        )
    return protocol


def check_group_size(group_size: int | None, name: str) -> int | None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"{name} must be a positive int (images the cross-image encoder attends across) or None "
                         f"(the whole batch), got {group_size!r}")
    return group_size


def num_groups(nominal_batch: int, group_size: int | None) -> int:
    """How many replicas ``nn.DataParallel`` would split a batch of ``nominal_batch`` over so
    that each holds ``group_size`` images: ``ceil(nominal_batch / group_size)`` (1 for None)."""
    if group_size is None or group_size >= nominal_batch:
        return 1
    return math.ceil(nominal_batch / group_size)


def eval_batch_size(protocol: str, model_class: str, dataset: str, batch_size: int) -> int:
    """Point 6: CricaVPR's ``eval.py`` halves the batch on Pitts30k / Pitts250k."""
    if protocol == "official" and model_class == "CricaVPR" and dataset.lower().startswith("pitts"):
        return max(1, batch_size // 2)
    return batch_size


def utm_dtype(protocol: str, model_class: str | None = None) -> str:
    """Point 8: ``"float32"`` for SciceVPR's test code (any model but CricaVPR) under the official
    protocol, else ``"float64"``."""
    return "float32" if protocol == "official" and model_class != "CricaVPR" else "float64"


def teacher_checkpoint_name(protocol: str) -> str:
    """Point 7: the stage-1 checkpoint stage 2 distils from when given a run folder."""
    return "last.pt" if protocol == "official" else "best.pt"

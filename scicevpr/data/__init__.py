"""Datasets: the VG-benchmark layout (evaluation), GSV-Cities (training), the offline synthetic
benchmark in both layouts, and the shared transforms / JPEG decoding paths.

Real datasets are found under ``$SCICEVPR_DATA`` (or a root passed explicitly); see data/README.md.
"""

from .decode import (
    CorruptImageError,
    JpegBytesDataset,
    collate_jpeg_bytes,
    decode_jpeg_batch,
    decode_jpeg_bytes,
)
from .gsv import GSV_COLUMNS, GSVCitiesDataset, gsv_image_name
from .paths import DATA_ENV, data_root
from .synthetic import PRESETS as SYNTHETIC_PRESETS
from .synthetic import (
    SyntheticBenchmark,
    SyntheticPreset,
    default_synthetic_dir,
    generate,
    pixel_baseline_recall,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    normalize_uint8_batch,
    train_transform,
)
from .vg import ImageFileDataset, VGSplit, load_vg_split, parse_utm

__all__ = [
    "DATA_ENV",
    "GSV_COLUMNS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_PRESETS",
    "CorruptImageError",
    "GSVCitiesDataset",
    "ImageFileDataset",
    "JpegBytesDataset",
    "SyntheticBenchmark",
    "SyntheticPreset",
    "VGSplit",
    "collate_jpeg_bytes",
    "data_root",
    "decode_jpeg_batch",
    "decode_jpeg_bytes",
    "default_synthetic_dir",
    "eval_transform",
    "generate",
    "gsv_image_name",
    "load_vg_split",
    "normalize_uint8_batch",
    "parse_utm",
    "pixel_baseline_recall",
    "train_transform",
]

"""Datasets: the VG-benchmark layout (evaluation), GSV-Cities (training) and the shared
transforms / JPEG decoding paths. The offline synthetic benchmark, written in both layouts, is
:mod:`scicevpr.offline.synthetic`.

Real datasets are found under ``$SCICEVPR_DATA`` (or a root passed explicitly); see data/README.md.
"""

from .._lazy import lazy_attributes as _lazy_attributes, moved_attributes as _moved_attributes

_EXPORTS = {
    "decode": ("CorruptImageError", "JpegBytesDataset", "collate_jpeg_bytes", "decode_jpeg_batch", "decode_jpeg_bytes"),
    "gsv": ("GSV_COLUMNS", "GSVCitiesDataset", "gsv_image_name"),
    "paths": ("DATA_ENV", "data_root"),
    "transforms": ("IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "normalize_uint8_batch", "train_transform"),
    "vg": ("ImageFileDataset", "VGSplit", "load_vg_split", "parse_utm"),
}
# Loaded on first use, so that importing the package does not import torch. The synthetic
# benchmark's names still import from here, as from scicevpr.offline.synthetic, with a warning.
__getattr__ = _moved_attributes(
    __name__,
    {"scicevpr.offline.synthetic": ("SyntheticBenchmark", "SyntheticPreset", "default_synthetic_dir", "generate",
                                    "SYNTHETIC_PRESETS=PRESETS")},
    fallback=_lazy_attributes(__name__, {name: (module, name) for module, names in _EXPORTS.items() for name in names},
                              globals()),
)

__all__ = [
    "DATA_ENV",
    "GSV_COLUMNS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "GSVCitiesDataset",
    "ImageFileDataset",
    "JpegBytesDataset",
    "VGSplit",
    "collate_jpeg_bytes",
    "data_root",
    "decode_jpeg_batch",
    "decode_jpeg_bytes",
    "eval_transform",
    "gsv_image_name",
    "load_vg_split",
    "normalize_uint8_batch",
    "parse_utm",
    "train_transform",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

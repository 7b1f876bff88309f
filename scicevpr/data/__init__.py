"""Datasets: the VG-benchmark layout (evaluation), GSV-Cities (training), the offline synthetic
benchmark in both layouts, and the shared transforms / JPEG decoding paths.

Real datasets are found under ``$SCICEVPR_DATA`` (or a root passed explicitly); see data/README.md.
"""

from .._lazy import lazy_attributes as _lazy_attributes

_EXPORTS = {
    "decode": ("CorruptImageError", "JpegBytesDataset", "collate_jpeg_bytes", "decode_jpeg_batch", "decode_jpeg_bytes"),
    "gsv": ("GSV_COLUMNS", "GSVCitiesDataset", "gsv_image_name"),
    "paths": ("DATA_ENV", "data_root"),
    "synthetic": ("SyntheticBenchmark", "SyntheticPreset", "default_synthetic_dir", "generate"),
    "transforms": ("IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "normalize_uint8_batch", "train_transform"),
    "vg": ("ImageFileDataset", "VGSplit", "load_vg_split", "parse_utm"),
}
# Loaded on first use, so that ``scicevpr.data.synthetic`` (the ``synth`` command) does not import torch.
__getattr__ = _lazy_attributes(__name__, {
    "SYNTHETIC_PRESETS": ("synthetic", "PRESETS"),
    **{name: (module, name) for module, names in _EXPORTS.items() for name in names},
}, globals())

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
    "train_transform",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

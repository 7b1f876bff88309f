"""Image decoding: the PIL path used inside DataLoader workers and a batched JPEG path.

Two ways to turn files into model inputs, with identical resize + normalisation
(``transforms.normalize_uint8_batch``):

* PIL (``load_rgb`` + ``transforms.eval_transform``), run in DataLoader workers
  (``vg.ImageFileDataset``);
* batched ``torchvision.io.decode_jpeg``: workers only read the file bytes
  (``JpegBytesDataset``), the main process decodes a whole batch at once, on the GPU (nvJPEG) when
  ``device`` is CUDA, else on the CPU (``decode_jpeg_bytes`` / ``decode_jpeg_batch``).

On the CPU both decoders are libjpeg-turbo and agree to the byte on the files tested; nvJPEG on a
GPU may differ by a few grey levels (IDCT and chroma upsampling rounding).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from .transforms import normalize_uint8_batch, to_uint8_tensor

PathLike = str | os.PathLike
JPEG_SOI = [0xFF, 0xD8]  # the first two bytes of every JPEG file (start of image)


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, or not an image)."""


def corrupt_image_message(path: PathLike, reason: object) -> str:
    return (
        f"cannot decode image {str(path)!r} ({reason}). The file is corrupt or truncated: "
        "download it again or delete it; to go on without it pass skip_corrupt=True (command line: "
        "--skip-corrupt; the skipped files are then counted and reported)."
    )


def too_large_message(path: PathLike, reason: object) -> str:
    return (
        f"image {str(path)!r} is too large to decode safely ({reason}). Street-view images have a few "
        "megapixels: resize the file (e.g. to 2048 px on its long side) or delete it; to go on without it "
        "pass skip_corrupt=True (command line: --skip-corrupt)."
    )


SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
"""PIL modes of 16-bit (and 32-bit integer) pixels: 16-bit PNG, TIFF and PGM/PPM greys."""


def to_rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit RGB picture of ``im`` whatever its PIL mode. PIL's own ``convert("RGB")`` clips
    wider pixels at 255 (a 16-bit photo turns almost white), so they are scaled instead:
    integer modes (:data:`SIXTEEN_BIT_MODES`) from the 16-bit range, ``v * 255 / 65535``;
    float ``"F"`` pixels from [0, 1] when they lie in it, else taken as 0-255 and clipped. Every
    other mode (1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, ...) is 8-bit and converts as PIL does
    (alpha dropped)."""
    if im.mode in SIXTEEN_BIT_MODES:
        v = np.asarray(im, dtype=np.float64)  # (H, W)
        grey = np.clip(np.rint(v * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)  # (H, W)
        scale = 255.0 if v.size and v.min() >= 0.0 and v.max() <= 1.0 else 1.0
        grey = np.clip(np.rint(v * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: PathLike, data: bytes | None = None) -> Image.Image:
    """Open and fully decode an image as RGB; raise ``CorruptImageError`` naming the file if it fails
    (corrupt, truncated, or above PIL's decompression-bomb limit). ``data``: the file's bytes,
    already read (decoded from memory; ``path`` then only names it)."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im.load()  # force the full decode here, so truncation is caught now
            return to_rgb8(im)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file {str(path)!r} does not exist (was the dataset moved?)") from e
    except (IsADirectoryError, PermissionError) as e:  # not the image's content: say so
        raise CorruptImageError(
            f"cannot read image file {str(path)!r} ({e.strerror}): make it a readable file, or remove it; to go on "
            "without it pass skip_corrupt=True (command line: --skip-corrupt)."
        ) from None
    except Image.DecompressionBombError as e:
        raise CorruptImageError(too_large_message(path, e)) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise CorruptImageError(corrupt_image_message(path, e)) from e


def is_decodable(path: PathLike) -> bool:
    """True when the whole image decodes. JPEGs are decoded at 1/8 scale (DCT scaling), which still
    reads every entropy-coded byte, so truncation and corruption are caught at a fraction of the cost.
    An image above PIL's decompression-bomb limit counts as not decodable."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def find_corrupt_images(paths: Sequence[PathLike], progress: bool = False) -> list[Path]:
    """Paths among ``paths`` that do not decode (missing files count as corrupt)."""
    it = paths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(paths, desc="checking images", unit="img")
    return [Path(p) for p in it if not is_decodable(p)]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TAIL_BYTES = 1024  # where the end marker is looked for (encoders may pad a few bytes after it)


def _looks_whole(path: PathLike) -> bool:
    """The quick test of :func:`find_damaged_images`: a JPEG starts with SOI and holds EOI
    (``FF D9``) in its last KiB, a PNG holds its ``IEND`` chunk there. Any other file is not
    judged here (False)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError:
        return False
    if head[:2] == bytes(JPEG_SOI):
        return b"\xff\xd9" in tail
    return head == PNG_SIGNATURE and b"IEND" in tail


def find_damaged_images(paths: Sequence[PathLike], progress: bool = False) -> list[Path]:
    """Paths among ``paths`` that do not decode, found at the cost of reading a few bytes of each:
    a file that fails the quick test (truncated, empty, missing, not a JPEG or PNG, see
    :func:`_looks_whole`) is decoded to confirm. Unlike :func:`find_corrupt_images` (every file
    decoded), a file whose ends are intact but whose middle is damaged is not found here; it
    raises ``CorruptImageError`` when it is loaded. Seconds for a GSV-Cities-size folder."""
    it = paths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(paths, desc="checking image files", unit="img")
    return [Path(p) for p in it if not _looks_whole(p) and not is_decodable(p)]


def check_images(paths: Sequence[PathLike], where: str, progress: bool = False) -> None:
    """Raise ``CorruptImageError`` naming the damaged images among ``paths``
    (:func:`find_damaged_images`) and the two ways on: a training meets every image only over
    its epochs, so a damaged file is refused before the first step rather than found epochs later."""
    bad = find_damaged_images(paths, progress=progress)
    if bad:
        first = ", ".join(repr(str(p)) for p in bad[:3])
        raise CorruptImageError(
            f"{len(bad)} of {len(paths)} images in {where} cannot be decoded (truncated, corrupt or not images): "
            f"{first}{' ...' if len(bad) > 3 else ''}. Download them again or delete them; to go on without them "
            "pass skip_corrupt=True (command line: --skip-corrupt: every image is then test-decoded, and the ones "
            "that fail are left out and counted)."
        )


def warn_skipped(skipped: Sequence[PathLike], total: int, where: str) -> None:
    """Report skipped corrupt images (a warning, so that it is visible and testable)."""
    if skipped:
        first = ", ".join(repr(str(p)) for p in list(skipped)[:3])
        more = " ..." if len(skipped) > 3 else ""
        warnings.warn(
            f"skipped {len(skipped)} of {total} images in {where} that could not be decoded: {first}{more}",
            stacklevel=3,
        )


def read_file_bytes(path: PathLike) -> torch.Tensor:
    """The raw bytes of a file as a 1-D uint8 tensor (what ``decode_jpeg`` consumes).

    An ordinary CPU tensor (not ``torchvision.io.read_file``'s file-backed storage), so that
    DataLoader workers can hand it to the main process through shared memory.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file {str(path)!r} does not exist (was the dataset moved?)") from e
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def default_device() -> torch.device:
    """CUDA when a GPU is present (nvJPEG decoding), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _decode_jpeg(data, device: torch.device):
    # torchvision >= 0.29 flags its image codecs as deprecated in favour of TorchCodec; decode_jpeg
    # is still the batched nvJPEG entry point, so the notice is silenced here only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io.*")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, device: torch.device, path: PathLike | None) -> torch.Tensor:
    """(N,) bytes -> (3, H, W) uint8 on ``device``. Content that is not JPEG (e.g. a PNG named
    ``.jpg``, which PIL, ``skip_corrupt``'s check and the CPU path all read) is decoded by PIL."""
    if data[:2].tolist() != JPEG_SOI:
        return to_uint8_tensor(load_rgb(path if path is not None else "<bytes>", data.numpy().tobytes())).to(device)
    try:
        return _decode_jpeg(data, device)
    except RuntimeError as e:
        raise CorruptImageError(corrupt_image_message(path if path is not None else "<bytes>", e)) from e


def decode_jpeg_bytes(
    datas: Sequence[torch.Tensor],
    image_size: int,
    device: torch.device | str | None = None,
    paths: Sequence[PathLike] | None = None,
) -> torch.Tensor:
    """Decode a batch of JPEG byte tensors and resize + normalise them.

    Args:
        datas: B 1-D uint8 CPU tensors, each the bytes of one JPEG file.
        image_size: S, the model's square input side.
        device: where to decode: ``"cuda"`` uses nvJPEG (batched), ``"cpu"`` libjpeg-turbo;
            None picks ``default_device()``.
        paths: the files the bytes came from, only to name the culprit in errors.
    Returns:
        (B, 3, S, S) float32 tensor on ``device``.
    """
    device = default_device() if device is None else torch.device(device)
    datas = list(datas)
    if not datas:
        raise ValueError("decode_jpeg_bytes got an empty batch")
    if paths is not None and len(paths) != len(datas):
        raise ValueError(f"got {len(paths)} paths for {len(datas)} byte tensors")
    try:
        images = _decode_jpeg(datas, device)  # B x (3, H_i, W_i) uint8
    except RuntimeError:
        # Decode one by one to name the file that failed.
        images = [_decode_one(d, device, None if paths is None else paths[i]) for i, d in enumerate(datas)]
    return normalize_uint8_batch(images, image_size)  # (B, 3, S, S)


def decode_jpeg_batch(
    paths: Sequence[PathLike], image_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Read JPEG files and decode them as one batch (GPU when ``device`` is CUDA).

    Returns (B, 3, S, S) float32 on ``device``, equal to ``eval_transform(S)`` applied to the
    PIL-decoded files up to decoder rounding.
    """
    paths = list(paths)
    return decode_jpeg_bytes([read_file_bytes(p) for p in paths], image_size, device, paths)


class JpegBytesDataset(Dataset):
    """Yields ``(bytes (N,) uint8 tensor, index)``: file reading in DataLoader workers, decoding left
    to ``decode_jpeg_bytes`` on the main process (batched, on the GPU when present).

    Use with ``collate_fn=collate_jpeg_bytes``.
    """

    def __init__(self, paths: Sequence[PathLike]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return read_file_bytes(self.paths[index]), index


def collate_jpeg_bytes(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Keep byte tensors as a list (lengths differ); stack the indices -> (B,) long."""
    datas = [b[0] for b in batch]
    indices = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return datas, indices

"""Input pipeline: PIL decoding in DataLoader workers vs batched torchvision.io.decode_jpeg.

Tolerance: on the CPU both decoders are libjpeg-turbo; outputs must agree within 2 grey levels
(2/255/std after normalisation, about 0.035), which covers IDCT/upsampling rounding differences
between libjpeg builds. On a GPU (nvJPEG) the same check allows 6 grey levels at any pixel and a
mean difference under half a level.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from scicevpr.data.decode import (
    CorruptImageError,
    JpegBytesDataset,
    collate_jpeg_bytes,
    decode_jpeg_batch,
    decode_jpeg_bytes,
    load_rgb,
)
from scicevpr.data.transforms import IMAGENET_STD
from scicevpr.data.vg import ImageFileDataset

LEVEL = 1 / 255 / min(IMAGENET_STD)  # one grey level, in normalised units


@pytest.fixture
def jpegs(tmp_path, make_jpeg):
    sizes = [(64, 48), (80, 80), (50, 70), (64, 48), (33, 47)]
    return [make_jpeg(tmp_path / f"img{i}.jpg", size=s, seed=i) for i, s in enumerate(sizes)]


def _pil_batch(paths, size):
    ds = ImageFileDataset(paths, image_size=size)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_cpu_batched_decode_matches_pil_path(jpegs):
    pil = _pil_batch(jpegs, 32)
    batched = decode_jpeg_batch(jpegs, 32, device="cpu")
    assert batched.shape == pil.shape == (len(jpegs), 3, 32, 32)
    assert batched.dtype == torch.float32
    diff = (batched - pil).abs()
    assert diff.max().item() <= 2 * LEVEL + 1e-6, f"max diff {diff.max().item() / LEVEL:.2f} grey levels"


def test_bytes_dataset_in_workers_then_batched_decode(jpegs):
    loader = DataLoader(JpegBytesDataset(jpegs), batch_size=2, num_workers=2, collate_fn=collate_jpeg_bytes)
    out = torch.zeros(len(jpegs), 3, 24, 24)
    for datas, idx in loader:
        assert isinstance(datas, list) and idx.dtype == torch.long
        out[idx] = decode_jpeg_bytes(datas, 24, device="cpu")
    torch.testing.assert_close(out, decode_jpeg_batch(jpegs, 24, device="cpu"), atol=0, rtol=0)


def test_pil_dataset_in_workers(jpegs):
    loader = DataLoader(ImageFileDataset(jpegs, image_size=28), batch_size=2, num_workers=2)
    seen = []
    for x, idx in loader:
        assert x.shape[1:] == (3, 28, 28)
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(jpegs)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_gpu_decode_matches_cpu(jpegs):
    cpu = decode_jpeg_batch(jpegs, 32, device="cpu")
    gpu = decode_jpeg_batch(jpegs, 32, device="cuda")
    assert gpu.device.type == "cuda"
    diff = (gpu.cpu() - cpu).abs()
    assert diff.max().item() <= 6 * LEVEL and diff.mean().item() <= 0.5 * LEVEL


def test_truncated_jpeg_is_named_in_both_paths(jpegs, tmp_path):
    bad = tmp_path / "truncated.jpg"
    data = jpegs[1].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match="truncated.jpg") as e:
        load_rgb(bad)
    assert "skip_corrupt=True" in str(e.value)
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        decode_jpeg_batch([jpegs[0], bad], 32, device="cpu")


def test_not_an_image_and_missing_file(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg at all" * 10)
    with pytest.raises(CorruptImageError, match="junk.jpg"):
        load_rgb(junk)
    with pytest.raises(CorruptImageError, match="junk.jpg"):
        decode_jpeg_batch([junk], 16, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        decode_jpeg_batch([tmp_path / "missing.jpg"], 16, device="cpu")
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(CorruptImageError, match=r"cannot read image file .*folder.jpg' \(Is a directory\): make it a readable file"):
        load_rgb(tmp_path / "folder.jpg")


def test_a_png_named_jpg_decodes_in_the_batched_path_as_in_the_pil_path(jpegs, tmp_path):
    """PIL (the worker path, and skip_corrupt's check) reads a PNG whatever its name; the
    batched JPEG path (nvJPEG on a GPU) must too, not call it corrupt."""
    from PIL import Image

    from scicevpr.data.decode import is_decodable

    png = tmp_path / "really_a_png.jpg"
    Image.open(jpegs[2]).save(png, format="PNG")
    assert png.read_bytes()[:4] == b"\x89PNG" and is_decodable(png)
    batched = decode_jpeg_batch([jpegs[0], png], 32, device="cpu")
    torch.testing.assert_close(batched[1:], _pil_batch([png], 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[:1], decode_jpeg_batch([jpegs[0]], 32, device="cpu"), atol=0, rtol=0)


def test_an_image_above_the_decompression_bomb_limit_is_named(tmp_path, make_jpeg, monkeypatch):
    """A 210-megapixel file behaves as this 64 x 48 one does under a 1,000-pixel limit."""
    from PIL import Image

    from scicevpr.data.decode import is_decodable, load_rgb

    path = make_jpeg(tmp_path / "huge.jpg", size=(64, 48))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above twice the limit
    with pytest.raises(CorruptImageError, match=r"huge.jpg' is too large to decode safely.*--skip-corrupt"):
        load_rgb(path)
    assert not is_decodable(path)  # so skip_corrupt=True leaves it out


def test_the_quick_file_check_finds_what_does_not_decode_and_passes_what_does(jpegs, tmp_path):
    """find_damaged_images reads a few bytes of each file, and decodes only those that fail that
    test: a truncated, empty, missing or junk file is found; a whole JPEG, one padded after its
    end marker, a PNG and a BMP (no quick test: decoded) are not."""
    from PIL import Image

    from scicevpr.data.decode import check_images, find_damaged_images

    data = jpegs[1].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "padded.jpg").write_bytes(data + b"\0" * 300)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image" * 20)
    Image.open(jpegs[0]).save(tmp_path / "photo.png")
    Image.open(jpegs[0]).save(tmp_path / "photo.bmp")
    png = (tmp_path / "photo.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    good = [*jpegs, tmp_path / "padded.jpg", tmp_path / "photo.png", tmp_path / "photo.bmp"]
    bad = [tmp_path / n for n in ("cut.jpg", "empty.jpg", "junk.jpg", "cut.png", "missing.jpg")]
    assert find_damaged_images(good + bad) == bad
    check_images(good, "the good files")  # no error
    with pytest.raises(CorruptImageError, match=r"5 of 13 images in the folder cannot be decoded.*cut\.jpg.*--skip-corrupt"):
        check_images(good + bad, "the folder")

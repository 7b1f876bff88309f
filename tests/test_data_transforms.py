"""Transforms: the evaluation resize + ImageNet normalisation, the training augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from scicevpr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    normalize_uint8_batch,
    train_transform,
)


def test_imagenet_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_eval_transform_hard_resizes_and_normalises():
    rgb = (200, 100, 50)
    image = Image.new("RGB", (640, 480), rgb)  # 4:3, must become square without cropping
    x = eval_transform(224)(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(denormalize(x)[:, 0, 0], torch.tensor(rgb, dtype=torch.float32) / 255, atol=1e-5, rtol=0)


def test_eval_transform_keeps_the_whole_frame():
    # Left half red, right half blue: a hard resize keeps both halves (a centre crop would not
    # change this, but a crop of a tall image would lose the top/bottom bands tested here).
    a = np.zeros((300, 100, 3), dtype=np.uint8)
    a[:30] = (255, 0, 0)
    a[-30:] = (0, 0, 255)
    x = denormalize(eval_transform(50)(Image.fromarray(a)))
    assert x[0, 0].mean() > 0.9 and x[2, -1].mean() > 0.9


def test_eval_transform_converts_grey_and_rgba():
    for mode in ("L", "RGBA", "P"):
        assert eval_transform(32)(Image.new(mode, (40, 30))).shape == (3, 32, 32)


def test_pil_path_and_tensor_path_share_one_implementation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    pil = eval_transform(56)(Image.fromarray(a))
    t = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)  # (H, W, 3) -> (1, 3, H, W)
    assert torch.equal(normalize_uint8_batch(t, 56)[0], pil)
    # A list of differently sized images is resized one by one and stacked.
    b = rng.integers(0, 256, (3, 40, 60), dtype=np.uint8)
    out = normalize_uint8_batch([t[0], torch.from_numpy(b)], 56)
    assert out.shape == (2, 3, 56, 56)
    assert torch.equal(out[0], pil)


def test_normalize_uint8_batch_rejects_floats_and_bad_sizes():
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8_batch(torch.zeros(1, 3, 8, 8), 8)
    with pytest.raises(ValueError, match="image_size"):
        normalize_uint8_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="empty"):
        normalize_uint8_batch([], 8)


def test_train_transform_shape_and_reproducible_under_a_seed():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    tf = train_transform(64)
    assert tf.randaugment.num_ops == 3
    torch.manual_seed(3)
    a = tf(image)
    torch.manual_seed(3)
    b = tf(image)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    outs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        outs.add(tf(image).sum().item())
    assert len(outs) > 1  # RandAugment does change the image
    plain = train_transform(64, randaugment_ops=0)(image)
    assert torch.equal(plain, eval_transform(64)(image))  # same resize + normalisation as evaluation


def test_image_size_is_checked_in_one_place_and_given_once(tmp_path):
    """``config.check_image_size`` is the one check of S (the transforms and ModelConfig use it);
    a dataset takes its size from its transform, and refuses another size beside it."""
    from scicevpr.config import check_image_size, get_config
    from scicevpr.data.transforms import eval_transform
    from scicevpr.data.vg import ImageFileDataset

    assert check_image_size(112, 14) == 112
    for bad in (0, -14, True, 1.5, "112"):
        with pytest.raises(ValueError, match="image_size must be a positive int"):
            check_image_size(bad)
    with pytest.raises(ValueError, match=r"image_size=100 is not a multiple of the patch size 14; use e.g. 98 or 112"):
        check_image_size(100, 14)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        get_config("SciceVPR-S", image_size=0)  # a 0 x 0 grid was accepted before
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        eval_transform(0)
    paths = [tmp_path / "a.jpg"]
    assert ImageFileDataset(paths, transform=eval_transform(56)).image_size == 56
    assert ImageFileDataset(paths, image_size=42).image_size == 42
    assert ImageFileDataset(paths, image_size=56, transform=eval_transform(56)).image_size == 56
    with pytest.raises(ValueError, match="image_size=64 but the transform resizes to 56: pass one of them"):
        ImageFileDataset(paths, image_size=64, transform=eval_transform(56))

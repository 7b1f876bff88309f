"""protocol="official": each of the authors' behaviours on small data (scicevpr.protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import scicevpr
from scicevpr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from scicevpr.data.vg import list_images, load_vg_split, radius_positives
from scicevpr.config import EvalConfig
from scicevpr.evaluate import compute_descriptors, fit_pca_on_images, official_pca_images, select_pca_images
from scicevpr.protocol import OFFICIAL_CITIES, eval_batch_size, num_groups, utm_dtype
from scicevpr.config import TrainConfig
from scicevpr.train import PlaceBatchSampler, teacher_path, training_cities

CFG = EvalConfig(num_workers=0, progress=False)


def _photo(h=512, w=600, seed=0) -> Image.Image:
    """A photo-like image: smooth gradients plus fine texture (where antialiasing matters)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    smooth = 127 + 80 * np.sin(xx / 37.0)[..., None] * np.cos(yy / 23.0)[..., None] * rng.uniform(0.5, 1, 3)
    fine = 40 * np.sign(np.sin(xx / 1.7 + yy / 2.3))[..., None]
    return Image.fromarray(np.clip(smooth + fine + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))


# ---- point 1: the evaluation transform ------------------------------------------------------


def test_official_transform_equals_the_authors_torchvision_pipeline():
    image = _photo()
    authors = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD), T.Resize((224, 224), antialias=False)])
    ours = eval_transform(224, protocol="official")(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, authors(image), atol=1e-5, rtol=0)
    default = eval_transform(224)(image)
    rel = float((default - ours).norm() / ours.norm())
    assert rel > 0.01, "the default (antialiased) resize must differ from the authors' on a textured photo"


def test_unknown_protocol_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="official"):
        eval_transform(224, protocol="paper")
    with pytest.raises(ValueError, match="official"):
        EvalConfig(protocol="paper")
    with pytest.raises(ValueError, match="fp32"):
        EvalConfig(protocol="official", fast=True)
    with pytest.raises(ValueError, match="fp32"):
        TrainConfig(protocol="official", amp=True)
    with pytest.raises(ValueError, match="positive int"):
        EvalConfig(encoder_group_size=0)


# ---- point 2: cross-image groups ------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return scicevpr.SuperCricaVPR("SciceVPR-S", weights=None, image_size=56).eval()


@torch.no_grad()
def test_group_size_g_equals_encoding_each_chunk_of_g_alone(teacher):
    g = 4
    r = torch.randn(3 * g, 14, teacher.config.mix_dim)  # (B, 14, C_mix)
    grouped = teacher.encode(r, groups=num_groups(3 * g, g))
    chunks = torch.cat([teacher.encode(r[i : i + g]) for i in range(0, 3 * g, g)])
    torch.testing.assert_close(grouped, chunks, atol=0, rtol=0)
    assert not torch.allclose(grouped, teacher.encode(r), atol=1e-4), "groups must change the teacher"
    # A partial batch is split as nn.DataParallel splits it (torch.chunk over the same GPUs).
    torch.testing.assert_close(teacher.encode(r[:5], groups=2),
                               torch.cat([teacher.encode(r[:3]), teacher.encode(r[3:5])]), atol=0, rtol=0)


def test_descriptors_under_a_group_size_equal_each_group_run_separately(teacher, tmp_path, make_jpeg):
    paths = [make_jpeg(tmp_path / f"{i:02d}.jpg", seed=i) for i in range(8)]
    grouped = compute_descriptors(teacher, paths, EvalConfig(batch_size=8, encoder_group_size=4, num_workers=0, progress=False))
    alone = np.concatenate([compute_descriptors(teacher, paths[i : i + 4], EvalConfig(batch_size=4, num_workers=0, progress=False))
                            for i in (0, 4)])
    np.testing.assert_allclose(grouped, alone, atol=1e-6, rtol=0)


def test_official_group_sizes_follow_the_authors_gpu_counts():
    official, default = TrainConfig(protocol="official"), TrainConfig()
    assert [official.group_size(w) for w in ("train", "targets", "validation")] == [144, 72, 8]
    assert [default.group_size(w) for w in ("train", "targets", "validation")] == [None, None, None]
    assert TrainConfig(protocol="official", encoder_group_size=96).group_size("train") == 96
    assert num_groups(288, 144) == 2 and num_groups(288, 72) == 4 and num_groups(16, 8) == 2
    assert num_groups(32, 144) == 1 and num_groups(16, None) == 1
    assert official.use_amp() is False and default.use_amp() is None


# ---- point 3: training order ----------------------------------------------------------------


def test_official_sampler_yields_the_authors_order():
    cities = np.array([0] * 5 + [1] * 7 + [2] * 4)  # 16 places of 3 cities, in list order
    s = PlaceBatchSampler(16, 3, seed=1, order="official", place_cities=cities)
    epochs = []
    for e in range(3):
        s.set_epoch(e)
        epochs.append(list(s))
    assert epochs[0] == epochs[1] == epochs[2], "the same order every epoch"
    batches = epochs[0]
    assert len(s) == len(batches) == 6 and [len(b) for b in batches] == [3] * 5 + [1], "last partial batch kept"
    flat = [p for b in batches for p in b]
    assert sorted(flat) == list(range(16))
    assert [cities[p] for p in flat] == sorted(cities.tolist()), "cities in list order, never mixed"
    assert flat != list(range(16)), "places shuffled (once) within each city"
    # The default protocol reshuffles every epoch, mixes cities and drops the partial batch.
    d = PlaceBatchSampler(16, 3, seed=1)
    first = list(d)
    d.set_epoch(1)
    assert len(first) == 5 and first != list(d)
    with pytest.raises(ValueError, match="partial batch"):
        PlaceBatchSampler(17, 8, order="official", world_size=2)  # 1 place left for 2 processes


def test_official_cities_are_the_authors_list_when_the_dataset_has_them(tmp_path):
    (tmp_path / "Dataframes").mkdir()
    for c in OFFICIAL_CITIES:
        (tmp_path / "Dataframes" / f"{c}.csv").write_text("")
    assert training_cities(TrainConfig(protocol="official", gsv_root=str(tmp_path))) == OFFICIAL_CITIES
    assert training_cities(TrainConfig(gsv_root=str(tmp_path))) is None  # default: sorted names
    (tmp_path / "Dataframes" / "Rome.csv").unlink()
    assert training_cities(TrainConfig(protocol="official", gsv_root=str(tmp_path))) is None


# ---- point 4: the PCA set -------------------------------------------------------------------


def test_official_pca_fits_on_pitts30k_train_at_most_n_shuffled(tmp_path, make_jpeg, teacher, monkeypatch):
    train = tmp_path / "pitts30k" / "images" / "train"
    names = [f"database/@{i}@0@.jpg" for i in range(6)] + [f"queries/@{i}@5@.jpg" for i in range(4)]
    for i, n in enumerate(names):
        make_jpeg(train / n, seed=i)
    make_jpeg(train / "database" / "._@9@9@.jpg", seed=99)  # a macOS resource fork: not an image
    make_jpeg(tmp_path / "pitts30k" / "images" / "test" / "database" / "@1@1@.jpg")  # not the PCA folder
    paths = official_pca_images(tmp_path)
    assert [p.relative_to(train).as_posix() for p in paths] == sorted(names)

    chosen = select_pca_images(paths, max_images=7, seed=0, protocol="official")
    assert len(chosen) == 7 and len(set(chosen)) == 7 and set(chosen) <= set(paths)
    assert chosen == [paths[i] for i in np.random.default_rng(0).permutation(10)[:7]], "a shuffled loader's order"
    default = select_pca_images(paths, max_images=7, seed=0)
    assert default == sorted(default), "the default keeps file order"
    assert select_pca_images(paths, max_images=2**14, protocol="official") != paths  # all of them, shuffled
    assert sorted(select_pca_images(paths, max_images=2**14, protocol="official")) == paths

    seen = {}

    def fake(model, ps, config, **kw):
        seen["paths"] = list(ps)
        return np.random.default_rng(0).normal(size=(len(ps), 8)).astype(np.float32)

    monkeypatch.setattr("scicevpr.evaluate.compute_descriptors", fake)
    pca = fit_pca_on_images(teacher, paths, dim=4, max_images=7, config=EvalConfig(protocol="official"))
    assert seen["paths"] == chosen and pca.dim == 4
    with pytest.raises(FileNotFoundError, match="pitts30k"):
        official_pca_images(tmp_path / "elsewhere")


# ---- points 6-8 ---------------------------------------------------------------------------


def test_cricavpr_on_pitts_runs_at_half_the_batch_only_under_the_official_protocol():
    assert eval_batch_size("official", "CricaVPR", "pitts30k", 16) == 8
    assert eval_batch_size("official", "CricaVPR", "tokyo247", 16) == 16
    assert eval_batch_size("official", "SciceVPR", "pitts30k", 16) == 16
    assert eval_batch_size("default", "CricaVPR", "pitts30k", 16) == 16


def test_stage2_distils_the_last_stage1_checkpoint_officially(tmp_path):
    for name in ("best.pt", "last.pt"):
        (tmp_path / name).write_bytes(b"")
    assert teacher_path(TrainConfig(teacher=str(tmp_path))).name == "best.pt"
    assert teacher_path(TrainConfig(teacher=str(tmp_path), protocol="official")).name == "last.pt"
    assert teacher_path(TrainConfig(teacher=str(tmp_path / "best.pt"), protocol="official")).name == "best.pt"
    (tmp_path / "last.pt").unlink()
    with pytest.raises(FileNotFoundError, match="last.pt"):
        teacher_path(TrainConfig(teacher=str(tmp_path), protocol="official"))


def test_float32_utms_move_positives_at_the_25m_edge():
    db = np.array([[0.0, 4477225.2], [0.0, 4477210.0]])  # 25.2 m and 10 m north of the query
    q = np.array([[0.0, 4477200.0]])
    assert radius_positives(db, q, 25.0)[0].tolist() == [1]
    assert radius_positives(db, q, 25.0, "float32")[0].tolist() == [1, 0]  # 4477225.2 -> 4477225.0 in float32
    assert utm_dtype("official", "SciceVPR") == "float32" and utm_dtype("official", "CricaVPR") == "float64"
    assert utm_dtype("default", "SciceVPR") == "float64"


# ---- real dataset quirks ------------------------------------------------------------------


def _split(folder, make_jpeg, queries="queries"):
    for i in range(2):
        make_jpeg(folder / "database" / f"@{10 * i}@0@.jpg", seed=i)
        make_jpeg(folder / queries / f"@{10 * i + 1}@0@.jpg", seed=10 + i)


def test_dot_files_are_skipped_as_the_authors_glob_skips_them(tmp_path, make_jpeg):
    folder = tmp_path / "pitts30k" / "images" / "test"
    _split(folder, make_jpeg)
    (folder / "database" / "._@0@0@.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "queries" / ".hidden").mkdir()
    make_jpeg(folder / "queries" / ".hidden" / "@5@5@.jpg")
    s = load_vg_split(tmp_path, "pitts30k", "test")
    assert s.num_database == 2 and s.num_queries == 2
    assert all(not p.name.startswith(".") for p in s.all_paths)
    assert len(list_images(folder / "database")) == 2


def test_msls_converter_layout_without_images_level_is_read(tmp_path, make_jpeg):
    _split(tmp_path / "msls" / "val", make_jpeg)
    (tmp_path / "msls" / "test").symlink_to(tmp_path / "msls" / "val")  # the converter's test -> val
    for split in ("val", "test"):
        s = load_vg_split(tmp_path, "msls", split)
        assert s.num_database == 2 and s.num_queries == 2 and s.folder == tmp_path / "msls" / split


def test_sfxl_queries_v1_is_named_in_the_error_and_accepted(tmp_path, make_jpeg):
    _split(tmp_path / "sf_xl" / "images" / "test", make_jpeg, queries="queries_v1")
    with pytest.raises(FileNotFoundError, match=r"queries='queries_v1'.*data/README.md"):
        load_vg_split(tmp_path, "sf_xl", "test")
    assert load_vg_split(tmp_path, "sf_xl", "test", queries="queries_v1").num_queries == 2


# ---- the switch on the command line ---------------------------------------------------------


def test_protocol_option_reaches_every_command():
    from scicevpr.cli import build_parser

    parser = build_parser()
    for cmd, cls in (("train-teacher", "TrainConfig"), ("train-student", "TrainConfig"), ("eval", "EvalConfig"),
                     ("stability", "EvalConfig"), ("extract", "EvalConfig")):
        extra = {"eval": ["--vg-root", "x", "--dataset", "y"], "stability": ["--vg-root", "x", "--dataset", "y"],
                 "extract": ["--images", "x", "--out", "y"]}.get(cmd, [])
        args = parser.parse_args([cmd, "--protocol", "official", *extra])
        assert vars(args)[f"{cls}.protocol"] == "official"


@pytest.mark.slow
def test_official_protocol_trains_distils_and_evaluates_end_to_end(tiny_benchmark, tmp_path, capsys):
    from scicevpr.cli import main

    common = ["--gsv-root", str(tiny_benchmark.gsv_root), "--val-root", str(tiny_benchmark.vg_root), "--val-dataset",
              "synthetic", "--places-per-batch", "5", "--img-per-place", "2", "--epochs", "1", "--num-workers", "0",
              "--device", "cpu", "--quiet", "--protocol", "official"]
    assert main(["train-teacher", "--preset", "SciceVPR-S", "--weights", "none", "--set", "image_size=56",
                 "--run-dir", str(tmp_path / "t"), *common]) == 0
    import json

    info = json.loads((tmp_path / "t" / "config.json").read_text())
    assert info["iterations_per_epoch"] == 3 and info["amp"] is False  # 12 places at P = 5: the last batch partial
    assert main(["train-student", "--teacher", str(tmp_path / "t"), "--run-dir", str(tmp_path / "s"), *common]) == 0

    assert json.loads((tmp_path / "s" / "config.json").read_text())["train"]["protocol"] == "official"
    assert main(["eval", "--checkpoint", str(tmp_path / "s" / "last.pt"), "--vg-root", str(tiny_benchmark.vg_root),
                 "--dataset", "synthetic", "--protocol", "official", "--num-workers", "0", "--quiet",
                 "--pca-dim", "4", "--pca-images", str(tiny_benchmark.gsv_root / "Images")]) == 0
    assert "R@1" in capsys.readouterr().out

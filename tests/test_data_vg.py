"""VG-benchmark layout: file names, folders, positives, metadata, and the errors on bad input."""

import glob
import shutil

import numpy as np
import pytest
import torch

from scicevpr.data.decode import CorruptImageError
from scicevpr.data.vg import (
    ImageFileDataset,
    format_vg_name,
    list_images,
    load_vg_split,
    parse_utm,
    radius_positives,
)

FULL_NAME = "@0584790.82@4477197.41@17@T@040.44612@-079.94817@pano_X-1@@090@@@@20110702_120000@note@.jpg"


def test_parse_utm_minimal_and_full_names(tmp_path):
    assert parse_utm("@100.5@200.25@.jpg") == (100.5, 200.25)
    assert parse_utm(tmp_path / "sub" / FULL_NAME) == (584790.82, 4477197.41)
    assert parse_utm("/data/has@at/sign/@1@2@x@.jpg") == (1.0, 2.0)  # only the file name is read


@pytest.mark.parametrize("name", ["image_0001.jpg", "@only_one@.jpg", "@12.5@north@.jpg", "x@1@2@.jpg"])
def test_parse_utm_error_names_file_and_pattern(name):
    with pytest.raises(ValueError) as e:
        parse_utm(f"/some/folder/{name}")
    msg = str(e.value)
    assert name in msg and "@utm_east@utm_north@...@.jpg" in msg


def test_format_vg_name_round_trips():
    name = format_vg_name(584790.823, 4477197.414, pano_id="p1", heading=359.7, pitch=-3, timestamp="20200101_000000", note="night")
    assert name.count("@") == 15 and name.endswith("@.jpg")
    assert parse_utm(name) == (584790.82, 4477197.41)
    with pytest.raises(ValueError):
        format_vg_name(1, 2, note="a@b")


def test_radius_positives_sorted_by_distance_inclusive():
    db = np.array([[0, 0], [10, 0], [25, 0], [26, 0], [3, 4]], dtype=float)
    q = np.array([[0, 0], [1000, 0]], dtype=float)
    pos = radius_positives(db, q, 25.0)
    assert pos[0].tolist() == [0, 4, 1, 2]  # distances 0, 5, 10, 25 (inclusive); 26 is out
    assert pos[1].size == 0 and pos[1].dtype == np.int64


@pytest.fixture
def vg_root(tmp_path, make_jpeg):
    """root/mini/images/test/{database,queries} with subfolders and a shuffled creation order."""
    split = tmp_path / "mini" / "images" / "test"
    db = [(0, 0), (10, 0), (20, 0), (100, 0), (130, 0)]
    for i in (3, 0, 4, 1, 2):
        e, n = db[i]
        sub = "b" if i >= 3 else "a"
        make_jpeg(split / "database" / sub / f"@{500000 + e:.2f}@{4000000 + n:.2f}@@@@@d{i}@.jpg", seed=i)
    for i, (e, n) in enumerate([(2, 1), (118, 0), (900, 0)]):
        make_jpeg(split / "queries" / FULL_NAME.replace("0584790.82", f"{500000 + e:010.2f}").replace("4477197.41", f"{4000000 + n:.2f}"), seed=10 + i)
    return tmp_path


def test_load_vg_split_reads_layout(vg_root):
    s = load_vg_split(vg_root, "mini", "test")
    assert s.num_database == 5 and s.num_queries == 3
    rel = [p.relative_to(s.folder / "database").as_posix() for p in s.database_paths]
    assert rel == sorted(rel) and rel[0].startswith("a/") and rel[-1].startswith("b/")  # recursive, sorted
    assert s.database_utms.shape == (5, 2) and s.database_utms.dtype == np.float64
    assert s.query_utms.shape == (3, 2)
    east = s.database_utms[:, 0] - 500000
    assert east[s.positives[0]].tolist() == [0, 10, 20]  # nearest first
    assert east[s.positives[1]].tolist() == [130, 100]
    assert s.queries_without_positives.tolist() == [2]
    assert s.all_paths == s.database_paths + s.query_paths
    assert s.database_conditions is None and s.query_conditions is None  # no metadata.csv
    assert [len(p) for p in load_vg_split(vg_root, "mini", "test", radius=5.0).positives] == [1, 0, 0]


def test_root_from_environment(vg_root, monkeypatch):
    monkeypatch.setenv("SCICEVPR_DATA", str(vg_root))
    assert load_vg_split(None, "mini", "test").num_database == 5


def test_metadata_conditions(vg_root):
    s = load_vg_split(vg_root, "mini", "test")
    rows = ["file,role,condition"]
    rows += [f"{p.relative_to(s.folder).as_posix()},database,day" for p in s.database_paths]
    rows += [f"{p.relative_to(s.folder).as_posix()},queries,{c}" for p, c in zip(s.query_paths, ["night", "fog", "snow"])]
    (s.folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    s = load_vg_split(vg_root, "mini", "test")
    assert s.database_conditions == ["day"] * 5
    assert s.query_conditions == ["night", "fog", "snow"]
    (s.folder / "metadata.csv").write_text("file,role\nx,database\n")
    with pytest.raises(ValueError, match="metadata.csv.*condition"):
        load_vg_split(vg_root, "mini", "test")


def test_symlinked_folders_are_followed_as_glob_does(vg_root, make_jpeg, tmp_path):
    """A split assembled from symlinked folders: the authors' glob("**/*.jpg", recursive=True)
    follows them (Path.rglob does not on Python 3.11); a link back to an ancestor is not
    entered again (glob repeats its files until the OS refuses, 40 levels deep)."""
    db = vg_root / "mini" / "images" / "test" / "database"
    shutil.move(db / "b", tmp_path / "elsewhere")
    (db / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    make_jpeg(tmp_path / "elsewhere" / "deeper" / "@500200.00@4000000.00@@@@@d5@.jpg", seed=5)
    make_jpeg(db / ".cache" / "@1@2@.jpg")
    make_jpeg(db / "a" / "._@1@2@.jpg")
    (tmp_path / "elsewhere" / "notes.txt").write_text("x")
    want = sorted(glob.glob("**/*.jpg", root_dir=db, recursive=True))
    paths = list_images(db)
    assert [p.relative_to(db).as_posix() for p in paths] == want and len(want) == 6
    assert "b/deeper/@500200.00@4000000.00@@@@@d5@.jpg" in want and all(p.is_file() for p in paths)
    assert load_vg_split(vg_root, "mini", "test").num_database == 6
    (db / "a" / "up").symlink_to(db, target_is_directory=True)  # a loop
    (tmp_path / "elsewhere" / "self").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert [p.relative_to(db).as_posix() for p in list_images(db)] == want


@pytest.mark.parametrize(
    "dataset,split,remove,match",
    [
        ("nope", "test", None, "dataset folder .*nope.* does not exist.*found there: mini"),
        ("mini", "val", None, "split folder .*val.* does not exist.*found there: test"),
        ("mini", "test", "queries", "queries folder .*queries.* does not exist"),
        ("mini", "test", "database", "database folder .*database.* does not exist"),
    ],
)
def test_missing_folders(vg_root, dataset, split, remove, match):
    if remove:
        import shutil

        shutil.rmtree(vg_root / "mini" / "images" / "test" / remove)
    with pytest.raises(FileNotFoundError, match=match):
        load_vg_split(vg_root, dataset, split)


def test_missing_root_mentions_environment_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match="SCICEVPR_DATA"):
        load_vg_split(tmp_path / "absent", "pitts30k")


@pytest.mark.parametrize("role,word", [("database", "database"), ("queries", "query")])
def test_empty_sets(vg_root, role, word):
    folder = vg_root / "mini" / "images" / "test" / role
    for p in folder.rglob("*.jpg"):
        p.rename(p.with_suffix(".png"))
    with pytest.raises(ValueError, match=rf"the {word} set is empty.*{role}.*\.png"):
        load_vg_split(vg_root, "mini", "test")


def test_file_name_without_utm(vg_root, make_jpeg):
    make_jpeg(vg_root / "mini" / "images" / "test" / "queries" / "IMG_0042.jpg")
    with pytest.raises(ValueError, match="IMG_0042.jpg.*@utm_east@utm_north"):
        load_vg_split(vg_root, "mini", "test")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_corrupt_jpeg_error_by_default_and_opt_in_skip(vg_root):
    s = load_vg_split(vg_root, "mini", "test")
    bad = s.database_paths[1]
    _truncate(bad)
    ds = ImageFileDataset(s.all_paths, image_size=32)
    with pytest.raises(CorruptImageError, match=bad.name.replace("@", ".")):
        ds[1]
    with pytest.warns(UserWarning, match="skipped 1 of 8"):
        ds = ImageFileDataset(s.all_paths, image_size=32, skip_corrupt=True)
    assert len(ds) == 7 and ds.num_skipped == 1 and ds.skipped == [bad]
    indices = [ds[i][1] for i in range(len(ds))]
    assert indices == [0, 2, 3, 4, 5, 6, 7]  # positions in the original list
    with pytest.warns(UserWarning, match="skipped 1 of 8"):
        s2 = load_vg_split(vg_root, "mini", "test", skip_corrupt=True)
    assert s2.num_database == 4 and s2.skipped == [bad] and bad not in s2.database_paths
    assert all(p.max() < 4 for p in s2.positives if len(p))


def test_image_file_dataset_yields_eval_tensors(vg_root):
    s = load_vg_split(vg_root, "mini", "test")
    ds = ImageFileDataset(s.all_paths, image_size=40)
    x, i = ds[6]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and i == 6
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(8))
    assert batches[0][0].shape == (4, 3, 40, 40)

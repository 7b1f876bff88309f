"""GSV-Cities layout: P x K batches, unique place ids, reproducible sampling, errors on bad input."""

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from scicevpr.data.decode import CorruptImageError
from scicevpr.data.gsv import GSV_COLUMNS, GSVCitiesDataset, gsv_image_name

# The fixture has a place with fewer than K = 4 images; the warning is tested once, below.
pytestmark = pytest.mark.filterwarnings("ignore:dropped .* places:UserWarning")


def _make_city(root, city, counts, make_jpeg, seed=0):
    """Write Dataframes/<city>.csv and the images; counts[place_id] = number of images."""
    rows = []
    for pid, n in counts.items():
        for k in range(n):
            lat, lon = 51.5 + pid * 1e-3 + k * 1e-5, -0.1 - k * 1e-5
            row = dict(place_id=pid, year=2015 + k, month=k + 1, northdeg=(30 * k) % 360, city_id=city, lat=lat, lon=lon, panoid=f"p_{pid}-{k}_x")
            rows.append(row)
            name = gsv_image_name(**{c: row[c] for c in GSV_COLUMNS})
            make_jpeg(root / "Images" / city / name, size=(40, 40), seed=seed + 100 * pid + k)
    (root / "Dataframes").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "Dataframes" / f"{city}.csv", index=False)


@pytest.fixture
def gsv_root(tmp_path, make_jpeg):
    root = tmp_path / "gsv_cities"
    _make_city(root, "London", {0: 4, 1: 5, 2: 3}, make_jpeg)  # place 2 has 3 < K images
    _make_city(root, "Boston", {0: 4, 7: 6}, make_jpeg, seed=7)
    return root


def test_file_name_scheme():
    name = gsv_image_name("London", 42, 2019, 3, 7, 51.501234, -0.12, "ab_cd-ef")
    assert name == "London_0000042_2019_03_007_51.501234_-0.12_ab_cd-ef.jpg"


def test_batches_are_p_by_k(gsv_root):
    ds = GSVCitiesDataset(gsv_root, img_per_place=4, image_size=32)
    assert ds.cities == ["Boston", "London"]  # all CSVs, sorted
    assert len(ds) == 4 and ds.num_dropped_places == 1  # London place 2 dropped
    images, ids = next(iter(DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 4, 3, 32, 32) and images.dtype == torch.float32
    assert ids.shape == (3, 4) and ids.dtype == torch.long
    assert (ids == ids[:, :1]).all()  # K images of one place per item
    # Unique across cities: Boston (city 0) keeps its ids, London (city 1) gets + 10**5.
    assert ds.place_ids.tolist() == [0, 7, 100_000, 100_001]


def test_sampling_reproducible_per_seed_epoch_and_workers(gsv_root):
    a = GSVCitiesDataset(gsv_root, img_per_place=4, image_size=24, seed=1)
    b = GSVCitiesDataset(gsv_root, img_per_place=4, image_size=24, seed=1)
    assert torch.equal(a[1][0], b[1][0])
    loaded = torch.cat([x for x, _ in DataLoader(b, batch_size=2, num_workers=2)])
    assert torch.equal(torch.stack([a[i][0] for i in range(len(a))]), loaded)
    rows0 = a.sample_rows(3).tolist()
    a.set_epoch(1)
    assert any(a.sample_rows(3).tolist() != rows0 for _ in range(1))  # 6 images, 4 drawn: another draw
    a.set_epoch(0)
    assert a.sample_rows(3).tolist() == rows0
    assert len(set(rows0)) == 4  # without replacement
    c = GSVCitiesDataset(gsv_root, img_per_place=4, image_size=24, seed=2)
    assert not torch.equal(c[1][0], a[1][0])  # other augmentations


def test_loading_images_and_building_models_reseed_no_gpu_generator(gsv_root, monkeypatch):
    """An image's augmentations (and a seeded model's initialisation) draw from the CPU
    generator, seeded per image; reseeding every GPU's generator as well (torch.manual_seed)
    would set the training's dropout masks from the last image loaded in the main process, so
    that a GPU run would depend on the number of DataLoader workers."""
    from scicevpr.factory import create_model

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    ds = GSVCitiesDataset(gsv_root, img_per_place=4, image_size=24, seed=1)
    cpu_state = torch.get_rng_state()
    ds[1]
    create_model("SciceVPR", "SciceVPR-S", weights=None, seed=0, backbone_num_blocks=1, layers=(0,), image_size=56)
    assert calls == [] and torch.equal(torch.get_rng_state(), cpu_state)


def test_subset_of_cities_and_explicit_transform(gsv_root):
    from scicevpr.data.transforms import eval_transform

    ds = GSVCitiesDataset(gsv_root, cities=["London"], img_per_place=3, image_size=16, transform=eval_transform(16))
    assert len(ds) == 3 and ds.place_ids.tolist() == [0, 1, 2]
    x, _ = ds[0]
    assert x.shape == (3, 3, 16, 16)


def test_place_with_fewer_than_k_images_is_an_error_when_asked(gsv_root):
    with pytest.raises(ValueError, match=r"place 2 of city 'London' has 3 image\(s\) but img_per_place \(K\) = 4"):
        GSVCitiesDataset(gsv_root, img_per_place=4, drop_small_places=False)
    with pytest.raises(ValueError, match="no place .* at least img_per_place"):
        GSVCitiesDataset(gsv_root, img_per_place=7)


def test_missing_column(gsv_root):
    csv = gsv_root / "Dataframes" / "Boston.csv"
    pd.read_csv(csv).drop(columns=["northdeg"]).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"Boston.csv.*lacks column\(s\) \['northdeg'\]"):
        GSVCitiesDataset(gsv_root)


def test_missing_folders_and_files(gsv_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="SCICEVPR_DATA"):
        GSVCitiesDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Paris.csv"):
        GSVCitiesDataset(gsv_root, cities=["Paris"])
    victim = next((gsv_root / "Images" / "London").glob("London_0000001_*"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in Dataframes/London.csv are missing.*London_0000001"):
        GSVCitiesDataset(gsv_root)
    import shutil

    shutil.rmtree(gsv_root / "Images" / "Boston")
    with pytest.raises(FileNotFoundError, match="Images/Boston"):
        GSVCitiesDataset(gsv_root)
    shutil.rmtree(gsv_root / "Images")
    with pytest.raises(FileNotFoundError, match="Images"):
        GSVCitiesDataset(gsv_root)


def test_lat_lon_written_differently_in_names_still_resolve(gsv_root):
    folder = gsv_root / "Images" / "Boston"
    for p in folder.glob("Boston_0000007_*"):
        city, pid, y, m, deg, lat, lon, pano = p.stem.split("_", 7)
        p.rename(folder / f"{city}_{pid}_{y}_{m}_{deg}_{float(lat):.8f}_{lon}_{pano}.jpg")
    ds = GSVCitiesDataset(gsv_root, img_per_place=4, image_size=16)
    assert ds[1][0].shape == (4, 3, 16, 16)


def test_corrupt_image_named(gsv_root):
    ds = GSVCitiesDataset(gsv_root, cities=["Boston"], img_per_place=4, image_size=16)
    for row in ds.sample_rows(0):
        path = ds.dataframe["path"].iloc[row]
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptImageError, match="Boston_0000000"):
        ds[0]


def test_dropped_small_places_are_counted_and_reported(gsv_root):
    with pytest.warns(UserWarning, match=r"dropped 1 of 5 places .* fewer than img_per_place \(K\) = 4 images"):
        ds = GSVCitiesDataset(gsv_root, img_per_place=4)
    assert ds.num_dropped_places == 1 and ds.skipped == []


def test_skip_corrupt_leaves_out_images_before_places_are_counted(gsv_root):
    victim = sorted((gsv_root / "Images" / "Boston").glob("Boston_0000000_*"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"skipped 1 of 22 images"):
        ds = GSVCitiesDataset(gsv_root, img_per_place=4, skip_corrupt=True)
    assert ds.skipped == [victim] and victim not in set(ds.dataframe["path"])
    assert ds.num_dropped_places == 2  # London place 2, and Boston place 0 now that it has 3 images
    assert ds.place_ids.tolist() == [7, 100_000, 100_001]


@pytest.mark.parametrize("encoding,match", [
    ("utf-16", r"Boston.csv' is not UTF-8 text .*it looks like UTF-16.*iconv -f UTF-16 -t UTF-8"),
    ("latin-1", r"Boston.csv' is not UTF-8 text .*iconv -f LATIN1 -t UTF-8"),
])
def test_a_csv_in_another_encoding_is_named_with_the_fix(gsv_root, encoding, match):
    csv = gsv_root / "Dataframes" / "Boston.csv"
    text = csv.read_text().replace("p_7-0_x", "p_7-0_\u00e9")
    csv.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError, match=match):
        GSVCitiesDataset(gsv_root)


def test_an_empty_csv_is_named_and_a_byte_order_mark_is_read(gsv_root):
    csv = gsv_root / "Dataframes" / "Boston.csv"
    text = csv.read_text()
    csv.write_bytes(text.encode("utf-8-sig"))  # as spreadsheet programs save "CSV UTF-8"
    assert len(GSVCitiesDataset(gsv_root)) == 4
    csv.write_text("")
    with pytest.raises(ValueError, match=r"Boston.csv' is empty.*header line"):
        GSVCitiesDataset(gsv_root)


def test_combined_folders_hold_every_city_renamed_apart(tiny_benchmark, tmp_path, capsys):
    """Two copies of one world (as two pretrain seeds share city names) become one folder whose
    second copy's cities are <city>Two: twice the places, the same images, nothing copied."""
    from scicevpr.cli import main
    from scicevpr.data.gsv import combine_gsv_folders, list_cities

    src = tiny_benchmark.gsv_root
    out = combine_gsv_folders(tmp_path / "both", [src, src])
    cities = list_cities(src)
    assert list_cities(out) == sorted(cities + [c + "Two" for c in cities])
    one = GSVCitiesDataset(src, img_per_place=2, image_size=32, seed=0)
    both = GSVCitiesDataset(out, img_per_place=2, image_size=32, seed=0)
    assert len(both) == 2 * len(one) and len(both.dataframe) == 2 * len(one.dataframe)
    city = cities[0]
    frame = pd.read_csv(out / "Dataframes" / f"{city}Two.csv")
    assert set(frame["city_id"]) == {f"{city}Two"}
    original = pd.read_csv(src / "Dataframes" / f"{city}.csv")
    assert frame.drop(columns="city_id").equals(original.drop(columns="city_id"))  # every other field as written
    renamed = sorted((out / "Images" / f"{city}Two").iterdir())
    assert all(p.is_symlink() and p.name.startswith(f"{city}Two_") for p in renamed)
    assert renamed[0].read_bytes() == (src / "Images" / city / renamed[0].name.replace(f"{city}Two_", f"{city}_", 1)).read_bytes()
    with pytest.raises(ValueError, match="give suffixes"):
        combine_gsv_folders(tmp_path / "clash", [src, src], suffixes=["", ""])
    before = sorted(p.name for p in (out / "Dataframes").iterdir())
    assert main(["combine-gsv", str(out), str(src)]) == 2  # an existing folder: one message, nothing changed
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "Dataframes").iterdir()) == before


def test_a_truncated_image_is_refused_when_the_dataset_is_built_not_when_it_is_drawn(gsv_root):
    """The default (skip_corrupt=False): every file's ends are checked up front, so that a training
    does not fail in a later epoch, the first that draws the file."""
    victim = sorted((gsv_root / "Images" / "London").glob("*.jpg"))[-1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CorruptImageError, match=rf"1 of 22 images in .* cannot be decoded.*{victim.name}.*skip_corrupt=True"):
        GSVCitiesDataset(gsv_root, img_per_place=4)
    # under DDP only rank 0 checks (check_files=False elsewhere): the same files, read once
    assert len(GSVCitiesDataset(gsv_root, img_per_place=4, check_files=False)) > 0

"""Descriptors, FAISS search, Recall@N, PCA and the batch-stability sweep."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import scicevpr
from scicevpr.data.vg import load_vg_split
from scicevpr.config import EvalConfig
from scicevpr.evaluate import (
    compute_descriptors,
    evaluate,
    fit_pca,
    load_descriptors,
    recall_at_n,
    recall_by_condition,
    search,
)
from scicevpr.stability import (
    batch_stability,
    compute_regional_features,
    encode_in_batches,
    stability_features,
    stability_summary,
)

CFG = EvalConfig(num_workers=0, progress=False)


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory):
    """A VG-layout split: 12 database images every 10 m, 10 noisy queries near them."""
    root = tmp_path_factory.mktemp("vg")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(12, 8, 8, 3))
    for role, n in (("database", 12), ("queries", 10)):
        folder = root / "toy" / "images" / "test" / role
        folder.mkdir(parents=True)
        for i in range(n):
            place = i if role == "database" else (i * 5) % 12
            img = base[place] if role == "database" else np.clip(base[place] + rng.normal(0, 40, (8, 8, 3)), 0, 255)
            east = 500000.0 + 10.0 * place + (3.0 if role == "queries" else 0.0)
            Image.fromarray(img.astype(np.uint8)).resize((64, 64), Image.NEAREST).save(
                folder / f"@{east:.2f}@4100000.00@{i:03d}@.jpg", quality=95
            )
    return load_vg_split(root, "toy", "test")


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return scicevpr.SciceVPR("SciceVPR-S", weights=None, image_size=56).eval()


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return scicevpr.SuperCricaVPR("SciceVPR-S", weights=None, image_size=56).eval()


def test_recall_at_n_by_hand():
    predictions = np.array([[3, 1, 2], [0, 4, 1], [2, 0, 1], [4, 3, 2]])
    positives = [np.array([3]), np.array([1]), np.array([], dtype=int), np.array([2, 9])]
    recalls, correct = recall_at_n(predictions, positives, (1, 2, 3, 100))
    # query 0 at rank 1, query 1 at rank 3, query 2 never (no positive), query 3 at rank 3
    assert recalls == {1: 25.0, 2: 25.0, 3: 75.0, 100: 75.0}
    assert correct.tolist()[1] == [False, False, True]


def test_recall_by_condition_by_hand():
    correct = np.array([[True, False], [False, True], [False, False], [True, True]])
    table = recall_by_condition(correct, ["day", "night", "night", "day"], (1, 2))
    rows = table.set_index("condition")
    assert rows.loc["day", "R@1"] == 100.0 and rows.loc["night", "R@1"] == 0.0
    assert rows.loc["night", "R@2"] == 50.0 and rows.loc["all", "R@2"] == 75.0
    assert rows.loc["all", "queries"] == 4


def test_search_is_exact():
    rng = np.random.default_rng(1)
    db, q = rng.normal(size=(50, 7)).astype(np.float32), rng.normal(size=(9, 7)).astype(np.float32)
    dist, pred = search(db, q, k=5)
    brute = ((q[:, None] - db[None]) ** 2).sum(-1)
    assert np.array_equal(pred, np.argsort(brute, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(brute, axis=1)[:, :5], rtol=1e-4)
    assert search(db[:3], q, k=100)[1].shape == (9, 3)
    with pytest.raises(ValueError, match="do not match"):
        search(db, q[:, :3], k=1)
    for bad_db, k in ((db, 0), (db[:0], 5)):  # FAISS would stop on a bare assertion
        with pytest.raises(ValueError, match="non-empty database and k >= 1"):
            search(bad_db, q, k)


def test_pca_and_descriptors_refuse_what_they_cannot_use(student):
    x = np.random.default_rng(0).normal(size=(10, 5))
    for bad, dim in ((x, 0), (x[:1], 3), (x[:, 0], 3)):  # no component, one sample, not (N, D)
        with pytest.raises(ValueError, match=r"PCA needs \(N, D\) samples with N >= 2 and dim >= 1"):
            fit_pca(bad, dim)
    with pytest.raises(TypeError, match="takes a list of image files, got one path '/some/folder'"):
        compute_descriptors(student, "/some/folder", CFG)


@pytest.mark.parametrize("n,d,dim", [(40, 10, 6), (8, 30, 100)])
def test_pca_matches_numpy_svd_and_is_capped(n, d, dim):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, d)) * np.linspace(3, 0.1, d)
    pca = fit_pca(x, dim)
    k = min(dim, n - 1, d)
    assert pca.dim == k and pca.transform(x).shape == (n, k)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(k), atol=1e-5)
    _, s, vh = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(pca.components), np.abs(vh[:k]), atol=1e-4)
    np.testing.assert_allclose(pca.explained_variance, s[:k] ** 2 / (n - 1), rtol=1e-6)


def test_evaluate_end_to_end(toy_split, student, tmp_path):
    res = evaluate(student, toy_split, CFG)
    assert res.database_descriptors.shape == (12, student.descriptor_dim)
    assert res.predictions.shape == (10, 12)
    assert set(res.recalls) == {1, 5, 10, 100} and res.recalls[100] == 100.0
    assert 0.0 <= res.recalls[1] <= res.recalls[5] <= res.recalls[10] <= 100.0
    np.testing.assert_allclose(np.linalg.norm(res.query_descriptors, axis=1), 1.0, atol=1e-5)
    table = res.table()
    assert list(table.columns[:4]) == ["model", "dataset", "split", "dim"] and table.loc[0, "dataset"] == "toy"
    db_path, q_path = res.save_descriptors(tmp_path / "desc")
    saved = load_descriptors(db_path)
    assert np.load(db_path).dtype == np.float16
    np.testing.assert_allclose(saved, res.database_descriptors, atol=1e-3)
    pca = fit_pca(res.database_descriptors, 4096)
    res_pca = evaluate(student, toy_split, CFG, pca=pca)
    assert res_pca.query_descriptors.shape == (10, 11) and res_pca.pca_dim == 11


def test_streamed_and_replayed_encoders_agree(toy_split, teacher):
    """Full forward in batches of 16 == per-image features + encoder replayed in batches of 16."""
    full = compute_descriptors(teacher, toy_split.database_paths, CFG, batch_size=4)
    regional = compute_regional_features(teacher, toy_split.database_paths, CFG)
    replay = encode_in_batches(teacher, regional, 4)
    np.testing.assert_allclose(full, replay, atol=1e-5)
    assert np.abs(encode_in_batches(teacher, regional, 1) - replay).max() > 1e-3


def test_batch_stability_student_flat_teacher_not(toy_split, student, teacher):
    kw = dict(query_batch_sizes=(1, 2, 4, 8), num_orders=2, config=CFG)
    table = pd_concat([batch_stability(student, toy_split, name="SciceVPR", **kw),
                       batch_stability(teacher, toy_split, name="Super-CricaVPR", **kw)])
    assert len(table) == 2 * 4 * 2
    summary = stability_summary(table).set_index("model")
    assert summary.loc["SciceVPR", "spread"] == 0.0
    assert summary.loc["SciceVPR", "max_abs_change"] <= 1e-6
    assert summary.loc["Super-CricaVPR", "max_abs_change"] > 1e-3


def test_batch_size_one_is_the_same_in_every_order(toy_split, teacher):
    """The sweep reuses the batch-size-1 descriptors for every order: encoding each query alone
    in another order must give them bit for bit, even for the batch-mixing teacher."""
    regional = compute_regional_features(teacher, toy_split.query_paths, CFG)
    alone = encode_in_batches(teacher, regional, 1)
    order = np.random.default_rng(1).permutation(len(alone))
    np.testing.assert_array_equal(encode_in_batches(teacher, regional, 1, order), alone)
    features = stability_features(teacher, toy_split, CFG, database_batch_size=4)
    np.testing.assert_array_equal(features.alone, alone)
    assert features.encode(teacher, 1, order) is features.alone
    assert np.abs(features.encode(teacher, 2, order) - alone).max() > 1e-3  # batches of 2 do mix


def test_backbone_cache_reuses_a_shared_backbone_and_changes_no_bit(toy_split, teacher, cache):
    paths = toy_split.database_paths  # 12 images: 3 batches of 4
    twin = copy.deepcopy(teacher)  # another object with the same weights
    student = scicevpr.SciceVPR.from_teacher(twin, seed=3).eval()
    cache.enable(0)
    refs = [compute_descriptors(m, paths, CFG, batch_size=4, cache=cache) for m in (teacher, student)]
    assert cache.misses == cache.hits == 0 and not cache.entries, "off: nothing kept"

    cache.enable(2**28)
    first = compute_descriptors(teacher, paths, CFG, batch_size=4, cache=cache)
    assert (cache.misses, cache.hits) == (3, 0)
    again = compute_descriptors(student, paths, CFG, batch_size=4, cache=cache)  # another head, the same backbone weights
    assert (cache.misses, cache.hits) == (3, 3)
    np.testing.assert_array_equal(first, refs[0])
    np.testing.assert_array_equal(again, refs[1])
    compute_descriptors(teacher, paths, CFG, batch_size=6, cache=cache)  # other batches are other inputs
    assert cache.misses == 5

    with torch.no_grad():
        w = twin.backbone.patch_embed.proj.weight  # the weights change: no entry may answer
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))
    changed = compute_descriptors(student, paths, CFG, batch_size=4, cache=cache)
    assert cache.misses == 8
    cache.enable(0)
    np.testing.assert_array_equal(changed, compute_descriptors(student, paths, CFG, batch_size=4, cache=cache))
    assert np.abs(changed - refs[1]).max() > 1e-4


def test_backbone_cache_keys_and_limits(toy_split, teacher, cache):
    crica = scicevpr.CricaVPR("CricaVPR-S", weights=None, image_size=56).eval()
    key = cache.weights_key(crica)
    crica.adapters()[0].train()  # an adapter BatchNorm on batch statistics computes another output
    assert cache.weights_key(crica) != key
    crica.eval()
    with torch.no_grad():
        crica.adapters()[0].D_fc1.weight.mul_(2.0)  # the adapters live in the backbone: part of the key
    assert cache.weights_key(crica) != key
    assert cache.weights_key(scicevpr.SciceVPR.from_teacher(teacher)) == cache.weights_key(teacher)
    key = cache.weights_key(crica)
    for block in crica.backbone.blocks:
        block.adapter_scale = 0.5  # equal weights, another output (a setting, not a tensor)
    assert cache.weights_key(crica) != key
    other = copy.deepcopy(teacher)
    other.backbone.config = dataclasses.replace(other.backbone.config, interpolate_offset=0.0)
    assert cache.weights_key(other) != cache.weights_key(teacher)

    x = torch.randn(2, 3, 56, 56)
    assert any(p.requires_grad for p in crica.backbone.parameters())  # its adapters train
    assert cache.backbone_features(crica, x, cache.weights_key(crica)).grad_fn is not None
    assert not cache.entries, "an output autograd needs is not kept"
    k = cache.weights_key(teacher)
    with torch.no_grad():
        out = cache.backbone_features(teacher, x, k)
    assert cache.backbone_features(teacher, x, k) is out and cache.hits == 1  # frozen: no graph either way
    with torch.no_grad():
        torch.testing.assert_close(out, teacher.backbone_features(x), atol=0, rtol=0)
        one = out.element_size() * out.nelement()
        cache.enable(2 * one)
        for i in range(4):
            cache.backbone_features(teacher, x + i + 1, k)
    assert len(cache.entries) == 2 and cache.num_bytes == 2 * one  # the oldest dropped
    with pytest.raises(ValueError, match="max_bytes"):
        cache.enable(-1)
    cache.enable(0)
    assert not cache.entries and cache.num_bytes == 0


def pd_concat(tables):
    import pandas as pd

    return pd.concat(tables, ignore_index=True)


def test_empty_split_is_rejected(toy_split, student):
    import dataclasses

    empty = dataclasses.replace(toy_split, query_paths=[], query_utms=np.zeros((0, 2)), positives=[])
    with pytest.raises(ValueError, match="must be non-empty"):
        evaluate(student, empty, CFG)


def test_evaluate_names_what_it_takes_and_the_device_it_is_given(toy_split, student):
    with pytest.raises(TypeError, match="takes a VGSplit .* got str and EvalConfig"):
        evaluate(student, str(toy_split.split_dir), CFG)
    with pytest.raises(TypeError, match="and an EvalConfig; got VGSplit and dict"):
        evaluate(student, toy_split, {"batch_size": 4})
    with pytest.raises(ValueError, match=r"device='gpu' is not a device; use 'auto'"):
        evaluate(student, toy_split, dataclasses.replace(CFG, device="gpu"))
    auto = evaluate(student, toy_split, dataclasses.replace(CFG, device="auto"))  # the CPU here, as training's "auto"
    assert auto.recalls == evaluate(student, toy_split, CFG).recalls
    student.cpu()  # where the other tests expect it, on a machine where "auto" found a GPU


def test_fast_flag_resolution_and_bf16_agreement(toy_split, student, monkeypatch):
    from scicevpr import precision
    from scicevpr.evaluate import amp_enabled, fast_enabled, gpu_decode_enabled

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # bf16 on this CPU, for the test
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fast_enabled(EvalConfig(), cpu) and fast_enabled(EvalConfig(), cuda)
    assert not amp_enabled(EvalConfig(fast=False), cuda) and not gpu_decode_enabled(EvalConfig(fast=False), cuda)
    assert amp_enabled(EvalConfig(fast=True), cpu) and not gpu_decode_enabled(EvalConfig(fast=True), cpu)
    assert amp_enabled(EvalConfig(fast=False, amp=True), cpu)
    ref = compute_descriptors(student, toy_split.query_paths, CFG)
    fast = compute_descriptors(student, toy_split.query_paths, EvalConfig(num_workers=0, progress=False, fast=True))
    cos = (ref * fast).sum(1) / np.linalg.norm(fast, axis=1)
    assert cos.min() > 0.99 and np.abs(ref - fast).max() > 0  # bf16 really ran


def test_chance_recall_matches_a_simulated_random_ranking():
    from scicevpr.evaluate import chance_recall

    rng = np.random.default_rng(0)
    n_db = 40
    positives = [rng.choice(n_db, size=k, replace=False) for k in (1, 3, 5, 0, 8)]
    expected = chance_recall(n_db, positives, (1, 5, 10, 100))
    trials = 20000
    hits = {n: 0 for n in (1, 5, 10)}
    for _ in range(trials // len(positives)):
        for pos in positives:
            ranking = rng.permutation(n_db)
            for n in hits:
                hits[n] += np.isin(ranking[:n], pos).any()
    done = (trials // len(positives)) * len(positives)
    for n in hits:
        assert abs(100 * hits[n] / done - expected[n]) < 1.5
    assert expected[100] == pytest.approx(80.0)  # N >= D: every query with a positive is found
    assert expected[1] == pytest.approx(100 * np.mean([1, 3, 5, 0, 8]) / n_db)


def test_bootstrap_intervals_bracket_the_recall_and_shrink_with_more_queries():
    from scicevpr.evaluate import recall_at_n, recall_intervals

    rng = np.random.default_rng(1)

    def case(n_q):
        correct = np.zeros((n_q, 10), dtype=bool)
        found = rng.random(n_q) < 0.3
        correct[found, rng.integers(0, 10, found.sum())] = True
        return correct

    small, large = case(100), case(2000)
    for correct in (small, large):
        recalls = recall_at_n(np.tile(np.arange(10), (len(correct), 1)),
                              [np.flatnonzero(c) for c in correct], (1, 10))[0]
        iv = recall_intervals(correct, (1, 10))
        for n in (1, 10):
            assert iv[n][0] <= recalls[n] <= iv[n][1]
    width = lambda c: recall_intervals(c, (10,))[10][1] - recall_intervals(c, (10,))[10][0]
    assert width(large) < width(small) / 3
    assert recall_intervals(small, (10,), seed=3) == recall_intervals(small, (10,), seed=3)
    with pytest.raises(ValueError, match="level"):
        recall_intervals(small, (1,), level=1.5)


def test_an_evaluation_reports_its_intervals_and_chance_level(toy_split, student):
    result = evaluate(student, toy_split, CFG)
    iv, chance = result.intervals(), result.chance()
    assert set(iv) == set(result.recalls) == set(chance)
    for n, r in result.recalls.items():
        assert iv[n][0] <= r <= iv[n][1] and 0 <= chance[n] <= 100

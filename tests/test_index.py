"""ScaNN and exact indexes: recall against exact search, persistence, tamper checks, updates."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import threading

import numpy as np
import pytest

from remap_tf.serving.index import (
    ExactIndex,
    Index,
    IndexFormatError,
    ScannConfig,
    ScannIndex,
    kinds,
    load_index,
    make_index,
    registry,
    verify_index,
)


def clustered_unit_vectors(num, dim, num_clusters, seed, spread=0.5):
    """Rows drawn around random centres (Gaussian noise, then L2-normalised)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, num_clusters, num)]
    x = x + spread * rng.normal(size=(num, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(found_ids, true_ids):
    hits = [len(set(a) & set(b)) for a, b in zip(found_ids, true_ids, strict=True)]
    return sum(hits) / true_ids.size


def _ids(n, prefix="img"):
    return [f"{prefix}/{i:06d}.jpg" for i in range(n)]


@pytest.fixture(scope="module")
def big():
    """50k x 256 clustered unit vectors (1000 clusters) and 300 held-out queries."""
    data = clustered_unit_vectors(50_300, 256, 1000, seed=0)
    return data[:50_000], data[50_000:]


@pytest.fixture(scope="module")
def big_scann(big, tmp_path_factory):
    database, _ = big
    index = ScannIndex(256)
    index.add(_ids(len(database)), database)
    index.build()
    return index


def test_scann_default_recall_at_10_vs_exact_on_50k(big, big_scann):
    """Acceptance: the size-chosen default (AH + re-ordering at 50k) has recall@10 >= 0.95."""
    database, queries = big
    exact = ExactIndex(256)
    exact.add(_ids(len(database)), database)
    true_ids, true_scores = exact.search(queries, k=10)
    found_ids, found_scores = big_scann.search(queries, k=10)
    assert big_scann.config["mode"] == "ah"
    assert found_ids.shape == (300, 10)
    recall = _recall(found_ids, true_ids)
    assert recall >= 0.95, recall
    # Scores are the re-ordered exact dot products.
    np.testing.assert_allclose(found_scores[:, 0], true_scores[:, 0], atol=1e-4)


def test_scann_save_load_search_identical(big, big_scann, tmp_path):
    _, queries = big
    before_ids, before_scores = big_scann.search(queries, k=10)
    big_scann.save(tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    assert isinstance(loaded, ScannIndex)
    assert loaded.config == big_scann.config
    after_ids, after_scores = loaded.search(queries, k=10)
    np.testing.assert_array_equal(after_ids, before_ids)
    np.testing.assert_array_equal(after_scores, before_scores)
    assert not list((tmp_path / "index").rglob("*.pkl"))
    # Single-threaded search gives the same answer as the thread pool.
    single_ids, _ = loaded.search(queries, k=10, num_threads=1)
    np.testing.assert_array_equal(single_ids, before_ids)


@pytest.fixture(params=["scann", "exact"])
def small_saved(request, tmp_path):
    data = clustered_unit_vectors(400, 16, 20, seed=1)
    index = ScannIndex(16) if request.param == "scann" else ExactIndex(16)
    index.add(_ids(400), data)
    path = index.save(tmp_path / "index")
    return path, data


def test_every_file_is_checked_flipped_byte_refused(small_saved, tmp_path):
    path, _ = small_saved
    manifest = verify_index(path)
    for rel in manifest["files"]:
        copy = tmp_path / f"copy-{rel.replace('/', '_')}"
        shutil.copytree(path, copy)
        raw = bytearray((copy / rel).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (copy / rel).write_bytes(bytes(raw))
        with pytest.raises(IndexFormatError, match=f"{rel}.*checksum"):
            load_index(copy)


def test_truncated_and_missing_files_refused(small_saved, tmp_path):
    path, _ = small_saved
    manifest = verify_index(path)
    largest = max(manifest["files"], key=lambda rel: manifest["files"][rel]["bytes"])
    truncated = shutil.copytree(path, tmp_path / "truncated")
    raw = (truncated / largest).read_bytes()
    (truncated / largest).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IndexFormatError, match="truncated"):
        load_index(truncated)
    for rel in manifest["files"]:
        missing = shutil.copytree(path, tmp_path / f"missing-{rel.replace('/', '_')}")
        (missing / rel).unlink()
        with pytest.raises(IndexFormatError, match=f"{rel} is missing"):
            load_index(missing)
    no_manifest = shutil.copytree(path, tmp_path / "no-manifest")
    (no_manifest / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        load_index(no_manifest)
    with pytest.raises(FileNotFoundError, match="no index directory"):
        load_index(tmp_path / "nowhere")
    edited = shutil.copytree(path, tmp_path / "edited")
    meta = json.loads((edited / "manifest.json").read_text())
    meta["format_version"] = 99
    (edited / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="format_version"):
        load_index(edited)


def test_load_never_unpickles(tmp_path):
    """A scann_docids.pkl planted in the directory (ScaNN's loader would unpickle it) is ignored."""
    data = clustered_unit_vectors(300, 8, 10, seed=2)
    index = ScannIndex(8)
    index.add(_ids(300), data)
    path = index.save(tmp_path / "index")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "scann" / "scann_docids.pkl").write_bytes(pickle.dumps(Evil()))
    loaded = load_index(path)
    assert not marker.exists()
    ids, _ = loaded.search(data[:3], k=1)
    assert list(ids[:, 0]) == _ids(300)[:3]


def test_wrong_query_dimension_and_bad_input_are_clear(small_saved):
    path, _ = small_saved
    index = load_index(path)
    with pytest.raises(
        ValueError, match="queries have dimension 15 but the index has dimension 16"
    ):
        index.search(np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match="dimension 8"):
        index.add(["x"], np.zeros((1, 8)))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(["img/000001.jpg"], np.zeros((1, 16)))
    with pytest.raises(ValueError, match="duplicate ids"):
        index.add(["a", "a"], np.zeros((2, 16)))
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 16), np.nan))
    with pytest.raises(KeyError, match="not in the index"):
        index.delete(["nope"])
    with pytest.raises(IndexFormatError, match="not a 'exact' index|not a 'scann' index"):
        (ExactIndex if isinstance(index, ScannIndex) else ScannIndex).load(path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ScannIndex(32),  # brute force at this size
        lambda: ScannIndex(32, mode="ah", reorder=100),
        lambda: ScannIndex(32, mode="tree_ah", num_leaves=20, num_leaves_to_search=20),
        lambda: ExactIndex(32),
    ],
    ids=["scann-brute-force", "scann-ah", "scann-tree-ah", "exact"],
)
def test_add_and_delete_change_results_and_survive_save_load(make, tmp_path):
    data = clustered_unit_vectors(3000, 32, 30, seed=3)
    queries = clustered_unit_vectors(20, 32, 30, seed=3)  # same centres, fresh points
    new = clustered_unit_vectors(5, 32, 5, seed=4)
    ids = _ids(3000)
    index = make()
    index.add(ids, data)
    index.search(queries[:1], k=1)  # builds the ScaNN searcher; later changes are updates
    # Added vectors are found: each new vector is its own best match.
    index.add([f"new{i}" for i in range(5)], new)
    top, scores = index.search(new, k=1)
    assert list(top[:, 0]) == [f"new{i}" for i in range(5)]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-3)
    # Deleted ids disappear, including the most recently added row and rows in the middle.
    first_hits, _ = index.search(queries, k=1)
    gone = sorted(set(first_hits[:, 0]) | {"new4", "new0", ids[-1], ids[0]})
    index.delete(gone)
    assert len(index) == 3005 - len(gone)
    after, _ = index.search(queries, k=10)
    assert not set(after.ravel()) & set(gone)
    # And the survivors are ranked as exact search over the remaining set ranks them.
    keep = [i for i in range(3000) if ids[i] not in gone]
    exact = ExactIndex(32)
    exact.add(
        [ids[i] for i in keep] + ["new1", "new2", "new3"], np.concatenate([data[keep], new[1:4]])
    )
    truth, _ = exact.search(queries, k=10)
    assert _recall(after, truth) >= 0.95
    np.testing.assert_array_equal(after[:, 0], truth[:, 0])
    # Persisted by save and load.
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert len(loaded) == len(index) and loaded.ids == index.ids
    reloaded, _ = loaded.search(queries, k=10)
    np.testing.assert_array_equal(reloaded, after)
    top, _ = loaded.search(new[1:4], k=1)
    assert list(top[:, 0]) == ["new1", "new2", "new3"]


def test_delete_before_build_and_small_k(tmp_path):
    data = clustered_unit_vectors(50, 8, 5, seed=5)
    index = ScannIndex(8)
    index.add(_ids(50), data)
    index.delete([_ids(50)[7]])
    ids, scores = index.search(data[[7, 8]], k=100)  # k above the collection size
    assert ids.shape == (2, 49)
    assert ids[1, 0] == _ids(50)[8] and _ids(50)[7] not in set(ids.ravel())


def test_auto_config_follows_scann_guidance():
    config = ScannConfig()
    assert config.resolved(10_000).mode == "brute_force"
    resolved = config.resolved(50_000)
    assert resolved.mode == "ah" and resolved.reorder >= 100
    resolved = config.resolved(1_000_000)
    assert resolved.mode == "tree_ah" and resolved.num_leaves == 1000
    assert resolved.num_leaves_to_search == 100  # a tenth of the leaves
    override = ScannConfig(mode="tree_ah", num_leaves=50, reorder=500).resolved(10_000)
    assert (override.mode, override.num_leaves, override.reorder) == ("tree_ah", 50, 500)
    with pytest.raises(ValueError, match="mode"):
        ScannConfig(mode="fast")
    with pytest.raises(ValueError, match="reorder"):
        ScannConfig(reorder=0)


def test_save_is_atomic_and_refuses_to_clobber_other_directories(tmp_path):
    data = clustered_unit_vectors(30, 4, 3, seed=6)
    index = ExactIndex(4)
    index.add(_ids(30), data)
    index.save(tmp_path / "index")
    index.delete(_ids(30)[:10])
    index.save(tmp_path / "index")  # replaces the previous index
    assert len(load_index(tmp_path / "index")) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no leftovers
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not an index"):
        index.save(other)
    assert (other / "cat.jpg").exists()


def test_many_random_updates_match_exact_search(tmp_path):
    """Interleaved adds and deletes (batches, the last row, middle rows) on a brute-force
    ScaNN index leave it answering exactly as an ExactIndex given the same operations."""
    rng = np.random.default_rng(7)
    pool = clustered_unit_vectors(900, 16, 12, seed=8)
    scann, exact = ScannIndex(16), ExactIndex(16)
    names = [f"v{i}" for i in range(len(pool))]
    live, next_row = [], 0
    for step in range(30):
        if step == 0 or not live or rng.random() < 0.55:
            count = int(rng.integers(1, 40))
            new = names[next_row : next_row + count]
            vectors = pool[next_row : next_row + count]
            next_row += count
            for index in (scann, exact):
                index.add(new, vectors)
            live += new
        else:
            gone = list(
                rng.choice(live, size=min(len(live), int(rng.integers(1, 15))), replace=False)
            )
            if live[-1] not in gone:
                gone.append(live[-1])
            for index in (scann, exact):
                index.delete(gone)
            live = [i for i in live if i not in set(gone)]
        if step == 3:
            scann.build()
    queries = clustered_unit_vectors(25, 16, 12, seed=9)
    assert sorted(scann.ids) == sorted(exact.ids) == sorted(live)
    got, got_scores = scann.search(queries, k=5)
    want, want_scores = exact.search(queries, k=5)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(got, want)
    scann.save(tmp_path / "index")
    again, _ = load_index(tmp_path / "index").search(queries, k=5)
    np.testing.assert_array_equal(again, want)


def test_a_registered_kind_is_made_and_loaded_without_editing_any_other_class(
    tmp_path, monkeypatch
):
    """A new kind is one decorated class: make_index and load_index find it by its name."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))  # forgotten after the test

    @registry.register("test-exact")
    class TestExact(ExactIndex):
        pass

    assert TestExact.kind == "test-exact" and "test-exact" in kinds()
    index = make_index("test-exact", 4, chunk=2)
    index.add(["a", "b", "c"], np.eye(4, dtype=np.float32)[:3])
    index.save(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "manifest.json").read_text())["kind"] == "test-exact"
    loaded = load_index(tmp_path / "new")
    assert type(loaded) is TestExact and loaded.ids == ["a", "b", "c"]
    assert loaded.config["chunk"] == 2
    ExactIndex(4).save(tmp_path / "plain")
    with pytest.raises(IndexFormatError, match="not a 'test-exact' index"):
        TestExact.load(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"index kind must be one of \[.*'test-exact'.*got 'nope'"):
        make_index("nope", 4)
    with pytest.raises(ValueError, match="must be one of"):  # made with its own constructor
        make_index("sharded", 4)
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps(manifest | {"kind": "nope"}))
    with pytest.raises(IndexFormatError, match="unknown index kind 'nope'"):
        load_index(tmp_path / "plain")


def test_lookups_racing_changes_never_leave_an_id_unfindable():
    """The id -> row map is built on the first lookup after the ids were replaced (a fresh
    build, a save and a load never need it). The service asks ``in`` without the index's
    write lock, so a lookup building the map while a change lands must not install a map
    that misses the change: after each delete (which replaces the ids) and add, the new id
    is found and the deleted one is not, with two threads looking up all along."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, inside the map's construction too
    try:
        index = ExactIndex(4)
        index.add(_ids(20_000), np.ones((20_000, 4), np.float32))
        stop = threading.Event()

        def look():
            while not stop.is_set():
                _ = "img/000000.jpg" in index

        lookers = [threading.Thread(target=look) for _ in range(2)]
        for thread in lookers:
            thread.start()
        try:
            for n in range(60):
                gone, new = f"img/{n:06d}.jpg", f"new/{n}"
                index.delete([gone])
                index.add([new], np.ones((1, 4), np.float32))
                assert new in index and gone not in index, n
        finally:
            stop.set()
            for thread in lookers:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(index) == 20_000 and len(set(index.ids)) == 20_000

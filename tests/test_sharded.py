"""ShardedIndex: stable routing, the same answers as one index, subsets, updates, persistence."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from remap_tf.contract import MANIFEST_FILE
from remap_tf.errors import InvalidInputError
from remap_tf.serving.index import (
    ExactIndex,
    Index,
    IndexFormatError,
    ScannConfig,
    load_index,
    make_index,
)
from remap_tf.serving.index.files import write_manifest
from remap_tf.serving.index.sharded import ShardedIndex, merge_top_k, shard_of
from remap_tf.serving.manifest import file_entries
from tests.test_index import clustered_unit_vectors

DIM = 32


def _ids(n, prefix="img"):
    return [f"{prefix}/{i:06d}.jpg" for i in range(n)]


def _same_clusters(counts, dim, num_clusters, seed, spread):
    """Several draws around one set of cluster centres (database, new rows, fresh queries)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)
    out = []
    for count in counts:
        x = centres[rng.integers(0, num_clusters, count)] + spread * rng.normal(size=(count, dim))
        out.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return out


def _recall(found, truth):
    return sum(len(set(a) & set(b)) for a, b in zip(found, truth, strict=True)) / truth.size


def test_shard_of_is_a_stable_documented_hash():
    """blake2b-64 of the UTF-8 id, big-endian, modulo the shard count: pinned values, so a
    change of hash (which would misroute every saved index) fails here."""
    import hashlib

    digest = hashlib.blake2b(b"photos/cat.jpg", digest_size=8).digest()
    assert shard_of(["photos/cat.jpg"], 7)[0] == int.from_bytes(digest, "big") % 7
    assert list(shard_of(["a", "b", "photos/cat.jpg", "é"], 4)) == [3, 1, 1, 3]
    counts = np.bincount(shard_of(_ids(8000), 4), minlength=4)
    assert counts.min() > 1800  # about 2000 each
    with pytest.raises(ValueError, match="num_shards"):
        shard_of(["a"], 0)


def test_merge_top_k_keeps_the_best_and_pads():
    a = (np.array([["x", "y"]], object), np.array([[0.9, 0.1]], np.float32))
    b = (np.array([["z", None]], object), np.array([[0.5, -np.inf]], np.float32))
    ids, scores = merge_top_k([a, b], 3)
    assert ids.tolist() == [["x", "z", "y"]]
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.1]])


def _updates(indexes, data, new, ids):
    """The same deletes (a shard's last row, rows in the middle) and adds on every index."""
    gone = [ids[0], ids[17], ids[-1], *ids[100:140]]
    for index in indexes:
        index.delete(gone)
        index.add([f"new{i}" for i in range(len(new))], new)
    return gone


def test_four_exact_shards_answer_exactly_as_one_index_across_updates(tmp_path):
    data = clustered_unit_vectors(3000, DIM, 40, seed=1)
    new = clustered_unit_vectors(50, DIM, 5, seed=2)
    queries = clustered_unit_vectors(60, DIM, 40, seed=3)
    ids = _ids(3000)
    single = ExactIndex(DIM)
    sharded = ShardedIndex(DIM, 4, make_shard=lambda: ExactIndex(DIM))
    for index in (single, sharded):
        index.add(ids, data)
    assert [len(sharded.shard(n)) for n in range(4)] == list(np.bincount(shard_of(ids, 4)))

    def same(a, b):
        ids_a, scores_a = a.search(queries, k=10)
        ids_b, scores_b = b.search(queries, k=10)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=1e-6)

    same(single, sharded)
    gone = _updates([single, sharded], data, new, ids)
    same(single, sharded)
    assert len(sharded) == len(single) == 3000 - len(gone) + 50
    assert sorted(sharded.ids) == sorted(single.ids)
    assert "new3" in sharded and ids[0] not in sharded
    sharded.metadata = {"image_root": "/photos"}
    sharded.save(tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    assert isinstance(loaded, ShardedIndex) and loaded.kind == "sharded"
    assert loaded.metadata == {"image_root": "/photos"} and loaded.dim == DIM
    same(single, loaded)


def test_four_scann_shards_keep_recall_of_one_exact_index_across_updates(tmp_path):
    """Each shard is a ScaNN tree (AH, tuned to 0.95); together they find >= 0.95 of the
    exact top-10 of fresh queries from the data's clusters, before and after adds and
    deletes, and after save and load."""
    data, new, queries = _same_clusters((24_000, 300, 300), DIM, 200, seed=4, spread=0.7)
    ids = _ids(len(data))
    exact = ExactIndex(DIM)
    config = {"mode": "tree_ah", "num_leaves": 40, "num_threads": 1}
    sharded = ShardedIndex(DIM, 4, make_shard=lambda: make_index("scann", DIM, **config))
    for index in (exact, sharded):
        index.add(ids, data)
    sharded.build(threads=2)
    for n in range(4):
        tuning = sharded.shard(n).config["tuning"]
        assert tuning["reached"] and tuning["measured_recall"] >= 0.95
    assert _recall(sharded.search(queries, k=10)[0], exact.search(queries, k=10)[0]) >= 0.95
    _updates([exact, sharded], data, new, ids)
    truth = exact.search(queries, k=10)[0]
    assert _recall(sharded.search(queries, k=10)[0], truth) >= 0.95
    sharded.save(tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    found, _ = loaded.search(queries, k=10)
    assert _recall(found, truth) >= 0.95
    assert loaded.config["shards"]["0"]["kind"] == "scann"


def test_subset_of_shards_and_in_place_saves_rewrite_only_changed_shards(tmp_path):
    data = clustered_unit_vectors(800, DIM, 10, seed=7)
    ids = _ids(800)
    sharded = ShardedIndex(DIM, 4, make_shard=lambda: ExactIndex(DIM))
    sharded.add(ids, data)
    path = sharded.save(tmp_path / "index")
    before = sorted(p.name for p in path.iterdir() if p.name.startswith("shard-"))
    part = load_index(path, shards=[1, 3])
    assert part.shards_loaded == [1, 3]
    found, _ = part.search(data[:50], k=5)
    assert set(shard_of([i for i in found.ravel() if i], 4)) <= {1, 3}
    assert len(part) == sum(shard_of(ids, 4) % 2 == 1)
    owners = shard_of(ids, 4)
    in_one = [i for i, s in zip(ids, owners, strict=True) if s == 1][:3]
    in_zero = [i for i, s in zip(ids, owners, strict=True) if s == 0][:1]
    with pytest.raises(ValueError, match="shard 0, which is not loaded"):
        part.delete(in_zero)
    part.delete(in_one)
    part.save(path)  # in place: only shard 1 is rewritten
    after = sorted(p.name for p in path.iterdir() if p.name.startswith("shard-"))
    changed = sorted(set(after) - set(before))
    assert len(changed) == 1 and changed[0].startswith("shard-00001-")
    assert len(after) == 4  # the old shard-00001 folder is gone
    full = load_index(path)
    assert len(full) == 797 and not set(in_one) & set(full.ids)
    with pytest.raises(ValueError, match="only shards"):
        part.save(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="shards must be"):
        load_index(path, shards=[4])


def test_tampering_and_misuse_are_refused(tmp_path):
    data = clustered_unit_vectors(200, DIM, 5, seed=8)
    sharded = ShardedIndex(DIM, 2, make_shard=lambda: ExactIndex(DIM))
    assert isinstance(sharded, Index)  # the interface, inherited, not imitated
    sharded.add(_ids(200), data)
    path = sharded.save(tmp_path / "index")
    manifest = json.loads((path / "manifest.json").read_text())
    shard_dir = path / manifest["shards"][1]["dir"]
    # A byte flipped inside a shard: the shard's own checksums catch it.
    copy = shutil.copytree(path, tmp_path / "flipped")
    target = copy / manifest["shards"][1]["dir"] / "descriptors.npy"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 1
    target.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="descriptors.npy.*checksum"):
        load_index(copy)
    # A shard manifest swapped: the top manifest's checksum of it catches it.
    copy = shutil.copytree(path, tmp_path / "swapped")
    other = json.loads((shard_dir / "manifest.json").read_text())
    other["count"] = 1
    (copy / manifest["shards"][1]["dir"] / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(IndexFormatError, match="manifest.json does not match"):
        load_index(copy)
    copy = shutil.copytree(path, tmp_path / "gone")
    shutil.rmtree(copy / manifest["shards"][0]["dir"])
    with pytest.raises(IndexFormatError, match="missing"):
        load_index(copy)
    with pytest.raises(IndexFormatError, match="use serving.index.load_index"):
        ExactIndex.load(path)
    with pytest.raises(ValueError, match="not a sharded index"):
        load_index(path / manifest["shards"][0]["dir"], shards=[0])
    with pytest.raises(ValueError, match="already in the index"):
        sharded.add(_ids(3), data[:3])
    with pytest.raises(KeyError, match="not in the index"):
        sharded.delete(["nope"])
    with pytest.raises(ValueError, match="dimension"):
        sharded.search(np.zeros((1, DIM + 1)))
    ids, scores = sharded.search(data[:2], k=500)  # k above the size: every vector
    assert ids.shape == (2, 200) and np.isfinite(scores).all()


def test_index_build_from_embeddings_sharded_then_search_add_delete(tmp_path, monkeypatch, capsys):
    """``remap embed``-format output (written here from a thumbnail embedder) -> ``remap index
    build --from-embeddings --shards 3`` (one Beam task per shard, in process) -> ``remap
    search``, ``index add``, ``index delete`` and ``index info`` on the sharded index, run from
    the project's parent folder with relative paths, as a user types them."""
    from remap_cli import common
    from remap_cli import main as cli
    from remap_tf.serving.beam_embed import list_sources
    from remap_tf.serving.embeddings import write_embeddings
    from tests.test_commands import ThumbnailEmbedder, _make_groups

    embedder = ThumbnailEmbedder()
    monkeypatch.setattr(common, "embedder_for", lambda model: embedder)
    _make_groups(tmp_path / "imgs", num_groups=6, per_group=3, distractors=2)
    paths, ids = list_sources(str(tmp_path / "imgs"))
    held_out = ids.index("group5/img2.png")
    write_embeddings(
        tmp_path / "emb",
        [i for n, i in enumerate(ids) if n != held_out],
        embedder.embed([p for n, p in enumerate(paths) if n != held_out]),
        shard_size=7,
        model="fake-model",
        source=str(tmp_path / "imgs"),
    )
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = run("index", "build", "--from-embeddings", "emb", "--out", "idx", "--shards", "3")
    assert "indexed 19 images (48-d) into idx" in out and "3 shard(s)" in out
    index = load_index("idx")
    assert isinstance(index, ShardedIndex) and len(index) == 19
    assert index.metadata["model"] == "fake-model"
    out = run("search", "--index", "idx", "imgs/group2/img1.png", "--k", "3", "--json", "h.json")
    hits = json.loads((tmp_path / "h.json").read_text())[0]["results"]
    assert [h["id"] for h in hits][:1] == ["group2/img1.png"]
    assert {h["id"] for h in hits} == {"group2/img0.png", "group2/img1.png", "group2/img2.png"}
    assert hits[0]["path"] == str((tmp_path / "imgs" / "group2" / "img1.png").resolve())
    run("index", "add", "--index", "idx", "imgs/group5/img2.png")
    run("index", "delete", "--index", "idx", "group0/img0.png")
    index = load_index("idx")
    assert len(index) == 19 and "group5/img2.png" in index and "group0/img0.png" not in index
    info = run("index", "info", "--index", "idx")
    assert "3 shards by id hash blake2b-64" in info
    # --shard-memory sizes the shard count from the build memory estimate.
    run("index", "build", "--from-embeddings", "emb", "--out", "idx2", "--shard-memory", "3k")
    assert load_index("idx2").num_shards >= 2
    code = cli.main(["index", "build", "--from-embeddings", "emb", "--images", "imgs"])
    assert code == 2 and "--out" in capsys.readouterr().err


def test_index_build_from_images_with_shards(tmp_path, monkeypatch, capsys):
    """``remap index build --model M --images DIR --shards 2``: embedded in process, then split."""
    from remap_cli import common
    from remap_cli import main as cli
    from tests.test_commands import FAKE_MODEL, ThumbnailEmbedder, _make_groups

    monkeypatch.setattr(common, "embedder_for", lambda model: ThumbnailEmbedder())
    _make_groups(tmp_path / "imgs", num_groups=3, per_group=3, distractors=1)
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        ["index", "build", "--model", FAKE_MODEL, "--images", "imgs", "--out", "idx"]
        + ["--shards", "2"]
        + ["--quiet"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "indexed 10 images" in out and "2 shard(s)" in out
    index = load_index("idx")
    assert index.num_shards == 2 and len(index) == 10
    assert sorted(len(index.shard(n)) for n in range(2)) == sorted(
        np.bincount(shard_of(index.ids, 2), minlength=2)
    )
    code = cli.main(["index", "build", "--model", FAKE_MODEL, "--images", "imgs", "--out", "x"]
                    + ["--shard-memory", "1G"])  # fmt: skip
    assert code == 2 and "--shard-memory needs --from-embeddings" in capsys.readouterr().err


def test_an_empty_scann_shard_saves_loads_and_takes_adds_later(tmp_path):
    """More shards than ids leave some shards empty: they save, load and accept adds."""
    data = clustered_unit_vectors(3, DIM, 2, seed=9)
    sharded = ShardedIndex(DIM, 8, make_shard=lambda: make_index("scann", DIM))
    sharded.add(["a", "b", "c"], data)
    loaded = load_index(sharded.save(tmp_path / "index"))
    assert len(loaded) == 3 and sum(len(loaded.shard(n)) == 0 for n in range(8)) >= 5
    loaded.add(["d", "e"], data[:2] * -1)
    loaded.save(tmp_path / "index")
    again = load_index(tmp_path / "index")
    ids, _ = again.search(-data[:1], k=1)
    assert ids[0, 0] == "d" and len(again) == 5


def test_more_shards_than_vectors_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """Issue 21.16: `--shards 100000` on 12 vectors ran for hours. A shard holds at least one
    vector and there are at most `MAX_SHARDS`: both refused in one line naming the numbers,
    before anything is written (by --from-embeddings, and by --images before embedding)."""
    from remap_cli import common
    from remap_cli import main as cli
    from remap_tf.serving.beam_index import MAX_SHARDS, build_sharded_index
    from remap_tf.serving.embeddings import write_embeddings
    from tests.test_commands import FAKE_MODEL, ThumbnailEmbedder, _make_groups

    monkeypatch.setattr(common, "embedder_for", lambda model: ThumbnailEmbedder())
    write_embeddings(tmp_path / "emb", [f"v{i}" for i in range(12)], np.eye(12, DIM) + 0.1)
    _make_groups(tmp_path / "imgs", num_groups=2, per_group=2, distractors=1)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["--from-embeddings", "emb", "--shards", "13"], "--shards 13 is more than the 12"),
        (["--from-embeddings", "emb", "--shards", "100000"], f"from 1 to {MAX_SHARDS}"),
        (["--model", FAKE_MODEL, "--images", "imgs", "--shards", "6"], "more than the 5"),
    ]
    for argv, message in cases:
        code = cli.main(["index", "build", *argv, "--out", "idx"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(InvalidInputError, match="--shards 13 is more than the 12 vectors"):
        build_sharded_index([str(tmp_path / "emb")], tmp_path / "idx", num_shards=13)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    code = cli.main(["index", "build", "--from-embeddings", "emb", "--out", "idx", "--shards", "4"])
    assert code == 0, capsys.readouterr().err
    assert load_index("idx").num_shards == 4


def test_small_shards_get_the_tree_of_the_whole_and_match_one_index(tmp_path):
    """48k vectors, a tree from 40k on (``tree_above``, a small stand-in for 100k): one index
    is a tree; so are its 4 shards of ~12k, which alone would be brute force (under 20k) and
    score every vector. Tuned, each shard measures brute force too and keeps the tree only as
    the faster at the target; the shards' merged top-10 of fresh queries reach the target
    against exact search, as the single index's do, and match the single index's top-10."""
    data, queries = _same_clusters((48_000, 300), DIM, 200, seed=5, spread=0.7)
    ids = _ids(len(data))
    config = {"tree_above": 40_000, "num_threads": 1}
    single = make_index("scann", DIM, **config)
    sharded = ShardedIndex(DIM, 4, make_shard=lambda: make_index("scann", DIM, **config))
    exact = ExactIndex(DIM)
    for index in (single, sharded, exact):
        index.add(ids, data)
    sharded.build()
    truth = exact.search(queries, k=10)[0]
    single_found = single.search(queries, k=10)[0]
    found = sharded.search(queries, k=10)[0]
    assert single.config["mode"] == "tree_ah" and _recall(single_found, truth) >= 0.95
    for n in range(4):
        shard = sharded.shard(n).config
        assert shard["collection_size"] == 48_000 and len(sharded.shard(n)) < 20_000
        assert shard["mode"] == "tree_ah", shard["tuning"]["candidates"]
        tried = {c["mode"]: c for c in shard["tuning"]["candidates"]}
        assert tried["brute_force"]["recall"] == 1.0
        assert tried["brute_force"]["qps"] < shard["tuning"]["qps"]
    # Each misses at most 1 - 0.95 of the true top-10, so the two agree on at least 0.9 of it
    # (measured: sharded 0.98, single 0.975, agreement 0.96).
    assert _recall(found, truth) >= max(0.95, _recall(single_found, truth) - 0.05)
    assert _recall(found, single_found) >= 2 * 0.95 - 1
    loaded = load_index(sharded.save(tmp_path / "index"))
    assert loaded.shard(0).config["mode"] == "tree_ah"
    np.testing.assert_array_equal(loaded.search(queries, k=10)[0], found)


def test_untuned_shards_take_the_mode_of_the_collection_and_old_configs_still_load(tmp_path):
    """Without tuning a shard gets the mode the whole collection's size calls for (its leaves
    from its own size); a shard too small to train a tree keeps its own. A config saved
    before these fields existed (no collection_size or tune_budget) loads and searches."""
    config = ScannConfig(tree_above=40_000)
    assert config.resolved(12_000).mode == "brute_force"
    resolved = dataclasses.replace(config, collection_size=48_000).resolved(12_000)
    assert (resolved.mode, resolved.num_leaves) == ("tree_ah", 110)  # sqrt(12,000)
    assert dataclasses.replace(config, collection_size=10**6).resolved(1_000).mode == "brute_force"
    data = clustered_unit_vectors(12_000, DIM, 40, seed=6)
    ids = _ids(len(data))
    untuned = {"brute_force_below": 2_000, "tree_above": 8_000, "target_recall": None}
    sharded = ShardedIndex(DIM, 4, make_shard=lambda: make_index("scann", DIM, **untuned))
    sharded.add(ids, data)
    sharded.search(data[:5], k=3)  # builds every shard, told the collection's size
    for n in range(4):
        shard = sharded.shard(n).config
        assert (shard["mode"], shard["collection_size"], shard["tuning"]) == (
            "tree_ah", 12_000, None
        )  # fmt: skip
    # An index saved before collection_size and tune_budget existed.
    folder = sharded.shard(0).save(tmp_path / "old")
    old = json.loads((folder / "config.json").read_text())
    for name in ("collection_size", "tune_budget"):
        del old[name]
    (folder / "config.json").write_text(json.dumps(old))
    (folder / MANIFEST_FILE).unlink()
    write_manifest(folder, "scann", DIM, len(sharded.shard(0)), file_entries(folder))
    loaded = load_index(folder)
    assert loaded.config["collection_size"] is None and loaded.config["mode"] == "tree_ah"
    np.testing.assert_array_equal(
        loaded.search(data[:20], k=5)[0], sharded.shard(0).search(data[:20], k=5)[0]
    )

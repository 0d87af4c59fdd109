"""``remap embed`` on Apache Beam: the same descriptors as in process, dead letters, resume.

A tiny random-initialised REMAP (MobileNetV2 alpha 0.35) exported at 64 px, a folder of real
PNG/JPEG files (random colour patterns) and broken ones (truncated, not an image, empty).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remap_cli import main as cli
from remap_tf import contract
from remap_tf.serving import embeddings
from remap_tf.serving.beam_embed import (
    RemapModelHandler,
    embed_images,
    list_sources,
    pipeline_options,
)
from remap_tf.serving.embeddings import load_embeddings, write_embeddings

GOOD = 10
BROKEN = {
    "broken/truncated.jpg": "truncated",
    "broken/text.png": "not an image",
    "broken/empty.jpg": "empty",
}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from remap_tf.export.saved_model import export_model
    from remap_tf.model import REMAP

    model = REMAP("mobilenet_v2", backbone_kwargs={"alpha": 0.35})
    version = export_model(model, tmp_path_factory.mktemp("models") / "remap", image_size=64)
    return str(version.parent)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        pixels = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((12, 12, 1))).astype(np.uint8)
        folder = root / f"group{i % 3}"
        folder.mkdir(exist_ok=True)
        suffix = ".png" if i % 2 else ".jpg"
        Image.fromarray(pixels).save(folder / f"img{i}{suffix}")
    (root / "broken").mkdir()
    whole = (root / "group0" / "img0.jpg").read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "broken" / "text.png").write_bytes(b"this is not an image")
    (root / "broken" / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(export_dir, images):
    """Descriptors of the good images from the in-process embedder, by id."""
    from remap_tf.serving.client import LocalEmbedder

    paths, ids = list_sources(str(images))
    good = [(i, p) for i, p in zip(ids, paths, strict=True) if not i.startswith("broken/")]
    rows = LocalEmbedder(export_dir).embed([p for _, p in good])
    return {i: row for (i, _), row in zip(good, rows, strict=True)}


def test_two_workers_match_the_in_process_embedder_and_resume_one_shard(
    export_dir, images, reference, tmp_path
):
    """Two worker processes (FnApiRunner, multi_processing): descriptors within 1e-5 of
    LocalEmbedder, the broken files in the dead letters; deleting one shard and running again
    rebuilds that shard only."""
    out = tmp_path / "emb"
    summary = embed_images(str(images), export_dir, out, shard_size=4, batch_size=3, workers=2)
    assert summary["shards"] == 4 and summary["embedded_shards"] == [0, 1, 2, 3]
    assert summary["count"] == GOOD and summary["dim"] == len(next(iter(reference.values())))
    ids, rows, info = load_embeddings(out)
    assert sorted(ids) == sorted(reference) and info["dead"] == len(BROKEN)
    np.testing.assert_allclose(rows, np.stack([reference[i] for i in ids]), rtol=0, atol=1e-5)
    dead = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
    assert sorted(d["id"] for d in dead) == sorted(BROKEN)
    reasons = {d["id"]: d["reason"] for d in dead}
    assert "empty file" in reasons["broken/empty.jpg"]
    assert "not JPEG, PNG, GIF or BMP" in reasons["broken/text.png"]
    assert all(os.path.isabs(d["image"]) for d in dead)
    # Delete one shard's descriptors: a rerun (in process this time) redoes only that one.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
    (out / "shard-00002.npy").unlink()
    again = embed_images(str(images), export_dir, out, shard_size=4, batch_size=3, workers=1)
    assert again["embedded_shards"] == [2] and again["skipped_shards"] == [0, 1, 3]
    for name, stamp in stamps.items():
        if name != "shard-00002.npy":
            assert (out / name).stat().st_mtime_ns == stamp, name
    ids2, rows2, _ = load_embeddings(out)
    assert ids2 == ids
    np.testing.assert_allclose(rows2, rows, rtol=0, atol=1e-5)
    # A different shard size in the same folder is refused, not mixed.
    with pytest.raises(ValueError, match="another run"):
        embed_images(str(images), export_dir, out, shard_size=5)


def test_remap_embed_command_with_relative_paths_and_a_glob(
    export_dir, images, reference, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(images.parent)
    pattern = f"{images.name}/group*/*.png"
    code = cli.main(
        ["embed", "--images", pattern, "--model", os.path.relpath(export_dir), "--out", "out"]
        + ["--shard-size", "100", "--", "--runner=FnApiRunner"]
    )
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "embedded 5 images" in stdout and "0 unreadable" in stdout
    ids, rows, info = load_embeddings(images.parent / "out")
    assert sorted(ids) == sorted(i for i in reference if i.endswith(".png"))
    np.testing.assert_allclose(rows, np.stack([reference[i] for i in ids]), rtol=0, atol=1e-5)
    assert info["model"] == str(Path(export_dir).resolve())
    code = cli.main(["embed", "--images", "nowhere/", "--model", export_dir, "--out", "o2"])
    assert code == 2 and "nowhere" in capsys.readouterr().err


def test_remap_embed_and_index_build_write_one_format_read_by_one_reader(
    export_dir, images, reference, tmp_path, monkeypatch, capsys
):
    """``remap embed`` (Beam) and ``remap index build --images`` (in process) write the same
    descriptor format: the same files, ids, dead letters and descriptors, read through the one
    reader (`load_embeddings`), and each folder builds an index with ``--from-embeddings``."""
    monkeypatch.chdir(tmp_path)
    source, model = os.path.relpath(images), os.path.relpath(export_dir)
    assert cli.main(["embed", "--images", source, "--model", model, "--out", "emb"]) == 0
    argv = ["index", "build", "--model", model, "--images", source, "--out", "idx", "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "indexed 10 images" in capsys.readouterr().out
    folders = {"embed": tmp_path / "emb", "index build": tmp_path / "idx.embeddings"}
    read = {name: load_embeddings(folder) for name, folder in folders.items()}
    for name, (ids, rows, info) in read.items():
        assert sorted(ids) == sorted(reference), name
        np.testing.assert_allclose(rows, np.stack([reference[i] for i in ids]), atol=1e-5)
        assert info["model"] == str(Path(export_dir).resolve()) and info["dead"] == len(BROKEN)
        dead = embeddings.dead_letters(folders[name])
        assert sorted(d["id"] for d in dead) == sorted(BROKEN), name
    assert read["embed"][0] == read["index build"][0]
    names = {n: sorted(p.name for p in f.iterdir()) for n, f in folders.items()}
    assert names["embed"] == names["index build"]
    assert {embeddings.RUN_FILE, contract.MANIFEST_FILE, embeddings.DEAD_LETTER} <= set(
        names["embed"]
    )
    argv = ["index", "build", "--from-embeddings", "emb", "--out", "idx2", "--kind", "exact"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    from remap_tf.serving.index import load_index

    assert sorted(load_index("idx2").ids) == sorted(load_index("idx").ids) == sorted(reference)


def test_handler_returns_a_weakly_referencable_model_and_runner_options(export_dir):
    import weakref

    handler = RemapModelHandler(export_dir, batch_size=4)
    model = handler.load_model()
    assert weakref.ref(model)() is model  # Beam's shared.Shared needs this
    results = handler.run_inference([b"junk", (b"\x89PNG\r\n\x1a\n" + b"\0" * 30)], model)
    assert all(isinstance(r.inference, str) for r in results)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}
    local = pipeline_options([], workers=2).get_all_options()
    assert local["runner"] == "FnApiRunner" and local["direct_num_workers"] == 2
    assert local["direct_running_mode"] == "multi_processing"
    remote = pipeline_options(["--runner=DataflowRunner", "--project=p"], 2).get_all_options()
    assert remote["runner"] == "DataflowRunner" and remote["project"] == "p"


def test_embeddings_format_is_checked_on_read(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(25, 8)).astype(np.float32)
    ids = [f"x{i}" for i in range(25)]
    manifest = write_embeddings(tmp_path / "e", ids, rows, shard_size=10, model="m")
    assert manifest["num_shards"] == 3 and manifest["count"] == 25
    got_ids, got, info = load_embeddings(tmp_path / "e")
    assert got_ids == ids and info["model"] == "m"
    np.testing.assert_array_equal(got, rows)
    raw = bytearray((tmp_path / "e" / "shard-00001.npy").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "e" / "shard-00001.npy").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-00001.npy does not match"):
        load_embeddings(tmp_path / "e")
    write_embeddings(tmp_path / "f", ids[:3], rows[:3])
    with pytest.raises(ValueError, match="more than one"):
        load_embeddings([tmp_path / "f", tmp_path / "f"])
    assert not embeddings.shard_complete(tmp_path / "nothing", 0)

"""Manifests from a class-folder tree, a path,label CSV and a GLDv2 train_clean.csv."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from remap_tf.training.data import Manifest, load_manifest


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # files are not opened by load_manifest
    return path


def test_folder_of_class_subfolders(tmp_path):
    for name in ["b/2.jpg", "b/1.PNG", "a/x.jpeg", "a/deeper/y.gif", "a/z.bmp", "c/only.jpg"]:
        _touch(tmp_path / name)
    _touch(tmp_path / "a/notes.txt")  # other extensions are ignored
    _touch(tmp_path / "a/.hidden.jpg")  # hidden files too
    (tmp_path / "empty_class").mkdir()
    manifest = load_manifest(tmp_path)
    assert manifest.class_names == ["a", "b", "c"]
    assert [p.replace(str(tmp_path), "") for p in manifest.paths] == [
        "/a/deeper/y.gif",
        "/a/x.jpeg",
        "/a/z.bmp",
        "/b/1.PNG",
        "/b/2.jpg",
        "/c/only.jpg",
    ]
    np.testing.assert_array_equal(manifest.labels, [0, 0, 0, 1, 1, 2])
    assert manifest.labels.dtype == np.int32
    np.testing.assert_array_equal(manifest.class_counts(), [3, 2, 1])


def test_csv_manifest_resolves_relative_paths_against_its_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    csv_path = tmp_path / "lists" / "train.csv"
    absolute = tmp_path / "elsewhere" / "abs.jpg"
    csv_path.write_text(
        f"path,label\nimgs/a.jpg,10\nimgs/b.jpg,2\n\n{absolute},10\nimgs/c.jpg,2\n",
        encoding="utf-8",
    )
    manifest = load_manifest(csv_path)
    # Integer labels sort numerically ("2" before "10").
    assert manifest.class_names == ["2", "10"]
    assert manifest.paths == [
        str(tmp_path / "lists" / "imgs" / "a.jpg"),
        str(tmp_path / "lists" / "imgs" / "b.jpg"),
        str(absolute),
        str(tmp_path / "lists" / "imgs" / "c.jpg"),
    ]
    np.testing.assert_array_equal(manifest.labels, [1, 0, 1, 0])

    text = tmp_path / "names.csv"
    text.write_text("\ufeffPath, Label\nx.jpg,tower\ny.jpg,bridge\n", encoding="utf-8")
    manifest = load_manifest(text)  # BOM, case and spaces in the header are tolerated
    assert manifest.class_names == ["bridge", "tower"]
    np.testing.assert_array_equal(manifest.labels, [1, 0])


def test_gldv2_train_clean_layout(tmp_path):
    csv_path = tmp_path / "train_clean.csv"
    csv_path.write_text("landmark_id,images\n7,abc123 def456\n12,0a1ffff\n", encoding="utf-8")
    # No train/ folder: images are looked up under the CSV's folder.
    manifest = load_manifest(csv_path)
    assert manifest.class_names == ["7", "12"]
    assert manifest.paths == [
        str(tmp_path / "a/b/c/abc123.jpg"),
        str(tmp_path / "d/e/f/def456.jpg"),
        str(tmp_path / "0/a/1/0a1ffff.jpg"),
    ]
    np.testing.assert_array_equal(manifest.labels, [0, 0, 1])
    # A train/ folder beside the CSV is the default image root.
    (tmp_path / "train").mkdir()
    assert load_manifest(csv_path).paths[0] == str(tmp_path / "train/a/b/c/abc123.jpg")
    # An explicit root wins.
    root = tmp_path / "images"
    root.mkdir()
    assert load_manifest(csv_path, image_root=root).paths[2] == str(root / "0/a/1/0a1ffff.jpg")


def test_clear_errors_for_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_manifest(tmp_path / "empty")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,url,landmark_id\n1,http://x,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"wrong\.csv.*'id,url,landmark_id'.*path,label"):
        load_manifest(wrong)
    blank = tmp_path / "blank.csv"
    blank.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank\.csv: empty file"):
        load_manifest(blank)
    header_only = tmp_path / "header.csv"
    header_only.write_text("path,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no rows"):
        load_manifest(header_only)
    short = tmp_path / "short.csv"
    short.write_text("path,label\na.jpg,1\nb.jpg\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short\.csv, line 3"):
        load_manifest(short)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ValueError, match="not a UTF-8"):
        load_manifest(binary)
    gld = tmp_path / "train_clean.csv"
    gld.write_text("landmark_id,images\n1,abcd\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="image root"):
        load_manifest(gld, image_root=tmp_path / "missing")
    ok = tmp_path / "ok.csv"
    ok.write_text("path,label\na.jpg,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="image_root"):
        load_manifest(ok, image_root=tmp_path)


def test_single_image_classes_are_dropped_with_a_warning_naming_them(caplog):
    manifest = Manifest(["a0", "b0", "b1", "c0", "d0", "d1"], [0, 1, 1, 2, 3, 3], list("abcd"))
    with caplog.at_level(logging.WARNING, logger="remap.training"):
        kept = manifest.drop_small_classes(2)
    assert kept.paths == ["b0", "b1", "d0", "d1"]
    np.testing.assert_array_equal(kept.labels, [1, 1, 3, 3])
    assert kept.class_names == list("abcd")
    assert "2 class(es)" in caplog.text and "a, c" in caplog.text
    assert manifest.drop_small_classes(1) is manifest


def test_manifest_validation_subset_and_splits():
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        Manifest(["a", "b"], [0], ["x"])
    with pytest.raises(ValueError, match="labels must lie"):
        Manifest(["a"], [3], ["x"])
    labels = np.repeat(np.arange(10), 4)
    manifest = Manifest([f"{i}.jpg" for i in range(40)], labels, [str(c) for c in range(10)])
    sub = manifest.subset([5, 0])
    assert sub.paths == ["5.jpg", "0.jpg"] and list(sub.labels) == [1, 0]

    train, held = manifest.split(0.3, seed=1, by="class")
    assert len(train) + len(held) == 40
    assert not set(train.labels) & set(held.labels)  # unseen classes
    assert len(set(held.labels)) == 3
    again, _ = manifest.split(0.3, seed=1, by="class")
    assert again.paths == train.paths

    train, held = manifest.split(0.25, seed=0, by="image")
    np.testing.assert_array_equal(held.class_counts(), [1] * 10)
    assert not set(train.paths) & set(held.paths)
    with pytest.raises(ValueError, match="fraction"):
        manifest.split(1.5)
    with pytest.raises(ValueError, match="by"):
        manifest.split(0.5, by="photo")

"""Tests of the scikit-image photo retrieval set (remap_cli/demo/photoset.py)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remap_cli.demo.photoset import PHOTOS, load_images, make_photo_views, split_photos
from remap_tf.outputs import MARKER, listed

SMALL = dict(views_per_photo=3, image_size=(48, 64), distractors_per_photo=1)
FEW = ["astronaut", "chelsea", "coffee", "coins", "rocket", "motorcycle", "camera"]


def digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_every_photo_loads_offline_as_rgb():
    for name, load in PHOTOS.items():
        for pixels in load():
            assert pixels.ndim == 3 and pixels.shape[2] == 3, name
            assert pixels.dtype == np.uint8 and min(pixels.shape[:2]) >= 100, name


def test_same_seed_gives_byte_identical_files(tmp_path):
    make_photo_views(tmp_path / "a", seed=3, photos=FEW, **SMALL)
    make_photo_views(tmp_path / "b", seed=3, photos=FEW, **SMALL)
    make_photo_views(tmp_path / "c", seed=4, photos=FEW, **SMALL)
    a, b, c = (digest(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c
    train = json.loads((tmp_path / "a" / "photoset.json").read_text())["train_photos"]
    # 3 views per photo, 1 distractor per training photo, 3 manifests and the settings file,
    # plus the output marker, which lists all of them.
    assert len(a) == len(FEW) * 3 + len(train) + 4 + 1
    assert sorted(listed(tmp_path / "a")) == sorted(set(a) - {MARKER})


def test_split_is_by_photo_and_files_match_manifests(tmp_path):
    views = make_photo_views(tmp_path, seed=0, photos=FEW, val_fraction=0.15, **SMALL)
    train, val, test = set(views.train_photos), set(views.val_photos), set(views.test_photos)
    assert train | val | test == set(FEW)
    assert not (train & val or train & test or val & test)
    assert len(test) >= 2 and len(val) >= 1 and len(train) >= 2

    for manifest, photos in ((views.train_csv, train), (views.val_csv, val)):
        with manifest.open() as handle:
            rows = list(csv.DictReader(handle))
        assert {row["label"] for row in rows} == photos
        for row in rows:
            path = manifest.parent / row["path"]
            assert path.parent.name == row["label"]
            with Image.open(path) as image:
                assert image.size == (64, 48) and image.format == "JPEG"

    spec = json.loads(views.test_groups_json.read_text())
    assert [group["name"] for group in spec["groups"]] == sorted(test)
    for group in spec["groups"]:
        assert len(group["images"]) == 3
        for image in group["images"]:
            assert (views.test_groups_json.parent / image).is_file()
            assert Path(image).parent.name == group["name"]
    # Distractors are views of training photos only, never of a test photo.
    assert len(spec["distractors"]) == len(train)
    for image in spec["distractors"]:
        assert (views.test_groups_json.parent / image).is_file()
        assert Path(image).stem.rsplit("_", 1)[0] in train


def test_views_of_one_photo_differ(tmp_path):
    views = make_photo_views(tmp_path, seed=0, photos=FEW, **SMALL)
    images, labels, _ = load_images(views.train_csv)
    assert images.shape[1:] == (48, 64, 3)
    same = images[labels == labels[0]]
    assert not np.array_equal(same[0], same[1])


def test_rerun_over_leftovers_rewrites_cleanly(tmp_path):
    make_photo_views(tmp_path, seed=0, photos=FEW, **SMALL)
    (tmp_path / "train.csv").write_text("garbage")
    views = make_photo_views(tmp_path, seed=1, photos=FEW, **SMALL)
    after = digest(tmp_path)
    fresh = tmp_path.parent / "fresh"
    make_photo_views(fresh, seed=1, photos=FEW, **SMALL)
    assert after == digest(fresh)  # no stale view of seed 0 is left, the CSV is rewritten
    assert views.train_dir.is_dir()


def test_split_photos_is_seeded_and_validates():
    names = [f"p{i}" for i in range(10)]
    assert split_photos(names, 0, 0.3) == split_photos(names, 0, 0.3)
    train, val, test = split_photos(names, 0, 0.3, 0.2)
    assert (len(train), len(val), len(test)) == (5, 2, 3)
    with pytest.raises(ValueError, match="at least 2 needed"):
        split_photos(names[:4], 0, 0.5, 0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"views_per_photo": 1}, "views_per_photo"),
        ({"image_size": (16, 64)}, "image_size"),
        ({"image_size": "big"}, "image_size"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"photos": ["astronaut", "nope", "coffee", "rocket"]}, "nope"),
        ({"photos": ["astronaut", "coffee"]}, "at least 4"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_photo_views(tmp_path, **kwargs)

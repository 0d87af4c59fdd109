"""Ground-truth loaders on small files written in each benchmark's real format."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from remap_tf import datasets


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_revisited_pickle_protocols_and_boxes(tmp_path):
    """Layout of revisitop's gnd_roxford5k.pkl: imlist, qimlist, gnd[{bbx, easy, hard, junk}]."""
    gnd = {
        "imlist": ["all_souls_000001", "all_souls_000002", "balliol_000003", "keble_000004"],
        "qimlist": ["all_souls_000013", "keble_000005"],
        "gnd": [
            {
                "bbx": [136.5, 34.1, 648.5, 955.7],
                "easy": np.array([0]),
                "hard": [1],
                "junk": [2],
            },
            {"bbx": np.array([1.0, 2.0, 3.0, 4.0]), "easy": [3], "hard": [], "junk": []},
        ],
    }
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(gnd, protocol=2))
    ds = datasets.load_revisited(path)
    assert ds.name == "roxford5k" and ds.protocols == ("easy", "medium", "hard")
    assert ds.database[2] == str(tmp_path / "roxford5k" / "jpg" / "balliol_000003.jpg")
    q = ds.queries[0]
    assert q.path.endswith("jpg/all_souls_000013.jpg") and q.box == (136.5, 34.1, 648.5, 955.7)
    assert q.groundtruth["easy"] == ((0,), (2, 1))
    assert q.groundtruth["medium"] == ((0, 1), (2,))
    assert q.groundtruth["hard"] == ((1,), (2, 0))
    assert ds.positives("hard") == [(1,), ()]
    # Evaluation through the dataset: ranking [2, 1, 3, 0] as in test_evaluation (19/24).
    result = ds.evaluate(np.array([[2, 1, 3, 0], [3, 0, 1, 2]]))
    assert result["medium"]["ap"][0] == pytest.approx(19 / 24)
    assert result["hard"]["num_skipped"] == 1


def test_revisited_pickle_refuses_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    with pytest.raises(ValueError, match="refusing to load posix.mkdir|refusing to load os"):
        datasets.load_revisited(path)
    assert not marker.exists()
    (tmp_path / "gnd_bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a revisited ground-truth pickle"):
        datasets.load_revisited(tmp_path / "gnd_bad.pkl")
    with pytest.raises(FileNotFoundError):
        datasets.load_revisited(tmp_path / "absent.pkl")


def test_oxford_text_files(tmp_path):
    """Oxford names carry 'oxc1_' in _query.txt; positives = good + ok; junk ignored."""
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 136.5 34.1 648.5 955.7\n")
    (gt / "all_souls_1_good.txt").write_text("all_souls_000013\nall_souls_000026\n")
    (gt / "all_souls_1_ok.txt").write_text("oriel_000213\nnot_in_folder_000001\n")
    (gt / "all_souls_1_junk.txt").write_text("all_souls_000220\n")
    images = _touch(
        tmp_path / "jpg",
        "all_souls_000013.jpg",
        "all_souls_000026.jpg",
        "all_souls_000220.jpg",
        "oriel_000213.jpg",
        "radcliffe_camera_000001.jpg",
    )
    ds = datasets.load_oxford_paris(gt, images, name="oxford5k")
    assert ds.protocols == ("default",) and len(ds.database) == 5
    (q,) = ds.queries
    assert q.name == "all_souls_1" and q.box == (136.5, 34.1, 648.5, 955.7)
    assert q.path == str(images / "all_souls_000013.jpg")
    assert q.groundtruth["default"] == ((0, 1, 3), (2,))
    assert ds.info["missing"] == 1
    (gt / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 136.5 34.1\n")
    with pytest.raises(ValueError, match="x1 y1 x2 y2"):
        datasets.load_oxford_paris(gt, images)
    (gt / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 1 2 3 4\n")
    (gt / "all_souls_1_ok.txt").unlink()
    with pytest.raises(FileNotFoundError, match="all_souls_1_ok.txt"):
        datasets.load_oxford_paris(gt, images)


def test_paris_text_files_without_prefix_and_empty_good(tmp_path):
    """Paris6k: names used as they are; every *_good.txt is empty, positives are in _ok."""
    gt = tmp_path / "paris6k"
    gt.mkdir()
    (gt / "defense_1_query.txt").write_text(
        "paris_defense_000605 130.000000 17.000000 843.000000 732.000000\n"
    )
    (gt / "defense_1_good.txt").write_text("")
    (gt / "defense_1_ok.txt").write_text("paris_defense_000001\n")
    (gt / "defense_1_junk.txt").write_text("")
    images = _touch(
        tmp_path / "jpg", "paris_defense_000001.jpg", "paris_defense_000605.jpg", "paris_x_1.jpg"
    )
    assert datasets.detect_format(gt) == "oxford"
    ds = datasets.load_dataset(gt, images=images)
    assert ds.queries[0].groundtruth["default"] == ((0,), ())
    assert ds.queries[0].box == (130.0, 17.0, 843.0, 732.0)
    with pytest.raises(ValueError, match="needs the image folder"):
        datasets.load_dataset(gt)


def test_holidays_groups_by_id_div_100(tmp_path):
    folder = _touch(
        tmp_path / "holidays", "100000.jpg", "100001.jpg", "100002.jpg", "100100.jpg", "100101.jpg"
    )
    assert datasets.detect_format(folder) == "holidays"
    ds = datasets.load_dataset(folder)
    assert [q.path for q in ds.queries] == [str(folder / "100000.jpg"), str(folder / "100100.jpg")]
    assert ds.queries[0].groundtruth["default"] == ((1, 2), (0,))
    assert ds.queries[1].groundtruth["default"] == ((4,), (3,))


def test_ukbench_groups_of_four(tmp_path):
    names = [f"ukbench{i:05d}.jpg" for i in range(8)]
    folder = _touch(tmp_path / "ukb", *names)
    assert datasets.detect_format(folder) == "ukbench"
    ds = datasets.load_dataset(folder)
    assert len(ds.queries) == 8
    assert ds.queries[5].groundtruth["default"] == ((4, 6, 7), (5,))


def test_folder_per_class_with_distractors(tmp_path):
    _touch(tmp_path / "data" / "cats", "a.jpg", "b.png")
    _touch(tmp_path / "data" / "dogs", "c.jpg", "d.jpg", "e.JPG", "notes.txt")
    _touch(tmp_path / "data", "street.jpg")
    ds = datasets.load_dataset(tmp_path / "data")
    assert [os.path.basename(p) for p in ds.database] == [
        "a.jpg",
        "b.png",
        "c.jpg",
        "d.jpg",
        "e.JPG",
        "street.jpg",
    ]
    assert len(ds.queries) == 5 and ds.info["distractors"] == 1
    assert ds.queries[3].groundtruth["default"] == ((2, 4), (3,))
    with pytest.raises(FileNotFoundError, match="no class folders"):
        datasets.load_folders(_touch(tmp_path / "flat", "x.jpg"))


def test_groups_json(tmp_path):
    _touch(tmp_path / "imgs", "a.jpg", "b.jpg", "c.jpg", "d.jpg", "x.jpg")
    spec = {
        "groups": [
            {"name": "eiffel", "images": ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg"]},
            {"name": "louvre", "images": ["imgs/d.jpg"]},
        ],
        "distractors": ["imgs/x.jpg"],
    }
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(spec))
    ds = datasets.load_dataset(path)
    assert ds.database[4] == str(tmp_path / "imgs" / "x.jpg")
    assert len(ds.queries) == 4
    assert ds.queries[1].groundtruth["default"] == ((0, 2), (1,))
    assert ds.queries[3].groundtruth["default"] == ((), (3,))  # alone: skipped by mAP
    spec["groups"][1]["images"].append("imgs/missing.jpg")
    path.write_text(json.dumps(spec))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        datasets.load_dataset(path)
    path.write_text('{"groups": [{"name": "a"}]}')
    with pytest.raises(ValueError, match=r"groups\[0\] needs an 'images' list"):
        datasets.load_dataset(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        datasets.load_dataset(path)


def test_groups_json_honours_queries(tmp_path):
    """Holidays' groundtruth.json lists each group's queries: only those are queries.

    Group "a" = images 0, 1, 2 with query 0: one query, positives (1, 2), junk (0,).
    Group "b" = images 3, 4 without 'queries': both are queries (the old rule).
    Group "c" = images 5, 6 with "queries": [] has no query at all.
    """
    _touch(tmp_path / "jpg", "a0.jpg", "a1.jpg", "a2.jpg", "b0.jpg", "b1.jpg", "c0.jpg", "c1.jpg")
    spec = {
        "groups": [
            {
                "name": "a",
                "images": ["jpg/a0.jpg", "jpg/a1.jpg", "jpg/a2.jpg"],
                "queries": ["jpg/a0.jpg"],
            },
            {"name": "b", "images": ["jpg/b0.jpg", "jpg/b1.jpg"]},
            {"name": "c", "images": ["jpg/c0.jpg", "jpg/c1.jpg"], "queries": []},
        ],
    }
    path = tmp_path / "groundtruth.json"
    path.write_text(json.dumps(spec))
    ds = datasets.load_dataset(path)
    assert len(ds.database) == 7
    assert [q.name for q in ds.queries] == ["a:a0.jpg", "b:b0.jpg", "b:b1.jpg"]
    assert ds.queries[0].groundtruth["default"] == ((1, 2), (0,))
    assert ds.queries[2].groundtruth["default"] == ((3,), (4,))
    spec["groups"][0]["queries"] = ["jpg/b0.jpg"]
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"groups\[0\] \(a\): query 'jpg/b0.jpg' is not one of"):
        datasets.load_dataset(path)
    spec["groups"][0]["queries"] = "jpg/a0.jpg"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="'queries' must be a list"):
        datasets.load_dataset(path)


def test_query_image_is_cropped_to_its_box(tmp_path):
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[10:20, 5:25] = 255
    Image.fromarray(pixels).save(tmp_path / "q.png")
    query = datasets.Query(str(tmp_path / "q.png"), (5.0, 10.0, 25.0, 20.0), {}, "q")
    import io

    crop = np.asarray(Image.open(io.BytesIO(datasets.query_image(query))))
    assert crop.shape == (10, 20, 3) and crop.min() == 255
    assert datasets.query_image(datasets.Query("p.jpg", None, {})) == "p.jpg"
    bad = datasets.Query(str(tmp_path / "q.png"), (100.0, 100.0, 120.0, 130.0), {}, "q")
    with pytest.raises(ValueError, match="empty"):
        datasets.query_image(bad)


def test_detect_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        datasets.detect_format(tmp_path / "nothing")
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(ValueError, match="format"):
        datasets.detect_format(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="format must be"):
        datasets.load_dataset(tmp_path, format="coco")

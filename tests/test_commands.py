"""`remap index build`, `remap search`, `remap evaluate`, in-process embedding and the report.

Most tests use a small deterministic embedder (a 4x4 colour thumbnail of the image) so the
commands run in seconds; one test goes through a real exported REMAP SavedModel.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remap_cli import common
from remap_cli import main as cli
from remap_tf import evaluation
from remap_tf.serving.collection import list_images
from remap_tf.serving.embeddings import dead_letters, load_embeddings
from remap_tf.serving.local_embed import embed_collection
from tests import browser

# What the tests give as --model when `common.embedder_for` is replaced by a fake embedder:
# a well-formed TF Serving address, so the command's own checks accept it.
FAKE_MODEL = "localhost:8500/fake"


class ThumbnailEmbedder:
    """Descriptor = L2-normalised, mean-removed 4x4 RGB thumbnail (48-d); counts its calls."""

    dim = 48

    def __init__(self, fail_on_call=None):
        self.calls = []
        self.fail_on_call = fail_on_call

    def _one(self, image):
        import io

        source = io.BytesIO(image) if isinstance(image, bytes) else image
        with Image.open(source) as im:
            x = np.asarray(im.convert("RGB").resize((4, 4), Image.BILINEAR), np.float32)
        x = x.reshape(-1) - x.mean()
        return x / max(np.linalg.norm(x), 1e-6)

    def embed(self, images):
        self.calls.append(list(images))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt
        return np.stack([self._one(i) for i in images]).astype(np.float32)


class RejectingEmbedder(ThumbnailEmbedder):
    """Like serving.client: a bad image raises a ValueError carrying its index and reason."""

    def embed(self, images):
        for i, image in enumerate(images):
            with open(image, "rb") as handle:
                head = handle.read(4)
            if head == b"junk":
                error = ValueError(f"Image {i} was rejected: not an image")
                error.index, error.reason = i, "not an image"
                raise error
        return super().embed(images)


def _make_groups(root, num_groups=4, per_group=3, distractors=2, seed=0):
    """Images in group folders: a random 4x4 colour pattern upscaled, plus a little noise."""
    rng = np.random.default_rng(seed)
    groups = {}
    for g in range(num_groups):
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
        folder = root / f"group{g}"
        folder.mkdir(parents=True)
        for m in range(per_group):
            pixels = np.kron(base, np.ones((16, 16, 1))) + rng.normal(0, 12, (64, 64, 3))
            path = folder / f"img{m}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
            groups.setdefault(f"group{g}", []).append(path)
    for d in range(distractors):
        pixels = rng.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"distractor{d}.png")
    return groups


@pytest.fixture
def fake(monkeypatch):
    embedder = ThumbnailEmbedder()
    monkeypatch.setattr(common, "embedder_for", lambda model: embedder)
    return embedder


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------
# In-process embedding (the descriptor format of remap_tf.serving.embeddings)
# ---------------------------------------------------------------------------------------


def test_embedding_resumes_after_interrupt(tmp_path):
    _make_groups(tmp_path / "imgs", num_groups=4, per_group=3, distractors=0)
    paths, ids = list_images(tmp_path / "imgs")
    assert len(paths) == 12
    interrupted = ThumbnailEmbedder(fail_on_call=3)  # shard 0 = calls 1-2, dies in shard 1
    with pytest.raises(KeyboardInterrupt):
        embed_collection(interrupted, paths, ids, tmp_path / "shards", 4, 2, progress=False)
    assert sorted(p.name for p in (tmp_path / "shards").glob("shard-*")) == [
        "shard-00000.ids.json",
        "shard-00000.json",
        "shard-00000.npy",
    ]
    resumed = ThumbnailEmbedder()
    result = embed_collection(resumed, paths, ids, tmp_path / "shards", 4, 2, progress=False)
    assert result["skipped_shards"] == [0] and result["embedded_shards"] == [1, 2]
    assert [p for call in resumed.calls for p in call] == paths[4:]  # nothing redone
    embed_collection(ThumbnailEmbedder(), paths, ids, tmp_path / "fresh", 4, 2, progress=False)
    got_ids, got, _ = load_embeddings(tmp_path / "shards")
    fresh_ids, fresh, _ = load_embeddings(tmp_path / "fresh")
    assert got_ids == fresh_ids == ids
    np.testing.assert_array_equal(got, fresh)
    with pytest.raises(ValueError, match="another run"):
        embed_collection(resumed, paths[:5], ids[:5], tmp_path / "shards", 4, 2, progress=False)


@pytest.mark.parametrize("embedder_class", [ThumbnailEmbedder, RejectingEmbedder])
def test_unreadable_images_are_skipped_and_listed(tmp_path, embedder_class):
    _make_groups(tmp_path / "imgs", num_groups=2, per_group=3, distractors=0)
    (tmp_path / "imgs" / "group0" / "broken.png").write_bytes(b"junk, not a PNG")
    paths, ids = list_images(tmp_path / "imgs")
    paths.append(str(tmp_path / "imgs" / "gone.png"))
    ids.append("gone.png")
    embedder = embedder_class()
    result = embed_collection(embedder, paths, ids, tmp_path / "shards", 3, 3, progress=False)
    assert {s["image"] for s in result["dead"]} == {
        str(tmp_path / "imgs" / "group0" / "broken.png"),
        str(tmp_path / "imgs" / "gone.png"),
    }
    assert dead_letters(tmp_path / "shards") == result["dead"]
    got_ids, got, info = load_embeddings(tmp_path / "shards")
    assert len(got_ids) == 6 and got.shape == (6, 48) and info["dead"] == 2
    alone = ThumbnailEmbedder().embed([paths[ids.index(i)] for i in got_ids])
    np.testing.assert_allclose(got, alone, atol=1e-6)
    assert any("not found" in s["reason"] for s in result["dead"])


def _write_retired_store(folder, paths, rows: dict, skipped: dict, shard_size: int):
    """The retired format, as ``remap index build --images`` wrote it before there was one
    descriptor format: store.json, shard-N.npy and shard-N.json listing image paths."""
    folder.mkdir(parents=True)
    header = {
        "format_version": 1,
        "dim": 48,
        "shard_size": shard_size,
        "num_images": len(paths),
        "images_sha256": hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest(),
    }
    (folder / "store.json").write_text(json.dumps(header))
    for shard, start in enumerate(range(0, len(paths), shard_size)):
        chunk = paths[start : start + shard_size]
        done = [p for p in chunk if p not in skipped]
        np.save(folder / f"shard-{shard:05d}.npy", np.stack([rows[p] for p in done]))
        lost = [{"image": p, "reason": skipped[p]} for p in chunk if p in skipped]
        record = {"images": done, "skipped": lost}
        (folder / f"shard-{shard:05d}.json").write_text(json.dumps(record))


def test_a_retired_descriptor_folder_is_refused_then_upgraded(tmp_path, fake, capsys, monkeypatch):
    """A ``<out>.embeddings`` of the retired store.json format (its last shard unfinished, paths
    relative, as a user typed them): index build and evaluate refuse it in one line that says
    how to convert it; ``remap index upgrade`` converts it, keeping the descriptors, and the
    next build embeds only the unfinished shard."""
    _make_groups(tmp_path / "imgs", num_groups=3, per_group=3, distractors=1)
    (tmp_path / "imgs" / "group0" / "broken.png").write_bytes(b"junk, not a PNG")
    monkeypatch.chdir(tmp_path)
    paths, ids = list_images("imgs")
    assert len(paths) == 11 and not Path(paths[0]).is_absolute()
    broken = "imgs/group0/broken.png"
    rows = {p: ThumbnailEmbedder().embed([p])[0] for p in paths if p != broken}
    _write_retired_store(tmp_path / "idx.embeddings", paths, rows, {broken: "bad"}, 4)
    for name in ("shard-00002.npy", "shard-00002.json"):  # the retired run was interrupted
        (tmp_path / "idx.embeddings" / name).unlink()
    build = ["index", "build", "--model", FAKE_MODEL, "--images", "imgs", "--out", "idx"]
    build += ["--shard-size", "4", "--quiet"]
    for argv in (build, ["evaluate", "--dataset", paths[0], "--model", FAKE_MODEL]
                 + ["--embeddings", "idx.embeddings"]):  # fmt: skip
        code, _, err = _run(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "idx.embeddings holds descriptors in the retired store.json format" in err
        assert "remap index upgrade --embeddings idx.embeddings" in err
    assert fake.calls == []
    upgrade = ["index", "upgrade", "--embeddings", "idx.embeddings", "--images"]
    code, _, err = _run([*upgrade, "imgs/group1", "--model", FAKE_MODEL], capsys)
    assert code == 2 and "holds descriptors of 11 images, not of the 3 images given" in err
    assert (tmp_path / "idx.embeddings" / "store.json").is_file()
    upgrade.append("imgs")
    code, out, err = _run([*upgrade, "--model", FAKE_MODEL], capsys)
    assert code == 0, err
    assert "2 of 3 shard(s) converted" in out
    assert not (tmp_path / "idx.embeddings" / "store.json").exists()
    code, out, err = _run(build, capsys)
    assert code == 0, err
    assert "indexed 10 images" in out and "skipped 1 unreadable" in out and "broken.png" in out
    assert [p for call in fake.calls for p in call] == [str(Path(p).resolve()) for p in paths[8:]]
    got_ids, got, _ = load_embeddings("idx.embeddings")
    assert got_ids == [i for i in ids if i != "group0/broken.png"]
    good = [p for p in paths if p != broken]
    np.testing.assert_allclose(got, ThumbnailEmbedder().embed(good), atol=1e-6)
    code, _, err = _run([*upgrade, "--model", FAKE_MODEL], capsys)
    assert code == 2 and "not in the retired store.json format" in err


def test_list_images_manifests(tmp_path):
    _make_groups(tmp_path / "imgs", num_groups=1, per_group=2, distractors=0)
    (tmp_path / "list.txt").write_text("# two images\nimgs/group0/img0.png\nimgs/group0/img1.png\n")
    paths, ids = list_images(tmp_path / "list.txt")
    assert ids == ["imgs/group0/img0.png", "imgs/group0/img1.png"]
    assert paths[0] == str(tmp_path / "imgs/group0/img0.png")
    (tmp_path / "list.csv").write_text("path,label\nimgs/group0/img1.png,3\n")
    assert list_images(tmp_path / "list.csv")[1] == ["imgs/group0/img1.png"]
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(ValueError, match="'path' column"):
        list_images(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a manifest"):
        list_images(tmp_path / "absent")


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def test_index_build_and_search_commands(tmp_path, fake, capsys):
    groups = _make_groups(tmp_path / "imgs")
    (tmp_path / "imgs" / "group3" / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "index"
    code, stdout, _ = _run(
        [
            "index",
            "build",
            "--model",
            FAKE_MODEL,
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
        ]
        + ["--quiet"],
        capsys,
    )
    assert code == 0, stdout
    assert "indexed 14 images (48-d)" in stdout and "brute_force" in stdout
    assert "skipped 1 unreadable image(s)" in stdout and "broken.png" in stdout
    query = str(groups["group1"][0])
    report = tmp_path / "report" / "search.html"
    code, stdout, _ = _run(
        ["search", "--index", str(out), "--model", FAKE_MODEL, query, "--k", "3"]
        + ["--report", str(report), "--json", str(tmp_path / "hits.json")],
        capsys,
    )
    assert code == 0
    hits = json.loads((tmp_path / "hits.json").read_text())[0]["results"]
    assert hits[0]["id"] == "group1/img0.png" and hits[0]["score"] == pytest.approx(1, abs=1e-5)
    assert {h["id"] for h in hits[1:]} == {"group1/img1.png", "group1/img2.png"}
    assert hits[0]["path"] == query
    page = report.read_text()
    thumbs = re.findall(r'src="([^"]+)"', page)
    assert len(thumbs) == 4 and all(t.startswith("search_files/") for t in thumbs)
    assert all((report.parent / t).is_file() for t in thumbs)
    assert (report.parent / "search_files" / "search.png").is_file()
    assert sorted(p.name for p in report.parent.iterdir()) == ["search.html", "search_files"]


def test_image_names_are_printed_with_control_characters_escaped(tmp_path, fake, capsys):
    """An unreadable image whose name holds a C1 control (CSI, which a terminal obeys) and an
    invisible character is listed escaped, as remap search prints names; so is --out."""
    _make_groups(tmp_path / "imgs", num_groups=2, per_group=2, distractors=0)
    (tmp_path / "imgs" / "group0" / "bad\x9bname\u200b.png").write_bytes(b"\x89PNG broken")
    argv = ["index", "build", "--model", FAKE_MODEL, "--images", str(tmp_path / "imgs")]
    code, stdout, err = _run([*argv, "--out", str(tmp_path / "i\tx"), "--quiet"], capsys)
    assert code == 0, err
    assert "bad\\x9bname\\u200b.png" in stdout and "i\\tx" in stdout, stdout
    assert not {"\x9b", "\u200b", "\t"} & set(stdout), stdout


def test_evaluate_groups_json_matches_label_map(chromium, tmp_path, fake, capsys):
    groups = _make_groups(tmp_path / "imgs", num_groups=5, per_group=3, distractors=0)
    spec = {
        "groups": [
            {"name": name, "images": [str(p.relative_to(tmp_path)) for p in paths]}
            for name, paths in groups.items()
        ]
    }
    (tmp_path / "groups.json").write_text(json.dumps(spec))
    figures = tmp_path / "out" / "figures.json"
    code, stdout, _ = _run(
        ["evaluate", "--dataset", str(tmp_path / "groups.json"), "--model", FAKE_MODEL]
        + ["--json", str(figures), "--quiet", "--report", str(tmp_path / "eval.html")],
        capsys,
    )
    assert code == 0, stdout
    result = json.loads(figures.read_text())
    assert set(result) == {"mAP", "mP@1", "mP@5", "mP@10", "num_queries", "num_skipped"}
    assert result["num_queries"] == 15
    paths = [p for ps in groups.values() for p in ps]
    labels = [name for name, ps in groups.items() for _ in ps]
    expected = evaluation.label_map(ThumbnailEmbedder().embed(paths), labels)
    assert result["mAP"] == pytest.approx(expected)
    assert "mAP" in stdout and f"{100 * expected:.2f}" in stdout
    with browser.page(width=1024) as tab:  # a query and its 10 results wrap to the width
        seen = browser.load_file(tab, tmp_path / "eval.html")
    assert seen["images"] == 15 * 11 and seen["broken"] == [] and seen["overflow"] <= 0, seen


def test_evaluate_revisited_with_boxes_qe_and_dba(tmp_path, fake, capsys):
    """A revisited-format pickle; the query is a crop of a database image (its box)."""
    rng = np.random.default_rng(3)
    jpg = tmp_path / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    names = [f"img{i}" for i in range(6)]
    bases = [rng.integers(0, 256, size=(4, 4, 3)) for _ in range(3)]
    for i, name in enumerate(names):
        pixels = np.kron(bases[i % 3], np.ones((16, 16, 1))) + rng.normal(0, 8, (64, 64, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(jpg / f"{name}.jpg")
    # The query image: the pattern of group 0 in its top-left 64x64, noise elsewhere.
    canvas = rng.integers(0, 256, size=(96, 128, 3)).astype(np.float32)
    canvas[:64, :64] = np.kron(bases[0], np.ones((16, 16, 1)))
    Image.fromarray(canvas.astype(np.uint8)).save(jpg / "query0.jpg")
    gnd = {
        "imlist": names,
        "qimlist": ["query0"],
        "gnd": [{"bbx": [0.0, 0.0, 64.0, 64.0], "easy": [0], "hard": [3], "junk": [1]}],
    }
    (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd))
    figures = tmp_path / "figures.json"
    code, stdout, _ = _run(
        ["evaluate", "--dataset", str(tmp_path / "roxford5k" / "gnd_roxford5k.pkl")]
        + ["--model", FAKE_MODEL, "--json", str(figures), "--quiet", "--qe", "1", "--dba", "1"],
        capsys,
    )
    assert code == 0, stdout
    result = json.loads(figures.read_text())
    assert set(result) == {"easy", "medium", "hard"}
    assert result["medium"]["mAP"] == pytest.approx(1.0)  # the crop finds its group first
    assert "medium" in stdout


def test_command_errors_are_one_line(tmp_path, fake, capsys):
    _make_groups(tmp_path / "imgs", num_groups=2, per_group=2, distractors=0)
    code, _, err = _run(
        ["index", "build", "--model", FAKE_MODEL, "--images", str(tmp_path / "nope"), "--out", "x"],
        capsys,
    )
    assert code == 2 and "--images" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(
        ["search", "--index", str(tmp_path / "none"), "--model", FAKE_MODEL, "q.png"], capsys
    )
    assert code == 2 and "--index" in err and "does not exist" in err
    out = tmp_path / "index"
    build = ["index", "build", "--model", FAKE_MODEL, "--images", str(tmp_path / "imgs")]
    assert _run([*build, "--out", str(out), "--quiet", "--kind", "exact"], capsys)[0] == 0
    raw = bytearray((out / "ids.json").read_bytes())
    raw[3] ^= 0x20
    (out / "ids.json").write_bytes(bytes(raw))
    image = str(tmp_path / "imgs" / "group0" / "img0.png")
    code, _, err = _run(["search", "--index", str(out), "--model", FAKE_MODEL, image], capsys)
    assert code == 2 and "ids.json does not match its SHA-256 checksum" in err
    code, _, err = _run(
        ["evaluate", "--dataset", str(tmp_path / "missing.pkl"), "--model", FAKE_MODEL], capsys
    )
    assert code == 2 and "missing.pkl" in err
    code, _, err = _run(
        ["index", "build", "--model", FAKE_MODEL, "--images", str(tmp_path / "imgs")]
        + ["--out", str(tmp_path / "i2"), "--scann-mode", "tree_ah", "--reorder", "0"],
        capsys,
    )
    assert code == 2 and "reorder" in err


def test_real_make_embedder_rejects_a_bad_model_path(tmp_path, capsys):
    _make_groups(tmp_path / "imgs", num_groups=1, per_group=2, distractors=0)
    code, _, err = _run(
        ["index", "build", "--model", str(tmp_path / "no-model"), "--images"]
        + [str(tmp_path / "imgs"), "--out", str(tmp_path / "index")],
        capsys,
    )
    assert code == 2 and "no-model" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def test_report_frames_relevance_and_is_portable(tmp_path):
    from remap_tf.serving.report import write_report

    groups = _make_groups(tmp_path / "imgs", num_groups=2, per_group=2, distractors=0)
    a, b = groups["group0"], groups["group1"]
    path = write_report(
        tmp_path / "r" / "report.html",
        queries=[a[0], b[0]],
        results=[[a[1], b[1]], [b[1], a[1]]],
        relevance=[[True, False], [True, None]],
        ap=[1.0, float("nan")],
        title="<two> queries",
        extra_sections_html="<p id=extra>extra</p>",
        query_boxes=[(0, 0, 32, 32), None],
    )
    page = path.read_text()
    assert page.count('class="rel"') == 2 and page.count('class="irr"') == 1
    assert page.count('class="unk"') == 1 and "&lt;two&gt; queries" in page
    assert "mAP 1.0000 over the 1 with an AP" in page and "<p id=extra>" in page
    assert str(tmp_path) not in "".join(re.findall(r'src="([^"]+)"', page))
    with Image.open(path.parent / "report_files" / "report.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    assert (pixels == (34, 160, 60)).all(axis=-1).any()  # a green frame
    assert (pixels == (210, 40, 40)).all(axis=-1).any()  # a red frame
    with pytest.raises(ValueError, match="result lists"):
        write_report(tmp_path / "x.html", queries=[a[0]], results=[])


# ---------------------------------------------------------------------------------------
# End to end with a real exported model
# ---------------------------------------------------------------------------------------


def test_end_to_end_with_an_exported_model(tmp_path, capsys):
    """A tiny random-init REMAP exported as a SavedModel, through make_embedder."""
    from remap_tf.export.saved_model import export_model
    from remap_tf.model import REMAP

    groups = _make_groups(tmp_path / "imgs", num_groups=2, per_group=2, distractors=1)
    model = REMAP(
        "mobilenet_v2",
        pooling="mac",
        input_shape=(None, None, 3),
        backbone_kwargs={"alpha": 0.35},
    )
    version = export_model(model, tmp_path / "models" / "remap", image_size=64)
    out = tmp_path / "index"
    code, stdout, err = _run(
        ["index", "build", "--model", str(version.parent), "--images", str(tmp_path / "imgs")]
        + ["--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert "indexed 5 images" in stdout
    query = str(groups["group1"][0])
    code, stdout, err = _run(
        ["search", "--index", str(out), "--model", str(version.parent), query, "--k", "2"]
        + ["--json", str(tmp_path / "hits.json")],
        capsys,
    )
    assert code == 0, err
    hits = json.loads((tmp_path / "hits.json").read_text())[0]["results"]
    assert hits[0]["id"] == "group1/img0.png"  # an image is its own nearest neighbour
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)

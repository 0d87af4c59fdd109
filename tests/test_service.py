"""``remap serve`` as its users meet it: started with the real command in a subprocess on a
free loopback port (``--port 0``; it prints the URL), over a ScaNN index built with a tiny
random-initialised REMAP export from scikit-image's photographs, from the project root of a
temporary site with relative paths.

Covered: every endpoint, batching (concurrent queries give what one-by-one queries give),
every bad input of issue 11, the API key, a dead TF Serving, durability (kill -9 after
acknowledged changes, a torn log tail, restart, compaction), and the page in a real browser
(Playwright driving Debian's Chromium).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from remap_cli import main as cli
from remap_cli.demo.photoset import PHOTOS
from remap_tf.serving.index import ExactIndex, changelog, load_index
from tests import gif_bombs
from tests.browser import ARGS as CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-7d1f"
SCENES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon"]
MORE = ["hubble_deep_field", "immunohistochemistry", "retina"]  # ids with a folder: more/...


def _photo(name: str, long_side: int) -> Image.Image:
    image = Image.fromarray(PHOTOS[name]()[0]).convert("RGB")
    image.thumbnail((long_side, long_side))
    return image


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG claiming ``width x height`` pixels (a decompression bomb)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("REMAP_API_KEY", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """``python -m remap_cli serve --port 0 ...`` in ``cwd``; its output goes to a file."""

    count = 0

    def __init__(self, cwd: Path, *args: str, env=None):
        Service.count += 1
        self.cwd = cwd
        self.log_path = cwd / f"serve-{Service.count}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop/kill9
        command = [sys.executable, "-m", "remap_cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env=env or _env()
        )
        self.url = self._wait_for_url()
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def output(self) -> str:
        return self.log_path.read_text()

    def _wait_for_url(self, timeout=120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.output().splitlines():
                if line.startswith("remap serve: http://"):
                    return line.split()[2].rstrip("/")
            if self.proc.poll() is not None:
                raise AssertionError(f"remap serve exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"remap serve printed no URL:\n{self.output()}")

    def wait(self, path="/readyz", timeout=120) -> httpx.Response:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                response = self.http.get(path)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{path} never answered 200:\n{self.output()}")

    def stop(self) -> int:
        self.http.close()
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        self._log.close()
        return code

    def kill9(self) -> None:
        self.http.close()
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny REMAP export, a photo collection and its ScaNN index, in one folder."""
    from remap_tf.export.saved_model import export_model
    from remap_tf.model import REMAP

    root = tmp_path_factory.mktemp("site")
    model = REMAP("mobilenet_v2", backbone_kwargs={"alpha": 0.35})
    export_model(model, root / "models" / "remap", image_size=64)
    for name in SCENES:
        (root / "photos").mkdir(exist_ok=True)
        _photo(name, 160).save(root / "photos" / f"{name}.jpg", quality=90)
    for name in MORE:
        (root / "photos" / "more").mkdir(exist_ok=True)
        _photo(name, 160).save(root / "photos" / "more" / f"{name}.jpg", quality=90)
    cwd = os.getcwd()
    os.chdir(root)  # relative paths, as a user types them
    try:
        code = cli.main(
            ["index", "build", "--model", "models/remap", "--images", "photos"]
            + ["--out", "photos.index", "--quiet"]
        )
    finally:
        os.chdir(cwd)
    assert code == 0
    return root


def _copy_index(site: Path, name: str) -> str:
    shutil.copytree(site / "photos.index", site / name)
    return name


@pytest.fixture(scope="module")
def service(site):
    serve = Service(
        site,
        "--index", "photos.index", "--api-key", API_KEY, "--batch-window-ms", "150",
        "--max-body-mb", "8", "--max-k", "50", "--image-root", "photos",
    )  # fmt: skip
    serve.wait()
    yield serve
    assert serve.stop() == 0
    assert "Traceback" not in serve.output()


def _query(name: str) -> bytes:
    """Another rendition of a collection photo: smaller, PNG instead of JPEG."""
    return _encoded(_photo(name, 120), "PNG")


def _search(http: httpx.Client, image: bytes, **params) -> dict:
    response = http.post("/v1/search", content=image, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_readiness_metrics_and_the_page(service):
    assert service.http.get("/healthz").json() == {"status": "ok"}
    ready = service.http.get("/readyz").json()
    assert ready["ready"] is True and ready["index_size"] == len(SCENES) + len(MORE)
    assert ready["model"].endswith("models/remap")  # the model the index recorded
    _search(service.http, _query("coffee"), k=2)
    metrics = service.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert f"remap_index_size {len(SCENES) + len(MORE)}.0" in text
    assert "remap_ready 1.0" in text
    assert 'remap_requests_total{method="POST",route="/v1/search",status="200"}' in text
    for stage in ("queue", "embed", "search"):
        assert f'remap_stage_seconds_count{{stage="{stage}"}}' in text
    page = service.http.get("/")
    assert page.status_code == 200 and "<title>remap search</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert service.http.get("/static/app.js").status_code == 200
    output = service.output()
    assert "POST /v1/images and DELETE /v1/images/{id} require the API key" in output
    assert "GET /v1/images/{id} serves files from photos only" in output


def test_search_by_form_and_by_raw_body(service, site):
    photo = (site / "photos" / "chelsea.jpg").read_bytes()
    response = service.http.post("/v1/search", files={"image": ("q.jpg", photo)}, data={"k": "3"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [hit["id"] for hit in answer["results"]][:1] == ["chelsea.jpg"]
    assert len(answer["results"]) == 3 and answer["k"] == 3 and answer["qe"] == 0
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    timing = answer["timing_ms"]
    assert timing["embed"] > 0 and timing["search"] > 0 and timing["total"] >= timing["embed"]
    assert service.http.get(answer["results"][0]["url"]).content == photo
    raw = _search(service.http, _query("hubble_deep_field"), k=2)
    assert raw["results"][0]["id"] == "more/hubble_deep_field.jpg"
    assert raw["results"][0]["url"] == "/v1/images/more/hubble_deep_field.jpg"
    expanded = _search(service.http, _query("rocket"), k=4, qe=2)
    assert expanded["qe"] == 2 and expanded["results"][0]["id"] == "rocket.jpg"
    assert expanded["timing_ms"]["qe"] > 0


def test_concurrent_queries_are_batched_and_answer_as_one_by_one(service):
    names = SCENES + MORE[:1]
    queries = [_query(name) for name in names]
    alone = [_search(service.http, q, k=5) for q in queries]
    assert all(a["batch_size"] == 1 for a in alone)
    together, barrier = [None] * len(queries), threading.Barrier(len(queries))

    def ask(i):
        with httpx.Client(base_url=service.url, timeout=60) as http:
            barrier.wait()
            together[i] = _search(http, queries[i], k=5)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(t["batch_size"] for t in together) > 1  # embedded in shared model calls
    for one, batched in zip(alone, together, strict=True):
        assert [h["id"] for h in batched["results"]] == [h["id"] for h in one["results"]]
        np.testing.assert_allclose(
            [h["score"] for h in batched["results"]],
            [h["score"] for h in one["results"]],
            atol=1e-5,
        )


def test_add_get_delete_and_the_api_key(service, site):
    new = _encoded(_photo("page", 160), "PNG")
    form = {"data": {"id": "added/page.png"}, "files": {"image": ("page.png", new)}}
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    refused = service.http.post("/v1/images", **form)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"
    wrong = service.http.post("/v1/images", headers={"Authorization": "Bearer nope"}, **form)
    assert wrong.status_code == 401 and "does not match" in wrong.json()["detail"]
    added = service.http.post("/v1/images", headers=bearer, **form)
    assert added.status_code == 201, added.text
    assert added.json() == {
        "id": "added/page.png",
        "url": "/v1/images/added/page.png",
        "index_size": len(SCENES) + len(MORE) + 1,
    }
    assert (site / "photos" / "added" / "page.png").read_bytes() == new  # under the root
    assert service.http.get("/v1/images/added/page.png").content == new
    assert _search(service.http, new, k=1)["results"][0]["id"] == "added/page.png"
    again = service.http.post("/v1/images", headers=bearer, **form)
    assert again.status_code == 409 and again.json()["error"] == "duplicate id"
    assert service.http.delete("/v1/images/added/page.png").status_code == 401
    deleted = service.http.delete("/v1/images/added/page.png", headers=bearer)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    ids = [h["id"] for h in _search(service.http, new, k=50)["results"]]
    assert "added/page.png" not in ids and len(ids) == len(SCENES) + len(MORE)
    gone = service.http.delete("/v1/images/added/page.png", headers=bearer)
    assert gone.status_code == 404 and gone.json()["error"] == "unknown id"
    assert service.http.get("/v1/images/added/page.png").status_code == 404


def _chunks(total: int):
    yield b"\xff\xd8\xff"
    for _ in range(total // (1 << 20)):
        yield b"\0" * (1 << 20)


def test_bad_input_gets_a_json_error_and_the_service_keeps_serving(service, site):
    photo = (site / "photos" / "coffee.jpg").read_bytes()
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    form = {"files": {"image": ("c.jpg", photo)}, "headers": bearer}
    post, get, delete = service.http.post, service.http.get, service.http.delete
    cases = {
        "not an image": (lambda: post("/v1/search", content=b"%PDF-1.4 hello"), 400),
        "truncated image": (lambda: post("/v1/search", content=photo[: len(photo) // 2]), 400),
        "pixel bomb": (lambda: post("/v1/search", content=_png_header(100_000, 100_000)), 400),
        "empty body": (lambda: post("/v1/search", content=b""), 400),
        "50 MB body": (lambda: post("/v1/search", content=b"\xff\xd8\xff" + bytes(50 << 20)), 413),
        "10 MB body (limit 8)": (lambda: post("/v1/search", content=bytes(10 << 20)), 413),
        "10 MB streamed": (lambda: post("/v1/search", content=_chunks(10 << 20)), 413),
        "form without image": (
            lambda: post("/v1/search", data={"k": "2"}, files={"file": ("a.txt", b"hi")}),
            400,
        ),
        "k = 0": (lambda: post("/v1/search", content=photo, params={"k": 0}), 400),
        "k = abc": (lambda: post("/v1/search", content=photo, params={"k": "abc"}), 400),
        "k over --max-k": (lambda: post("/v1/search", content=photo, params={"k": 51}), 400),
        "qe = -1": (lambda: post("/v1/search", content=photo, params={"qe": -1}), 400),
        "unknown id (get)": (lambda: get("/v1/images/no/such.jpg"), 404),
        "unknown id (delete)": (lambda: delete("/v1/images/no/such.jpg", headers=bearer), 404),
        "duplicate id": (lambda: post("/v1/images", data={"id": "coffee.jpg"}, **form), 409),
        "id leaving the root": (lambda: post("/v1/images", data={"id": "../x.jpg"}, **form), 400),
        "path outside the root": (lambda: get("/v1/images/%2e%2e/serve-1.log"), 404),
        "unknown route": (lambda: get("/v2/nothing"), 404),
    }
    errors = {}
    for name, (call, status) in cases.items():
        response = call()
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert set(body) == {"error", "detail"}, (name, body)
        assert "Traceback" not in response.text and "\n" not in body["detail"], name
        errors[name] = body
    assert errors["not an image"]["error"] == "not an image"
    assert errors["truncated image"]["error"] == "bad image"
    assert "100000x100000" in errors["pixel bomb"]["detail"]
    assert errors["pixel bomb"]["error"] == "too many pixels"
    assert errors["50 MB body"]["error"] == "body too large"
    assert "8388608 bytes" in errors["10 MB streamed"]["detail"]
    assert "got '51'" in errors["k over --max-k"]["detail"]
    assert service.http.get("/healthz").status_code == 200  # still serving
    assert _search(service.http, photo, k=1)["results"][0]["id"] == "coffee.jpg"


def test_a_dead_tf_serving_gives_503_and_the_service_keeps_serving(site):
    port = _free_port()  # nothing listens there
    index = _copy_index(site, "dead.index")
    serve = Service(site, "--index", index, "--model", f"127.0.0.1:{port}/remap")
    try:
        serve.wait("/healthz")
        deadline = time.time() + 60
        while time.time() < deadline:  # until the first warm-up attempt has failed
            ready = serve.http.get("/readyz")
            if f"127.0.0.1:{port}" in ready.json()["detail"]:
                break
            time.sleep(0.2)
        assert ready.status_code == 503 and "unreachable" in ready.json()["detail"]
        response = serve.http.post(
            "/v1/search", content=(site / "photos" / "moon.jpg").read_bytes()
        )
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["error"] == "model unavailable" and "unreachable" in body["detail"]
        assert response.headers["retry-after"] == "5"
        assert serve.http.post("/v1/search", content=b"junk").status_code == 400
        assert serve.http.get("/healthz").status_code == 200
    finally:
        assert serve.stop() == 0
    output = serve.output()
    assert "Traceback" not in output
    assert "DELETE /v1/images/{id} are open to every local user: no API key" in output
    assert "no --image-root: GET /v1/images/{id} serves no files" in output


def test_acknowledged_changes_survive_kill_9_and_a_torn_log_tail_is_dropped(site):
    index = _copy_index(site, "durable.index")
    env = _env(REMAP_API_KEY="env-key")  # the key from the environment
    bearer = {"Authorization": "Bearer env-key"}
    images = {f"dur/{i}.png": _encoded(_photo(name, 150), "PNG") for i, name in enumerate(MORE)}
    args = ("--index", index, "--compact-after", "6", "--batch-window-ms", "1")
    args += ("--image-root", "photos")
    first = Service(site, *args, env=env)
    first.wait()
    for item, data in images.items():
        response = first.http.post(
            "/v1/images", data={"id": item}, files={"image": ("x.png", data)}, headers=bearer
        )
        assert response.status_code == 201, response.text
    for item in ("coins.jpg", "more/retina.jpg"):
        assert first.http.delete(f"/v1/images/{item}", headers=bearer).status_code == 200
    first.kill9()  # right after the last acknowledgement

    log = site / f"{index}.wal"
    good = log.read_bytes()
    torn = changelog.encode_change(changelog.Change(99, "add", "dur/torn.png", np.ones(1312)))
    log.write_bytes(good + torn[: len(torn) // 3])  # a record cut short by the crash
    second = Service(site, *args, env=env)
    try:
        second.wait()
        output = second.output()
        assert "dropped a torn last record" in output and "5 logged change(s) replayed" in output
        assert log.read_bytes() == good
        for item, data in images.items():
            assert second.http.get(f"/v1/images/{item}").content == data
            assert _search(second.http, data, k=1)["results"][0]["id"] == item
        for item in ("coins.jpg", "more/retina.jpg", "dur/torn.png"):
            assert second.http.get(f"/v1/images/{item}").status_code == 404
        assert (
            subprocess.run(
                [sys.executable, "-m", "remap_cli", "index", "compact", "--index", index],
                cwd=site,
                env=_env(),
                capture_output=True,
                text=True,
            ).returncode
            == 2
        )  # fmt: skip - the service holds the log
        # The sixth change crosses --compact-after: the snapshot is rewritten in the background.
        assert second.http.delete("/v1/images/rocket.jpg", headers=bearer).status_code == 200
        deadline = time.time() + 60
        while changelog.scan_log(log).changes and time.time() < deadline:
            time.sleep(0.2)
        snapshot = load_index(site / index)
        assert "dur/0.png" in snapshot and "rocket.jpg" not in snapshot
        assert snapshot.metadata[changelog.SEQ_KEY] == 6
    finally:
        assert second.stop() == 0
    assert changelog.pending_changes(site / index, load_index(site / index)) == 0


def _remap_in(site: Path, *argv: str) -> int:
    cwd = os.getcwd()
    os.chdir(site)  # relative paths, as a user types them
    try:
        return cli.main(list(argv))
    finally:
        os.chdir(cwd)


def test_a_rebuild_after_kill_9_keeps_every_acknowledged_change(site):
    """Issue 21.3: ``remap index build`` over an index whose service had acknowledged
    changes (and was killed -9 before compacting) succeeded, then search and serve refused the
    log; moved away, the delete was undone. The rebuild folds the log in: a fresh service
    and ``load_current`` have the addition and not the deleted image."""
    root = site / "rb-photos"
    root.mkdir()
    for name in SCENES:
        shutil.copy(site / "photos" / f"{name}.jpg", root)
    build = ["index", "build", "--model", "models/remap", "--images", "rb-photos"]
    assert _remap_in(site, *build, "--out", "rb.index", "--quiet") == 0
    new = _encoded(_photo("page", 150), "PNG")
    args = ("--index", "rb.index", "--image-root", "rb-photos", "--batch-window-ms", "1")
    first = Service(site, *args)
    first.wait()
    refused = first.http.post("/v1/images", data={"id": "x.txt"}, files={"image": ("x", new)})
    assert refused.status_code == 400 and refused.json()["error"] == "bad id"
    added = first.http.post("/v1/images", data={"id": "new/page.png"}, files={"image": ("x", new)})
    assert added.status_code == 201, added.text
    assert first.http.delete("/v1/images/coffee.jpg").status_code == 200
    first.kill9()  # right after the acknowledgements, nothing compacted

    rebuild = [*build, "--out", "rb.index", "--embeddings", "rb-second.embeddings", "--quiet"]
    assert _remap_in(site, *rebuild) == 0
    expected = {f"{name}.jpg" for name in SCENES} - {"coffee.jpg"} | {"new/page.png"}
    assert set(load_index(site / "rb.index").ids) == expected
    assert set(changelog.load_current(site / "rb.index").ids) == expected
    assert changelog.scan_log(site / "rb.index.wal").changes == []
    second = Service(site, *args)
    try:
        second.wait()
        assert "0 logged change(s) replayed" in second.output()
        assert _search(second.http, new, k=1)["results"][0]["id"] == "new/page.png"
        assert second.http.get("/v1/images/coffee.jpg").status_code == 404
        assert len(_search(second.http, new, k=50)["results"]) == len(expected)
    finally:
        assert second.stop() == 0


def test_the_page_in_a_real_browser(chromium, service, site, tmp_path):
    """Chromium uploads a photo, waits for the grid, checks the first result is the same
    scene, clicks a result to search by it, and saves a screenshot that is not blank."""
    from playwright.sync_api import expect, sync_playwright

    query = tmp_path / "my photo.png"
    query.write_bytes(_query("astronaut"))
    shot = tmp_path / "page.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(service.url + "/")
            page.wait_for_selector("body[data-state=idle]")
            page.set_input_files("#file", str(query))
            page.wait_for_selector("#results .hit")
            hits = page.locator("#results .hit")
            assert hits.count() == 10 and hits.first.get_attribute("data-id") == "astronaut.jpg"
            assert page.locator("#query-name").inner_text() == "my photo.png"
            assert "ms" in page.locator("#timing").inner_text()
            # The page's Content-Security-Policy forbids eval, so waits use selectors only.
            target = hits.nth(2).get_attribute("data-id")
            hits.nth(2).click()
            expect(page.locator("#query-name")).to_have_text(target)
            page.wait_for_selector("body[data-state=idle]")
            assert page.locator("#results .hit").first.get_attribute("data-id") == target
            page.wait_for_load_state("networkidle")  # the grid's images have arrived
            page.screenshot(path=str(shot), full_page=True)
            bad = tmp_path / "notes.png"
            bad.write_bytes(b"not really a picture")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error:not([hidden])")
            assert "not an image the service can read" in page.locator("#error").inner_text()
        finally:
            browser.close()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] >= 600 and pixels.shape[1] == 1100
    assert pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 500  # photographs drawn


def test_serve_refuses_bad_setups_with_one_line(site, tmp_path, capsys):
    code = cli.main(["serve", "--index", str(tmp_path / "missing.index")])
    assert code == 2 and "no index directory" in capsys.readouterr().err
    # Issue 21 leftover: a missing or non-folder --image-root was accepted.
    (tmp_path / "a-file").write_text("x")
    for root, said in (("nope", "does not exist"), (str(tmp_path / "a-file"), "not a folder")):
        code = cli.main(["serve", "--index", str(site / "photos.index"), "--image-root", root])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--image-root" in err and said in err, err
    from remap_tf.serving.index import ExactIndex

    bare = ExactIndex(4)
    bare.add(["a"], np.ones((1, 4), np.float32))
    bare.save(tmp_path / "bare.index")
    code = cli.main(["serve", "--index", str(tmp_path / "bare.index"), "--port", "0"])
    assert code == 2 and "--model is required" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code = cli.main(["serve", "--index", str(site / "photos.index"), "--port", port])
    assert code == 2 and "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_the_example_compose_file_runs_valid_commands():
    """docs/deploy/docker-compose.yml (never run here: no Docker) parses, and its remap
    command is accepted by remap's own parser."""
    compose = yaml.safe_load((ROOT / "docs" / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "tensorflow/serving" in services["tfserving"]["image"]
    search = services["search"]
    assert search["depends_on"] == ["tfserving"]
    args = cli.build_parser().parse_args(search["command"])
    assert args.command == "serve" and args.model == "tfserving:8500/remap"
    assert args.host == "0.0.0.0" and search["ports"] == ["127.0.0.1:8080:8080"]
    assert args.index == "/search/photos.index" and args.image_root == "/search/photos"
    assert "REMAP_API_KEY" in search["environment"]
    dockerfile = (ROOT / search["build"]["dockerfile"]).read_text()
    assert 'ENTRYPOINT ["remap"]' in dockerfile
    for folder in ("remap_tf", "training", "export", "serving", "remap_cli"):
        assert f"COPY {folder} {folder}" in dockerfile  # every installed folder


def test_a_gif_bomb_gets_4xx_from_the_service_and_one_line_from_remap_search(
    service, site, monkeypatch, capsys
):
    """Issue 21: a 35 KB GIF with an 8x8 screen and one 7200x7200 frame (155 MB decoded)
    passed the pixel check, which read the screen size, and was decoded by /v1/search and
    `remap search`. Every frame counts now: 51.8 million pixels is over the 50 million limit."""
    bomb = gif_bombs.bomb(7200, 7200)
    response = service.http.post("/v1/search", content=bomb)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "too many pixels" and "7200x7200" in body["detail"]
    form = service.http.post("/v1/search", files={"image": ("b.gif", bomb)})
    assert form.status_code == 400 and form.json()["error"] == "too many pixels"
    monkeypatch.chdir(site)
    (site / "bomb.gif").write_bytes(bomb)
    code = cli.main(["search", "--index", "photos.index", "bomb.gif"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'bomb.gif'" in err and "pixel limit" in err and "7200x7200" in err
    assert _search(service.http, _query("moon"), k=1)["results"][0]["id"] == "moon.jpg"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--api-key", ""], {}, "--api-key is empty"),
        (["--api-key", "  "], {}, "--api-key is blank"),
        ([], {"REMAP_API_KEY": ""}, "$REMAP_API_KEY is empty"),
        ([], {"REMAP_API_KEY": " \t"}, "$REMAP_API_KEY is blank"),
        (["--port", "99999"], {}, "port must be an integer from 0 to 65535, got 99999"),
        (["--port", "65536"], {}, "port must be an integer from 0 to 65535, got 65536"),
    ],
)
def test_serve_refuses_an_empty_api_key_and_a_port_out_of_range(
    tmp_path, monkeypatch, capsys, argv, env, message
):
    """Issue 21: ``--api-key ""`` (the docs' ``--api-key "$KEY"`` with KEY unset) turned
    authentication off in silence, and ``--port 99999`` listened on port 99999 - 65536. Both
    are one line and exit 2 before the service starts (the index is not even opened: a
    missing one would say so)."""
    monkeypatch.delenv("REMAP_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["serve", "--index", str(tmp_path / "missing.index"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("remap serve: error:") and message in err, err
    assert "no index directory" not in err


class _OnesEmbedder:
    """A stand-in model: every image embeds to the same unit vector."""

    def __init__(self, dim: int):
        self.dim = dim

    def embed(self, images):
        return np.full((len(images), self.dim), 1 / np.sqrt(self.dim), np.float32)


LONG_PART = "x" * 300 + ".png"  # over the 255-byte file name limit


def _in_process(index_dir: Path, embedder=None, **settings):
    """The app over ``index_dir`` in this process (no model, no port): a TestClient."""
    with warnings.catch_warnings():  # starlette would rather have httpx2; httpx is installed
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

    from remap_tf.serving.service.app import create_app
    from remap_tf.serving.service.settings import ServiceSettings
    from remap_tf.serving.service.state import SearchService

    store = changelog.DurableIndex.open(index_dir)
    embedder = embedder or _OnesEmbedder(store.dim)
    service = SearchService(store, embedder, ServiceSettings(**settings))
    return TestClient(create_app(service), raise_server_exceptions=False), service


@pytest.fixture()
def received_index(tmp_path):
    """A received index: its metadata names '/' as the image root, and its ids include
    'etc/passwd' (saved by the library, so every checksum is right), a symbolic link inside
    the operator's root that leads out, and an id with a 300-byte part."""
    index = ExactIndex(4)
    ids = ["etc/passwd", "photo.png", "escape.png", f"long/{LONG_PART}"]
    index.add(ids, np.eye(4, dtype=np.float32))
    index.metadata = {"image_root": "/", "model": "models/remap"}
    index.save(tmp_path / "received.index")
    root = tmp_path / "photos"
    root.mkdir()
    (root / "photo.png").write_bytes(_encoded(_photo("coins", 64), "PNG"))
    (root / "escape.png").symlink_to("/etc/passwd")
    return tmp_path


def test_a_received_index_cannot_publish_files_outside_the_operators_root(received_index):
    """Issue 21: ``image_root: "/"`` in a received index's metadata and 'etc/passwd' in its
    ids made ``GET /v1/images/etc/passwd`` return the file, without a key. Files are served
    from ``--image-root`` only, and a path that resolves outside it is refused."""
    assert Path("/etc/passwd").is_file()
    client, _ = _in_process(received_index / "received.index")
    with client:
        response = client.get("/v1/images/etc/passwd")
        assert response.status_code == 404 and response.json()["error"] == "no image root"
        assert "--image-root" in response.json()["detail"]
    root = str(received_index / "photos")
    client, _ = _in_process(received_index / "received.index", image_root=root)
    with client:
        photo = client.get("/v1/images/photo.png")
        assert photo.status_code == 200
        assert photo.content == (received_index / "photos" / "photo.png").read_bytes()
        passwd = client.get("/v1/images/etc/passwd")  # <root>/etc/passwd: no such file
        assert passwd.status_code == 404 and passwd.json()["error"] == "file missing"
        escape = client.get("/v1/images/escape.png")  # a symbolic link to /etc/passwd
        assert escape.status_code == 403 and escape.json()["error"] == "outside root"
        long = client.get(f"/v1/images/long/{LONG_PART}")  # a file name no disk stores
        assert long.status_code == 404 and long.json()["error"] == "file missing"


def test_an_id_with_a_300_byte_part_gets_400(received_index):
    """Issue 21: a new id with a path component over 255 bytes got 500 (the file system
    refuses the name, ENAMETOOLONG); it is a bad id."""
    client, service = _in_process(
        received_index / "received.index", image_root=str(received_index / "photos")
    )
    image = _encoded(_photo("coins", 64), "PNG")
    with client:
        response = client.post(
            "/v1/images", data={"id": f"new/{LONG_PART}"}, files={"image": ("a.png", image)}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "bad id" and "255 bytes" in response.json()["detail"]
        assert len(service.store) == 4
        ok = client.post("/v1/images", data={"id": "new/ok.png"}, files={"image": ("a.png", image)})
        assert ok.status_code == 201, ok.text


def _failing_once(real, code: int, partial: bool):
    """``os.pwrite`` that writes part of its data (when ``partial``) and fails once."""
    calls = []

    def write(fd, data, offset):
        if calls:
            return real(fd, data, offset)
        calls.append(offset)
        if partial:
            real(fd, data[: len(data) // 2], offset)
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (errno.ENOSPC, 507, "insufficient storage"),
        (errno.EDQUOT, 507, "insufficient storage"),
        (errno.EFBIG, 507, "insufficient storage"),
        (errno.EIO, 503, "log unwritable"),
    ],
)
def test_a_change_log_write_on_a_full_disk_gets_507_and_stops_changes(
    received_index, monkeypatch, code, status, error
):
    """Issue 21: a change-log write on a full disk answered 500. It is 507 (503 for other
    write errors) with the reason; the change is not applied, searches go on. When the
    partial record the failed write left cannot be cut off either, later changes get 503
    (a restart drops it); when it can (the leftover of issue 21's hardening), they go on."""
    client, service = _in_process(received_index / "received.index")
    log = changelog.log_path(received_index / "received.index")
    before = log.read_bytes()
    monkeypatch.setattr(os, "pwrite", _failing_once(os.pwrite, code, partial=True))
    monkeypatch.setattr(os, "ftruncate", _failing_once_ftruncate(os.ftruncate))
    image = _encoded(_photo("coins", 64), "PNG")
    with client:
        response = client.post("/v1/images", data={"id": "a.png"}, files={"image": ("a", image)})
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"] == error and os.strerror(code) in body["detail"]
        assert "'a.png' was not added" in body["detail"]
        assert "a.png" not in service.store and len(service.store) == 4
        later = client.delete("/v1/images/photo.png")
        assert later.status_code == 503 and later.json()["error"] == "writes disabled"
        assert "photo.png" in service.store
        found = client.post("/v1/search", content=image)
        assert found.status_code == 200 and len(found.json()["results"]) == 4
    assert len(log.read_bytes()) > len(before)  # the partial record a restart drops


def _failing_once_ftruncate(real):
    calls = []

    def truncate(fd, length):
        if calls:
            return real(fd, length)
        calls.append(length)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    return truncate


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_after_a_failed_log_write_is_cut_back_changes_go_on(received_index, monkeypatch, code):
    """Issue 21 leftover: a failed change-log write disabled changes until a restart. The
    log cuts the partial record back (fsync'ed), so once there is room again the next change
    is taken, and a restart replays exactly the acknowledged ones."""
    directory = received_index / "received.index"
    client, service = _in_process(directory)
    log = changelog.log_path(directory)
    before = log.read_bytes()
    monkeypatch.setattr(os, "pwrite", _failing_once(os.pwrite, code, partial=True))
    image = _encoded(_photo("coins", 64), "PNG")
    with client:
        refused = client.post("/v1/images", data={"id": "a.png"}, files={"image": ("a", image)})
        assert refused.status_code in (503, 507), refused.text
        assert "free space, then retry" in refused.json()["detail"]
        assert log.read_bytes() == before  # nothing of the failed record is left
        added = client.post("/v1/images", data={"id": "b.png"}, files={"image": ("b", image)})
        assert added.status_code == 201, added.text
        deleted = client.delete("/v1/images/photo.png")
        assert deleted.status_code == 200, deleted.text
    assert [(c.op, c.id) for c in changelog.scan_log(log).changes] == [
        ("add", "b.png"),
        ("delete", "photo.png"),
    ]
    assert sorted(changelog.load_current(directory).ids) == sorted(
        ["etc/passwd", "escape.png", f"long/{LONG_PART}", "b.png"]
    )


def test_ids_a_rebuild_would_drop_get_400(received_index):
    """Issue 21.3: the service took ids such as 'x.txt', 'noext' and '.hidden.jpg', which a
    rebuild of the index from its folder skips, so the acknowledged images were lost. It
    refuses them with the collection's own rule (`collection.id_problem`)."""
    client, service = _in_process(
        received_index / "received.index", image_root=str(received_index / "photos")
    )
    image = _encoded(_photo("coins", 64), "PNG")
    reasons = {
        "x.txt": "image extension",
        "noext": "image extension",
        ".hidden.jpg": "hidden file",
        "dir/.hidden/a.jpg": "hidden file",
        "a//b.jpg": "empty",
        "/abs.jpg": "relative path",
        "a/../b.jpg": "'..'",
        "a/" * 600 + "b.jpg": "at most 1024 characters",
    }
    with client:
        for item, reason in reasons.items():
            response = client.post("/v1/images", data={"id": item}, files={"image": ("a", image)})
            assert response.status_code == 400, (item, response.text)
            body = response.json()
            assert body["error"] == "bad id" and reason in body["detail"], (item, body)
            assert "\n" not in body["detail"]
        assert len(service.store) == 4
        ok = client.post("/v1/images", data={"id": "dir/x.JPG"}, files={"image": ("a", image)})
        assert ok.status_code == 201, ok.text


class _LaterVersion(_OnesEmbedder):
    """TF Serving serving version 2 of a model whose descriptors differ from version 1's."""

    def identity(self):
        return 2, [0.25] * 32

    def describe(self):
        return "localhost:8500/remap"


def test_a_service_refuses_a_model_version_the_index_was_not_built_with(tmp_path):
    """Issue 21.9: TF Serving now serving a later export gave the index's queries another
    model's descriptors. The warm-up compares the model's fingerprint with the one the index
    recorded: /readyz says why, requests get 503; an index without one serves as before."""
    from remap_tf.serving.search import MODEL, MODEL_PROBE, MODEL_VERSION

    index = ExactIndex(4)
    index.add(["a.png", "b.png"], np.eye(4, dtype=np.float32)[:2])
    index.metadata = {MODEL: "localhost:8500/remap", MODEL_VERSION: 1, MODEL_PROBE: [0.5] * 32}
    index.save(tmp_path / "built.index")
    image = _encoded(_photo("coins", 64), "PNG")
    client, _ = _in_process(tmp_path / "built.index", embedder=_LaterVersion(4))
    expected = (
        "the index was built with localhost:8500/remap version 1; localhost:8500/remap now "
        "serves version 2, whose descriptors differ: rebuild the index or serve version 1 again"
    )
    with client:
        deadline = time.time() + 30
        while "version 2" not in client.get("/readyz").json().get("detail", ""):
            assert time.time() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["detail"] == expected
        refused = client.post("/v1/search", content=image)
        assert refused.status_code == 503 and refused.json()["error"] == "model unusable"
    del index.metadata[MODEL_PROBE]  # an index from before the fingerprint
    index.save(tmp_path / "old.index")
    client, _ = _in_process(tmp_path / "old.index", embedder=_LaterVersion(4))
    with client:
        deadline = time.time() + 30
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        assert client.post("/v1/search", content=image).status_code == 200

"""The embedders: RemapClient over gRPC against a stand-in TF Serving, LocalEmbedder in process,
make_embedder; errors name the address, the model or the image."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from remap_tf.errors import RemapError
from remap_tf.serving.client import (
    ImageRejectedError,
    LocalEmbedder,
    ModelNotFoundError,
    RemapClient,
    ServerUnavailableError,
    ServingError,
    make_embedder,
)
from remap_tf.serving.standin import FakeTFServing
from tests.test_export import encode, sample_images, shared_export, smooth_image

MODEL_NAME = "remap"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The base folder of tests/test_export.py's shared export: TF Serving and LocalEmbedder
    use its highest version, 2 (multi-scale, 150x150 pixel limit)."""
    return shared_export(tmp_path_factory)[1][0]


@pytest.fixture(scope="module")
def server(base_dir):
    with FakeTFServing(base_dir, MODEL_NAME) as fake:
        yield fake


@pytest.fixture(scope="module")
def local(base_dir):
    return LocalEmbedder(base_dir, chunk_size=4)


@pytest.fixture()
def client(server):
    server.predictions.delay_s = 0.0
    with RemapClient(server.target, MODEL_NAME, chunk_size=3, timeout=20.0) as c:
        yield c


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Seven inputs: bytes of four formats, and paths."""
    folder = tmp_path_factory.mktemp("images")
    encoded = sample_images()
    paths = []
    for i, data in enumerate(encoded[:3]):
        path = folder / f"photo_{i}.img"
        path.write_bytes(data)
        paths.append(path)
    return [paths[0], encoded[1], str(paths[2]), *encoded[3:], encoded[0]]


def test_grpc_descriptors_equal_in_process_ones(client, local, images):
    over_grpc = client.embed(images)  # chunks of 3: 3 requests
    in_process = local.embed(images)  # chunks of 4
    assert over_grpc.shape == (len(images), local.dim) and over_grpc.dtype == np.float32
    np.testing.assert_allclose(over_grpc, in_process, atol=1e-5)
    np.testing.assert_allclose(over_grpc[0], over_grpc[-1], atol=1e-5)  # same image, path/bytes
    assert np.abs(over_grpc[0] - over_grpc[1]).max() > 1e-3  # different images differ


def test_embed_pixels_over_grpc_with_mixed_sizes(server, local, base_dir):
    pixels = [smooth_image(80, 120, 1), smooth_image(80, 120, 2), smooth_image(100, 70, 3)]
    with RemapClient(server.target, MODEL_NAME, signature="embed_pixels") as c:
        over_grpc = c.embed(pixels)  # two requests: one per image size
    by_bytes = local.embed([encode(p, "PNG") for p in pixels])  # lossless: same pixels
    np.testing.assert_allclose(over_grpc, by_bytes, atol=1e-5)
    # make_embedder on a version folder: a LocalEmbedder over embed_pixels, one array in.
    in_process = make_embedder(str(base_dir / "2"), signature="embed_pixels", chunk_size=1)
    assert isinstance(in_process, LocalEmbedder) and in_process.chunk_size == 1
    np.testing.assert_allclose(in_process.embed(np.stack(pixels[:2])), over_grpc[:2], atol=1e-5)


def test_metadata_names_signatures_and_descriptor_size(client, local):
    remote = client.metadata()
    assert remote["model"] == MODEL_NAME and remote["version"] == 2
    assert remote["descriptor_dim"] == local.dim == client.dim
    assert sorted(remote["signatures"]) == ["embed_pixels", "serving_default"]
    assert remote["signatures"]["serving_default"]["inputs"] == {
        "images": {"dtype": "string", "shape": [None]}
    }
    assert remote["signatures"]["embed_pixels"]["outputs"] == {
        "descriptors": {"dtype": "float32", "shape": [None, local.dim]}
    }
    assert remote["signatures"] == local.metadata()["signatures"]


def test_stand_in_model_service_reports_the_served_version(server):
    request = get_model_status_pb2.GetModelStatusRequest(
        model_spec=model_pb2.ModelSpec(name=MODEL_NAME)
    )
    with grpc.insecure_channel(server.target) as channel:
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=20
        )
    (version,) = status.model_version_status
    assert version.version == 2
    assert version.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_empty_input_gives_zero_rows(client, local):
    assert client.embed([]).shape == (0, local.dim)
    assert local.embed([]).shape == (0, local.dim)


def test_bad_bytes_come_back_as_invalid_argument_with_the_message(server, images):
    """The raw gRPC status, as a non-Python client would see it."""
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=MODEL_NAME))
    request.inputs["images"].CopyFrom(
        tf.make_tensor_proto(np.array([images[1], b"GIF89a-but-not-really"], dtype=object))
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=20)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "remap input check failed" in error.value.details()


@pytest.mark.parametrize("embedder", ["client", "local"])
def test_a_rejected_image_is_named_by_its_index(request, server, embedder, images):
    embed = request.getfixturevalue(embedder)
    calls = server.predictions.calls
    batch = [*images[:4], b"not an image at all", images[5]]
    with pytest.raises(ImageRejectedError) as error:
        embed.embed(batch)
    assert error.value.index == 4
    assert "Image 4 (19 bytes)" in str(error.value)
    assert "not an image" in error.value.reason and "images[4]" in error.value.reason
    if embedder == "client":  # chunk 1 OK, chunk 2 rejected once: no retry, no fallback
        assert server.predictions.calls - calls == 2

    truncated = sample_images()[0][:80]  # a PNG header, then nothing: the decoder fails
    with pytest.raises(ImageRejectedError) as error:
        embed.embed([images[0], images[1], truncated, images[3]])
    assert error.value.index == 2  # found by retrying the chunk one image at a time
    assert "PNG" in error.value.reason


def test_unknown_model_names_the_model_and_address(server):
    with (
        RemapClient(server.target, "no_such_model", retries=0) as c,
        pytest.raises(ModelNotFoundError) as error,
    ):
        c.embed([b"x"])
    assert "'no_such_model'" in str(error.value) and server.target in str(error.value)
    with (
        RemapClient(server.target, MODEL_NAME, signature="nope") as c,
        pytest.raises(ModelNotFoundError, match="nope"),
    ):
        c.embed([sample_images()[0]])


def test_a_stopped_server_gives_a_clear_error_within_the_deadline(server, base_dir, images):
    fake = FakeTFServing(base_dir, MODEL_NAME, servable=server.servable).start()
    target = fake.target
    with RemapClient(target, MODEL_NAME, timeout=2.0, retries=3, backoff=0.1) as c:
        assert c.metadata()["model"] == MODEL_NAME  # reachable (a cheap call: no model run)
        fake.stop()
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError) as error:
            c.embed(images[:1])
        elapsed = time.monotonic() - start
    assert target in str(error.value) and "4 attempts" in str(error.value)
    # Three back-offs (0.1 + 0.2 + 0.4 s) were waited, and no more than the four deadlines.
    assert 0.7 <= elapsed < 4 * 2.0 + 0.7


def test_deadline_exceeded_is_retried_then_reported(server, images):
    server.predictions.delay_s = 1.0
    calls = server.predictions.calls
    with RemapClient(server.target, MODEL_NAME, timeout=0.2, retries=1, backoff=0.05) as c:
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=r"did not answer within 0.2 s"):
            c.embed(images[:1])
        elapsed = time.monotonic() - start
    server.predictions.delay_s = 0.0
    # Two deadlines and one back-off were waited (0.2 + 0.05 + 0.2 s): the call was retried
    # once, then reported. (The server may not have received the retry under heavy load.)
    assert 0.45 <= elapsed < 3.0
    assert 1 <= server.predictions.calls - calls <= 2


def test_an_unreachable_address_is_named():
    with (
        socket_port() as port,
        RemapClient(f"127.0.0.1:{port}", MODEL_NAME, timeout=1.0, retries=1, backoff=0.01) as c,
        pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port} is unreachable"),
    ):
        c.metadata()


class socket_port:
    """A free local port, reserved (bound, not listening) while in use."""

    def __enter__(self):
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        return self._socket.getsockname()[1]

    def __exit__(self, *exc):
        self._socket.close()


def test_make_embedder_picks_the_implementation(server, base_dir, local):
    # (make_embedder on a path is exercised in test_embed_pixels_over_grpc_with_mixed_sizes.)
    assert local.path == base_dir / "2"  # a base folder resolves to its highest version
    remote = make_embedder(f"{server.target}/{MODEL_NAME}", timeout=5.0)
    assert isinstance(remote, RemapClient) and remote.model_name == MODEL_NAME
    assert remote.dim == local.dim
    assert make_embedder(server.target).model_name == "remap"
    with pytest.raises(FileNotFoundError, match="neither an existing SavedModel folder"):
        make_embedder("no/such/folder")


def test_bad_input_to_embed(local, tmp_path):
    with pytest.raises(FileNotFoundError, match="Image 1 .*missing.jpg"):
        local.embed([sample_images()[0], tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="embed_pixels"):
        local.embed([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(FileNotFoundError, match="run `remap export` first"):
        LocalEmbedder(tmp_path)
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        LocalEmbedder(local.path, signature="nope")


def test_serving_errors_print_as_one_line():
    assert issubclass(ServingError, RemapError)
    assert issubclass(ImageRejectedError, ValueError)


def _one_line_error(capsys, argv) -> str:
    from remap_cli import main as cli

    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_an_index_refuses_a_later_export_whose_descriptors_differ(
    base_dir, server, tmp_path, monkeypatch, capsys
):
    """Issue 21.9: a later `remap export` into the same base silently changed the model an
    index embeds queries with (it recorded the base folder, not the version). The index
    records the version and a fingerprint (the descriptor of a fixed probe image); search,
    add and serve refuse another model in one line; a re-export of the same weights (and an
    index from before the fingerprint) still works. Version 2 of the shared export is the
    same weights, multi-scale: other descriptors."""
    import shutil

    from remap_cli import main as cli
    from remap_tf.errors import InvalidInputError
    from remap_tf.serving.index import load_index
    from remap_tf.serving.search import MODEL_PROBE, MODEL_VERSION, check_embedder
    from tests.test_export import encode, smooth_image

    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    base = tmp_path / "models" / "remap"
    base.mkdir(parents=True)
    shutil.copytree(base_dir / "1", base / "1")
    Path("photos").mkdir()
    for i in range(5):
        Path(f"photos/img{i}.png").write_bytes(encode(smooth_image(80, 100, 20 + i), "PNG"))
    new = Path("photos/img4.png")
    new.rename("later.png")  # added after the build
    build = ["index", "build", "--model", "models/remap", "--images", "photos"]
    assert cli.main([*build, "--out", "photos.index", "--kind", "exact", "--quiet"]) == 0
    index = load_index("photos.index")
    assert index.metadata[MODEL_VERSION] == 1 and len(index.metadata[MODEL_PROBE]) == 32

    shutil.copytree(base_dir / "2", base / "2")  # a later export into the same base
    base = base.resolve()
    expected = (
        f"the index was built with {base} version 1; {base} now serves version 2, whose "
        f"descriptors differ: rebuild the index or pass --model {base}/1"
    )
    search = ["search", "--index", "photos.index", "photos/img0.png", "--k", "1"]
    assert expected in _one_line_error(capsys, search)
    Path("later.png").rename(new)
    add = ["index", "add", "--index", "photos.index", str(new)]
    assert expected in _one_line_error(capsys, add)
    serve = ["serve", "--index", "photos.index", "--port", "0"]
    assert expected in _one_line_error(capsys, serve)  # in process: refused at start
    assert cli.main([*search, "--model", "models/remap/1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "img0.png"
    with pytest.raises(InvalidInputError, match="now serves version 2, whose descriptors"):
        check_embedder(index, RemapClient(server.target, MODEL_NAME))  # TF Serving: v2

    shutil.copytree(base / "1", base / "3")  # a re-export of the same weights and options
    assert cli.main(search) == 0 and cli.main(add) == 0, capsys.readouterr().err
    assert "added 1 image(s)" in capsys.readouterr().out

    for key in (MODEL_PROBE, MODEL_VERSION):  # an index from before the fingerprint
        del index.metadata[key]
    check_embedder(index, LocalEmbedder(base / "2"))  # its size fits: accepted as before

"""``remap serve``: a long-running search service over an index, with a web page.

- `settings`: `ServiceSettings`, every knob of the service, validated once;
- `batcher`: `EmbedBatcher`, which embeds queries arriving together in one model call;
- `metrics`: the Prometheus metrics (requests, errors, per-stage latency, index size);
- `state`: `SearchService`, the index (a `remap_tf.serving.index.changelog.DurableIndex`: logged,
  replayed, compacted), the embedder, readiness and the search / add / delete operations;
- `app`: `create_app`, the FastAPI application (HTTP API, JSON errors, the page);
- `server`: `serve`, the one function behind ``remap serve`` (uvicorn on 127.0.0.1);
- ``static/``: the page (plain HTML, CSS and JavaScript, shipped as package data).

Nothing here imports TensorFlow until a model is loaded (`server.serve` does).
"""

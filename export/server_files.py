"""The files a stock TF Serving needs, written beside the versions in the model's base dir.

Layout after ``remap export --out models/remap`` (the base dir is self-contained: mount it
into the container and nothing else is needed)::

    models/remap/
      1/ 2/ ...                    SavedModel versions (TF Serving serves the highest)
      models.config                model_config_list naming this model
      batching_parameters.txt      server-side batching (see the comment inside)
      docker-compose.yml           runs tensorflow/serving on this folder (gRPC 8500, REST 8501)

TF Serving only loads integer-named sub-folders as versions, so these files do not disturb
it. They are written when absent and never overwritten (a user's edits are kept).
Nothing here was run on this project's machines: they have no TF Serving binary and no
Docker daemon (see docs/serving.md).
"""

from __future__ import annotations

from pathlib import Path

from remap_tf.contract import check_model_name
from remap_tf.io import atomic_write_text

MODELS_CONFIG = "models.config"
BATCHING_FILE = "batching_parameters.txt"
COMPOSE_FILE = "docker-compose.yml"
CONTAINER_ROOT = "/models"
GRPC_PORT = 8500
REST_PORT = 8501


def models_config(model_name: str) -> str:
    """``model_config_list`` text proto for ``--model_config_file``."""
    return f"""# TF Serving model config (text proto), read with --model_config_file.
# base_path is the folder as mounted in the container (see docker-compose.yml).
model_config_list {{
  config {{
    name: "{model_name}"
    base_path: "{CONTAINER_ROOT}/{model_name}"
    model_platform: "tensorflow"
    # Serve only the highest version (TF Serving's default); use
    # `model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}` to pin versions.
    model_version_policy {{ latest {{ num_versions: 1 }} }}
  }}
}}
"""


BATCHING_PARAMETERS = """# Server-side batching (text proto), used with
#   --enable_batching=true --batching_parameters_file=<this file>
#
# How variable image sizes interact with batching:
# - serving_default takes `images`, a string tensor (batch,) of encoded JPEG/PNG/GIF/BMP.
#   Strings of any length concatenate, so requests carrying images of different sizes batch
#   together; every image is decoded, resized and embedded on its own inside the graph, so a
#   descriptor does not depend on what else ended up in the batch.
# - embed_pixels takes uint8 (batch, height, width, 3). Requests whose images differ in height
#   or width cannot be concatenated and the batch fails, unless
#   `pad_variable_length_inputs: true`, which zero-pads images to the largest size in the
#   batch - and padding changes REMAP descriptors (the region grid then covers black borders).
#   It is therefore left off: send embed_pixels requests of one size (or resize client-side
#   to a fixed size), or use serving_default.
# - A request larger than max_batch_size is rejected; keep the client's chunk size
#   (RemapClient(chunk_size=16)) at or below it.
max_batch_size { value: 32 }
# How long the first request of a batch may wait for others (latency cost at low load).
batch_timeout_micros { value: 5000 }
max_enqueued_batches { value: 64 }
# About the number of CPU cores the server may use for inference.
num_batch_threads { value: 4 }
pad_variable_length_inputs: false
"""


def compose_file(model_name: str) -> str:
    """``docker-compose.yml`` running ``tensorflow/serving`` on the base dir."""
    return f"""# Runs stock TensorFlow Serving on this folder:  docker compose up
# gRPC on {GRPC_PORT} (RemapClient("localhost:{GRPC_PORT}", "{model_name}")), REST on {REST_PORT}.
# Pin the image to a release at least as new as the TensorFlow that exported the model
# (see {model_name}/<version>/assets/remap.json, "tensorflow_version").
# Not run on the machines this was built on (no Docker daemon there): see docs/serving.md.
services:
  {model_name}:
    image: ${{TF_SERVING_IMAGE:-tensorflow/serving:latest}}
    ports:
      - "{GRPC_PORT}:{GRPC_PORT}"
      - "{REST_PORT}:{REST_PORT}"
    volumes:
      - ./:{CONTAINER_ROOT}/{model_name}:ro
    entrypoint: ["tensorflow_model_server"]
    command:
      - --port={GRPC_PORT}
      - --rest_api_port={REST_PORT}
      - --model_config_file={CONTAINER_ROOT}/{model_name}/{MODELS_CONFIG}
      - --enable_batching=true
      - --batching_parameters_file={CONTAINER_ROOT}/{model_name}/{BATCHING_FILE}
      # Look for new versions every 60 s (a new `remap export` is picked up live).
      - --file_system_poll_wait_seconds=60
    restart: unless-stopped
"""


def _write_if_absent(path: Path, text: str) -> bool:
    if path.exists():
        return False
    atomic_write_text(path, text)
    return True


def write_server_files(base_dir, model_name: str) -> list[Path]:
    """Writes models.config, the batching parameters and docker-compose.yml into ``base_dir``.

    Existing files are kept as they are. Returns the paths written now.
    """
    check_model_name(model_name)
    base = Path(base_dir)
    written = []
    for name, text in (
        (MODELS_CONFIG, models_config(model_name)),
        (BATCHING_FILE, BATCHING_PARAMETERS),
        (COMPOSE_FILE, compose_file(model_name)),
    ):
        if _write_if_absent(base / name, text):
            written.append(base / name)
    return written

"""remap-tf: REMAP global image descriptors on TensorFlow/Keras 3, with TF Serving and ScaNN."""

from pathlib import Path

from setuptools import setup

setup(
    name="remap-tf",
    version="0.1.0",
    description=(
        "REMAP (Husain & Bober, TIP 2019) image-retrieval descriptors for Keras 3: "
        "training, TF Serving export and ScaNN search."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    # One import name: the four folders install as remap_tf (the core), remap_tf.training,
    # remap_tf.export and remap_tf.serving; remap_cli is the top layer (the `remap` command
    # and the demo). bench/ and tests/ are not installed. See docs/architecture.md.
    packages=[
        "remap_tf",
        "remap_tf.training",
        "remap_tf.export",
        "remap_tf.serving",
        "remap_tf.serving.index",
        "remap_tf.serving.service",
        "remap_cli",
        "remap_cli.commands",
        "remap_cli.demo",
    ],
    package_data={
        # The bundled ImageNet MobileNet v1 0.75 weights (offline default) and their NOTICE.
        "remap_tf": ["weights/*.weights.h5", "weights/NOTICE"],
        # The search page (plain HTML, CSS and JavaScript, no build step).
        "remap_tf.serving.service": ["static/*.html", "static/*.css", "static/*.js"],
    },
    package_dir={
        "remap_tf.training": "training",
        "remap_tf.export": "export",
        "remap_tf.serving": "serving",
    },
    install_requires=[
        # scann 1.4.2 is built against exactly TF 2.20; TF 2.21 breaks `import scann`.
        "tensorflow==2.20.*",
        "keras>=3.10,<4",
        "scann==1.4.2",
        "tensorflow-serving-api==2.20.*",
        "numpy>=1.26",
        # `import remap_tf` registers the project's Keras objects when Keras is imported
        # (wrapt.when_imported); wrapt is already a dependency of TensorFlow.
        "wrapt>=1.14",
        # Configs are dataclasses overridable from YAML files (issue 3).
        "pyyaml>=6",
        # The demo's embedded data set is the photographs that ship inside scikit-image.
        "scikit-image>=0.22",
        # Image decoding for tf.data fallback paths (CMYK JPEG, 16-bit PNG) and report images.
        "pillow>=10",
        # `remap serve` (issue 11): an ASGI app (FastAPI on Starlette, multipart forms through
        # python-multipart) run by uvicorn, with Prometheus metrics.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
        "prometheus-client>=0.20",
        # `remap embed` and the sharded index build run on Apache Beam (issue 13): locally on
        # its in-process FnApiRunner, or on Dataflow / Flink / Spark. A core dependency, not
        # an extra, because `remap embed` is a core command. 2.77 resolves with TF 2.20 (it
        # takes protobuf < 7 and pillow < 13; `pip check` clean).
        "apache-beam>=2.77,<3",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            # The service tests talk HTTP through httpx and drive Debian's Chromium through
            # Playwright (`.ci/run` installs /usr/bin/chromium; `playwright install` is not used).
            "httpx>=0.27",
            "playwright>=1.40",
        ],
        # Benchmark-only: competitors for the ANN comparison (never imported by the package),
        # httpx for the search-service load test, psutil for the memory figures of
        # bench/scale.py. `make bench` installs them.
        "bench": ["faiss-cpu", "hnswlib", "httpx>=0.27", "psutil"],
    },
    entry_points={"console_scripts": ["remap=remap_cli.main:main"]},
)

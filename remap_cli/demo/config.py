"""The demo's configuration (`DemoConfig`) and result (`DemoResult`).

See `remap_cli.demo.pipeline` for what the demo does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from remap_tf.checks import check_choice, check_int, check_number
from remap_tf.errors import BadPathError, InvalidInputError
from remap_tf.specs import get_spec

DEFAULT_OUT = "demo_out"
DEFAULT_BACKBONE = "mobilenet"
# Width multiplier used for the MobileNets unless --alpha says otherwise: 0.75 is the
# MobileNet v1 whose ImageNet weights ship with remap-tf (the offline default).
DEFAULT_ALPHA = {"mobilenet": 0.75, "mobilenet_v2": 0.35}
# REMAP's region grid: 4 scales on a 24x32 reference map, the paper's 40 regions.
LEVELS, GRID_SHAPE = 4, (24, 32)


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """One row of the demo's table: a pooling, how it is prepared, whether it is trained."""

    key: str
    label: str
    pooling: str
    init: str = "none"  # "none", "kl" (KL region weights) or "kl+lw" (+ learned whitening)
    fine_tune: bool = False


# The table of issue 10: off-the-shelf poolings, REMAP's initialisations, then R-MAC, GeM
# and REMAP fine-tuned with the same budget. The last row is exported, indexed and reported.
MODELS = (
    DemoModel("spoc", "SPoC", "spoc"),
    DemoModel("mac", "MAC", "mac"),
    DemoModel("gem", "GeM", "gem"),
    DemoModel("rmac", "R-MAC", "rmac"),
    DemoModel("remap_kl", "REMAP, KL weights", "remap", "kl"),
    DemoModel("remap_kl_lw", "REMAP, KL + learned whitening", "remap", "kl+lw"),
    DemoModel("rmac_ft", "R-MAC, fine-tuned", "rmac", fine_tune=True),
    DemoModel("gem_ft", "GeM, fine-tuned", "gem", fine_tune=True),
    DemoModel("remap_ft", "REMAP, KL + learned whitening, fine-tuned", "remap", "kl+lw", True),
)
MODEL_KEYS = tuple(model.key for model in MODELS)
REPORTED = "remap_ft"


@dataclasses.dataclass
class DemoConfig:
    """Everything `run_demo` needs; the CLI flags map onto these fields.

    Attributes:
        out_dir: the folder everything is written to.
        seed: fixes the photo set, the training batches and the initial head; TensorFlow's
            op determinism is turned on, so one seed gives one table.
        minutes: training time limit per fine-tuned model, a cap that keeps the demo under
            10 minutes on a slow or busy machine (normally ``steps`` ends training first).
        steps: training steps of each fine-tuned model (the same budget for each).
        backbone: a `remap_tf.specs.BACKBONES` name.
        alpha: width multiplier for the MobileNets (None: `DEFAULT_ALPHA`).
        weights: backbone weights: ``"imagenet"`` (the default: bundled for MobileNet v1
            0.75, no download), None (random init) or a weights file.
        serving: ``host:port`` of a TF Serving gRPC endpoint serving ``out_dir/models/remap``
            (the demo waits for it to load the version it exported); None embeds in-process.
        image_size: long side of the views, px (4:3). 384 px gives stride-32 maps of 12x9
            cells, where all 40 regions of the grid differ (they do from 9 cells on, 288 px;
            at 96 px the old demo's 3x3 maps had 15 distinct regions).
        views_per_photo: views of each photo (each test group: 1 query crop + the rest).
        distractors_per_photo: views of each training photo added to the test database.
        test_fraction: fraction of the photos held out for test (never trained on).
        query_scale: a query is a crop of this share of the photo's side (``(0.3, 0.4)``:
            9-16% of the area), a database view of 60-100%. With ImageNet features, crops
            of 20-42% made the task too easy (off-the-shelf SPoC 0.997 mAP, measured).
        queries_per_photo: query crops of each test photo.
        photos: names from `remap_cli.demo.photoset.PHOTOS` (None: all 18).
        models: keys of `MODELS` to run, in table order; must include ``"remap_ft"``.
        classes_per_batch, images_per_class: the P×K batch.
        learning_rate: Adam's learning rate (cosine decay over ``steps``).
        margin: triplet margin.
        mining: online mining of `remap_tf.losses.TripletLoss`.
        top_k: results per query shown in the report.
    """

    out_dir: str = DEFAULT_OUT
    seed: int = 0
    minutes: float = 2.0
    steps: int = 60
    backbone: str = DEFAULT_BACKBONE
    alpha: float | None = None
    weights: str | None = "imagenet"
    serving: str | None = None
    image_size: int = 384
    views_per_photo: int = 8
    distractors_per_photo: int = 6
    test_fraction: float = 0.35
    query_scale: tuple[float, float] = (0.3, 0.4)
    queries_per_photo: int = 4
    photos: list[str] | None = None
    models: tuple[str, ...] = MODEL_KEYS
    classes_per_batch: int = 6
    images_per_class: int = 3
    learning_rate: float = 1e-5
    margin: float = 0.1
    mining: str = "batch_hard"
    top_k: int = 8

    def validate(self) -> DemoConfig:
        """Checks every field once; ValueError naming the field and the value received."""
        get_spec(self.backbone)
        check_number("--minutes", self.minutes, minimum=0, open_minimum=True)
        for name, minimum in (
            ("steps", 1),
            ("seed", 0),
            ("image_size", 64),
            ("views_per_photo", 3),
            ("queries_per_photo", 1),
            ("distractors_per_photo", 0),
            ("classes_per_batch", 2),
            ("images_per_class", 2),
            ("top_k", 1),
        ):
            check_int("--" + name.replace("_", "-"), getattr(self, name), minimum=minimum)
        if self.images_per_class > self.views_per_photo:
            raise InvalidInputError(
                f"images_per_class ({self.images_per_class}) cannot exceed --views-per-photo "
                f"({self.views_per_photo})."
            )
        check_number("--alpha", self.alpha, minimum=0, open_minimum=True, allow_none=True)
        if self.weights not in (None, "imagenet") and not os.path.isfile(self.weights):
            raise BadPathError(
                f"--weights {self.weights!r} is neither 'imagenet' nor an existing weights file."
            )
        for key in self.models:
            check_choice("demo model", key, MODEL_KEYS)
        if REPORTED not in self.models:
            raise InvalidInputError(f"models must include {REPORTED!r}, received {self.models!r}.")
        low, high = self.query_scale
        if not 0 < low <= high <= 1:
            raise InvalidInputError(
                f"query_scale must be 0 < low <= high <= 1, got {self.query_scale}"
            )
        if self.serving is not None and ":" not in self.serving:
            raise InvalidInputError(f"--serving must be host:port, received {self.serving!r}.")
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise InvalidInputError(f"--out {self.out_dir!r} exists and is not a folder.")
        return self

    def selected(self) -> list[DemoModel]:
        """The `MODELS` this run builds, in table order."""
        return [model for model in MODELS if model.key in self.models]

    def view_size(self) -> tuple[int, int]:
        """``(height, width)`` of the views: 4:3 at ``image_size`` long side."""
        return round(self.image_size * 3 / 4), self.image_size

    def backbone_kwargs(self) -> dict:
        alpha = self.alpha if self.alpha is not None else DEFAULT_ALPHA.get(self.backbone)
        return {"alpha": alpha} if alpha is not None else {}


@dataclasses.dataclass
class DemoResult:
    """What `run_demo` produced.

    Attributes:
        table: rows ``{"key", "model", "pooling", "trained", "mAP", "mP@1", "mP@5",
            "steps", "train_seconds", "stopped_by_time_limit"}``, in `MODELS` order.
        paths: name -> path of everything written (data, SavedModel, index, report, ...).
        seconds: wall-clock seconds of the whole run.
        max_export_difference: largest absolute difference between the exported model's
            descriptors and the Keras model's on the test database.
    """

    table: list[dict]
    paths: dict[str, Path]
    seconds: float
    max_export_difference: float | None


def config_json(config: DemoConfig) -> dict:
    """``config`` as JSON-compatible values (for results.json and the export's remap.json)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))

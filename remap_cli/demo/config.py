"""The demo's configuration (`DemoConfig`) and result (`DemoResult`).

See `remap_cli.demo.pipeline` for what the demo does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from remap_tf.errors import BadPathError, InvalidInputError
from remap_tf.specs import POOLINGS, check_choice, get_spec

DEFAULT_OUT = "demo_out"
DEFAULT_BACKBONE = "mobilenet_v2"
# Width multiplier used for the MobileNets unless --alpha says otherwise: 0.35 is the
# smallest MobileNetV2 with ImageNet weights in keras.applications.
DEFAULT_ALPHA = {"mobilenet_v2": 0.35, "mobilenet": 0.25}
TRAINED = ("remap", "rmac", "gem", "mac")
# REMAP's region grid: 4 scales on a 24x32 reference map, the paper's 40 regions.
LEVELS, GRID_SHAPE = 4, (24, 32)


@dataclasses.dataclass
class DemoConfig:
    """Everything `run_demo` needs; the CLI flags map one to one onto these fields.

    Attributes:
        out_dir: the folder everything is written to.
        seed: fixes the photo set, the initial weights and the training batches.
        minutes: training time limit per model, in minutes: a cap that keeps the demo
            under 10 minutes on a slow or busy machine. Training normally stops after
            ``steps`` steps, so that the seed, not the machine's speed, decides the numbers.
        steps: training steps per model.
        backbone: a `remap_tf.backbones.BACKBONES` name.
        alpha: width multiplier for the MobileNets (None: `DEFAULT_ALPHA`).
        weights: backbone weights: None (random init), ``"imagenet"`` or a file.
        serving: ``host:port`` of a TF Serving gRPC endpoint serving ``out_dir/models/remap``
            (the demo waits for it to load the version it exported); None embeds in-process.
        image_size: side of the square views, in pixels.
        views_per_photo: views of each photo (each test group: 1 query + the rest).
        distractors_per_photo: views of each training photo added to the test database.
        test_fraction: fraction of the photos held out for test.
        photos: names from `training.photoset.PHOTOS` (None: all 18).
        poolings: the trained models, REMAP first.
        classes_per_batch, images_per_class: the P×K batch.
        learning_rate: Adam's peak learning rate (cosine decay over ``steps``).
        margin: triplet margin.
        mining: online mining of `remap_tf.losses.TripletLoss`. Measured on the default
            set (REMAP, 200 steps, seed 0, untrained test mAP 0.469): batch-hard at 1e-3
            gave 0.725, semi-hard at 1e-3 0.690; at 1e-4 batch-hard 0.571, semi-hard 0.601,
            batch-all 0.616. PCA whitening initialised from the training views lowered it
            (0.610): 144 views are too few to estimate a 1376-dimensional whitening.
        top_k: results per query shown in the report.
    """

    out_dir: str = DEFAULT_OUT
    seed: int = 0
    minutes: float = 1.5
    steps: int = 200
    backbone: str = DEFAULT_BACKBONE
    alpha: float | None = None
    weights: str | None = None
    serving: str | None = None
    image_size: int = 96
    views_per_photo: int = 12
    distractors_per_photo: int = 2
    test_fraction: float = 0.35
    photos: list[str] | None = None
    poolings: tuple[str, ...] = TRAINED
    classes_per_batch: int = 6
    images_per_class: int = 4
    learning_rate: float = 1e-3
    margin: float = 0.1
    mining: str = "batch_hard"
    top_k: int = 8

    def validate(self) -> DemoConfig:
        """Checks every field once; ValueError naming the field and the value received."""
        get_spec(self.backbone)
        if not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise InvalidInputError(f"--minutes must be a number > 0, received {self.minutes!r}.")
        for name, minimum in (
            ("steps", 1),
            ("seed", 0),
            ("image_size", 64),
            ("views_per_photo", 3),
            ("distractors_per_photo", 0),
            ("classes_per_batch", 2),
            ("images_per_class", 2),
            ("top_k", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                flag = "--" + name.replace("_", "-")
                raise InvalidInputError(
                    f"{flag} must be an integer >= {minimum}, received {value!r}."
                )
        if self.images_per_class > self.views_per_photo:
            raise InvalidInputError(
                f"images_per_class ({self.images_per_class}) cannot exceed --views-per-photo "
                f"({self.views_per_photo})."
            )
        if self.alpha is not None and not self.alpha > 0:
            raise InvalidInputError(f"--alpha must be > 0, received {self.alpha!r}.")
        if self.weights not in (None, "imagenet") and not os.path.isfile(self.weights):
            raise BadPathError(
                f"--weights {self.weights!r} is neither 'imagenet' nor an existing weights file."
            )
        if not self.poolings or self.poolings[0] != "remap":
            raise InvalidInputError(
                f"poolings must start with 'remap', received {self.poolings!r}."
            )
        for pooling in self.poolings:
            check_choice("pooling", pooling, POOLINGS)
        if self.serving is not None and ":" not in self.serving:
            raise InvalidInputError(f"--serving must be host:port, received {self.serving!r}.")
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise InvalidInputError(f"--out {self.out_dir!r} exists and is not a folder.")
        return self

    def backbone_kwargs(self) -> dict:
        alpha = self.alpha if self.alpha is not None else DEFAULT_ALPHA.get(self.backbone)
        return {"alpha": alpha} if alpha is not None else {}


@dataclasses.dataclass
class DemoResult:
    """What `run_demo` produced.

    Attributes:
        table: rows ``{"model", "pooling", "trained", "mAP", "mP@1", "mP@5", "steps",
            "train_seconds", "stopped_by_time_limit"}``, untrained first.
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

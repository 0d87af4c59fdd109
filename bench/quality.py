"""Retrieval quality on real multi-view photos of scenes never seen in training.

    python -m bench.quality --data ../shared/data/multiview [--long-side 512]
                            [--steps 200] [--train-long-side 384] [--write]
    python -m bench.quality --backbone resnet50 --weights FILE
                            --data ../shared/data/multiview ../shared/data/holidays
                            ../shared/data/ukbench [--write]

The data (``multiview/``: real photos of 38 scenes, ``splits.json`` with 27 train and 11 val
scenes, 129 distractors; not part of the project) is an argument. Everything that learns (KL
region weights, learned whitening, fine-tuning) sees the train scenes only. Evaluation: the
database is every val image plus the distractors; each val image is a query, once whole and
once as a seeded random crop of 25% of its area, against the database (its own image is junk,
the other images of its scene are the positives); mAP and mP@10, images resized to
``--long-side`` keeping aspect (the exported graph's rule). Every model is ImageNet
MobileNet v1 (alpha 0.75, the bundled weights) with the default taps (conv_pw_12 and
conv_pw_13, BatchNorm output through a plain ReLU); tap variants are rows of their own.

Rows: off-the-shelf SPoC, MAC, GeM, R-MAC, REMAP (KL weights), REMAP (KL weights + learned
whitening); the tap variants; then R-MAC, GeM and REMAP (KL + learned whitening) fine-tuned
with ``model.fit`` and a triplet loss for the same number of steps (GeM and REMAP also with
cirtorch's contrastive loss, margin ``--contrastive-margin``). Issue 18's levers are
rows of their own: regional GeM (GeM inside each region, a learned exponent per tap),
whitening chosen by held-out mAP (`remap_tf.whitening.select_whitening`) and multi-scale
descriptors (scales 1, 1/sqrt(2), sqrt(2), summed and re-normalised). Writes the "quality"
section of docs/benchmarks.md with ``--write``.

``--backbone resnet50`` / ``efficientnetb0`` take ``--weights FILE`` (built by
``../shared/tools/weights/build.sh``; the bundled MobileNet needs none). Several ``--data``
folders (each with ``groundtruth.json`` and ``splits.json``): everything that learns sees the
union of their train splits; each val split is scored on its own (a group's ``queries``, where
it lists them, are its only queries: the Holidays protocol; UKBench also gets the N-S score,
the mean number of the query's 4 group images in its top 4, itself included), and the table
gives their mean.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from bench.report import machine_line, write_section
from remap_tf import REMAP, evaluation, init_region_weights, init_whitening
from remap_tf.io import atomic_write_text
from remap_tf.losses import make_loss
from remap_tf.model import multiscale_descriptors
from remap_tf.ops import resize_images
from remap_tf.specs import LOSSES
from remap_tf.training.config import TrainConfig
from remap_tf.training.data import load_manifest
from remap_tf.training.fit import fit_model, make_learning_rate
from remap_tf.training.mining import OfflineHardNegativeMining
from remap_tf.training.pipeline import make_train_dataset

BACKBONE = {"backbone": "mobilenet", "weights": "imagenet", "backbone_kwargs": {"alpha": 0.75}}
# --backbone -> REMAP arguments; those without weights here take --weights FILE.
BACKBONES = {
    "mobilenet": BACKBONE,
    "efficientnetb0": {"backbone": "efficientnetb0"},
    "resnet50": {"backbone": "resnet50"},
}
CROP_AREA = 0.25
MULTI_SCALES = (1.0, 2**-0.5, 2**0.5)  # cirtorch's multi-scale evaluation
MULTI_SCALE = ", multi-scale"


@dataclasses.dataclass
class Row:
    """One model: how it is built and prepared, and what it scored."""

    label: str
    pooling: str
    init: str = "none"  # "none", "kl", "kl+lw", "kl+select" (whitening chosen on held-out)
    fine_tune: bool = False
    taps: tuple[str, ...] | None = None
    region_pooling: str = "max"
    scales: tuple[float, ...] = (1.0,)
    # fine-tuning: an online mining of the row's loss, or "offline" (the paper's, on batch_hard)
    mining: str = "batch_hard"
    head_lr: float = 1.0  # fine-tuning: learning rate of the head / that of the backbone
    loss: str = "triplet"  # fine-tuning: "triplet" or "contrastive" (`remap_tf.specs.LOSSES`)
    lr_scale: float = 1.0  # fine-tuning: the learning rate is --learning-rate x this
    scores: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


# Tap variants per backbone (the default taps are `remap_tf.specs`' and every other row's).
TAP_ROWS = {
    "mobilenet": [
        Row("MAC, ReLU6 taps (clipped)", "mac", taps=("conv_pw_12_relu", "conv_pw_13_relu")),
        Row("R-MAC, ReLU6 taps (clipped)", "rmac", taps=("conv_pw_12_relu", "conv_pw_13_relu")),
        Row("R-MAC, taps conv_pw_11 + conv_pw_13", "rmac", taps=("conv_pw_11_bn", "conv_pw_13_bn")),
    ],
    "resnet50": [
        Row("GeM (p=3), last tap only (conv5_block3_out)", "gem", taps=("conv5_block3_out",)),
        Row("REMAP, KL weights, last tap only", "remap", "kl", taps=("conv5_block3_out",)),
    ],
    "efficientnetb0": [
        Row("GeM (p=3), last tap only (top_activation)", "gem", taps=("top_activation",)),
        Row("REMAP, KL weights, last tap only", "remap", "kl", taps=("top_activation",)),
        Row(
            "GeM (p=3), taps block6d_add + top_activation",
            "gem",
            taps=("block6d_add", "top_activation"),
        ),
        Row(
            "REMAP, KL weights, taps block6d_add + top_activation",
            "remap",
            "kl",
            taps=("block6d_add", "top_activation"),
        ),
    ],
}


def rows(fine_tune: bool, backbone: str = "mobilenet") -> list[Row]:
    table = [
        Row("SPoC", "spoc"),
        Row("MAC", "mac"),
        Row("GeM (p=3)", "gem"),
        Row("R-MAC", "rmac"),
        Row("REMAP, KL weights", "remap", "kl"),
        Row("REMAP, KL weights + learned whitening", "remap", "kl+lw"),
        *TAP_ROWS[backbone],
    ]
    table += [  # issue 18's levers
        Row("Regional GeM (R-MAC grid, GeM per region)", "rmac", region_pooling="gem"),
        Row("REMAP, regional GeM, KL weights", "remap", "kl", region_pooling="gem"),
        Row("REMAP, KL weights + selected whitening", "remap", "kl+select"),
        Row("GeM (p=3), multi-scale", "gem", scales=MULTI_SCALES),
        Row("REMAP, KL + learned whitening, multi-scale", "remap", "kl+lw", scales=MULTI_SCALES),
    ]
    if fine_tune:
        table += [
            Row("R-MAC, fine-tuned", "rmac", fine_tune=True),
            Row("GeM, fine-tuned", "gem", fine_tune=True),
            Row("REMAP, KL + learned whitening, fine-tuned", "remap", "kl+lw", fine_tune=True),
            Row(
                "REMAP, regional GeM, KL + selected whitening, fine-tuned",
                "remap",
                "kl+select",
                fine_tune=True,
                region_pooling="gem",
            ),
        ]
        recipe = table[-1]  # issue 18's lever 5, on the regional-GeM REMAP recipe
        table += [
            dataclasses.replace(
                recipe, label=f"{recipe.label}, offline mining", mining="offline", scores={}
            ),
            dataclasses.replace(
                recipe, label=f"{recipe.label}, head LR x10", head_lr=10.0, scores={}
            ),
            dataclasses.replace(  # the initialised head kept as it is: the backbone learns
                table[-2], label=f"{table[-2].label}, head frozen", head_lr=0.0, scores={}
            ),
        ]
        contrastive = {"loss": "contrastive", "mining": LOSSES["contrastive"].mining}
        table += [  # issue 18's lever 5: cirtorch's contrastive loss beside the triplet
            Row("GeM, fine-tuned, contrastive", "gem", fine_tune=True, **contrastive),
            Row(
                "REMAP, KL + learned whitening, fine-tuned, contrastive",
                "remap",
                "kl+lw",
                fine_tune=True,
                **contrastive,
            ),
        ]
        table += [  # cirtorch trained at far lower rates than the triplet rows' 5e-5
            dataclasses.replace(row, label=f"{row.label}, LR /10", lr_scale=0.1, scores={})
            for row in table[-2:]
        ]
        table.append(  # is REMAP's contrastive loss on crops the head's doing or the backbone's?
            dataclasses.replace(
                table[-3], label=f"{table[-3].label}, head frozen", head_lr=0.0, scores={}
            )
        )
        table += [  # the same fine-tuned models (kept with --results), multi-scale
            dataclasses.replace(row, label=row.label + MULTI_SCALE, scales=MULTI_SCALES, scores={})
            for row in table
            if row.fine_tune
            and row.head_lr == 1.0
            and row.mining != "offline"
            and row.pooling != "rmac"
        ]
    return table


# --- data ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """The split, as the benchmark uses it."""

    root: Path
    train: list[tuple[str, str]]  # (path, scene)
    database: list[tuple[str, str]]  # val images and distractors ("" scene)
    queries: list[tuple[str, str]]  # val queries (every val image unless groups list them)
    name: str = ""
    query_rows: list[int] = dataclasses.field(default_factory=list)  # database row per query
    kind: str = ""  # "ukbench": also the N-S score


def load_data(root: Path) -> Data:
    gt = json.loads((root / "groundtruth.json").read_text())
    splits = json.loads((root / "splits.json").read_text())
    groups = {g["name"]: g for g in gt["groups"]}
    train = [(p, name) for name in splits["train"] for p in groups[name]["images"]]
    val = [(p, name) for name in splits["val"] for p in groups[name]["images"]]
    queries = [
        (p, name)
        for name in splits["val"]
        for p in groups[name].get("queries", groups[name]["images"])
    ]
    row = {p: i for i, (p, _) in enumerate(val)}
    kinds = {g.get("kind") for g in gt["groups"]}
    return Data(
        root,
        train,
        val + [(p, "") for p in gt.get("distractors", [])],
        queries,
        name=root.name,
        query_rows=[row[p] for p, _ in queries],
        kind="ukbench" if kinds == {"ukbench"} else "",
    )


def read(root: Path, path: str) -> np.ndarray:
    with Image.open(root / path) as image:
        return np.asarray(image.convert("RGB"))


def crop(pixels: np.ndarray, rng, area: float = CROP_AREA) -> np.ndarray:
    """A random crop of ``area`` of the image, of the image's aspect."""
    h, w = pixels.shape[:2]
    side = np.sqrt(area)
    ch, cw = max(1, int(h * side)), max(1, int(w * side))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return pixels[top : top + ch, left : left + cw]


def prepared(data: Data, long_side: int) -> dict:
    """Resized pixels: database, whole and cropped queries, and 4:3 training views for the
    initialisation (one array)."""
    rng = np.random.default_rng(0)
    database = [resize_images(read(data.root, p)[None], long_side) for p, _ in data.database]
    whole = [database[i] for i in data.query_rows]
    crops = [resize_images(crop(read(data.root, p), rng)[None], long_side) for p, _ in data.queries]
    height = round(long_side * 3 / 4)
    train = np.stack(
        [
            tf.image.resize(_centre_4_3(read(data.root, p)), (height, long_side), antialias=True)
            for p, _ in data.train
        ]
    )
    return {"database": database, "whole": whole, "crops": crops, "train": train}


def union_train(datas: list[Data]) -> list[tuple[Path, str, str]]:
    """(root, path, label) of every training image; labels are ``<folder>/<scene>`` when
    there are several folders, so scenes of different folders never share a class."""
    prefix = len(datas) > 1
    return [
        (data.root, path, f"{data.name}/{scene}" if prefix else scene)
        for data in datas
        for path, scene in data.train
    ]


def training_pixels(datas: list[Data], pixels: list[dict]):
    """The initialisation's (images, labels) over the union of the train splits."""
    images = np.concatenate([p["train"] for p in pixels])
    labels = np.unique([label for _, _, label in union_train(datas)], return_inverse=True)[1]
    return images, labels


def _centre_4_3(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[:2]
    if w * 3 >= h * 4:
        cw = h * 4 // 3
        return pixels[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    ch = w * 3 // 4
    return pixels[(h - ch) // 2 : (h - ch) // 2 + ch]


# --- one model ------------------------------------------------------------------------------


def embed(model, images: list, sizes=None) -> np.ndarray:
    """Descriptors of pre-resized images; with ``sizes`` (long sides), multi-scale
    (`remap_tf.model.multiscale_descriptors`, the exported graph's rule)."""
    if sizes is None:
        function = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    else:
        function = tf.function(
            lambda x: multiscale_descriptors(model, x, sizes), reduce_retracing=True
        )
    return np.concatenate([np.asarray(function(x), np.float32) for x in images])


def score(data: Data, descriptors: dict) -> dict:
    database = descriptors["database"]
    scenes = np.array([scene for _, scene in data.database])
    result = {}
    for kind in ("whole", "crops"):
        rankings = evaluation.rank_database(descriptors[kind], database)
        positives, junk = [], []
        for q, (_, scene) in zip(data.query_rows, data.queries, strict=True):
            positives.append([i for i in np.flatnonzero(scenes == scene) if i != q])
            junk.append([q])
        figures = evaluation.mean_average_precision(rankings, positives, junk, (10,))
        result[kind] = (100 * figures["mAP"], 100 * figures["mP@10"])
        if data.kind == "ukbench":
            result[f"N-S {kind}"] = ns_score(rankings, scenes, [s for _, s in data.queries])
    return result


def ns_score(rankings: np.ndarray, scenes: np.ndarray, query_scenes) -> float:
    """UKBench's N-S score: the mean number of the query's group images (4, itself
    included) among its top 4 (Nistér & Stewénius, CVPR 2006); 4 is perfect."""
    top = scenes[np.asarray(rankings)[:, :4]]
    return float(
        np.mean([np.sum(row == scene) for row, scene in zip(top, query_scenes, strict=True)])
    )


class HeadScaledAdam(keras.optimizers.Adam):
    """Adam whose step on the head's variables (everything outside the backbone: region
    weights, whitening, GeM exponents) is ``multiplier`` times the backbone's."""

    def __init__(self, head, multiplier: float, **kwargs):
        super().__init__(**kwargs)
        self._head_ids = {id(v) for v in head}
        self._multiplier = multiplier
        self._head_indices = set()

    def build(self, variables):
        super().build(variables)
        self._head_indices = {
            self._get_variable_index(v) for v in variables if id(v) in self._head_ids
        }

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._head_indices:
            learning_rate = learning_rate * self._multiplier
        return super().update_step(gradient, variable, learning_rate)


def fine_tune(model, train_csv: Path, args, row: Row) -> float:
    config = TrainConfig.from_dict(
        {
            "epochs": max(1, args.steps // 25),
            "steps_per_epoch": min(25, args.steps),
            "verbose": 0,
            "seed": 0,
            "optimizer": {"learning_rate": args.learning_rate * row.lr_scale, "warmup_steps": 0},
            "loss": {
                "kind": row.loss,
                "margin": args.margin if row.loss == "triplet" else args.contrastive_margin,
                "mining": "batch_hard" if row.mining == "offline" else row.mining,
            },
            "data": {
                "train": str(train_csv),
                "image_size": args.train_long_side,
                "classes_per_batch": args.classes_per_batch,
                "images_per_class": args.images_per_class,
            },
        }
    ).validate()
    manifest = load_manifest(train_csv)
    callbacks = []
    if row.mining == "offline":
        miner = OfflineHardNegativeMining(
            manifest,
            image_size=args.train_long_side,
            tuples_per_batch=args.classes_per_batch,
            num_anchors=config.loss.offline_num_anchors,
            pool_size=config.loss.offline_pool_size,
            num_negatives=config.loss.offline_num_negatives,
            seed=0,
        )
        miner.mine(model)
        dataset, callbacks = miner.dataset(), [miner]
    else:
        dataset = make_train_dataset(
            manifest,
            image_size=args.train_long_side,
            classes_per_batch=args.classes_per_batch,
            images_per_class=args.images_per_class,
            seed=0,
        )
    compile = row.head_lr == 1.0
    if not compile:
        backbone = {id(v) for v in model.get_layer("backbone").trainable_variables}
        head = [v for v in model.trainable_variables if id(v) not in backbone]
        lo = config.loss
        model.compile(
            optimizer=HeadScaledAdam(
                head,
                row.head_lr,
                learning_rate=make_learning_rate(config),
                clipnorm=config.optimizer.clipnorm,
            ),
            loss=make_loss(lo.kind, lo.margin, lo.mining),
        )
    history = fit_model(model, dataset, config, callbacks=callbacks, compile=compile)
    return float(history.history["loss"][-1])


def run_row(
    row: Row, datas: list[Data], pixels: list[dict], training, train_csv: Path, args
) -> Row:
    started = time.monotonic()
    keras.utils.set_random_seed(0)
    saved = _model_file(args, row)
    if saved is not None and saved.exists():  # the same fine-tuned model, at other scales
        model = keras.models.load_model(saved, compile=False)
    else:
        model = _prepared_model(row, training, train_csv, args)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            model.save(saved)
    sizes = None if row.scales == (1.0,) else [round(args.long_side * s) for s in row.scales]
    for data, part in zip(datas, pixels, strict=True):
        descriptors = {k: embed(model, part[k], sizes) for k in ("database", "crops")}
        # A whole query is a database image: the same pixels give the same descriptor.
        descriptors["whole"] = descriptors["database"][data.query_rows]
        row.scores[data.name] = score(data, descriptors)
    _mean_scores(row, datas)
    row.seconds = time.monotonic() - started
    print(
        f"{row.label:<45} whole {row.scores['whole'][0]:6.2f}  crops {row.scores['crops'][0]:6.2f}"
        f"  ({row.seconds:.0f} s)",
        flush=True,
    )
    keras.backend.clear_session()
    return row


def _prepared_model(row: Row, training, train_csv: Path, args):
    """The row's model: built, initialised as the row says, fine-tuned if it says so."""
    backbone = backbone_arguments(args.backbone, args.weights)
    model = REMAP(**backbone, pooling=row.pooling, taps=row.taps, region_pooling=row.region_pooling)
    for layer in model.get_layer("backbone").layers:  # BatchNorm in inference mode
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    images, labels = training
    if row.init.startswith("kl"):
        init_region_weights(model, images, labels, batch_size=8, max_pairs=4000)
    if row.init in ("kl+lw", "kl+select"):
        select = row.init == "kl+select"
        init_whitening(model, images, labels, batch_size=8, shrinkage=0.5, select=select)
        if select:
            choice = model.get_layer("whitening").selection["choice"]
            row.scores["whitening"] = (
                f"{choice['method']}, {choice['dim']} dims, shrinkage {choice['shrinkage']}, "
                f"held-out mAP {choice['heldout_map']:.2f}"
            )
    if row.fine_tune:
        row.scores["final loss"] = fine_tune(model, train_csv, args, row)
    return model


def _model_file(args, row: Row) -> Path | None:
    """Where a fine-tuned row's model is kept beside ``--results`` (its multi-scale row
    evaluates the same model instead of fine-tuning again); None without ``--results``."""
    if args.results is None or not row.fine_tune:
        return None
    base = row.label.removesuffix(MULTI_SCALE)
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    settings = hashlib.sha1(json.dumps(_settings(args), sort_keys=True).encode()).hexdigest()
    return args.results.parent / f"{args.results.stem}.models-{settings[:8]}" / f"{slug}.keras"


def _mean_scores(row: Row, datas: list[Data]) -> None:
    """``row.scores["whole"]`` and ``["crops"]``: the mean (mAP, mP@10) over the val splits."""
    for kind in ("whole", "crops"):
        figures = np.array([row.scores[data.name][kind] for data in datas])
        row.scores[kind] = tuple(float(v) for v in figures.mean(axis=0))


def backbone_arguments(name: str, weights: str | None) -> dict:
    """REMAP's backbone arguments for ``--backbone`` and ``--weights``."""
    arguments = dict(BACKBONES[name])
    if weights is not None:
        arguments["weights"] = weights
    elif "weights" not in arguments:
        raise SystemExit(
            f"--backbone {name} needs --weights FILE (a {name} ImageNet no-top .weights.h5, "
            "built by ../shared/tools/weights/build.sh)"
        )
    return arguments


def write_train_csv(datas: list[Data], folder: Path) -> Path:
    path = folder / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for root, image, label in union_train(datas):
            writer.writerow([str(root.resolve() / image), label])  # the CSV is elsewhere
    return path


# --- report ---------------------------------------------------------------------------------


# (before, after): learned steps that must not lower a row (issue 18: whitening, fine-tuning).
NEVER_LOWER = [
    ("REMAP, KL weights", "REMAP, KL weights + learned whitening"),
    ("REMAP, KL weights", "REMAP, KL weights + selected whitening"),
    ("R-MAC", "R-MAC, fine-tuned"),
    ("GeM (p=3)", "GeM, fine-tuned"),
    ("REMAP, KL weights + learned whitening", "REMAP, KL + learned whitening, fine-tuned"),
    (
        "REMAP, regional GeM, KL weights",
        "REMAP, regional GeM, KL + selected whitening, fine-tuned",
    ),
    ("GeM (p=3)", "GeM, fine-tuned, contrastive"),
    (
        "REMAP, KL weights + learned whitening",
        "REMAP, KL + learned whitening, fine-tuned, contrastive",
    ),
]


def goals(table: list[Row], datas: list[Data], backbone: str) -> list[str]:
    """Issue 18's goals, each checked on this run's figures (mean over the val splits)."""
    crops = {row.label: row.scores["crops"][0] for row in table}
    tuned_remap = [label for label in crops if label.startswith("REMAP") and "fine-tuned" in label]
    off_shelf = [row.label for row in table if not row.fine_tune]
    lines = []
    if tuned_remap and off_shelf:
        remap = max(tuned_remap, key=crops.get)
        best_off, best = max(off_shelf, key=crops.get), max(crops, key=crops.get)
        gap = crops[remap] - crops[best_off]
        if backbone == "mobilenet":
            met = crops[remap] >= crops[best] - 0.5
            lines.append(
                f"MobileNet: fine-tuned REMAP within 0.5 mAP of the best row on cropped queries: "
                f"{remap} {crops[remap]:.2f}, best row {best} {crops[best]:.2f} -> "
                f"**{'met' if met else 'missed'}**."
            )
        else:
            gem = crops.get("GeM, fine-tuned")
            met = best == remap and gap >= 1.0 and (gem is None or crops[remap] >= gem)
            lines.append(
                f"Fine-tuned REMAP is the best row on cropped queries, >= +1 mAP over the best "
                f"off-the-shelf row ({best_off}, {crops[best_off]:.2f}) and not below fine-tuned "
                f"GeM ({'not run' if gem is None else f'{gem:.2f}'}): {remap} {crops[remap]:.2f} "
                f"({gap:+.2f}); best row {best} -> **{'met' if met else 'missed'}**."
            )
    by = {row.label: row for row in table}
    lowered = []
    checked = 0
    for before, after in NEVER_LOWER:
        if before not in by or after not in by:
            continue
        for name in ["mean"] + [data.name for data in datas] * (len(datas) > 1):
            for kind in ("whole", "crops"):
                old = by[before].scores[kind] if name == "mean" else by[before].scores[name][kind]
                new = by[after].scores[kind] if name == "mean" else by[after].scores[name][kind]
                checked += 1
                if new[0] < old[0]:
                    lowered.append(f"{after} vs {before}, {name} {kind}: {new[0] - old[0]:+.2f}")
    if checked:
        lines.append(
            f"Whitening and fine-tuning never lower a row's mAP ({checked} comparisons, mean and "
            f"each split, whole and crops): **{'missed' if lowered else 'met'}**"
            + (": " + "; ".join(lowered) + "." if lowered else ".")
        )
    return lines


def markdown(table: list[Row], datas: list[Data], args, seconds: float, load) -> str:
    command = f"python -m bench.quality --data {' '.join(args.data)}"
    if args.backbone != "mobilenet":
        command += f" --backbone {args.backbone} --weights {Path(args.weights).name}"
    several = len(datas) > 1
    lines = [
        "## Retrieval quality on real multi-view photos"
        + (f" ({args.backbone}, {' + '.join(d.name for d in datas)})" if _custom(args) else ""),
        "",
        f"Command: `{command} --long-side {args.long_side} "
        f"--steps {args.steps} --train-long-side {args.train_long_side}` · {machine_line()} · "
        + (
            f"run row by row with `--results FILE` (resumed after interruptions; {seconds / 60:.0f}"
            " min: the sum of the rows' seconds, each measured while the machine ran other "
            "work too, so compare them with care)."
            if args.results
            else f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end · "
            f"{seconds / 60:.0f} min in all."
        ),
        "",
        f"{_data_text(datas)} Images at "
        f"{args.long_side} px long side, aspect kept. {_backbone_text(args)} KL weights and "
        "learned whitening (shrinkage 0.5) from the training "
        f"scenes; fine-tuning: {args.steps} steps of {args.classes_per_batch} x "
        f"{args.images_per_class} images at {args.train_long_side} px long side (aspect-kept "
        f"random crops of 25-100%), Adam {args.learning_rate:g}, triplet margin "
        f"{_margin(args, 'triplet'):g}, batch-hard mining, BatchNorm frozen."
        + (
            f" Rows marked contrastive: cirtorch's contrastive loss, margin "
            f"{_margin(args, 'contrastive'):g} (Euclidean distances), "
            f"{LOSSES['contrastive'].mining.replace('_', '-')} mining."
            if any(row.loss == "contrastive" for row in table)
            else ""
        ),
        "",
        *(["Figures: the mean over the val splits; each split below.", ""] if several else []),
        "| model | mAP whole | mP@10 whole | mAP crops | mP@10 crops | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        (w, w10), (c, c10) = row.scores["whole"], row.scores["crops"]
        lines.append(
            f"| {row.label} | {w:.2f} | {w10:.2f} | {c:.2f} | {c10:.2f} | {row.seconds:.0f} |"
        )
    if several:
        lines += ["", *per_split_table(table, datas)]
    chosen = [
        f"{row.label}: {row.scores['whitening']}" for row in table if "whitening" in row.scores
    ]
    if chosen:
        lines += ["", "Whitening chosen on held-out training classes:", ""]
        lines += [f"- {line}" for line in chosen]
    lines += ["", "Goals (issue 18), each from this run:", ""]
    lines += [f"- {line}" for line in goals(table, datas, args.backbone)]
    return "\n".join(lines)


def per_split_table(table: list[Row], datas: list[Data]) -> list[str]:
    """mAP whole / crops of every val split (and UKBench's N-S score on whole queries)."""
    head, rule = ["model"], ["---"]
    for data in datas:
        head += [f"{data.name} whole", f"{data.name} crops"]
        head += ["N-S whole"] if data.kind == "ukbench" else []
    rule += ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for row in table:
        cells = [row.label]
        for data in datas:
            scores = row.scores[data.name]
            cells += [f"{scores['whole'][0]:.2f}", f"{scores['crops'][0]:.2f}"]
            cells += [f"{scores['N-S whole']:.2f}"] if data.kind == "ukbench" else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_SETTINGS = (
    "data",
    "backbone",
    "weights",
    "long_side",
    "train_long_side",
    "steps",
    "learning_rate",
    "margin",
    "classes_per_batch",
    "images_per_class",
)


def _settings(args) -> dict:
    """What identifies a run's results. The margins are the resolved ones, and the
    contrastive margin is there only when given, so results written before the contrastive
    rows existed (``"margin": 0.1``, no contrastive key) still resume."""
    settings = {name: getattr(args, name) for name in _SETTINGS}
    settings["data"] = [Path(folder).name for folder in args.data]
    settings["weights"] = args.weights and Path(args.weights).name
    settings["margin"] = _margin(args, "triplet")
    if args.contrastive_margin is not None:
        settings["contrastive_margin"] = args.contrastive_margin
    return settings


def _margin(args, kind: str) -> float:
    """The margin of ``kind``'s rows: its flag, else the config default of the kind."""
    given = args.margin if kind == "triplet" else args.contrastive_margin
    return LOSSES[kind].margin if given is None else given


def load_results(args) -> dict[str, Row]:
    """The rows a ``--results`` file holds, by label (none without the flag or file)."""
    if args.results is None or not args.results.exists():
        return {}
    saved = json.loads(args.results.read_text())
    if saved["settings"] != _settings(args):
        raise SystemExit(
            f"--results {args.results}: written with other settings ({saved['settings']}); "
            "name another file"
        )
    rows = {}
    for fields in saved["rows"]:
        fields["taps"] = fields["taps"] and tuple(fields["taps"])
        fields["scales"] = tuple(fields["scales"])
        for name, scores in fields["scores"].items():  # JSON turned (mAP, mP@10) into lists
            if isinstance(scores, list):
                fields["scores"][name] = tuple(scores)
            elif isinstance(scores, dict):
                scores.update({k: tuple(v) for k, v in scores.items() if isinstance(v, list)})
        rows[fields["label"]] = Row(**fields)
    return rows


def save_results(args, done: dict[str, Row]) -> None:
    if args.results is None:
        return
    body = {"settings": _settings(args), "rows": [dataclasses.asdict(r) for r in done.values()]}
    atomic_write_text(args.results, json.dumps(body, indent=1))


def _custom(args) -> bool:
    """Anything but the original benchmark (MobileNet on one data folder)."""
    return args.backbone != "mobilenet" or len(args.data) > 1


def _data_text(datas: list[Data]) -> str:
    if len(datas) == 1 and datas[0].name == "multiview":
        data = datas[0]
        return (
            f"Data: `multiview/` ({len(data.train)} training images of "
            f"{len({s for _, s in data.train})} scenes; database of {len(data.database)} images: "
            f"{len(data.queries)} of 11 unseen val scenes and "
            f"{len(data.database) - len(data.queries)} distractors). Each val image is a query "
            f"whole and as a random crop of {CROP_AREA:.0%} of its area (its own image is junk)."
        )
    parts = [
        f"`{d.name}/` ({len(d.train)} training images of {len({s for _, s in d.train})} "
        f"groups; {len(d.queries)} val queries against {len(d.database)} images)"
        for d in datas
    ]
    return (
        f"Data: {', '.join(parts)}; training on the union of the train splits. Each query "
        f"(every val image, or the groups' listed queries: Holidays' protocol) runs whole and as "
        f"a random crop of {CROP_AREA:.0%} of its area (its own image is junk)."
    )


def _backbone_text(args) -> str:
    if args.backbone == "mobilenet":
        return (
            "ImageNet MobileNet v1 (alpha 0.75, bundled "
            "weights), taps conv_pw_12 + conv_pw_13 (BatchNorm output, plain ReLU) unless the row "
            "says otherwise."
        )
    from remap_tf.specs import get_spec

    spec = get_spec(BACKBONES[args.backbone]["backbone"])
    return (
        f"ImageNet {spec.constructor} (`{Path(args.weights).name}`), taps {' + '.join(spec.taps)}."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, nargs="+", help="data folders (multiview, holidays, ukbench)"
    )
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="mobilenet")
    parser.add_argument("--weights", default=None, help="backbone weights file (not mobilenet)")
    parser.add_argument("--long-side", type=int, default=512)
    parser.add_argument("--train-long-side", type=int, default=384)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (0: none)")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help=f"triplet rows' margin (default {LOSSES['triplet'].margin:g})",
    )
    parser.add_argument(
        "--contrastive-margin",
        type=float,
        default=None,
        help=f"contrastive rows' margin (default {LOSSES['contrastive'].margin:g}, cirtorch's)",
    )
    parser.add_argument("--classes-per-batch", type=int, default=6)
    parser.add_argument("--images-per-class", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="labels of the rows to run")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="JSON file of finished rows: written after each row; a rerun with the same "
        "settings skips the rows it holds (resume, or --write a report without rerunning)",
    )
    args = parser.parse_args(argv)
    backbone_arguments(args.backbone, args.weights)  # --weights checked before any work
    started, load_before = time.monotonic(), os.getloadavg()[0]
    datas = [load_data(Path(folder)) for folder in args.data]
    table = [
        r for r in rows(args.steps > 0, args.backbone) if (not args.only or r.label in args.only)
    ]
    done = load_results(args)
    pixels, training = [], None
    if any(row.label not in done for row in table):  # else only the report is written
        pixels = [prepared(data, args.long_side) for data in datas]
        training = training_pixels(datas, pixels)  # once: 3 GB at 512 px over three folders
        for part in pixels:
            del part["train"]
    with tempfile.TemporaryDirectory() as folder:
        train_csv = write_train_csv(datas, Path(folder))
        for index, row in enumerate(table):
            if row.label in done:
                table[index] = done[row.label]
                continue
            table[index] = run_row(row, datas, pixels, training, train_csv, args)
            done[row.label] = table[index]
            save_results(args, done)
    seconds = sum(row.seconds for row in table) if args.results else time.monotonic() - started
    md = markdown(table, datas, args, seconds, (load_before, os.getloadavg()[0]))
    print(md)
    if args.write:
        name = "quality"
        if _custom(args):
            name += f"-{args.backbone}-" + "-".join(d.name for d in datas)
        write_section(name, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

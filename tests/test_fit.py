"""Units of training.fit and training.callbacks on tiny models (the end-to-end runs are in
test_train_photos.py and test_resume.py)."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from remap_tf.evaluation import label_map
from remap_tf.training.callbacks import (
    AtomicBackupAndRestore,
    AtomicModelCheckpoint,
    RetrievalEvaluation,
    TimeLimit,
    backup_epoch,
)
from remap_tf.training.config import TrainConfig
from remap_tf.training.fit import make_learning_rate, make_optimizer


def _config(**sections):
    values = {"epochs": 2, "steps_per_epoch": 50}
    values.update(sections)
    return TrainConfig.from_dict(values)


def test_warmup_then_cosine_schedule():
    """lr(s) = peak·s/W during warm-up; then peak·(α + (1-α)·½(1+cos(π·t/T))), t = s-W,
    T = total-W. Peak 0.1, W 10, total 100, α 0.1: lr(5) = 0.05, lr(10) = 0.1,
    lr(55) = 0.1·(0.1 + 0.9·0.5) = 0.055, lr(100) = 0.01."""
    config = _config(
        optimizer={"learning_rate": 0.1, "warmup_steps": 10, "min_learning_rate_ratio": 0.1}
    )
    schedule = make_learning_rate(config)
    for step, want in [(0, 0.0), (5, 0.05), (10, 0.1), (55, 0.055), (100, 0.01)]:
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-7)
    flat = make_learning_rate(_config(optimizer={"learning_rate": 0.1, "cosine_decay": False}))
    assert float(flat(0)) == pytest.approx(0.1) and float(flat(99)) == pytest.approx(0.1)
    half = 0.1 * 0.5 * (1 + math.cos(math.pi * 0.5))
    plain = make_learning_rate(_config(optimizer={"learning_rate": 0.1}))
    assert float(plain(50)) == pytest.approx(half, rel=1e-5)


@pytest.mark.parametrize(
    "name, cls", [("sgd", keras.optimizers.SGD), ("adam", keras.optimizers.Adam),
                  ("adamw", keras.optimizers.AdamW)]
)  # fmt: skip
def test_optimizers_get_schedule_and_clipnorm(name, cls):
    config = _config(
        optimizer={"name": name, "clipnorm": 2.0, "momentum": 0.8, "weight_decay": 0.01}
    )
    optimizer = make_optimizer(config)
    assert type(optimizer) is cls
    assert optimizer.clipnorm == 2.0
    assert isinstance(optimizer._learning_rate, keras.optimizers.schedules.CosineDecay)
    if name == "sgd":
        assert optimizer.momentum == 0.8


def _tiny_model():
    inputs = keras.Input((4,))
    outputs = keras.layers.UnitNormalization()(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    return model


def _xy(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")


def test_time_limit_stops_cleanly_after_the_budget():
    model = _tiny_model()
    x, y = _xy()
    limit = TimeLimit(1e-6)
    history = model.fit(x, y, batch_size=4, epochs=5, callbacks=[limit], verbose=0)
    assert limit.stopped and history.epoch == [0]
    generous = TimeLimit(3600)
    history = model.fit(x, y, batch_size=4, epochs=2, callbacks=[generous], verbose=0)
    assert not generous.stopped and history.epoch == [0, 1]
    with pytest.raises(ValueError, match="seconds"):
        TimeLimit(0)


def test_retrieval_evaluation_logs_label_map_and_skips_bad_rows():
    """The callback's val_map is label_map of the model's descriptors; rows labelled -1
    (bad files) are left out."""
    model = _tiny_model()
    x, _ = _xy(12)
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, -1, -1, 0])
    evaluation = RetrievalEvaluation((x, labels), batch_size=5, verbose=0)
    evaluation.set_model(model)
    keep = labels >= 0
    want = label_map(np.asarray(model(x[keep])), labels[keep])
    assert evaluation.evaluate() == pytest.approx(want, abs=1e-6)
    logs = {}
    evaluation.set_params({"epochs": 1})
    evaluation.on_epoch_end(0, logs)
    assert logs["val_map"] == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        RetrievalEvaluation((x[:1], labels[:1]))


def test_checkpoints_and_backup_are_atomic_and_carry_the_config(tmp_path):
    config = _config(out_dir=str(tmp_path))
    model = _tiny_model()
    x, y = _xy()
    checkpoint = AtomicModelCheckpoint(
        str(tmp_path / "ckpt" / "epoch_{epoch:03d}.weights.h5"), config=config,
        save_weights_only=True,
    )  # fmt: skip
    backup = AtomicBackupAndRestore(
        str(tmp_path / "backup"), config=config, delete_checkpoint=False
    )
    model.fit(x, y, batch_size=4, epochs=2, callbacks=[checkpoint, backup], verbose=0)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.yaml", "epoch_001.weights.h5", "epoch_002.weights.h5"]
    assert backup_epoch(tmp_path / "backup") == 2
    backup_files = sorted(p.name for p in (tmp_path / "backup").iterdir())
    assert "config.yaml" in backup_files and not any(n.startswith(".") for n in backup_files)

    # A corrupt latest backup (a kill mid-write of Keras' own callback) falls back to the
    # previous state instead of failing or restarting from scratch.
    latest = tmp_path / "backup" / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[:100])
    fresh = _tiny_model()
    restore = AtomicBackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    history = fresh.fit(x, y, batch_size=4, epochs=3, callbacks=[restore], verbose=0)
    assert history.epoch == [1, 2]  # the previous backup was written after epoch 1


def test_fit_model_on_a_tiny_remap(tmp_path):
    """fit_model compiles with the triplet loss and runs fit with the evaluation callback."""
    from remap_tf.training.fit import build_model, fit_model

    config = TrainConfig.from_dict(
        {
            "model": {"backbone": "mobilenet", "backbone_kwargs": {"alpha": 0.25},
                      "levels": 1, "dim": 8, "freeze_backbone": True},
            "data": {"image_size": 64, "classes_per_batch": 2, "images_per_class": 2},
            "epochs": 1, "steps_per_epoch": 2, "verbose": 0, "out_dir": str(tmp_path),
        }
    )  # fmt: skip
    model = build_model(config)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    labels = np.array([0, 0, 1, 1], dtype="int32")
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    history = fit_model(model, dataset, config, val=(images, labels))
    assert np.isfinite(history.history["loss"]).all()
    assert 0.0 <= history.history["val_map"][0] <= 1.0
    assert history.retrieval.initial_map is not None


def test_initialise_follows_config_init_and_takes_an_explicit_pair_seed(monkeypatch):
    """What `initialise` asks of the KL and whitening functions (the demo builds on it): the
    run's seed for the KL pairs unless ``seed`` is given, the config's shrinkage, nothing at all
    when ``init`` turns both off."""
    from remap_tf.training import fit

    calls = []
    monkeypatch.setattr(
        fit, "init_region_weights", lambda *args, **kw: calls.append(("kl", kw)) or "weights"
    )
    monkeypatch.setattr(fit, "init_whitening", lambda *args, **kw: calls.append(("lw", kw)))
    config = _config(seed=7, init={"whitening": "learned", "whitening_shrinkage": 0.3})
    done = fit.initialise("model", "images", "labels", config)
    assert done == {"region_weights": "weights", "whitening": "learned"}
    assert [kind for kind, _ in calls] == ["kl", "lw"]
    assert calls[0][1]["seed"] == 7 and calls[1][1]["shrinkage"] == 0.3
    calls.clear()
    fit.initialise("model", "images", "labels", config, seed=0)
    assert calls[0][1]["seed"] == 0
    calls.clear()
    off = _config(init={"region_weights": False, "whitening": "none"})
    assert fit.initialise("model", "images", "labels", off) == {
        "region_weights": None,
        "whitening": None,
    }
    assert calls == []


def test_compile_model_compiles_the_configured_loss_kind():
    """loss.kind picks the Keras loss; a null margin / mining is the kind's default."""
    from remap_tf.losses import ContrastiveLoss, TripletLoss
    from remap_tf.training.fit import compile_model

    model = _tiny_model()
    compile_model(model, _config(loss={"kind": "contrastive"}))
    assert type(model.loss) is ContrastiveLoss
    assert (model.loss.margin, model.loss.mining) == (0.7, "batch_all")
    compile_model(model, _config(loss={"kind": "triplet", "margin": 0.2, "mining": "batch_all"}))
    assert type(model.loss) is TripletLoss
    assert (model.loss.margin, model.loss.mining) == (0.2, "batch_all")


def test_epochs_zero_initialises_and_saves_without_fitting(tmp_path):
    """epochs 0: KL region weights and learned whitening are initialised, no fit step runs,
    and model.keras (compiled, safe_mode loadable) and config.yaml are written as after
    training; the whitening differs from an uninitialised model's."""
    import yaml

    from remap_cli.demo.photoset import make_photo_views
    from remap_tf.losses import ContrastiveLoss
    from remap_tf.model import whitening_layer
    from remap_tf.training.fit import build_model, train

    views = make_photo_views(
        tmp_path / "photos", seed=2, views_per_photo=3, image_size=(64, 64), val_fraction=0.3
    )
    config = TrainConfig.from_dict(
        {
            "model": {"backbone": "mobilenet", "backbone_kwargs": {"alpha": 0.25}, "levels": 2},
            "data": {"train": str(views.train_csv), "validation": str(views.val_csv),
                     "image_size": 64, "classes_per_batch": 2, "images_per_class": 2},
            "optimizer": {"warmup_steps": 5},  # no step to warm up: not an error
            "loss": {"kind": "contrastive"},
            "init": {"num_images": 16},
            "epochs": 0, "seed": 0, "tensorboard": False, "verbose": 0,
            "out_dir": str(tmp_path / "run"),
        }
    )  # fmt: skip
    result = train(config)
    assert (result.epochs_run, result.initial_epoch, result.history) == (0, 0, {})
    assert result.initial_val_map is not None and result.val_map is None
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.keras"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 0 and saved["loss"]["kind"] == "contrastive"
    assert saved["loss"]["margin"] == 0.7

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an optimizer saved unbuilt does not load quietly
        loaded = keras.saving.load_model(result.model_path, safe_mode=True)
    assert isinstance(loaded.loss, ContrastiveLoss) and loaded.loss.margin == 0.7
    keras.utils.set_random_seed(config.seed)  # train() built the same initial model
    uninitialised = build_model(config)
    kernel = whitening_layer(loaded).get_weights()[0]
    assert not np.allclose(kernel, whitening_layer(uninitialised).get_weights()[0])
    np.testing.assert_allclose(kernel, whitening_layer(result.model).get_weights()[0])
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        loaded(images, training=False), result.model(images, training=False), atol=1e-5
    )

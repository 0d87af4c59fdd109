"""TrainConfig: defaults < YAML < flags, one validation with named errors, atomic YAML round trip;
the `remap train` flag resolution; the Keras-version gate of training.keras_compat."""

from __future__ import annotations

import argparse

import pytest
import yaml
from PIL import Image

from remap_cli.commands.train import add_parser, resolve_config
from remap_tf.training import keras_compat
from remap_tf.training.config import TrainConfig, load_config


@pytest.fixture
def data_dir(tmp_path):
    """Two classes of two (tiny, valid) images: the command line reads the manifest."""
    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / name / f"{i}.png")
    return folder


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_yaml_then_overrides_then_validation(tmp_path, data_dir):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": "vgg16", "dim": 64},
                "optimizer": {"name": "sgd", "learning_rate": 1},  # int accepted as float
                "epochs": 5,
                "data": {"train": str(data_dir)},
            }
        )
    )
    config = load_config(path, overrides={"epochs": 7, "model.pooling": "gem", "seed": None})
    assert config.model.backbone == "vgg16" and config.model.dim == 64
    assert config.optimizer.learning_rate == 1.0 and isinstance(
        config.optimizer.learning_rate, float
    )
    assert config.epochs == 7 and config.model.pooling == "gem"
    assert config.seed == 0  # a None override (unset flag) keeps the value
    assert config.global_batch_size(num_replicas=4) == 4 * config.per_replica_batch_size()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.backbone": "resnet5"}, "model.backbone"),
        ({"optimizer.name": "lamb"}, "optimizer.name"),
        ({"loss.mining": "hardest"}, "loss.mining"),
        ({"loss.kind": "arcface"}, "loss.kind"),
        (
            {"loss.kind": "contrastive", "loss.mining": "semi_hard"},
            "loss.mining 'semi_hard' is not defined for the contrastive loss",
        ),
        ({"loss.margin": -0.5}, "loss.margin"),
        ({"epochs": -1}, "epochs"),
        ({"strategy": "horovod"}, "strategy"),
        ({"data.image_size": 32}, "data.image_size"),
        ({"data.images_per_class": 1}, "data.images_per_class"),
        ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate"),
        ({"optimizer.warmup_steps": 10_000}, "optimizer.warmup_steps"),
        ({"epochs": "3"}, "epochs"),
        ({"time_limit": 5.0, "strategy": "multi_worker"}, "time_limit"),
        ({"data.train": "/does/not/exist"}, "/does/not/exist"),
    ],
)
def test_bad_values_name_the_field_and_value(data_dir, overrides, message):
    with pytest.raises(ValueError, match="(?s)" + message.replace(".", r"\.")):
        load_config(overrides={"data.train": str(data_dir), **overrides})


def test_loss_margin_and_mining_default_to_the_kinds_and_are_saved(tmp_path, data_dir):
    """A null margin / mining is the kind's default (triplet 0.1 batch_hard, contrastive 0.7
    batch_all), resolved once by validate, so config.yaml records the values used."""
    triplet = load_config(overrides={"data.train": str(data_dir)})
    assert (triplet.loss.kind, triplet.loss.margin, triplet.loss.mining) == (
        "triplet",
        0.1,
        "batch_hard",
    )
    contrastive = load_config(overrides={"data.train": str(data_dir), "loss.kind": "contrastive"})
    assert (contrastive.loss.margin, contrastive.loss.mining) == (0.7, "batch_all")
    saved = yaml.safe_load(contrastive.save(tmp_path / "config.yaml").read_text())
    assert saved["loss"]["kind"] == "contrastive" and saved["loss"]["margin"] == 0.7
    explicit = load_config(
        overrides={
            "data.train": str(data_dir),
            "loss.kind": "contrastive",
            "loss.margin": 0.85,
            "loss.mining": "batch_hard",
        }
    )
    assert (explicit.loss.margin, explicit.loss.mining) == (0.85, "batch_hard")
    args = _parse(["--data", str(data_dir), "--loss", "contrastive", "--epochs", "0"])
    config = resolve_config(args)
    assert (config.loss.kind, config.loss.margin, config.epochs) == ("contrastive", 0.7, 0)
    with pytest.raises(ValueError, match="loss.mining 'semi_hard' is not defined for the contr"):
        resolve_config(
            _parse(["--data", str(data_dir), "--loss", "contrastive", "--mining", "semi_hard"])
        )


def test_epochs_zero_means_initialise_only_and_ignores_warmup(data_dir):
    config = load_config(
        overrides={"data.train": str(data_dir), "epochs": 0, "optimizer.warmup_steps": 10}
    )
    assert config.epochs == 0 and config.total_steps() == 0
    with pytest.raises(ValueError, match="warmup_steps"):  # still checked when training
        load_config(
            overrides={"data.train": str(data_dir), "epochs": 1, "optimizer.warmup_steps": 100}
        )


def test_unknown_fields_are_rejected(tmp_path, data_dir):
    with pytest.raises(ValueError, match="Unknown config field"):
        load_config(overrides={"data.train": str(data_dir), "optimiser.name": "sgd"})
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbon: vgg16\n")
    with pytest.raises(ValueError, match=r"model\.backbon"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_saved_yaml_round_trips_atomically(tmp_path, data_dir):
    config = load_config(overrides={"data.train": str(data_dir), "model.taps": ["a", "b"]})
    path = config.save(tmp_path / "out" / "config.yaml")
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary left
    assert TrainConfig.from_dict(yaml.safe_load(path.read_text())) == config


def test_cli_flags_override_the_config_file(tmp_path, data_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 4, "data": {"images_per_class": 4}}))
    args = _parse(
        [
            "--data", str(data_dir), "--config", str(path), "--batch-size", "16",
            "--backbone", "resnet50", "--mixed-precision", "--set", "optimizer.clipnorm=null",
        ]
    )  # fmt: skip
    config = resolve_config(args)
    assert config.epochs == 4 and config.model.backbone == "resnet50"
    assert (config.data.classes_per_batch, config.data.images_per_class) == (4, 4)
    assert config.mixed_precision is True and config.optimizer.clipnorm is None
    with pytest.raises(ValueError, match="--batch-size 10"):
        resolve_config(
            _parse(["--data", str(data_dir), "--config", str(path), "--batch-size", "10"])
        )
    with pytest.raises(ValueError, match="--data is required"):
        resolve_config(_parse([]))


def test_keras_compat_version_gate():
    assert keras_compat.is_affected("3.15.1")
    assert keras_compat.is_affected("3.6.0")
    assert not keras_compat.is_affected("2.15.0")
    assert not keras_compat.is_affected("4.0.0")


def test_keras_compat_apply_is_idempotent(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    monkeypatch.delenv(keras_compat.DISABLE_ENV, raising=False)
    assert keras_compat.apply() is True
    patched = trainer.reduce_per_replica
    assert keras_compat.apply() is True
    assert trainer.reduce_per_replica is patched is keras_compat._reduce_per_replica
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is keras_compat._maybe_symbolic_build


def test_strategies_by_name_and_tf_config_checks():
    import json

    import tensorflow as tf

    from remap_tf.training.strategies import check_tf_config, is_chief, make_strategy

    assert make_strategy("default") is tf.distribute.get_strategy()
    assert make_strategy("one_device", ["/cpu:0"]).num_replicas_in_sync == 1
    assert is_chief(make_strategy("default"))
    with pytest.raises(ValueError, match="horovod"):
        make_strategy("horovod")
    with pytest.raises(ValueError, match="devices"):
        make_strategy("default", devices=["/cpu:0"])
    assert check_tf_config(None) == {}
    good = {
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 1},
    }
    assert check_tf_config(json.dumps(good)) == good
    with pytest.raises(ValueError, match="not valid JSON"):
        check_tf_config("{cluster")
    with pytest.raises(ValueError, match="not in the cluster"):
        check_tf_config(json.dumps({**good, "task": {"type": "worker", "index": 2}}))


# Issue 18's options (all off by default): regional GeM pooling and whitening selection.


def test_region_pooling_flag_default_and_bad_value(data_dir):
    assert resolve_config(_parse(["--data", str(data_dir)])).model.region_pooling == "max"
    config = resolve_config(_parse(["--data", str(data_dir), "--region-pooling", "gem"]))
    assert config.model.region_pooling == "gem"
    with pytest.raises(ValueError, match=r"model\.region_pooling.*'mean'"):
        load_config(overrides={"data.train": str(data_dir), "model.region_pooling": "mean"})


def test_build_model_follows_the_config(data_dir):
    import remap_tf
    from remap_tf.training.fit import build_model

    overrides = {
        "data.train": str(data_dir),
        "model.backbone": "mobilenet",
        "model.backbone_kwargs": {"alpha": 0.25},
        "model.region_pooling": "gem",
    }
    model = build_model(load_config(overrides=overrides))
    assert isinstance(model.get_layer("regions_0"), remap_tf.RegionGeMPooling)
    model = build_model(load_config(overrides={**overrides, "model.region_pooling": "max"}))
    assert not isinstance(model.get_layer("regions_0"), remap_tf.RegionGeMPooling)


def test_select_whitening_flag_and_holdout_check(data_dir):
    """`--select-whitening` turns on init.whitening_select (off by default)."""
    assert resolve_config(_parse(["--data", str(data_dir)])).init.whitening_select is False
    config = resolve_config(_parse(["--data", str(data_dir), "--select-whitening"]))
    assert config.init.whitening_select is True and config.init.whitening_holdout == 0.3
    with pytest.raises(ValueError, match=r"init\.whitening_holdout"):
        load_config(overrides={"data.train": str(data_dir), "init.whitening_holdout": 1.0})

"""Config: TOML loading, typed command-line overrides, clear errors for bad keys/values."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from ka_rs.engine.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_toml,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.optim.clip_max_norm == 0.1
    assert cfg.data.source == "shapes"


def test_toml_sections_and_int_to_float(tmp_path):
    p = write(
        tmp_path,
        """
[model]
preset = "detr_tiny"
overrides = { hidden_dim = 64, dropout = 0.0 }

[data]
split = "shapes-halves"
teacher = "teacher_a"
num_train_images = 256

[optim]
lr = 2            # an int where a float is expected is fine
lr_drop = [10]
lr_drop_unit = "step"

[train]
batch_size = 4
time_budget_minutes = 1.5
""",
    )
    cfg = load_config(p)
    assert cfg.model.preset == "detr_tiny"
    assert cfg.model.overrides == {"hidden_dim": 64, "dropout": 0.0}
    assert cfg.data.teacher == "teacher_a" and cfg.data.num_train_images == 256
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr_drop == [10]
    assert cfg.train.batch_size == 4 and cfg.train.time_budget_minutes == 1.5
    # untouched fields keep defaults
    assert cfg.optim.lr_backbone == Config().optim.lr_backbone


def test_overrides_are_typed():
    cfg = apply_overrides(
        Config(),
        [
            "optim.lr=2e-4",
            "train.epochs=3",
            "train.progress=false",
            "data.source=voc",  # bare word -> string
            "data.root=/data/VOC2007",
            "data.classes=cat,dog",  # comma list for list fields
            "optim.lr_drop=[5, 9]",
            "model.overrides.hidden_dim=64",
            "model.overrides={num_queries = 10}",
            'train.output_dir="runs/x y"',
        ],
    )
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.train.epochs == 3
    assert cfg.train.progress is False
    assert cfg.data.source == "voc" and cfg.data.root == "/data/VOC2007"
    assert cfg.data.classes == ["cat", "dog"]
    assert cfg.optim.lr_drop == [5, 9]
    # the later whole-table override replaces the earlier key
    assert cfg.model.overrides == {"num_queries": 10}
    assert cfg.train.output_dir == "runs/x y"


def test_nested_override_into_dict_field():
    cfg = apply_overrides(Config(), ["model.overrides.hidden_dim=64", "model.overrides.x=1.5"])
    assert cfg.model.overrides == {"hidden_dim": 64, "x": 1.5}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=1e-4", "optim.lrr"),
        ("optimizer.lr=1e-4", "optimizer"),
        ("train.epochs=three", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.progress=maybe", "train.progress"),
        ("optim.lr", "KEY=VALUE"),
        ("lr=3", "SECTION.NAME"),
        ("optim.lr.x=3", "not a table"),
        ("data.source=hdf5", "data.source"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr_drop_unit=hour", "optim.lr_drop_unit"),
        ("train.device=tpu", "train.device"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(Config(), [override])
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        apply_overrides(Config(), ["optim.lrr=1"])


def test_bad_file_errors_name_file_and_key(tmp_path):
    p = write(tmp_path, "[train]\nbatch_sise = 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and "train.batch_sise" in str(exc.value)
    assert "batch_size" in str(exc.value)  # valid keys listed

    p = write(tmp_path, "[trian]\nepochs = 3\n", "s.toml")
    with pytest.raises(ConfigError, match="unknown config section 'trian'"):
        load_config(p)

    p = write(tmp_path, '[train]\nepochs = "many"\n', "t.toml")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(p)

    p = write(tmp_path, "[train\nepochs = 3\n", "u.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)

    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="data.teacher"):
        config_from_dict({"data": {"teacher": "teacher_a"}})
    with pytest.raises(ConfigError, match="data.root"):
        config_from_dict({"data": {"source": "coco"}})
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({"data": {"split": "shapes-halves", "teacher": "a", "classes": ["x"]}})


def test_round_trip_through_dict_and_toml(tmp_path):
    cfg = apply_overrides(
        Config(),
        [
            "model.overrides={hidden_dim = 64, cnn_channels = [8, 16]}",
            'data.classes=["a b", "c\\"d"]',
            "optim.lr_drop=[3]",
            "train.time_budget_minutes=0.25",
        ],
    )
    assert Config.from_dict(cfg.to_dict()) == cfg
    text = dump_toml(cfg)
    assert tomllib.loads(text) == cfg.to_dict()
    p = write(tmp_path, text)
    assert load_config(p) == cfg


def test_parse_override_values():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a.b = 1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a.b=hello world") == (["a", "b"], "hello world")
    assert parse_override("a.b.c=[1,2]") == (["a", "b", "c"], [1, 2])


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").glob("teacher_*.toml")), ids=lambda p: p.name
)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    cfg.validate()

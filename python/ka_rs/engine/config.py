"""Training configuration: dataclasses loadable from TOML, overridable from the command line.

A config file has one table per section (``[model]``, ``[data]``, ``[optim]``, ``[train]``);
every key is optional and falls back to the dataclass default. Command-line overrides use
dotted keys, ``--set optim.lr=2e-4``; the value is parsed as a TOML value (``true``, ``2e-4``,
``["a", "b"]``, ``{hidden_dim = 64}``) and a bare word is taken as a string
(``--set data.source=coco``). Keys are checked against the dataclasses: an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key (and the file).

Configs are serialised as plain dicts of primitives (:meth:`Config.to_dict`) so that they can
live inside checkpoints loaded with ``torch.load(weights_only=True)``, and written back as TOML
(:func:`dump_toml`) so that every run folder holds the exact config it ran with.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 with the tomli backport
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "describe_toml_error",
    "dump_toml",
    "load_config",
    "parse_override",
    "read_toml_file",
]

#: integers in a config must fit a signed 64-bit integer (torch / numpy seeds, step counts)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key (and file)."""


@dataclass
class ModelConfig:
    """Which detector to build.

    ``preset`` is a name understood by :func:`ka_rs.models.build_model` (``detr_r50``,
    ``detr_small``, ``detr_tiny``, ``anchor_small``, ``anchor_tiny``); ``overrides`` are extra
    keyword arguments for it (fields of ``DetrConfig``, e.g. ``{hidden_dim = 64, dropout = 0.0}``).
    The number of classes always comes from the data.
    """

    preset: str = "anchor_tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the images come from and which classes the detector learns.

    Sources:

    * ``"shapes"``: the embedded synthetic dataset; ``train_set`` / ``val_set`` name its splits
      (``train``, ``val``, ``test``) and ``num_train_images`` / ``num_val_images`` its sizes
      (0 = the dataset's default).
    * ``"coco"``: a COCO-format folder; ``root`` + ``ann_file`` for training and ``val_root``
      (default ``root``) + ``val_ann_file`` for evaluation.
    * ``"voc"``: a Pascal VOC folder (the one holding ``Annotations/``, ``JPEGImages/``,
      ``ImageSets/``); ``train_set`` / ``val_set`` are image-set names (``trainval``, ``test``).

    Images: ``image_size`` is the evaluation size (shorter side; shapes are also drawn at this
    size) and ``max_size`` caps the longer side (0 = the preset's suggestion / no cap).
    Training augmentation: random resize to one of ``scales`` (empty = 75%-100% of
    ``image_size`` in steps of 8, DETR-style), horizontal ``flip``, ``color_jitter`` strength.

    Classes: all of the dataset's classes, or an explicit ``classes`` list, or the
    ``teacher`` part of a split preset ``split`` (see :func:`ka_rs.data.get_split`, e.g.
    ``split = "shapes-halves"``, ``teacher = "teacher_a"``). The dataset keeps every image but
    only those classes' annotations (the paper's protocol).
    """

    source: str = "shapes"
    root: str = ""
    ann_file: str = ""
    val_root: str = ""
    val_ann_file: str = ""
    train_set: str = "train"
    val_set: str = "val"
    num_train_images: int = 0
    num_val_images: int = 0
    image_size: int = 0
    max_size: int = 0
    scales: list[int] = field(default_factory=list)
    flip: bool = True
    color_jitter: float = 0.2
    classes: list[str] = field(default_factory=list)
    split: str = ""
    teacher: str = ""
    skip_invalid: bool = False
    seed: int = 0


@dataclass
class OptimConfig:
    """AdamW with a separate backbone learning rate, gradient clipping and a step LR schedule.

    ``lr_drop`` lists the milestones (in ``lr_drop_unit``: ``"epoch"``, ``"step"`` or
    ``"minute"`` of training time, evaluation excluded, for time-budgeted runs) at which every
    learning rate is multiplied by ``lr_gamma`` (one milestone = DETR's StepLR); empty =
    constant. ``lr_backbone = 0`` freezes the backbone. ``clip_max_norm = 0`` disables clipping.
    ``fused``: ``"auto"`` uses torch's fused AdamW kernel where this torch supports it for
    the parameters' device (CPU and CUDA), ``"on"`` requires it, ``"off"`` (the default, so
    that earlier runs reproduce bit for bit) uses torch's default implementation. The fused
    kernel rounds differently (about 2% of the weights differ by one float32 ulp per step) and
    is faster: on a 2-core EPYC it takes the anchor_tiny teacher's AdamW step from 3.8 to
    0.95 ms, 1-3% of a float32 training step (docs/performance.md).
    """

    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: list[int | float] = field(default_factory=list)
    lr_drop_unit: str = "epoch"
    lr_gamma: float = 0.1
    fused: str = "off"


@dataclass
class TrainConfig:
    """Loop length, evaluation, checkpointing, logging and runtime settings.

    Training stops at the first of: ``epochs`` epochs, ``max_steps`` optimiser steps (0 = no
    limit), ``time_budget_minutes`` minutes of training wall time (evaluation excluded; 0 = no
    limit). ``batch_size`` is per process (the global batch under ``torchrun`` is
    ``batch_size × world_size``). Evaluation runs every ``eval_every_epochs`` epochs,
    ``eval_every_steps`` steps and/or ``eval_every_minutes`` training minutes (0 = off), and
    always at the end. A checkpoint is written every ``checkpoint_every_steps`` steps, or at
    every epoch end when that is 0, and at the end. ``num_threads`` sets torch's intra-op CPU
    threads for the run (0 = torch's default, one per core); on a machine shared with other
    jobs, 1 thread (or ``OMP_WAIT_POLICY=PASSIVE``) avoids OpenMP spin-wait slowdowns.
    ``amp`` is the mixed-precision mode of training and evaluation (:mod:`ka_rs.engine.amp`):
    ``"off"`` (float32), ``"bf16"`` (model forwards under bfloat16 autocast, attention and
    losses in float32), ``"fp16"`` (float16 autocast plus loss scaling) or ``"auto"``
    (``"bf16"`` where the device has native bf16, else ``"off"``).
    """

    batch_size: int = 16
    eval_batch_size: int = 0
    epochs: int = 50
    max_steps: int = 0
    time_budget_minutes: float = 0.0
    eval_every_epochs: int = 1
    eval_every_steps: int = 0
    eval_every_minutes: float = 0.0
    checkpoint_every_steps: int = 0
    log_every_steps: int = 10
    seed: int = 42
    output_dir: str = "runs/teacher"
    num_workers: int = 0
    num_threads: int = 0
    device: str = "auto"
    progress: bool = True
    plot: bool = True
    amp: str = "off"


@dataclass
class Config:
    """A whole training run: ``model``, ``data``, ``optim`` and ``train`` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of primitives (safe for ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Config:
        """Inverse of :meth:`to_dict`; validates keys and types (see :func:`config_from_dict`)."""
        return config_from_dict(data, source=source)

    def validate(self) -> None:
        """Check value ranges and choices that types alone cannot express."""
        _validate(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}

T = TypeVar("T")


def _did_you_mean(key: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int → float allowed); return it."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table/dict, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_MIN <= value <= INT_MAX:
                raise ConfigError(
                    f"{key}: {value} does not fit a 64-bit integer "
                    f"(expected {INT_MIN} .. {INT_MAX})"
                )
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return value
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _section_from_dict(cls: type[T], data: Any, section: str, source: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: [{section}] must be a table, got {data!r}")
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types_:
            raise ConfigError(
                f"{source}: unknown config key '{section}.{key}'"
                f"{_did_you_mean(key, types_)}; valid keys in [{section}]: " + ", ".join(types_)
            )
        try:
            kwargs[key] = _coerce(value, types_[key], f"{section}.{key}")
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> Config:
    """Build a :class:`Config` from a nested mapping, validating every key and type.

    ``source`` names where the data came from (a file path) in error messages.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}")
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown config section '{name}'{_did_you_mean(name, _SECTIONS)}; "
                "valid sections: " + ", ".join(_SECTIONS)
            )
        sections[name] = _section_from_dict(_SECTIONS[name], value, name, source)
    cfg = Config(**sections)
    try:
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"section.key=value"`` into its dotted path and a parsed value.

    The value is read as a TOML value when it parses as one (numbers, booleans, quoted strings,
    arrays, inline tables); otherwise the raw text is used as a string.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    path = key.split(".")
    if len(path) < 2 or any(not p for p in path):
        raise ConfigError(
            f"override {text!r}: key must be SECTION.NAME (e.g. train.epochs), got {key!r}"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return a copy of ``cfg`` with ``--set`` style overrides (``"optim.lr=2e-4"``) applied.

    Keys below a dict-valued field are free-form (``model.overrides.hidden_dim=64``).
    Unknown keys and ill-typed values raise :class:`ConfigError` naming the key.
    """
    data = cfg.to_dict()
    for text in overrides:
        path, value = parse_override(text)
        section, name = path[0], path[1]
        if section not in _SECTIONS:
            raise ConfigError(
                f"override {text!r}: unknown config section '{section}'"
                f"{_did_you_mean(section, _SECTIONS)}; valid sections: " + ", ".join(_SECTIONS)
            )
        types_ = _field_types(_SECTIONS[section])
        if name not in types_:
            raise ConfigError(
                f"override {text!r}: unknown config key '{section}.{name}'"
                f"{_did_you_mean(name, types_)}; valid keys in [{section}]: " + ", ".join(types_)
            )
        if len(path) > 2:
            if typing.get_origin(types_[name]) is not dict:
                raise ConfigError(
                    f"override {text!r}: '{section}.{name}' is not a table, "
                    f"so '{'.'.join(path)}' is not a key"
                )
            target = data[section][name]
            for part in path[2:-1]:
                nxt = target.get(part)
                if not isinstance(nxt, dict):
                    nxt = {}
                    target[part] = nxt
                target = nxt
            target[path[-1]] = value
        else:
            if isinstance(value, str) and typing.get_origin(types_[name]) is list:
                # convenience: --set data.classes=circle,square
                value = [v.strip() for v in value.split(",") if v.strip()]
            try:
                data[section][name] = _coerce(value, types_[name], f"{section}.{name}")
            except ConfigError as exc:
                raise ConfigError(f"override {text!r}: {exc}") from None
    return config_from_dict(data, source="overrides")


def describe_toml_error(exc: Exception, text: str) -> str:
    """``tomllib``'s message, plus the dotted key for a key given twice.

    tomllib reports a repeated key as "Cannot overwrite a value (at line N, column M)"; this
    adds "key 'teachers.a' is given more than once" from the line and the table it is in.
    """
    import re

    msg = str(exc)
    m = re.search(r"\(at line (\d+), column \d+\)", msg)
    if not m or not msg.startswith("Cannot overwrite a value"):
        return msg
    lines = text.splitlines()
    lineno = int(m.group(1))
    if not 1 <= lineno <= len(lines) or "=" not in lines[lineno - 1]:
        return msg
    key = lines[lineno - 1].split("=", 1)[0].strip()
    table = ""
    for line in reversed(lines[: lineno - 1]):
        head = line.strip()
        if head.startswith("[") and "]" in head:
            table = head.strip("[]").split("]", 1)[0].strip()
            break
    dotted = f"{table}.{key}" if table else key
    return f"{msg}: key {dotted!r} is given more than once"


def read_toml_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML config file; :class:`ConfigError` naming it when it is a directory, does
    not exist, is not UTF-8 or not valid TOML (a repeated key is named)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory, not a TOML file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not valid TOML: {describe_toml_error(exc, text)}"
        ) from None
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a TOML config file (or the defaults when ``path`` is None) and apply overrides."""
    if path is None:
        cfg = Config()
    else:
        cfg = config_from_dict(read_toml_file(path), source=str(path))
    overrides = list(overrides)
    return apply_overrides(cfg, overrides) if overrides else cfg


_CHOICES = {
    ("data", "source"): ("shapes", "coco", "voc"),
    ("optim", "lr_drop_unit"): ("epoch", "step", "minute"),
    ("optim", "fused"): ("auto", "on", "off"),
    # = ka_rs.engine.amp.AMP_MODES (kept literal: loading a config does not import torch)
    ("train", "amp"): ("off", "auto", "bf16", "fp16"),
}


def _validate(cfg: Config) -> None:
    for (section, name), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(
                f"{section}.{name}: must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
    positive = [("train", "batch_size"), ("train", "epochs"), ("train", "log_every_steps")]
    for section, name in positive:
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{section}.{name}: must be > 0")
    non_negative = [
        ("train", "eval_batch_size"),
        ("train", "max_steps"),
        ("train", "time_budget_minutes"),
        ("train", "eval_every_epochs"),
        ("train", "eval_every_steps"),
        ("train", "eval_every_minutes"),
        ("train", "checkpoint_every_steps"),
        ("train", "num_workers"),
        ("train", "num_threads"),
        ("data", "num_train_images"),
        ("data", "num_val_images"),
        ("data", "image_size"),
        ("data", "max_size"),
        ("data", "color_jitter"),
        ("optim", "lr"),
        ("optim", "lr_backbone"),
        ("optim", "weight_decay"),
        ("optim", "clip_max_norm"),
        ("optim", "lr_gamma"),
    ]
    for section, name in non_negative:
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{section}.{name}: must be >= 0")
    if any(s <= 0 for s in cfg.data.scales):
        raise ConfigError(f"data.scales: sizes must be > 0, got {cfg.data.scales}")
    if any(m <= 0 for m in cfg.optim.lr_drop):
        raise ConfigError(f"optim.lr_drop: milestones must be > 0, got {cfg.optim.lr_drop}")
    if cfg.optim.lr_drop_unit != "minute" and any(
        not float(m).is_integer() for m in cfg.optim.lr_drop
    ):
        raise ConfigError(
            f"optim.lr_drop: {cfg.optim.lr_drop_unit} milestones must be whole numbers, "
            f"got {cfg.optim.lr_drop}"
        )
    if cfg.data.teacher and not cfg.data.split:
        raise ConfigError("data.teacher: needs data.split (a split preset such as 'shapes-halves')")
    if cfg.data.split and cfg.data.classes:
        raise ConfigError("data.classes and data.split: give one of them, not both")
    if cfg.data.source == "coco" and not (cfg.data.root and cfg.data.ann_file):
        raise ConfigError("data.source = 'coco' needs data.root (image dir) and data.ann_file")
    if cfg.data.source == "voc" and not cfg.data.root:
        raise ConfigError("data.source = 'voc' needs data.root (the VOC folder)")
    if not cfg.train.output_dir:
        raise ConfigError("train.output_dir: must not be empty")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise ConfigError(f"train.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")


# ----------------------------------------------------------------------------------------------
# TOML writing (tomllib only reads)


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key):
        return key
    return _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = value.replace("\\", "\\\\").replace('"', '\\"')
        out = out.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        return f'"{out}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + (f" {inner} " if inner else "") + "}"
    if value is None:
        raise ConfigError("TOML cannot represent None")
    raise ConfigError(f"TOML cannot represent {type(value).__name__}")


def dump_toml(cfg: Config | Mapping[str, Any]) -> str:
    """Render a config (or a ``{section: {key: value}}`` mapping) as TOML text."""
    data = cfg.to_dict() if isinstance(cfg, Config) else cfg
    lines: list[str] = []
    for section, values in data.items():
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(section)}]")
        for key, value in values.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"

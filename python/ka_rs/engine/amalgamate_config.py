"""Configuration of an amalgamation run (``ka-rs amalgamate``): teachers and options.

A TOML file (every key optional; ``--set section.key=value`` overrides)::

    [teachers]           # name = source, in slot order (``--teacher NAME=SOURCE`` adds one)
    teacher_a = "detr:/models/detr_voc_a.pth"                  # facebookresearch/detr file
    teacher_b = {source = "detr:/models/b.pth", classes = "b_classes.txt"}
    teacher_c = "hf:/models/deformable-detr-c"                 # Hugging Face folder
    teacher_d = "runs/teacher_d/checkpoint.pt"                 # ka_rs checkpoint
    [amalgamation]       # AmalgamationConfig: losses, pseudo-targets and the student
    [data]  [optim]  [train]   # as for teacher training (ka_rs.engine.config)

A teacher is a source string (see :mod:`ka_rs.teachers.sources`) or a table with ``source``
and ``classes`` (a list of names in the head's order, or a file of them; ``"N/A"`` marks a
non-class slot).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ka_rs.engine.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    _coerce,
    _section_from_dict,
    apply_overrides,
    config_from_dict,
    dump_toml,
    parse_override,
    read_toml_file,
)

__all__ = [
    "MODES",
    "STUDENT_KIND",
    "AmalgamateConfig",
    "AmalgamationConfig",
    "apply_amalgamate_overrides",
    "config_hash",
    "load_amalgamate_config",
    "teacher_specs",
    "write_config_toml",
]

STUDENT_KIND = "student"
MODES = ("label_free", "label_assisted")


@dataclass
class AmalgamationConfig:
    """The ``[amalgamation]`` section: losses, pseudo-targets and the student.

    Losses (switches and weights):
        sa: sequence-level amalgamation (student slot k imitates teacher k's encoder).
        ta: task-level amalgamation (pseudo-targets from the teachers' predictions).
        aggregation: the prior-KA baseline instead of SA: a ONE-slot student imitates a learnt
            channel-wise fusion of the teachers' sequences (needs ``sa = false``).
        sa_weight, ta_weight: weights of L_SA (or the aggregation hint loss) and L_TA.
        mode: ``"label_free"`` (teachers are the only supervision) or ``"label_assisted"``
            (+ ``gt_weight``·L_DETR on the ground truth, amalgamation weight 1 − e/E).
        gt_weight: w_gt of the label-assisted mode.
    Pseudo-targets (docs/method.md): ``threshold`` (0.1), ``top_n`` (50), ``fill_logit`` (−5),
        ``nms_iou`` (0.7; a negative value turns the merging of duplicates off, as in the
        authors' release).
    TA loss: ``temperature`` (4), ``eos_coef`` (0.1), ``weight_class`` / ``weight_bbox`` /
        ``weight_giou`` (1 / 5 / 2).
    Student:
        cross_slot_attention: full encoder attention across slots (default False: each slot
            attends to itself only, the paper's "no cross").
        student_layout: ``"slots"`` (default, the paper's student: one token slot per SA
            teacher, the encoder sees N·S tokens) or ``"compact"`` (an extension: the slots are
            merged per position before the encoder, which sees one teacher's S tokens; SA
            compares per-teacher linear views of the student's sequence, see
            :class:`ka_rs.models.student.CompactAmalgamationStudent`). Compact needs ``sa = true``
            and no ``aggregation`` / ``cross_slot_attention``.
        init_from: ``""`` (random init, the paper) or a teacher's name: start the student from
            that teacher's weights (an extension beyond the paper, see
            :func:`ka_rs.amalgamation.init_student_from_teacher`); it must be a ka_rs DETR.
        student: :class:`~ka_rs.models.DetrConfig` field overrides for the student
            (e.g. ``{num_queries = 30}``); by default it copies the ``init_from`` teacher's
            architecture, else the first teacher that is a ka_rs DETR. When no teacher is one
            (all TA-only), ``preset`` names the student's architecture
            (``{preset = "detr_r50"}``).
    Speed:
        cache_teachers: label the training images ONCE with the teachers (their predictions
            and, for SA / aggregation, their sequences) and keep images and outputs in memory;
            the student then trains on those fixed images without augmentation (no random
            resize, flip or colour jitter) and the teachers do not run during training. It
            pays off when the student sees each image several times. Needs images of one size
            (e.g. the shapes data); memory ≈ N_images × (image + teachers' outputs).
    """

    sa: bool = True
    ta: bool = True
    aggregation: bool = False
    sa_weight: float = 1.0
    ta_weight: float = 1.0
    mode: str = "label_free"
    gt_weight: float = 1.0
    threshold: float = 0.1
    top_n: int = 50
    fill_logit: float = -5.0
    nms_iou: float = 0.7
    temperature: float = 4.0
    eos_coef: float = 0.1
    weight_class: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    cross_slot_attention: bool = False
    student_layout: str = "slots"
    init_from: str = ""
    student: dict[str, Any] = field(default_factory=dict)
    cache_teachers: bool = False


def _default_train() -> TrainConfig:
    return TrainConfig(output_dir="runs/student")


@dataclass
class AmalgamateConfig:
    """A whole amalgamation run: ``teachers``, ``amalgamation``, ``data``, ``optim``, ``train``."""

    teachers: dict[str, Any] = field(default_factory=dict)
    amalgamation: AmalgamationConfig = field(default_factory=AmalgamationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=_default_train)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of primitives (safe inside ``weights_only`` checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> AmalgamateConfig:
        """Build and validate from a nested mapping (see :func:`load_amalgamate_config`)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}")
        known = ("teachers", "amalgamation", "data", "optim", "train")
        for name in data:
            if name == "model":
                raise ConfigError(
                    f"{source}: [model] is not used by amalgamation: the student copies the "
                    "teachers' architecture; change fields with amalgamation.student = {...}"
                )
            if name not in known:
                raise ConfigError(
                    f"{source}: unknown config section '{name}'; valid sections: "
                    + ", ".join(known)
                )
        teachers = data.get("teachers", {})
        if not isinstance(teachers, Mapping):
            raise ConfigError(f"{source}: [teachers] must be a table of name = source")
        teachers = {
            str(k): _teacher_entry(v, f"{source}: teachers.{k}") for k, v in teachers.items()
        }
        amg = _section_from_dict(
            AmalgamationConfig, data.get("amalgamation", {}), "amalgamation", source
        )
        train = dict(data.get("train", {}))
        train.setdefault("output_dir", "runs/student")
        base = config_from_dict(
            {"data": data.get("data", {}), "optim": data.get("optim", {}), "train": train},
            source=source,
        )
        cfg = cls(
            teachers=teachers,
            amalgamation=amg,
            data=base.data,
            optim=base.optim,
            train=base.train,
        )
        try:
            cfg.validate(require_teachers=False)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return cfg

    def base_config(self) -> Config:
        """The engine :class:`Config` view (``data``/``optim``/``train``; ``model`` unused)."""
        return Config(data=self.data, optim=self.optim, train=self.train)

    def validate(self, require_teachers: bool = True) -> None:
        """Check choices and combinations; ``require_teachers``: at least two teachers."""
        a = self.amalgamation
        if require_teachers and len(self.teachers) < 2:
            raise ConfigError(
                f"teachers: amalgamation needs at least 2 teachers, got {len(self.teachers)} "
                "(give --teacher NAME=SOURCE once per teacher or a [teachers] table)"
            )
        if a.mode not in MODES:
            raise ConfigError(f"amalgamation.mode: must be one of {MODES}, got {a.mode!r}")
        if a.sa and a.aggregation:
            raise ConfigError(
                "amalgamation.aggregation: the aggregation baseline replaces SA (one-slot "
                "student); set amalgamation.sa = false with it"
            )
        if not (a.sa or a.ta or a.aggregation or a.mode == "label_assisted"):
            raise ConfigError(
                "amalgamation: every loss is off (sa, ta, aggregation false in label-free mode); "
                "nothing to train"
            )
        if not 0.0 <= a.threshold < 1.0:
            raise ConfigError(f"amalgamation.threshold: must be in [0, 1), got {a.threshold}")
        if a.top_n < 0:
            raise ConfigError(f"amalgamation.top_n: must be >= 0, got {a.top_n}")
        if a.nms_iou > 1.0:
            raise ConfigError(f"amalgamation.nms_iou: must be <= 1 (< 0 = off), got {a.nms_iou}")
        if a.temperature <= 0:
            raise ConfigError(f"amalgamation.temperature: must be > 0, got {a.temperature}")
        for name in ("sa_weight", "ta_weight", "gt_weight", "eos_coef", "weight_class"):
            if getattr(a, name) < 0:
                raise ConfigError(f"amalgamation.{name}: must be >= 0")
        layouts = ("slots", "compact")
        if a.student_layout not in layouts:
            raise ConfigError(
                f"amalgamation.student_layout: must be one of {layouts}, got {a.student_layout!r}"
            )
        if a.student_layout == "compact":
            clash = [
                name
                for name, bad in (
                    ("sa = false", not a.sa),
                    ("aggregation = true", a.aggregation),
                    ("cross_slot_attention = true", a.cross_slot_attention),
                )
                if bad
            ]
            if clash:
                raise ConfigError(
                    "amalgamation.student_layout: 'compact' trains its per-teacher views with SA "
                    "and has no slots in its encoder; it does not combine with "
                    + ", ".join(clash)
                    + " (set amalgamation.student_layout = 'slots' for the N-slot student)"
                )
        if a.init_from and self.teachers and a.init_from not in self.teachers:
            raise ConfigError(
                f"amalgamation.init_from: {a.init_from!r} is not a teacher; "
                f"teachers: {sorted(self.teachers)}"
            )
        self.base_config().validate()


def _teacher_entry(value: Any, where: str) -> Any:
    """Validate one ``[teachers]`` entry: a source string or ``{source, classes}``."""
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{where}: empty teacher source")
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"source", "classes"})
        if unknown or not isinstance(value.get("source"), str) or not value["source"].strip():
            raise ConfigError(
                f'{where}: expected a source string or a table {{source = "...", '
                f'classes = [...] or "FILE"}}, got {dict(value)!r}'
            )
        classes = value.get("classes")
        ok = classes is None or isinstance(classes, str)
        ok = ok or (isinstance(classes, list) and all(isinstance(c, str) for c in classes))
        if not ok:
            raise ConfigError(f"{where}.classes: expected a list of names or a file path")
        return {k: v for k, v in value.items() if v is not None}
    raise ConfigError(f"{where}: expected a teacher source string, got {value!r}")


def teacher_specs(teachers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"source": str, "classes": list | str | None}}`` from a ``[teachers]`` table."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in teachers.items():
        if isinstance(value, str):
            out[name] = {"source": value, "classes": None}
        else:
            out[name] = {"source": value["source"], "classes": value.get("classes")}
    return out


def _merge_teacher_args(
    data: dict[str, Any], teacher_args: Iterable[str], class_args: Iterable[str] = ()
) -> None:
    """Apply ``--teacher NAME=SOURCE`` and ``--teacher-classes NAME=FILE|a,b,c``.

    A name given twice on the command line is refused (it would silently drop a teacher);
    ``--teacher`` replaces a config file's entry of the same name.
    """
    given: set[str] = set()
    teachers = data.setdefault("teachers", {})
    for spec in teacher_args:
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ConfigError(f"--teacher {spec!r}: expected NAME=SOURCE")
        if name in given:
            raise ConfigError(
                f"--teacher {spec!r}: teacher {name!r} is given twice; each teacher needs its "
                "own name"
            )
        given.add(name)
        teachers[name] = source
    for spec in class_args:
        name, sep, classes = spec.partition("=")
        name, classes = name.strip(), classes.strip()
        if not sep or not name or not classes:
            raise ConfigError(f"--teacher-classes {spec!r}: expected NAME=FILE or NAME=a,b,c")
        if name not in teachers:
            raise ConfigError(
                f"--teacher-classes {spec!r}: no teacher named {name!r} "
                f"(teachers: {sorted(teachers)})"
            )
        entry = teachers[name]
        src = entry if isinstance(entry, str) else entry["source"]
        value: Any = classes
        if not Path(classes).is_file() and "," in classes:
            value = [c.strip() for c in classes.split(",") if c.strip()]
        teachers[name] = {"source": src, "classes": value}
    _warn_same_source(teachers)


def _warn_same_source(teachers: Mapping[str, Any]) -> None:
    seen: dict[str, str] = {}
    for name, spec in teacher_specs(teachers).items():
        key = spec["source"]
        if key in seen:
            logging.getLogger("ka_rs.amalgamate").warning(
                "teachers %s and %s have the same source %s: the same model twice",
                seen[key],
                name,
                key,
            )
        seen.setdefault(key, name)


def apply_amalgamate_overrides(
    cfg: AmalgamateConfig,
    overrides: Iterable[str],
    teacher_args: Iterable[str] = (),
    class_args: Iterable[str] = (),
) -> AmalgamateConfig:
    """Return a copy of ``cfg`` with ``--set`` overrides, ``--teacher NAME=SOURCE`` and
    ``--teacher-classes NAME=FILE|a,b,c`` applied.

    ``data``/``optim``/``train`` keys go through the engine's :func:`apply_overrides` (same
    parsing and messages as teacher training); ``amalgamation.*`` and ``teachers.NAME`` keys
    are checked here.
    """
    overrides = list(overrides)
    engine_ov = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] in _ENGINE]
    own_ov = [o for o in overrides if o not in engine_ov]
    data = cfg.to_dict()
    if engine_ov:
        base = apply_overrides(cfg.base_config(), engine_ov)
        data.update({k: v for k, v in base.to_dict().items() if k in _ENGINE})
    hints = typing.get_type_hints(AmalgamationConfig)
    for text in own_ov:
        path, value = parse_override(text)
        section = path[0]
        if section == "teachers":
            if len(path) != 2 or not isinstance(value, str) or not value:
                raise ConfigError(f"override {text!r}: expected teachers.NAME=SOURCE")
            data.setdefault("teachers", {})[path[1]] = value
        elif section == "amalgamation":
            name = path[1]
            if name not in hints:
                raise ConfigError(
                    f"override {text!r}: unknown config key 'amalgamation.{name}'; valid keys "
                    "in [amalgamation]: " + ", ".join(hints)
                )
            if len(path) > 2:
                if name != "student":
                    raise ConfigError(f"override {text!r}: 'amalgamation.{name}' is not a table")
                data["amalgamation"]["student"][".".join(path[2:])] = value
            else:
                try:
                    data["amalgamation"][name] = _coerce(value, hints[name], f"amalgamation.{name}")
                except ConfigError as exc:
                    raise ConfigError(f"override {text!r}: {exc}") from None
        elif section == "model":
            raise ConfigError(
                f"override {text!r}: amalgamation has no [model] section; the student copies "
                "the teachers' architecture (use amalgamation.student.FIELD=VALUE)"
            )
        else:
            raise ConfigError(
                f"override {text!r}: unknown config section '{section}'; valid sections: "
                "teachers, amalgamation, data, optim, train"
            )
    _merge_teacher_args(data, teacher_args, class_args)
    return AmalgamateConfig.from_dict(data, source="overrides")


_ENGINE = ("data", "optim", "train")


def load_amalgamate_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    teacher_args: Iterable[str] = (),
    class_args: Iterable[str] = (),
) -> AmalgamateConfig:
    """Load an amalgamation TOML file (or the defaults) and apply overrides, ``--teacher`` and
    ``--teacher-classes``."""
    if path is None:
        cfg = AmalgamateConfig()
    else:
        cfg = AmalgamateConfig.from_dict(read_toml_file(path), source=str(path))
    return apply_amalgamate_overrides(cfg, overrides, teacher_args, class_args)


def config_hash(data: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """A short stable hash of a nested config dict, without the dotted keys in ``ignore``."""
    d = copy.deepcopy(dict(data))
    for key in ignore:
        parts = key.split(".")
        node: Any = d
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_config_toml(cfg: AmalgamateConfig, path: str | Path) -> Path:
    """Write ``cfg`` as TOML (rerun it with ``ka-rs amalgamate --config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(cfg.to_dict()))
    return path

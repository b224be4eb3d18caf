"""The demo's configuration: ``[demo]`` settings, a ``[teacher]`` and a ``[student]`` config.

:data:`DEMO_DEFAULTS` (mirrored in ``configs/demo.toml``) has three sections:

- ``[demo]``: :class:`DemoSettings` (which split, how many test images, worker processes);
- ``[teacher.*]``: an engine :class:`~ka_rs.engine.config.Config` shared by the teachers (the
  demo fills in ``data.split`` / ``data.teacher`` per teacher);
- ``[student.*]``: an :class:`~ka_rs.engine.amalgamate_config.AmalgamateConfig` without
  teachers (the demo trains its own).

Overrides name their section: ``--set teacher.train.max_steps=800``,
``--set student.amalgamation.student_layout=slots``, ``--set demo.num_eval_images=200``.
``--quick`` applies :data:`QUICK_OVERRIDES` first: tiny budgets for a smoke test, no accuracy bar.
"""

from __future__ import annotations

import copy
import sys
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ka_rs.engine.amalgamate_config import AmalgamateConfig, apply_amalgamate_overrides
from ka_rs.engine.config import (
    Config,
    ConfigError,
    _coerce,
    _section_from_dict,
    apply_overrides,
    config_from_dict,
    parse_override,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 with the tomli backport
    import tomli as tomllib

__all__ = [
    "DEMO_DEFAULTS",
    "QUICK_OVERRIDES",
    "TEACHER_SPLITS",
    "DemoConfig",
    "DemoSettings",
    "apply_demo_overrides",
    "flag_overrides",
    "load_demo_config",
]

#: ``--teachers N`` -> the ``demo.split`` preset it selects.
TEACHER_SPLITS: dict[int, str] = {2: "shapes-halves", 3: "shapes-thirds-overlap"}


@dataclass
class DemoSettings:
    """The ``[demo]`` section.

    Attributes:
        split: split preset naming the teachers and their classes (``shapes-halves``; the
            three-teacher ``shapes-thirds-overlap`` is ``ka-rs demo --teachers 3``).
        eval_split: shapes split used for the reported numbers: ``test`` (never trained on,
            never used for validation during training) or ``val`` (the split to choose
            settings on; the students' periodic validation reads its first images, but no
            checkpoint is selected on them).
        num_eval_images: images of ``eval_split`` evaluated.
        grid_images: test images drawn in ``detections.png``.
        draw_threshold: minimum score of a drawn detection.
        workers: processes for independent trainings (the teachers; ablation variants):
            0 = one per job up to the CPU count, each with CPUs / processes torch threads;
            1 = one after the other in this process.
        student_processes: 1 = train the student in this process (default); n ≥ 2 = in n
            data-parallel processes (DDP over gloo), each with CPUs / n torch threads and
            ``batch_size / n`` images per step, so the global batch stays the same. On the
            2-core machine the 60-query student ran at 46 img/s in 2 processes vs 44 in one
            (labelling its images: 67 vs 58 s): no net gain there, unlike the teachers.
        seeds: student seeds of ``ka-rs demo`` (``--seeds``): 1 keeps the demo at one
            student's time; K > 1 trains K students (``student.train.seed`` first, then
            :data:`~ka_rs.demo.stats.SEED_LIST`) and reports mean ± sd over them.
        ablate_seeds: student seeds per variant of ``ka-rs ablate`` (``--seeds``, default 3):
            the variants differ by less than one seed's run-to-run noise, so the ablation
            reports mean ± sd and paired t-intervals over seeds.
    """

    split: str = "shapes-halves"
    eval_split: str = "test"
    num_eval_images: int = 500
    grid_images: int = 8
    draw_threshold: float = 0.35
    workers: int = 0
    student_processes: int = 1
    seeds: int = 1
    ablate_seeds: int = 3


#: The full demo (``configs/demo.toml`` holds the same values). Budgets are in optimiser steps
#: so that results do not depend on the machine's speed; the learning rate drops ×0.1 for the
#: last ~15% of each run so that the final evaluation is not taken at a noisy constant lr.
#: ``demo.seeds`` (1) and ``demo.ablate_seeds`` (3) are not listed: they take
#: :class:`DemoSettings`' defaults unless a config file or ``--seeds`` sets them.
DEMO_DEFAULTS: dict[str, Any] = {
    "demo": {
        "split": "shapes-halves",
        "eval_split": "test",
        "num_eval_images": 500,
        "grid_images": 8,
        "draw_threshold": 0.35,
        "workers": 0,
        "student_processes": 1,
    },
    "teacher": {
        "model": {"preset": "anchor_tiny"},
        "data": {"source": "shapes", "image_size": 96, "num_val_images": 200},
        "optim": {
            "lr": 1e-3,
            "lr_backbone": 1e-3,
            "lr_drop": [1050],
            "lr_drop_unit": "step",
            "fused": "auto",
        },
        "train": {
            "batch_size": 16,
            "epochs": 1000,
            "max_steps": 1200,
            "eval_every_epochs": 0,
            "eval_every_steps": 400,
            "checkpoint_every_steps": 400,
            "log_every_steps": 25,
            "seed": 42,
            "amp": "auto",
        },
    },
    "student": {
        "amalgamation": {
            "sa": True,
            "ta": True,
            "mode": "label_free",
            "threshold": 0.2,
            "init_from": "teacher_b",
            "student": {"num_queries": 60},
            "student_layout": "compact",
            "cache_teachers": True,
        },
        "data": {"source": "shapes", "num_val_images": 200},
        "optim": {
            "lr": 1e-3,
            "lr_backbone": 1e-3,
            "lr_drop": [1050],
            "lr_drop_unit": "step",
            "fused": "auto",
        },
        "train": {
            "batch_size": 16,
            "epochs": 1000,
            "max_steps": 1200,
            "eval_every_epochs": 0,
            "eval_every_steps": 400,
            "checkpoint_every_steps": 400,
            "log_every_steps": 25,
            "seed": 42,
            "amp": "auto",
        },
    },
}

#: ``--quick``: a smoke run of every stage in well under two minutes (no accuracy bar).
QUICK_OVERRIDES: tuple[str, ...] = (
    "teacher.data.image_size=64",
    "teacher.data.num_train_images=64",
    "teacher.data.num_val_images=8",
    "teacher.train.batch_size=8",
    "teacher.train.max_steps=6",
    "teacher.optim.lr_drop=[5]",
    "teacher.train.eval_every_steps=0",
    "teacher.train.checkpoint_every_steps=0",
    "teacher.train.log_every_steps=2",
    "teacher.model.overrides={hidden_dim = 32, nheads = 2, dim_feedforward = 64, "
    "num_queries = 10, cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 1}",
    "student.data.num_train_images=64",
    "student.data.num_val_images=8",
    "student.train.batch_size=8",
    "student.train.max_steps=6",
    "student.optim.lr_drop=[5]",
    "student.train.eval_every_steps=3",
    "student.train.checkpoint_every_steps=0",
    "student.train.log_every_steps=2",
    "demo.num_eval_images=16",
    "demo.grid_images=4",
)


@dataclass
class DemoConfig:
    """``demo`` settings, the shared ``teacher`` Config and the ``student`` AmalgamateConfig."""

    demo: DemoSettings = field(default_factory=DemoSettings)
    teacher: Config = field(default_factory=Config)
    student: AmalgamateConfig = field(default_factory=AmalgamateConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (``teacher`` / ``student`` hold their own sections)."""
        return _as_dict(asdict(self.demo), self.teacher, self.student)

    def teacher_config(self, name: str, output_dir: str | Path) -> Config:
        """The Config that trains teacher ``name`` of ``demo.split`` into ``output_dir``."""
        cfg = copy.deepcopy(self.teacher)
        cfg.data.split = self.demo.split
        cfg.data.teacher = name
        cfg.data.classes = []
        cfg.train.output_dir = str(output_dir)
        cfg.validate()
        return cfg


def _as_dict(
    settings: dict[str, Any], teacher: Config, student: AmalgamateConfig
) -> dict[str, Any]:
    """The three sections as a plain dict; the student's ``teachers`` are the demo's own."""
    return {
        "demo": settings,
        "teacher": teacher.to_dict(),
        "student": {k: v for k, v in student.to_dict().items() if k != "teachers"},
    }


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _demo_from_dict(data: Mapping[str, Any], source: str) -> DemoConfig:
    """Build and check a DemoConfig from its three sections (``source`` names it in errors)."""
    for name in data:
        if name not in ("demo", "teacher", "student"):
            raise ConfigError(
                f"{source}: unknown demo config section '{name}'; valid: demo, teacher, student"
            )
    settings = _section_from_dict(DemoSettings, data.get("demo", {}), "demo", source)
    teacher = config_from_dict(data.get("teacher", {}), source=f"{source} [teacher]")
    student_data = dict(data.get("student", {}))
    if "teachers" in student_data:
        raise ConfigError(f"{source}: student.teachers: the demo trains its own teachers")
    student = AmalgamateConfig.from_dict(student_data, source=f"{source} [student]")
    cfg = DemoConfig(demo=settings, teacher=teacher, student=student)
    _check(cfg, source)
    return cfg


def _check(cfg: DemoConfig, source: str) -> None:
    """Checks across the sections: the split, ``init_from``, image counts, the evaluation
    split, the seed counts, the data source."""
    from ka_rs.data import get_split
    from ka_rs.demo.stats import SEED_LIST

    settings = cfg.demo
    try:
        split = get_split(settings.split)
    except ValueError as exc:
        raise ConfigError(f"{source}: demo.split: {exc}") from None
    if len(split) < 2:
        raise ConfigError(f"{source}: demo.split: {settings.split!r} names fewer than 2 teachers")
    init = cfg.student.amalgamation.init_from
    if init and init not in split:
        raise ConfigError(
            f"{source}: student.amalgamation.init_from: {init!r} is not a teacher of "
            f"{settings.split!r} ({', '.join(split)})"
        )
    if settings.num_eval_images < 1 or settings.grid_images < 0:
        raise ConfigError(f"{source}: demo.num_eval_images must be >= 1, grid_images >= 0")
    if settings.eval_split not in ("val", "test"):
        raise ConfigError(
            f"{source}: demo.eval_split: expected 'val' (to choose settings on) or 'test', "
            f"got {settings.eval_split!r}"
        )
    for key in ("seeds", "ablate_seeds"):
        if not 1 <= getattr(settings, key) <= len(SEED_LIST):
            raise ConfigError(
                f"{source}: demo.{key}: expected 1 to {len(SEED_LIST)} student seeds, "
                f"got {getattr(settings, key)}"
            )
    if cfg.teacher.data.source != "shapes" or cfg.student.data.source != "shapes":
        raise ConfigError(f"{source}: the demo runs on the embedded shapes data (data.source)")


def load_demo_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), *, quick: bool = False
) -> DemoConfig:
    """The demo config: :data:`DEMO_DEFAULTS`, then the TOML file at ``path`` (deep-merged),
    then :data:`QUICK_OVERRIDES` if ``quick``, then ``overrides``
    (``demo.KEY=V``, ``teacher.SECTION.KEY=V``, ``student.SECTION.KEY=V``)."""
    data = copy.deepcopy(DEMO_DEFAULTS)
    source = "demo defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            with p.open("rb") as f:
                data = _deep_merge(data, tomllib.load(f))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
        source = str(p)
    cfg = _demo_from_dict(data, source)
    ovs = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    return apply_demo_overrides(cfg, ovs) if ovs else cfg


def flag_overrides(
    overrides: Iterable[str],
    *,
    teachers: int | None = None,
    seeds: int | None = None,
    eval_split: str | None = None,
    ablate: bool = False,
) -> list[str]:
    """``overrides`` plus those of the command-line flags ``--teachers N`` (``demo.split``, see
    :data:`TEACHER_SPLITS`), ``--seeds K`` (``demo.seeds``, or ``demo.ablate_seeds`` for
    ``ka-rs ablate``) and ``--eval-split`` (``demo.eval_split``); a flag wins over a ``--set``
    of the same key.

    Raises:
        ConfigError: ``--teachers`` with a number that has no split, or together with a
            ``--set demo.split=...`` (the two would disagree).
    """
    out = list(overrides)
    if teachers is not None:
        if teachers not in TEACHER_SPLITS:
            raise ConfigError(
                f"--teachers: {teachers} has no shapes split; choose "
                + " or ".join(f"{n} ({s})" for n, s in TEACHER_SPLITS.items())
            )
        if any(o.partition("=")[0].strip() == "demo.split" for o in out):
            raise ConfigError("--teachers and --set demo.split both choose the split; give one")
        out.append(f"demo.split={TEACHER_SPLITS[teachers]}")
    if seeds is not None:
        out.append(f"demo.{'ablate_seeds' if ablate else 'seeds'}={seeds}")
    if eval_split is not None:
        out.append(f"demo.eval_split={eval_split}")
    return out


def apply_demo_overrides(cfg: DemoConfig, overrides: Iterable[str]) -> DemoConfig:
    """Apply ``demo.*``, ``teacher.*`` and ``student.*`` overrides (see the module docstring)."""
    settings = asdict(cfg.demo)
    teacher_ov: list[str] = []
    student_ov: list[str] = []
    for text in overrides:
        key, sep, value = text.partition("=")
        head, _, rest = key.strip().partition(".")
        if not sep or not rest:
            raise ConfigError(
                f"override {text!r}: expected demo.KEY=VALUE, teacher.SECTION.KEY=VALUE or "
                "student.SECTION.KEY=VALUE"
            )
        if head == "teacher":
            teacher_ov.append(f"{rest}={value}")
        elif head == "student":
            student_ov.append(f"{rest}={value}")
        elif head == "demo":
            _set_setting(settings, text)
        else:
            raise ConfigError(
                f"override {text!r}: unknown section '{head}'; the demo config has demo, "
                "teacher.* and student.*"
            )
    try:
        teacher = apply_overrides(cfg.teacher, teacher_ov) if teacher_ov else cfg.teacher
        student = apply_amalgamate_overrides(cfg.student, student_ov)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in the demo's teacher./student. overrides)") from None
    return _demo_from_dict(_as_dict(settings, teacher, student), "overrides")


def _set_setting(settings: dict[str, Any], text: str) -> None:
    """Apply one ``demo.KEY=VALUE`` override to the ``[demo]`` dict, typed like
    :class:`DemoSettings`."""
    hints = typing.get_type_hints(DemoSettings)
    path, parsed = parse_override(text)
    if len(path) != 2 or path[1] not in hints:
        key = text.partition("=")[0].strip()
        raise ConfigError(
            f"override {text!r}: unknown config key '{key}'; valid keys in [demo]: "
            + ", ".join(hints)
        )
    try:
        settings[path[1]] = _coerce(parsed, hints[path[1]], f"demo.{path[1]}")
    except ConfigError as exc:
        raise ConfigError(f"override {text!r}: {exc}") from None

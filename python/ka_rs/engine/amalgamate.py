"""Amalgamation engine: train one student from N ≥ 2 frozen DETR teachers (DESIGN §1.2–1.4).

:func:`amalgamate` loads the teachers' checkpoints (each carries its model config and class
names), builds the union :class:`~ka_rs.labels.LabelSpace` and the N-slot
:class:`~ka_rs.models.AmalgamationStudent`, and trains the student with the engine's
:class:`~ka_rs.engine.train.TrainLoop` (same optimiser, schedule, budgets, progress, JSON-lines
metrics, atomic checkpoints, ``--resume`` and torchrun/DDP behaviour as teacher training).
One training step::

    images --frozen teachers (eval, no_grad)--> sequences + predictions
           --build_pseudo_targets (ONE native call, all teachers, whole batch)--> pseudo-targets
    images --student--> sequences + predictions (final + auxiliary decoder layers)
    L = w_gt·L_DETR(GT) + w_amg·(sa_weight·L_SA + ta_weight·L_TA)

* ``L_TA``: :class:`~ka_rs.losses.TaskAmalgamationLoss` (all decoder layers matched to the
  pseudo-targets in one ``match_layers`` call).
* ``L_SA``: :class:`~ka_rs.losses.SequenceAmalgamationLoss`, student slot k vs teacher k at
  every hook point. With ``aggregation = true`` the student has ONE slot instead and imitates
  :class:`~ka_rs.losses.AggregationHintLoss`'s learnt fusion of the teachers (the prior-KA
  baseline); the fusion's projections are in the optimiser and in the checkpoint.
* Modes: ``label_free`` (w_gt = 0, w_amg = 1; the default) and ``label_assisted`` (w_gt =
  ``gt_weight``, w_amg = 1 − e/E linear decay, e the 0-based epoch, E the run's epochs — the
  number of epochs ``train.max_steps`` covers when that is the tighter bound).

Config (TOML; every key optional; ``--set section.key=value`` overrides)::

    [teachers]           # name = checkpoint, in slot order (``--teacher NAME=CKPT`` adds one)
    teacher_a = "runs/teacher_a/checkpoint.pt"
    teacher_b = "runs/teacher_b/checkpoint.pt"
    [amalgamation]       # AmalgamationConfig: losses, pseudo-target and student options
    [data]  [optim]  [train]   # as for teacher training (ka_rs.engine.config)

``data`` names the (unlabelled in label-free mode) training images and the validation data;
the student's classes are always the teachers' union. ``data.image_size = 0`` takes the first
teacher's training image size.

Run folder (``train.output_dir``): ``config.toml``, ``metrics.jsonl``, ``checkpoint.pt`` (kind
``"student"``; :func:`load_student` / ``ka-rs evaluate`` rebuild it), ``eval.json`` (union and
per-teacher-subset AP) and ``curves.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
)

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "AmalgamateConfig",
    "TeacherCache",
    "AmalgamationConfig",
    "AmalgamationResult",
    "LoadedTeacher",
    "amalgamate",
    "init_student_from_teacher",
    "load_amalgamate_config",
    "load_student",
    "load_teachers",
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
    Pseudo-targets (DESIGN §1.3): ``threshold`` (0.1), ``top_n`` (50), ``fill_logit`` (−5),
        ``nms_iou`` (0.7; a negative value turns the cross-teacher NMS off).
    TA loss: ``temperature`` (4), ``eos_coef`` (0.1), ``weight_class`` / ``weight_bbox`` /
        ``weight_giou`` (1 / 5 / 2).
    Student:
        cross_slot_attention: full encoder attention across slots (default False: each slot
            attends to itself only, the paper's "no cross").
        init_from: ``""`` (random init, the paper) or a teacher's name: start the student from
            that teacher's weights (an extension beyond the paper, see
            :func:`init_student_from_teacher`). All teachers must share its architecture.
        student: :class:`~ka_rs.models.DetrConfig` field overrides for the student
            (e.g. ``{num_queries = 30}``); by default it copies the first teacher's.
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
    init_from: str = ""
    student: dict[str, Any] = field(default_factory=dict)
    cache_teachers: bool = False


def _default_train() -> TrainConfig:
    return TrainConfig(output_dir="runs/student")


@dataclass
class AmalgamateConfig:
    """A whole amalgamation run: ``teachers``, ``amalgamation``, ``data``, ``optim``, ``train``."""

    teachers: dict[str, str] = field(default_factory=dict)
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
            raise ConfigError(f"{source}: [teachers] must be a table of name = checkpoint path")
        for name, path in teachers.items():
            if not isinstance(path, str) or not path:
                raise ConfigError(
                    f"{source}: teachers.{name}: expected a checkpoint path string, got {path!r}"
                )
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
            teachers={str(k): str(v) for k, v in teachers.items()},
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
                "(give --teacher NAME=CKPT once per teacher or a [teachers] table)"
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
        if a.init_from and self.teachers and a.init_from not in self.teachers:
            raise ConfigError(
                f"amalgamation.init_from: {a.init_from!r} is not a teacher; "
                f"teachers: {sorted(self.teachers)}"
            )
        self.base_config().validate()


def _merge_teacher_args(data: dict[str, Any], teacher_args: Iterable[str]) -> None:
    for spec in teacher_args:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--teacher {spec!r}: expected NAME=CHECKPOINT")
        teachers = data.setdefault("teachers", {})
        teachers[name] = path


def apply_amalgamate_overrides(
    cfg: AmalgamateConfig, overrides: Iterable[str], teacher_args: Iterable[str] = ()
) -> AmalgamateConfig:
    """Return a copy of ``cfg`` with ``--set`` overrides and ``--teacher NAME=CKPT`` applied.

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
                raise ConfigError(f"override {text!r}: expected teachers.NAME=CHECKPOINT")
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
    _merge_teacher_args(data, teacher_args)
    return AmalgamateConfig.from_dict(data, source="overrides")


_ENGINE = ("data", "optim", "train")


def load_amalgamate_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    teacher_args: Iterable[str] = (),
) -> AmalgamateConfig:
    """Load an amalgamation TOML file (or the defaults) and apply overrides / ``--teacher``."""
    if path is None:
        cfg = AmalgamateConfig()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            with p.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
        cfg = AmalgamateConfig.from_dict(data, source=str(p))
    return apply_amalgamate_overrides(cfg, overrides, teacher_args)


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


# ----------------------------------------------------------------------------------------------
# teachers and the student


@dataclass
class LoadedTeacher:
    """A frozen teacher: name, model (eval mode, ``requires_grad = False``), classes, config."""

    name: str
    model: nn.Module
    class_names: list[str]
    config: dict[str, Any]
    path: str

    @property
    def kind(self) -> str:
        """``"softmax"`` or ``"sigmoid"`` (the teacher's class head)."""
        return str(self.model.config.class_head)


def load_teachers(
    teachers: Mapping[str, str | Path], device: torch.device | str = "cpu"
) -> list[LoadedTeacher]:
    """Load teacher checkpoints in order, frozen and in eval mode.

    Raises:
        ValueError: a file is missing / not a ka_rs detector checkpoint (naming it) or has no
            class names.
    """
    from ka_rs.engine.checkpoint import CheckpointError, load_detector

    out = []
    for name, path in teachers.items():
        try:
            det = load_detector(path, device=device)
        except CheckpointError as exc:
            raise CheckpointError(f"teachers.{name}: {exc}") from None
        if det.checkpoint.get("student"):
            raise CheckpointError(
                f"teachers.{name}: {str(path)!r} is a student checkpoint; amalgamating "
                "students is possible only through their DETR export (not supported yet)"
            )
        if not det.class_names:
            raise CheckpointError(f"teachers.{name}: checkpoint {str(path)!r} has no class names")
        det.model.eval()
        for p in det.model.parameters():
            p.requires_grad_(False)
        out.append(LoadedTeacher(name, det.model, det.class_names, det.config, str(path)))
    return out


def _architecture(cfg: Any) -> dict[str, Any]:
    """The config fields that must agree for ``init_from`` to copy a teacher's weights.

    The class count and the dense auxiliary head (a ground-truth training aid the student
    usually lacks; see :func:`build_student`) may differ.
    """
    d = cfg.to_dict()
    d.pop("num_classes", None)
    d.pop("dense_aux", None)
    return d


@torch.no_grad()
def init_student_from_teacher(
    student: nn.Module, teacher: LoadedTeacher, label_space: Any, teachers: Sequence[LoadedTeacher]
) -> list[str]:
    """Initialise ``student`` from ``teacher``'s weights (an extension beyond the paper).

    Copies every parameter of the same name and shape (backbone, encoder, decoder, box head,
    queries/anchors). The N·d-wide input projection gets the teacher's d-wide projection in
    EVERY slot, so at step 0 all slots carry the teacher's sequence; with the block-diagonal
    mask (and also with cross-slot attention, since the keys are duplicated) the student then
    reproduces that teacher's predictions exactly. Class-head rows: each union class takes the
    row of the first teacher that knows it (the other teachers' rows are a head start for their
    classes, over features that SA/TA must then teach the student); a softmax head's
    no-object row comes from ``teacher``.

    Returns the names of the student parameters left at their random initialisation.
    """
    s_state = student.state_dict()
    t_state = teacher.model.state_dict()
    loaded: set[str] = set()
    for key, value in t_state.items():
        if key in s_state and s_state[key].shape == value.shape:
            s_state[key].copy_(value)
            loaded.add(key)
    n = int(getattr(student, "num_slots", 1))
    for key in ("input_proj.weight", "input_proj.bias"):
        if key in t_state and key in s_state and key not in loaded:
            tv = t_state[key]
            if s_state[key].shape[0] == n * tv.shape[0]:
                s_state[key].copy_(torch.cat([tv] * n, dim=0))
                loaded.add(key)
    # class heads (the decoder's, and a dense encoder head if the model has one):
    # union row c <- row of the first teacher that knows class c
    by_name = {t.name: t for t in teachers}
    t_states = {t.name: t.model.state_dict() for t in teachers}
    for head in ("class_embed", "enc_class_embed"):
        head_w, head_b = s_state.get(f"{head}.weight"), s_state.get(f"{head}.bias")
        if head_w is None or head_b is None:
            continue
        for c, cname in enumerate(label_space.names):
            src = by_name[label_space.teachers_of(cname)[0]]
            local = src.class_names.index(cname)
            sw = t_states[src.name]
            if f"{head}.weight" in sw and sw[f"{head}.weight"].shape[1] == head_w.shape[1]:
                head_w[c].copy_(sw[f"{head}.weight"][local])
                head_b[c].copy_(sw[f"{head}.bias"][local])
        if head_w.shape[0] == label_space.num_classes + 1:  # softmax: no-object row
            tw = t_state.get(f"{head}.weight")
            if tw is not None and tw.shape[0] == len(teacher.class_names) + 1:
                head_w[-1].copy_(tw[-1])
                head_b[-1].copy_(t_state[f"{head}.bias"][-1])
        loaded.update({f"{head}.weight", f"{head}.bias"})
    student.load_state_dict(s_state)
    return sorted(k for k in s_state if k not in loaded)


def _student_meta(teachers: Sequence[LoadedTeacher], num_slots: int, cross: bool) -> dict[str, Any]:
    return {
        "num_slots": int(num_slots),
        "cross_slot_attention": bool(cross),
        "teachers": [t.name for t in teachers],
        "teacher_classes": {t.name: list(t.class_names) for t in teachers},
        "teacher_checkpoints": {t.name: t.path for t in teachers},
    }


def load_student(path: str | Path, device: torch.device | str = "cpu") -> Any:
    """Rebuild a student checkpoint (:class:`~ka_rs.engine.checkpoint.LoadedDetector`).

    ``.model`` is the :class:`~ka_rs.models.AmalgamationStudent` (eval mode), ``.class_names``
    the union, ``.checkpoint["student"]`` the slot count, teachers and their classes.
    """
    from ka_rs.engine.checkpoint import CheckpointError, load_detector

    det = load_detector(path, device=device)
    if not det.checkpoint.get("student"):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a student checkpoint")
    return det


def _teacher_subsets(teachers: Sequence[LoadedTeacher]) -> dict[str, list[str]]:
    return {t.name: list(t.class_names) for t in teachers}


def _average_grads_across_ranks(params: Iterable[nn.Parameter]) -> None:
    """Average these parameters' gradients over ranks in backward (they live outside DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    for p in params:
        p.register_hook(hook)


class _ListDataset(torch.utils.data.Dataset):
    """In-memory ``(image, target)`` items (the teacher cache's fixed training images)."""

    def __init__(self, items: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.items[index]


class TeacherCache:
    """The teachers' outputs on every training image, computed once (``cache_teachers``).

    Holds the (deterministically transformed) images and targets as :attr:`dataset` and, per
    teacher, ``pred_logits`` (N, Q_k, K_k), ``pred_boxes`` (N, Q_k, 4) and, if requested, the
    SA hook-point sequences (N, S, d) (float16), indexed by image id. All images must have one
    size (the sequences of a padded batch would depend on the batch).
    """

    def __init__(
        self,
        items: list[tuple[torch.Tensor, dict[str, Any]]],
        outputs: list[dict[str, Any]],
        positions: dict[int, int],
        seconds: float,
    ) -> None:
        self.dataset = _ListDataset(items)
        self._outputs = outputs
        self._positions = positions
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached images and outputs."""
        n = sum(int(img.numel() * img.element_size()) for img, _ in self.dataset.items)
        for out in self._outputs:
            for v in (out["pred_logits"], out["pred_boxes"], *out["sequences"]):
                n += int(v.numel() * v.element_size())
        return n

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teachers: Sequence[LoadedTeacher],
        dataset: Any,
        *,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        sequences: bool = True,
        progress: bool = False,
    ) -> TeacherCache:
        """Render every item of ``dataset`` once and run every teacher on it."""
        import time

        from ka_rs.data import collate_fn
        from ka_rs.engine.logging import make_progress

        t0 = time.perf_counter()
        items = [dataset[i] for i in range(len(dataset))]
        sizes = {tuple(img.shape[-2:]) for img, _ in items}
        if len(sizes) > 1:
            raise ConfigError(
                f"amalgamation.cache_teachers: needs training images of one size, got "
                f"{len(sizes)} sizes (e.g. {sorted(sizes)[:3]}); turn the cache off"
            )
        positions: dict[int, int] = {}
        for i, (_, tgt) in enumerate(items):
            iid = int(tgt["image_id"])
            if iid in positions:
                raise ValueError(f"dataset: image id {iid} appears twice; cannot cache by id")
            positions[iid] = i
        chunks: list[list[dict[str, Any]]] = [[] for _ in teachers]
        with make_progress(enabled=progress, transient=True) as bar:
            task = bar.add_task("labelling with the teachers", total=len(items))
            for start in range(0, len(items), batch_size):
                images, mask, _ = collate_fn(items[start : start + batch_size])
                images, mask = images.to(device), mask.to(device)
                for k, t in enumerate(teachers):
                    out = t.model(images, mask)
                    chunks[k].append(
                        {
                            "pred_logits": out.pred_logits.float().cpu(),
                            "pred_boxes": out.pred_boxes.float().cpu(),
                            "sequences": [x.half().cpu() for x in out.sequences]
                            if sequences
                            else [],
                        }
                    )
                bar.advance(task, images.shape[0])
        outputs = []
        for per_teacher in chunks:
            n_points = len(per_teacher[0]["sequences"])
            outputs.append(
                {
                    "pred_logits": torch.cat([c["pred_logits"] for c in per_teacher]),
                    "pred_boxes": torch.cat([c["pred_boxes"] for c in per_teacher]),
                    "sequences": [
                        torch.cat([c["sequences"][p] for c in per_teacher]) for p in range(n_points)
                    ],
                }
            )
        return cls(items, outputs, positions, time.perf_counter() - t0)

    def outputs(self, targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[Any]:
        """The teachers' cached outputs for a batch (DetrOutput-like, in teacher order)."""
        from ka_rs.models import DetrOutput

        idx = torch.tensor([self._positions[int(t["image_id"])] for t in targets])
        result = []
        for out in self._outputs:
            seqs = [x[idx].to(device=device, dtype=torch.float32) for x in out["sequences"]]
            result.append(
                DetrOutput(
                    pred_logits=out["pred_logits"][idx].to(device),
                    pred_boxes=out["pred_boxes"][idx].to(device),
                    sequences=seqs,
                    padding_mask=(
                        torch.zeros(seqs[0].shape[:2], dtype=torch.bool, device=device)
                        if seqs
                        else None
                    ),
                )
            )
        return result


@dataclass
class AmalgamationResult:
    """What :func:`amalgamate` returns (on every rank)."""

    output_dir: Path
    checkpoint: Path | None
    final_eval: dict[str, float]
    eval_result: Any
    stopped_by: str
    step: int
    train_minutes: float
    class_names: list[str]
    teachers: list[str]
    subsets: dict[str, list[str]]
    model: nn.Module | None = None
    hint: nn.Module | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for the CLI)."""
        return {
            "output_dir": str(self.output_dir),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "stopped_by": self.stopped_by,
            "step": self.step,
            "train_minutes": round(self.train_minutes, 3),
            "teachers": self.teachers,
            **self.final_eval,
        }


def _effective_epochs(train: TrainConfig, batches_per_epoch: int) -> int:
    epochs = train.epochs
    if train.max_steps:
        epochs = min(epochs, max(1, math.ceil(train.max_steps / max(batches_per_epoch, 1))))
    return max(1, epochs)


def amalgamate(
    config: AmalgamateConfig,
    *,
    resume: str | Path | bool | None = None,
    info: Any = None,
    teachers: Sequence[LoadedTeacher] | None = None,
    keep_model: bool = False,
) -> AmalgamationResult:
    """Train a student from the teachers as ``config`` says (see the module docstring).

    Args:
        config: the run configuration (``config.teachers`` needs ≥ 2 entries unless
            ``teachers`` is given).
        resume: a checkpoint path, or True for ``<output_dir>/checkpoint.pt``: continue that
            run exactly where it stopped.
        info: an existing :class:`~ka_rs.engine.distributed.DistInfo`; by default torchrun's
            environment is read (and the process group torn down at the end).
        teachers: already loaded teachers (skips loading ``config.teachers``).
        keep_model: put the trained student (unwrapped, eval mode) and, with
            ``aggregation``, the trained :class:`~ka_rs.losses.AggregationHintLoss` in the
            result.

    Returns:
        :class:`AmalgamationResult`; ``final_eval`` holds union ``AP``/``AP50``/``AP75`` and
        ``"<teacher>/AP50"`` etc. per teacher subset.
    """
    from ka_rs.data import ClassSubset
    from ka_rs.engine.distributed import cleanup_distributed, init_distributed, unwrap_model
    from ka_rs.engine.evaluate import evaluate, make_eval_loader
    from ka_rs.engine.logging import get_logger, setup_logging
    from ka_rs.engine.train import TrainLoop, _preset_hints, build_datasets, build_optimizer
    from ka_rs.labels import LabelSpace, build_pseudo_targets
    from ka_rs.losses import (
        AggregationHintLoss,
        SequenceAmalgamationLoss,
        TaskAmalgamationLoss,
        build_criterion,
    )
    from ka_rs.models import build_student

    log = get_logger("ka_rs.amalgamate")
    if teachers is None:
        config.validate()
    elif len(teachers) < 2:
        raise ValueError(f"teachers: amalgamation needs at least 2 teachers, got {len(teachers)}")
    config = copy.deepcopy(config)  # resolved values (image size) are recorded in the run
    amg = config.amalgamation
    own_dist = info is None
    info = info or init_distributed(config.train.device)
    setup_logging(info.rank)
    try:
        torch.manual_seed(config.train.seed)
        if teachers is None:
            teachers = load_teachers(config.teachers, device=info.device)
        else:
            for t in teachers:
                t.model.to(info.device).eval()
                for p in t.model.parameters():
                    p.requires_grad_(False)
        names = [t.name for t in teachers]
        if amg.init_from and amg.init_from not in names:
            raise ConfigError(f"amalgamation.init_from: {amg.init_from!r} is not one of {names}")
        space = LabelSpace.from_teachers({t.name: t.class_names for t in teachers})
        union = list(space.names)
        subsets = _teacher_subsets(teachers)

        # data: the student's images; classes = the union (labels only used label-assisted)
        data = config.data
        if not data.image_size:
            tdata = (teachers[0].config or {}).get("data", {})
            preset = (teachers[0].config or {}).get("model", {}).get("preset", "")
            data.image_size = int(tdata.get("image_size") or 0) or int(
                _preset_hints(preset).get("image_size", 128)
            )
        if data.split or data.teacher or data.classes:
            raise ConfigError(
                "data.split / data.teacher / data.classes: the student's classes are the "
                "teachers' union; leave these empty"
            )
        if amg.cache_teachers:  # fixed images: the cached teacher outputs must stay valid
            data.flip, data.color_jitter, data.scales = False, 0.0, [data.image_size]
        train_ds, val_ds, all_classes = build_datasets(data)
        missing = [c for c in union if c not in all_classes]
        if missing:
            raise ValueError(
                f"data: the teachers' classes {missing} are not classes of the dataset "
                f"({', '.join(all_classes)}); evaluation needs them"
            )
        if union != all_classes:
            train_ds = ClassSubset(train_ds, union)
            val_ds = ClassSubset(val_ds, union)

        # the student
        num_slots = 1 if amg.aggregation else len(teachers)
        t_cfgs = [t.model.config for t in teachers]
        student = build_student(
            t_cfgs,
            space.num_classes,
            amg.cross_slot_attention,
            num_slots=num_slots,
            **amg.student,
        )
        if amg.init_from:
            src = teachers[names.index(amg.init_from)]
            if _architecture(src.model.config) != {
                **_architecture(student.config),
                "num_queries": src.model.config.num_queries,
            }:
                raise ConfigError(
                    f"amalgamation.init_from: teacher {src.name!r}'s architecture differs "
                    "from the student's; cannot copy its weights"
                )
            fresh = init_student_from_teacher(student, src, space, teachers)
            if info.is_main:
                log.info("student initialised from %s (random: %s)", src.name, fresh or "none")
        student.to(info.device)
        head = student.config.class_head
        kinds = [t.kind for t in teachers]

        ta_loss = TaskAmalgamationLoss(
            space.num_classes,
            temperature=amg.temperature,
            eos_coef=amg.eos_coef,
            weight_class=amg.weight_class,
            weight_bbox=amg.weight_bbox,
            weight_giou=amg.weight_giou,
            class_head=head,
            teacher_kinds=kinds if len(set([*kinds, head])) > 1 else None,
        )
        sa_loss = SequenceAmalgamationLoss()
        hint_loss: AggregationHintLoss | None = None
        optimizer = build_optimizer(student, config.optim)
        if amg.aggregation:
            hint_loss = AggregationHintLoss(
                len(teachers), student.config.hidden_dim, 1 + student.config.enc_layers
            ).to(info.device)
            optimizer.add_param_group(
                {"params": list(hint_loss.parameters()), "lr": config.optim.lr, "name": "hint"}
            )
            _average_grads_across_ranks(hint_loss.parameters())
        criterion = build_criterion(student.config).to(info.device)
        nms_iou = amg.nms_iou if amg.nms_iou >= 0 else None
        loop_ref: dict[str, Any] = {}
        cache: TeacherCache | None = None
        if amg.cache_teachers:
            cache = TeacherCache.build(
                teachers,
                train_ds,
                batch_size=config.train.eval_batch_size or 2 * config.train.batch_size,
                device=info.device,
                sequences=amg.sa or amg.aggregation,
                progress=config.train.progress and info.is_main,
            )
            train_ds = cache.dataset
            if info.is_main:
                log.info(
                    "teacher cache: %d images labelled by %d teachers in %.1f s (%.0f MiB)",
                    len(cache),
                    len(teachers),
                    cache.seconds,
                    cache.nbytes / 2**20,
                )

        def loss_fn(
            net: nn.Module, images: torch.Tensor, mask: torch.Tensor, targets: list[dict]
        ) -> dict[str, Any]:
            loop = loop_ref["loop"]
            w_gt, w_amg = 0.0, 1.0
            if amg.mode == "label_assisted":
                w_gt = amg.gt_weight
                w_amg = max(0.0, 1.0 - loop.state.epoch / loop_ref["epochs"])
            if cache is not None:
                t_outs = cache.outputs(targets, images.device)
            else:
                with torch.no_grad():
                    t_outs = [t.model(images, mask) for t in teachers]
            out = net(images, mask)
            comps: dict[str, Any] = {}
            total = out.pred_logits.new_zeros(())
            if amg.ta:
                pseudo = build_pseudo_targets(
                    space,
                    t_outs,
                    kinds=kinds,
                    threshold=amg.threshold,
                    top_n=amg.top_n,
                    fill_logit=amg.fill_logit,
                    nms_iou=nms_iou,
                )
                ta = ta_loss(out, pseudo)
                total = total + w_amg * amg.ta_weight * ta["loss"]
                comps["loss_ta"] = ta["loss"].detach()
                for k in ("loss_class", "loss_bbox", "loss_giou"):
                    comps[f"loss_ta_{k[5:]}"] = ta[k]
                comps["pseudo_per_image"] = sum(len(p["labels"]) for p in pseudo) / len(pseudo)
            if amg.sa:
                sa = sa_loss(out, t_outs)
                total = total + w_amg * amg.sa_weight * sa["loss"]
                comps["loss_sa"] = sa["loss"].detach()
            if hint_loss is not None:
                hint = hint_loss(out, t_outs)
                total = total + w_amg * amg.sa_weight * hint["loss"]
                comps["loss_hint"] = hint["loss"].detach()
            if w_gt > 0:
                gt = criterion(out, targets)
                total = total + w_gt * gt["loss"]
                comps["loss_gt"] = gt["loss"].detach()
            comps["w_amg"] = w_amg
            comps["loss"] = total
            return comps

        eval_bs = config.train.eval_batch_size or 2 * config.train.batch_size
        val_loader = make_eval_loader(val_ds, eval_bs, config.train.num_workers, info)
        val_loader.generator = torch.Generator().manual_seed(config.train.seed)
        last: dict[str, Any] = {}

        def evaluate_fn(loop: TrainLoop) -> dict[str, float]:
            res = evaluate(loop.model, val_loader, union, subsets, device=info.device)
            last["result"] = res
            return res.metrics

        def extra() -> dict[str, Any]:
            meta: dict[str, Any] = {
                "student": _student_meta(teachers, num_slots, amg.cross_slot_attention)
            }
            if hint_loss is not None:
                meta["hint"] = {k: v.detach().cpu() for k, v in hint_loss.state_dict().items()}
            return meta

        loop = TrainLoop(
            student,
            train_ds,
            loss_fn,
            optim=config.optim,
            train=config.train,
            class_names=union,
            config_dict=config.to_dict(),
            evaluate_fn=evaluate_fn,
            info=info,
            kind=STUDENT_KIND,
            optimizer=optimizer,
            extra_checkpoint=extra,
            find_unused_parameters=not amg.ta,
        )
        loop_ref["loop"] = loop
        loop_ref["epochs"] = _effective_epochs(config.train, loop.batches_per_epoch)
        if resume:
            path = loop.checkpoint_path if resume is True else Path(resume)
            loop.resume(path)
            if hint_loss is not None:
                from ka_rs.engine.checkpoint import load_checkpoint

                ckpt = load_checkpoint(path, map_location=info.device)
                if "hint" in ckpt:
                    hint_loss.load_state_dict(ckpt["hint"])
        if info.is_main:
            log.info(
                "amalgamating %d teachers (%s) into a %d-slot student over %d classes; "
                "losses: %s; %s",
                len(teachers),
                ", ".join(f"{t.name}: {len(t.class_names)} cls" for t in teachers),
                num_slots,
                space.num_classes,
                "+".join(
                    n
                    for n, on in (
                        ("SA", amg.sa),
                        ("aggregation", amg.aggregation),
                        ("TA", amg.ta),
                        ("GT", amg.mode == "label_assisted"),
                    )
                    if on
                ),
                amg.mode,
            )
        result = loop.fit()
        if info.is_main and "result" in last:
            (loop.output_dir / "eval.json").write_text(last["result"].to_json())
        net = unwrap_model(loop.model)
        net.eval()
        return AmalgamationResult(
            output_dir=loop.output_dir,
            checkpoint=result.checkpoint,
            final_eval=dict(result.final_eval),
            eval_result=last.get("result"),
            stopped_by=result.stopped_by,
            step=result.state.step,
            train_minutes=result.state.train_minutes,
            class_names=union,
            teachers=names,
            subsets=subsets,
            model=net if keep_model else None,
            hint=hint_loss if keep_model else None,
        )
    finally:
        if own_dist:
            cleanup_distributed()


def write_config_toml(cfg: AmalgamateConfig, path: str | Path) -> Path:
    """Write ``cfg`` as TOML (rerun it with ``ka-rs amalgamate --config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(cfg.to_dict()))
    return path

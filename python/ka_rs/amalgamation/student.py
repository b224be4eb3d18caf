"""The student of an amalgamation run, built from its teachers.

Which teachers SA covers: a teacher takes part in sequence-level amalgamation when it is a ka_rs
DETR (it yields encoder sequences) whose sequences line up with the student's slots — same
width, same number of encoder layers, same output stride. Every other teacher is TA-only (its
predictions teach the student, its encoder does not). The student gets one token slot per SA
teacher (one slot when none, or for the aggregation baseline).

``student_layout = "compact"`` (an extension) keeps the encoder at one teacher's token count:
the N slots are merged per position before the encoder and SA reaches each teacher through a
per-teacher linear view (:class:`~ka_rs.models.student.CompactAmalgamationStudent`).

Its architecture comes from a teacher (``init_from``, else the first teacher with a ka_rs
architecture) or, when no teacher describes one (e.g. only Hugging Face Deformable-DETR
teachers), from ``student = {preset = "...", ...}`` in the config. See docs/method.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ka_rs.labels import LabelSpace
from ka_rs.models.detr import DetrConfig
from ka_rs.models.presets import PRESETS, preset_config
from ka_rs.models.student import STUDENT_LAYOUTS, AmalgamationStudent, build_student
from ka_rs.models.student import _stride as slot_stride
from ka_rs.teachers.base import Teacher

__all__ = [
    "build_amalgamation_student",
    "init_student_from_teacher",
    "label_space_of",
    "sa_teacher_indices",
    "student_base_config",
]


def label_space_of(teachers: Sequence[Teacher]) -> LabelSpace:
    """The union label space of ``teachers`` (in order; non-class slots left out)."""
    names = [t.name for t in teachers]
    if any(not n for n in names):
        raise ValueError("teachers: every teacher needs a name (Teacher.name)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"teachers: teacher name(s) {dup} appear more than once")
    return LabelSpace.from_teachers({t.name: list(t.class_names) for t in teachers})


def _sequences_match(a: DetrConfig, b: DetrConfig) -> bool:
    return (
        a.hidden_dim == b.hidden_dim
        and a.enc_layers == b.enc_layers
        and slot_stride(a) == slot_stride(b)
    )


def sa_teacher_indices(teachers: Sequence[Teacher], student_config: DetrConfig) -> list[int]:
    """Indices of the teachers whose encoder sequences line up with ``student_config``."""
    return [
        k
        for k, t in enumerate(teachers)
        if t.detr_config is not None and _sequences_match(t.detr_config, student_config)
    ]


def student_base_config(
    teachers: Sequence[Teacher], init_from: str = "", overrides: Mapping[str, Any] | None = None
) -> DetrConfig:
    """The architecture the student copies (class count and query count not yet set).

    ``init_from`` names a teacher (which must be a ka_rs DETR); otherwise ``overrides["preset"]``
    (a preset name of :data:`ka_rs.models.PRESETS`, with the other overrides applied); otherwise
    the first teacher with a ka_rs architecture.

    Raises:
        ValueError: ``init_from`` is unknown or a TA-only teacher; no teacher has an
            architecture and no ``preset`` is given.
    """
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", "")
    if init_from:
        match = [t for t in teachers if t.name == init_from]
        if not match:
            raise ValueError(
                f"amalgamation.init_from: {init_from!r} is not a teacher; teachers: "
                f"{[t.name for t in teachers]}"
            )
        if match[0].detr_config is None:
            raise ValueError(
                f"amalgamation.init_from: teacher {init_from!r} ({match[0].source}) is not a "
                "ka_rs DETR, so its weights cannot initialise the student; leave init_from "
                "empty"
            )
        return match[0].detr_config
    if preset:
        if preset not in PRESETS:
            raise ValueError(
                f"amalgamation.student.preset: unknown preset {preset!r}; presets: "
                f"{sorted(PRESETS)}"
            )
        return preset_config(preset, num_classes=1, **overrides)
    for t in teachers:
        if t.detr_config is not None:
            return t.detr_config
    raise ValueError(
        "amalgamation.student: no teacher describes a ka_rs architecture (all are TA-only: "
        + ", ".join(f"{t.name}={t.source}" for t in teachers)
        + '); choose the student with amalgamation.student = {preset = "detr_r50"} '
        f"(presets: {', '.join(sorted(PRESETS))})"
    )


def build_amalgamation_student(
    teachers: Sequence[Teacher],
    *,
    aggregation: bool = False,
    cross_slot_attention: bool = False,
    init_from: str = "",
    overrides: Mapping[str, Any] | None = None,
    student_layout: str = "slots",
) -> AmalgamationStudent:
    """The student for ``teachers``: union classes, one slot per SA teacher, initialised.

    Args:
        teachers: the run's teachers, in order (named).
        aggregation: the prior-KA baseline's one-slot student.
        cross_slot_attention: full encoder attention across slots (default: the paper's
            block-diagonal "no cross").
        student_layout: ``"slots"`` (default, the paper's: N·S encoder tokens) or
            ``"compact"`` (S tokens;
            :class:`~ka_rs.models.student.CompactAmalgamationStudent`). With fewer than two SA
            teachers both give the one-slot student.
        init_from: a teacher's name: copy its weights (see :func:`init_student_from_teacher`);
            ``""`` = random initialisation (the paper).
        overrides: :class:`~ka_rs.models.DetrConfig` fields to change, and ``preset`` when no
            teacher has a ka_rs architecture.

    Returns:
        The :class:`~ka_rs.models.AmalgamationStudent` (on the CPU, train mode).

    Raises:
        ValueError: an unknown ``student_layout``; ``"compact"`` with ``aggregation`` (a
            one-slot student) or with ``cross_slot_attention`` (no slots in its encoder).
    """
    if student_layout not in STUDENT_LAYOUTS:
        raise ValueError(
            f"amalgamation.student_layout: expected one of {STUDENT_LAYOUTS}, "
            f"got {student_layout!r}"
        )
    if student_layout == "compact" and (aggregation or cross_slot_attention):
        what = "aggregation" if aggregation else "cross_slot_attention"
        raise ValueError(
            f"amalgamation.student_layout: 'compact' does not combine with {what} (the "
            "aggregation baseline's student has one slot; the compact encoder has no slots "
            "to attend across)"
        )
    space = label_space_of(teachers)
    overrides = dict(overrides or {})
    base = student_base_config(teachers, init_from, overrides)
    overrides.pop("preset", None)
    sa_idx = sa_teacher_indices(teachers, base)
    num_slots = 1 if aggregation or not sa_idx else len(sa_idx)
    queries = [t.detr_config.num_queries for t in teachers if t.detr_config is not None]
    overrides.setdefault("num_queries", max(queries) if queries else base.num_queries)
    # the SA teachers match ``base`` (width, depth, stride): the student copies ``base``
    student = build_student(
        [base] * num_slots,
        space.num_classes,
        cross_slot_attention,
        num_slots=num_slots,
        layout=student_layout,
        **overrides,
    )
    if init_from:
        src = next(t for t in teachers if t.name == init_from)
        if _architecture(base) != _architecture(student.config):
            raise ValueError(
                f"amalgamation.init_from: the student overrides {sorted(overrides)} change "
                f"teacher {init_from!r}'s architecture; its weights cannot be copied"
            )
        init_student_from_teacher(student, src, space, teachers)
    return student


def _architecture(cfg: DetrConfig) -> dict[str, Any]:
    """The fields that must agree for ``init_from`` to copy weights (class count, query count
    and the dense auxiliary head may differ)."""
    d = cfg.to_dict()
    for key in ("num_classes", "num_queries", "dense_aux"):
        d.pop(key, None)
    return d


@torch.no_grad()
def init_student_from_teacher(
    student: nn.Module, teacher: Teacher, label_space: LabelSpace, teachers: Sequence[Teacher]
) -> list[str]:
    """Initialise ``student`` from ``teacher``'s weights (an extension beyond the paper).

    Copies every parameter of the same name and shape (backbone, encoder, decoder, box head,
    queries/anchors). The N·d-wide input projection gets the teacher's d-wide projection in
    EVERY slot, so at step 0 all slots carry the teacher's sequence; with the block-diagonal
    mask (and also with cross-slot attention, since the keys are duplicated) the student then
    reproduces that teacher's predictions exactly (a compact student too: its merge gate starts
    as an average and its SA heads as the identity). Class-head rows: each union class takes
    the row of the first ka_rs-DETR teacher that knows it (the other teachers' rows are a head
    start for their classes); a softmax head's no-object row comes from ``teacher``.

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
    # union row c <- row of the first DETR teacher that knows class c
    detr_teachers = [t for t in teachers if t.detr_config is not None]
    t_states = {t.name: t.model.state_dict() for t in detr_teachers}
    for head in ("class_embed", "enc_class_embed"):
        head_w, head_b = s_state.get(f"{head}.weight"), s_state.get(f"{head}.bias")
        if head_w is None or head_b is None:
            continue
        for c, cname in enumerate(label_space.names):
            src = next((t for t in detr_teachers if cname in t.class_names), None)
            if src is None:
                continue
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

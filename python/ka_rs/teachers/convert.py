"""``ka-rs convert``: any teacher source written as a ka_rs checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ka_rs.teachers.base import Teacher

__all__ = ["save_teacher_checkpoint"]


def save_teacher_checkpoint(teacher: Teacher, dest: str | Path) -> Path:
    """Write ``teacher`` as a ka_rs checkpoint (kind ``"teacher"``) at ``dest``, atomically.

    The checkpoint holds the class names in head order (``None`` for non-class slots), the
    weights, the teacher's training image size (``config.data``) and where it came from
    (``converted_from``). A ka_rs DETR (``detr:``, ``hf:`` DETR, ka_rs checkpoints) is stored
    with its model config; a TA-only transformers teacher (Deformable DETR, RT-DETR, ...) with
    its transformers config and pixel settings under ``external`` (loading it needs
    transformers). Every ka_rs command and :func:`ka_rs.load_teacher` read either. Both carry
    the tensor digest that loading verifies (:func:`ka_rs.engine.checkpoint.seal_checkpoint`).

    Raises:
        ValueError: a teacher that is neither (a detector ka_rs cannot rebuild from data).
        NonFiniteError: a weight is NaN or infinite (nothing is written).
        OutputError: writing ``dest`` failed (full disk, ...); no partial file is left.
    """
    from ka_rs.engine.checkpoint import (
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        NonFiniteError,
        atomic_save,
        non_finite_tensor,
        save_checkpoint,
        seal_checkpoint,
    )

    config = {"data": {"image_size": teacher.image_size}} if teacher.image_size else {}
    provenance = {"converted_from": {"source": teacher.source, **teacher.info}}
    if teacher.detr_config is not None:
        return save_checkpoint(
            dest,
            model=teacher.model,
            class_names=list(teacher.class_names),  # type: ignore[arg-type]
            config=config,
            kind="teacher",
            include_rng=False,
            extra=provenance,
        )
    from ka_rs.teachers.hf import HFDetectorTeacher, external_record

    if not isinstance(teacher, HFDetectorTeacher):
        raise ValueError(
            f"{teacher.source}: a {type(teacher).__name__} has no stored form ka_rs can "
            "rebuild; use the source directly"
        )
    state = {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}
    bad = non_finite_tensor(state)
    if bad is not None:
        raise NonFiniteError(
            f"{teacher.source}: weight {bad} is not finite; refusing to write {str(dest)!r}"
        )
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": "teacher",
        "model": state,
        "model_config": {},
        "class_names": list(teacher.class_names),
        "config": config,
        "external": external_record(teacher),
        **provenance,
    }
    return atomic_save(seal_checkpoint(ckpt), dest)

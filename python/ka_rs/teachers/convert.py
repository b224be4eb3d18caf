"""``ka-rs convert``: any teacher source written as a ka_rs checkpoint."""

from __future__ import annotations

from pathlib import Path

from ka_rs.teachers.base import Teacher

__all__ = ["save_teacher_checkpoint"]


def save_teacher_checkpoint(teacher: Teacher, dest: str | Path) -> Path:
    """Write ``teacher`` as a ka_rs checkpoint (kind ``"teacher"``) at ``dest``, atomically.

    The checkpoint holds the model config, the class names in head order (``None`` for
    non-class slots), the weights, the teacher's training image size (``config.data``) and
    where it came from (``converted_from``); every ka_rs command and
    :func:`ka_rs.load_teacher` read it like a teacher ka_rs trained.

    Raises:
        ValueError: the teacher is not a ka_rs DETR (a TA-only teacher run by another library
            has no ka_rs architecture to write).
    """
    from ka_rs.engine.checkpoint import save_checkpoint

    if teacher.detr_config is None:
        raise ValueError(
            f"{teacher.source}: a TA-only teacher ({teacher.info.get('model_type', 'external')}) "
            "has no ka_rs architecture to write; use the source directly"
        )
    config = {"data": {"image_size": teacher.image_size}} if teacher.image_size else {}
    return save_checkpoint(
        dest,
        model=teacher.model,
        class_names=list(teacher.class_names),  # type: ignore[arg-type]
        config=config,
        kind="teacher",
        include_rng=False,
        extra={"converted_from": {"source": teacher.source, **teacher.info}},
    )

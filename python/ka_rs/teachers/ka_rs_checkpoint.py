"""Teachers from ka_rs's own checkpoints (``ka-rs train-teacher``, ``ka-rs convert``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ka_rs.teachers.base import DetrTeacher, Teacher

__all__ = ["load_ka_rs_teacher"]


def load_ka_rs_teacher(path: str | Path, *, classes: Sequence[str | None] | None = None) -> Teacher:
    """A teacher from a ka_rs checkpoint file.

    A detector checkpoint gives a :class:`DetrTeacher` (SA + TA). A *student* checkpoint gives
    a TA-only teacher: its N-slot encoder has no sequence a student slot could copy. A
    checkpoint ``ka-rs convert`` wrote from a TA-only transformers teacher rebuilds that model
    (it needs transformers).

    Args:
        path: the ``checkpoint.pt``.
        classes: new class names (same length as the checkpoint's), or None to keep its own.

    Raises:
        CheckpointError: missing, corrupt (tensor digest mismatch) or foreign file, NaN / inf
            weights, no class names, stored class names that do not fit the model's class
            head, or a ``classes`` list of the wrong length (the message names the file).
    """
    from ka_rs.engine.checkpoint import CheckpointError, detector_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(path)
    if "external" in ckpt:
        return _external_teacher(ckpt, path, classes)
    det = detector_from_checkpoint(ckpt, path)
    names: list[str | None] = list(classes) if classes is not None else list(det.class_names)
    if not names:
        raise CheckpointError(f"checkpoint {str(path)!r} has no class names; give classes=")
    ckpt_classes = det.model.config.num_classes
    if len(names) != ckpt_classes:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {len(names)} class names given for a head with "
            f"{ckpt_classes} classes"
        )
    data = (det.config or {}).get("data", {}) if isinstance(det.config, dict) else {}
    image_size = int(data.get("image_size") or 0) if isinstance(data, dict) else 0
    if not image_size:
        from ka_rs.models.presets import TRAINING_HINTS

        preset = (det.config or {}).get("model", {}).get("preset", "")
        image_size = int(TRAINING_HINTS.get(preset, {}).get("image_size", 0))
    info = {"format": "ka_rs", "kind": det.checkpoint.get("kind", "teacher")}
    run_config = det.config if isinstance(det.config, dict) else {}
    if det.checkpoint.get("student"):
        return Teacher(
            det.model,
            names,
            det.model.config.class_head,
            source=str(path),
            image_size=image_size,
            info=info,
            run_config=run_config,
        )
    return DetrTeacher(
        det.model,
        names,
        source=str(path),
        image_size=image_size,
        info=info,
        run_config=run_config,
    )


def _external_teacher(
    ckpt: dict[str, Any], path: str | Path, classes: Sequence[str | None] | None
) -> Teacher:
    """A TA-only teacher another library runs, stored by ``ka-rs convert``."""
    from ka_rs.engine.checkpoint import CheckpointError

    record = ckpt["external"]
    if not isinstance(record, dict) or record.get("library") != "transformers":
        raise CheckpointError(f"checkpoint {str(path)!r}: unknown external model {record!r:.80}")
    from ka_rs.teachers.hf import teacher_from_record

    stored = list(ckpt.get("class_names") or [])
    config = record.get("config")
    id2label = config.get("id2label") if isinstance(config, dict) else None
    if isinstance(id2label, dict) and id2label and len(id2label) != len(stored):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: it lists {len(stored)} class names but its "
            f"{record.get('model_type')} model's class head has {len(id2label)} labels; the "
            "names do not belong to these weights"
        )
    names = list(classes) if classes is not None else stored
    if len(names) != len(stored):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {len(names)} class names given for a head with "
            f"{len(stored)} classes"
        )
    image_size = int((ckpt.get("config") or {}).get("data", {}).get("image_size") or 0)
    return teacher_from_record(
        record, ckpt["model"], names, source=str(path), image_size=image_size
    )

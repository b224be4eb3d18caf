"""Evaluation on the demo's held-out images (COCO AP / AP50 / AP75).

The ``demo.eval_split`` shapes images (default ``test``) were never trained on nor used for
validation during training. Each teacher is scored on its own classes, the student on the
union and on each teacher's classes, and — as a reference, not a baseline — the teachers run
side by side with their detections pooled (:class:`TeacherEnsemble`: twice the compute of one
model, and no single network).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ka_rs.demo.config import DemoConfig
from ka_rs.teachers import Teacher

__all__ = [
    "DemoEvaluation",
    "TeacherEnsemble",
    "eval_dataset",
    "evaluate_demo",
    "evaluate_on_test",
    "evaluate_teachers",
]


def eval_dataset(cfg: DemoConfig) -> Any:
    """The held-out shapes images of ``demo.eval_split`` (all classes, eval transforms)."""
    from ka_rs.engine.datasets import build_datasets

    data = copy.deepcopy(cfg.teacher.data)
    data.split, data.teacher, data.classes = "", "", []
    data.val_set = cfg.demo.eval_split
    data.num_val_images = cfg.demo.num_eval_images
    _, ds, _ = build_datasets(data, train=False)
    return ds


def evaluate_on_test(
    model: nn.Module,
    dataset: Any,
    class_names: Sequence[str | None],
    subsets: Mapping[str, Sequence[str]] | None = None,
    *,
    batch_size: int = 32,
    class_head: str | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """COCO evaluation of ``model`` on ``dataset`` (its classes, plus ``subsets``).

    ``class_names`` follow the model's class logits in order; a ``None`` entry (a teacher's
    non-class slot) is never scored. For a :class:`~ka_rs.teachers.Teacher` pass the teacher
    itself with ``class_head=teacher.head``, so that a teacher from any source works.
    """
    from ka_rs.engine.evaluate import evaluate, make_eval_loader

    loader = make_eval_loader(dataset, batch_size)
    return evaluate(model, loader, class_names, subsets, device=device, class_head=class_head)


def evaluate_teachers(teachers: Sequence[Teacher], dataset: Any) -> dict[str, Any]:
    """Each teacher on its own classes: ``{name: EvalResult}``."""
    return {
        t.name: evaluate_on_test(t, dataset, t.class_names, class_head=t.head) for t in teachers
    }


class TeacherEnsemble(nn.Module):
    """Reference detector: the teachers run side by side, predictions pooled in union space.

    Query block k holds teacher k's Q_k queries with its logits written at its classes' union
    positions (others −1e4; a teacher's non-class slots are dropped; a softmax teacher's
    no-object logit goes to the union background). All teachers must share one head kind.
    Output: ``{"pred_logits", "pred_boxes"}`` with ΣQ_k queries.
    """

    def __init__(self, teachers: Sequence[Teacher], union: Sequence[str]) -> None:
        super().__init__()
        kinds = {t.head for t in teachers}
        if len(kinds) != 1:
            raise ValueError("teachers: the ensemble reference needs one head kind")
        self.kind = kinds.pop()
        self.teachers = nn.ModuleList(teachers)
        union = list(union)
        # per teacher: (its logit indices of real classes, their union positions)
        self.maps = [
            (
                [i for i, c in enumerate(t.class_names) if c is not None],
                [union.index(c) for c in t.class_names if c is not None],
            )
            for t in teachers
        ]
        self.num_union = len(union)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Pooled predictions (B, ΣQ_k, K_U) and boxes (B, ΣQ_k, 4)."""
        logits, boxes = [], []
        k_u = self.num_union + (1 if self.kind == "softmax" else 0)
        for teacher, (src, dst) in zip(self.teachers, self.maps, strict=True):
            out = teacher(images, mask)
            lg = out["pred_logits"]
            full = lg.new_full((*lg.shape[:2], k_u), -1e4)
            full[..., dst] = lg[..., src]
            if self.kind == "softmax":
                full[..., -1] = lg[..., -1]
            logits.append(full)
            boxes.append(out["pred_boxes"])
        return {"pred_logits": torch.cat(logits, 1), "pred_boxes": torch.cat(boxes, 1)}


@dataclass
class DemoEvaluation:
    """The demo's numbers: per teacher, the student, and the pooled-teachers reference
    (``None`` when the teachers' heads differ)."""

    teachers: dict[str, Any]
    student: Any
    ensemble: Any | None


def evaluate_demo(
    cfg: DemoConfig,
    teachers: Sequence[Teacher],
    student: nn.Module,
    union: Sequence[str],
    subsets: Mapping[str, Sequence[str]],
) -> DemoEvaluation:
    """Evaluate the teachers, the student (union + ``subsets``) and the pooled teachers."""
    test_ds = eval_dataset(cfg)
    teacher_evals = evaluate_teachers(teachers, test_ds)
    student_eval = evaluate_on_test(student, test_ds, union, subsets)
    ensemble_eval = None
    if len({t.head for t in teachers}) == 1:
        ens = TeacherEnsemble(teachers, union)
        ensemble_eval = evaluate_on_test(ens, test_ds, union, subsets, class_head=teachers[0].head)
    return DemoEvaluation(teacher_evals, student_eval, ensemble_eval)

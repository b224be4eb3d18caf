"""One amalgamation training step's loss, as one object (the role DETR's ``SetCriterion`` plays).

:class:`AmalgamationStep` is what both ``ka-rs amalgamate`` and a user's own training loop call::

    images --frozen teachers (no grad)--> predictions (+ encoder sequences of SA teachers)
           --build_pseudo_targets (one Rust call: all teachers, whole batch)--> pseudo-targets
    images --student--> predictions of every decoder layer (+ its slot sequences)
    L = w_gt·L_DETR(ground truth) + w_amg·(sa_weight·L_SA + ta_weight·L_TA)

- ``L_TA``: :class:`~ka_rs.losses.TaskAmalgamationLoss` (every decoder layer matched to the
  pseudo-targets by the Rust matcher in one call).
- ``L_SA``: :class:`~ka_rs.losses.SequenceAmalgamationLoss`, student slot j against the j-th
  SA teacher (:func:`~ka_rs.amalgamation.student.sa_teacher_indices`) at every hook point. A
  compact student (``student_layout = "compact"``) has one sequence; its train-mode output
  carries per-teacher views of it in the slot layout (``teacher_views``), which SA compares
  instead, so the step treats both layouts alike.
  With ``aggregation`` the one-slot student imitates the learnt channel fusion of the SA
  teachers instead (:class:`~ka_rs.losses.AggregationHintLoss`, whose projections are this
  module's :meth:`trainable_parameters` — give them to the optimiser).
- ``L_DETR``: :class:`~ka_rs.losses.SetCriterion` on ground truth, label-assisted mode only.

The method and every option are described in docs/method.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ka_rs.amalgamation.student import label_space_of, sa_teacher_indices
from ka_rs.engine.amp import autocast, float_outputs, validate_amp
from ka_rs.labels import LabelSpace, build_pseudo_targets
from ka_rs.losses import (
    AggregationHintLoss,
    SequenceAmalgamationLoss,
    TaskAmalgamationLoss,
    build_criterion,
)
from ka_rs.models.detr import DetrConfig, DetrOutput
from ka_rs.teachers.base import Teacher

__all__ = ["MODES", "AmalgamationStep"]

#: ``"label_free"`` (teachers are the only supervision) or ``"label_assisted"``.
MODES = ("label_free", "label_assisted")

# option name -> default (the keyword arguments of AmalgamationStep, also read from configs)
_OPTIONS: dict[str, Any] = {
    "sa": True,
    "ta": True,
    "aggregation": False,
    "sa_weight": 1.0,
    "ta_weight": 1.0,
    "mode": "label_free",
    "gt_weight": 1.0,
    "threshold": 0.1,
    "top_n": 50,
    "fill_logit": -5.0,
    "nms_iou": 0.7,
    "temperature": 4.0,
    "eos_coef": 0.1,
    "weight_class": 1.0,
    "weight_bbox": 5.0,
    "weight_giou": 2.0,
}


class AmalgamationStep(nn.Module):
    """The loss of one amalgamation step: teachers → pseudo-targets → matcher → losses.

    Args:
        teachers: the frozen, named :class:`~ka_rs.teachers.Teacher` s, in slot order.
        student_config: the student's :class:`~ka_rs.models.DetrConfig` (its class head, width
            and depth decide the TA loss, the aggregation hint and the ground-truth criterion).
        sa, ta, aggregation: which amalgamation losses run (aggregation replaces SA).
        sa_weight, ta_weight: weights of L_SA (or the aggregation hint) and L_TA.
        mode: ``"label_free"`` (w_gt = 0) or ``"label_assisted"`` (w_gt = ``gt_weight``; the
            amalgamation weight is the caller's ``amalgamation_weight`` argument, e.g.
            :func:`ka_rs.losses.amalgamation_weight`'s 1 − e/E).
        threshold, top_n, fill_logit, nms_iou: pseudo-target settings
            (:func:`ka_rs.build_pseudo_targets`; ``nms_iou`` None or < 0 = no merging).
        temperature, eos_coef, weight_class, weight_bbox, weight_giou: TA loss settings.
        amp: ``"off"``, ``"bf16"`` or ``"fp16"``: autocast of the teacher and student forwards
            (the losses always run in float32).

    Attributes:
        label_space: the union :class:`~ka_rs.LabelSpace` (student class c = ``names[c]``).
        sa_teachers: indices of the teachers SA covers, in student-slot order.

    Call ``step(student, images, mask, targets=None, *, teacher_outputs=None,
    amalgamation_weight=1.0)`` → dict with ``"loss"`` (scalar, differentiable) and detached
    components (``loss_ta``, ``loss_sa``, ``loss_hint``, ``loss_gt``, ``pseudo_per_image``, ...).
    ``images`` (B, 3, H, W) standardised, ``mask`` (B, H, W) bool (True = padding), ``targets``
    the loader's per-image dicts (ground truth, used in label-assisted mode only).
    ``teacher_outputs`` replaces the teachers' forward (cached outputs, one per teacher).
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        student_config: DetrConfig,
        *,
        amp: str = "off",
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"options: unknown amalgamation option(s) {unknown}")
        opt = {**_OPTIONS, **options}
        if opt["mode"] not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {opt['mode']!r}")
        if opt["sa"] and opt["aggregation"]:
            raise ValueError("aggregation: replaces SA; use it with sa=False")
        # a ModuleList so that .to(device) moves the (frozen) teachers; teacher_list holds the
        # same objects, typed
        self.teachers = nn.ModuleList(teachers)
        self.teacher_list: list[Teacher] = list(teachers)
        self.label_space: LabelSpace = label_space_of(teachers)
        if student_config.num_classes != self.label_space.num_classes:
            raise ValueError(
                f"student_config: {student_config.num_classes} classes, but the teachers' "
                f"union has {self.label_space.num_classes}"
            )
        self.student_config = student_config
        self.sa_teachers = sa_teacher_indices(teachers, student_config)
        self.options = opt
        self.amp = validate_amp(amp, "amp")
        nms = opt["nms_iou"]
        kinds = [t.head for t in teachers]
        self._pseudo_kwargs = {
            "kinds": kinds,
            "threshold": opt["threshold"],
            "top_n": opt["top_n"],
            "fill_logit": opt["fill_logit"],
            "nms_iou": None if nms is None or nms < 0 else nms,
        }
        head = student_config.class_head
        self.ta_loss = TaskAmalgamationLoss(
            self.label_space.num_classes,
            temperature=opt["temperature"],
            eos_coef=opt["eos_coef"],
            weight_class=opt["weight_class"],
            weight_bbox=opt["weight_bbox"],
            weight_giou=opt["weight_giou"],
            class_head=head,
            teacher_kinds=kinds if len({*kinds, head}) > 1 else None,
        )
        self.sa_loss = SequenceAmalgamationLoss()
        self.hint_loss: AggregationHintLoss | None = None
        if opt["aggregation"]:
            if not self.sa_teachers:
                raise ValueError(
                    "aggregation: needs teachers with encoder sequences matching the student; "
                    "none of " + ", ".join(t.name for t in teachers) + " has them"
                )
            self.hint_loss = AggregationHintLoss(
                len(self.sa_teachers), student_config.hidden_dim, 1 + student_config.enc_layers
            )
        self.gt_criterion = build_criterion(student_config)

    # -- what the engine and the caller read ---------------------------------------------------

    @property
    def num_slots(self) -> int:
        """Token slots the student must have: 1 (aggregation / no SA teacher) or one per SA
        teacher (for a compact student: its teacher views, its encoder having one sequence)."""
        return 1 if self.hint_loss is not None or not self.sa_teachers else len(self.sa_teachers)

    def coverage(self) -> str:
        """One line saying which teachers SA covers and which are TA-only (for run logs)."""
        names = [t.name for t in self.teacher_list]
        sa = [names[k] for k in self.sa_teachers]
        ta_only = [n for k, n in enumerate(names) if k not in self.sa_teachers]
        if not (self.options["sa"] or self.options["aggregation"]):
            return "SA off"
        what = "aggregation" if self.options["aggregation"] else "SA"
        if not sa:
            return f"{what} covers no teacher (all TA-only: {', '.join(ta_only)})"
        text = f"{what} covers {', '.join(sa)}"
        return text + (f"; TA-only: {', '.join(ta_only)}" if ta_only else "")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser must train besides the student's (the aggregation hint's)."""
        if self.hint_loss is not None:
            yield from self.hint_loss.parameters()

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def run_teachers(self, images: Tensor, mask: Tensor | None = None) -> list[DetrOutput]:
        """Every teacher's (float32) output on a batch, in teacher order."""
        outs = []
        for t in self.teacher_list:
            with autocast(self.amp, images.device):
                out = t(images, mask)
            outs.append(_float(out))
        return outs

    def forward(
        self,
        student: nn.Module,
        images: Tensor,
        mask: Tensor | None = None,
        targets: Sequence[Mapping[str, Any]] | None = None,
        *,
        teacher_outputs: Sequence[Any] | None = None,
        amalgamation_weight: float = 1.0,
    ) -> dict[str, Any]:
        """Run the student and the teachers on a batch and return the loss dict (see above)."""
        opt = self.options
        if teacher_outputs is None:
            t_outs: Sequence[Any] = self.run_teachers(images, mask)
        else:
            if len(teacher_outputs) != len(self.teachers):
                raise ValueError(
                    f"teacher_outputs: {len(teacher_outputs)} outputs for "
                    f"{len(self.teachers)} teachers"
                )
            t_outs = teacher_outputs
        with autocast(self.amp, images.device):
            out = student(images, mask)
        out = _float(out)
        w_amg = float(amalgamation_weight)
        comps: dict[str, Any] = {}
        total = out.pred_logits.new_zeros(())
        if opt["ta"]:
            pseudo = build_pseudo_targets(self.label_space, t_outs, **self._pseudo_kwargs)
            ta = self.ta_loss(out, pseudo)
            total = total + w_amg * opt["ta_weight"] * ta["loss"]
            comps["loss_ta"] = ta["loss"].detach()
            for k in ("loss_class", "loss_bbox", "loss_giou"):
                comps[f"loss_ta_{k[5:]}"] = ta[k]
            comps["pseudo_per_image"] = sum(len(p["labels"]) for p in pseudo) / max(len(pseudo), 1)
        sa_outs = [t_outs[k] for k in self.sa_teachers]
        if opt["sa"] and sa_outs:
            sa = self.sa_loss(out, sa_outs)
            total = total + w_amg * opt["sa_weight"] * sa["loss"]
            comps["loss_sa"] = sa["loss"].detach()
        if self.hint_loss is not None:
            hint = self.hint_loss(out, sa_outs)
            total = total + w_amg * opt["sa_weight"] * hint["loss"]
            comps["loss_hint"] = hint["loss"].detach()
        if opt["mode"] == "label_assisted" and opt["gt_weight"] > 0:
            if targets is None:
                raise ValueError("targets: the label-assisted mode needs the ground truth")
            gt = self.gt_criterion(out, targets)
            total = total + opt["gt_weight"] * gt["loss"]
            comps["loss_gt"] = gt["loss"].detach()
        comps["w_amg"] = w_amg
        comps["loss"] = total
        return comps


def _float(out: Any) -> DetrOutput:
    """A model output as a :class:`DetrOutput` with its floating tensors in float32 (the
    losses run in float32; tensors already in float32 are not copied)."""
    if not isinstance(out, DetrOutput):
        out = DetrOutput(
            pred_logits=out["pred_logits"],
            pred_boxes=out["pred_boxes"],
            aux_outputs=list(out.get("aux_outputs") or []),
        )
    result: DetrOutput = float_outputs(out)
    return result

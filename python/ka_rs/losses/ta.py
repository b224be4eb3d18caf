"""Task-level amalgamation (TA) loss and the label-free / label-assisted weight schedule.

docs/method.md §4. The teachers' predictions have already been turned into per-image
pseudo-targets by :func:`ka_rs.labels.build_pseudo_targets` (hard union labels, teacher boxes,
soft logits over the union + background). Here the student's final and auxiliary decoder
outputs are matched to them — every layer in ONE :meth:`HungarianMatcher.match_layers` call —
and distilled:

*softmax student* (DETR head, |U|+1 logits, the paper's setting), per decoder layer::

    L_cls  = [ Σ_matched KL(softmax(t/T) ‖ softmax(s/T))·T²  +  eos·Σ_unmatched CE(s, bg) ]
             / (#matched + eos·#unmatched)
    L_bbox = Σ_matched ‖b_s − b_t‖₁ / n_pseudo ,   L_giou = Σ_matched (1 − GIoU) / n_pseudo
    L      = w_cls·L_cls + 5·L_bbox + 2·L_giou            (n_pseudo = #pseudo-targets, ≥ 1)

*sigmoid student* (the "anchor" variant's focal head, |U| logits) — an extension of the paper,
which only has softmax students. Each class is an independent Bernoulli, so the natural KD is
the per-class binary KL at temperature T between sigmoid(t/T) and sigmoid(s/T), with
t = ``soft_logits[:, :|U|]`` (the background column is dropped; a sigmoid head has none)::

    L_cls = [ Σ_matched Σ_c BKL(σ(t_c/T) ‖ σ(s_c/T))·T²  +  Σ_unmatched Σ_c FL(s_c, 0) ] / n_pseudo

where FL is the sigmoid focal loss (α = 0.25, γ = 2) toward the all-zero target. Dividing by
the number of pseudo-targets follows Deformable-DETR's focal-loss normalisation: unmatched
queries are down-weighted by the focal term itself (not by eos_coef, which a sigmoid head
does not use), so the class loss stays O(1) per object whatever the number of queries.

Soft logits are used in the student's own convention by default (softmax teachers for a
softmax student, sigmoid teachers for a sigmoid student). For mixed kinds pass
``teacher_kinds``: a softmax teacher's soft logits are turned into per-class log-odds
log p_c − log(1 − p_c) of its softmax probabilities before feeding a sigmoid student, and a
sigmoid teacher's become softmax logits [log σ(t_c) …, log(1 − max_c σ(t_c))] before feeding
a softmax student.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ka_rs.losses.set_criterion import (
    _enc_outputs,
    box_cxcywh_to_xyxy,
    dense_loss,
    generalized_box_iou_pairs,
    sigmoid_focal_loss,
)
from ka_rs.matcher import HungarianMatcher

__all__ = ["TaskAmalgamationLoss", "amalgamation_weight"]

_MODES = ("label_free", "label_assisted")
_HEADS = ("softmax", "sigmoid")


def amalgamation_weight(
    epoch: int, total_epochs: int, mode: str = "label_free"
) -> tuple[float, float]:
    """Loss weights ``(w_gt, w_amg)`` (docs/method.md §5) of 0-based ``epoch`` of ``total_epochs``.

    ``L = w_gt·L_DETR(ground truth) + w_amg·(L_SA + L_TA)``.

    - ``"label_free"`` (default): ``(0.0, 1.0)`` at every epoch — teachers are the only
      supervision.
    - ``"label_assisted"``: ``(1.0, 1 − epoch/total_epochs)`` — linear decay from 1 at epoch 0
      to 1/E at the last epoch (clamped at 0 past the end).

    Raises:
        ValueError: unknown ``mode``, ``total_epochs < 1`` or ``epoch < 0``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    if int(total_epochs) < 1:
        raise ValueError(f"total_epochs: must be >= 1, got {total_epochs!r}")
    if epoch < 0:
        raise ValueError(f"epoch: must be >= 0, got {epoch!r}")
    if mode == "label_free":
        return 0.0, 1.0
    return 1.0, max(0.0, 1.0 - float(epoch) / float(total_epochs))


def _field(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None and hasattr(obj, "__getitem__"):
        try:
            value = obj[key]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


def _global_mean(values: Tensor) -> Tensor:
    """Average a 1-D tensor of counts over ranks (identity without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


class TaskAmalgamationLoss(nn.Module):
    """TA loss: distil pseudo-targets into the student's final and auxiliary decoder outputs.

    Args:
        num_classes: |U|, the union label space size (background index = |U|).
        matcher: a :class:`~ka_rs.matcher.HungarianMatcher`; default ``HungarianMatcher.detr()``
            (softmax class cost) for a softmax head, ``HungarianMatcher.deformable()`` (focal
            class cost) for a sigmoid head. The class cost uses the pseudo-targets' hard labels.
        temperature: T of the soft-target distillation (4).
        eos_coef: weight of unmatched queries' background cross-entropy (softmax head only).
        weight_class: weight of the class term (1).
        weight_bbox: weight of the L1 box term (5).
        weight_giou: weight of the GIoU box term (2).
        class_head: ``"softmax"`` (student logits (B, Q, |U|+1)) or ``"sigmoid"`` ((B, Q, |U|)).
        focal_alpha, focal_gamma: focal loss of unmatched queries (sigmoid head only).
        aux_loss: also supervise every auxiliary decoder layer (default True).
        teacher_kinds: optional kind (``"softmax"``/``"sigmoid"``, ``"focal"`` = sigmoid; the
            ``kinds`` given to ``build_pseudo_targets``) of each teacher, indexed by
            the pseudo-targets' ``"teacher"`` ids, for converting soft logits whose kind differs
            from ``class_head`` (see the module docstring). None = soft logits already match.
        weight_dense: weight of the dense auxiliary loss when the student has a dense head
            (``student_outputs.enc_outputs``, e.g. a two-stage student): its tokens learn the
            pseudo-targets' hard labels and boxes exactly as a teacher's learn ground truth
            (:func:`~ka_rs.losses.set_criterion.dense_loss`; an extension of the paper).

    ``forward(student_outputs, pseudo_targets)``:
        student_outputs: a ``DetrOutput`` (or mapping) with ``pred_logits`` (B, Q, K),
            ``pred_boxes`` (B, Q, 4) normalised cxcywh and ``aux_outputs`` (list of dicts).
        pseudo_targets: B dicts from ``build_pseudo_targets``: ``labels`` (M_i,) int64 union
            indices, ``boxes`` (M_i, 4) cxcywh, ``soft_logits`` (M_i, |U|+1) (a sigmoid head
            also accepts (M_i, |U|)), optional ``teacher`` (M_i,). M_i = 0 is allowed: all
            queries of that image are then unmatched.

    Returns:
        dict with ``"loss"`` — the weighted total over all layers (scalar, differentiable) —
        and detached, unweighted components ``"loss_class"``, ``"loss_bbox"``, ``"loss_giou"``
        for the final layer and ``"loss_class_<i>"`` … for auxiliary layer i (0-based).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        temperature: float = 4.0,
        eos_coef: float = 0.1,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        class_head: str = "softmax",
        *,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        aux_loss: bool = True,
        teacher_kinds: Sequence[str] | None = None,
        weight_dense: float = 1.0,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes!r}")
        if class_head not in _HEADS:
            raise ValueError(f"class_head: expected one of {_HEADS}, got {class_head!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: must be a finite value > 0, got {temperature!r}")
        if not (math.isfinite(eos_coef) and eos_coef >= 0):
            raise ValueError(f"eos_coef: must be a finite value >= 0, got {eos_coef!r}")
        if teacher_kinds is not None:
            if isinstance(teacher_kinds, str):
                raise ValueError("teacher_kinds: expected a sequence of kinds, one per teacher")
            teacher_kinds = ["sigmoid" if k == "focal" else k for k in teacher_kinds]
            for kind in teacher_kinds:
                if kind not in _HEADS:
                    raise ValueError(
                        f"teacher_kinds: expected entries in {(*_HEADS, 'focal')}, got {kind!r}"
                    )
        self.num_classes = int(num_classes)
        self.class_head = class_head
        if matcher is None:
            if class_head == "softmax":
                matcher = HungarianMatcher.detr()
            else:
                matcher = HungarianMatcher.deformable()
        self.matcher = matcher
        self.temperature = float(temperature)
        self.eos_coef = float(eos_coef)
        self.weight_class = float(weight_class)
        self.weight_bbox = float(weight_bbox)
        self.weight_giou = float(weight_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.aux_loss = bool(aux_loss)
        self.teacher_kinds = teacher_kinds
        self.weight_dense = float(weight_dense)

    @property
    def num_logits(self) -> int:
        """Logits per query the student must emit: |U|+1 (softmax) or |U| (sigmoid)."""
        return self.num_classes + 1 if self.class_head == "softmax" else self.num_classes

    # ----------------------------------------------------------------------------- validation
    def _layers(self, outputs: Any) -> list[dict[str, Tensor]]:
        logits = _field(outputs, "pred_logits")
        boxes = _field(outputs, "pred_boxes")
        if logits is None or boxes is None:
            raise ValueError("student_outputs: needs 'pred_logits' and 'pred_boxes'")
        layers = [{"pred_logits": logits, "pred_boxes": boxes}]
        if self.aux_loss:
            for aux in _field(outputs, "aux_outputs") or []:
                layers.append({"pred_logits": aux["pred_logits"], "pred_boxes": aux["pred_boxes"]})
        for i, layer in enumerate(layers):
            lg, bx = layer["pred_logits"], layer["pred_boxes"]
            where = "student_outputs" if i == 0 else f"student_outputs.aux_outputs[{i - 1}]"
            if lg.dim() != 3 or lg.shape[-1] != self.num_logits:
                raise ValueError(
                    f"{where}: pred_logits must be (B, Q, {self.num_logits}) for a "
                    f"{self.class_head} head over {self.num_classes} classes, "
                    f"got {tuple(lg.shape)}"
                )
            if bx.shape != (*lg.shape[:2], 4):
                raise ValueError(
                    f"{where}: pred_boxes must be {(*lg.shape[:2], 4)}, got {tuple(bx.shape)}"
                )
        return layers

    def _soft_targets(self, tgt: Mapping[str, Any], i: int, device: torch.device) -> Tensor:
        """(M, num_logits) soft logits of image i in the student's convention."""
        soft: Tensor = tgt["soft_logits"]
        m = tgt["labels"].shape[0]
        # a sigmoid head ignores the background column, so it also accepts (M, |U|)
        ok_cols = {self.num_classes + 1, self.num_logits}
        if soft.dim() != 2 or soft.shape[0] != m or soft.shape[1] not in ok_cols:
            raise ValueError(
                f"pseudo_targets[{i}]['soft_logits']: expected shape ({m}, {self.num_classes + 1})"
                f", got {tuple(soft.shape)}"
            )
        soft = soft.to(device=device, dtype=torch.float32)
        if self.teacher_kinds is None or m == 0:
            return soft[:, : self.num_logits]
        teacher = tgt.get("teacher")
        if teacher is None:
            raise ValueError(f"pseudo_targets[{i}]: 'teacher' ids are needed with teacher_kinds")
        teacher = teacher.to(device=device, dtype=torch.long)
        if int(teacher.min()) < 0 or int(teacher.max()) >= len(self.teacher_kinds):
            raise ValueError(
                f"pseudo_targets[{i}]['teacher']: ids must be in [0, {len(self.teacher_kinds)})"
            )
        kinds = torch.tensor(
            [k != self.class_head for k in self.teacher_kinds], dtype=torch.bool, device=device
        )
        convert = kinds[teacher]
        if not bool(convert.any()):
            return soft[:, : self.num_logits]
        u = self.num_classes
        if self.class_head == "sigmoid":  # softmax teacher -> per-class log-odds
            if soft.shape[1] != u + 1:
                raise ValueError(
                    f"pseudo_targets[{i}]['soft_logits']: a softmax teacher needs {u + 1} columns"
                )
            logp = F.log_softmax(soft, dim=-1)[:, :u]
            conv = logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
        else:  # sigmoid teacher -> softmax logits with a background column
            logp = F.logsigmoid(soft[:, :u])
            bg = torch.log1p(-logp.exp().amax(dim=-1, keepdim=True).clamp(max=1 - 1e-6))
            conv = torch.cat([logp, bg], dim=-1)
        return torch.where(convert[:, None], conv, soft[:, : self.num_logits])

    # ----------------------------------------------------------------------------- losses
    def _class_loss_softmax(
        self,
        logits: Tensor,
        matched: Tensor,
        batch_idx: Tensor,
        query_idx: Tensor,
        soft: Tensor,
        denom: Tensor,
    ) -> Tensor:
        t = self.temperature
        kl = logits.new_zeros(())
        if batch_idx.numel():
            log_ps = F.log_softmax(logits[batch_idx, query_idx] / t, dim=-1)
            log_pt = F.log_softmax(soft / t, dim=-1)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum() * (t * t)
        ce_bg = -F.log_softmax(logits, dim=-1)[..., self.num_classes]  # (B, Q)
        ce_unmatched = (ce_bg * (~matched).to(ce_bg.dtype)).sum()
        return (kl + self.eos_coef * ce_unmatched) / denom.clamp(min=1e-6)

    def _class_loss_sigmoid(
        self,
        logits: Tensor,
        matched: Tensor,
        batch_idx: Tensor,
        query_idx: Tensor,
        soft: Tensor,
        num_boxes: Tensor,
    ) -> Tensor:
        t = self.temperature
        kl = logits.new_zeros(())
        if batch_idx.numel():
            s = logits[batch_idx, query_idx] / t
            tt = soft / t
            p_t = torch.sigmoid(tt)
            bkl = p_t * (F.logsigmoid(tt) - F.logsigmoid(s)) + (1 - p_t) * (
                F.logsigmoid(-tt) - F.logsigmoid(-s)
            )
            kl = bkl.sum() * (t * t)
        # focal loss toward 0 for every class of every unmatched query
        focal = sigmoid_focal_loss(
            logits, torch.zeros_like(logits), self.focal_alpha, self.focal_gamma
        )
        unmatched = (focal.sum(-1) * (~matched).to(focal.dtype)).sum()
        return (kl + unmatched) / num_boxes

    def forward(
        self, student_outputs: Any, pseudo_targets: Sequence[Mapping[str, Any]]
    ) -> dict[str, Tensor]:
        """Compute the TA loss; see the class docstring for shapes."""
        layers = self._layers(student_outputs)
        batch, _, _ = layers[0]["pred_logits"].shape
        if isinstance(pseudo_targets, Mapping) or not isinstance(pseudo_targets, Sequence):
            raise ValueError("pseudo_targets: expected a list of per-image dicts")
        if len(pseudo_targets) != batch or batch == 0:
            raise ValueError(
                f"pseudo_targets: expected {batch} per-image dicts (one per student image), "
                f"got {len(pseudo_targets)}"
            )
        device = layers[0]["pred_logits"].device
        for i, tgt in enumerate(pseudo_targets):
            for key in ("labels", "boxes", "soft_logits"):
                if key not in tgt:
                    raise ValueError(f"pseudo_targets[{i}]: missing {key!r}")
        match_targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in pseudo_targets]
        indices = self.matcher.match_layers(layers, match_targets)  # ONE call, all layers

        # normalisers, averaged over ranks in one all-reduce (as SetCriterion does): the
        # number of pseudo-targets, and per layer #matched + eos·#unmatched (softmax)
        counts = [float(sum(int(t["labels"].shape[0]) for t in pseudo_targets))]
        if self.class_head == "softmax":
            n_queries = layers[0]["pred_logits"].shape[0] * layers[0]["pred_logits"].shape[1]
            for layer_idx in indices:
                m = sum(len(q) for q, _ in layer_idx)
                counts.append(m + self.eos_coef * (n_queries - m))
        norms = _global_mean(torch.tensor(counts, dtype=torch.float32, device=device))
        num_boxes = norms[0].clamp(min=1.0)

        soft_per_image = [self._soft_targets(t, i, device) for i, t in enumerate(pseudo_targets)]
        boxes_per_image = [
            t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4) for t in pseudo_targets
        ]

        out: dict[str, Tensor] = {}
        total = layers[0]["pred_logits"].new_zeros(())
        for li, (layer, layer_idx) in enumerate(zip(layers, indices, strict=True)):
            logits, pred_boxes = layer["pred_logits"], layer["pred_boxes"]
            batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(layer_idx)]).to(
                device
            )
            query_idx = torch.cat([q for q, _ in layer_idx]).to(device)
            soft = torch.cat(
                [soft_per_image[b][j.to(device)] for b, (_, j) in enumerate(layer_idx)]
            )
            tgt_boxes = torch.cat(
                [boxes_per_image[b][j.to(device)] for b, (_, j) in enumerate(layer_idx)]
            )
            matched = torch.zeros(logits.shape[:2], dtype=torch.bool, device=device)
            matched[batch_idx, query_idx] = True

            if self.class_head == "softmax":
                loss_class = self._class_loss_softmax(
                    logits, matched, batch_idx, query_idx, soft, norms[1 + li]
                )
            else:
                loss_class = self._class_loss_sigmoid(
                    logits, matched, batch_idx, query_idx, soft, num_boxes
                )
            src_boxes = pred_boxes[batch_idx, query_idx]
            loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_boxes
            giou = generalized_box_iou_pairs(
                box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)
            )
            loss_giou = (1 - giou).sum() / num_boxes

            suffix = "" if li == 0 else f"_{li - 1}"
            out[f"loss_class{suffix}"] = loss_class.detach()
            out[f"loss_bbox{suffix}"] = loss_bbox.detach()
            out[f"loss_giou{suffix}"] = loss_giou.detach()
            total = (
                total
                + self.weight_class * loss_class
                + self.weight_bbox * loss_bbox
                + self.weight_giou * loss_giou
            )
        enc = _enc_outputs(student_outputs)
        if enc is not None and self.weight_dense > 0:
            dense = dense_loss(
                enc,
                [t["labels"].to(device) for t in pseudo_targets],
                boxes_per_image,
                focal_alpha=self.focal_alpha,
                focal_gamma=self.focal_gamma,
                weight_bbox=self.weight_bbox,
                weight_giou=self.weight_giou,
            )
            total = total + self.weight_dense * dense.pop("total")
            out.update({k: v.detach() for k, v in dense.items()})
        out["loss"] = total
        return out

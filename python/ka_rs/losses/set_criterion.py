"""DETR's set criterion: Hungarian matching, then class and box losses per matched pair.

For every prediction set — the final decoder layer and each auxiliary layer — the predictions
are matched one-to-one to the ground truth with :class:`ka_rs.matcher.HungarianMatcher`
(all layers in ONE native call per step, :meth:`~ka_rs.matcher.HungarianMatcher.match_layers`),
and the set's loss is::

    weight_class * L_class + weight_bbox * L1 + weight_giou * (1 - GIoU)

- ``class_head="softmax"`` (DETR): cross-entropy over C + 1 logits; unmatched queries are
  trained toward "no object" (index C) with class weight ``eos_coef`` (0.1); the loss is the
  weighted mean (divided by the sum of the class weights). Defaults 1 / 5 / 2.
- ``class_head="sigmoid"`` (Deformable DETR / the ``"anchor"`` variant): sigmoid focal loss
  (α 0.25, γ 2) over C logits with one-hot targets (all zero for unmatched queries), summed and
  divided by the number of ground-truth boxes. Defaults 2 / 5 / 2.
- L1 on normalised cxcywh and GIoU on xyxy, summed over matched pairs and divided by the number
  of ground-truth boxes in the batch (at least 1).

With a dense auxiliary head (``DetrConfig.dense_aux``; ``outputs.enc_outputs`` not None) a
``weight_dense``-weighted dense loss is added: every non-padded memory token whose centre lies
inside a ground-truth box (and, for each box, the token nearest to its centre) is a positive for
that box's class; sigmoid focal loss over all tokens and classes, divided by the number of
positives. It needs no matching (fixed assignment, like FCOS / Co-DETR's auxiliary heads).
With two-stage proposals (``enc_outputs["pred_boxes"]``) each positive token's box is also
regressed (L1 ×``weight_bbox`` + GIoU ×``weight_giou``, same normaliser) onto the smallest
ground-truth box it is a positive of.

Under ``torch.distributed`` the normalisers (box count, class-weight sums) are averaged over all
ranks, so that DDP's averaged gradients equal the gradients of the same loss on the global
batch. The box losses use the differentiable torch GIoU below (the Rust GIoU is not
differentiable; it serves the matcher).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ka_rs.matcher import HungarianMatcher

__all__ = [
    "SetCriterion",
    "box_cxcywh_to_xyxy",
    "build_criterion",
    "dense_loss",
    "dense_targets",
    "generalized_box_iou_pairs",
    "sigmoid_focal_loss",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x1, y1, x2, y2); differentiable."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def generalized_box_iou_pairs(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalized IoU of corresponding boxes, differentiable.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (N, 4) xyxy.
        eps: guards the divisions (zero-area boxes give IoU 0, never NaN).

    Returns:
        (N,) GIoU in [-1, 1] of ``boxes1[i]`` and ``boxes2[i]``.
    """
    if boxes1.shape != boxes2.shape or boxes1.shape[-1] != 4:
        raise ValueError(
            f"boxes2: expected the shape of boxes1 {tuple(boxes1.shape)} (N, 4), "
            f"got {tuple(boxes2.shape)}"
        )
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    iou = inter / union.clamp(min=eps)
    hull_lt = torch.minimum(boxes1[:, :2], boxes2[:, :2])
    hull_rb = torch.maximum(boxes1[:, 2:], boxes2[:, 2:])
    hull = (hull_rb - hull_lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=eps)


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Elementwise sigmoid focal loss (RetinaNet), same shape as ``logits``.

    ``targets`` holds 0/1 (or soft) labels of the same shape; ``alpha`` weights positives
    (``1 - alpha`` negatives); ``alpha < 0`` disables the weighting.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _field(outputs: Any, key: str) -> Any:
    return outputs[key] if isinstance(outputs, Mapping) else getattr(outputs, key)


def _enc_outputs(outputs: Any) -> Mapping[str, Tensor] | None:
    if isinstance(outputs, Mapping):
        return outputs.get("enc_outputs")
    return getattr(outputs, "enc_outputs", None)


def _global_mean(values: Tensor) -> Tensor:
    """Average a 1-D tensor of counts over ranks (identity without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


@torch.no_grad()
def dense_targets(
    enc: Mapping[str, Tensor], labels: Sequence[Tensor], boxes: Sequence[Tensor]
) -> tuple[Tensor, int, Tensor, Tensor, Tensor]:
    """Targets of the dense auxiliary head (see the module docstring).

    Args:
        enc: ``enc_outputs`` of a :class:`~ka_rs.models.DetrOutput`: ``pred_logits`` (B, S, C),
            ``token_xy`` (B, S, 2), ``padding_mask`` (B, S).
        labels, boxes: per image (T_i,) labels and (T_i, 4) normalised cxcywh boxes.

    Returns:
        one-hot class targets (B, S, C), the number of positive tokens, the valid-token mask
        (B, S) as float, and for dense boxes: each token's box (B, S, 4) (the smallest box it
        is a positive of) and the positive mask (B, S) bool.
    """
    logits = enc["pred_logits"]
    xy = enc["token_xy"].to(logits.dtype)
    valid = ~enc["padding_mask"].to(torch.bool)
    onehot = torch.zeros_like(logits)
    box_target = logits.new_zeros(*logits.shape[:2], 4)
    for i, (lab, box) in enumerate(zip(labels, boxes, strict=True)):
        if lab.numel() == 0:
            continue
        box = box.to(logits.dtype)
        d = (xy[i][:, None, :] - box[None, :, :2]).abs()  # (S, T, 2)
        inside = (d < box[None, :, 2:] / 2).all(-1) & valid[i][:, None]  # (S, T)
        dist = d.square().sum(-1).masked_fill(~valid[i][:, None], float("inf"))
        inside[dist.argmin(0), torch.arange(lab.numel(), device=lab.device)] = True
        s_idx, t_idx = inside.nonzero(as_tuple=True)
        onehot[i, s_idx, lab[t_idx]] = 1.0
        area = (box[:, 2] * box[:, 3])[None, :].expand_as(inside)
        smallest = area.masked_fill(~inside, float("inf")).argmin(1)  # (S,)
        box_target[i] = box[smallest]
    positive = onehot.amax(-1) > 0
    return onehot, int(positive.sum()), valid.to(logits.dtype), box_target, positive


def dense_loss(
    enc: Mapping[str, Tensor],
    labels: Sequence[Tensor],
    boxes: Sequence[Tensor],
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    weight_bbox: float = 5.0,
    weight_giou: float = 2.0,
) -> dict[str, Tensor]:
    """The dense auxiliary loss of ``enc`` toward ``labels`` / ``boxes`` (ground truth, or a
    student's pseudo-targets).

    Returns ``"loss_dense"`` (focal, over valid tokens), with two-stage proposal boxes also
    ``"loss_dense_bbox"`` / ``"loss_dense_giou"`` (positives only), each divided by the number
    of positive tokens averaged over ranks; ``"total"`` = focal + ``weight_bbox``·L1 +
    ``weight_giou``·GIoU.
    """
    onehot, num_pos, valid, box_target, positive = dense_targets(enc, labels, boxes)
    logits = enc["pred_logits"]
    norm = _global_mean(torch.tensor([float(num_pos)], device=logits.device))[0].clamp(min=1.0)
    focal = sigmoid_focal_loss(logits, onehot, focal_alpha, focal_gamma)
    out = {"loss_dense": (focal * valid[..., None]).sum() / norm}
    total = out["loss_dense"]
    if enc.get("pred_boxes") is not None:  # two-stage proposals: boxes of the positives
        src, tgt = enc["pred_boxes"][positive], box_target[positive]
        out["loss_dense_bbox"] = (src - tgt).abs().sum() / norm
        giou = generalized_box_iou_pairs(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        out["loss_dense_giou"] = (1 - giou).sum() / norm
        total = total + weight_bbox * out["loss_dense_bbox"] + weight_giou * out["loss_dense_giou"]
    out["total"] = total
    return out


class SetCriterion(nn.Module):
    """DETR's Hungarian set loss over the final and every auxiliary prediction set.

    Args:
        num_classes: C, object classes (labels in [0, C)).
        matcher: a :class:`~ka_rs.matcher.HungarianMatcher` whose class cost fits
            ``class_head`` (``"softmax"`` / ``"focal"``); None = ``HungarianMatcher.detr()``
            for softmax, ``HungarianMatcher.deformable()`` for sigmoid.
        class_head: ``"softmax"`` (C + 1 logits, last = no object) or ``"sigmoid"`` (C logits).
        eos_coef: class weight of "no object" (softmax only).
        weight_class: weight of the class loss; None = 1 (softmax) or 2 (sigmoid).
        weight_bbox: weight of the L1 box loss.
        weight_giou: weight of the GIoU loss.
        focal_alpha, focal_gamma: focal-loss parameters (sigmoid head and dense loss).
        aux_loss: also apply the loss to ``outputs["aux_outputs"]``.
        weight_dense: weight of the dense encoder loss (used when the outputs carry
            ``enc_outputs``).
    """

    empty_weight: Tensor  # buffer: class weights of the softmax CE (registered in __init__)

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        class_head: str = "softmax",
        eos_coef: float = 0.1,
        weight_class: float | None = None,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        aux_loss: bool = True,
        weight_dense: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        if class_head not in ("softmax", "sigmoid"):
            raise ValueError(f"class_head: expected 'softmax' or 'sigmoid', got {class_head!r}")
        if matcher is None:
            matcher = (
                HungarianMatcher.detr()
                if class_head == "softmax"
                else HungarianMatcher.deformable()
            )
        wanted = "softmax" if class_head == "softmax" else "focal"
        if getattr(matcher, "class_cost", wanted) != wanted:
            raise ValueError(
                f"matcher: class_cost {matcher.class_cost!r} does not fit class_head "
                f"{class_head!r} (expected {wanted!r})"
            )
        if not 0.0 <= eos_coef <= 1.0:
            raise ValueError(f"eos_coef: expected a value in [0, 1], got {eos_coef!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_head = class_head
        self.eos_coef = float(eos_coef)
        self.weight_class = float(
            weight_class if weight_class is not None else (1.0 if class_head == "softmax" else 2.0)
        )
        self.weight_bbox = float(weight_bbox)
        self.weight_giou = float(weight_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.aux_loss = aux_loss
        self.weight_dense = float(weight_dense)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @property
    def num_logits(self) -> int:
        """K expected in ``pred_logits``: C + 1 (softmax) or C (sigmoid)."""
        return self.num_classes + 1 if self.class_head == "softmax" else self.num_classes

    def forward(self, outputs: Any, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            outputs: :class:`~ka_rs.models.DetrOutput` or DETR-style dict with
                ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) normalised cxcywh and
                (optionally) ``aux_outputs``.
            targets: B dicts with ``labels`` (T_i,) int64 in [0, C) and ``boxes`` (T_i, 4)
                normalised cxcywh.

        Returns:
            ``"loss"``: the weighted total over all prediction sets (what to backpropagate);
            ``"loss_ce"``, ``"loss_bbox"``, ``"loss_giou"``: unweighted components of the
            final layer; ``"loss_ce_{i}"`` etc. for auxiliary layer i (0 = first decoder
            layer); ``"class_error"``: % of matched final-layer queries with the wrong arg-max
            class (for logging, no gradient).

        Raises:
            ValueError: wrong number of logits, labels out of range, B mismatch.
        """
        final = {
            "pred_logits": _field(outputs, "pred_logits"),
            "pred_boxes": _field(outputs, "pred_boxes"),
        }
        sets = [final]
        if self.aux_loss:
            aux = (
                outputs.get("aux_outputs")
                if isinstance(outputs, Mapping)
                else getattr(outputs, "aux_outputs", None)
            )
            sets += [
                {"pred_logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]} for a in aux or []
            ]
        logits0 = final["pred_logits"]
        if logits0.ndim != 3 or logits0.shape[-1] != self.num_logits:
            raise ValueError(
                f"outputs: pred_logits must be (B, Q, {self.num_logits}) for a {self.class_head} "
                f"head over {self.num_classes} classes, got {tuple(logits0.shape)}"
            )
        if len(targets) != logits0.shape[0]:
            raise ValueError(f"targets: {len(targets)} images for a batch of {logits0.shape[0]}")
        device = logits0.device
        labels_all = [t["labels"].to(device) for t in targets]
        boxes_all = [t["boxes"].to(device=device, dtype=final["pred_boxes"].dtype) for t in targets]
        flat_labels = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long)
        if flat_labels.numel() and (
            int(flat_labels.min()) < 0 or int(flat_labels.max()) >= self.num_classes
        ):
            raise ValueError(f"targets: labels must lie in [0, {self.num_classes})")

        indices = self.matcher.match_layers(sets, targets)  # ONE native call for all layers

        # normalisers, averaged over ranks in one all-reduce
        b, q = logits0.shape[:2]
        counts = [float(flat_labels.numel())]
        matched = [sum(len(src) for src, _ in layer) for layer in indices]
        if self.class_head == "softmax":
            counts += [b * q * self.eos_coef + m * (1.0 - self.eos_coef) for m in matched]
        norms = _global_mean(torch.tensor(counts, dtype=torch.float32, device=device))
        num_boxes = norms[0].clamp(min=1.0)
        losses: dict[str, Tensor] = {}
        total = logits0.new_zeros(())
        enc = _enc_outputs(outputs) if self.weight_dense > 0 else None
        if enc is not None:
            dense = dense_loss(
                enc,
                labels_all,
                boxes_all,
                focal_alpha=self.focal_alpha,
                focal_gamma=self.focal_gamma,
                weight_bbox=self.weight_bbox,
                weight_giou=self.weight_giou,
            )
            total = total + self.weight_dense * dense.pop("total")
            losses.update(dense)

        for layer, (pred, idx) in enumerate(zip(sets, indices, strict=True)):
            batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(idx)]).to(
                device
            )
            src_idx = torch.cat([src for src, _ in idx]).to(device)
            tgt_labels = torch.cat([labels_all[i][j.to(device)] for i, (_, j) in enumerate(idx)])
            tgt_boxes = torch.cat([boxes_all[i][j.to(device)] for i, (_, j) in enumerate(idx)])
            class_norm = norms[1 + layer] if self.class_head == "softmax" else num_boxes

            loss_ce = self._class_loss(pred["pred_logits"], batch_idx, src_idx, tgt_labels)
            loss_ce = loss_ce / class_norm.clamp(min=1e-6)
            src_boxes = pred["pred_boxes"][batch_idx, src_idx]
            loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_boxes
            giou = generalized_box_iou_pairs(
                box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)
            )
            loss_giou = (1 - giou).sum() / num_boxes
            total = (
                total
                + self.weight_class * loss_ce
                + self.weight_bbox * loss_bbox
                + self.weight_giou * loss_giou
            )
            suffix = "" if layer == 0 else f"_{layer - 1}"
            losses[f"loss_ce{suffix}"] = loss_ce
            losses[f"loss_bbox{suffix}"] = loss_bbox
            losses[f"loss_giou{suffix}"] = loss_giou
            if layer == 0:
                losses["class_error"] = self._class_error(
                    pred["pred_logits"], batch_idx, src_idx, tgt_labels
                )
        losses["loss"] = total
        return losses

    def _class_loss(
        self, logits: Tensor, batch_idx: Tensor, src_idx: Tensor, tgt_labels: Tensor
    ) -> Tensor:
        """Unnormalised class loss: weighted CE sum (softmax) or focal sum (sigmoid)."""
        b, q, k = logits.shape
        if self.class_head == "softmax":
            target = torch.full((b, q), self.num_classes, dtype=torch.long, device=logits.device)
            target[batch_idx, src_idx] = tgt_labels
            weight = self.empty_weight.to(logits.dtype)
            return F.cross_entropy(logits.transpose(1, 2), target, weight, reduction="sum")
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        return sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum()

    @torch.no_grad()
    def _class_error(
        self, logits: Tensor, batch_idx: Tensor, src_idx: Tensor, tgt_labels: Tensor
    ) -> Tensor:
        if tgt_labels.numel() == 0:
            return logits.new_zeros(())
        pred = logits[batch_idx, src_idx].argmax(-1)
        return 100.0 - 100.0 * (pred == tgt_labels).float().mean()


def build_criterion(config: Any, **overrides: Any) -> SetCriterion:
    """The :class:`SetCriterion` fitting a model config (``num_classes``, ``class_head``).

    ``config`` is a :class:`~ka_rs.models.DetrConfig` (or anything with those attributes);
    ``overrides`` are :class:`SetCriterion` keyword arguments.
    """
    kwargs: dict[str, Any] = {"num_classes": config.num_classes, "class_head": config.class_head}
    kwargs.update(overrides)
    return SetCriterion(**kwargs)

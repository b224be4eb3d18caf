"""ka_rs.losses: DETR's set criterion (and, from the amalgamation work, SA / TA losses)."""

from ka_rs.losses.set_criterion import (
    SetCriterion,
    box_cxcywh_to_xyxy,
    build_criterion,
    generalized_box_iou_pairs,
    sigmoid_focal_loss,
)

__all__ = [
    "SetCriterion",
    "box_cxcywh_to_xyxy",
    "build_criterion",
    "generalized_box_iou_pairs",
    "sigmoid_focal_loss",
]

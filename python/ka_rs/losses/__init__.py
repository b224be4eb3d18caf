"""ka_rs.losses: DETR's set criterion, sequence-level (SA) and task-level (TA) amalgamation."""

from ka_rs.losses.sa import (
    AggregationHintLoss,
    SequenceAmalgamationLoss,
    normalize_sequence,
    sequence_mse,
)
from ka_rs.losses.set_criterion import (
    SetCriterion,
    box_cxcywh_to_xyxy,
    build_criterion,
    dense_loss,
    dense_targets,
    generalized_box_iou_pairs,
    sigmoid_focal_loss,
)
from ka_rs.losses.ta import TaskAmalgamationLoss, amalgamation_weight

__all__ = [
    "AggregationHintLoss",
    "SequenceAmalgamationLoss",
    "SetCriterion",
    "TaskAmalgamationLoss",
    "amalgamation_weight",
    "box_cxcywh_to_xyxy",
    "build_criterion",
    "dense_loss",
    "dense_targets",
    "generalized_box_iou_pairs",
    "normalize_sequence",
    "sequence_mse",
    "sigmoid_focal_loss",
]

"""ka_rs.losses: DETR set criterion, sequence-level (SA) and task-level (TA) amalgamation."""

from ka_rs.losses.sa import (
    AggregationHintLoss,
    SequenceAmalgamationLoss,
    normalize_sequence,
    sequence_mse,
)
from ka_rs.losses.ta import TaskAmalgamationLoss, amalgamation_weight

__all__ = [
    "AggregationHintLoss",
    "SequenceAmalgamationLoss",
    "TaskAmalgamationLoss",
    "amalgamation_weight",
    "normalize_sequence",
    "sequence_mse",
]

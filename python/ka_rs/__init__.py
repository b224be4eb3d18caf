"""ka_rs: knowledge amalgamation for DETR-family object detectors, with a Rust core.

Public names are imported lazily (PEP 562) so that ``import ka_rs`` stays cheap and the
box ops / matcher work without importing the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # ops (Rust box ops and assignment solver)
    "box_convert": "ka_rs.ops",
    "box_iou": "ka_rs.ops",
    "generalized_box_iou": "ka_rs.ops",
    "batched_nms": "ka_rs.ops",
    "linear_sum_assignment": "ka_rs.ops",
    "InfeasibleAssignmentError": "ka_rs.ops",
    # matching
    "HungarianMatcher": "ka_rs.matcher",
    # label spaces and KA pseudo-targets
    "LabelSpace": "ka_rs.labels",
    "PseudoTargets": "ka_rs.labels",
    "build_pseudo_targets": "ka_rs.labels",
    # amalgamation student and losses
    "AmalgamationStudent": "ka_rs.models.student",
    "build_student": "ka_rs.models.student",
    "SequenceAmalgamationLoss": "ka_rs.losses.sa",
    "AggregationHintLoss": "ka_rs.losses.sa",
    "TaskAmalgamationLoss": "ka_rs.losses.ta",
    "amalgamation_weight": "ka_rs.losses.ta",
    # teacher training and evaluation engine
    "train_teacher": "ka_rs.engine.train",
    "load_config": "ka_rs.engine.config",
    "evaluate": "ka_rs.engine.evaluate",
    "load_detector": "ka_rs.engine.checkpoint",
    # amalgamation engine
    "amalgamate": "ka_rs.engine.amalgamate",
    "load_amalgamate_config": "ka_rs.engine.amalgamate_config",
    "load_teachers": "ka_rs.engine.amalgamate",
    # teachers and the amalgamation step
    "Teacher": "ka_rs.teachers",
    "load_teacher": "ka_rs.teachers",
    "AmalgamationStep": "ka_rs.amalgamation",
    "build_amalgamation_student": "ka_rs.amalgamation",
    # data
    "ShapesDataset": "ka_rs.data",
    "CocoDetection": "ka_rs.data",
    "VocDetection": "ka_rs.data",
    "ClassSubset": "ka_rs.data",
    "get_split": "ka_rs.data",
    "make_transforms": "ka_rs.data",
    "collate_fn": "ka_rs.data",
    "export_shapes": "ka_rs.data",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ka_rs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

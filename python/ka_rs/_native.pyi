"""Typed surface of the private Rust extension ``ka_rs._native``.

Use the wrappers in :mod:`ka_rs.ops`, :mod:`ka_rs.matcher` and :mod:`ka_rs.labels` instead;
they accept torch tensors as well as numpy arrays. Every function here validates shapes,
dtypes and finiteness and raises ``ValueError("<arg>: <problem>")``; a scalar argument of the
wrong type (a bool as a weight, a str as ``maximize``) raises ``TypeError("<arg>: ...")``.
A buffer too large for memory (a result, or a contiguous copy of a strided or broadcast
input) raises ``MemoryError("<arg>: <buffer>: out of memory ...")``, a size that cannot exist
raises ``ValueError``: nothing panics or aborts the interpreter.

Arrays may have any strides (non-contiguous, negative, zero for broadcast). Arrays of the
right type that cannot be viewed exactly (non-native byte order, unaligned data, strides that
are not a multiple of the item size) are copied into native, aligned arrays first: never
misread. The GIL is released for the work, which goes parallel (process-local, fork-safe
pool) only above a work-size threshold.
"""

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "InfeasibleAssignmentError",
    "box_convert",
    "box_iou",
    "generalized_box_iou",
    "batched_nms",
    "linear_sum_assignment",
    "match_layers",
    "build_pseudo_targets",
]

_F = TypeVar("_F", np.float32, np.float64)

class InfeasibleAssignmentError(ValueError):
    """No complete assignment exists (too many ``+inf`` entries); the message says "infeasible"."""

def box_convert(boxes: npt.NDArray[_F], in_fmt: str, out_fmt: str) -> npt.NDArray[_F]:
    """Convert ``boxes`` (N, 4) between ``"xyxy"``, ``"cxcywh"`` and ``"xywh"``; same dtype."""

def box_iou(boxes1: npt.NDArray[_F], boxes2: npt.NDArray[_F]) -> npt.NDArray[_F]:
    """Pairwise IoU (N, M) of xyxy boxes (N, 4) and (M, 4) of the same dtype. Any finite
    coordinates: areas that would overflow or underflow the dtype are computed in float64
    scaled to each pair's enclosing box, so the result is never NaN."""

def generalized_box_iou(boxes1: npt.NDArray[_F], boxes2: npt.NDArray[_F]) -> npt.NDArray[_F]:
    """Pairwise GIoU (N, M) of xyxy boxes; zero-area boxes give IoU 0; inverted boxes raise;
    never NaN for finite input (see :func:`box_iou`)."""

def batched_nms(
    boxes: npt.NDArray[_F],
    scores: npt.NDArray[_F],
    labels: npt.NDArray[np.int64],
    iou_threshold: float,
) -> npt.NDArray[np.int64]:
    """Class-aware NMS over xyxy ``boxes`` (N, 4) with ``scores`` (N,) of the same dtype
    (float32 or float64); kept indices by decreasing score."""

def linear_sum_assignment(
    cost: npt.NDArray[np.float64] | npt.NDArray[np.float32], maximize: bool = False
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Rectangular LSAP with scipy's contract: ``(rows, cols)``, rows sorted, ``+inf`` forbidden.
    float32 costs are widened exactly; ``maximize`` must be a bool (``TypeError`` otherwise)."""

def match_layers(
    pred_logits: Sequence[npt.NDArray[np.float32]],
    pred_boxes: Sequence[npt.NDArray[np.float32]],
    target_labels: npt.NDArray[np.int64],
    target_boxes: npt.NDArray[np.float32],
    target_sizes: npt.NDArray[np.int64],
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    class_cost: str = "softmax",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> tuple[npt.NDArray[np.int64], list[int]]:
    """Hungarian-match L prediction sets of B images in one call.

    ``pred_logits`` / ``pred_boxes``: L arrays (B, Q, K) / (B, Q, 4) cxcywh, all of one shape
    (separate arrays: no stacking copy); ``target_labels`` (ΣT,), ``target_boxes`` (ΣT, 4)
    cxcywh, ``target_sizes`` (B,). Returns ``(indices (2M,), counts)``: ``counts`` lists the
    pairs of each block (L·B, l-major then b); ``indices`` holds every block's query indices
    (sorted within a block), then every block's target indices (local to the image).
    Errors about targets read ``target_labels: image i: ...`` / ``target_boxes: image i: ...``.
    Weights are real numbers within float32's range (a bool is a ``TypeError``); a Q×T cost
    block too large for memory is a ``MemoryError`` naming the block.
    """

def build_pseudo_targets(
    teacher_logits: Sequence[npt.NDArray[np.float32]],
    teacher_boxes: Sequence[npt.NDArray[np.float32]],
    local_to_union: Sequence[npt.NDArray[np.int64]],
    num_union_classes: int,
    teacher_kinds: list[str] | tuple[str, ...],
    threshold: float,
    top_n: int,
    fill_logit: float,
    nms_iou: float | None = None,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]:
    """KA pseudo-targets for a batch and all teachers in one call (see ``ka_rs.labels``).

    Per teacher k: ``teacher_logits[k]`` (B, Q_k, K_k), ``teacher_boxes[k]`` (B, Q_k, 4)
    normalised cxcywh, ``local_to_union[k]`` (C_k,), ``teacher_kinds[k]`` ``"softmax"``
    (K_k = C_k + 1, last = background) or ``"sigmoid"`` (K_k = C_k). Returns ``(labels (M,),
    boxes (M, 4) cxcywh, soft_logits (M, U + 1), scores (M,), teacher (M,), counts (B,))``,
    images in order, rows of an image by decreasing score (NMS before top-n).
    """

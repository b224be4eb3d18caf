"""ka_rs.data: detection datasets, class splits, transforms and batching.

- :class:`ShapesDataset` / :func:`export_shapes`: the embedded procedurally generated dataset.
- :class:`CocoDetection`, :class:`VocDetection`: readers for COCO-format and Pascal VOC folders;
  bad input raises :class:`DatasetError` (``skip_invalid=True`` logs and skips instead).
- :func:`get_split`, :func:`parse_split`, :class:`ClassSubset`: teacher class splits.
- :func:`make_transforms` and the transforms of :mod:`ka_rs.data.transforms`.
- :func:`collate_fn`: pads a batch and builds the padding mask (True = padded).

Dataset items after :func:`make_transforms` are ``(image (3, H, W) float normalised, target)``
with ``labels`` int64 (T,), ``boxes`` float32 (T, 4) normalised cxcywh, ``image_id`` int,
``orig_size`` / ``size`` int64 (2,) = (h, w), ``iscrowd`` int64 (T,), ``area`` float32 (T,).
Without transforms an item is ``(RGB image, target)`` with absolute xyxy pixel boxes; the image
is PIL ``"RGB"``, or a float ``(3, H, W)`` tensor in [0, 1] for 16-bit / float image files
(:mod:`ka_rs.data.images`: how every Pillow mode and the EXIF orientation are decoded).
"""

from .base import PER_OBJECT_KEYS, DatasetError, DetectionDataset, SkippedItem
from .coco import CocoDetection
from .collate import collate_fn, pad_images
from .shapes import (
    DEFAULT_SPLIT_SIZES,
    MIN_VISIBLE_FRACTION,
    SHAPES_CLASSES,
    ShapeObject,
    ShapesDataset,
    ShapesSample,
    export_shapes,
    object_mask,
)
from .splits import (
    COCO_40_40_FIRST,
    COCO_CLASSES,
    SPLIT_PRESETS,
    ClassSubset,
    get_split,
    parse_split,
    validate_split,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    Resize,
    ToTensor,
    make_transforms,
)
from .voc import VOC_CLASSES, VocDetection

__all__ = [
    "COCO_40_40_FIRST",
    "COCO_CLASSES",
    "DEFAULT_SPLIT_SIZES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIN_VISIBLE_FRACTION",
    "PER_OBJECT_KEYS",
    "SHAPES_CLASSES",
    "SPLIT_PRESETS",
    "VOC_CLASSES",
    "ClassSubset",
    "CocoDetection",
    "ColorJitter",
    "Compose",
    "DatasetError",
    "DetectionDataset",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "ShapeObject",
    "ShapesDataset",
    "ShapesSample",
    "SkippedItem",
    "ToTensor",
    "VocDetection",
    "collate_fn",
    "export_shapes",
    "get_split",
    "make_transforms",
    "object_mask",
    "pad_images",
    "parse_split",
    "validate_split",
]

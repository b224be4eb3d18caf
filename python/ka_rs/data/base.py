"""Shared pieces of the detection datasets: errors, skip reports, the dataset base class.

Raw target convention (what a dataset's ``load`` returns, before any transform):

- ``"boxes"``: float32 ``(T, 4)`` **absolute xyxy** pixel coordinates (continuous: a box covering
  pixel columns ``a..b`` inclusive is ``x1=a, x2=b+1``), clipped to the image.
- ``"labels"``: int64 ``(T,)`` contiguous class indices into ``class_names``.
- ``"image_id"``: ``int``; ``"orig_size"`` / ``"size"``: int64 ``(2,)`` = ``(h, w)``.
- ``"iscrowd"``: int64 ``(T,)``; ``"area"``: float32 ``(T,)`` (pixels).
- optional ``"difficult"``: bool ``(T,)`` (Pascal VOC).

The transforms of :mod:`ka_rs.data.transforms` keep ``"boxes"`` in absolute xyxy until
:class:`~ka_rs.data.transforms.Normalize`, which converts them to normalised ``(cx, cy, w, h)``
relative to the transformed, unpadded image (the model convention).
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "PER_OBJECT_KEYS",
    "DatasetError",
    "DetectionDataset",
    "ImageDecodeError",
    "SkippedItem",
    "Target",
    "empty_target",
]

logger = logging.getLogger("ka_rs.data")

Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]

#: Target keys holding one entry per object (filtered together by :class:`ClassSubset`).
PER_OBJECT_KEYS: tuple[str, ...] = ("boxes", "labels", "iscrowd", "area", "difficult")


class DatasetError(ValueError):
    """Invalid dataset input: malformed file, missing/corrupt image, bad annotation.

    The message always names the offending file and the image / annotation id. The same
    information is available as attributes ``file`` (str) and ``item`` (str, e.g.
    ``"annotation id 17"``).
    """

    def __init__(self, file: str | os.PathLike[str], item: str | None, problem: str) -> None:
        self.file = str(file)
        self.item = item
        self.problem = problem
        where = f"{self.file}" + (f" ({item})" if item else "")
        super().__init__(f"{where}: {problem}")


class ImageDecodeError(DatasetError):
    """An image file that cannot be turned into RGB pixels: truncated, corrupt, not an image,
    unreadable EXIF, or a pixel mode with no RGB reading (see :mod:`ka_rs.data.images`).

    ``mode`` is the Pillow mode that was refused, ``None`` when the file did not decode.
    """

    def __init__(
        self,
        file: str | os.PathLike[str],
        item: str | None,
        problem: str,
        mode: str | None = None,
    ) -> None:
        super().__init__(file, item, problem)
        self.mode = mode


@dataclass(frozen=True)
class SkippedItem:
    """One input item left out because ``skip_invalid=True``.

    ``kind`` is ``"image"`` (the image and all its annotations were dropped) or
    ``"annotation"`` (one object was dropped); ``message`` is the full error text.
    """

    kind: str
    file: str
    item: str | None
    message: str


class DetectionDataset(Dataset[tuple[Any, Target]]):
    """Base class: ``__getitem__`` = ``load`` + optional ``transforms``.

    Subclasses implement :meth:`__len__`, :meth:`load` (RGB image and raw target, see the
    module docstring) and :meth:`coco_gt`, and set ``class_names``.

    Load-time errors (an unreadable image) raise :class:`DatasetError` unless the dataset was
    built with ``skip_invalid=True``: then the error is logged, recorded in ``.skipped`` (per
    process, so in DataLoader workers each worker keeps its own list) and the next valid item is
    returned instead (``index+1``, wrapping around), so that a training loop keeps going.
    """

    class_names: list[str]

    def __init__(self, transforms: Transform | None = None, skip_invalid: bool = False) -> None:
        self.transforms = transforms
        self.skip_invalid = bool(skip_invalid)
        self.skipped: list[SkippedItem] = []
        self._bad_indices: set[int] = set()

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image | torch.Tensor, Target]:  # pragma: no cover
        """Return the untransformed ``(RGB image, raw target)`` of item ``index``: a PIL
        ``"RGB"`` image, or a float32 ``(3, H, W)`` tensor in [0, 1] for 16-bit / float image
        files (:func:`ka_rs.data.images.load_rgb_image`)."""
        raise NotImplementedError

    def coco_gt(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """COCO-format ground truth (original pixels, category id = class index + 1)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def _check_index(self, index: int) -> int:
        n = len(self)
        index = operator.index(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for dataset of length {n}")
        return int(index)

    def _record_skip(self, kind: str, err: DatasetError) -> None:
        self.skipped.append(SkippedItem(kind, err.file, err.item, str(err)))
        logger.warning("skipping invalid %s: %s", kind, err)

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        """Item ``index``: ``transforms(image, target)``, or the raw pair without transforms."""
        index = self._check_index(index)
        n = len(self)
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self._bad_indices:
                continue
            try:
                image, target = self.load(i)
            except DatasetError as e:
                if not self.skip_invalid:
                    raise
                self._bad_indices.add(i)
                self._record_skip("image", e)
                continue
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            return image, target
        raise DatasetError(type(self).__name__, None, "no readable image left in the dataset")

    def check_images(self) -> list[int]:
        """Decode every image now (slow: a full pass); return the indices that fail.

        With ``skip_invalid=True`` failures are logged, recorded in ``.skipped`` and later
        skipped by ``__getitem__``; otherwise the first failure raises :class:`DatasetError`.
        """
        bad = []
        for i in range(len(self)):
            try:
                self.load(i)
            except DatasetError as e:
                if not self.skip_invalid:
                    raise
                if i not in self._bad_indices:
                    self._bad_indices.add(i)
                    self._record_skip("image", e)
                bad.append(i)
        return bad


def empty_target(image_id: int, height: int, width: int) -> Target:
    """A raw target with no objects for an image of ``height`` x ``width`` pixels."""
    size = torch.tensor([height, width], dtype=torch.int64)
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "image_id": int(image_id),
        "orig_size": size,
        "size": size.clone(),
        "iscrowd": torch.zeros((0,), dtype=torch.int64),
        "area": torch.zeros((0,), dtype=torch.float32),
    }

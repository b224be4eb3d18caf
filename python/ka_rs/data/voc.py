"""Pascal VOC detection datasets (VOCdevkit layout, XML annotations).

``root`` is one year's folder (e.g. ``VOCdevkit/VOC2007``) holding ``Annotations/<id>.xml``,
``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<image_set>.txt``.

Coordinates: VOC boxes are 1-based inclusive pixel indices; they are converted to 0-based
continuous coordinates as detectron2 does (``x1 = xmin - 1``, ``y1 = ymin - 1``,
``x2 = xmax``, ``y2 = ymax``), so a box with ``xmin == xmax`` is one pixel wide.

**Difficult objects** are kept: in the item target (``target["difficult"]``, bool, and
``target["iscrowd"]`` = difficult) so that training uses them (as detectron2 does), and in
:meth:`VocDetection.coco_gt` with ``iscrowd = 1`` (plus ``"difficult": 1`` / ``"ignore": 1``):
COCO evaluation then neither rewards nor penalises detections of them, the analogue of VOC's
"ignore difficult". (COCOeval matches crowd regions by intersection over the *detection* area,
a slightly more lenient criterion than VOC's IoU.)

All XML files are parsed and validated when the dataset is built; images are decoded with
Pillow at load time, upright per their EXIF orientation (``<size>`` and the boxes are taken to
be those of the upright image; :mod:`ka_rs.data.images`). Problems raise
:class:`~ka_rs.data.base.DatasetError` naming the file and the image id (and object index),
unless ``skip_invalid=True`` (log + ``.skipped``).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import (
    DatasetError,
    DetectionDataset,
    Target,
    Transform,
    empty_target,
    logger,
)
from .images import DecodedImage, load_rgb_image, read_image_size

__all__ = ["VOC_CLASSES", "VocDetection"]

#: The 20 Pascal VOC classes in alphabetical order (the usual label order).
VOC_CLASSES: list[str] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


class VocDetection(DetectionDataset):
    """Pascal VOC (or any VOC-format) detection dataset.

    Args:
        root: the year folder containing ``Annotations``, ``JPEGImages``, ``ImageSets/Main``.
        image_set: name of the list in ``ImageSets/Main`` (``"trainval"``, ``"train"``,
            ``"val"``, ``"test"``, ...).
        transforms: callable ``(image, target) -> (image, target)``; without it an item is
            ``(RGB image, raw target)`` with absolute xyxy boxes; the image is PIL ``"RGB"``,
            or a float ``(3, H, W)`` tensor in [0, 1] for 16-bit / float files
            (:mod:`ka_rs.data.images` has the table of pixel modes).
        skip_invalid: log and skip bad images / objects instead of raising.
        class_names: label order; default :data:`VOC_CLASSES`. An object whose ``<name>`` is not
            in it is an error ("unknown class").

    Image ids are ``index + 1`` in the order of the image-set file; ``image_names[i]`` is the
    VOC id (e.g. ``"000005"``). Target keys: ``boxes, labels, image_id, orig_size, size,
    iscrowd (= difficult), area (box area), difficult``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_set: str = "trainval",
        transforms: Transform | None = None,
        skip_invalid: bool = False,
        *,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(transforms=transforms, skip_invalid=skip_invalid)
        self.root = Path(root)
        self.image_set = image_set
        self.class_names = list(VOC_CLASSES if class_names is None else class_names)
        if len(set(self.class_names)) != len(self.class_names) or not self.class_names:
            raise ValueError(f"class_names: must be non-empty and unique, got {self.class_names}")
        self._label = {n: i for i, n in enumerate(self.class_names)}
        if not (self.root / "Annotations").is_dir():
            raise DatasetError(
                self.root, None, "root: no 'Annotations' folder (expected e.g. VOCdevkit/VOC2007)"
            )
        list_file = self.root / "ImageSets" / "Main" / f"{image_set}.txt"
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as e:
            raise DatasetError(list_file, None, f"image set {image_set!r} not found") from e
        names = [ln.split()[0] for ln in lines if ln.strip()]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            raise DatasetError(list_file, None, f"duplicate image ids {dup}")

        self.image_names: list[str] = []
        self._records: list[dict[str, Any]] = []
        n_objects_skipped = 0
        for name in names:
            rec, skipped = self._parse(name)
            n_objects_skipped += skipped
            if rec is not None:
                self.image_names.append(name)
                self._records.append(rec)
        if self.skipped:
            logger.warning(
                "%s: skipped %d image(s) and %d object(s); see .skipped",
                list_file,
                len(self.skipped) - n_objects_skipped,
                n_objects_skipped,
            )

    def _fail(self, file: Path, item: str, problem: str, kind: str) -> None:
        err = DatasetError(file, item, problem)
        if not self.skip_invalid:
            raise err
        self._record_skip(kind, err)

    def _parse(self, name: str) -> tuple[dict[str, Any] | None, int]:
        """Parse and validate one XML; ``(record or None if the image is skipped, #objects
        skipped)``."""
        xml_path = self.root / "Annotations" / f"{name}.xml"
        item = f"image id {name!r}"
        try:
            tree = ET.parse(xml_path)
        except FileNotFoundError:
            self._fail(xml_path, item, "annotation file not found", "image")
            return None, 0
        except ET.ParseError as e:
            self._fail(xml_path, item, f"malformed XML: {e}", "image")
            return None, 0
        node = tree.getroot()
        image_path = self.root / "JPEGImages" / f"{name}.jpg"
        if not image_path.is_file():
            fname = _text(node, "filename")
            alt = self.root / "JPEGImages" / fname if fname else None
            if alt is None or not alt.is_file():
                self._fail(image_path, item, "image file not found", "image")
                return None, 0
            image_path = alt
        size = node.find("size")
        try:
            w = int(float(_text(size, "width") or "nan")) if size is not None else 0
            h = int(float(_text(size, "height") or "nan")) if size is not None else 0
        except ValueError:
            w = h = 0
        if w <= 0 or h <= 0:  # missing or unusable <size>: the header's displayed size
            try:
                w, h = read_image_size(image_path, item)
            except DatasetError as e:
                self._fail(image_path, item, e.problem, "image")
                return None, 0

        boxes: list[list[float]] = []
        labels: list[int] = []
        difficult: list[bool] = []
        skipped = 0
        for k, obj in enumerate(node.findall("object")):
            oitem = f"{item}, object {k}"
            cls = _text(obj, "name")
            if cls not in self._label:
                self._fail(xml_path, oitem, f"unknown class {cls!r}", "annotation")
                skipped += 1
                continue
            bnd = obj.find("bndbox")
            try:
                if bnd is None:
                    raise ValueError("missing <bndbox>")
                coords = []
                for tag in ("xmin", "ymin", "xmax", "ymax"):
                    txt = _text(bnd, tag)
                    if txt is None:
                        raise ValueError(f"missing <{tag}>")
                    v = float(txt)
                    if not math.isfinite(v):
                        raise ValueError(f"<{tag}> is not finite")
                    coords.append(v)
            except ValueError as e:
                self._fail(xml_path, oitem, f"bad bndbox: {e}", "annotation")
                skipped += 1
                continue
            xmin, ymin, xmax, ymax = coords
            if xmax < xmin or ymax < ymin:
                self._fail(
                    xml_path,
                    oitem,
                    f"box has negative width/height (xmin={xmin:g}, xmax={xmax:g}, "
                    f"ymin={ymin:g}, ymax={ymax:g})",
                    "annotation",
                )
                skipped += 1
                continue
            x1, y1, x2, y2 = xmin - 1.0, ymin - 1.0, xmax, ymax
            if x1 >= w or y1 >= h or x2 <= 0 or y2 <= 0:
                self._fail(xml_path, oitem, f"box lies outside the {w}x{h} image", "annotation")
                skipped += 1
                continue
            diff_txt = _text(obj, "difficult") or "0"
            try:
                diff = bool(int(float(diff_txt)))
            except ValueError:
                self._fail(xml_path, oitem, f"bad <difficult> {diff_txt!r}", "annotation")
                skipped += 1
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self._label[cls])
            difficult.append(diff)
        rec = {
            "path": image_path,
            "width": w,
            "height": h,
            "boxes": boxes,
            "labels": labels,
            "difficult": difficult,
        }
        return rec, skipped

    # ------------------------------------------------------------ dataset protocol

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (
            f"VocDetection(root={str(self.root)!r}, image_set={self.image_set!r}, "
            f"images={len(self)})"
        )

    def load(self, index: int) -> tuple[DecodedImage, Target]:
        """Raw item: ``(RGB image, target with absolute xyxy boxes)``; the image is a PIL
        ``"RGB"`` image, or a float32 ``(3, H, W)`` tensor in [0, 1] for 16-bit / float files
        (:mod:`ka_rs.data.images`), upright per its EXIF orientation."""
        rec = self._records[index]
        item = f"image id {self.image_names[index]!r}"
        w, h = rec["width"], rec["height"]
        image = load_rgb_image(rec["path"], item, (w, h), "the XML's <size>")
        target = empty_target(index + 1, h, w)
        if rec["boxes"]:
            boxes = torch.tensor(rec["boxes"], dtype=torch.float32)
            boxes[:, 0::2].clamp_(0, w)
            boxes[:, 1::2].clamp_(0, h)
            target["boxes"] = boxes
            target["labels"] = torch.tensor(rec["labels"], dtype=torch.int64)
            target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        diff = torch.tensor(rec["difficult"], dtype=torch.bool)
        target["difficult"] = diff
        target["iscrowd"] = diff.to(torch.int64)
        return image, target

    def coco_gt(self) -> dict[str, Any]:
        """COCO ground truth: 0-based ``[x, y, w, h]`` boxes (unclipped), category id = class
        index + 1, image id = index + 1, difficult objects as ``iscrowd=1`` (see module doc)."""
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i, (name, rec) in enumerate(zip(self.image_names, self._records, strict=True)):
            images.append(
                {
                    "id": i + 1,
                    "file_name": rec["path"].name,
                    "voc_id": name,
                    "width": rec["width"],
                    "height": rec["height"],
                }
            )
            for box, label, diff in zip(rec["boxes"], rec["labels"], rec["difficult"], strict=True):
                x1, y1, x2, y2 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": label + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": int(diff),
                        "difficult": int(diff),
                        "ignore": int(diff),
                    }
                )
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

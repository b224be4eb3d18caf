"""COCO-format detection datasets (``instances_*.json`` + an image folder).

Category ids of the file are mapped to contiguous class indices **ordered by category id**
(``class_names[i]`` is the name of the ``i``-th smallest id); names must be unique, since
class splits and subsets refer to classes by name. ``coco_gt()`` re-numbers categories as
``index + 1``; ``label_to_cat_id`` / ``cat_id_to_label`` map back and forth to the file's ids.

All annotations are validated when the dataset is built (cheap, no image decoding); images are
decoded with Pillow at load time, upright per their EXIF orientation (boxes and width/height are
taken to be those of the upright image, as detectron2 assumes; :mod:`ka_rs.data.images`).
Problems raise :class:`~ka_rs.data.base.DatasetError` (a ``ValueError``) naming the file and the
image / annotation id, unless ``skip_invalid=True``: then each bad item is logged (``logging``,
logger ``ka_rs.data``) and listed in ``.skipped``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO

from .base import (
    DatasetError,
    DetectionDataset,
    Target,
    Transform,
    empty_target,
    logger,
)
from .images import DecodedImage, load_rgb_image, read_image_size

__all__ = ["CocoDetection"]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class CocoDetection(DetectionDataset):
    """A detection dataset in COCO format, read with pycocotools.

    Args:
        image_dir: folder holding the images (``file_name`` entries are relative to it).
        ann_file: COCO ``instances`` JSON with ``images``, ``annotations`` (optional for
            image-info files) and ``categories``.
        transforms: callable ``(image, target) -> (image, target)``; without it an item is
            ``(RGB image, raw target)`` with absolute xyxy boxes (:mod:`ka_rs.data.base`); the
            image is PIL ``"RGB"``, or a float ``(3, H, W)`` tensor in [0, 1] for 16-bit / float
            files (:mod:`ka_rs.data.images` has the table of pixel modes).
        skip_invalid: log and skip bad images / annotations instead of raising.
        keep_crowd: also put ``iscrowd=1`` annotations in the training targets. By default they
            are left out of targets (as in DETR: a crowd region is not one object) but always
            kept in :meth:`coco_gt`, where COCO evaluation uses them to ignore detections.

    Raised at construction (:class:`DatasetError`): missing/malformed JSON, wrong structure,
    duplicate ids or category names, missing image file, annotation with an unknown image or
    category id, a ``bbox`` that is not 4 finite numbers or has non-positive width/height, or
    lies entirely outside its image. Raised at load time: unreadable/corrupt image or one in a
    pixel mode with no RGB reading (:class:`~ka_rs.data.base.ImageDecodeError`), or an image
    whose displayed size (after its EXIF orientation: annotations are taken to be made on the
    upright image, as detectron2 does) differs from the ``width``/``height`` in the file. A
    missing ``width``/``height`` is read from the image header, EXIF orientation applied.

    Item target (after transforms see :mod:`ka_rs.data.transforms`): ``boxes`` (clipped to the
    image), ``labels``, ``image_id`` (the file's image id), ``orig_size``, ``size``,
    ``iscrowd``, ``area`` (the file's ``area``, else box area).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        transforms: Transform | None = None,
        skip_invalid: bool = False,
        *,
        keep_crowd: bool = False,
    ) -> None:
        super().__init__(transforms=transforms, skip_invalid=skip_invalid)
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.keep_crowd = bool(keep_crowd)
        if not self.image_dir.is_dir():
            raise DatasetError(self.image_dir, None, "image_dir: not a directory")
        raw = self._read_json()
        categories = self._check_categories(raw)
        self.label_to_cat_id: list[int] = sorted(categories)
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.label_to_cat_id)}
        self.class_names = [categories[c] for c in self.label_to_cat_id]
        images = self._check_images(raw)
        annotations = self._check_annotations(raw, images)
        if self.skipped:
            n_img = sum(s.kind == "image" for s in self.skipped)
            n_ann = sum(s.kind == "annotation" for s in self.skipped)
            self._log_summary(n_img, n_ann)
        #: annotations left out because their image was skipped (counted, not listed)
        self.num_annotations_of_skipped_images = self._orphans

        dataset = {
            "images": list(images.values()),
            "annotations": annotations,
            "categories": [{"id": c, "name": categories[c]} for c in self.label_to_cat_id],
        }
        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.ids: list[int] = [img["id"] for img in dataset["images"]]

    # ------------------------------------------------------------ validation

    def _fail(self, item: str | None, problem: str, kind: str, file: Path | None = None) -> None:
        err = DatasetError(file if file is not None else self.ann_file, item, problem)
        if not self.skip_invalid:
            raise err
        self._record_skip(kind, err)

    def _log_summary(self, n_img: int, n_ann: int) -> None:
        logger.warning(
            "%s: skipped %d image(s) (with their %d annotation(s)) and %d other annotation(s); "
            "see .skipped",
            self.ann_file,
            n_img,
            self._orphans,
            n_ann,
        )

    def _read_json(self) -> dict[str, Any]:
        try:
            text = self.ann_file.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise DatasetError(self.ann_file, None, "annotation file not found") from e
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(self.ann_file, None, f"cannot read annotation file: {e}") from e
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(
                self.ann_file, None, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from e
        if not isinstance(raw, dict):
            raise DatasetError(self.ann_file, None, "top level must be a JSON object")
        for key in ("images", "categories"):
            if not isinstance(raw.get(key), list):
                raise DatasetError(self.ann_file, None, f"missing or non-list {key!r}")
        if not isinstance(raw.get("annotations", []), list):
            raise DatasetError(self.ann_file, None, "'annotations' must be a list")
        return raw

    def _check_categories(self, raw: dict[str, Any]) -> dict[int, str]:
        categories: dict[int, str] = {}
        seen_names: dict[str, int] = {}
        for k, cat in enumerate(raw["categories"]):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise DatasetError(self.ann_file, f"categories[{k}]", "category without int 'id'")
            cid = cat["id"]
            name = cat.get("name")
            if not isinstance(name, str) or not name:
                raise DatasetError(self.ann_file, f"category id {cid}", "missing 'name'")
            if cid in categories:
                raise DatasetError(self.ann_file, f"category id {cid}", "duplicate category id")
            if name in seen_names:
                raise DatasetError(
                    self.ann_file,
                    f"category id {cid}",
                    f"duplicate category name {name!r} (also id {seen_names[name]})",
                )
            categories[cid] = name
            seen_names[name] = cid
        if not categories:
            raise DatasetError(self.ann_file, None, "no categories")
        return categories

    def _check_images(self, raw: dict[str, Any]) -> dict[int, dict[str, Any]]:
        images: dict[int, dict[str, Any]] = {}
        all_ids: set[int] = set()
        for k, img in enumerate(raw["images"]):
            if not isinstance(img, dict) or not _is_int(img.get("id")):
                raise DatasetError(self.ann_file, f"images[{k}]", "image entry without int 'id'")
            iid = img["id"]
            item = f"image id {iid}"
            if iid in all_ids:
                raise DatasetError(self.ann_file, item, "duplicate image id")
            all_ids.add(iid)
            fname = img.get("file_name")
            if not isinstance(fname, str) or not fname:
                self._fail(item, "missing 'file_name'", "image")
                continue
            w, h = img.get("width"), img.get("height")
            path = self.image_dir / fname
            if not path.is_file():
                self._fail(item, "image file not found", "image", file=path)
                continue
            if w is None or h is None:
                try:  # header only: cheap; the displayed (EXIF-oriented) size
                    w, h = read_image_size(path, item)
                except DatasetError as e:
                    self._fail(item, e.problem, "image", file=path)
                    continue
            if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
                self._fail(item, f"invalid width/height {w!r}/{h!r}", "image")
                continue
            images[iid] = {"id": iid, "file_name": fname, "width": w, "height": h}
        return images

    def _check_annotations(
        self, raw: dict[str, Any], images: dict[int, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        self._orphans = 0
        known_images = {img["id"] for img in raw["images"] if isinstance(img, dict)}
        for k, ann in enumerate(raw.get("annotations", [])):
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
                raise DatasetError(
                    self.ann_file, f"annotations[{k}]", "annotation without int 'id'"
                )
            aid = ann["id"]
            item = f"annotation id {aid}"
            if aid in seen:
                raise DatasetError(self.ann_file, item, "duplicate annotation id")
            seen.add(aid)
            iid = ann.get("image_id")
            item = f"annotation id {aid}, image id {iid}"
            if iid not in known_images:
                self._fail(item, f"unknown image id {iid!r}", "annotation")
                continue
            if iid not in images:  # its image was skipped (and reported) already
                self._orphans += 1
                continue
            cid = ann.get("category_id")
            if not _is_int(cid) or cid not in self.cat_id_to_label:
                self._fail(item, f"unknown category id {cid!r}", "annotation")
                continue
            bbox = ann.get("bbox")
            if (
                not isinstance(bbox, list | tuple)
                or len(bbox) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
                or not all(math.isfinite(v) for v in bbox)
            ):
                self._fail(
                    item, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}", "annotation"
                )
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                what = "negative" if min(w, h) < 0 else "zero"
                self._fail(item, f"bbox {bbox!r} has {what} width/height", "annotation")
                continue
            img = images[iid]
            if x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0:
                self._fail(
                    item,
                    f"bbox {bbox!r} lies outside the {img['width']}x{img['height']} image",
                    "annotation",
                )
                continue
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                self._fail(item, f"iscrowd must be 0 or 1, got {iscrowd!r}", "annotation")
                continue
            area = ann.get("area")
            if not isinstance(area, int | float) or isinstance(area, bool) or not area >= 0:
                area = w * h
            clean = {
                "id": aid,
                "image_id": iid,
                "category_id": cid,
                "bbox": [x, y, w, h],
                "area": float(area),
                "iscrowd": int(iscrowd),
            }
            if "segmentation" in ann:
                clean["segmentation"] = ann["segmentation"]
            out.append(clean)
        return out

    # ------------------------------------------------------------ dataset protocol

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"CocoDetection(image_dir={str(self.image_dir)!r}, ann_file={str(self.ann_file)!r}, "
            f"images={len(self)}, classes={len(self.class_names)})"
        )

    def load(self, index: int) -> tuple[DecodedImage, Target]:
        """Raw item: ``(RGB image, target with absolute xyxy boxes)``; the image is a PIL
        ``"RGB"`` image, or a float32 ``(3, H, W)`` tensor in [0, 1] for 16-bit / float files
        (:mod:`ka_rs.data.images`), upright per its EXIF orientation."""
        iid = self.ids[index]
        info = self.coco.imgs[iid]
        item = f"image id {iid}"
        path = self.image_dir / info["file_name"]
        w, h = info["width"], info["height"]
        image = load_rgb_image(path, item, (w, h), "the annotation file's width x height")
        anns = [a for a in self.coco.imgToAnns.get(iid, []) if self.keep_crowd or not a["iscrowd"]]
        target = empty_target(iid, h, w)
        if anns:
            boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
            boxes[:, 2:] += boxes[:, :2]
            boxes[:, 0::2].clamp_(0, w)
            boxes[:, 1::2].clamp_(0, h)
            target["boxes"] = boxes
            target["labels"] = torch.tensor(
                [self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64
            )
            target["iscrowd"] = torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64)
            target["area"] = torch.tensor([a["area"] for a in anns], dtype=torch.float32)
        return image, target

    def coco_gt(self) -> dict[str, Any]:
        """COCO ground truth in the ka_rs convention.

        Original pixel ``bbox`` ``[x, y, w, h]`` and ids of the file, crowd annotations
        included, ``category_id`` = class index + 1 (use ``label_to_cat_id`` to go back).
        Skipped images / annotations are absent.
        """
        images = [dict(self.coco.imgs[i]) for i in self.ids]
        annotations = []
        for iid in self.ids:
            for a in self.coco.imgToAnns.get(iid, []):
                ann = {k: v for k, v in a.items() if k != "segmentation"}
                ann["category_id"] = self.cat_id_to_label[a["category_id"]] + 1
                annotations.append(ann)
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

"""Class splits between teachers, and class-subset views of a dataset.

A *split* is an ordered mapping ``{teacher name: [class names]}``. Presets
(:func:`get_split`):

- ``"voc-10+10"``: the 20 VOC classes in alphabetical order, the first ten to ``teacher_a``,
  the last ten to ``teacher_b`` (the paper's VOC split);
- ``"coco-40+40"``: the paper's 40 COCO classes to ``teacher_a`` (list in ``NOTES.md``), the
  other 40 to ``teacher_b`` (both in COCO category order);
- ``"shapes-halves"``: the first four :data:`~ka_rs.data.shapes.SHAPES_CLASSES` to
  ``teacher_a``, the last four to ``teacher_b``;
- ``"shapes-thirds-overlap"``: three teachers over overlapping windows of the eight shapes
  classes, every class known to one or two teachers and each pair of teachers sharing one:
  ``teacher_a`` circle, square, triangle, star; ``teacher_b`` star, cross, ring, diamond;
  ``teacher_c`` circle, diamond, crescent (circle, star and diamond are each known to two).
  Their union, in teacher order, is :data:`~ka_rs.data.shapes.SHAPES_CLASSES` itself.

User-defined splits are strings ``"name=class,class;name=class,..."`` (:func:`parse_split`),
e.g. ``"animals=cat,dog;vehicles=car,bus"``; class names may contain spaces. Class sets may
overlap (ka_rs merges a class known to several teachers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import PER_OBJECT_KEYS, Target
from .shapes import SHAPES_CLASSES
from .voc import VOC_CLASSES

__all__ = [
    "COCO_40_40_FIRST",
    "COCO_CLASSES",
    "SPLIT_PRESETS",
    "ClassSubset",
    "get_split",
    "parse_split",
    "validate_split",
]

#: The 80 COCO detection classes in category-id order (ids 1..90 with gaps).
COCO_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

#: Teacher 1 of the paper's COCO 40+40 split.
COCO_40_40_FIRST: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "traffic light", "fire hydrant",
    "bird", "cat", "dog", "horse", "sheep", "backpack", "umbrella", "handbag", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "bottle", "wine glass", "cup", "banana", "apple",
    "sandwich", "orange", "broccoli", "chair", "couch", "potted plant", "tv", "laptop", "mouse",
    "microwave", "oven", "toaster", "book", "clock", "vase",
]  # fmt: skip


def _presets() -> dict[str, dict[str, list[str]]]:
    half = len(SHAPES_CLASSES) // 2
    first = set(COCO_40_40_FIRST)
    return {
        "voc-10+10": {"teacher_a": VOC_CLASSES[:10], "teacher_b": VOC_CLASSES[10:]},
        "coco-40+40": {
            "teacher_a": list(COCO_40_40_FIRST),
            "teacher_b": [c for c in COCO_CLASSES if c not in first],
        },
        "shapes-halves": {
            "teacher_a": SHAPES_CLASSES[:half],
            "teacher_b": SHAPES_CLASSES[half:],
        },
        # windows 0-3, 3-6 and 6-8 + 0 of the class list: each pair of teachers shares a class
        "shapes-thirds-overlap": {
            "teacher_a": SHAPES_CLASSES[0:4],
            "teacher_b": SHAPES_CLASSES[3:7],
            "teacher_c": [SHAPES_CLASSES[0], *SHAPES_CLASSES[6:8]],
        },
    }


#: Names accepted by :func:`get_split`.
SPLIT_PRESETS: tuple[str, ...] = tuple(_presets())


def parse_split(spec: str) -> dict[str, list[str]]:
    """Parse ``"name=class,class;name=class"`` into ``{name: [classes]}`` (order kept).

    Whitespace around names is stripped. Raises ``ValueError`` naming ``spec`` for an empty
    part, a missing ``=``, an empty teacher or class name, a duplicate teacher, or a class
    listed twice for the same teacher.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"split: expected 'name=class,class;name=class', got {spec!r}")
    out: dict[str, list[str]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"split: part {part.strip()!r} of {spec!r} has no '=' (name=classes)")
        name, _, classes = part.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"split: empty teacher name in part {part.strip()!r} of {spec!r}")
        if name in out:
            raise ValueError(f"split: teacher {name!r} given twice in {spec!r}")
        names = [c.strip() for c in classes.split(",")]
        if not names or any(not c for c in names):
            raise ValueError(f"split: empty class name for teacher {name!r} in {spec!r}")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise ValueError(f"split: teacher {name!r} lists {dup} more than once in {spec!r}")
        out[name] = names
    if not out:
        raise ValueError(f"split: no teachers in {spec!r}")
    return out


def get_split(name: str) -> dict[str, list[str]]:
    """A split by preset name (:data:`SPLIT_PRESETS`) or a user string (see
    :func:`parse_split`). Returns a fresh ``{teacher: [class names]}`` dict."""
    presets = _presets()
    if name in presets:
        return {k: list(v) for k, v in presets[name].items()}
    if isinstance(name, str) and "=" in name:
        return parse_split(name)
    raise ValueError(
        f"split: unknown split {name!r}; expected one of {list(presets)} "
        "or a definition like 'a=cat,dog;b=car,bus'"
    )


def validate_split(
    split: Mapping[str, Sequence[str]], class_names: Sequence[str], *, what: str = "dataset"
) -> None:
    """Check that every class of ``split`` is one of ``class_names``.

    Raises ``ValueError`` naming each unknown class and its teacher.
    """
    known = set(class_names)
    bad = [f"{c!r} (teacher {t!r})" for t, cs in split.items() for c in cs if c not in known]
    if bad:
        raise ValueError(
            f"split: unknown class(es) for this {what}: {', '.join(bad)}; "
            f"known classes: {', '.join(class_names)}"
        )


class ClassSubset(torch.utils.data.Dataset[tuple[Any, Target]]):
    """View of a detection dataset restricted to some classes (the paper's teacher protocol).

    Every image is kept; only the annotations of ``class_names`` remain, with labels remapped to
    positions in ``class_names`` (so label ``i`` means ``class_names[i]``). Works on any dataset
    with ``class_names`` and ``coco_gt()`` whose items are ``(image, target)`` with the
    per-object keys of :data:`~ka_rs.data.base.PER_OBJECT_KEYS`.

    Attributes: ``dataset``, ``class_names``, ``parent_labels`` (int64 tensor: subset label ->
    parent label).
    """

    def __init__(self, dataset: Any, class_names: Sequence[str]) -> None:
        parent = list(dataset.class_names)
        names = list(class_names)
        if not names:
            raise ValueError("class_names: empty class subset")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise ValueError(f"class_names: duplicate class names {dup}")
        unknown = [c for c in names if c not in parent]
        if unknown:
            raise ValueError(
                f"class_names: unknown class(es) {unknown}; the dataset has: {', '.join(parent)}"
            )
        self.dataset = dataset
        self.class_names = names
        self.parent_labels = torch.tensor([parent.index(c) for c in names], dtype=torch.int64)
        lut = torch.full((len(parent),), -1, dtype=torch.int64)
        lut[self.parent_labels] = torch.arange(len(names))
        self._lut = lut

    @property
    def num_classes(self) -> int:
        """Number of classes in the subset."""
        return len(self.class_names)

    @property
    def skipped(self) -> list[Any]:
        """The wrapped dataset's skip report (if any)."""
        return list(getattr(self.dataset, "skipped", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"ClassSubset({self.dataset!r}, {self.class_names})"

    def filter_target(self, target: Target) -> Target:
        """Keep only the subset's objects of ``target`` and remap their labels."""
        new = self._lut[target["labels"]]
        keep = new >= 0
        out = dict(target)
        for key in PER_OBJECT_KEYS:
            if key in target:
                out[key] = target[key][keep]
        out["labels"] = new[keep]
        return out

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        """``(image, target)`` of the wrapped dataset with the other classes' objects removed."""
        image, target = self.dataset[index]
        return image, self.filter_target(target)

    def coco_gt(self) -> dict[str, Any]:
        """The wrapped dataset's ground truth restricted to the subset: all images, the subset's
        annotations, ``category_id`` = subset index + 1."""
        gt = self.dataset.coco_gt()
        parent_to_sub = {int(p) + 1: i + 1 for i, p in enumerate(self.parent_labels.tolist())}
        annotations = []
        for ann in gt["annotations"]:
            cid = parent_to_sub.get(ann["category_id"])
            if cid is not None:
                annotations.append({**ann, "category_id": cid})
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        return {**gt, "annotations": annotations, "categories": categories}

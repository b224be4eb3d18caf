"""``shapes``: an embedded, procedurally generated object-detection dataset.

Every image is drawn on the fly from its own random generator seeded by ``(seed, split, index)``
(:class:`numpy.random.SeedSequence`), so items are reproducible, independent of access order,
and safe to produce in DataLoader worker processes. Nothing is stored on disk;
:func:`export_shapes` writes a copy in COCO layout for users who want files.

Content of one image (``image_size`` x ``image_size`` RGB):

- background: a random base colour with a smooth low-frequency colour field, thin distractor
  strokes (lines and open arcs, 1-2 px, not objects) behind and in front of the objects, and
  per-pixel noise;
- 1-8 objects of the 8 classes in :data:`SHAPES_CLASSES`, filled with a random colour that
  carries no class information (it is only chosen to contrast with the background and the
  other objects), random size (radius 6.5%-19% of the image side, log-uniform), mild
  aspect-ratio jitter and per-class rotation;
- partial occlusion: later objects are drawn over earlier ones, but a placement is rejected if
  any earlier object would keep less than :data:`MIN_VISIBLE_FRACTION` of its pixels visible.

Boxes are **amodal and pixel-tight**: each object's box is the bounding box of its own
rasterised mask (occluded parts included), in continuous pixel coordinates (a mask covering
columns ``a..b`` gives ``x1=a, x2=b+1``). ``area`` is the mask's pixel count. Image ids are
``index + 1``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .base import DetectionDataset, Target, Transform

__all__ = [
    "DEFAULT_SPLIT_SIZES",
    "MIN_VISIBLE_FRACTION",
    "SHAPES_CLASSES",
    "ShapeObject",
    "ShapesDataset",
    "ShapesSample",
    "export_shapes",
    "object_mask",
]

#: The 8 classes, in label order. Pairs a small CNN could confuse are kept apart by
#: construction: squares stay near axis-aligned while diamonds are tall rhombi; rings have a
#: centred hole, crescents an off-centre bite open to the outside.
SHAPES_CLASSES: list[str] = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "crescent",
]

#: Number of images of each split when ``num_images`` is ``None``.
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 4000, "val": 500, "test": 500}

#: Every object keeps at least this fraction of its mask visible (not covered by later objects).
MIN_VISIBLE_FRACTION = 0.7

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_MAX_OBJECTS = 16
_PLACEMENT_TRIES = 15
_RADIUS_RANGE = (0.065, 0.19)  # fraction of the image side
_MIN_RADIUS_PX = 6.0


@dataclass(frozen=True)
class ShapeObject:
    """Parameters of one drawn object; enough to re-render its mask (see :func:`object_mask`).

    ``(x0, y0)`` is the top-left corner of the square rasterisation patch of side ``patch`` in
    image pixels; the shape is centred in the patch. ``aspect`` = x-scale / y-scale, ``angle``
    in radians, ``param`` is class-specific (star inner radius, cross arm half-width, ring hole
    radius, diamond half-width, crescent bite offset; unused for the others).
    """

    label: int
    x0: int
    y0: int
    patch: int
    radius: float
    aspect: float
    angle: float
    param: float
    color: tuple[int, int, int]

    @property
    def name(self) -> str:
        """Class name."""
        return SHAPES_CLASSES[self.label]


@dataclass
class ShapesSample:
    """One generated image with its objects.

    ``image`` is a PIL RGB image (``None`` when only the layout was computed), ``boxes``
    float32 ``(T, 4)`` absolute xyxy pixels, ``labels`` int64 ``(T,)``, ``areas`` float32
    ``(T,)`` mask pixel counts; ``objects[i]`` describes object ``i`` (drawn in that order,
    later ones on top).
    """

    image: Image.Image | None
    objects: list[ShapeObject]
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray


# ---------------------------------------------------------------- geometry and rasterisation


def _ngon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2.0 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


_CIRCLE = _ngon(48, phase=0.0)
_SQUARE = np.array([[-0.72, -0.72], [0.72, -0.72], [0.72, 0.72], [-0.72, 0.72]])
_TRIANGLE = _ngon(3) + np.array([0.0, 0.25])  # centre the bounding box, not the centroid
_STAR_OUTER = _ngon(5)
_STAR_INNER = _ngon(5, phase=-math.pi / 2 + math.pi / 5)
_CROSS = np.array(
    [[-1, -1], [1, -1], [1, -1], [1, -1], [1, 1], [1, 1],
     [1, 1], [-1, 1], [-1, 1], [-1, 1], [-1, -1], [-1, -1]],
    dtype=np.float64,
)  # fmt: skip
# which cross coordinates are the arm half-width t (True) and which are +-1 (False)
_CROSS_IS_T = np.array(
    [[1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [1, 1],
     [1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [1, 1]],
    dtype=bool,
)  # fmt: skip


@dataclass(frozen=True)
class _ClassSpec:
    log_aspect: float  # aspect ratio drawn log-uniform in [-log_aspect, log_aspect]
    free_rotation: bool  # any angle, else within +-_SMALL_ANGLE
    param: tuple[float, float]  # class-specific parameter range


_SMALL_ANGLE = 0.2
_SPECS: tuple[_ClassSpec, ...] = (
    _ClassSpec(0.16, True, (0.0, 0.0)),  # circle
    _ClassSpec(0.16, False, (0.0, 0.0)),  # square
    _ClassSpec(0.16, False, (0.0, 0.0)),  # triangle
    _ClassSpec(0.08, True, (0.4, 0.5)),  # star: inner radius
    _ClassSpec(0.08, False, (0.26, 0.34)),  # cross: arm half-width
    _ClassSpec(0.16, True, (0.5, 0.62)),  # ring: hole radius
    _ClassSpec(0.16, False, (0.55, 0.68)),  # diamond: half-width (half-height 1)
    _ClassSpec(0.08, True, (0.45, 0.6)),  # crescent: offset of the radius-0.8 bite
)


def _unit_polygons(label: int, param: float) -> list[tuple[np.ndarray, int]]:
    """Polygons (unit scale, y down) and fill values; 0-filled polygons cut holes.

    The first polygon is the outline: every other polygon lies inside it or only cuts.
    """
    name = SHAPES_CLASSES[label]
    if name == "circle":
        return [(_CIRCLE, 255)]
    if name == "square":
        return [(_SQUARE, 255)]
    if name == "triangle":
        return [(_TRIANGLE, 255)]
    if name == "star":
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = _STAR_OUTER, _STAR_INNER * param
        return [(pts, 255)]
    if name == "cross":
        return [(np.where(_CROSS_IS_T, _CROSS * param, _CROSS), 255)]
    if name == "ring":
        return [(_CIRCLE, 255), (_CIRCLE * param, 0)]
    if name == "diamond":
        return [(np.array([[0.0, -1.0], [param, 0.0], [0.0, 1.0], [-param, 0.0]]), 255)]
    if name == "crescent":
        return [(_CIRCLE, 255), (_CIRCLE * 0.8 + np.array([param, 0.0]), 0)]
    raise AssertionError(name)  # pragma: no cover


def _transform(pts: np.ndarray, radius: float, aspect: float, angle: float) -> np.ndarray:
    """Scale x by sqrt(aspect), y by 1/sqrt(aspect), rotate by ``angle``, scale by ``radius``."""
    sx, sy = math.sqrt(aspect) * radius, radius / math.sqrt(aspect)
    c, s = math.cos(angle), math.sin(angle)
    out: np.ndarray = pts @ np.array([[c * sx, s * sx], [-s * sy, c * sy]])
    return out


def _render_patch(
    label: int, radius: float, aspect: float, angle: float, param: float, patch: int | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Boolean ``(patch, patch)`` mask of the shape centred in a square patch, and the mask's
    bounding box ``(x1, y1, x2, y2)`` in patch pixels (exclusive ends).

    ``patch=None`` picks the smallest side that holds the whole shape with a 1-px margin.
    """
    polys = [
        (_transform(pts, radius, aspect, angle), fill) for pts, fill in _unit_polygons(label, param)
    ]
    if patch is None:
        patch = int(math.ceil(2.0 * float(np.abs(polys[0][0]).max()))) + 3
    canvas = Image.new("L", (patch, patch), 0)
    draw = ImageDraw.Draw(canvas)
    centre = (patch - 1) / 2.0
    for xy, fill in polys:
        draw.polygon((xy + centre).ravel().tolist(), fill=fill)
    bbox = canvas.getbbox()
    if bbox is None:  # pragma: no cover - radius >= 6 px always draws pixels
        raise AssertionError("empty shape mask")
    return np.asarray(canvas) > 0, bbox


def object_mask(obj: ShapeObject, image_size: int) -> np.ndarray:
    """Re-render ``obj`` alone: boolean ``(image_size, image_size)`` amodal mask."""
    full = np.zeros((image_size, image_size), dtype=bool)
    patch, _ = _render_patch(obj.label, obj.radius, obj.aspect, obj.angle, obj.param, obj.patch)
    full[obj.y0 : obj.y0 + obj.patch, obj.x0 : obj.x0 + obj.patch] = patch
    return full


def _pick_color(
    rng: np.random.Generator, background: tuple[int, int, int], others: list[tuple[int, int, int]]
) -> tuple[int, int, int]:
    """A random colour far from the background and from the other objects' colours.

    Draws 12 candidates and returns the first scoring >= 1 (else the best), where the score is
    min(distance to background / 130, distance to the nearest other object colour / 70).
    """
    flat = rng.integers(0, 256, size=36).tolist()
    best, best_score = (0, 0, 0), -1.0
    for k in range(0, 36, 3):
        c = (flat[k], flat[k + 1], flat[k + 2])
        score = math.dist(c, background) / 130.0
        for o in others:
            score = min(score, math.dist(c, o) / 70.0)
        if score >= 1.0:
            return c
        if score > best_score:
            best, best_score = c, score
    return best


@lru_cache(maxsize=16)
def _interp_matrix(image_size: int, grid: int) -> np.ndarray:
    """``(image_size, grid)`` linear-interpolation weights (pixel centres, clamped ends)."""
    pos = (np.arange(image_size) + 0.5) / image_size * grid - 0.5
    pos = np.clip(pos, 0, grid - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), grid - 2)
    frac = pos - lo
    w = np.zeros((image_size, grid))
    w[np.arange(image_size), lo] = 1.0 - frac
    w[np.arange(image_size), lo + 1] += frac
    w.setflags(write=False)
    return w


# ---------------------------------------------------------------- the dataset


class ShapesDataset(DetectionDataset):
    """Procedurally generated detection dataset (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (different images for each).
        num_images: number of images; default :data:`DEFAULT_SPLIT_SIZES` ``[split]``.
        image_size: side of the square images in pixels (>= 32).
        seed: non-negative int; item ``i`` depends only on ``(seed, split, i)``.
        transforms: callable ``(image, target) -> (image, target)``, e.g.
            :func:`ka_rs.data.transforms.make_transforms`. Without it an item is the raw
            ``(PIL RGB image, target)`` with ``"boxes"`` in absolute xyxy pixels.
        clutter: draw background texture, distractor strokes and noise (``False`` gives a
            plain background, useful to check box tightness).
        objects_per_image: inclusive ``(min, max)`` number of objects drawn (placements that
            would hide an earlier object too much are retried, then dropped, so an image may
            hold fewer than drawn, but always at least one).
        memo_bytes: keep rendered images in memory up to this many bytes of pixels (default
            256 MiB: the demo's 4,000 training images at 96 px take 110 MB), so that later
            epochs do not draw them again (drawing is ~1 ms an image, a few % of a CPU training
            step). An item depends only on ``(seed, split, index)``, so a kept image is exactly
            the one that would be drawn; 0 = draw every time.

    Items: ``(image, target)`` with target keys ``boxes, labels, image_id (= index + 1),
    orig_size, size, iscrowd, area``; see :mod:`ka_rs.data.base`.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        image_size: int = 128,
        seed: int = 0,
        transforms: Transform | None = None,
        *,
        clutter: bool = True,
        objects_per_image: tuple[int, int] = (1, 8),
        memo_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(transforms=transforms)
        if split not in _SPLIT_CODES:
            raise ValueError(
                f"split: unknown split {split!r}; expected one of {list(_SPLIT_CODES)}"
            )
        if num_images is None:
            num_images = DEFAULT_SPLIT_SIZES[split]
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size: expected an int >= 32, got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        lo, hi = objects_per_image
        if not (1 <= lo <= hi <= _MAX_OBJECTS):
            raise ValueError(
                f"objects_per_image: expected 1 <= min <= max <= {_MAX_OBJECTS}, "
                f"got {objects_per_image!r}"
            )
        self.split = split
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.clutter = bool(clutter)
        self.objects_per_image = (int(lo), int(hi))
        self.class_names = list(SHAPES_CLASSES)
        self._coco_gt: dict[str, Any] | None = None
        # rendered samples kept for later epochs, up to memo_bytes of pixels
        self._memo: dict[int, ShapesSample] = {}
        self._memo_room = max(int(memo_bytes), 0) // (3 * image_size * image_size)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(split={self.split!r}, num_images={self.num_images}, "
            f"image_size={self.image_size}, seed={self.seed}, clutter={self.clutter})"
        )

    # -- generation

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        # stream 0: layout (objects, colours, positions); stream 1: paint (texture, strokes,
        # noise). Separate streams make the layout identical with or without pixels.
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index, stream])

    def render(self, index: int, *, pixels: bool = True) -> ShapesSample:
        """Generate item ``index`` (no transforms).

        ``pixels=False`` computes only the layout (objects, boxes, areas; identical to the full
        render's) and leaves ``image`` as ``None``.
        """
        index = self._check_index(index)
        rng = self._rng(index, 0)
        size = self.image_size
        bg = rng.integers(0, 256, size=3).tolist()
        background = (bg[0], bg[1], bg[2])
        lo, hi = self.objects_per_image
        n = int(rng.integers(lo, hi + 1))

        owner = np.full((size, size), -1, dtype=np.int16)  # topmost object at each pixel
        visible: list[int] = []
        areas: list[int] = []
        objects: list[ShapeObject] = []
        patches: list[np.ndarray] = []
        colors: list[tuple[int, int, int]] = []
        boxes: list[tuple[int, int, int, int]] = []
        log_r_lo = math.log(max(_MIN_RADIUS_PX, _RADIUS_RANGE[0] * size))
        log_r_hi = max(log_r_lo, math.log(_RADIUS_RANGE[1] * size))
        num_classes = len(SHAPES_CLASSES)
        for _ in range(n):
            u = rng.random(5).tolist()
            label = min(int(u[0] * num_classes), num_classes - 1)
            spec = _SPECS[label]
            radius = math.exp(log_r_lo + u[1] * (log_r_hi - log_r_lo))
            aspect = math.exp((2.0 * u[2] - 1.0) * spec.log_aspect)
            if spec.free_rotation:
                angle = 2.0 * math.pi * u[3]
            else:
                angle = (2.0 * u[3] - 1.0) * _SMALL_ANGLE
            param = spec.param[0] + u[4] * (spec.param[1] - spec.param[0])
            patch, (bx1, by1, bx2, by2) = _render_patch(label, radius, aspect, angle, param)
            p = patch.shape[0]
            area = int(patch.sum())
            color = _pick_color(rng, background, colors)
            tries = np.floor(rng.random((_PLACEMENT_TRIES, 2)) * (size - p + 1)).astype(np.int64)
            for x0, y0 in tries.tolist():
                region = owner[y0 : y0 + p, x0 : x0 + p]
                under = region[patch]
                under = under[under >= 0]
                if under.size:
                    covered = np.bincount(under, minlength=len(objects))
                    vis = np.asarray(visible) - covered
                    if np.any(vis < MIN_VISIBLE_FRACTION * np.asarray(areas)):
                        continue
                    visible = vis.tolist()
                region[patch] = len(objects)
                visible.append(area)
                areas.append(area)
                patches.append(patch)
                colors.append(color)
                boxes.append((x0 + bx1, y0 + by1, x0 + bx2, y0 + by2))
                objects.append(
                    ShapeObject(
                        label=label,
                        x0=x0,
                        y0=y0,
                        patch=p,
                        radius=radius,
                        aspect=aspect,
                        angle=angle,
                        param=param,
                        color=color,
                    )
                )
                break

        labels = np.array([o.label for o in objects], dtype=np.int64)
        area_arr = np.array(areas, dtype=np.float32)
        image = self._paint(self._rng(index, 1), background, objects, patches) if pixels else None
        box_arr = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        return ShapesSample(
            image=image, objects=objects, boxes=box_arr, labels=labels, areas=area_arr
        )

    def _strokes(self, rng: np.random.Generator, draw: ImageDraw.ImageDraw, count: int) -> None:
        """Distractors: thin polylines (2-3 points) and open arcs (40-200 degrees)."""
        if count == 0:
            return
        size = self.image_size
        u = rng.random((count, 10))
        colors = rng.integers(0, 256, size=(count, 3)).tolist()
        for k in range(count):
            uk = u[k] * size
            color = tuple(colors[k])
            width = 1 + int(u[k, 0] * 2.0)
            if u[k, 1] < 0.5:
                npts = 4 if u[k, 2] < 0.5 else 6
                draw.line(uk[3 : 3 + npts].tolist(), fill=color, width=width)
            else:
                cx, cy = uk[3], uk[4]
                r = (0.05 + 0.25 * u[k, 5]) * size
                start = 360.0 * u[k, 6]
                end = start + 40.0 + 160.0 * u[k, 7]
                draw.arc([cx - r, cy - r, cx + r, cy + r], start, end, fill=color, width=width)

    def _paint(
        self,
        rng: np.random.Generator,
        background: tuple[int, int, int],
        objects: list[ShapeObject],
        patches: list[np.ndarray],
    ) -> Image.Image:
        size = self.image_size
        if self.clutter:
            # smooth colour field: a coarse random grid, bilinearly upsampled
            g = max(3, size // 32)
            grid = np.array(background, dtype=np.float64)[:, None, None] + rng.uniform(
                -45.0, 45.0, size=(3, g, g)
            )
            w = _interp_matrix(size, g)
            field = np.einsum("hi,cij,wj->hwc", w, grid, w, optimize=True)
            field_img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")
            self._strokes(rng, ImageDraw.Draw(field_img), int(rng.integers(2, 6)))
            arr = np.array(field_img)
        else:
            arr = np.empty((size, size, 3), dtype=np.uint8)
            arr[:] = background
        for obj, patch in zip(objects, patches, strict=True):
            region = arr[obj.y0 : obj.y0 + obj.patch, obj.x0 : obj.x0 + obj.patch]
            region[patch] = obj.color
        image = Image.fromarray(arr, "RGB")
        if not self.clutter:
            return image
        self._strokes(rng, ImageDraw.Draw(image), int(rng.integers(0, 3)))
        # per-pixel noise in [-8, 7]
        noise = np.frombuffer(rng.bytes(size * size * 3), dtype=np.uint8).reshape(size, size, 3)
        noisy = np.asarray(image).astype(np.int16) + (noise >> 4).astype(np.int16) - 8
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")

    # -- dataset protocol

    def load(self, index: int) -> tuple[Image.Image, Target]:
        """Raw item: ``(PIL RGB image, target with absolute xyxy boxes)``."""
        index = self._check_index(index)
        sample = self._memo.get(index)
        if sample is None:
            sample = self.render(index)
            if len(self._memo) < self._memo_room:
                self._memo[index] = sample
        assert sample.image is not None
        size = torch.tensor([self.image_size, self.image_size], dtype=torch.int64)
        n = len(sample.objects)
        target: Target = {
            # copies: a transform may edit the target in place; the kept sample must not change
            "boxes": torch.tensor(sample.boxes),
            "labels": torch.tensor(sample.labels),
            "image_id": int(index) + 1,
            "orig_size": size,
            "size": size.clone(),
            "iscrowd": torch.zeros((n,), dtype=torch.int64),
            "area": torch.tensor(sample.areas),
        }
        # a copy: a transform that drew on the image in place would change the kept one
        return sample.image.copy(), target

    def image_info(self, index: int) -> dict[str, Any]:
        """COCO ``images`` entry of item ``index``."""
        return {
            "id": index + 1,
            "file_name": f"{index:06d}.png",
            "width": self.image_size,
            "height": self.image_size,
        }

    def coco_gt(self) -> dict[str, Any]:
        """COCO-format ground truth of the whole split (computed once, then cached).

        Original pixel coordinates, ``bbox`` = ``[x, y, w, h]``, category id = class index + 1,
        image id = index + 1, ``file_name`` = ``f"{index:06d}.png"`` (as :func:`export_shapes`
        writes them).
        """
        if self._coco_gt is None:
            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            for i in range(len(self)):
                images.append(self.image_info(i))
                _append_annotations(annotations, i + 1, self.render(i, pixels=False))
            self._coco_gt = {
                "images": images,
                "annotations": annotations,
                "categories": _categories(),
            }
        return self._coco_gt


def _categories() -> list[dict[str, Any]]:
    return [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(SHAPES_CLASSES)
    ]


def _append_annotations(out: list[dict[str, Any]], image_id: int, sample: ShapesSample) -> None:
    for box, label, area in zip(sample.boxes, sample.labels, sample.areas, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append(
            {
                "id": len(out) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(area),
                "iscrowd": 0,
            }
        )


# ---------------------------------------------------------------- export


def export_shapes(
    out_dir: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "val", "test"),
    seed: int = 0,
    num_images: int | Mapping[str, int] | None = None,
    image_size: int = 128,
    *,
    image_format: str = "png",
    progress: bool = False,
) -> dict[str, Any]:
    """Write the shapes dataset to ``out_dir`` in COCO layout.

    Layout::

        out_dir/train/000000.png ...          (or .jpg with image_format="jpeg")
        out_dir/val/...  out_dir/test/...
        out_dir/annotations/instances_train.json   (COCO: images, annotations, categories)

    ``num_images`` is one count for every split, a ``{split: count}`` mapping, or ``None`` for
    :data:`DEFAULT_SPLIT_SIZES`. The result is readable with
    ``CocoDetection(out_dir/"train", out_dir/"annotations/instances_train.json")``.

    Returns ``{"root": str, "classes": [...], "splits": {split: {"image_dir": str,
    "ann_file": str, "num_images": int, "num_annotations": int}}}``.
    """
    fmt = image_format.lower()
    if fmt in ("jpg", "jpeg"):
        ext, pil_fmt, save_kw = ".jpg", "JPEG", {"quality": 95}
    elif fmt == "png":
        ext, pil_fmt, save_kw = ".png", "PNG", {"compress_level": 1}
    else:
        raise ValueError(f"image_format: expected 'png' or 'jpeg', got {image_format!r}")
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in _SPLIT_CODES]
    if unknown or not splits:
        raise ValueError(
            f"splits: unknown split(s) {unknown}; expected some of {list(_SPLIT_CODES)}"
        )
    if isinstance(num_images, Mapping):
        extra = [k for k in num_images if k not in splits]
        if extra:
            raise ValueError(f"num_images: counts given for splits not exported: {extra}")
    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    datasets = {}
    for split in splits:
        count = num_images.get(split) if isinstance(num_images, Mapping) else num_images
        datasets[split] = ShapesDataset(split, count, image_size=image_size, seed=seed)

    result: dict[str, Any] = {"root": str(root), "classes": list(SHAPES_CLASSES), "splits": {}}
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
    try:
        for split, ds in datasets.items():
            image_dir = root / split
            image_dir.mkdir(parents=True, exist_ok=True)
            task = bar.add_task(f"shapes/{split}", total=len(ds)) if bar else None
            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            for i in range(len(ds)):
                sample = ds.render(i)
                assert sample.image is not None
                info = ds.image_info(i)
                info["file_name"] = f"{i:06d}{ext}"
                _write(image_dir / info["file_name"], sample.image.save, pil_fmt, **save_kw)
                images.append(info)
                _append_annotations(annotations, info["id"], sample)
                if bar is not None and task is not None:
                    bar.advance(task)
            ann_file = root / "annotations" / f"instances_{split}.json"
            payload = {
                "info": {
                    "description": "ka_rs shapes (procedurally generated)",
                    "split": split,
                    "seed": seed,
                    "image_size": image_size,
                },
                "images": images,
                "annotations": annotations,
                "categories": _categories(),
            }
            tmp = ann_file.with_suffix(".json.tmp")
            try:
                _write(tmp, Path.write_text, json.dumps(payload))
                os.replace(tmp, ann_file)
            finally:
                tmp.unlink(missing_ok=True)
            result["splits"][split] = {
                "image_dir": str(image_dir),
                "ann_file": str(ann_file),
                "num_images": len(images),
                "num_annotations": len(annotations),
            }
    finally:
        if bar is not None:
            bar.stop()
    return result


def _write(path: Path, write: Any, *args: Any, **kwargs: Any) -> None:
    """``write(path, *args, **kwargs)``; an ``OSError`` (a full disk, a read-only folder)
    names ``path``."""
    try:
        write(path, *args, **kwargs)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None

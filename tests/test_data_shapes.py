"""The embedded shapes dataset: determinism, tight boxes, class/object counts, COCO export."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from ka_rs.data import (
    DEFAULT_SPLIT_SIZES,
    MIN_VISIBLE_FRACTION,
    SHAPES_CLASSES,
    CocoDetection,
    ShapesDataset,
    export_shapes,
    make_transforms,
    object_mask,
)


def _pixels(ds: ShapesDataset, i: int) -> np.ndarray:
    return np.asarray(ds.render(i).image)


def test_classes_and_default_sizes():
    assert len(SHAPES_CLASSES) >= 8
    assert len(set(SHAPES_CLASSES)) == len(SHAPES_CLASSES)
    assert ShapesDataset("train").class_names == SHAPES_CLASSES
    for split, n in DEFAULT_SPLIT_SIZES.items():
        assert len(ShapesDataset(split)) == n
    assert len(ShapesDataset("val", 7)) == 7


def test_same_seed_same_item_different_seed_or_split_differs():
    a = ShapesDataset("train", 50, seed=3)
    b = ShapesDataset("train", 50, seed=3)
    # access in a different order: each item depends only on (seed, split, index)
    for i in [7, 0, 49, 7]:
        ia, ta = a[i]
        ib, tb = b[i]
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
        for key in ("boxes", "labels", "area", "iscrowd"):
            assert torch.equal(ta[key], tb[key])
        assert ta["image_id"] == tb["image_id"] == i + 1
    other_seed = ShapesDataset("train", 50, seed=4)
    other_split = ShapesDataset("val", 50, seed=3)
    assert not np.array_equal(_pixels(a, 5), _pixels(other_seed, 5))
    assert not np.array_equal(_pixels(a, 5), _pixels(other_split, 5))
    assert not np.array_equal(_pixels(a, 5), _pixels(a, 6))


def test_pickled_dataset_reproduces_items():
    # what a DataLoader worker receives
    ds = ShapesDataset("val", 10, seed=1)
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(_pixels(ds, 4), _pixels(clone, 4))


def test_layout_only_render_matches_full_render():
    ds = ShapesDataset("train", 20, seed=2)
    for i in range(20):
        full, layout = ds.render(i), ds.render(i, pixels=False)
        assert layout.image is None
        assert np.array_equal(full.boxes, layout.boxes)
        assert np.array_equal(full.labels, layout.labels)
        assert full.objects == layout.objects


def test_boxes_are_tight_around_each_rerendered_mask():
    ds = ShapesDataset("train", 60, seed=0)
    for i in range(60):
        s = ds.render(i, pixels=False)
        for obj, box, area in zip(s.objects, s.boxes, s.areas, strict=True):
            m = object_mask(obj, ds.image_size)
            ys, xs = np.nonzero(m)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert area == m.sum()


def test_box_equals_drawn_pixels_on_plain_background():
    # independent of the generator's own bookkeeping: look at the pixels
    ds = ShapesDataset("val", 40, seed=5, clutter=False, objects_per_image=(1, 1))
    for i in range(40):
        s = ds.render(i)
        img = np.asarray(s.image).astype(int)
        colors, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        background = colors[counts.argmax()]  # one object covers well under half the image
        changed = np.any(img != background, axis=2)
        ys, xs = np.nonzero(changed)
        assert len(s.objects) == 1
        assert s.boxes[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        # and the object's colour is what fills those pixels
        assert np.all(img[changed] == np.array(s.objects[0].color))


def test_occlusion_is_limited_and_visible_pixels_show_the_object():
    ds = ShapesDataset("train", 60, seed=7, clutter=False)
    occluded = 0
    for i in range(60):
        s = ds.render(i)
        img = np.asarray(s.image).astype(int)
        masks = [object_mask(o, ds.image_size) for o in s.objects]
        for k, (obj, m) in enumerate(zip(s.objects, masks, strict=True)):
            visible = m.copy()
            for later in masks[k + 1 :]:
                visible &= ~later
            assert visible.sum() >= MIN_VISIBLE_FRACTION * m.sum()
            occluded += int(visible.sum() < m.sum())
            assert np.all(img[visible] == np.array(obj.color))
    assert occluded > 0  # occlusion does happen


def test_object_counts_and_class_coverage():
    ds = ShapesDataset("train", 300, seed=0)
    counts, labels = [], []
    for i in range(len(ds)):
        s = ds.render(i, pixels=False)
        counts.append(len(s.objects))
        labels.extend(s.labels.tolist())
    assert min(counts) >= 1 and max(counts) <= 8
    assert max(counts) >= 7  # busy images exist
    hist = np.bincount(labels, minlength=len(SHAPES_CLASSES))
    assert hist.min() > 0.5 * hist.mean()  # every class well represented
    assert len(hist) == len(SHAPES_CLASSES)


def test_sizes_and_colours_vary_and_colour_is_not_class():
    ds = ShapesDataset("train", 200, seed=0)
    widths, colors, labels = [], [], []
    for i in range(len(ds)):
        s = ds.render(i, pixels=False)
        widths.extend((s.boxes[:, 2] - s.boxes[:, 0]).tolist())
        colors.extend(o.color for o in s.objects)
        labels.extend(s.labels.tolist())
    assert max(widths) > 2.5 * min(widths)
    colors_arr, labels_arr = np.array(colors, float), np.array(labels)
    # mean colour per class stays near the overall mean: no class has its own colour
    overall = colors_arr.mean(0)
    for c in range(len(SHAPES_CLASSES)):
        assert np.abs(colors_arr[labels_arr == c].mean(0) - overall).max() < 40
        assert colors_arr[labels_arr == c].std(0).min() > 40


def test_clutter_adds_texture_and_strokes():
    plain = ShapesDataset("val", 5, seed=0, clutter=False)
    busy = ShapesDataset("val", 5, seed=0)
    p, b = _pixels(plain, 0), _pixels(busy, 0)
    assert len(np.unique(p.reshape(-1, 3), axis=0)) <= 9  # background + objects
    assert len(np.unique(b.reshape(-1, 3), axis=0)) > 500
    # same layout either way
    assert np.array_equal(plain.render(0).boxes, busy.render(0).boxes)


def test_raw_item_and_transformed_item_formats():
    raw = ShapesDataset("val", 3, image_size=96)
    img, t = raw[0]
    assert img.size == (96, 96) and img.mode == "RGB"
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4
    assert t["labels"].dtype == torch.int64
    assert t["orig_size"].tolist() == [96, 96] and t["size"].tolist() == [96, 96]
    tf = ShapesDataset("val", 3, image_size=96, transforms=make_transforms(False, 96))
    x, tt = tf[0]
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32
    b = tt["boxes"]
    assert torch.all((b >= 0) & (b <= 1))
    expected = t["boxes"] / 96
    cx = (expected[:, 0] + expected[:, 2]) / 2
    assert torch.allclose(b[:, 0], cx)


def test_coco_gt_matches_items():
    ds = ShapesDataset("test", 12, seed=1)
    gt = ds.coco_gt()
    assert [c["id"] for c in gt["categories"]] == list(range(1, len(SHAPES_CLASSES) + 1))
    assert [c["name"] for c in gt["categories"]] == SHAPES_CLASSES
    assert [im["id"] for im in gt["images"]] == list(range(1, 13))
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
    assert min(a["id"] for a in gt["annotations"]) == 1
    for i in range(len(ds)):
        _, t = ds[i]
        anns = by_image.get(i + 1, [])
        xywh = torch.tensor([a["bbox"] for a in anns])
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        assert torch.equal(xyxy, t["boxes"])
        assert [a["category_id"] - 1 for a in anns] == t["labels"].tolist()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("training")
    with pytest.raises(ValueError, match="num_images"):
        ShapesDataset("train", 0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset("train", 5, image_size=16)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset("train", 5, seed=-1)
    with pytest.raises(ValueError, match="objects_per_image"):
        ShapesDataset("train", 5, objects_per_image=(0, 3))
    ds = ShapesDataset("train", 5)
    with pytest.raises(IndexError):
        ds[5]
    assert ds[-1][1]["image_id"] == 5


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_export_shapes_writes_coco_layout_readable_by_coco_reader(tmp_path, fmt):
    out = export_shapes(
        tmp_path / "shapes",
        splits=("train", "val"),
        seed=3,
        num_images={"train": 6, "val": 4},
        image_size=64,
        image_format=fmt,
    )
    assert set(out["splits"]) == {"train", "val"}
    info = out["splits"]["train"]
    assert info["num_images"] == 6
    ann = json.loads((tmp_path / "shapes/annotations/instances_train.json").read_text())
    assert info["num_annotations"] == len(ann["annotations"]) > 0
    ds = CocoDetection(info["image_dir"], info["ann_file"])
    gen = ShapesDataset("train", 6, image_size=64, seed=3)
    assert ds.class_names == SHAPES_CLASSES
    assert len(ds) == 6
    for i in range(6):
        img, t = ds[i]
        gimg, gt = gen[i]
        assert t["image_id"] == gt["image_id"]
        assert torch.equal(t["labels"], gt["labels"])
        assert torch.allclose(t["boxes"], gt["boxes"])
        diff = np.abs(np.asarray(img).astype(int) - np.asarray(gimg).astype(int))
        assert diff.max() == 0 if fmt == "png" else diff.mean() < 15  # lossy, noisy images
    assert ds.coco_gt()["annotations"] == gen.coco_gt()["annotations"]


def test_export_shapes_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_format"):
        export_shapes(tmp_path, splits=("val",), num_images=1, image_format="bmp")
    with pytest.raises(ValueError, match="splits"):
        export_shapes(tmp_path, splits=("dev",), num_images=1)


def test_kept_images_are_the_drawn_ones_and_never_change():
    from ka_rs.data.transforms import make_transforms

    kept = ShapesDataset("train", 6, image_size=48, seed=3)
    drawn = ShapesDataset("train", 6, image_size=48, seed=3, memo_bytes=0)
    for _ in range(2):  # the second pass reads the kept samples
        for i in range(6):
            (ka, ta), (kb, tb) = kept.load(i), drawn.load(i)
            assert np.array_equal(np.asarray(ka), np.asarray(kb))
            for key in ("boxes", "labels", "area"):
                assert torch.equal(ta[key], tb[key])
            # editing what load returned must not reach the kept sample
            ka.paste((0, 0, 0), (0, 0, 48, 48))
            ta["boxes"].zero_()
    assert len(kept._memo) == 6 and not drawn._memo
    assert kept.load(-1)[1]["image_id"] == 6 and len(kept._memo) == 6
    # the budget bounds what is kept (two 48 px images' worth of pixels)
    small = ShapesDataset("train", 6, image_size=48, seed=3, memo_bytes=2 * 3 * 48 * 48)
    for i in range(6):
        small.load(i)
    assert len(small._memo) == 2
    # with the training transforms (flip, resize, jitter) items stay those of a fresh dataset
    tf = make_transforms("train", image_size=48, max_size=80)
    a = ShapesDataset("train", 4, image_size=48, seed=3, transforms=tf)
    b = ShapesDataset("train", 4, image_size=48, seed=3, transforms=tf, memo_bytes=0)
    for _ in range(2):
        for i in range(4):
            torch.manual_seed(i)
            xa, ya = a[i]
            torch.manual_seed(i)
            xb, yb = b[i]
            assert torch.equal(xa, xb) and torch.equal(ya["boxes"], yb["boxes"])

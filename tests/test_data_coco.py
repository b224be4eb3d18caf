"""COCO-format reader on small fixture folders, including every bad-input case."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ka_rs.data import ClassSubset, CocoDetection, DatasetError, make_transforms
from PIL import Image

CATEGORIES = [  # deliberately unordered and non-contiguous ids
    {"id": 5, "name": "dog"},
    {"id": 2, "name": "cat"},
    {"id": 9, "name": "car"},
]


def _base() -> dict:
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 11, "file_name": "b.jpg", "width": 20, "height": 50},
            {"id": 12, "file_name": "c.png", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 9, "bbox": [20, 10, 30, 30], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 2, "bbox": [0, 0, 20, 50], "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 2, "bbox": [2, 2, 4, 4], "iscrowd": 1},
        ],
        "categories": copy.deepcopy(CATEGORIES),
    }


def _write(root: Path, data: dict | str, images: dict | None = None) -> tuple[Path, Path]:
    """Write images (``file_name -> (w, h)``, default from ``data``) and the JSON."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    if images is None and isinstance(data, dict):
        images = {im["file_name"]: (im["width"], im["height"]) for im in data["images"]}
    rng = np.random.default_rng(0)
    for name, (w, h) in (images or {}).items():
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / name)
    ann = root / "instances.json"
    ann.write_text(data if isinstance(data, str) else json.dumps(data))
    return img_dir, ann


def test_reads_categories_boxes_and_crowd(tmp_path):
    img_dir, ann = _write(tmp_path, _base())
    ds = CocoDetection(img_dir, ann)
    # contiguous indices ordered by category id, names from the file
    assert ds.class_names == ["cat", "dog", "car"]
    assert ds.label_to_cat_id == [2, 5, 9]
    assert ds.cat_id_to_label == {2: 0, 5: 1, 9: 2}
    assert len(ds) == 3 and ds.skipped == []

    img, t = ds[0]
    assert img.size == (40, 30) and img.mode == "RGB"
    assert t["image_id"] == 10
    assert t["labels"].tolist() == [1, 2]
    # xywh -> xyxy, clipped to the 40x30 image
    assert t["boxes"].tolist() == [[1, 2, 11, 7], [20, 10, 40, 30]]
    assert t["orig_size"].tolist() == [30, 40] and t["size"].tolist() == [30, 40]
    assert t["area"].tolist() == [50.0, 900.0]  # box area when the file has none

    # crowd annotation 4 is not a training target by default ...
    _, t1 = ds[1]
    assert t1["labels"].tolist() == [0] and t1["iscrowd"].tolist() == [0]
    # ... but is kept when asked, and always in coco_gt
    _, tc = CocoDetection(img_dir, ann, keep_crowd=True)[1]
    assert tc["iscrowd"].tolist() == [0, 1]
    gt = ds.coco_gt()
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3]
    assert [c["name"] for c in gt["categories"]] == ["cat", "dog", "car"]
    by_id = {a["id"]: a for a in gt["annotations"]}
    assert by_id[4]["iscrowd"] == 1 and by_id[4]["category_id"] == 1
    assert by_id[1]["category_id"] == 2 and by_id[2]["category_id"] == 3
    assert by_id[2]["bbox"] == [20, 10, 30, 30]  # original, unclipped coordinates
    assert [im["id"] for im in gt["images"]] == [10, 11, 12]

    # image without annotations: empty target of the right shapes
    _, t2 = ds[2]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)


def test_transforms_and_class_subset(tmp_path):
    img_dir, ann = _write(tmp_path, _base())
    ds = CocoDetection(img_dir, ann, transforms=make_transforms(False, 60))
    x, t = ds[0]
    assert x.shape == (3, 60, 80)
    assert torch.allclose(t["boxes"][0], torch.tensor([6 / 40, 4.5 / 30, 10 / 40, 5 / 30]))
    sub = ClassSubset(ds, ["car"])
    _, ts = sub[0]
    assert ts["labels"].tolist() == [0]
    assert [a["id"] for a in sub.coco_gt()["annotations"]] == [2]


def test_width_height_missing_are_read_from_the_image(tmp_path):
    data = _base()
    for im in data["images"]:
        del im["width"], im["height"]
    img_dir, ann = _write(
        tmp_path, data, images={"a.png": (40, 30), "b.jpg": (20, 50), "c.png": (32, 32)}
    )
    ds = CocoDetection(img_dir, ann)
    assert ds.coco_gt()["images"][1]["width"] == 20


def test_malformed_json(tmp_path):
    img_dir, ann = _write(tmp_path, '{"images": [', images={})
    with pytest.raises(DatasetError, match=r"instances\.json.*malformed JSON") as e:
        CocoDetection(img_dir, ann)
    assert isinstance(e.value, ValueError)
    _, ann2 = _write(tmp_path / "x", '{"images": []}', images={})
    with pytest.raises(DatasetError, match="categories"):
        CocoDetection(img_dir, ann2)


def test_missing_annotation_file_and_image_dir(tmp_path):
    img_dir, _ = _write(tmp_path, _base())
    with pytest.raises(DatasetError, match="nope.json.*not found"):
        CocoDetection(img_dir, tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="image_dir"):
        CocoDetection(tmp_path / "no_dir", tmp_path / "instances.json")


def test_missing_image_file(tmp_path, caplog):
    img_dir, ann = _write(tmp_path, _base())
    (img_dir / "b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"b\.jpg.*image id 11.*not found"):
        CocoDetection(img_dir, ann)
    with caplog.at_level(logging.WARNING, logger="ka_rs.data"):
        ds = CocoDetection(img_dir, ann, skip_invalid=True)
    assert len(ds) == 2 and ds.ids == [10, 12]
    assert [(s.kind, s.item) for s in ds.skipped] == [("image", "image id 11")]
    assert "b.jpg" in ds.skipped[0].file
    assert "image id 11" in caplog.text
    assert ds.num_annotations_of_skipped_images == 2
    assert "with their 2 annotation(s)" in caplog.text
    # its annotations left with it, also from the evaluation ground truth
    assert {a["image_id"] for a in ds.coco_gt()["annotations"]} == {10}


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"bbox": [1, 2, -3, 5]}, r"annotation id 2.*negative width/height"),
        ({"bbox": [1, 2, 3, -5]}, r"annotation id 2.*negative width/height"),
        ({"bbox": [1, 2, 0, 5]}, r"annotation id 2.*zero width/height"),
        ({"bbox": [1, 2, 3]}, r"annotation id 2.*4 finite numbers"),
        ({"bbox": [1, 2, float("nan"), 3]}, r"annotation id 2.*4 finite numbers"),
        ({"bbox": [100, 2, 3, 3]}, r"annotation id 2.*outside"),
        ({"category_id": 7}, r"annotation id 2.*unknown category id 7"),
        ({"image_id": 99}, r"annotation id 2.*unknown image id 99"),
        ({"iscrowd": 2}, r"annotation id 2.*iscrowd"),
    ],
)
def test_bad_annotation(tmp_path, caplog, change, pattern):
    data = _base()
    data["annotations"][1].update(change)
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=pattern) as e:
        CocoDetection(img_dir, ann)
    assert "instances.json" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="ka_rs.data"):
        ds = CocoDetection(img_dir, ann, skip_invalid=True)
    assert len(ds) == 3  # the image stays, only the annotation goes
    assert [(s.kind, s.item.split(",")[0]) for s in ds.skipped] == [
        ("annotation", "annotation id 2")
    ]
    assert "annotation id 2" in caplog.text
    _, t = ds[0]
    assert t["labels"].tolist() == [1]
    assert 2 not in {a["id"] for a in ds.coco_gt()["annotations"]}


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d["categories"].append({"id": 5, "name": "x"}), "duplicate category id"),
        (lambda d: d["categories"].append({"id": 6, "name": "dog"}), "duplicate category name"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 10.*duplicate image id"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation"),
        (lambda d: d["annotations"][0].pop("id"), "annotation without int 'id'"),
    ],
)
def test_structural_errors_always_raise(tmp_path, mutate, pattern):
    data = _base()
    mutate(data)
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=pattern):
        CocoDetection(img_dir, ann, skip_invalid=True)


def test_corrupt_image_raises_at_load_time(tmp_path, caplog):
    img_dir, ann = _write(tmp_path, _base())
    (img_dir / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = CocoDetection(img_dir, ann)  # annotations are fine: construction succeeds
    ds[0]
    with pytest.raises(DatasetError, match=r"b\.jpg.*image id 11.*cannot decode"):
        ds[1]
    # skip_invalid: logged, recorded, and the next readable item is returned instead
    lenient = CocoDetection(img_dir, ann, skip_invalid=True)
    with caplog.at_level(logging.WARNING, logger="ka_rs.data"):
        _, t = lenient[1]
    assert t["image_id"] == 12
    assert [(s.kind, s.item) for s in lenient.skipped] == [("image", "image id 11")]
    assert "image id 11" in caplog.text
    assert lenient.check_images() == [1]
    assert len(lenient.skipped) == 1  # not recorded twice
    with pytest.raises(DatasetError, match="image id 11"):
        ds.check_images()


def test_truncated_image_and_size_mismatch(tmp_path):
    img_dir, ann = _write(tmp_path, _base())
    data = (img_dir / "a.png").read_bytes()
    (img_dir / "a.png").write_bytes(data[: len(data) // 2])
    ds = CocoDetection(img_dir, ann)
    with pytest.raises(DatasetError, match=r"a\.png.*image id 10"):
        ds[0]
    Image.new("RGB", (33, 32)).save(img_dir / "c.png")
    with pytest.raises(DatasetError, match=r"c\.png.*image id 12.*33x32.*32x32"):
        ds[2]

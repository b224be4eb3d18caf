"""Class splits (paper presets, user strings) and ClassSubset views."""

from __future__ import annotations

import pytest
import torch
from ka_rs.data import (
    COCO_CLASSES,
    SHAPES_CLASSES,
    SPLIT_PRESETS,
    VOC_CLASSES,
    ClassSubset,
    ShapesDataset,
    get_split,
    make_transforms,
    parse_split,
    validate_split,
)


def test_voc_10_10_is_first_ten_alphabetical():
    s = get_split("voc-10+10")
    assert list(s) == ["teacher_a", "teacher_b"]
    assert s["teacher_a"] == sorted(VOC_CLASSES)[:10]
    assert s["teacher_a"][0] == "aeroplane" and s["teacher_a"][-1] == "cow"
    assert s["teacher_b"] == sorted(VOC_CLASSES)[10:]
    assert s["teacher_b"][0] == "diningtable" and s["teacher_b"][-1] == "tvmonitor"


def test_coco_40_40_disjoint_and_covering():
    s = get_split("coco-40+40")
    a, b = s["teacher_a"], s["teacher_b"]
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80
    assert len(a) == len(set(a)) == 40 and len(b) == len(set(b)) == 40
    assert not set(a) & set(b)
    assert set(a) | set(b) == set(COCO_CLASSES)
    assert a[:5] == ["person", "bicycle", "car", "motorcycle", "airplane"]
    assert {"traffic light", "tv", "vase", "potted plant"} <= set(a)
    assert {"bus", "truck", "toothbrush", "dining table"} <= set(b)
    # both halves in COCO category order
    assert a == sorted(a, key=COCO_CLASSES.index) and b == sorted(b, key=COCO_CLASSES.index)


def test_shapes_halves():
    s = get_split("shapes-halves")
    half = len(SHAPES_CLASSES) // 2
    assert s == {"teacher_a": SHAPES_CLASSES[:half], "teacher_b": SHAPES_CLASSES[half:]}
    assert set(SPLIT_PRESETS) == {
        "voc-10+10",
        "coco-40+40",
        "shapes-halves",
        "shapes-thirds-overlap",
    }


def test_shapes_thirds_overlap_each_class_in_one_or_two_teachers():
    s = get_split("shapes-thirds-overlap")
    assert list(s) == ["teacher_a", "teacher_b", "teacher_c"]
    validate_split(s, SHAPES_CLASSES)
    counts = {c: sum(c in cs for cs in s.values()) for c in SHAPES_CLASSES}
    assert set(counts.values()) == {1, 2}  # every class is known, some to two teachers
    assert sorted(c for c, n in counts.items() if n == 2) == ["circle", "diamond", "star"]
    names = list(s)
    for i, a in enumerate(names):  # each pair of teachers shares exactly one class
        for b in names[i + 1 :]:
            assert len(set(s[a]) & set(s[b])) == 1, (a, b)
    # the union in teacher order (one index per name) is the shapes class list itself
    union = list(dict.fromkeys(c for cs in s.values() for c in cs))
    assert union == SHAPES_CLASSES
    for cs in s.values():
        assert len(cs) == len(set(cs)) and cs == sorted(cs, key=SHAPES_CLASSES.index)


def test_get_split_returns_fresh_copies():
    s = get_split("shapes-halves")
    s["teacher_a"].append("oops")
    assert "oops" not in get_split("shapes-halves")["teacher_a"]
    assert "oops" not in SHAPES_CLASSES


def test_parse_user_split():
    s = parse_split(" animals = cat, dog ; vehicles=car,bus,traffic light;")
    assert s == {"animals": ["cat", "dog"], "vehicles": ["car", "bus", "traffic light"]}
    assert list(s) == ["animals", "vehicles"]
    assert get_split("a=cat;b=cat,dog") == {"a": ["cat"], "b": ["cat", "dog"]}  # overlap ok


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "expected"),
        ("cat,dog", "no '='"),
        ("=cat", "empty teacher name"),
        ("a=cat,,dog", "empty class name"),
        ("a=", "empty class name"),
        ("a=cat;a=dog", "teacher 'a' given twice"),
        ("a=cat,cat", r"lists \['cat'\] more than once"),
        (";;", "no teachers"),
    ],
)
def test_parse_split_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_split(spec)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown split 'voc-15\\+5'.*voc-10\\+10"):
        get_split("voc-15+5")


def test_validate_split_names_unknown_classes():
    validate_split(get_split("voc-10+10"), VOC_CLASSES)
    with pytest.raises(ValueError, match=r"'kitten' \(teacher 'a'\).*'lorry' \(teacher 'b'\)"):
        validate_split(parse_split("a=cat,kitten;b=car,lorry"), VOC_CLASSES)


def test_class_subset_keeps_images_filters_and_remaps():
    ds = ShapesDataset("val", 30, image_size=64, seed=2)
    names = ["star", "circle"]  # subset order differs from the parent's
    sub = ClassSubset(ds, names)
    assert len(sub) == len(ds) and sub.class_names == names and sub.num_classes == 2
    assert sub.parent_labels.tolist() == [SHAPES_CLASSES.index("star"), 0]
    for i in range(len(ds)):
        _, t = ds[i]
        _, st = sub[i]
        parent_names = [SHAPES_CLASSES[j] for j in t["labels"].tolist()]
        keep = [n in names for n in parent_names]
        assert [names[j] for j in st["labels"].tolist()] == [n for n in parent_names if n in names]
        assert torch.equal(st["boxes"], t["boxes"][torch.tensor(keep, dtype=torch.bool)])
        assert st["area"].shape == st["iscrowd"].shape == st["labels"].shape
        assert st["image_id"] == t["image_id"]

    gt, sgt = ds.coco_gt(), sub.coco_gt()
    assert sgt["images"] == gt["images"]
    assert [c["name"] for c in sgt["categories"]] == names
    assert [c["id"] for c in sgt["categories"]] == [1, 2]
    expected = [
        (a["id"], names.index(SHAPES_CLASSES[a["category_id"] - 1]) + 1)
        for a in gt["annotations"]
        if SHAPES_CLASSES[a["category_id"] - 1] in names
    ]
    assert [(a["id"], a["category_id"]) for a in sgt["annotations"]] == expected
    assert 0 < len(expected) < len(gt["annotations"])


def test_class_subset_with_transforms_and_errors():
    ds = ShapesDataset("val", 5, image_size=64, transforms=make_transforms(False, 64))
    sub = ClassSubset(ds, get_split("shapes-halves")["teacher_b"])
    x, t = sub[0]
    assert x.shape == (3, 64, 64)
    assert torch.all(t["labels"] < 4) and torch.all(t["boxes"] <= 1)
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['hexagon'\]"):
        ClassSubset(ds, ["circle", "hexagon"])
    with pytest.raises(ValueError, match="duplicate"):
        ClassSubset(ds, ["circle", "circle"])
    with pytest.raises(ValueError, match="empty"):
        ClassSubset(ds, [])

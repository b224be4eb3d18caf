"""Pascal VOC reader on a small fixture VOCdevkit, including every bad-input case."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from ka_rs.data import VOC_CLASSES, ClassSubset, DatasetError, VocDetection, get_split
from PIL import Image


def _xml(name: str, w: int, h: int, objects: list[tuple]) -> str:
    objs = "".join(
        f"<object><name>{cls}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>{diff}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for cls, diff, b in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


FIXTURE = {
    "000001": (48, 32, [("dog", 0, (1, 1, 10, 20)), ("person", 1, (5, 6, 48, 32))]),
    "000002": (30, 40, [("car", 0, (3, 4, 3, 4))]),  # a 1x1 box: xmin == xmax is valid
    "000003": (24, 24, []),
}


def _make_voc(root: Path, fixture: dict = FIXTURE, image_set: str = "trainval") -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h, objects) in fixture.items():
        (root / "Annotations" / f"{name}.xml").write_text(_xml(name, w, h, objects))
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
    (root / "ImageSets/Main" / f"{image_set}.txt").write_text("\n".join(fixture) + "\n")
    return root


def test_reads_boxes_labels_and_difficult(tmp_path):
    root = _make_voc(tmp_path / "VOC2007")
    ds = VocDetection(root, "trainval")
    assert ds.class_names == VOC_CLASSES and len(VOC_CLASSES) == 20
    assert VOC_CLASSES == sorted(VOC_CLASSES)
    assert len(ds) == 3 and ds.image_names == ["000001", "000002", "000003"]
    img, t = ds[0]
    assert img.size == (48, 32) and img.mode == "RGB"
    assert t["image_id"] == 1
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    # 1-based inclusive -> 0-based continuous: (xmin-1, ymin-1, xmax, ymax)
    assert t["boxes"].tolist() == [[0, 0, 10, 20], [4, 5, 48, 32]]
    assert t["difficult"].tolist() == [False, True]
    assert t["iscrowd"].tolist() == [0, 1]
    assert t["area"].tolist() == [200.0, 44 * 27]
    assert t["orig_size"].tolist() == [32, 48]
    _, t2 = ds[1]
    assert t2["boxes"].tolist() == [[2, 3, 3, 4]]
    _, t3 = ds[2]
    assert t3["boxes"].shape == (0, 4) and t3["difficult"].shape == (0,)


def test_coco_gt_marks_difficult_as_ignored(tmp_path):
    ds = VocDetection(_make_voc(tmp_path), "trainval")
    gt = ds.coco_gt()
    assert [c["name"] for c in gt["categories"]] == VOC_CLASSES
    assert [c["id"] for c in gt["categories"]] == list(range(1, 21))
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert gt["images"][0]["file_name"] == "000001.jpg" and gt["images"][0]["width"] == 48
    a_dog, a_person, a_car = gt["annotations"]
    assert a_dog["bbox"] == [0, 0, 10, 20] and a_dog["iscrowd"] == 0
    assert a_dog["category_id"] == VOC_CLASSES.index("dog") + 1
    assert a_person["iscrowd"] == 1 and a_person["difficult"] == 1 and a_person["ignore"] == 1
    assert a_car["bbox"] == [2, 3, 1, 1]


def test_class_subset_voc_10_10(tmp_path):
    ds = VocDetection(_make_voc(tmp_path), "trainval")
    split = get_split("voc-10+10")
    a, b = ClassSubset(ds, split["teacher_a"]), ClassSubset(ds, split["teacher_b"])
    _, ta = a[0]
    _, tb = b[0]
    assert ta["labels"].tolist() == []  # dog and person are both in the second half
    assert [b.class_names[i] for i in tb["labels"].tolist()] == ["dog", "person"]
    assert tb["difficult"].tolist() == [False, True]
    _, ta1 = a[1]
    assert [a.class_names[i] for i in ta1["labels"].tolist()] == ["car"]
    assert len(a) == len(b) == len(ds)  # every image kept


def test_custom_class_names_and_other_image_set(tmp_path):
    fixture = {"img_a": (20, 20, [("widget", 0, (2, 2, 8, 8))])}
    root = _make_voc(tmp_path, fixture, image_set="test")
    ds = VocDetection(root, "test", class_names=["gadget", "widget"])
    assert ds[0][1]["labels"].tolist() == [1]
    with pytest.raises(DatasetError, match=r"img_a\.xml.*object 0.*unknown class 'widget'"):
        VocDetection(root, "test")


def test_missing_image_set_and_root(tmp_path):
    root = _make_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"val\.txt.*image set 'val' not found"):
        VocDetection(root, "val")
    with pytest.raises(DatasetError, match="Annotations"):
        VocDetection(tmp_path / "nothing", "trainval")


def _broken(tmp_path: Path, caplog, fixture: dict, edit, pattern: str, kind: str) -> VocDetection:
    root = _make_voc(tmp_path, fixture)
    edit(root)
    with pytest.raises(DatasetError, match=pattern) as e:
        VocDetection(root, "trainval")
    assert isinstance(e.value, ValueError)
    with caplog.at_level(logging.WARNING, logger="ka_rs.data"):
        ds = VocDetection(root, "trainval", skip_invalid=True)
    assert len(ds.skipped) == 1 and ds.skipped[0].kind == kind
    assert "000002" in caplog.text
    return ds


def test_malformed_xml(tmp_path, caplog):
    def edit(root: Path) -> None:
        (root / "Annotations/000002.xml").write_text("<annotation><size>")

    ds = _broken(tmp_path, caplog, FIXTURE, edit, r"000002\.xml.*'000002'.*malformed XML", "image")
    assert ds.image_names == ["000001", "000003"]
    assert len(ds.coco_gt()["annotations"]) == 2


def test_missing_xml_file(tmp_path, caplog):
    def edit(root: Path) -> None:
        (root / "Annotations/000002.xml").unlink()

    _broken(tmp_path, caplog, FIXTURE, edit, r"000002\.xml.*not found", "image")


def test_missing_image_file(tmp_path, caplog):
    def edit(root: Path) -> None:
        (root / "JPEGImages/000002.jpg").unlink()

    ds = _broken(tmp_path, caplog, FIXTURE, edit, r"000002\.jpg.*'000002'.*not found", "image")
    assert ds.image_names == ["000001", "000003"]


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        (("car", 0, (10, 4, 3, 9)), "negative width"),  # xmax < xmin
        (("car", 0, (3, 10, 9, 4)), "negative width/height"),  # ymax < ymin
        (("spaceship", 0, (1, 1, 5, 5)), "unknown class 'spaceship'"),
        (("car", 0, (1, 1, "x", 5)), "bad bndbox"),
        (("car", 0, (100, 100, 120, 120)), "outside"),
        (("car", "maybe", (1, 1, 5, 5)), "difficult"),
    ],
)
def test_bad_object(tmp_path, caplog, obj, pattern):
    fixture = dict(FIXTURE)
    fixture["000002"] = (30, 40, [("cat", 0, (1, 1, 5, 5)), obj])

    ds = _broken(
        tmp_path,
        caplog,
        fixture,
        lambda root: None,
        rf"000002\.xml.*object 1.*{pattern}",
        "annotation",
    )
    assert len(ds) == 3  # the image stays with its valid object
    assert ds[1][1]["labels"].tolist() == [VOC_CLASSES.index("cat")]


def test_corrupt_image_raises_at_load_time(tmp_path, caplog):
    root = _make_voc(tmp_path)
    (root / "JPEGImages/000002.jpg").write_bytes(b"garbage")
    ds = VocDetection(root, "trainval")
    with pytest.raises(DatasetError, match=r"000002\.jpg.*'000002'.*cannot decode"):
        ds[1]
    lenient = VocDetection(root, "trainval", skip_invalid=True)
    with caplog.at_level(logging.WARNING, logger="ka_rs.data"):
        _, t = lenient[1]
    assert t["image_id"] == 3
    assert len(lenient.skipped) == 1 and "000002" in caplog.text


def test_size_missing_in_xml_is_read_from_image(tmp_path):
    root = _make_voc(tmp_path)
    xml = (root / "Annotations/000003.xml").read_text()
    start, end = xml.index("<size>"), xml.index("</size>") + len("</size>")
    (root / "Annotations/000003.xml").write_text(xml[:start] + xml[end:])
    ds = VocDetection(root, "trainval")
    assert ds[2][1]["orig_size"].tolist() == [24, 24]

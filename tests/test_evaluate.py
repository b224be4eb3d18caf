"""COCO evaluation: perfect predictions score 1.0, perturbed ones less; subsets; output formats."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from ka_rs.engine.evaluate import (
    EvalResult,
    coco_evaluate,
    evaluate,
    postprocess,
    results_table,
)
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

CLASSES = ["a", "b", "c", "d"]


def make_gt(n_images: int = 24, seed: int = 0) -> dict:
    """COCO ground truth: images of varied sizes, 1-5 boxes each, 4 classes."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_images):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        images.append({"id": 100 + i, "width": w, "height": h, "file_name": f"{i}.png"})
        for _ in range(int(rng.integers(1, 6))):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": int(rng.integers(0, 4)) + 1,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    return {"images": images, "annotations": anns, "categories": cats}


def gt_as_detections(gt: dict, shift=None) -> list[dict]:
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        if shift is not None and shift(a):
            x, y = x + 0.4 * w, y + 0.4 * h
        dets.append(
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h]}
            | {"score": 0.9}
        )
    return dets


def test_ground_truth_scores_one():
    gt = make_gt()
    res = coco_evaluate(gt, gt_as_detections(gt), CLASSES, {"t1": ["a", "b"], "t2": ["c", "d"]})
    for name in ("all", "t1", "t2"):
        for key in ("AP", "AP50", "AP75"):
            assert res.subsets[name][key] == pytest.approx(1.0), (name, key)
    assert all(v["AP"] == pytest.approx(1.0) for v in res.per_class.values())
    assert res.metrics["AP50"] == pytest.approx(1.0) and res["t1/AP"] == pytest.approx(1.0)
    assert res.num_images == 24


def test_perturbed_predictions_score_lower_only_where_perturbed():
    gt = make_gt()
    dets = gt_as_detections(gt, shift=lambda a: a["category_id"] == 3)  # class "c" only
    res = coco_evaluate(gt, dets, CLASSES, {"t1": ["a", "b"], "t2": ["c", "d"]})
    assert res.subsets["t1"]["AP"] == pytest.approx(1.0)
    assert res.subsets["t2"]["AP"] < 0.8
    assert res.subsets["all"]["AP"] < 1.0
    assert res.per_class["c"]["AP50"] < 0.5
    assert res.per_class["d"]["AP50"] == pytest.approx(1.0)


def test_missing_detections_lower_recall():
    gt = make_gt()
    dets = gt_as_detections(gt)[::2]
    res = coco_evaluate(gt, dets, CLASSES)
    assert 0.2 < res.subsets["all"]["AP50"] < 0.8


def test_false_positives_lower_precision():
    gt = make_gt()
    dets = gt_as_detections(gt)
    # high-scoring duplicates with the wrong class ahead of every correct detection
    for d in list(dets):
        wrong = dict(d, category_id=(d["category_id"] % 4) + 1, score=0.99)
        dets.append(wrong)
    res = coco_evaluate(gt, dets, CLASSES)
    assert res.subsets["all"]["AP"] < 0.9


def test_subset_numbers_match_pycocotools_summarize():
    gt = make_gt(seed=3)
    rng = np.random.default_rng(1)
    dets = gt_as_detections(gt, shift=lambda a: rng.random() < 0.3)
    for d in dets:
        d["score"] = float(rng.uniform(0.1, 1.0))
    res = coco_evaluate(gt, dets, CLASSES, {"t2": ["c", "d"]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.catIds = [3, 4]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert res.subsets["t2"]["AP"] == pytest.approx(ev.stats[0])
    assert res.subsets["t2"]["AP50"] == pytest.approx(ev.stats[1])
    assert res.subsets["t2"]["AP75"] == pytest.approx(ev.stats[2])


def test_model_classes_matched_by_name_and_extra_gt_classes_ignored():
    gt = make_gt()
    # a model that knows only c and a (in that order): its label 0 = "c", 1 = "a"
    dets = [d for d in gt_as_detections(gt) if d["category_id"] in (1, 3)]
    res = coco_evaluate(gt, dets, ["c", "a"])
    assert res.subsets["all"]["AP"] == pytest.approx(1.0)
    assert set(res.per_class) == {"a", "c"}


def test_no_detections_and_bad_arguments(capsys):
    gt = make_gt()
    res = coco_evaluate(gt, [], CLASSES, {"t1": ["a"]})
    assert res.subsets["all"]["AP"] == 0.0 and res.num_detections == 0
    with pytest.raises(ValueError, match=r"subsets\['t1'\]"):
        coco_evaluate(gt, [], CLASSES, {"t1": ["zebra"]})
    with pytest.raises(ValueError, match="class_names"):
        coco_evaluate(gt, [], ["zebra"])
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_json_and_table():
    gt = make_gt()
    res = coco_evaluate(gt, gt_as_detections(gt), CLASSES, {"t1": ["a", "b"]})
    data = json.loads(res.to_json())
    assert data["subsets"]["t1"]["AP50"] == pytest.approx(1.0)
    table = results_table(res)
    assert table.row_count == 2


# ---------------------------------------------------------------------------------------------
# evaluate() with a model and a loader


class OracleDetector(nn.Module):
    """Predicts the ground truth of each image (identified by pixel [0, 0, 0]) as logits/boxes."""

    def __init__(self, gt: dict, head: str, queries: int = 8, noise: float = 0.0) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.head = head
        self.queries = queries
        self.noise = noise
        self.by_image = {}
        sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
        for a in gt["annotations"]:
            h, w = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            box = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
            self.by_image.setdefault(a["image_id"], []).append((a["category_id"] - 1, box))

    def forward(self, images, mask=None):
        b = images.shape[0]
        c = len(CLASSES)
        k = c + 1 if self.head == "softmax" else c
        logits = torch.full((b, self.queries, k), -10.0)
        if self.head == "softmax":
            logits[..., -1] = 10.0  # no object
        boxes = torch.full((b, self.queries, 4), 0.5)
        for i in range(b):
            objs = self.by_image.get(int(images[i, 0, 0, 0]), [])
            for q, (label, box) in enumerate(objs):
                logits[i, q, label] = 10.0
                if self.head == "softmax":
                    logits[i, q, -1] = -10.0
                boxes[i, q] = torch.tensor(box) + self.noise * torch.tensor([0.3, 0.3, 0, 0])
        return {"pred_logits": logits, "pred_boxes": boxes}


def make_loader(gt: dict, batch_size: int = 5):
    batches = []
    images = gt["images"]
    for s in range(0, len(images), batch_size):
        chunk = images[s : s + batch_size]
        imgs = torch.zeros(len(chunk), 3, 16, 16)
        targets = []
        for i, im in enumerate(chunk):
            imgs[i, 0, 0, 0] = im["id"]
            targets.append(
                {"image_id": im["id"], "orig_size": torch.tensor([im["height"], im["width"]])}
            )
        batches.append((imgs, torch.zeros(len(chunk), 16, 16, dtype=torch.bool), targets))
    return batches


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_evaluate_model_oracle_and_perturbed(head):
    gt = make_gt()
    loader = make_loader(gt)
    model = OracleDetector(gt, head)
    model.train()
    res = evaluate(model, loader, CLASSES, {"t1": ["a", "b"]}, coco_gt=gt)
    assert isinstance(res, EvalResult)
    assert res.subsets["all"]["AP"] == pytest.approx(1.0)
    assert res.subsets["t1"]["AP50"] == pytest.approx(1.0)
    assert model.training  # mode restored
    noisy = evaluate(OracleDetector(gt, head, noise=1.0), loader, CLASSES, coco_gt=gt)
    assert noisy.subsets["all"]["AP"] < 0.5


def test_evaluate_needs_ground_truth():
    with pytest.raises(ValueError, match="coco_gt"):
        evaluate(OracleDetector(make_gt(), "softmax"), [], CLASSES)


def test_postprocess_softmax_and_sigmoid():
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 9.0]]])  # C=2 (+1)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    out = postprocess(logits, boxes, torch.tensor([[100, 200]]), "softmax", max_dets=2)[0]
    assert out["labels"].tolist() == [0, 1]  # the no-object query's best foreground is lowest
    # (cx, cy, w, h) = (0.5, 0.5, 0.2, 0.4) on a 200 x 100 (w x h) image
    assert out["boxes"][0].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])
    sig = torch.tensor([[[2.0, -1.0], [-3.0, 3.0]]])  # C = 2, Q = 2
    out = postprocess(sig, boxes[:, :2], torch.tensor([[10, 10]]), "sigmoid", max_dets=3)[0]
    assert out["labels"].tolist() == [1, 0, 1]  # logits 3, 2, -1 (and -3 cut)
    assert out["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert out["boxes"].shape == (3, 4)


class TargetEcho(nn.Module):
    """Returns each image's (transformed, normalised) targets as confident predictions."""

    def __init__(self, targets_by_id: dict, num_classes: int, queries: int = 16) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.targets_by_id, self.c, self.q = targets_by_id, num_classes, queries

    def forward(self, images, mask=None):
        b = images.shape[0]
        logits = torch.full((b, self.q, self.c), -10.0)
        boxes = torch.full((b, self.q, 4), 0.5)
        for i in range(b):
            t = self.targets_by_id[int(images[i, 0, 0, 0].round())]
            n = len(t["labels"])
            logits[i, torch.arange(n), t["labels"]] = 10.0
            boxes[i, :n] = t["boxes"]
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_dataset_transforms_and_evaluation_agree_on_coordinates():
    """Shapes drawn at 64 px, resized to 48 for the model: normalised targets fed back as
    predictions score AP 1.0 against the dataset's own COCO ground truth (original pixels)."""
    from ka_rs.data import ClassSubset, ShapesDataset, collate_fn, make_transforms

    base = ShapesDataset("val", 6, image_size=64, transforms=make_transforms("val", 48))
    ds = ClassSubset(base, ["circle", "star", "ring"])
    items = [ds[i] for i in range(len(ds))]
    assert items[0][0].shape[-1] == 48 and items[0][1]["orig_size"].tolist() == [64, 64]
    by_id = {t["image_id"]: t for _, t in items}
    batches = []
    for s in range(0, len(items), 4):
        images, mask, targets = collate_fn(items[s : s + 4])
        for i, t in enumerate(targets):
            images[i, 0, 0, 0] = t["image_id"]  # tag the image for the echo model
        batches.append((images, mask, targets))
    res = evaluate(TargetEcho(by_id, 3), batches, ds.class_names, coco_gt=ds.coco_gt())
    assert res.subsets["all"]["AP"] > 0.95  # resize rounding may cost a hair at IoU .95
    assert res.subsets["all"]["AP50"] == pytest.approx(1.0)

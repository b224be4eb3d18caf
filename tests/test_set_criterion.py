"""SetCriterion: DETR's set loss (softmax) and the focal variant (sigmoid), on the Rust matcher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ka_rs import matcher as matcher_module
from ka_rs import ops
from ka_rs.losses import (
    SetCriterion,
    box_cxcywh_to_xyxy,
    build_criterion,
    dense_targets,
    generalized_box_iou_pairs,
    sigmoid_focal_loss,
)
from ka_rs.matcher import HungarianMatcher
from ka_rs.models import DETR, DetrConfig


def _targets():
    return [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.3]])},
    ]


def _perfect_outputs(targets, class_head: str, queries: int = 6, num_classes: int = 3):
    """Predictions with a confident correct query per target and confident empties elsewhere."""
    k = num_classes + 1 if class_head == "softmax" else num_classes
    logits = torch.full((len(targets), queries, k), -12.0)
    boxes = torch.tensor([0.1, 0.9, 0.05, 0.05]).repeat(len(targets), queries, 1)
    if class_head == "softmax":
        logits[..., -1] = 12.0
    for b, t in enumerate(targets):
        for j, (label, box) in enumerate(zip(t["labels"], t["boxes"], strict=True)):
            q = 2 * j + 1
            logits[b, q] = -12.0
            logits[b, q, label] = 12.0
            boxes[b, q] = box
    return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.mark.parametrize("class_head", ["softmax", "sigmoid"])
def test_perfect_predictions_have_zero_box_loss(class_head):
    targets = _targets()
    final = _perfect_outputs(targets, class_head)
    outputs = {**final, "aux_outputs": [dict(final), dict(final)]}
    losses = SetCriterion(3, class_head=class_head)(outputs, targets)
    for suffix in ("", "_0", "_1"):
        assert losses[f"loss_bbox{suffix}"].item() == pytest.approx(0.0, abs=1e-7)
        assert losses[f"loss_giou{suffix}"].item() == pytest.approx(0.0, abs=1e-6)
        assert losses[f"loss_ce{suffix}"].item() < 1e-4
    assert losses["class_error"].item() == 0.0
    assert losses["loss"].item() < 1e-3


@pytest.mark.parametrize("class_head", ["softmax", "sigmoid"])
def test_imperfect_predictions_cost_more(class_head):
    targets = _targets()
    good = _perfect_outputs(targets, class_head)
    bad = {k: v.clone() for k, v in good.items()}
    bad["pred_boxes"][:, :, :2] += 0.05
    crit = SetCriterion(3, class_head=class_head)
    lb, lg = crit(bad, targets), crit(good, targets)
    # every matched box moved by 0.05 in cx and cy: L1 = 0.1 per box
    assert lb["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert lb["loss_giou"].item() > 0.1
    assert lb["loss"].item() > lg["loss"].item() + 0.5


def test_softmax_loss_equals_detr_reference(make_detr_batch):
    outputs, targets = make_detr_batch(batch=3, queries=10, num_classes=4, max_targets=5)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    crit = SetCriterion(4, HungarianMatcher.detr(), eos_coef=0.1, aux_loss=False)
    losses = crit(outputs, targets)
    # DETR's formulas on the same matching
    idx = HungarianMatcher.detr()(outputs, targets)
    b_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(idx)])
    s_idx = torch.cat([s for s, _ in idx])
    target_classes = torch.full((3, 10), 4)
    target_classes[b_idx, s_idx] = torch.cat(
        [t["labels"][j] for t, (_, j) in zip(targets, idx, strict=True)]
    )
    weight = torch.ones(5)
    weight[-1] = 0.1
    ce = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), target_classes, weight)
    src = outputs["pred_boxes"][b_idx, s_idx]
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, idx, strict=True)])
    n = max(sum(len(t["labels"]) for t in targets), 1)
    l1 = F.l1_loss(src, tgt, reduction="sum") / n
    g = torch.diag(ops.generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    giou = (1 - g).sum() / n
    torch.testing.assert_close(losses["loss_ce"], ce)
    torch.testing.assert_close(losses["loss_bbox"], l1)
    torch.testing.assert_close(losses["loss_giou"], giou)
    torch.testing.assert_close(losses["loss"], ce + 5 * l1 + 2 * giou)
    losses["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_sigmoid_loss_is_focal_sum_over_num_boxes(make_detr_batch):
    outputs, targets = make_detr_batch(
        batch=2, queries=8, num_classes=3, class_head="sigmoid", sizes=[2, 3]
    )
    crit = SetCriterion(3, class_head="sigmoid", aux_loss=False)
    assert crit.matcher.class_cost == "focal" and crit.weight_class == 2.0
    losses = crit(outputs, targets)
    idx = HungarianMatcher.deformable()(outputs, targets)
    onehot = torch.zeros(2, 8, 3)
    for b, (s, j) in enumerate(idx):
        onehot[b, s, targets[b]["labels"][j]] = 1.0
    focal = sigmoid_focal_loss(outputs["pred_logits"], onehot).sum() / 5
    torch.testing.assert_close(losses["loss_ce"], focal)


def test_focal_loss_formula():
    x = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = x.sigmoid()
    want = torch.where(
        t > 0, -0.25 * (1 - p) ** 2 * p.log(), -0.75 * p**2 * (1 - p).log()
    )  # fmt: skip
    torch.testing.assert_close(sigmoid_focal_loss(x, t), want)


def test_torch_giou_matches_the_rust_one_and_is_safe(torch_gen):
    from conftest import random_cxcywh

    a = box_cxcywh_to_xyxy(random_cxcywh(50, torch_gen))
    b = box_cxcywh_to_xyxy(random_cxcywh(50, torch_gen))
    torch.testing.assert_close(
        generalized_box_iou_pairs(a, b), torch.diag(ops.generalized_box_iou(a, b))
    )
    torch.testing.assert_close(generalized_box_iou_pairs(a, a), torch.ones(50))
    zero = torch.tensor([[0.2, 0.2, 0.2, 0.2]], requires_grad=True)
    g = generalized_box_iou_pairs(zero, torch.tensor([[0.1, 0.1, 0.3, 0.3]]))
    g.sum().backward()
    assert torch.isfinite(g).all() and torch.isfinite(zero.grad).all()
    with pytest.raises(ValueError, match="boxes2"):
        generalized_box_iou_pairs(a, b[:3])


def test_all_layers_are_matched_in_one_native_call(monkeypatch, make_detr_batch):
    outputs, targets = make_detr_batch(batch=2, queries=6, num_classes=3, max_targets=3)
    outputs["aux_outputs"] = [
        {k: v + 0.01 * i for k, v in outputs.items() if k.startswith("pred")} for i in range(1, 5)
    ]
    calls = []
    real = matcher_module._native.match_layers
    layer_logits = [outputs["pred_logits"]] + [a["pred_logits"] for a in outputs["aux_outputs"]]

    def counting(*args):
        calls.append([a.shape for a in args[0]])
        # each layer's logits reach Rust as a view of the layer's own tensor: no stacking copy
        assert all(
            np.shares_memory(a, t.detach().numpy())
            for a, t in zip(args[0], layer_logits, strict=True)
        )
        return real(*args)

    monkeypatch.setattr(matcher_module._native, "match_layers", counting)
    losses = SetCriterion(3)(outputs, targets)
    assert calls == [[(2, 6, 4)] * 5]
    assert {f"loss_ce_{i}" for i in range(4)} <= set(losses)


def test_images_without_targets():
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    losses = SetCriterion(3)(outputs, [empty, empty])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    # every query is trained toward "no object"
    want = F.cross_entropy(outputs["pred_logits"].flatten(0, 1), torch.full((10,), 3))
    torch.testing.assert_close(losses["loss_ce"], want)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="matcher"):
        SetCriterion(3, HungarianMatcher.deformable(), class_head="softmax")
    with pytest.raises(ValueError, match="class_head"):
        SetCriterion(3, class_head="softmax2")
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0)
    crit = SetCriterion(3)
    outputs = {"pred_logits": torch.randn(1, 5, 3), "pred_boxes": torch.rand(1, 5, 4)}
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}]
    with pytest.raises(ValueError, match="pred_logits"):  # 3 logits, softmax over 3 needs 4
        crit(outputs, tgt)
    outputs["pred_logits"] = torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match="labels"):
        crit(outputs, [{"labels": torch.tensor([3]), "boxes": tgt[0]["boxes"]}])
    with pytest.raises(ValueError, match="targets"):
        crit(outputs, tgt * 2)


def test_dense_targets_mark_tokens_inside_boxes_and_the_nearest_one():
    xy = torch.tensor([[[0.1, 0.1], [0.3, 0.1], [0.1, 0.3], [0.3, 0.3], [0.9, 0.9]]])
    enc = {
        "pred_logits": torch.full((1, 5, 3), -3.0),
        "token_xy": xy,
        "padding_mask": torch.tensor([[False, False, False, False, True]]),
    }
    labels = [torch.tensor([2, 0, 1])]
    boxes = [
        torch.tensor(
            [
                [0.2, 0.1, 0.5, 0.1],  # covers tokens 0 and 1 -> class 2
                [0.32, 0.32, 0.01, 0.01],  # tiny: only the nearest token 3 -> class 0
                [0.9, 0.9, 0.2, 0.2],  # only over the padded token 4 -> nearest valid, 3
            ]
        )
    ]
    onehot, num_pos, valid, box_target, positive = dense_targets(enc, labels, boxes)
    want = torch.zeros(1, 5, 3)
    want[0, 0, 2] = want[0, 1, 2] = want[0, 3, 0] = want[0, 3, 1] = 1.0
    torch.testing.assert_close(onehot, want)
    assert num_pos == 3
    torch.testing.assert_close(valid, torch.tensor([[1.0, 1, 1, 1, 0]]))
    # the loss ignores padded tokens and is normalised by the positives
    outputs = {
        "pred_logits": torch.randn(1, 4, 3),
        "pred_boxes": torch.rand(1, 4, 4),
        "enc_outputs": enc,
    }
    targets = [{"labels": labels[0], "boxes": boxes[0]}]
    losses = SetCriterion(3, class_head="sigmoid", aux_loss=False)(outputs, targets)
    focal = sigmoid_focal_loss(enc["pred_logits"], want)[0, :4].sum() / 3
    torch.testing.assert_close(losses["loss_dense"], focal)
    off = SetCriterion(3, class_head="sigmoid", aux_loss=False, weight_dense=0.0)
    assert "loss_dense" not in off(outputs, targets)
    # dense box targets: token 3 is a positive of boxes 1 and 2 and takes the smaller (1)
    assert positive.tolist() == [[True, True, False, True, False]]
    torch.testing.assert_close(box_target[0, [0, 1, 3]], boxes[0][[0, 0, 1]])
    assert "loss_dense_bbox" not in losses  # no dense proposal boxes in these outputs


def test_two_stage_dense_box_loss_is_zero_for_exact_proposals_and_positive_otherwise():
    xy = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]])
    box = torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.75, 0.75, 0.2, 0.2]])
    exact = torch.stack([box[0], torch.rand(4), torch.rand(4), box[1]])[None]
    enc = {
        "pred_logits": torch.zeros(1, 4, 2),
        "token_xy": xy,
        "padding_mask": torch.zeros(1, 4, dtype=torch.bool),
        "pred_boxes": exact,
    }
    outputs = {"pred_logits": torch.randn(1, 3, 2), "pred_boxes": torch.rand(1, 3, 4)}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": box}]
    crit = SetCriterion(2, class_head="sigmoid", aux_loss=False)
    losses = crit({**outputs, "enc_outputs": enc}, targets)
    # only tokens 0 and 3 are positives: the random boxes of tokens 1 and 2 do not count
    assert losses["loss_dense_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_dense_giou"].item() == pytest.approx(0.0, abs=1e-6)
    moved = {**enc, "pred_boxes": exact + torch.tensor([0.05, 0.0, 0.0, 0.0])}
    worse = crit({**outputs, "enc_outputs": moved}, targets)
    assert worse["loss_dense_bbox"].item() == pytest.approx(2 * 0.05 / 2, rel=1e-4)
    assert worse["loss_dense_giou"].item() > 0.0
    assert worse["loss"] > losses["loss"]


def test_build_criterion_follows_the_model_config():
    crit = build_criterion(DetrConfig(num_classes=4, variant="anchor"), eos_coef=0.2)
    assert crit.class_head == "sigmoid" and crit.num_classes == 4
    assert crit.matcher.class_cost == "focal"
    assert build_criterion(DetrConfig(num_classes=4)).matcher.class_cost == "softmax"


def _overfit_batch():
    """Two 32×32 images with bright rectangles; targets are the rectangles."""
    images = torch.full((2, 3, 32, 32), -1.0)
    boxes = [
        torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.7, 0.75, 0.4, 0.3]]),
        torch.tensor([[0.5, 0.4, 0.5, 0.6]]),
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    for i, bxs in enumerate(boxes):
        for lab, (cx, cy, w, h) in zip(labels[i], bxs.tolist(), strict=True):
            x0, x1 = int((cx - w / 2) * 32), int((cx + w / 2) * 32)
            y0, y1 = int((cy - h / 2) * 32), int((cy + h / 2) * 32)
            images[i, int(lab), y0:y1, x0:x1] = 1.0
    targets = [{"labels": lab, "boxes": bx} for lab, bx in zip(labels, boxes, strict=True)]
    return images, targets


@pytest.fixture
def one_thread():
    """Tiny models train much faster on one thread than on an oversubscribed shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", ["detr", "anchor", "anchor+prior+dense", "anchor+two_stage"])
def test_loss_decreases_when_overfitting_a_fixed_batch(variant, one_thread):
    extras: dict[str, bool] = {}
    if "+prior" in variant:
        extras = {"box_prior": True, "dense_aux": True}
    elif "+two_stage" in variant:
        extras = {"box_prior": True, "dense_aux": True, "two_stage": True}
    torch.manual_seed(0)
    config = DetrConfig(
        num_classes=2,
        backbone="small_cnn",
        cnn_channels=(16, 32),
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        num_queries=6,
        variant=variant.split("+")[0],
        **extras,
    )
    model = DETR(config)
    criterion = build_criterion(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images, targets = _overfit_batch()
    history = []
    for _ in range(60):
        losses = criterion(model(images), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert all(torch.isfinite(torch.tensor(history)))
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.6 * first, history
    assert losses["loss_bbox"].item() < 0.5 * history_bbox_start(config, images, targets)


def history_bbox_start(config, images, targets):
    """Final-layer L1 loss of a freshly initialised model with the same seed."""
    torch.manual_seed(0)
    with torch.no_grad():
        return build_criterion(config)(DETR(config)(images), targets)["loss_bbox"].item()

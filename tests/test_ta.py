"""TaskAmalgamationLoss (docs/method.md §4) and the label-free / label-assisted schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ka_rs.losses.ta import TaskAmalgamationLoss, amalgamation_weight
from ka_rs.matcher import HungarianMatcher


class SpyMatcher(HungarianMatcher):
    """Counts match_layers calls and the number of layers of each."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[int] = []

    def match_layers(self, outputs_list, targets):
        self.calls.append(len(outputs_list))
        return super().match_layers(outputs_list, targets)


def _target(labels, boxes, soft, teacher=None):
    t = {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "soft_logits": torch.tensor(soft, dtype=torch.float32),
        "scores": torch.ones(len(labels)),
        "teacher": torch.zeros(len(labels), dtype=torch.int64)
        if teacher is None
        else torch.tensor(teacher, dtype=torch.int64),
    }
    return t


def _empty(num_cols: int):
    t = _target([], [], [])
    t["soft_logits"] = torch.zeros(0, num_cols)
    return t


def test_kl_term_hand_computed_3_class_example():
    # U = 2 classes + background = 3 logits; 1 image, 2 queries, 1 pseudo-target.
    # Query 0 sits exactly on the pseudo-target's box, query 1 far away: the matcher must pick
    # query 0, and the box terms vanish. Both queries predict logits s = (0, 0, 0).
    box = [0.3, 0.3, 0.2, 0.2]
    outputs = {
        "pred_logits": torch.zeros(1, 2, 3, requires_grad=True),
        "pred_boxes": torch.tensor([[box, [0.8, 0.8, 0.1, 0.1]]]),
        "aux_outputs": [],
    }
    target = _target([0], [box], [[8.0, 0.0, 0.0]])  # teacher soft logits t = (8, 0, 0)
    loss = TaskAmalgamationLoss(num_classes=2)  # T = 4, eos 0.1
    out = loss(outputs, [target])
    # matched query 0:  t/T = (2, 0, 0) -> p_t = (e², 1, 1)/(e² + 2)
    #                                           = (0.786986, 0.106507, 0.106507)
    #                   s/T = (0, 0, 0) -> p_s = (1/3, 1/3, 1/3)
    #   KL = Σ p_t·log(p_t / p_s) = 0.786986·log(2.360958) + 2·0.106507·log(0.319521)
    #      = 0.786986·0.859068 + 2·0.106507·(−1.140932) = 0.676074 − 0.243035 = 0.433040
    #   KL·T² = 0.433040·16 = 6.928634
    # unmatched query 1: CE toward background = −log(1/3) = 1.098612, weighted by eos 0.1
    # L_cls = (6.928634 + 0.1·1.098612) / (1 + 0.1·1) = 7.038495 / 1.1 = 6.398632
    assert out["loss_class"].item() == pytest.approx(6.398632, abs=2e-5)
    assert out["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(6.398632, abs=2e-5)
    # the same numbers from first principles
    p_t = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    kl = (p_t * (p_t * 3).log()).sum().item() * 16
    assert out["loss_class"].item() == pytest.approx((kl + 0.1 * math.log(3)) / 1.1, rel=1e-6)
    out["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def _giou_ref(a, b):
    def xyxy(x):
        cx, cy, w, h = x
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ax0, ay0, ax1, ay1 = xyxy(a)
    bx0, by0, bx1, by1 = xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _boxes(g, *shape):
    centre = torch.rand(*shape, 2, generator=g) * 0.5 + 0.25
    size = torch.rand(*shape, 2, generator=g) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def _random_case(head: str, seed: int, u: int = 3, q: int = 7, b: int = 3, aux: int = 2):
    g = torch.Generator().manual_seed(seed)
    k = u + 1 if head == "softmax" else u
    layers = [
        {"pred_logits": torch.randn(b, q, k, generator=g), "pred_boxes": _boxes(g, b, q)}
        for _ in range(aux + 1)
    ]
    outputs = {**layers[0], "aux_outputs": layers[1:]}
    targets = []
    for i in range(b):
        m = [2, 0, 4][i % 3]
        targets.append(
            {
                "labels": torch.randint(0, u, (m,), generator=g),
                "boxes": _boxes(g, m),
                "soft_logits": torch.randn(m, u + 1, generator=g) * 3,
                "teacher": torch.zeros(m, dtype=torch.int64),
            }
        )
    return outputs, layers, targets


def _reference_layer(head, layer, targets, indices, t=4.0, eos=0.1, alpha=0.25, gamma=2.0):
    """Per-query loop reference of one layer's (class, L1, GIoU) TA terms."""
    logits, boxes = layer["pred_logits"].double(), layer["pred_boxes"].double()
    b, q, _ = logits.shape
    n_boxes = max(sum(len(tg["labels"]) for tg in targets), 1)
    matched_terms, unmatched_terms, n_m, n_u, l1, giou = 0.0, 0.0, 0, 0, 0.0, 0.0
    for i in range(b):
        pairs = dict(zip(indices[i][0].tolist(), indices[i][1].tolist(), strict=True))
        for j in range(q):
            s = logits[i, j]
            if j in pairs:
                tl = targets[i]["soft_logits"][pairs[j]].double()
                if head == "softmax":
                    pt = torch.softmax(tl / t, 0)
                    ps = torch.softmax(s / t, 0)
                    matched_terms += float((pt * (pt / ps).log()).sum()) * t * t
                else:
                    pt = torch.sigmoid(tl[:-1] / t)
                    ps = torch.sigmoid(s / t)
                    bkl = pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
                    matched_terms += float(bkl.sum()) * t * t
                tb = targets[i]["boxes"][pairs[j]].double()
                l1 += float((boxes[i, j] - tb).abs().sum())
                giou += 1 - _giou_ref(boxes[i, j].tolist(), tb.tolist())
                n_m += 1
            else:
                if head == "softmax":
                    unmatched_terms += -float(torch.log_softmax(s, 0)[-1])
                else:
                    p = torch.sigmoid(s)
                    unmatched_terms += float(((1 - alpha) * p**gamma * -(1 - p).log()).sum())
                n_u += 1
    if head == "softmax":
        cls = (matched_terms + eos * unmatched_terms) / (n_m + eos * n_u)
    else:
        cls = (matched_terms + unmatched_terms) / n_boxes
    return cls, l1 / n_boxes, giou / n_boxes


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_query_reference_all_layers_one_call(head, seed):
    outputs, layers, targets = _random_case(head, seed)
    spy = SpyMatcher(class_cost="softmax" if head == "softmax" else "focal")
    loss = TaskAmalgamationLoss(3, matcher=spy, class_head=head)
    out = loss(outputs, targets)
    assert spy.calls == [3]  # final + 2 aux layers, ONE match_layers call
    indices = HungarianMatcher(class_cost=spy.class_cost).match_layers(layers, targets)
    total = 0.0
    for li, layer in enumerate(layers):
        cls, l1, giou = _reference_layer(head, layer, targets, indices[li])
        sfx = "" if li == 0 else f"_{li - 1}"
        assert out[f"loss_class{sfx}"].item() == pytest.approx(cls, rel=1e-4, abs=1e-5)
        assert out[f"loss_bbox{sfx}"].item() == pytest.approx(l1, rel=1e-4, abs=1e-6)
        assert out[f"loss_giou{sfx}"].item() == pytest.approx(giou, rel=1e-4, abs=1e-6)
        total += cls + 5 * l1 + 2 * giou
    assert out["loss"].item() == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_empty_pseudo_targets(head):
    k = 4 if head == "softmax" else 3
    logits = torch.randn(2, 5, k, requires_grad=True)
    boxes = torch.rand(2, 5, 4) * 0.2 + 0.3
    outputs = {"pred_logits": logits, "pred_boxes": boxes.requires_grad_(True)}
    loss = TaskAmalgamationLoss(3, class_head=head)
    out = loss(outputs, [_empty(4), _empty(4)])
    if head == "softmax":  # all unmatched: mean CE toward background
        expected = -F.log_softmax(logits, -1)[..., -1].mean()
    else:  # focal toward zero, divided by max(#pseudo-targets, 1) = 1
        p = logits.sigmoid()
        expected = (0.75 * p.pow(2) * F.softplus(logits)).sum()
    assert out["loss_class"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss_bbox"].item() == 0.0 and out["loss_giou"].item() == 0.0
    out["loss"].backward()
    assert logits.grad.abs().sum() > 0
    # one image empty, the other not: works, and only the non-empty image has matches
    tgt = _target([1], [[0.4, 0.4, 0.1, 0.1]], [[0.0, 3.0, 0.0, -1.0]])
    out = loss({"pred_logits": logits, "pred_boxes": boxes}, [_empty(4), tgt])
    assert torch.isfinite(out["loss"]) and out["loss_bbox"].item() > 0


def test_kl_zero_when_student_copies_teacher_logits():
    # softmax: matched KL is 0 when s == t; the remaining class loss is the eos CE only
    box = [0.5, 0.5, 0.3, 0.3]
    t = [1.0, -2.0, 0.5, 0.2]
    outputs = {"pred_logits": torch.tensor([[t]]), "pred_boxes": torch.tensor([[box]])}
    out = TaskAmalgamationLoss(3)(outputs, [_target([0], [box], [t])])
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    # sigmoid: the binary KL is 0 when s == t[:U]; one query, matched, so no focal term
    outputs = {"pred_logits": torch.tensor([[t[:3]]]), "pred_boxes": torch.tensor([[box]])}
    out = TaskAmalgamationLoss(3, class_head="sigmoid")(outputs, [_target([0], [box], [t])])
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_kinds_conversion():
    box = [0.5, 0.5, 0.3, 0.3]
    soft = torch.tensor([[2.0, -1.0, 0.5, 1.0]])  # a softmax teacher's logits over U + bg
    p = torch.softmax(soft[0], 0)[:3]
    # a sigmoid student predicting log-odds of the softmax teacher's probabilities, at T=1,
    # has zero binary KL
    s = (p / (1 - p)).log()
    outputs = {"pred_logits": s.view(1, 1, 3), "pred_boxes": torch.tensor([[box]])}
    tgt = _target([0], [box], soft.tolist())
    loss = TaskAmalgamationLoss(3, class_head="sigmoid", temperature=1.0, teacher_kinds=["softmax"])
    assert loss(outputs, [tgt])["loss"].item() == pytest.approx(0.0, abs=1e-5)
    # without conversion the same student is penalised
    plain = TaskAmalgamationLoss(3, class_head="sigmoid", temperature=1.0)
    assert plain(outputs, [tgt])["loss"].item() > 0.1
    # a softmax student fed by a sigmoid teacher: finite, differentiable
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    conv = TaskAmalgamationLoss(3, teacher_kinds=["sigmoid"])
    out = conv({"pred_logits": logits, "pred_boxes": torch.tensor([[box]])}, [tgt])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and logits.grad.abs().sum() > 0


def test_validation_errors():
    loss = TaskAmalgamationLoss(3)
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.rand(1, 2, 4)}
    with pytest.raises(ValueError, match="pred_logits"):
        loss(outputs, [_empty(4)])
    outputs = {"pred_logits": torch.zeros(1, 2, 4), "pred_boxes": torch.rand(1, 2, 4)}
    with pytest.raises(ValueError, match="pseudo_targets"):
        loss(outputs, [_empty(4), _empty(4)])
    with pytest.raises(ValueError, match="soft_logits"):
        loss(outputs, [_target([0], [[0.5, 0.5, 0.2, 0.2]], [[0.0, 0.0, 0.0]])])
    with pytest.raises(ValueError, match="class_head"):
        TaskAmalgamationLoss(3, class_head="focal")
    with pytest.raises(ValueError, match="temperature"):
        TaskAmalgamationLoss(3, temperature=0.0)


def test_amalgamation_weight():
    assert amalgamation_weight(0, 10) == (0.0, 1.0)
    assert amalgamation_weight(9, 10, "label_free") == (0.0, 1.0)
    assert amalgamation_weight(0, 10, "label_assisted") == (1.0, 1.0)
    assert amalgamation_weight(5, 10, "label_assisted") == (1.0, 0.5)
    assert amalgamation_weight(9, 10, "label_assisted") == pytest.approx((1.0, 0.1))
    assert amalgamation_weight(12, 10, "label_assisted") == (1.0, 0.0)
    with pytest.raises(ValueError, match="mode"):
        amalgamation_weight(0, 10, "assisted")
    with pytest.raises(ValueError, match="total_epochs"):
        amalgamation_weight(0, 0)
    with pytest.raises(ValueError, match="epoch"):
        amalgamation_weight(-1, 10)

"""ka_rs.HungarianMatcher against a DETR-style torch + scipy reference matcher."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ka_rs
import numpy as np
import pytest
import scipy.optimize
import torch
from ka_rs.matcher import HungarianMatcher

# ---------------------------------------------------------------------------------------------
# reference: DETR's matcher (batch-wide [B*Q, sum T] cost in torch, per-image scipy)
# ---------------------------------------------------------------------------------------------


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def ref_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b - inter
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[:, :2])
    rb = torch.max(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def ref_cost_matrix(
    m: HungarianMatcher, outputs, targets, dtype=torch.float32
) -> list[torch.Tensor]:
    """DETR's batch-wide cost, split into the per-image [Q, T_i] blocks it keeps."""
    bs, nq = outputs["pred_logits"].shape[:2]
    logits = outputs["pred_logits"].flatten(0, 1).to(dtype)
    out_bbox = outputs["pred_boxes"].flatten(0, 1).to(dtype)
    tgt_ids = torch.cat([t["labels"] for t in targets]).long()
    tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(dtype)
    if m.class_cost == "softmax":
        cost_class = -logits.softmax(-1)[:, tgt_ids]
    else:
        p = logits.sigmoid()
        a, g = m.focal_alpha, m.focal_gamma
        neg = (1 - a) * (p**g) * (-(1 - p + 1e-8).log())
        pos = a * ((1 - p) ** g) * (-(p + 1e-8).log())
        cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    cost_giou = -ref_giou(cxcywh_to_xyxy(out_bbox), cxcywh_to_xyxy(tgt_bbox))
    c = m.cost_bbox * cost_bbox + m.cost_class * cost_class + m.cost_giou * cost_giou
    c = c.view(bs, nq, -1).cpu()
    sizes = [len(t["boxes"]) for t in targets]
    return [blk[i] for i, blk in enumerate(c.split(sizes, -1))]


def ref_match(m: HungarianMatcher, outputs, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for c in ref_cost_matrix(m, outputs, targets):
        i, j = scipy.optimize.linear_sum_assignment(c.numpy())
        out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
    return out


def assert_valid(indices, outputs, targets):
    nq = outputs["pred_boxes"].shape[1]
    assert len(indices) == len(targets)
    for (qi, ti), tgt in zip(indices, targets, strict=True):
        t = len(tgt["labels"])
        assert qi.dtype == ti.dtype == torch.int64
        assert qi.device.type == "cpu" and not qi.requires_grad
        assert qi.shape == ti.shape == (min(nq, t),)
        assert torch.all(qi[1:] > qi[:-1]), "query indices sorted and distinct"
        assert len(set(ti.tolist())) == len(ti)
        if len(qi):
            assert 0 <= int(qi.min()) and int(qi.max()) < nq
            assert 0 <= int(ti.min()) and int(ti.max()) < t


def assert_same_totals(m, outputs, targets, got):
    """Equal optimal totals on the reference's float64 cost; indices may differ only on ties.

    Both sides build their costs in float32; choices can differ only where two assignments'
    totals are within float32 rounding of each other (a tie at that precision).
    """
    blocks = ref_cost_matrix(m, outputs, targets, dtype=torch.float64)
    ref = ref_match(m, outputs, targets)
    for c, (qi, ti), (rq, rt) in zip(blocks, got, ref, strict=True):
        ours = math.fsum(c[qi, ti].tolist())
        theirs = math.fsum(c[rq, rt].tolist())
        cmax = float(c.abs().max()) if c.numel() else 1.0
        tol = 4e-6 * max(1.0, cmax) * max(1, len(qi))
        assert abs(ours - theirs) <= tol, (ours, theirs)


PRESETS = {"detr": HungarianMatcher.detr, "deformable": HungarianMatcher.deformable}
HEAD = {"detr": "softmax", "deformable": "sigmoid"}


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    ("batch", "queries", "max_targets"), [(1, 5, 3), (4, 20, 25), (8, 100, 20), (16, 300, 50)]
)
def test_same_total_cost_as_detr_reference(preset, batch, queries, max_targets, make_detr_batch):
    m = PRESETS[preset]()
    for _ in range(3 if batch * queries <= 1000 else 1):
        outputs, targets = make_detr_batch(batch, queries, 91, max_targets, HEAD[preset])
        got = m(outputs, targets)
        assert_valid(got, outputs, targets)
        assert_same_totals(m, outputs, targets, got)


@pytest.mark.parametrize("preset", PRESETS)
def test_indices_equal_reference_without_ties(preset, make_detr_batch):
    m = PRESETS[preset]()
    outputs, targets = make_detr_batch(6, 50, 20, 15, HEAD[preset], sizes=[1, 2, 5, 9, 15, 15])
    got = m(outputs, targets)
    ref = ref_match(m, outputs, targets)
    same = sum(
        torch.equal(q, rq) and torch.equal(t, rt) for (q, t), (rq, rt) in zip(got, ref, strict=True)
    )
    assert same == len(targets)  # continuous random costs: no ties, so identical indices


def test_custom_weights_and_focal_parameters(make_detr_batch):
    for m in [
        HungarianMatcher(cost_class=2.5, cost_bbox=0.0, cost_giou=1.0),
        HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0),
        HungarianMatcher(
            cost_class=1.0,
            cost_bbox=0.0,
            cost_giou=0.0,
            class_cost="focal",
            focal_alpha=0.5,
            focal_gamma=0.0,
        ),
        HungarianMatcher.deformable(focal_alpha=0.1, focal_gamma=3.0),
    ]:
        head = "sigmoid" if m.class_cost == "focal" else "softmax"
        outputs, targets = make_detr_batch(5, 40, 10, 12, head)
        got = m(outputs, targets)
        assert_valid(got, outputs, targets)
        assert_same_totals(m, outputs, targets, got)


def test_more_targets_than_queries(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(3, 4, 10, sizes=[9, 4, 2])
    got = m(outputs, targets)
    assert_valid(got, outputs, targets)
    assert [len(q) for q, _ in got] == [4, 4, 2]
    assert_same_totals(m, outputs, targets, got)


def test_empty_target_images(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(4, 30, 10, sizes=[0, 3, 0, 5])
    got = m(outputs, targets)
    assert_valid(got, outputs, targets)
    for i in (0, 2):
        assert got[i][0].shape == got[i][1].shape == (0,)
        assert got[i][0].dtype == torch.int64
    nonempty = [targets[1], targets[3]]
    sub = {k: v[[1, 3]] for k, v in outputs.items()}
    ref = m(sub, nonempty)
    assert all(
        torch.equal(a, b)
        for x, y in zip([got[1], got[3]], ref, strict=True)
        for a, b in zip(x, y, strict=True)
    )
    outputs, targets = make_detr_batch(3, 10, 5, sizes=[0, 0, 0])
    assert [(len(q), len(t)) for q, t in m(outputs, targets)] == [(0, 0)] * 3
    # empty boxes given as shape (0,) are accepted too
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0)}] * 3
    assert [len(q) for q, _ in m.match_layers([outputs, outputs], targets)[1]] == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# match_layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_match_layers_equals_per_layer_calls(preset, make_detr_batch):
    m = PRESETS[preset]()
    layers = []
    outputs, targets = make_detr_batch(6, 60, 20, 30, HEAD[preset])
    for _ in range(7):
        out, _ = make_detr_batch(6, 60, 20, 30, HEAD[preset])
        layers.append(out)
    result = m.match_layers(layers, targets)
    assert len(result) == 7 and all(len(r) == 6 for r in result)
    for out, per_image in zip(layers, result, strict=True):
        single = m(out, targets)
        for (q, t), (sq, st) in zip(per_image, single, strict=True):
            assert torch.equal(q, sq) and torch.equal(t, st)
    assert_same_totals(m, layers[3], targets, result[3])


def test_match_layers_with_different_query_counts(make_detr_batch):
    m = HungarianMatcher.detr()
    a, targets = make_detr_batch(3, 20, 10, 8)
    b, _ = make_detr_batch(3, 45, 10, 8)
    result = m.match_layers([a, b, a], targets)
    assert [len(r) for r in result] == [3, 3, 3]
    for out, got in zip([a, b, a], result, strict=True):
        ref = m(out, targets)
        assert all(
            torch.equal(x, y)
            for p, r in zip(got, ref, strict=True)
            for x, y in zip(p, r, strict=True)
        )


def test_match_layers_empty_list_and_zero_batch(make_detr_batch):
    m = HungarianMatcher.detr()
    assert m.match_layers([], []) == []
    outputs = {"pred_logits": torch.zeros(0, 10, 5), "pred_boxes": torch.zeros(0, 10, 4)}
    assert m(outputs, []) == []


# ---------------------------------------------------------------------------------------------
# input kinds
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeDetrOutput:
    pred_logits: torch.Tensor
    pred_boxes: torch.Tensor
    aux_outputs: list = field(default_factory=list)

    def __getitem__(self, key: str):
        return getattr(self, key)


class AttrsOnly:
    def __init__(self, d):
        self.pred_logits = d["pred_logits"]
        self.pred_boxes = d["pred_boxes"]


def test_numpy_objects_and_dtypes_give_same_result(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(4, 50, 20, 10)
    expected = m(outputs, targets)

    np_outputs = {k: v.numpy() for k, v in outputs.items()}
    np_targets = [{k: v.numpy() for k, v in t.items()} for t in targets]
    variants = [
        (np_outputs, np_targets),
        (FakeDetrOutput(outputs["pred_logits"], outputs["pred_boxes"]), targets),
        (AttrsOnly(outputs), targets),
        ({k: v.double() for k, v in outputs.items()}, targets),
        ({k: v.clone().requires_grad_(True) for k, v in outputs.items()}, targets),
        ({k: v.transpose(0, 1).contiguous().transpose(0, 1) for k, v in outputs.items()}, targets),
        (outputs, [{"labels": t["labels"].int(), "boxes": t["boxes"].double()} for t in targets]),
        (outputs, tuple(targets)),
    ]
    for outs, tgts in variants:
        got = m(outs, tgts)
        for (q, t), (eq, et) in zip(got, expected, strict=True):
            assert torch.equal(q, eq) and torch.equal(t, et)


def test_half_precision_inputs(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(3, 30, 10, 8)
    half = {k: v.half() for k, v in outputs.items()}
    got = m(half, targets)
    assert_valid(got, outputs, targets)
    ref_outputs = {k: v.float() for k, v in half.items()}
    assert_same_totals(m, ref_outputs, targets, got)


def test_presets_and_top_level_export():
    assert ka_rs.HungarianMatcher is HungarianMatcher
    d = HungarianMatcher.detr()
    assert (d.cost_class, d.cost_bbox, d.cost_giou, d.class_cost) == (1.0, 5.0, 2.0, "softmax")
    f = HungarianMatcher.deformable()
    assert (f.cost_class, f.cost_bbox, f.cost_giou, f.class_cost) == (2.0, 5.0, 2.0, "focal")
    assert (f.focal_alpha, f.focal_gamma) == (0.25, 2.0)
    assert "focal" in repr(f)
    assert HungarianMatcher.detr(cost_bbox=3.0).cost_bbox == 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(4, 50, 20, 10)
    expected = m.match_layers([outputs, outputs], targets)
    cuda_out = {k: v.cuda() for k, v in outputs.items()}
    cuda_tgt = [{k: v.cuda() for k, v in t.items()} for t in targets]
    got = m.match_layers([cuda_out, cuda_out], cuda_tgt)
    for layer, ref_layer in zip(got, expected, strict=True):
        for (q, t), (eq, et) in zip(layer, ref_layer, strict=True):
            assert torch.equal(q, eq) and torch.equal(t, et)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["pred_logits", "pred_boxes"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_predictions_name_the_tensor(key, value, make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(3, 20, 10, sizes=[2, 3, 1])
    outputs[key][1, 7, 2] = value
    with pytest.raises(ValueError, match=key):
        m(outputs, targets)
    with pytest.raises(ValueError, match=key):
        m.match_layers([{k: v.clone() for k, v in outputs.items()}, outputs], targets)


def test_bad_shapes_and_targets(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(2, 10, 5, sizes=[2, 3])
    with pytest.raises(ValueError, match="pred_logits"):
        m({"pred_logits": outputs["pred_logits"][0], "pred_boxes": outputs["pred_boxes"]}, targets)
    with pytest.raises(ValueError, match="pred_boxes"):
        m(
            {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"][..., :3]},
            targets,
        )
    with pytest.raises(ValueError, match="pred_boxes"):
        m(
            {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"][:, :5]},
            targets,
        )
    with pytest.raises(ValueError, match="pred_logits"):
        m({"pred_boxes": outputs["pred_boxes"]}, targets)
    with pytest.raises(ValueError, match="targets"):
        m(outputs, targets[:1])
    with pytest.raises(ValueError, match="targets"):
        m(outputs, [targets[0], {"labels": targets[1]["labels"]}])
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]"):
        m(outputs, [targets[0], {"labels": targets[1]["labels"], "boxes": torch.rand(2, 4)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        m(outputs, [{"labels": torch.rand(2), "boxes": torch.rand(2, 4)}, targets[1]])
    with pytest.raises(ValueError, match="targets"):
        m(outputs, [{"labels": torch.tensor([0, 6]), "boxes": torch.rand(2, 4)}, targets[1]])
    with pytest.raises(ValueError, match="targets.*no-object"):  # label 5 is the no-object logit
        m(outputs, [{"labels": torch.tensor([0, 5]), "boxes": torch.rand(2, 4)}, targets[1]])
    with pytest.raises(ValueError, match="targets"):
        m(outputs, [{"labels": torch.tensor([-1, 0]), "boxes": torch.rand(2, 4)}, targets[1]])
    bad_boxes = [targets[0], {"labels": targets[1]["labels"], "boxes": targets[1]["boxes"].clone()}]
    bad_boxes[1]["boxes"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^targets\[1\]\['boxes'\]: box 0 has a non-finite"):
        m(outputs, bad_boxes)
    with pytest.raises(ValueError, match=r"^targets\[1\]\['labels'\]: label 7 is out of range"):
        m(outputs, [targets[0], {"labels": torch.tensor([0, 1, 7]), "boxes": torch.rand(3, 4)}])
    with pytest.raises(ValueError, match="outputs_list"):
        m.match_layers(outputs, targets)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher(class_cost="sigmoid")
    with pytest.raises(ValueError, match="cost_class"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    with pytest.raises(ValueError, match="cost_bbox"):
        HungarianMatcher(cost_bbox=float("nan"))
    with pytest.raises(ValueError, match="focal_alpha"):
        HungarianMatcher.deformable(focal_alpha=1.5)
    with pytest.raises(ValueError, match="focal_gamma"):
        HungarianMatcher.deformable(focal_gamma=-1.0)


def test_result_is_deterministic_and_inputs_untouched(make_detr_batch):
    m = HungarianMatcher.deformable()
    outputs, targets = make_detr_batch(8, 100, 20, 30, "sigmoid")
    before = {k: v.clone() for k, v in outputs.items()}
    first = m.match_layers([outputs] * 3, targets)
    second = m.match_layers([outputs] * 3, targets)
    for k in outputs:
        assert torch.equal(outputs[k], before[k])
    for la, lb in zip(first, second, strict=True):
        for (q, t), (q2, t2) in zip(la, lb, strict=True):
            assert torch.equal(q, q2) and torch.equal(t, t2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[0], first[2], strict=True))
    np.testing.assert_equal(len(first), 3)


# ---------------------------------------------------------------------------------------------
# argument kinds: every error names the argument; odd-but-valid arrays are read exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cost_class", "cost_bbox", "cost_giou", "focal_alpha"])
@pytest.mark.parametrize("bad", [True, False, np.bool_(True), "1", None, [1.0], 1 + 2j])
def test_weights_must_be_real_numbers_not_bools(name, bad):
    # a bool is not a weight: cost_class=True used to mean 1.0
    with pytest.raises(TypeError, match=rf"^{name}: expected a real number"):
        HungarianMatcher(**{name: bad})
    lg, bx = np.zeros((1, 2, 3), np.float32), np.full((1, 2, 4), 0.25, np.float32)
    args = (
        [lg],
        [bx],
        np.zeros(1, np.int64),
        np.full((1, 4), 0.25, np.float32),
        np.ones(1, np.int64),
    )
    with pytest.raises(TypeError, match=rf"^{name}: expected a number"):
        ka_rs._native.match_layers(*args, **{name: bad})


def test_numpy_scalar_weights_are_accepted(make_detr_batch):
    outputs, targets = make_detr_batch(2, 10, 5, 4)
    plain = HungarianMatcher(cost_class=2.0, cost_bbox=5, cost_giou=2.0)
    numpy = HungarianMatcher(
        cost_class=np.float32(2.0), cost_bbox=np.int64(5), cost_giou=np.float64(2.0)
    )
    assert repr(plain) == repr(numpy)
    for (q, t), (eq, et) in zip(numpy(outputs, targets), plain(outputs, targets), strict=True):
        assert torch.equal(q, eq) and torch.equal(t, et)
    with pytest.raises(TypeError, match="^class_cost: "):
        HungarianMatcher(class_cost=1)
    with pytest.raises(TypeError, match="^class_cost: expected a str"):
        ka_rs._native.match_layers(
            [np.zeros((1, 1, 2), np.float32)],
            [np.full((1, 1, 4), 0.25, np.float32)],
            np.zeros(0, np.int64),
            np.zeros((0, 4), np.float32),
            np.zeros(1, np.int64),
            class_cost=None,
        )


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
def test_meta_and_sparse_tensors_name_the_argument(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(2, 6, 4, 3, sizes=[2, 1])
    meta = {k: torch.empty_like(v, device="meta") for k, v in outputs.items()}
    with pytest.raises(ValueError, match="^pred_logits: got a tensor on the 'meta' device"):
        m(meta, targets)
    sparse = dict(outputs, pred_boxes=outputs["pred_boxes"].to_sparse())
    with pytest.raises(TypeError, match="^pred_boxes: expected a dense"):
        m(sparse, targets)
    meta_t = [dict(t, boxes=t["boxes"].to("meta")) for t in targets]
    with pytest.raises(ValueError, match=r"^targets\[0\]\['boxes'\]: got a tensor on the 'meta'"):
        m(outputs, meta_t)
    sparse_t = [dict(t, labels=t["labels"].to_sparse()) for t in targets]
    with pytest.raises(TypeError, match=r"^targets\[0\]\['labels'\]: expected a dense"):
        m(outputs, sparse_t)
    ragged = [{"labels": [0, 1], "boxes": [[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1]]}, targets[1]]
    with pytest.raises(ValueError, match=r"^targets\[0\]\['labels'\]"):
        m(outputs, ragged)


def test_big_endian_and_strided_arrays_match(make_detr_batch):
    m = HungarianMatcher.detr()
    outputs, targets = make_detr_batch(3, 12, 6, 5, sizes=[3, 0, 5])
    expected = m(outputs, targets)
    np_out = {k: v.numpy() for k, v in outputs.items()}
    variants = [
        ({k: v.astype(">f4") for k, v in np_out.items()}, targets),
        ({k: v.astype(">f8") for k, v in np_out.items()}, targets),
        (
            outputs,
            [
                {
                    "labels": t["labels"].numpy().astype(">i8"),
                    "boxes": t["boxes"].numpy().astype(">f4"),
                }
                for t in targets
            ],
        ),
    ]
    for outs, tgts in variants:
        for (q, t), (eq, et) in zip(m(outs, tgts), expected, strict=True):
            assert torch.equal(q, eq) and torch.equal(t, et)
    # the native entry point, given big-endian, unaligned or field-of-record arrays directly
    lg, bx = np_out["pred_logits"], np_out["pred_boxes"]
    labels = np.concatenate([t["labels"].numpy() for t in targets])
    tboxes = np.concatenate([t["boxes"].numpy() for t in targets])
    sizes = np.array([3, 0, 5], np.int64)
    want = ka_rs._native.match_layers([lg], [bx], labels, tboxes, sizes)
    rec = np.zeros(tboxes.shape[0], dtype=[("b", "<f4", (4,)), ("pad", "u1")])
    rec["b"] = tboxes
    odd = np.zeros(bx.nbytes + 1, np.uint8)[1:].view(np.float32).reshape(bx.shape)
    odd[...] = bx
    got = ka_rs._native.match_layers(
        [lg.astype(">f4")], [odd], labels.astype(">i8"), rec["b"], sizes.astype(">i8")
    )
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]

"""ka_rs.ops box operations against plain torch reference formulas."""

from __future__ import annotations

from fractions import Fraction

import ka_rs
import numpy as np
import pytest
import torch
from ka_rs import ops

FORMATS = ("xyxy", "cxcywh", "xywh")

# ---------------------------------------------------------------------------------------------
# torch reference formulas (written out here, independent of ka_rs)
# ---------------------------------------------------------------------------------------------


def ref_convert(b: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    if in_fmt == "xyxy":
        x1, y1, x2, y2 = b.unbind(-1)
    elif in_fmt == "cxcywh":
        cx, cy, w, h = b.unbind(-1)
        x1, y1, x2, y2 = cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h
    else:
        x, y, w, h = b.unbind(-1)
        x1, y1, x2, y2 = x, y, x + w, y + h
    if out_fmt == "xyxy":
        return torch.stack([x1, y1, x2, y2], -1)
    if out_fmt == "cxcywh":
        return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], -1)


def ref_area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def ref_iou_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = ref_area(a)[:, None] + ref_area(b)[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(union))
    return iou, union


def ref_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ref_iou_union(a, b)[0]


def ref_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    iou, union = ref_iou_union(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    penalty = torch.where(
        enclosing > 0, (enclosing - union) / enclosing.clamp(min=1e-300), torch.zeros_like(iou)
    )
    return iou - penalty


def random_xyxy(n: int, rng: np.random.Generator, scale: float = 100.0) -> np.ndarray:
    """xyxy boxes with some zero-width / zero-height / zero-area ones mixed in."""
    xy = rng.uniform(0, scale, size=(n, 2))
    wh = rng.uniform(0, scale / 2, size=(n, 2))
    if n >= 4:
        wh[rng.choice(n, size=max(1, n // 10), replace=False), 0] = 0.0
        wh[rng.choice(n, size=max(1, n // 10), replace=False), 1] = 0.0
        wh[0] = 0.0
    return np.concatenate([xy, xy + wh], axis=1)


def as_kind(x: np.ndarray, kind: str, dtype: str) -> np.ndarray | torch.Tensor:
    arr = x.astype(dtype)
    return torch.from_numpy(arr) if kind == "torch" else arr


def to_f64_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x.double() if isinstance(x, torch.Tensor) else torch.from_numpy(x).double()


KINDS = [("numpy", "float32"), ("numpy", "float64"), ("torch", "float32"), ("torch", "float64")]


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dtype"), KINDS)
@pytest.mark.parametrize("fn_name", ["box_iou", "generalized_box_iou"])
def test_pairwise_matches_reference(kind, dtype, fn_name, rng):
    fn, ref = {
        "box_iou": (ops.box_iou, ref_iou),
        "generalized_box_iou": (ops.generalized_box_iou, ref_giou),
    }[fn_name]
    for n, m in [(1, 1), (7, 13), (64, 33), (200, 150)]:
        a = as_kind(random_xyxy(n, rng), kind, dtype)
        b = as_kind(random_xyxy(m, rng), kind, dtype)
        out = fn(a, b)
        assert type(out) is type(a)
        assert out.shape == (n, m)
        assert str(out.dtype).endswith(dtype)
        expected = ref(to_f64_tensor(a), to_f64_tensor(b))
        got = to_f64_tensor(out)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_iou_and_giou_known_values():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 6.0, 2.0]])
    np.testing.assert_allclose(ops.box_iou(a, b), [[1 / 7, 1.0, 0.0]], atol=1e-12)
    # enclosing areas 9, 4, 12; unions 7, 4, 8
    np.testing.assert_allclose(
        ops.generalized_box_iou(a, b), [[1 / 7 - 2 / 9, 1.0, -4 / 12]], atol=1e-12
    )


def test_zero_area_gives_zero_not_nan():
    point = np.array([[1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    line = np.array([[0.0, 1.0, 3.0, 1.0]], dtype=np.float32)
    box = np.array([[0.0, 0.0, 2.0, 2.0]], dtype=np.float32)
    for a, b in [(point, point), (line, line), (point, box), (line, box), (point, line)]:
        iou = ops.box_iou(a, b)
        giou = ops.generalized_box_iou(a, b)
        assert np.isfinite(iou).all() and np.isfinite(giou).all()
        assert iou[0, 0] == 0.0
    # identical degenerate boxes: no area anywhere -> exactly 0
    assert ops.generalized_box_iou(point, point)[0, 0] == 0.0
    assert ops.generalized_box_iou(line, line)[0, 0] == 0.0
    # a point inside a box: IoU 0 and enclosing box == union -> GIoU 0
    assert ops.generalized_box_iou(point, box)[0, 0] == pytest.approx(0.0, abs=1e-7)


def test_empty_inputs():
    a = np.zeros((0, 4), dtype=np.float32)
    b = random_xyxy(5, np.random.default_rng(1)).astype(np.float32)
    assert ops.box_iou(a, b).shape == (0, 5)
    assert ops.generalized_box_iou(b, a).shape == (5, 0)
    assert ops.box_convert(a, "xyxy", "cxcywh").shape == (0, 4)
    assert ops.box_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 0)


@pytest.mark.parametrize(("kind", "dtype"), KINDS)
@pytest.mark.parametrize("in_fmt", FORMATS)
@pytest.mark.parametrize("out_fmt", FORMATS)
def test_box_convert_matches_reference(kind, dtype, in_fmt, out_fmt, rng):
    boxes = ref_convert(torch.from_numpy(random_xyxy(50, rng)), "xyxy", in_fmt).numpy()
    x = as_kind(boxes, kind, dtype)
    out = ops.box_convert(x, in_fmt, out_fmt)
    assert type(out) is type(x) and out.shape == (50, 4)
    assert str(out.dtype).endswith(dtype)
    torch.testing.assert_close(
        to_f64_tensor(out), ref_convert(to_f64_tensor(x), in_fmt, out_fmt), atol=1e-5, rtol=1e-6
    )


def test_box_convert_round_trip(rng):
    boxes = random_xyxy(100, rng)
    for fmt in FORMATS:
        back = ops.box_convert(ops.box_convert(boxes, "xyxy", fmt), fmt, "xyxy")
        np.testing.assert_allclose(back, boxes, atol=1e-12)


def test_top_level_exports_are_the_ops():
    assert ka_rs.box_iou is ops.box_iou
    assert ka_rs.linear_sum_assignment is ops.linear_sum_assignment
    assert issubclass(ka_rs.InfeasibleAssignmentError, ValueError)


# ---------------------------------------------------------------------------------------------
# torch interop: zero copy, dtype and grad handling
# ---------------------------------------------------------------------------------------------


def test_torch_cpu_input_is_not_copied():
    t = torch.rand(10, 4, dtype=torch.float32)
    arr, restore = ops._as_float_array(t, "boxes", ndim=2, last=4)
    assert np.shares_memory(arr, t.numpy())
    res = np.ones((10, 10), dtype=np.float32)
    out = restore(res)
    assert isinstance(out, torch.Tensor) and np.shares_memory(out.numpy(), res)
    a = np.random.default_rng(0).random((3, 4))
    arr, _ = ops._as_float_array(a, "boxes", ndim=2, last=4)
    assert arr is a


def test_requires_grad_and_noncontiguous_tensors(rng):
    a = torch.from_numpy(random_xyxy(20, rng)).float().requires_grad_(True)
    b_full = torch.from_numpy(random_xyxy(40, rng)).float()
    b = b_full[::2]  # non-contiguous view
    out = ops.box_iou(a, b)
    assert not out.requires_grad
    torch.testing.assert_close(
        out.double(), ref_iou(a.detach().double(), b.double()), atol=1e-6, rtol=0
    )


def test_half_precision_and_mixed_dtypes(rng):
    a64 = random_xyxy(8, rng)
    b64 = random_xyxy(9, rng)
    half = ops.box_iou(torch.from_numpy(a64).half(), torch.from_numpy(b64).half())
    assert half.dtype == torch.float16
    mixed = ops.box_iou(torch.from_numpy(a64).float(), torch.from_numpy(b64))
    assert mixed.dtype == torch.float64
    np.testing.assert_allclose(
        mixed.numpy(),
        ref_iou(torch.from_numpy(a64).float().double(), torch.from_numpy(b64)).numpy(),
        atol=1e-6,
    )
    lst = ops.box_iou(a64.tolist(), b64.tolist())
    assert isinstance(lst, np.ndarray) and lst.dtype == np.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_round_trip(rng):
    a = torch.from_numpy(random_xyxy(30, rng)).float().cuda()
    b = torch.from_numpy(random_xyxy(20, rng)).float().cuda()
    out = ops.generalized_box_iou(a, b)
    assert out.device == a.device
    torch.testing.assert_close(
        out.double().cpu(), ref_giou(a.double().cpu(), b.double().cpu()), atol=1e-6, rtol=0
    )
    keep = ops.batched_nms(
        a, torch.rand(30, device="cuda"), torch.zeros(30, dtype=torch.int64, device="cuda"), 0.5
    )
    assert keep.device == a.device and keep.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [ops.box_iou, ops.generalized_box_iou])
def test_bad_shapes_and_dtypes_name_the_argument(fn):
    good = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    for bad in [
        np.zeros((3, 5), np.float32),
        np.zeros(4, np.float32),
        np.zeros((1, 2, 4), np.float32),
    ]:
        with pytest.raises(ValueError, match="boxes1"):
            fn(bad, good)
        with pytest.raises(ValueError, match="boxes2"):
            fn(good, bad)
    with pytest.raises(ValueError, match="boxes1"):
        fn(np.zeros((1, 4), np.int64), good)
    with pytest.raises(ValueError, match="boxes2"):
        fn(good, torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="boxes1"):
        fn("not boxes", good)


@pytest.mark.parametrize("fn", [ops.box_iou, ops.generalized_box_iou])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inverted_and_nonfinite_boxes_name_the_argument(fn, dtype):
    good = np.array([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 2.0, 3.0]], dtype=dtype)
    inverted_x = np.array([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]], dtype=dtype)
    inverted_y = np.array([[0.0, 3.0, 1.0, 1.0]], dtype=dtype)
    for bad in (inverted_x, inverted_y):
        with pytest.raises(ValueError, match="boxes1"):
            fn(bad, good)
        with pytest.raises(ValueError, match="boxes2"):
            fn(good, bad)
    for value in (np.nan, np.inf, -np.inf):
        bad = good.copy()
        bad[1, 2] = value
        with pytest.raises(ValueError, match="boxes1"):
            fn(bad, good)
        with pytest.raises(ValueError, match="boxes2"):
            fn(torch.from_numpy(good), torch.from_numpy(bad))


def test_box_convert_bad_input():
    good = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="in_fmt"):
        ops.box_convert(good, "xyzw", "xyxy")
    with pytest.raises(ValueError, match="out_fmt"):
        ops.box_convert(good, "xyxy", "XYXY")
    with pytest.raises(ValueError, match="boxes"):
        ops.box_convert(np.zeros((2, 3), np.float32), "xyxy", "cxcywh")
    with pytest.raises(ValueError, match="boxes"):
        ops.box_convert(np.array([[0, 0, np.nan, 1]], np.float32), "xyxy", "cxcywh")


# ---------------------------------------------------------------------------------------------
# batched NMS
# ---------------------------------------------------------------------------------------------


def ref_batched_nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: float
) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    iou = ref_iou(torch.from_numpy(boxes).double(), torch.from_numpy(boxes).double()).numpy()
    keep: list[int] = []
    for i in order:
        if all(labels[j] != labels[i] or iou[i, j] <= thr for j in keep):
            keep.append(int(i))
    return keep


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_batched_nms_matches_reference(rng, thr):
    for n in (0, 1, 5, 60, 300):
        xy = rng.uniform(0, 50, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 30, size=(n, 2))], 1).astype(np.float32)
        scores = rng.permutation(n).astype(np.float32) / max(n, 1)  # distinct scores
        labels = rng.integers(0, 3, size=n)
        keep = ops.batched_nms(boxes, scores, labels, thr)
        assert isinstance(keep, np.ndarray) and keep.dtype == np.int64
        assert keep.tolist() == ref_batched_nms(boxes, scores, labels, thr)
        keep_t = ops.batched_nms(
            torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), thr
        )
        assert isinstance(keep_t, torch.Tensor) and keep_t.tolist() == keep.tolist()


def test_batched_nms_is_class_aware():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert ops.batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert ops.batched_nms(boxes, scores, np.array([0, 0, 0]), 0.5).tolist() == [0]


def test_batched_nms_bad_input():
    boxes = np.zeros((3, 4), np.float32)
    boxes[:, 2:] = 1
    scores = np.ones(3, np.float32)
    labels = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="scores"):
        ops.batched_nms(boxes, scores[:2], labels, 0.5)
    with pytest.raises(ValueError, match="labels"):
        ops.batched_nms(boxes, scores, labels[:2], 0.5)
    with pytest.raises(ValueError, match="labels"):
        ops.batched_nms(boxes, scores, labels.astype(np.float32), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        ops.batched_nms(boxes, scores, labels, 1.5)
    with pytest.raises(ValueError, match="boxes"):
        ops.batched_nms(boxes[:, :3], scores, labels, 0.5)
    bad = scores.copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="scores"):
        ops.batched_nms(boxes, bad, labels, 0.5)


# ---------------------------------------------------------------------------------------------
# huge coordinates: areas beyond the dtype's range are never NaN, never silently 0
# ---------------------------------------------------------------------------------------------


def exact_iou_giou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and GIoU in exact rational arithmetic (``fractions.Fraction``): no overflow, no
    rounding, whatever the magnitudes."""
    iou = np.zeros((len(a), len(b)))
    giou = np.zeros((len(a), len(b)))
    for i, p in enumerate(a.tolist()):
        for j, q in enumerate(b.tolist()):
            p_, q_ = [Fraction(v) for v in p], [Fraction(v) for v in q]
            iw = max(min(p_[2], q_[2]) - max(p_[0], q_[0]), 0)
            ih = max(min(p_[3], q_[3]) - max(p_[1], q_[1]), 0)
            inter = iw * ih
            union = (p_[2] - p_[0]) * (p_[3] - p_[1]) + (q_[2] - q_[0]) * (q_[3] - q_[1]) - inter
            r = inter / union if union > 0 else Fraction(0)
            c = (max(p_[2], q_[2]) - min(p_[0], q_[0])) * (max(p_[3], q_[3]) - min(p_[1], q_[1]))
            iou[i, j] = float(r)
            giou[i, j] = float(r - (c - union) / c if c > 0 else r)
    return iou, giou


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [("float32", 3e19), ("float32", 1e30), ("float32", 3e38 / 4), ("float64", 1e160)]
    + [("float64", 1e300), ("float64", 4e307)],
)
def test_huge_coordinates_match_a_wide_reference(dtype, scale, rng):
    unit = random_xyxy(20, rng, scale=1.0)
    a = (unit * scale).astype(dtype)
    b = (np.concatenate([unit[:8], random_xyxy(12, rng, scale=1.0)]) * scale).astype(dtype)
    want_iou, want_giou = exact_iou_giou(a, b)
    for fn, want in ((ops.box_iou, want_iou), (ops.generalized_box_iou, want_giou)):
        got = fn(a, b).astype(np.float64)
        assert np.isfinite(got).all(), (fn.__name__, dtype, scale)
        np.testing.assert_allclose(got, want, atol=1e-5 if dtype == "float32" else 1e-12)
        # the same boxes, scaled down exactly by a power of two, give the same matrix
        small = fn(a / dtype_pow2(dtype, scale), b / dtype_pow2(dtype, scale))
        np.testing.assert_allclose(got, small.astype(np.float64), atol=1e-5)
    # identical boxes overlap fully (they gave IoU 0 and GIoU NaN in float32 near 3e19)
    whole = np.array([[0, 0, scale, scale]], dtype)
    assert ops.box_iou(whole, whole)[0, 0] == 1.0
    assert ops.generalized_box_iou(whole, whole)[0, 0] == 1.0


def dtype_pow2(dtype: str, scale: float) -> float:
    """A power of two near ``scale`` (dividing by it is exact)."""
    return float(2.0 ** np.floor(np.log2(scale)))


def test_float32_near_3e19_regression():
    a = np.array([[0, 0, 3e19, 3e19]], np.float32)
    b = np.array([[1e19, 1e19, 4e19, 4e19]], np.float32)
    iou = ops.box_iou(a, b)[0, 0]
    giou = ops.generalized_box_iou(a, b)[0, 0]
    # inter 2x2, union 9+9-4 = 14, enclosing 16 (in units of 1e19)
    assert iou == pytest.approx(4 / 14, rel=1e-6)
    assert giou == pytest.approx(4 / 14 - 2 / 16, rel=1e-6)
    t = ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b))
    assert not torch.isnan(t).any() and t.item() == pytest.approx(4 / 14 - 2 / 16, rel=1e-6)
    whole = np.array([[-3e38, -3e38, 3e38, 3e38]], np.float32)  # width overflows float32
    assert ops.generalized_box_iou(whole, whole)[0, 0] == 1.0
    assert ops.box_iou(whole, a)[0, 0] > 0


def test_nms_with_huge_coordinates_and_out_of_range_float64():
    boxes = np.array([[0, 0, 3e19, 3e19], [0, 0, 3e19, 2.9e19], [5e19, 0, 6e19, 1e19]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert ops.batched_nms(boxes, scores, np.zeros(3, np.int64), 0.5).tolist() == [0, 2]
    # batched_nms computes in float32: a finite float64 beyond its range is named, not inf
    big = boxes.astype(np.float64)
    big[1, 2] = 1e200
    with pytest.raises(ValueError, match=r"^boxes: box 1 has value 1e\+200, beyond float32"):
        ops.batched_nms(big, scores.astype(np.float64), np.zeros(3, np.int64), 0.5)
    with pytest.raises(ValueError, match=r"^scores: score 2 has value"):
        ops.batched_nms(boxes, np.array([0.1, 0.2, -1e300]), np.zeros(3, np.int64), 0.5)


def test_box_convert_overflow_is_named_not_inf():
    b = np.array([[0, 0, 1, 1], [-3e38, 0, 3e38, 1]], np.float32)
    with pytest.raises(ValueError, match=r"^boxes: box 1 cannot be converted from xyxy to"):
        ops.box_convert(b, "xyxy", "cxcywh")
    # a midpoint whose sum overflows float32 is still computed exactly
    c = ops.box_convert(np.array([[3e38, 0, 3.2e38, 1]], np.float32), "xyxy", "cxcywh")
    assert np.isfinite(c).all() and c[0, 0] == np.float32(3.1e38)
    with pytest.raises(ValueError, match="^boxes: box 0 cannot be converted"):
        ops.box_convert(np.array([[1.5e308, 0, 1e308, 1]]), "cxcywh", "xyxy")


# ---------------------------------------------------------------------------------------------
# argument kinds: every error names the argument
# ---------------------------------------------------------------------------------------------

GOOD = np.array([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 2.0, 2.0]], np.float32)


def _pairwise_and_convert(arg):
    return [
        ("boxes1", lambda: ops.box_iou(arg, GOOD)),
        ("boxes2", lambda: ops.generalized_box_iou(GOOD, arg)),
        ("boxes", lambda: ops.box_convert(arg, "xyxy", "cxcywh")),
        ("boxes", lambda: ops.batched_nms(arg, np.ones(2, np.float32), np.zeros(2), 0.5)),
    ]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: torch.zeros(2, 4, device="meta"), ValueError),
        (lambda: torch.from_numpy(GOOD).to_sparse(), TypeError),
        (lambda: torch.from_numpy(GOOD).to_sparse_csr(), TypeError),
        (lambda: [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], ValueError),  # ragged
    ],
    ids=["meta", "sparse_coo", "sparse_csr", "ragged"],
)
def test_unreadable_inputs_name_the_argument(make, error):
    for name, call in _pairwise_and_convert(make()):
        with pytest.raises(error, match=rf"^{name}: "):
            call()
    cost = make()
    with pytest.raises(error, match="^cost: "):
        ops.linear_sum_assignment(cost)
    with pytest.raises(error, match="^labels: "):
        ops.batched_nms(GOOD, np.ones(2, np.float32), make(), 0.5)


@pytest.mark.parametrize("dtype", [">f4", ">f8", "<f4", "float16", "longdouble"])
def test_byte_order_and_odd_float_dtypes_are_converted_not_misread(dtype):
    x = GOOD.astype(dtype)
    want_iou = ops.box_iou(GOOD.astype(np.float64), GOOD.astype(np.float64))
    got = ops.box_iou(x, x)
    assert got.dtype == x.dtype.newbyteorder("=")  # same dtype, native byte order
    np.testing.assert_allclose(got.astype(np.float64), want_iou, rtol=1e-3)
    conv = ops.box_convert(x, "xyxy", "cxcywh")
    np.testing.assert_allclose(conv.astype(np.float64), [[0.5, 0.5, 1, 1], [1.25, 1.25, 1.5, 1.5]])
    keep = ops.batched_nms(x, np.array([0.9, 0.8], dtype), np.array([0, 0], ">i8"), 0.1)
    assert keep.tolist() == [0, 1]


@pytest.mark.parametrize("fn", ["box_iou", "generalized_box_iou"])
def test_native_reads_big_endian_unaligned_and_field_views_exactly(fn):
    native, public = getattr(ka_rs._native, fn), getattr(ops, fn)
    want = public(GOOD, GOOD)
    rec = np.zeros(2, dtype=[("b", "<f4", (4,)), ("pad", "u1")])  # 17-byte row stride
    rec["b"] = GOOD
    buf = np.zeros(GOOD.nbytes + 1, np.uint8)[1:].view(np.float32).reshape(2, 4)  # unaligned
    buf[...] = GOOD
    assert not buf.flags.aligned and rec["b"].strides[0] == 17
    for variant in (GOOD.astype(">f4"), rec["b"], buf, np.asfortranarray(GOOD), GOOD[::-1][::-1]):
        np.testing.assert_array_equal(native(variant, variant), want)
    want64 = public(GOOD.astype(np.float64), GOOD.astype(np.float64))
    np.testing.assert_array_equal(native(GOOD.astype(">f8"), GOOD.astype(">f8")), want64)


def test_scalar_arguments_have_the_right_type():
    scores, labels = np.ones(2, np.float32), np.zeros(2, np.int64)
    for bad in (True, "0.5", None, [0.5]):
        with pytest.raises(TypeError, match="^iou_threshold: "):
            ops.batched_nms(GOOD, scores, labels, bad)
        with pytest.raises(TypeError, match="^iou_threshold: "):
            ka_rs._native.batched_nms(GOOD, scores, labels, bad)
    assert ops.batched_nms(GOOD, scores, labels, np.float32(0.5)).tolist() == [0, 1]
    with pytest.raises(TypeError, match="^in_fmt: "):
        ka_rs._native.box_convert(GOOD, 1, "xyxy")
    with pytest.raises(TypeError, match="^out_fmt: "):
        ka_rs._native.box_convert(GOOD, "xyxy", None)
    big = np.array([2**64 - 1, 0], np.uint64)
    with pytest.raises(ValueError, match="^labels: value 18446744073709551615 does not fit"):
        ops.batched_nms(GOOD, scores, big, 0.5)

"""Property-based fuzz test of the whole native API: a correct result or a named error.

Every native entry point (``ka_rs._native``: ``box_iou``, ``generalized_box_iou``,
``box_convert``, ``batched_nms``, ``linear_sum_assignment``, ``match_layers``,
``build_pseudo_targets``) and the public wrappers over them (``ka_rs.ops``,
``ka_rs.HungarianMatcher``) get hypothesis-drawn inputs: sizes (empty included), dtypes (float32,
float64, float16, integers, bool, complex, big-endian), memory layouts (C, Fortran, strided,
negative strides, zero-stride broadcast, unaligned, a field of a structured array), values
(grids, tiny and huge magnitudes, NaN, ±inf, inverted boxes, out-of-range labels) and scalar
arguments of the wrong type. Each call must either return what a small pure-numpy / scipy /
``fractions`` reference says, or raise ``ValueError`` / ``TypeError`` / ``MemoryError`` whose
message starts with the argument's name — exactly when the reference says the input is
invalid. Anything else (a panic, another exception, a hang, a crash) fails the test.

The budget is fixed (``max_examples`` per test, ``derandomize=True``): the file runs in well
under 30 s and the same examples every time. The number of hostile cases each test tried is
printed at the end of the module (``pytest -s``) and written to ``$KA_RS_FUZZ_REPORT`` (JSON)
when that is set.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import ka_rs
import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import HealthCheck, settings
from hypothesis import given as hgiven
from hypothesis import strategies as st
from ka_rs import _native, ops

# numpy's own warnings while the hostile inputs are made (overflow to inf on purpose)
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Casting complex values to real"),
]

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: area -> what its examples were (valid / hostile kinds / layouts / outcomes)
COUNTS: defaultdict[str, Counter[str]] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    report = {area: dict(sorted(c.items())) for area, c in sorted(COUNTS.items())}
    print("\nnative fuzz: cases per area")
    for area, c in report.items():
        print(f"  {area}: {c}")
    path = os.environ.get("KA_RS_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


ALLOWED = (ValueError, TypeError, MemoryError)


def run(area: str, call: Callable[[], Any], names: tuple[str, ...], invalid: str | None) -> Any:
    """Call ``call``: with ``invalid`` None it must succeed (its result is returned), else it
    must raise a named ``ValueError`` / ``TypeError`` / ``MemoryError`` (None is returned).
    ``invalid`` says why the input is bad; it is counted as a hostile case of ``area``."""
    COUNTS[area]["examples"] += 1
    if invalid is not None:
        COUNTS[area]["hostile"] += 1
        COUNTS[area][f"hostile: {invalid}"] += 1
    try:
        result = call()
    except ALLOWED as err:
        msg = str(err)
        assert invalid is not None, f"valid input rejected: {type(err).__name__}: {msg}"
        if not isinstance(err, MemoryError):
            assert msg.startswith(names), f"{type(err).__name__} not named {names}: {msg}"
        COUNTS[area]["raised a named error"] += 1
        return None
    assert invalid is None, f"invalid input ({invalid}) accepted"
    COUNTS[area]["checked against the reference"] += 1
    return result


# ---------------------------------------------------------------------------------------------
# arrays in every layout
# ---------------------------------------------------------------------------------------------

LAYOUTS = ("c", "fortran", "strided", "reversed", "broadcast", "bigendian", "unaligned", "field")


def relayout(a: np.ndarray, layout: str) -> np.ndarray:
    """``a`` in another memory layout. "broadcast" repeats ``a``'s first row (zero stride):
    the values change, so references read the returned array."""
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "strided" and a.ndim:
        big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "reversed" and a.ndim:
        return np.ascontiguousarray(a[::-1])[::-1]
    if layout == "broadcast" and a.ndim and a.shape[0]:
        return np.broadcast_to(a[:1], a.shape)
    if layout == "bigendian" and a.dtype.kind in "fiuc":
        return a.astype(a.dtype.newbyteorder(">"))
    if layout == "unaligned" and a.dtype.itemsize > 1:
        buf = np.zeros(a.nbytes + 1, np.uint8)[1:]
        out = buf.view(a.dtype).reshape(a.shape)
        out[...] = a
        return out
    if layout == "field":
        rec = np.zeros(a.shape, dtype=[("v", a.dtype), ("pad", "u1")])
        rec["v"] = a
        return rec["v"]
    return np.ascontiguousarray(a)


def native_dtype(a: np.ndarray) -> np.dtype:
    """The dtype without byte order: what the native API accepts (it converts the order)."""
    return a.dtype.newbyteorder("=") if a.dtype.byteorder in "<>" else a.dtype


def count_layout(area: str, layout: str) -> None:
    COUNTS[area][f"layout: {layout}"] += 1


# ---------------------------------------------------------------------------------------------
# boxes: box_iou, generalized_box_iou, box_convert
# ---------------------------------------------------------------------------------------------

#: grid scales: ordinary, overflowing float32 areas (3e19), near float32's / float64's maximum,
#: tiny (areas underflow), subnormal
SCALES = (1.0, 1.0, 1 / 16, 1 / 16, 3e19, 1e38, 1e-30, 1e300, 5e307, 1e-310)
FLOATS = ("float32", "float64")
ODD_DTYPES = ("float16", "int64", "bool", "complex64")
BOX_DTYPES = FLOATS + ODD_DTYPES


@st.composite
def box_sets(
    draw: Any, dtype: str | None = None, scales: tuple[float, ...] = SCALES
) -> tuple[np.ndarray, str, list[str]]:
    """(N, 4) xyxy boxes on a scaled integer grid; one in three sets is made hostile on
    purpose (odd dtype, wrong shape, NaN / inf, an inverted box), and huge scales overflow
    some by themselves."""
    n = draw(st.integers(0, 5))
    hostile = draw(st.sampled_from(("", "", "", "", "", "", "dtype", "shape", "value", "inv")))
    cols = draw(st.sampled_from((3, 5, 8))) if hostile == "shape" else 4
    if dtype is None:
        dtype = draw(st.sampled_from(ODD_DTYPES if hostile == "dtype" else FLOATS))
    scale = draw(st.sampled_from(scales))
    grid = np.array(draw(st.lists(st.integers(-8, 8), min_size=2 * n, max_size=2 * n)))
    size = np.array(draw(st.lists(st.integers(0, 8), min_size=2 * n, max_size=2 * n)))
    xy = grid.reshape(n, 2).astype(np.float64) * scale
    wh = size.reshape(n, 2).astype(np.float64) * scale
    with np.errstate(all="ignore"):
        boxes = np.concatenate([xy, xy + wh], axis=1)
    notes = []
    if n and hostile == "value":
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, 3))
        boxes[i, j] = draw(st.sampled_from((np.nan, np.inf, -np.inf)))
        notes.append("non-finite")
    if n and hostile == "inv":
        i = draw(st.integers(0, n - 1))
        with np.errstate(all="ignore"):
            boxes[i, [0, 2]] = boxes[i, [2, 0]] - scale  # x2 < x1
        notes.append("inverted")
    if cols != 4:
        boxes = np.resize(boxes, (n, cols))
        notes.append("wrong shape")
    with np.errstate(all="ignore"):
        arr = boxes.astype(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    return relayout(arr, layout), layout, notes


def exact_pair(p: list[float], q: list[float]) -> tuple[float, float]:
    """IoU and GIoU of two xyxy boxes in exact rational arithmetic."""
    p_, q_ = [Fraction(v) for v in p], [Fraction(v) for v in q]
    iw = max(min(p_[2], q_[2]) - max(p_[0], q_[0]), 0)
    ih = max(min(p_[3], q_[3]) - max(p_[1], q_[1]), 0)
    inter = iw * ih
    union = (p_[2] - p_[0]) * (p_[3] - p_[1]) + (q_[2] - q_[0]) * (q_[3] - q_[1]) - inter
    iou = inter / union if union > 0 else Fraction(0)
    c = (max(p_[2], q_[2]) - min(p_[0], q_[0])) * (max(p_[3], q_[3]) - min(p_[1], q_[1]))
    return float(iou), float(iou - (c - union) / c if c > 0 else iou)


def box_problem(a: np.ndarray) -> str | None:
    """Why ``a`` is not valid (N, 4) xyxy boxes for the native API, or None."""
    if native_dtype(a) not in (np.float32, np.float64):
        return "dtype"
    if a.ndim != 2 or a.shape[1] != 4:
        return "shape"
    if not np.isfinite(a).all():
        return "non-finite"
    if (a[:, 2] < a[:, 0]).any() or (a[:, 3] < a[:, 1]).any():
        return "inverted"
    return None


@settings(FUZZ, max_examples=400)
@hgiven(data=st.data())
def test_pairwise_iou_native(data):
    a, la, _ = data.draw(box_sets())
    same = data.draw(st.booleans())
    b, lb, _ = data.draw(box_sets(dtype=str(native_dtype(a)) if same else None))
    generalized = data.draw(st.booleans())
    fn = _native.generalized_box_iou if generalized else _native.box_iou
    area = "boxes: box_iou / generalized_box_iou"
    count_layout(area, la)
    invalid = box_problem(a) or box_problem(b)
    if invalid is None and native_dtype(a) != native_dtype(b):
        invalid = "mixed dtypes"
    out = run(area, lambda: fn(a, b), ("boxes1", "boxes2"), invalid)
    if out is None:
        return
    assert out.shape == (a.shape[0], b.shape[0]) and out.dtype == native_dtype(a)
    assert np.isfinite(out).all()
    tol = 2e-6 if out.dtype == np.float32 else 1e-12
    for i, p in enumerate(np.asarray(a, np.float64).tolist()):
        for j, q in enumerate(np.asarray(b, np.float64).tolist()):
            want = exact_pair(p, q)[1 if generalized else 0]
            assert abs(float(out[i, j]) - want) <= tol, (p, q, out[i, j], want, la, lb)


def exact_convert(b: list[float], fmt_in: str, fmt_out: str) -> list[Fraction]:
    v = [Fraction(x) for x in b]
    if fmt_in == "xyxy":
        x1, y1, x2, y2 = v
    elif fmt_in == "cxcywh":
        x1, y1, x2, y2 = v[0] - v[2] / 2, v[1] - v[3] / 2, v[0] + v[2] / 2, v[1] + v[3] / 2
    else:
        x1, y1, x2, y2 = v[0], v[1], v[0] + v[2], v[1] + v[3]
    if fmt_out == "xyxy":
        return [x1, y1, x2, y2]
    if fmt_out == "cxcywh":
        return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    return [x1, y1, x2 - x1, y2 - y1]


@settings(FUZZ, max_examples=300)
@hgiven(data=st.data())
def test_box_convert_native(data):
    a, layout, _ = data.draw(box_sets())
    fmt = st.sampled_from(("xyxy", "cxcywh", "xywh") * 4 + ("XYXY", 3, None))
    fin, fout = data.draw(fmt), data.draw(fmt)
    area = "boxes: box_convert"
    count_layout(area, layout)
    invalid = None
    if not isinstance(fin, str) or not isinstance(fout, str):
        invalid = "format type"
    elif fin not in ops.BOX_FORMATS or fout not in ops.BOX_FORMATS:
        invalid = "unknown format"
    else:
        problem = box_problem(a)
        invalid = None if problem == "inverted" else problem  # any 4 numbers convert
    fmax = float(np.finfo(native_dtype(a)).max) if native_dtype(a).kind == "f" else math.inf
    exact: list[list[Fraction]] = []
    if invalid is None:
        exact = [exact_convert(r, fin, fout) for r in np.asarray(a, np.float64).tolist()]
        peak = max((abs(v) for r in exact for v in r), default=Fraction(0))
        if peak > fmax * (1 + 1e-6):
            invalid = "overflowing conversion"
        elif peak > fmax * (1 - 1e-6):
            return  # rounds to the maximum or overflows: either is right
    out = run(
        area, lambda: _native.box_convert(a, fin, fout), ("boxes", "in_fmt", "out_fmt"), invalid
    )
    if out is None:
        return
    assert out.shape == a.shape and out.dtype == native_dtype(a)
    # a few roundings of intermediates as large as the row's coordinates (x2 - x1 after
    # cx ± w/2): the error is relative to those, not to the (possibly much smaller) result
    eps = float(np.finfo(out.dtype).eps)
    rows = np.abs(np.asarray(a, np.float64)).max(axis=1, initial=0).tolist()
    for got, want, size in zip(out.tolist(), exact, rows, strict=True):
        for g, w in zip(got, want, strict=True):
            tol = 4 * eps * max(size, abs(float(w))) + 1e-45
            assert abs(g - float(w)) <= tol, (got, want)


@settings(FUZZ, max_examples=200)
@hgiven(data=st.data())
def test_box_ops_public_wrappers(data):
    """ops.* accept anything array-like (torch, lists, odd numpy dtypes) or name the problem."""
    a, layout, _ = data.draw(box_sets(dtype=data.draw(st.sampled_from(BOX_DTYPES[:3]))))
    kind = data.draw(st.sampled_from(("numpy", "torch", "list", "meta", "sparse")))
    area = "boxes: public wrappers"
    count_layout(area, layout)
    arr = np.array(a)  # the values the wrapper sees
    arg: Any = a
    # any float dtype is fine for the wrappers (float16 is computed in float32)
    invalid = box_problem(arr.astype(np.float64) if arr.dtype.kind == "f" else arr)
    if kind == "torch":
        arg = torch.from_numpy(arr.astype(native_dtype(arr)))
    elif kind == "list":
        arg = arr.tolist()
        if arr.size == 0 and invalid == "shape":
            invalid = None  # [] is "no boxes"
    elif kind in ("meta", "sparse"):
        t = torch.from_numpy(arr.astype(np.float32))
        arg = t.to("meta") if kind == "meta" else t.to_sparse()
        invalid = kind
    out = run(area, lambda: ops.box_iou(arg, np.zeros((1, 4), np.float32)), ("boxes1",), invalid)
    if out is not None:
        got = np.asarray(out, np.float64)
        assert got.shape == (arr.shape[0], 1) and np.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# batched_nms
# ---------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=500)
@hgiven(data=st.data())
def test_batched_nms(data):
    boxes, layout, _ = data.draw(box_sets(scales=(1.0, 1 / 16, 3e19, 1e-30)))
    n = boxes.shape[0]
    m = n if data.draw(st.integers(0, 9)) else n + 1
    same = str(native_dtype(boxes))
    sdtype = data.draw(st.sampled_from((same, same, same, "float32", "float64", "int64")))
    scores = np.array(data.draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)), sdtype) / 4
    scores = scores.astype(sdtype)
    if m and data.draw(st.integers(0, 9)) == 0:
        scores = scores.astype(np.float64)
        scores[0] = np.nan
    labels = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n)))
    labels = relayout(
        labels.astype(data.draw(st.sampled_from(("int64",) * 7 + ("int32",)))), layout
    )
    thr = data.draw(st.sampled_from((0.0, 0.25, 0.5, 1.0) * 3 + (np.float32(0.5), 1.5, True, "0")))
    public = data.draw(st.booleans())
    area = "nms: batched_nms (public)" if public else "nms: batched_nms (native)"
    count_layout(area, layout)
    problem = box_problem(boxes)
    if public and problem == "dtype" and boxes.dtype.kind in "fiu":
        problem = None if boxes.dtype.kind == "f" else problem
    if problem is None and public and np.abs(np.asarray(boxes, np.float64)).max(initial=0) > 3.4e38:
        problem = "beyond float32"
    invalid = problem
    if invalid is None and (len(scores) != n or not np.isfinite(scores).all()):
        invalid = "scores"
    if invalid is None and not public and native_dtype(scores) != native_dtype(boxes):
        invalid = "scores dtype"
    if invalid is None and public and scores.dtype.kind != "f":
        invalid = "scores dtype"
    if invalid is None and not public and native_dtype(labels) != np.int64:
        invalid = "labels dtype"
    if invalid is None and (isinstance(thr, (bool, str)) or (public and not 0 <= thr <= 1)):
        invalid = "iou_threshold"
    if public:
        fn = lambda: ops.batched_nms(boxes, scores, labels, thr)  # noqa: E731
    else:
        fn = lambda: _native.batched_nms(boxes, scores, labels, thr)  # noqa: E731
    keep = run(area, fn, ("boxes", "scores", "labels", "iou_threshold"), invalid)
    if keep is None:
        return
    # a greedy NMS result is the unique one with these properties (up to IoU ties at thr)
    b = np.asarray(boxes, np.float64)
    if public or native_dtype(boxes) == np.float32:
        b = b.astype(np.float32).astype(np.float64)
    s = np.asarray(scores, np.float64)
    if public or native_dtype(scores) == np.float32:
        s = s.astype(np.float32).astype(np.float64)
    keep = [int(k) for k in keep]
    assert keep == sorted(keep, key=lambda i: (-s[i], i)), "kept boxes in score order"
    kept = set(keep)
    thr = float(thr)
    tol = 1e-6
    for i in range(n):
        rivals = [
            k for k in keep if labels[k] == labels[i] and (-s[k], k) < (-s[i], i)
        ]  # kept earlier in the same class
        ious = [exact_pair(b[k].tolist(), b[i].tolist())[0] for k in rivals]
        if i in kept:
            assert all(v <= thr + tol for v in ious), (i, ious, thr)
        else:
            assert any(v > thr - tol for v in ious), (i, ious, thr)


# ---------------------------------------------------------------------------------------------
# linear_sum_assignment
# ---------------------------------------------------------------------------------------------

COST_DTYPES = ("float64", "float64", "float32", "int64", "bool", "complex128", "<U3", "float16")


@settings(FUZZ, max_examples=400)
@hgiven(data=st.data())
def test_linear_sum_assignment(data):
    n, m = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 6))
    scale = data.draw(st.sampled_from((1.0, 1.0, 0.5, 1e6, 1e300)))
    special = st.sampled_from((np.inf, np.inf, -np.inf, np.nan))
    values = (
        st.one_of(st.integers(-3, 3).map(float), special)
        if data.draw(st.booleans())
        else (st.integers(-3, 3).map(float))
    )
    cost = np.array(data.draw(st.lists(values, min_size=n * m, max_size=n * m)), np.float64)
    cost = cost.reshape(n, m) * scale
    dtype = data.draw(st.sampled_from(COST_DTYPES))
    with np.errstate(all="ignore"):
        arr = cost.astype(dtype) if dtype != "<U3" else cost.astype(str)
    layout = data.draw(st.sampled_from(LAYOUTS))
    arr = relayout(arr, layout)
    maximize = data.draw(st.sampled_from((False, True) * 4 + (np.bool_(True), "no", 0, None)))
    public = data.draw(st.booleans())
    area = "lsap: linear_sum_assignment (public)" if public else "lsap: (native)"
    count_layout(area, layout)
    invalid = None
    if not isinstance(maximize, (bool, np.bool_)):
        invalid = "maximize type"
    elif native_dtype(arr).kind not in ("biuf" if public else "f") or (
        not public and native_dtype(arr).itemsize == 2
    ):
        invalid = "dtype"
    seen = np.asarray(arr).astype(np.float64) if invalid is None else None
    want = None
    if seen is not None:
        try:
            want = scipy.optimize.linear_sum_assignment(seen, maximize=bool(maximize))
        except ValueError as err:
            invalid = "infeasible" if "infeasible" in str(err) else "invalid entries"
    fn = ka_rs.linear_sum_assignment if public else _native.linear_sum_assignment
    out = run(area, lambda: fn(arr, maximize), ("cost", "maximize"), invalid)
    if out is None:
        return
    rows, cols = (np.asarray(x) for x in out)
    assert rows.dtype == cols.dtype == np.int64 and len(rows) == min(n, m)
    assert (np.diff(rows) > 0).all() and len(set(cols.tolist())) == len(cols)
    ours = math.fsum(seen[rows, cols].tolist())
    theirs = math.fsum(seen[want[0], want[1]].tolist())
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-9), (seen, maximize)


# ---------------------------------------------------------------------------------------------
# the matcher: match_layers and HungarianMatcher
# ---------------------------------------------------------------------------------------------


def ref_cost(logits, boxes, labels, tboxes, focal, w, alpha, gamma) -> np.ndarray:
    """DETR's Q x T cost in float64 (softmax or focal class cost, L1, -GIoU)."""
    lg = logits.astype(np.float64)
    if focal:
        p = 1 / (1 + np.exp(-lg))
        neg = (1 - alpha) * p**gamma * -np.log(1 - p + 1e-8)
        pos = alpha * (1 - p) ** gamma * -np.log(p + 1e-8)
        cls = (pos - neg)[:, labels]
    else:
        e = np.exp(lg - lg.max(axis=1, keepdims=True))
        cls = -(e / e.sum(axis=1, keepdims=True))[:, labels]
    bx, tb = boxes.astype(np.float64), tboxes.astype(np.float64)
    l1 = np.abs(bx[:, None, :] - tb[None, :, :]).sum(-1)
    xy = lambda b: np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)  # noqa: E731
    pa, ta = xy(bx), xy(tb)
    giou = np.array([[exact_pair(p.tolist(), t.tolist())[1] for t in ta] for p in pa])
    giou = giou.reshape(len(pa), len(ta))
    return w[0] * cls + w[1] * l1 - w[2] * giou


@st.composite
def matcher_inputs(draw: Any) -> dict[str, Any]:
    nl, nb = draw(st.integers(1, 2)), draw(st.integers(0, 3))
    q, k = draw(st.integers(0, 5)), draw(st.integers(1, 5))
    focal = draw(st.booleans())
    sizes = draw(st.lists(st.integers(0, 4), min_size=nb, max_size=nb))
    t = sum(sizes)
    grid = lambda count, lo, hi: np.array(  # noqa: E731
        draw(st.lists(st.integers(lo, hi), min_size=count, max_size=count)), np.float32
    )
    logits = grid(nl * nb * q * k, -8, 8).reshape(nl, nb, q, k) / 2
    cxcy = grid(nl * nb * q * 2, 0, 16).reshape(nl, nb, q, 2) / 16
    wh = grid(nl * nb * q * 2, 0, 8).reshape(nl, nb, q, 2) / 8
    boxes = np.concatenate([cxcy, wh], -1)
    ncls = k if focal else k - 1
    labels = np.array(draw(st.lists(st.integers(0, max(ncls - 1, 0)), min_size=t, max_size=t)))
    tboxes = np.concatenate(
        [grid(t * 2, 0, 16).reshape(t, 2) / 16, grid(t * 2, 0, 8).reshape(t, 2) / 8], 1
    )
    notes = []
    hostile = draw(st.integers(0, 9))
    if hostile == 0 and logits.size:
        logits.flat[draw(st.integers(0, logits.size - 1))] = draw(st.sampled_from((np.nan, np.inf)))
        notes.append("non-finite logits")
    elif hostile == 1 and boxes.size:
        boxes.flat[draw(st.integers(0, boxes.size - 1))] = draw(st.sampled_from((np.nan, -0.25)))
        notes.append("bad pred box")
    elif hostile == 2 and t:
        labels[draw(st.integers(0, t - 1))] = draw(st.sampled_from((-1, ncls, 99)))
        notes.append("label out of range")
    elif hostile == 3 and t:
        tboxes[draw(st.integers(0, t - 1)), 3] = draw(st.sampled_from((np.nan, -0.5)))
        notes.append("bad target box")
    weights = {}
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(("cost_class", "cost_bbox", "cost_giou", "focal_alpha")))
        weights[name] = draw(st.sampled_from((True, "1", np.nan, 1e39, np.float32(0.5), 3)))
    return {
        "logits": logits, "boxes": boxes, "labels": labels.astype(np.int64), "tboxes": tboxes,
        "sizes": np.array(sizes, np.int64), "focal": focal, "notes": notes, "weights": weights,
        "k": k,
    }  # fmt: skip


def weight_problem(weights: dict[str, Any], public: bool) -> str | None:
    """Why these weight overrides must be refused, or None."""
    for name, v in weights.items():
        if isinstance(v, (bool, np.bool_, str)):
            return "weight type"
        if not math.isfinite(v) or abs(v) > 3.4e38:
            return "weight value"
        if public and name == "focal_alpha" and not 0 <= v <= 1:
            return "focal_alpha range"
    return None


def matcher_problem(inp: dict[str, Any], public: bool) -> str | None:
    """Why a matcher call on these (as-read) arrays must fail, or None."""
    problem = weight_problem(inp["weights"], public)
    if problem:
        return problem
    lg, bx, tb = inp["logits"], inp["boxes"], inp["tboxes"]
    if not np.isfinite(lg).all():
        return "non-finite logits"
    if not (np.isfinite(bx).all() and (bx[..., 2:] >= 0).all()):
        return "bad pred box"
    ncls = inp["k"] if inp["focal"] else inp["k"] - 1
    if len(inp["labels"]) and not ((inp["labels"] >= 0) & (inp["labels"] < ncls)).all():
        return "label out of range"  # a softmax head with one logit has no class at all
    if not (np.isfinite(tb).all() and (tb[:, 2:] >= 0).all()):
        return "bad target box"
    return None


def check_matches(
    inp: dict[str, Any], per_block: list[tuple[np.ndarray, np.ndarray]], class_weight: float
) -> None:
    """Each block's pairs are a valid assignment with the optimal total of the reference cost
    (weights: ``class_weight`` / 5 / 2 unless the example sets them)."""
    w = {"cost_class": class_weight, "cost_bbox": 5.0, "cost_giou": 2.0}
    w.update({k: float(v) for k, v in inp["weights"].items() if k != "focal_alpha"})
    alpha = float(inp["weights"].get("focal_alpha", 0.25))
    offsets = np.concatenate([[0], np.cumsum(inp["sizes"])])
    nl, nb, q, _ = inp["logits"].shape
    for idx, (qi, ti) in enumerate(per_block):
        layer, b = divmod(idx, nb)
        t0, t1 = offsets[b], offsets[b + 1]
        assert len(qi) == len(ti) == min(q, t1 - t0)
        assert (np.diff(qi) > 0).all() and len(set(ti.tolist())) == len(ti)
        if not len(qi):
            continue
        c = ref_cost(
            inp["logits"][layer, b], inp["boxes"][layer, b], inp["labels"][t0:t1],
            inp["tboxes"][t0:t1], inp["focal"],
            (w["cost_class"], w["cost_bbox"], w["cost_giou"]), alpha, 2.0,
        )  # fmt: skip
        r, cidx = scipy.optimize.linear_sum_assignment(c)
        ours, best = c[qi, ti].sum(), c[r, cidx].sum()
        tol = 1e-4 * max(1.0, float(np.abs(c).max())) * len(qi)
        assert ours <= best + tol, (ours, best)


@settings(FUZZ, max_examples=200)
@hgiven(inp=matcher_inputs(), data=st.data())
def test_match_layers_native(inp, data):
    layout = data.draw(st.sampled_from(LAYOUTS))
    logits = [relayout(x, layout) for x in inp["logits"]]
    boxes = [relayout(x, data.draw(st.sampled_from(LAYOUTS))) for x in inp["boxes"]]
    # what the native side reads (a broadcast layout repeats the first image)
    inp = dict(inp, logits=np.stack(logits), boxes=np.stack(boxes))
    tboxes = relayout(inp["tboxes"], data.draw(st.sampled_from(LAYOUTS)))
    inp["tboxes"] = np.asarray(tboxes)
    area = "matcher: match_layers (native)"
    count_layout(area, layout)
    kind = "focal" if inp["focal"] else "softmax"
    invalid = matcher_problem(inp, public=False)
    out = run(
        area,
        lambda: _native.match_layers(
            logits, boxes, inp["labels"], tboxes, inp["sizes"], class_cost=kind, **inp["weights"]
        ),
        ("pred_logits", "pred_boxes", "target_labels", "target_boxes", "target_sizes",
         "cost_class", "cost_bbox", "cost_giou", "focal_alpha", "focal_gamma",
         "cost_class/cost_bbox/cost_giou"),
        invalid,
    )  # fmt: skip
    if out is None:
        return
    indices, counts = out
    assert len(counts) == len(logits) * len(inp["sizes"])
    parts = np.split(indices, np.cumsum(counts + counts)[:-1]) if len(indices) else []
    nblk = len(counts)
    blocks = (
        [(parts[i], parts[nblk + i]) for i in range(nblk)]
        if parts
        else [(np.zeros(0, np.int64), np.zeros(0, np.int64))] * nblk
    )
    check_matches(inp, blocks, class_weight=1.0)  # the native defaults: 1 / 5 / 2


@settings(FUZZ, max_examples=150)
@hgiven(inp=matcher_inputs(), data=st.data())
def test_hungarian_matcher_public(inp, data):
    kind = data.draw(st.sampled_from(("numpy", "torch", "torch-noncontiguous", "bigendian")))
    area = "matcher: HungarianMatcher (public)"
    COUNTS[area][f"input kind: {kind}"] += 1

    def conv(x: np.ndarray) -> Any:
        if kind == "torch":
            return torch.from_numpy(np.ascontiguousarray(x))
        if kind == "torch-noncontiguous":
            return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 0, -1))).transpose(0, -1)
        if kind == "bigendian":
            return x.astype(x.dtype.newbyteorder(">"))
        return x

    offsets = np.concatenate([[0], np.cumsum(inp["sizes"])]).astype(int)
    targets = [
        {"labels": conv(inp["labels"][a:b]), "boxes": conv(inp["tboxes"][a:b])}
        for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]
    outputs = [
        {"pred_logits": conv(lg), "pred_boxes": conv(bx)}
        for lg, bx in zip(inp["logits"], inp["boxes"], strict=True)
    ]
    invalid = matcher_problem(inp, public=True)

    def call() -> Any:
        ctor = ka_rs.HungarianMatcher.deformable if inp["focal"] else ka_rs.HungarianMatcher.detr
        return ctor(**inp["weights"]).match_layers(outputs, targets)

    out = run(
        area, call,
        ("pred_logits", "pred_boxes", "targets[", "cost_class", "cost_bbox", "cost_giou",
         "focal_alpha", "cost_class/cost_bbox/cost_giou"),
        invalid,
    )  # fmt: skip
    if out is None:
        return
    blocks = [(q.numpy(), t.numpy()) for layer in out for q, t in layer]
    check_matches(inp, blocks, class_weight=2.0 if inp["focal"] else 1.0)  # the presets


# ---------------------------------------------------------------------------------------------
# build_pseudo_targets
# ---------------------------------------------------------------------------------------------


def ref_pseudo_targets(logits, boxes, maps, union, kinds, thr, top_n, fill, nms):
    """KA pseudo-targets (see rust/src/targets.rs), in plain Python floats, same operation
    order, so the same rounding."""
    batch = logits[0].shape[0]
    rows = []
    for b in range(batch):
        cands = []
        for k, (lg, mp, kind) in enumerate(zip(logits, maps, kinds, strict=True)):
            for q in range(lg.shape[1]):
                row = [float(v) for v in lg[b, q]]
                best, mx = 0, -math.inf
                for j, v in enumerate(row):
                    if v > mx and (j >= len(mp) or mp[j] != -1):
                        best, mx = j, v
                if kind == "softmax":
                    if best + 1 == len(row):
                        continue
                    m = max(row)
                    denom = 0.0
                    for v in row:
                        denom += math.exp(v - m)
                    prob = math.exp(mx - m) / denom
                else:
                    prob = 1.0 / (1.0 + math.exp(-mx))
                if prob > thr:
                    cands.append((prob, k, q, int(mp[best])))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        if nms is not None:
            kept = []
            for c in cands:
                bx = [float(v) for v in boxes[c[1]][b, c[2]]]
                xyxy = [bx[0] - 0.5 * bx[2], bx[1] - 0.5 * bx[3], bx[0] + 0.5 * bx[2],
                        bx[1] + 0.5 * bx[3]]  # fmt: skip
                if all(o[3] != c[3] or exact_pair(ox, xyxy)[0] <= nms for o, ox in kept):
                    kept.append((c, xyxy))
            cands = [c for c, _ in kept]
        rows.append(cands[:top_n])
    return rows


@settings(FUZZ, max_examples=300)
@hgiven(data=st.data())
def test_build_pseudo_targets_native(data):
    nt = data.draw(st.integers(1, 2))
    batch, union = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 4))
    logits, boxes, maps, kinds, notes = [], [], [], [], []
    for _ in range(nt):
        kind = data.draw(st.sampled_from(("softmax", "sigmoid", "focal")))
        c = data.draw(st.integers(1, 3))
        pool = list(data.draw(st.permutations(range(union))))
        mp = [pool.pop() if pool and data.draw(st.integers(0, 3)) else -1 for _ in range(c)]
        q = data.draw(st.integers(0, 4))
        k = c + 1 if kind == "softmax" else c
        n = batch * q * k
        lg = np.array(data.draw(st.lists(st.integers(-6, 6), min_size=n, max_size=n)), np.float32)
        lg = lg.reshape(batch, q, k) / 2
        m = batch * q * 4
        bx = np.array(data.draw(st.lists(st.integers(0, 8), min_size=m, max_size=m)), np.float32)
        bx = bx.reshape(batch, q, 4) / 8
        logits.append(relayout(lg, data.draw(st.sampled_from(LAYOUTS))))
        boxes.append(relayout(bx, data.draw(st.sampled_from(LAYOUTS))))
        maps.append(np.array(mp, np.int64))
        kinds.append(kind)
    hostile = data.draw(st.integers(0, 29))  # 0-9: one hostile argument
    thr, top_n, fill, nms = data.draw(st.sampled_from((0.0, 0.3, 0.6))), 3, -5.0, None
    if data.draw(st.booleans()):
        nms = data.draw(st.sampled_from((0.0, 0.5, 1.0)))
    if hostile == 0 and logits[0].size:
        lg = np.array(logits[0])
        lg.flat[0] = np.nan
        logits[0] = lg
        notes.append("non-finite logits")
    elif hostile == 1 and boxes[0].size:
        bx = np.array(boxes[0])
        bx[..., 2] = -0.5
        boxes[0] = bx
        notes.append("negative box size")
    elif hostile == 2:
        maps[0] = np.append(maps[0][:-1], union)  # out of range (same length)
        notes.append("map out of range")
    elif hostile == 3:
        kinds[0] = data.draw(st.sampled_from(("abc", 3, None)))
        notes.append("teacher kind")
    elif hostile == 4:
        thr = data.draw(st.sampled_from((1.0, -0.1, np.nan, True, "0.5")))
        notes.append("threshold")
    elif hostile == 5:
        top_n = data.draw(st.sampled_from((-1, True, 2.5, 2**64)))
        notes.append("top_n")
    elif hostile == 6:
        union = data.draw(st.sampled_from((0, True)))
        notes.append("num_union_classes")
    elif hostile == 7:
        logits[0] = np.asarray(logits[0], np.float64)
        notes.append("float64 logits")
    elif hostile == 8 and nt == 2:
        boxes = boxes[:1]
        notes.append("teacher count")
    elif hostile == 9:
        nms = data.draw(st.sampled_from((1.5, True)))
        notes.append("nms_iou")
    area = "pseudo-targets: build_pseudo_targets (native)"
    invalid = notes[0] if notes else None
    if invalid is None and any((mp == -1).all() for mp in maps):
        invalid = "no class in a map"
    if invalid == "map out of range" and len(maps[0]) and (maps[0] == -1).all():
        invalid = "no class in a map"
    out = run(
        area,
        lambda: _native.build_pseudo_targets(
            logits, boxes, maps, union, kinds, thr, top_n, fill, nms
        ),
        ("teacher_logits", "teacher_boxes", "local_to_union", "teacher_kinds", "threshold",
         "top_n", "num_union_classes", "nms_iou", "fill_logit"),
        invalid,
    )  # fmt: skip
    if out is None:
        return
    labels, out_boxes, soft, scores, teacher, counts = out
    want = ref_pseudo_targets(
        [np.asarray(x) for x in logits], [np.asarray(x) for x in boxes],
        [mp.tolist() for mp in maps], union, kinds, thr, top_n, fill, nms,
    )  # fmt: skip
    assert counts.tolist() == [len(r) for r in want]
    flat = [c for r in want for c in r]
    assert labels.tolist() == [c[3] for c in flat]
    assert teacher.tolist() == [c[1] for c in flat]
    np.testing.assert_array_equal(scores, np.array([c[0] for c in flat], np.float32))
    for row, c, bx, sl in zip(range(len(flat)), flat, out_boxes, soft, strict=True):
        np.testing.assert_array_equal(bx, np.asarray(boxes[c[1]])[_img(counts, row), c[2]])
        lg = np.asarray(logits[c[1]])[_img(counts, row), c[2]]
        want_soft = np.full(union + 1, fill, np.float32)
        for j, u in enumerate(maps[c[1]].tolist()):
            if u != -1:
                want_soft[u] = lg[j]
        if kinds[c[1]] == "softmax":
            want_soft[union] = lg[-1]
        np.testing.assert_array_equal(sl, want_soft)


def _img(counts: np.ndarray, row: int) -> int:
    """The image that output row ``row`` belongs to."""
    return int(np.searchsorted(np.cumsum(counts), row, side="right"))

"""build_pseudo_targets against a plain torch reference, dedupe of overlapping teachers, inputs."""

from __future__ import annotations

import multiprocessing as mp
import os
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from ka_rs import _native
from ka_rs.labels import LabelSpace, _split, _to_host, build_pseudo_targets

# --------------------------------------------------------------------------------------------
# reference: the method written out per image with torch ops (docs/method.md §4)
# --------------------------------------------------------------------------------------------


def _iou_row(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU (f64) of one cxcywh box against (n, 4) cxcywh boxes."""

    def xyxy(b: torch.Tensor) -> torch.Tensor:
        b = b.double()
        return torch.cat([b[..., :2] - 0.5 * b[..., 2:], b[..., :2] + 0.5 * b[..., 2:]], -1)

    a, o = xyxy(box), xyxy(others)
    lt = torch.maximum(a[:2], o[:, :2])
    rb = torch.minimum(a[2:], o[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_o = (o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1])
    union = area_a + area_o - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def reference(space, outputs, kinds, threshold, top_n, fill_logit, nms_iou):
    """Per image: candidates per teacher, pool, sort, NMS, top-n, remap."""
    width = space.num_classes + 1
    batch = outputs[0]["pred_logits"].shape[0]
    result = []
    for b in range(batch):
        cands = []  # (score, teacher, query, local class)
        for k, out in enumerate(outputs):
            logits = out["pred_logits"][b].double()
            if kinds[k] == "softmax":
                prob = logits.softmax(-1)
                score, cls = prob.max(-1)
                ok = (cls != logits.shape[-1] - 1) & (score > threshold)
            else:
                score, cls = logits.sigmoid().max(-1)
                ok = score > threshold
            for q in ok.nonzero().flatten().tolist():
                cands.append((score[q].item(), k, q, int(cls[q])))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        maps = [space.local_to_union(k) for k in range(len(outputs))]
        labels = torch.tensor([int(maps[k][c]) for _, k, _, c in cands], dtype=torch.int64)
        boxes = torch.stack([outputs[k]["pred_boxes"][b, q] for _, k, q, _ in cands]).reshape(-1, 4)
        if nms_iou is not None and cands:
            suppressed = torch.zeros(len(cands), dtype=torch.bool)
            keep = []
            for i in range(len(cands)):
                if suppressed[i]:
                    continue
                keep.append(i)
                suppressed |= (_iou_row(boxes[i], boxes) > nms_iou) & (labels == labels[i])
            cands = [cands[i] for i in keep]
        cands = cands[:top_n]
        soft = torch.full((len(cands), width), fill_logit, dtype=torch.float32)
        for row, (_, k, q, _) in enumerate(cands):
            logits = outputs[k]["pred_logits"][b, q].float()
            c = len(maps[k])
            soft[row, torch.from_numpy(maps[k])] = logits[:c]
            if kinds[k] == "softmax":
                soft[row, space.background_index] = logits[c]
        result.append(
            {
                "labels": torch.tensor(
                    [int(maps[k][c]) for _, k, _, c in cands], dtype=torch.int64
                ),
                "boxes": torch.stack(
                    [outputs[k]["pred_boxes"][b, q].float() for _, k, q, _ in cands]
                ).reshape(-1, 4),
                "soft_logits": soft,
                "scores": torch.tensor([s for s, *_ in cands], dtype=torch.float32),
                "teacher": torch.tensor([k for _, k, _, _ in cands], dtype=torch.int64),
            }
        )
    return result


def assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == {"labels", "boxes", "soft_logits", "scores", "teacher"}
        for key in ("labels", "teacher", "boxes", "soft_logits"):
            assert g[key].dtype == w[key].dtype, (i, key)
            assert torch.equal(g[key], w[key]), (i, key, g[key], w[key])
        torch.testing.assert_close(g["scores"], w["scores"], rtol=0, atol=1e-6)
        assert torch.all(g["scores"][:-1] >= g["scores"][1:])


# --------------------------------------------------------------------------------------------
# random teacher outputs with planted objects seen by every teacher that knows their class
# --------------------------------------------------------------------------------------------


def random_boxes(shape, gen):
    wh = 0.05 + 0.4 * torch.rand(*shape, 2, generator=gen)
    c = wh / 2 + torch.rand(*shape, 2, generator=gen) * (1 - wh)
    return torch.cat([c, wh], -1)


def make_outputs(space, kinds, queries, batch, gen, *, objects=4, noise=True, jitter=0.01):
    outputs = []
    for k, kind in enumerate(kinds):
        c = len(space.classes(k))
        q = queries[k]
        if noise:
            logits = 1.5 * torch.randn(batch, q, c + (kind == "softmax"), generator=gen)
            if kind == "softmax":
                logits[..., -1] += 1.0
        else:  # only the planted objects are confident
            logits = torch.full((batch, q, c + (kind == "softmax")), -6.0)
            if kind == "softmax":
                logits[..., -1] = 6.0
        outputs.append({"pred_logits": logits, "pred_boxes": random_boxes((batch, q), gen)})
    for b in range(batch):
        perms = [torch.randperm(queries[k], generator=gen).tolist() for k in range(len(kinds))]
        for _ in range(objects):
            name = space.names[int(torch.randint(space.num_classes, (1,), generator=gen))]
            box = random_boxes((), gen)
            for k in range(len(kinds)):
                if name not in space.classes(k) or not perms[k]:
                    continue
                q = perms[k].pop()
                local = space.classes(k).index(name)
                row = outputs[k]["pred_logits"][b, q]
                row.copy_(0.5 * torch.randn(row.shape, generator=gen))
                row[local] = 3.0 + 3.0 * torch.rand((), generator=gen)
                jittered = box + jitter * torch.randn(4, generator=gen)
                jittered[2:] = jittered[2:].clamp(min=0.01)
                outputs[k]["pred_boxes"][b, q] = jittered
    return outputs


SPACES = {
    "disjoint2": {"a": ["cat", "dog", "bird"], "b": ["car", "bus", "train", "boat"]},
    "overlap2": {"a": ["person", "dog", "cat"], "b": ["cat", "horse", "person", "cow"]},
    "disjoint3": {"a": ["cat", "dog"], "b": ["car", "bus", "train"], "c": ["cup", "fork"]},
    "overlap3": {"a": ["person", "dog", "cat"], "b": ["horse", "dog"], "c": ["cat", "cow"]},
}

CASES = [
    ("disjoint2", ("softmax", "softmax")),
    ("disjoint2", ("sigmoid", "sigmoid")),
    ("overlap2", ("softmax", "softmax")),
    ("overlap2", ("softmax", "sigmoid")),
    ("disjoint3", ("softmax", "sigmoid", "softmax")),
    ("overlap3", ("softmax", "softmax", "softmax")),
    ("overlap3", ("sigmoid", "softmax", "sigmoid")),
]


@pytest.mark.parametrize(("space_name", "kinds"), CASES)
@pytest.mark.parametrize("nms_iou", [None, 0.5])
@pytest.mark.parametrize(("threshold", "top_n"), [(0.1, 50), (0.4, 6), (0.0, 1000)])
def test_matches_torch_reference(space_name, kinds, nms_iou, threshold, top_n):
    seed = zlib.crc32(repr((space_name, kinds, nms_iou, threshold, top_n)).encode())
    gen = torch.Generator().manual_seed(seed)
    space = LabelSpace.from_teachers(SPACES[space_name])
    queries = [30, 20, 25][: len(kinds)]
    outputs = make_outputs(space, kinds, queries, batch=5, gen=gen)
    got = build_pseudo_targets(
        space,
        outputs,
        kinds=kinds,
        threshold=threshold,
        top_n=top_n,
        fill_logit=-5.0,
        nms_iou=nms_iou,
    )
    want = reference(space, outputs, kinds, threshold, top_n, -5.0, nms_iou)
    assert_same(got, want)
    assert sum(len(g["labels"]) for g in got) > 0


def test_large_batch_parallel_path_matches_reference():
    # B=32, Q=100, 2 x 21 logits per query: above the pool's work threshold.
    gen = torch.Generator().manual_seed(7)
    names = [f"c{i}" for i in range(30)]
    space = LabelSpace.from_teachers({"a": names[:20], "b": names[10:]})
    kinds = ("softmax", "sigmoid")
    outputs = make_outputs(space, kinds, [100, 100], batch=32, gen=gen, objects=10)
    got = build_pseudo_targets(space, outputs, kinds=kinds, threshold=0.1, top_n=50)
    want = reference(space, outputs, kinds, 0.1, 50, -5.0, 0.7)
    assert_same(got, want)


def _digest(seed: int) -> tuple[int, float]:
    """Parallel-sized call on numpy inputs (torch's own pool is not fork-safe; ka_rs's is)."""
    rng = np.random.default_rng(seed)
    space = LabelSpace.from_teachers({"a": [f"c{i}" for i in range(40)], "b": ["c0", "d"]})
    outputs = []
    for k in (41, 3):
        wh = 0.05 + 0.3 * rng.random((64, 100, 2), dtype=np.float32)
        xy = wh / 2 + rng.random((64, 100, 2), dtype=np.float32) * (1 - wh)
        logits = 2 * rng.standard_normal((64, 100, k), dtype=np.float32)
        outputs.append({"pred_logits": logits, "pred_boxes": np.concatenate([xy, wh], -1)})
    got = build_pseudo_targets(space, outputs)
    return sum(len(g["labels"]) for g in got), float(sum(g["scores"].sum() for g in got))


def _child(seed: int, queue: mp.Queue) -> None:
    queue.put(_digest(seed))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_parallel_path_survives_fork():
    want = _digest(1)  # the parent's pool now exists
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(1, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [want, want]


def test_defaults_are_the_papers():
    gen = torch.Generator().manual_seed(3)
    space = LabelSpace.from_teachers(SPACES["overlap2"])
    outputs = make_outputs(space, ("softmax", "softmax"), [100, 100], batch=3, gen=gen)
    got = build_pseudo_targets(space, outputs)
    want = reference(space, outputs, ("softmax", "softmax"), 0.1, 50, -5.0, 0.7)
    assert_same(got, want)


# --------------------------------------------------------------------------------------------
# dedupe of overlapping teachers
# --------------------------------------------------------------------------------------------


def _out(logits, boxes):
    return {"pred_logits": torch.tensor([logits]), "pred_boxes": torch.tensor([boxes])}


def test_duplicate_object_from_two_teachers_is_merged():
    space = LabelSpace.from_teachers({"a": ["dog", "cat"], "b": ["bird", "dog"]})
    dog = [0.30, 0.30, 0.20, 0.20]
    # teacher a: the dog (p~0.95) and a cat; teacher b: the same dog (p~0.99), a bird, and a
    # second dog elsewhere.
    a = _out(
        [[4.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0]],
        [dog, [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]],
    )
    b = _out(
        [[0.0, 6.0, 1.0], [4.0, 0.0, 0.0], [0.0, 3.0, 0.0]],
        [[0.305, 0.30, 0.20, 0.21], [0.1, 0.8, 0.1, 0.1], [0.8, 0.2, 0.1, 0.1]],
    )
    dog_u = space.index("dog")
    kept = build_pseudo_targets(space, [a, b], nms_iou=0.7)[0]
    dogs = kept["labels"] == dog_u
    assert int(dogs.sum()) == 2  # the shared dog once + the far dog
    assert sorted(space.names[i] for i in kept["labels"].tolist()) == [
        "bird",
        "cat",
        "dog",
        "dog",
    ]
    # the duplicate pair kept teacher b's (more confident) copy
    first = kept["labels"].tolist().index(dog_u)
    assert kept["teacher"][first] == 1
    torch.testing.assert_close(kept["boxes"][first], torch.tensor([0.305, 0.30, 0.20, 0.21]))
    # its soft target carries teacher b's logits: dog=6 at the union dog index, b's background
    # onto the union background, teacher a's cat (unknown to b) at the fill value
    soft = kept["soft_logits"][first]
    assert soft[dog_u] == 6.0 and soft[space.index("bird")] == 0.0
    assert soft[space.background_index] == 1.0 and soft[space.index("cat")] == -5.0
    # without NMS both copies survive
    raw = build_pseudo_targets(space, [a, b], nms_iou=None)[0]
    assert int((raw["labels"] == dog_u).sum()) == 3


def test_nms_runs_before_top_n():
    space = LabelSpace.from_teachers({"a": ["dog"], "b": ["dog"]})
    a = _out([[5.0, 0.0], [2.0, 0.0]], [[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    b = _out([[6.0, 0.0]], [[0.3, 0.3, 0.2, 0.2]])
    got = build_pseudo_targets(space, [a, b], top_n=2)[0]
    # the duplicate did not use up the budget: both distinct objects are there
    assert got["teacher"].tolist() == [1, 0]
    torch.testing.assert_close(got["boxes"][1], torch.tensor([0.7, 0.7, 0.2, 0.2]))


@pytest.mark.parametrize("kinds", [("softmax", "softmax", "sigmoid"), ("sigmoid",) * 3])
def test_one_pseudo_target_per_object_seen_by_several_teachers(kinds):
    gen = torch.Generator().manual_seed(11)
    space = LabelSpace.from_teachers(
        {"a": ["p", "q", "r"], "b": ["r", "p", "s"], "c": ["p", "s", "t"]}
    )
    outputs = make_outputs(
        space, kinds, [40, 40, 40], batch=8, gen=gen, objects=5, noise=False, jitter=0.005
    )
    raw = build_pseudo_targets(space, outputs, kinds=kinds, nms_iou=None, top_n=1000)
    got = build_pseudo_targets(space, outputs, kinds=kinds, nms_iou=0.7, top_n=1000)
    merged_something = False
    for r, g in zip(raw, got, strict=True):
        merged_something |= len(g["labels"]) < len(r["labels"])
        # every raw pseudo-target (a teacher's view of a planted object) has exactly one
        # survivor of its class covering it, and no two survivors of a class overlap > 0.7
        for i in range(len(r["labels"])):
            same = g["labels"] == r["labels"][i]
            cover = (_iou_row(r["boxes"][i], g["boxes"]) > 0.7) & same
            assert int(cover.sum()) == 1
        for i in range(len(g["labels"])):
            same = g["labels"] == g["labels"][i]
            overlap = (_iou_row(g["boxes"][i], g["boxes"]) > 0.7) & same
            assert int(overlap.sum()) == 1  # itself
    assert merged_something


def test_identical_twin_teachers_keep_the_first():
    gen = torch.Generator().manual_seed(5)
    single = LabelSpace.from_teachers({"a": ["x", "y"]})
    twins = LabelSpace.from_teachers({"a": ["x", "y"], "b": ["x", "y"]})
    (out,) = make_outputs(single, ["softmax"], [30], 4, gen)
    alone = build_pseudo_targets(single, [out], nms_iou=0.7, top_n=100)
    got = build_pseudo_targets(twins, [out, out], nms_iou=0.7, top_n=100)
    # the twin's copies are all merged into teacher 0's (ties go to the lower teacher index)
    assert_same(got, alone)
    assert all(g["teacher"].tolist() == [0] * len(g["teacher"]) for g in got)
    raw = build_pseudo_targets(twins, [out, out], nms_iou=None, top_n=100)
    for r in raw:
        n = len(r["teacher"])
        assert n > 0 and n % 2 == 0
        # equal scores: teacher 0 then teacher 1 for each query, queries by score
        assert r["teacher"].tolist() == [0, 1] * (n // 2)
        assert torch.equal(r["boxes"][0::2], r["boxes"][1::2])


# --------------------------------------------------------------------------------------------
# remap details and input flexibility
# --------------------------------------------------------------------------------------------


def test_sigmoid_teacher_background_stays_fill():
    space = LabelSpace.from_teachers({"a": ["x", "y"], "b": ["y", "z"]})
    a = _out([[3.0, 0.0, 0.0]], [[0.5, 0.5, 0.1, 0.1]])
    b = _out([[-1.0, 2.0]], [[0.2, 0.2, 0.1, 0.1]])
    got = build_pseudo_targets(space, [a, b], kinds=["softmax", "focal"], fill_logit=-7.5)[0]
    assert got["teacher"].tolist() == [0, 1]
    assert got["labels"].tolist() == [0, 2]
    torch.testing.assert_close(got["soft_logits"][0], torch.tensor([3.0, 0.0, -7.5, 0.0]))
    torch.testing.assert_close(got["soft_logits"][1], torch.tensor([-7.5, -1.0, 2.0, -7.5]))
    torch.testing.assert_close(got["scores"][1], torch.sigmoid(torch.tensor(2.0)))


@dataclass
class FakeDetrOutput:
    pred_logits: torch.Tensor
    pred_boxes: torch.Tensor


def test_input_kinds_give_the_same_result():
    gen = torch.Generator().manual_seed(9)
    space = LabelSpace.from_teachers(SPACES["overlap2"])
    kinds = ("softmax", "sigmoid")
    outputs = make_outputs(space, kinds, [30, 20], batch=4, gen=gen)
    want = build_pseudo_targets(space, outputs, kinds=kinds)
    variants = [
        {"a": outputs[0], "b": outputs[1]},  # mapping keyed by teacher name
        {"b": outputs[1], "a": outputs[0]},  # any key order
        [FakeDetrOutput(o["pred_logits"], o["pred_boxes"]) for o in outputs],
        [{k: v.numpy() for k, v in o.items()} for o in outputs],  # numpy
        [{k: v.clone().requires_grad_(True) for k, v in o.items()} for o in outputs],
        # non-contiguous views
        [
            {k: v.transpose(0, 1).contiguous().transpose(0, 1) for k, v in o.items()}
            for o in outputs
        ],
        [{k: v.double() for k, v in o.items()} for o in outputs],
    ]
    for v in variants:
        assert_same(build_pseudo_targets(space, v, kinds=kinds), want)
    assert_same(build_pseudo_targets(space, outputs, kinds={"b": "sigmoid", "a": "softmax"}), want)
    # half precision input: same as the float32 cast of it
    half = [{k: v.half() for k, v in o.items()} for o in outputs]
    assert_same(
        build_pseudo_targets(space, half, kinds=kinds),
        build_pseudo_targets(
            space, [{k: v.float() for k, v in o.items()} for o in half], kinds=kinds
        ),
    )
    assert all(g["labels"].device.type == "cpu" for g in want)


def test_packed_transfer_paths_agree():
    gen = torch.Generator().manual_seed(2)
    space = LabelSpace.from_teachers(SPACES["overlap3"])
    kinds = ("softmax", "sigmoid", "softmax")
    outputs = make_outputs(space, kinds, [30, 20, 25], batch=4, gen=gen)
    tensors = [o["pred_logits"] for o in outputs] + [o["pred_boxes"].half() for o in outputs]
    for a, b in zip(_to_host(tensors), _to_host(tensors, gather_cpu=True), strict=True):
        assert a.dtype == b.dtype == np.float32 and a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
    host = _to_host(tensors[:3] + [o["pred_boxes"] for o in outputs])
    arrays = _native.build_pseudo_targets(
        host[:3], host[3:], [space.local_to_union(k) for k in range(3)], 6, list(kinds),
        0.1, 50, -5.0, 0.7,
    )  # fmt: skip
    plain = _split(*arrays, torch.device("cpu"))
    packed = _split(*arrays, torch.device("cpu"), pack=True)
    assert_same(packed, plain)


def test_empty_batch_and_zero_top_n():
    space = LabelSpace.from_teachers({"a": ["x"], "b": ["y"]})
    empty = {"pred_logits": torch.zeros(0, 5, 2), "pred_boxes": torch.zeros(0, 5, 4)}
    assert build_pseudo_targets(space, [empty, empty]) == []
    gen = torch.Generator().manual_seed(1)
    outputs = make_outputs(space, ("softmax", "softmax"), [10, 10], batch=3, gen=gen)
    got = build_pseudo_targets(space, outputs, top_n=0)
    assert len(got) == 3
    for g in got:
        assert g["labels"].shape == (0,) and g["soft_logits"].shape == (0, 3)
        assert g["boxes"].shape == (0, 4)


# --------------------------------------------------------------------------------------------
# bad input → ValueError naming the argument
# --------------------------------------------------------------------------------------------


def _good():
    space = LabelSpace.from_teachers({"a": ["x", "y"], "b": ["y", "z", "w"]})
    gen = torch.Generator().manual_seed(0)
    return space, make_outputs(space, ("softmax", "softmax"), [6, 4], batch=2, gen=gen)


def _with(outputs, k, key, value):
    out = [dict(o) for o in outputs]
    out[k][key] = value
    return out


def _bad_cases():
    space, o = _good()
    nan = o[1]["pred_logits"].clone()
    nan[1, 2, 3] = float("nan")
    inf = o[0]["pred_boxes"].clone()
    inf[0, 1, 0] = float("inf")
    neg = o[0]["pred_boxes"].clone()
    neg[1, 0, 2] = -0.1
    la, lb = r"^teacher_outputs\['a'\]\.pred_logits", r"^teacher_outputs\['b'\]\.pred_logits"
    ba = r"^teacher_outputs\['a'\]\.pred_boxes"
    only_logits = [o[0], {"pred_logits": o[1]["pred_logits"]}]
    return [
        ((o[:1],), {}, r"^teacher_outputs: got 1 outputs for 2 teachers"),
        (({"a": o[0]},), {}, r"^teacher_outputs: expected a mapping .*missing \['b'\]"),
        (({"a": o[0], "b": o[1], "c": o[1]},), {}, r"^teacher_outputs: .*unexpected \['c'\]"),
        ((o[0],), {}, r"^teacher_outputs: .*missing \['a', 'b'\]"),
        ((42,), {}, r"^teacher_outputs: expected a sequence"),
        ((only_logits,), {}, r"^teacher_outputs\['b'\]: missing 'pred_boxes'"),
        ((_with(o, 1, "pred_logits", torch.zeros(2, 4, 3)),), {}, lb + r": .*\(B, Q, 4\)"),
        ((_with(o, 0, "pred_logits", torch.zeros(2, 6)),), {}, la + ": expected shape"),
        (
            (_with(o, 0, "pred_logits", torch.zeros(2, 6, 3, dtype=torch.int64)),),
            {},
            la + ": expected a floating",
        ),
        ((_with(o, 0, "pred_boxes", [[0.0] * 4]),), {}, ba + ": expected a torch tensor"),
        ((_with(o, 0, "pred_boxes", torch.zeros(2, 5, 4)),), {}, ba + r": .*\(2, 6, 4\)"),
        ((_with(o, 1, "pred_logits", torch.zeros(3, 4, 4)),), {}, r"^teacher_outputs\['b'\]"),
        ((_with(o, 1, "pred_logits", nan),), {}, lb + r": .*non-finite value \(NaN at \[1, 2, 3\]"),
        ((_with(o, 0, "pred_boxes", inf),), {}, ba + ": contains a non-finite"),
        ((_with(o, 0, "pred_boxes", neg),), {}, ba + r": box \[1, 0\] has negative width"),
        ((o,), {"kinds": "relu"}, r"^kinds: teacher 'a' has kind 'relu'"),
        ((o,), {"kinds": ["softmax"]}, r"^kinds: got 1 kinds for 2 teachers"),
        ((o,), {"kinds": {"a": "softmax"}}, r"^kinds: missing teachers \['b'\]"),
        ((o,), {"kinds": ["softmax", "sigmoid"]}, lb + r": .*\(B, Q, 3\) for a sigmoid"),
        ((o,), {"threshold": 1.0}, r"^threshold: must be in \[0, 1\)"),
        ((o,), {"threshold": -0.01}, r"^threshold:"),
        ((o,), {"threshold": "high"}, r"^threshold: expected a number"),
        ((o,), {"top_n": -1}, r"^top_n: must be >= 0"),
        ((o,), {"top_n": 2.5}, r"^top_n: expected an integer"),
        ((o,), {"fill_logit": float("nan")}, r"^fill_logit: must be a finite"),
        ((o,), {"nms_iou": 1.5}, r"^nms_iou: must be in \[0, 1\]"),
        ((o,), {"nms_iou": float("nan")}, r"^nms_iou:"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "match"), _bad_cases())
def test_bad_input_raises_naming_the_argument(args, kwargs, match):
    space, _ = _good()
    with pytest.raises(ValueError, match=match):
        build_pseudo_targets(space, *args, **kwargs)


def test_bad_label_space():
    _, o = _good()
    with pytest.raises(ValueError, match=r"^label_space: expected a LabelSpace"):
        build_pseudo_targets({"a": ["x"]}, o)  # type: ignore[arg-type]


def _native_args():
    logits = [np.zeros((2, 3, 3), np.float32), np.zeros((2, 4, 2), np.float32)]
    boxes = [np.full((2, 3, 4), 0.2, np.float32), np.full((2, 4, 4), 0.2, np.float32)]
    maps = [np.array([0, 1]), np.array([1, 2])]
    return [logits, boxes, maps, 3, ["softmax", "sigmoid"], 0.1, 10, -5.0, 0.7]


def _native_bad_cases():
    cases = []

    def case(index, value, match):
        args = _native_args()
        if isinstance(index, tuple):
            args[index[0]] = list(args[index[0]])
            args[index[0]][index[1]] = value
        else:
            args[index] = value
        cases.append((args, match))

    case((0, 1), np.zeros((2, 4, 2), np.float64), r"^teacher_logits\[1\]: expected a float32")
    case((1, 0), np.zeros((2, 3, 4), np.float16), r"^teacher_boxes\[0\]: expected a float32")
    case((1, 0), np.zeros((2, 3, 5), np.float32), r"^teacher_boxes\[0\]: .*\(2, 3, 4\)")
    case((2, 1), np.array([1, 3]), r"^local_to_union\[1\]: entry 1 is 3, outside")
    case((2, 1), np.array([2, 2]), r"^local_to_union\[1\]: union index 2 appears more than once")
    case((2, 0), np.array([0, 1], np.int32), r"^local_to_union\[0\]: expected an int64")
    case((2, 0), np.array([0]), r"^teacher_logits\[0\]: softmax teacher with 1 classes")
    case((4, 1), "relu", r"^teacher_kinds\[1\]: unknown teacher kind")
    case(4, "softmax", r"^teacher_kinds: expected a list, got a str")
    case(1, [np.zeros((2, 3, 4), np.float32)], r"^teacher_boxes: has 1 entries but teacher_logits")
    case(0, [], r"^teacher_boxes: has 2 entries but teacher_logits has 0")
    case(3, 0, r"^num_union_classes: must be >= 1")
    case(3, 2, r"^local_to_union\[1\]: entry 1 is 2, outside \[0, num_union_classes=2\)")
    case(5, 1.0, r"^threshold:")
    case(6, -3, r"^top_n:")
    return cases


@pytest.mark.parametrize(("args", "match"), _native_bad_cases())
def test_native_bad_input_names_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        _native.build_pseudo_targets(*args)


def test_native_no_teachers():
    with pytest.raises(ValueError, match=r"^teacher_logits: at least one teacher"):
        _native.build_pseudo_targets([], [], [], 3, [], 0.1, 10, -5.0, None)

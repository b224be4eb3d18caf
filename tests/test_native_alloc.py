"""No native entry point aborts the interpreter on a buffer it cannot allocate.

A failed allocation in Rust's infallible APIs aborts the process (SIGABRT): in Python, the
interpreter. Every native entry point whose buffers grow with its input (``box_iou``,
``generalized_box_iou``, ``box_convert``, ``batched_nms``, ``linear_sum_assignment``,
``match_layers`` / ``HungarianMatcher``, ``build_pseudo_targets``; the list in
``rust/src/python.rs``) must instead raise ``MemoryError`` (or ``ValueError`` for a size that
cannot exist at all), and the process must go on working.

Each group of hostile calls runs in a child process, so a regression aborts the child, not
pytest: the child reports each case before and after the call, then makes one ordinary call to
show the extension still works. Sizes come from real arrays (two 10^6 x 4 box sets make a 4 TB
IoU matrix) and from numpy broadcasting / torch ``expand`` (zero strides: a few bytes standing
for an array of any shape). The child's address space is capped (``RLIMIT_AS``), so the
refusals do not depend on the machine's memory or overcommit policy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

#: Address-space cap of the child (torch and the test arrays need well under this).
LIMIT = 16 << 30

PRELUDE = """
import numpy as np
from ka_rs import _native as N

def bcast(row, shape, dtype=np.float32):
    return np.broadcast_to(np.asarray(row, dtype=dtype), shape)

def real_boxes(n, dtype=np.float32):
    b = np.random.default_rng(0).random((n, 4)).astype(dtype)
    b[:, 2:] += b[:, :2]
    return b

BOX = [0.0, 0.0, 1.0, 1.0]
"""

TORCH = """
import torch
import ka_rs
"""

# group -> [(case id, code, expected exception, message prefix)]
CASES: dict[str, list[tuple[str, str, str, str]]] = {
    "box_iou": [
        (
            "public_1e6_f32",
            "ka_rs.box_iou(real_boxes(10**6), real_boxes(10**6))",
            "MemoryError",
            "boxes1/boxes2: the IoU matrix",
        ),
        (
            "native_1e6_f64",
            "N.box_iou(real_boxes(10**6, np.float64), real_boxes(10**6, np.float64))",
            "MemoryError",
            "boxes1/boxes2: the IoU matrix",
        ),
        (
            "native_bcast_1e7",
            "N.box_iou(bcast(BOX, (10**7, 4)), bcast(BOX, (10**7, 4)))",
            "MemoryError",
            "boxes1/boxes2: the IoU matrix",
        ),
        (
            "native_overflow_2e40",
            "N.box_iou(bcast(BOX, (2**40, 4)), bcast(BOX, (2**40, 4)))",
            "ValueError",
            "boxes1/boxes2: the IoU matrix of shape",
        ),
        (
            "public_torch_expand",
            "t = torch.tensor([BOX]).expand(10**6, 4); ka_rs.box_iou(t, t)",
            "MemoryError",
            "boxes1/boxes2: the IoU matrix",
        ),
        (
            "public_bcast_copy",
            "ka_rs.box_iou(bcast(BOX, (2**40, 4)), np.zeros((1, 4), np.float32))",
            "MemoryError",
            "",
        ),
    ],
    "generalized_box_iou": [
        (
            "public_1e6_f32",
            "ka_rs.generalized_box_iou(real_boxes(10**6), real_boxes(10**6))",
            "MemoryError",
            "boxes1/boxes2: the GIoU matrix",
        ),
        (
            "native_1e6_f64",
            "N.generalized_box_iou(real_boxes(10**6, np.float64), real_boxes(10**6, np.float64))",
            "MemoryError",
            "boxes1/boxes2: the GIoU matrix",
        ),
        (
            "native_bcast_1e7",
            "N.generalized_box_iou(bcast(BOX, (10**7, 4)), bcast(BOX, (10**7, 4)))",
            "MemoryError",
            "boxes1/boxes2: the GIoU matrix",
        ),
        (
            "native_overflow_2e40",
            "N.generalized_box_iou(bcast(BOX, (2**40, 4)), bcast(BOX, (2**40, 4)))",
            "ValueError",
            "boxes1/boxes2: the GIoU matrix of shape",
        ),
        (
            "public_half_expand",
            "t = torch.tensor([BOX], dtype=torch.float16).expand(10**12, 4);"
            " ka_rs.generalized_box_iou(t, torch.zeros(0, 4))",
            "MemoryError",
            "boxes1: out of memory converting the tensor",
        ),
    ],
    "box_convert": [
        (
            "native_bcast_2e40",
            "N.box_convert(bcast(BOX, (2**40, 4)), 'xyxy', 'cxcywh')",
            "MemoryError",
            "boxes: the converted boxes",
        ),
        (
            "native_bcast_2e58_f64out",
            "N.box_convert(bcast(BOX, (2**58, 4)), 'cxcywh', 'xyxy')",
            "MemoryError",
            "boxes: the converted boxes",
        ),
        (
            "public_torch_expand",
            "ka_rs.box_convert(torch.tensor([BOX]).expand(10**12, 4), 'xyxy', 'xywh')",
            "MemoryError",
            "",
        ),
    ],
    "batched_nms": [
        (
            "native_bcast_2e40",
            "n = 2**40; N.batched_nms(bcast(BOX, (n, 4)), bcast(0.5, (n,)),"
            " bcast(0, (n,), np.int64), 0.5)",
            "MemoryError",
            "boxes: the NMS buffers",
        ),
        (
            "public_torch_expand",
            "n = 10**12; ka_rs.batched_nms(torch.tensor([BOX]).expand(n, 4),"
            " torch.tensor([0.5]).expand(n), torch.tensor([0]).expand(n), 0.5)",
            "MemoryError",
            "",
        ),
    ],
    "linear_sum_assignment": [
        (
            "native_bcast_1e6_f64",
            "N.linear_sum_assignment(bcast(1.0, (10**6, 10**6), np.float64))",
            "MemoryError",
            "cost: a float64 copy of the matrix",
        ),
        (
            "native_bcast_1e6_f32_max",
            "N.linear_sum_assignment(bcast(1.0, (10**6, 10**6)), True)",
            "MemoryError",
            "cost: a float64 copy of the matrix",
        ),
        (
            "native_overflow_2e30_f32",
            "N.linear_sum_assignment(bcast(1.0, (2**30, 2**30)))",
            "ValueError",
            "cost: a float64 copy of the matrix of shape",
        ),
        (
            "public_bcast_copy",
            "ka_rs.linear_sum_assignment(bcast(1.0, (10**6, 10**6), np.float64))",
            "MemoryError",
            "",
        ),
        (
            "public_torch_expand",
            "ka_rs.linear_sum_assignment(torch.ones(1).expand(10**6, 10**6))",
            "MemoryError",
            "cost: out of memory converting the tensor",
        ),
    ],
    "match_layers": [
        (
            "public_q_t_4e5",
            "n = 400_000; out = {'pred_logits': torch.zeros(1, n, 3),"
            " 'pred_boxes': torch.full((1, n, 4), 0.25)};"
            " tgt = [{'labels': torch.zeros(n, dtype=torch.int64),"
            " 'boxes': torch.full((n, 4), 0.25)}];"
            " ka_rs.HungarianMatcher.detr()(out, tgt)",
            "MemoryError",
            "pred_boxes/target_boxes: the 400000x400000 cost block of layer 0",
        ),
        (
            "public_layers_focal_4e5",
            "n = 400_000; out = {'pred_logits': torch.zeros(1, n, 2),"
            " 'pred_boxes': torch.full((1, n, 4), 0.25)};"
            " tgt = [{'labels': torch.zeros(n, dtype=torch.int64),"
            " 'boxes': torch.full((n, 4), 0.25)}];"
            " ka_rs.HungarianMatcher.deformable().match_layers([out, out], tgt)",
            "MemoryError",
            "pred_boxes/target_boxes: the 400000x400000 cost block",
        ),
        (
            "native_bcast_4e5",
            "n = 400_000; N.match_layers([bcast([0.5, -0.5], (1, n, 2))],"
            " [bcast([0.5, 0.5, 0.2, 0.2], (1, n, 4))], np.zeros(n, np.int64),"
            " bcast([0.5, 0.5, 0.2, 0.2], (n, 4)), np.array([n]))",
            "MemoryError",
            "pred_boxes/target_boxes: the 400000x400000 cost block",
        ),
        (
            "native_sizes_overflow",
            "N.match_layers([np.zeros((3, 2, 3), np.float32)],"
            " [np.full((3, 2, 4), 0.25, np.float32)],"
            " np.zeros(0, np.int64), np.zeros((0, 4), np.float32),"
            " np.array([2**63 - 1, 2**63 - 1, 2], np.int64))",
            "ValueError",
            "target_sizes: the sizes overflow",
        ),
        (
            "native_bcast_batch_2e40",
            "b = 2**40; N.match_layers([bcast(0.0, (b, 0, 3))], [bcast(0.0, (b, 0, 4))],"
            " np.zeros(0, np.int64), np.zeros((0, 4), np.float32), bcast(0, (b,), np.int64))",
            "MemoryError",
            "target_sizes: the per-image target offsets",
        ),
        (
            "native_bcast_copy_2e41",
            "N.match_layers([bcast([0.5, -0.5], (2**20, 2**20, 2))],"
            " [bcast([0.5, 0.5, 0.2, 0.2], (2**20, 2**20, 4))], np.zeros(0, np.int64),"
            " np.zeros((0, 4), np.float32), np.zeros(2**20, np.int64))",
            "MemoryError",
            "pred_logits: a contiguous copy of the input",
        ),
    ],
    "build_pseudo_targets": [
        (
            "native_union_1e13",
            "N.build_pseudo_targets([np.zeros((1, 2, 3), np.float32)],"
            " [np.full((1, 2, 4), 0.2, np.float32)], [np.array([0, 1])], 10**13, ['softmax'],"
            " 0.1, 5, 0.0)",
            "MemoryError",
            "num_union_classes: a table of the union classes",
        ),
        (
            "native_union_2e64",
            "N.build_pseudo_targets([np.zeros((1, 2, 3), np.float32)],"
            " [np.full((1, 2, 4), 0.2, np.float32)], [np.array([0, 1])], 2**64, ['softmax'],"
            " 0.1, 5, 0.0)",
            "ValueError",
            "num_union_classes: int 18446744073709551616 does not fit",
        ),
        (
            "native_bcast_queries_2e40",
            "q = 2**40; N.build_pseudo_targets([bcast([2.0, 0.0, -1.0], (2, q, 3))],"
            " [bcast([0.5, 0.5, 0.1, 0.1], (2, q, 4))], [np.array([0, 1])], 2, ['softmax'],"
            " 0.1, 5, 0.0, 0.5)",
            "MemoryError",
            "teacher_logits: the candidates",
        ),
    ],
}

CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
{prelude}
cases = json.loads(sys.argv[1])
for case, code, _, _ in cases:
    print(json.dumps({{"start": case}}), flush=True)
    try:
        exec(code)
        print(json.dumps({{"case": case, "raised": None}}), flush=True)
    except BaseException as err:
        mro = [c.__name__ for c in type(err).__mro__]
        print(json.dumps({{"case": case, "raised": mro, "msg": str(err)}}), flush=True)
# still alive and working
iou = N.box_iou(np.array([BOX], np.float32), np.array([BOX], np.float32))
print(json.dumps({{"alive": iou.tolist()}}), flush=True)
"""


def hostile_case_count() -> int:
    return sum(len(v) for v in CASES.values())


@pytest.mark.parametrize("group", sorted(CASES))
def test_oversized_calls_raise_and_the_process_survives(group):
    cases = CASES[group]
    needs_torch = any("torch" in code or "ka_rs." in code for _, code, _, _ in cases)
    prelude = PRELUDE + (TORCH if needs_torch else "")
    script = textwrap.dedent(CHILD).format(limit=LIMIT, prelude=prelude)
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [x["start"] for x in lines if "start" in x]
    assert proc.returncode == 0, (
        f"child died with {proc.returncode} (SIGABRT is -6) during case "
        f"{started[-1] if started else '?'}\nstderr:\n{proc.stderr[-3000:]}"
    )
    results = {x["case"]: x for x in lines if "case" in x}
    for case, _, want, prefix in cases:
        got = results[case]
        assert got["raised"] is not None, f"{case}: returned instead of raising {want}"
        assert want in got["raised"], f"{case}: raised {got['raised'][0]}: {got['msg']}"
        assert "PanicException" not in got["raised"], case
        assert got["msg"].startswith(prefix), f"{case}: message {got['msg']!r}"
    assert lines[-1] == {"alive": [[1.0]]}, lines[-1]


def test_every_native_entry_point_is_covered():
    """The groups above cover every function the extension module exports."""
    from ka_rs import _native

    exported = {
        name
        for name in dir(_native)
        if callable(getattr(_native, name)) and not name[0].isupper() and not name.startswith("_")
    }
    groups = set(CASES) | {"match_layers"}
    assert exported <= groups, exported - groups
    assert hostile_case_count() >= 25

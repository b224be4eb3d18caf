"""The native thread pool must survive fork: no hang in multiprocessing or DataLoader workers.

Each test first runs large (parallel-sized) native work in the parent so that its thread pool
exists, then repeats the work in forked children under a timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import ka_rs
import numpy as np
import pytest
import torch
from ka_rs.matcher import HungarianMatcher
from torch.utils.data import DataLoader, Dataset

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")

TIMEOUT_S = 60


def native_work(seed: int = 0) -> tuple[int, int, float, float]:
    """Matcher + box_iou + solver on inputs large enough for the parallel path; a digest.

    Inputs are made with numpy and wrapped with ``torch.from_numpy`` on purpose: torch's own
    intra-op thread pool is not fork-safe (a large torch op in a plainly forked child can hang,
    which is why DataLoader workers call ``torch.set_num_threads(1)``); this test is about
    ka_rs's pool only.
    """
    rng = np.random.default_rng(seed)
    b, q, k, layers = 32, 300, 92, 3

    def cxcywh(n: int) -> np.ndarray:
        wh = 0.05 + 0.3 * rng.random((n, 2), dtype=np.float32)
        c = wh / 2 + rng.random((n, 2), dtype=np.float32) * (1 - wh)
        return np.concatenate([c, wh], 1)

    pred_boxes = cxcywh(layers * b * q).reshape(layers, b, q, 4)
    pred_logits = rng.standard_normal((layers, b, q, k), dtype=np.float32)
    targets = []
    for t in rng.integers(0, 51, b).tolist():
        labels = torch.from_numpy(rng.integers(0, k - 1, t))
        targets.append({"labels": labels, "boxes": torch.from_numpy(cxcywh(t))})
    outputs = [
        {
            "pred_logits": torch.from_numpy(pred_logits[i]),
            "pred_boxes": torch.from_numpy(pred_boxes[i]),
        }
        for i in range(layers)
    ]
    result = HungarianMatcher.detr().match_layers(outputs, targets)
    idx_digest = sum(int(qi.sum()) * 3 + int(ti.sum()) for layer in result for qi, ti in layer)
    n_pairs = sum(len(qi) for layer in result for qi, _ in layer)

    boxes = ka_rs.box_convert(torch.from_numpy(pred_boxes[0, :5]).reshape(-1, 4), "cxcywh", "xyxy")
    iou_sum = float(ka_rs.box_iou(boxes, boxes).numpy().sum(dtype=np.float64))
    cost = rng.random((200, 180))
    rows, cols = ka_rs.linear_sum_assignment(cost)
    return idx_digest, n_pairs, iou_sum, float(cost[rows, cols].sum())


def _child(queue: mp.Queue, seed: int) -> None:
    queue.put(native_work(seed))


def _run_forked(seed: int) -> tuple[int, int, float, float]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, seed))
    proc.start()
    try:
        result = queue.get(timeout=TIMEOUT_S)
    except Exception:  # queue.Empty: the child hung or died
        result = None
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"forked child still running after {TIMEOUT_S}s: deadlock after fork")
    assert proc.exitcode == 0, f"forked child exited with {proc.exitcode}"
    assert result is not None
    return result


def test_matcher_in_forked_child_after_parent_use():
    expected = native_work(1)  # parent creates its pool first
    assert _run_forked(1) == expected
    assert native_work(1) == expected  # and the parent still works afterwards


def test_fork_while_parent_thread_is_matching():
    """Fork while another parent thread is inside native parallel work (locks may be held)."""
    expected = native_work(2)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            native_work(3)

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        results = [_run_forked(2) for _ in range(3)]
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT_S)
    assert results == [expected] * 3


class _MatchingDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[int, int, float, float]:
        return native_work(10 + i)


def test_matcher_in_dataloader_workers():
    expected = [native_work(10 + i) for i in range(4)]
    loader = DataLoader(
        _MatchingDataset(),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=TIMEOUT_S,  # raises RuntimeError instead of hanging
    )
    got = [tuple(x.item() if isinstance(x, torch.Tensor) else x for x in item) for item in loader]
    assert got == expected

"""Time one amalgamation training step and the share of it spent in ka_rs's CPU work.

The step is :class:`ka_rs.AmalgamationStep` plus backward and an AdamW update, on real teacher
sources (e.g. two ``detr:`` DETR-R50 files, see tools/make_detr_teachers.py) at a given image
size and batch. The pseudo-target call (``build_pseudo_targets``: every teacher, whole batch)
and the matcher (``HungarianMatcher.match_layers``: every decoder layer) are timed inside the
step, device synchronised; their share of the step is what a GPU user wants below ~2 %.
Reports medians over the timed steps (after ``--warmup``), the peak memory (CUDA: allocated;
CPU: the process's max RSS) and the machine's load.

    python benches/bench_step_share.py --teacher a=detr:/tmp/e2e/a.pth@/tmp/e2e/a.txt \\
        --teacher b=detr:/tmp/e2e/b.pth@/tmp/e2e/b.txt --size 800 1333 --batch 2 --amp off
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import ka_rs
import ka_rs.amalgamation.step as step_module
import ka_rs.matcher as matcher_module
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wraps functions and sums the seconds spent in them (device synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", action="append", required=True, metavar="NAME=SOURCE[@CLASSES]"
    )
    parser.add_argument("--size", type=int, nargs=2, default=(512, 853), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    parser.add_argument("--nms-iou", type=float, default=-1.0, help="-1: the paper's (no merge)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    opts = parser.parse_args()
    device = torch.device(opts.device)

    teachers = []
    for spec in opts.teacher:
        name, _, rest = spec.partition("=")
        source, _, classes = rest.partition("@")
        teachers.append(
            ka_rs.load_teacher(source, name=name, classes=classes or None, device=device)
        )
    student = ka_rs.build_amalgamation_student(teachers).to(device)
    step = ka_rs.AmalgamationStep(teachers, student.config, amp=opts.amp, nms_iou=opts.nms_iou)
    step.to(device)
    optimizer = torch.optim.AdamW([*student.parameters(), *step.trainable_parameters()], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if opts.amp == "fp16" else None

    timer = Timer(device)
    step_module.build_pseudo_targets = timer.wrap(
        "pseudo_targets", step_module.build_pseudo_targets
    )
    matcher_module.HungarianMatcher.match_layers = timer.wrap(
        "matcher", matcher_module.HungarianMatcher.match_layers
    )
    gen = torch.Generator().manual_seed(0)
    h, w = opts.size
    images = torch.randn(opts.batch, 3, h, w, generator=gen).to(device)
    mask = torch.zeros(opts.batch, h, w, dtype=torch.bool, device=device)
    mask[1:, :, (3 * w) // 4 :] = True  # the other images padded on the right
    student.train()
    rows = []
    for i in range(opts.warmup + opts.steps):
        timer.seconds.clear()
        _sync(device)
        t0 = time.perf_counter()
        losses = step(student, images, mask)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses["loss"].backward()
            optimizer.step()
        _sync(device)
        total = time.perf_counter() - t0
        if i >= opts.warmup:
            rows.append({"step": total, **timer.seconds, "pseudo": losses["pseudo_per_image"]})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    share = (med["pseudo_targets"] + med["matcher"]) / med["step"]
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "size": [h, w],
        "batch": opts.batch,
        "amp": opts.amp,
        "steps": opts.steps,
        "median_step_s": med["step"],
        "median_pseudo_targets_ms": 1e3 * med["pseudo_targets"],
        "median_matcher_ms": 1e3 * med["matcher"],
        "share_of_step": share,
        "pseudo_targets_per_image": med["pseudo"],
        "peak_memory_gib": peak,
        "loadavg": os.getloadavg(),
        "student_slots": step.num_slots,
    }
    print(json.dumps(result, indent=2))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Accuracy sweep (not a timing): what a pseudo-target threshold leaves of each teacher.

For every teacher checkpoint and threshold, on the shapes ``val`` images:

- candidates per image: queries whose best class probability exceeds the threshold (the
  pseudo-target candidates of docs/method.md §4 step 1, before top-n and NMS);
- the teacher's own AP50 on its classes when only those candidates are kept (the others are
  moved off-image with their score lowered, so they rank last and match nothing) — an upper
  bound of what a student trained on those pseudo-targets can learn.

This is how ``configs/demo.toml`` chose its threshold, e.g. on the demo's cached teachers::

    python benches/pseudo_threshold.py \\
        --teacher teacher_a=~/.cache/ka_rs/teachers/teacher_a-<key>/checkpoint.pt \\
        --teacher teacher_b=~/.cache/ka_rs/teachers/teacher_b-<key>/checkpoint.pt
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from ka_rs.demo import eval_dataset, evaluate_on_test, load_demo_config
from ka_rs.engine.amalgamate import load_teachers
from ka_rs.engine.evaluate import make_eval_loader
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn


class KeepAbove(nn.Module):
    """A sigmoid-head detector whose queries at or below ``threshold`` can match nothing."""

    def __init__(self, model: nn.Module, threshold: float) -> None:
        super().__init__()
        self.model, self.threshold = model, threshold

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        out = self.model(images, mask)
        logits, boxes = out["pred_logits"].clone(), out["pred_boxes"].clone()
        drop = logits.sigmoid().amax(-1) <= self.threshold
        boxes[drop] = torch.tensor([1e-3, 1e-3, 1e-3, 1e-3])  # a corner speck: matches nothing
        logits[drop] -= 20.0  # ranks after every kept detection
        return {"pred_logits": logits, "pred_boxes": boxes}


@torch.no_grad()
def candidates_per_image(model: nn.Module, dataset: Any, thresholds: list[float]) -> list[float]:
    """Mean number of queries per image whose best sigmoid probability exceeds each threshold."""
    counts = [0] * len(thresholds)
    images_seen = 0
    for images, mask, targets in make_eval_loader(dataset, 50):
        best = model(images, mask)["pred_logits"].sigmoid().amax(-1)
        images_seen += len(targets)
        for i, th in enumerate(thresholds):
            counts[i] += int((best > th).sum())
    return [c / max(images_seen, 1) for c in counts]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", action="append", required=True, help="NAME=CHECKPOINT")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--num-images", type=int, default=200, help="val images")
    args = p.parse_args(argv)
    specs = dict(t.split("=", 1) for t in args.teacher)
    teachers = load_teachers(specs)
    if any(t.head != "sigmoid" for t in teachers):
        p.error("--teacher: this sweep is written for sigmoid (focal) teachers")
    cfg = load_demo_config(None)
    cfg.demo.eval_split, cfg.demo.num_eval_images = "val", args.num_images
    dataset = eval_dataset(cfg)

    table = Table(title=f"pseudo-target threshold sweep ({args.num_images} val images)")
    for col in ("teacher", "threshold", "candidates / image", "AP50 kept", "kept / all"):
        table.add_column(col, justify="right")
    for t in teachers:
        cands = candidates_per_image(t.model, dataset, args.thresholds)
        full = evaluate_on_test(t.model, dataset, t.class_names)["AP50"]
        for th, c in zip(args.thresholds, cands, strict=True):
            kept = evaluate_on_test(
                KeepAbove(t.model, th), dataset, t.class_names, class_head="sigmoid"
            )
            ratio = kept["AP50"] / full if full > 0 else float("nan")
            table.add_row(t.name, f"{th:g}", f"{c:.1f}", f"{kept['AP50']:.3f}", f"{ratio:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()

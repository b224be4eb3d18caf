"""PNG figures of the demo and ablation runs (matplotlib, Agg backend; no display needed).

* :func:`plot_loss_curves` — one panel per run (teachers, student): training loss vs step
  (log scale) and validation AP50 vs step on a second axis.
* :func:`plot_ap_per_class` — AP50 (and AP) per class: the teacher that knows the class vs the
  student.
* :func:`plot_detections` — a grid of test images with a detector's detections drawn and
  labelled (class name and score), ground truth as thin dashed boxes.

Figures are written atomically; a failed write (full disk, ...) raises
:class:`~ka_rs.engine.logging.OutputError` naming the PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_ap_per_class", "plot_detections", "plot_loss_curves"]

_COLORS = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#9a6324",
    "#469990",
    "#808000",
]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    title: str = "",
    metric: str = "AP50",
) -> Path:
    """Write one panel per run: training ``loss`` vs step and validation ``metric`` vs step.

    Args:
        runs: ``{run name: metrics.jsonl records}`` (``type`` = ``"train"`` / ``"eval"``).
        path: output PNG.
        title: figure title.
        metric: eval record key drawn on the right axis (union value).
    """
    plt = _plt()
    n = max(1, len(runs))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False)
    for ax, (name, records) in zip(axes[0], runs.items(), strict=False):
        trains = [r for r in records if r.get("type") == "train" and r.get("loss") is not None]
        evals = [r for r in records if r.get("type") == "eval" and r.get(metric) is not None]
        if trains:
            ax.plot([r["step"] for r in trains], [r["loss"] for r in trains], lw=1, color="C0")
            losses = [r["loss"] for r in trains]
            if min(losses) > 0 and max(losses) / min(losses) > 10:
                ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="C0")
        ax.grid(alpha=0.3)
        ax.set_title(name)
        if evals:
            ax2 = ax.twinx()
            xs = [r["step"] for r in evals]
            ys = [max(r[metric], 0.0) for r in evals]
            ax2.plot(xs, ys, marker="o", color="C3", lw=1.5)
            ax2.set_ylim(0, 1)
            ax2.set_ylabel(f"val {metric}", color="C3")
            ax2.annotate(
                f"{ys[-1]:.2f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-8, 6)
            )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_ap_per_class(
    class_names: Sequence[str],
    teacher_ap: Mapping[str, Mapping[str, float]],
    student_ap: Mapping[str, Mapping[str, float]],
    class_teacher: Mapping[str, str],
    path: str | Path,
    title: str = "AP per class: teacher vs student",
) -> Path:
    """Grouped bars per class: AP50 and AP of the class's teacher vs the student.

    Args:
        class_names: classes in display order (the union).
        teacher_ap: ``{class: {"AP": .., "AP50": ..}}`` from the teacher that knows the class.
        student_ap: the same for the student.
        class_teacher: ``{class: teacher name}`` (shown under the class name).
        path: output PNG.
        title: figure title.
    """
    plt = _plt()
    x = np.arange(len(class_names))
    width = max(5.0, 0.75 * len(class_names))
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 3.8))
    for ax, key in zip(axes, ("AP50", "AP"), strict=True):
        t = [max(teacher_ap.get(c, {}).get(key, 0.0), 0.0) for c in class_names]
        s = [max(student_ap.get(c, {}).get(key, 0.0), 0.0) for c in class_names]
        ax.bar(x - 0.2, t, 0.4, label="teacher", color="#999999")
        ax.bar(x + 0.2, s, 0.4, label="student (label-free)", color="#4363d8")
        ax.set_xticks(x)
        ax.set_xticklabels(
            [f"{c}\n({class_teacher.get(c, '')})" for c in class_names], fontsize=7, rotation=0
        )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(key)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(key)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_detections(
    images: Sequence[np.ndarray],
    detections: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    path: str | Path,
    *,
    ground_truth: Sequence[Mapping[str, Any]] | None = None,
    threshold: float = 0.3,
    columns: int = 4,
    title: str = "",
) -> Path:
    """Draw detections on a grid of images.

    Args:
        images: RGB uint8 arrays (H, W, 3), the original (untransformed) images.
        detections: per image ``{"boxes": (D, 4) xyxy pixels, "scores": (D,), "labels": (D,)}``
            (tensors or arrays), as :func:`ka_rs.models.postprocess` returns them.
        class_names: label -> name.
        path: output PNG.
        ground_truth: optional per image ``{"boxes": (T, 4) xyxy pixels}`` drawn dashed white.
        threshold: only detections scoring at least this are drawn.
        columns: grid columns.
        title: figure title.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        ax.imshow(img)
        h, w = img.shape[:2]
        if ground_truth is not None:
            for box in np.asarray(ground_truth[i]["boxes"], dtype=np.float64).reshape(-1, 4):
                x1, y1, x2, y2 = box
                ax.add_patch(
                    Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=0.6, ls="--")
                )
        det = detections[i]
        boxes = np.asarray(_np(det["boxes"]), dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(_np(det["scores"]), dtype=np.float64).reshape(-1)
        labels = np.asarray(_np(det["labels"]), dtype=np.int64).reshape(-1)
        shown = 0
        for box, score, label in zip(boxes, scores, labels, strict=True):
            if score < threshold:
                continue
            x1, y1, x2, y2 = np.clip(box, 0, [w, h, w, h])
            color = _COLORS[int(label) % len(_COLORS)]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.4))
            name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(label)
            ax.text(
                x1,
                max(y1 - 1, 0),
                f"{name} {score:.2f}",
                color="white",
                fontsize=5.5,
                va="bottom",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 0.5, "lw": 0},
            )
            shown += 1
        ax.set_title(f"{shown} detections ≥ {threshold:.2f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def _np(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    """Write ``fig`` atomically (:class:`~ka_rs.engine.logging.OutputError` naming ``path``
    when the write fails) and close it either way."""
    from ka_rs.engine.logging import save_figure

    try:
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)

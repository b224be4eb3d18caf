"""What a demo run leaves behind: ``results.json``, ``report.md``, figures and a rich table.

- :func:`build_results`: every number of the run (evaluations, student/teacher ratios,
  timings, load average, machine, configs) as the ``results.json`` dict;
- :func:`render_report`: ``report.md`` (what ran, the numbers, the figures, the levers used);
- :func:`render_figures`: ``loss_curves.png``, ``ap_per_class.png`` and ``detections.png``
  (drawn by :mod:`ka_rs.engine.plots`);
- :func:`results_table`: the console summary;
- :func:`write_report`: ``results.json`` and ``report.md`` written atomically; a failed write
  (full disk, ...) is a :class:`~ka_rs.engine.logging.OutputError` naming the file, and the
  previous file stays whole.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ka_rs import __version__
from ka_rs.demo.config import DemoConfig
from ka_rs.demo.evaluation import DemoEvaluation
from ka_rs.demo.jobs import resolve_workers
from ka_rs.demo.student import StudentRun
from ka_rs.demo.teachers import TeacherRun
from ka_rs.teachers import Teacher

__all__ = [
    "build_results",
    "load_average",
    "render_figures",
    "render_report",
    "results_table",
    "write_report",
]

_METRICS = ("AP", "AP50", "AP75")


def load_average() -> list[float]:
    """The 1/5/15-minute load average (empty where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None or x < 0 else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------------------------
# results.json


def build_results(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    teachers: Sequence[Teacher],
    evaluation: DemoEvaluation,
    student: StudentRun,
    *,
    timings: Mapping[str, float],
    load: Mapping[str, list[float]],
    figures: Mapping[str, str],
) -> dict[str, Any]:
    """The ``results.json`` dict of a demo run."""
    per_teacher = _per_teacher(teachers, evaluation)
    ens = evaluation.ensemble
    return {
        "ka_rs_version": __version__,
        "mode": "label_free" if cfg.student.amalgamation.mode == "label_free" else "label_assisted",
        "per_teacher": per_teacher,
        "student_union": {k: evaluation.student.subsets["all"][k] for k in _METRICS},
        "ensemble_union": {k: ens.subsets["all"][k] for k in _METRICS} if ens else None,
        "min_ratio_AP50": min(
            (v["ratio_AP50"] for v in per_teacher.values() if v["ratio_AP50"] is not None),
            default=None,
        ),
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "teacher_processes": list(resolve_workers(cfg.demo.workers, len(runs)))
        if any(not r.cached for r in runs)
        else None,
        "teachers": [_teacher_record(r) for r in runs],
        "student": _student_record(student),
        "evaluation": {
            "split": cfg.demo.eval_split,
            "num_images": cfg.demo.num_eval_images,
            "teachers": {k: v.to_dict() for k, v in evaluation.teachers.items()},
            "student": evaluation.student.to_dict(),
            "ensemble": ens.to_dict() if ens else None,
        },
        "load_average": dict(load),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "figures": dict(figures),
        "config": cfg.to_dict(),
    }


def _per_teacher(
    teachers: Sequence[Teacher], evaluation: DemoEvaluation
) -> dict[str, dict[str, Any]]:
    """Per teacher: its classes, its AP and the student's on them, student/teacher ratios."""
    out = {}
    for t in teachers:
        te = evaluation.teachers[t.name].subsets["all"]
        se = evaluation.student.subsets[t.name]
        out[t.name] = {
            "classes": list(t.classes),
            "teacher": {k: te[k] for k in _METRICS},
            "student": {k: se[k] for k in _METRICS},
            "ratio_AP50": _ratio(se["AP50"], te["AP50"]),
            "ratio_AP": _ratio(se["AP"], te["AP"]),
        }
    return out


def _teacher_record(r: TeacherRun) -> dict[str, Any]:
    return {
        "name": r.name,
        "classes": r.classes,
        "checkpoint": str(r.checkpoint),
        "cache_key": r.key,
        "cached": r.cached,
        "steps": r.steps,
        "train_minutes": round(r.train_minutes, 3),
        "wall_seconds": round(r.wall_seconds, 2),
    }


def _student_record(res: StudentRun) -> dict[str, Any]:
    return {
        "run_dir": str(res.output_dir),
        "checkpoint": str(res.checkpoint) if res.checkpoint else None,
        "steps": res.step,
        "train_minutes": round(res.train_minutes, 3),
        "stopped_by": res.stopped_by,
        "processes": res.processes,
    }


# ----------------------------------------------------------------------------------------------
# figures


def render_figures(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    teachers: Sequence[Teacher],
    evaluation: DemoEvaluation,
    student: StudentRun,
    out: Path,
) -> dict[str, str]:
    """Write the run's figures into ``out``; ``{figure: file name}``."""
    from ka_rs.engine.logging import read_metrics
    from ka_rs.engine.plots import plot_ap_per_class, plot_loss_curves

    figures: dict[str, str] = {}
    curves = {f"{r.name} (teacher)": read_metrics(r.run_dir / "metrics.jsonl") for r in runs}
    curves["student"] = read_metrics(student.output_dir / "metrics.jsonl")
    figures["loss_curves"] = plot_loss_curves(
        curves, out / "loss_curves.png", title="training loss and validation AP50"
    ).name
    # a class known to several teachers is shown with the first of them
    class_teacher = {c: t.name for t in reversed(teachers) for c in t.classes}
    teacher_pc: dict[str, dict[str, float]] = {}
    for t in reversed(teachers):
        teacher_pc.update(evaluation.teachers[t.name].per_class)
    union = student.class_names
    figures["ap_per_class"] = plot_ap_per_class(
        union,
        teacher_pc,
        evaluation.student.per_class,
        class_teacher,
        out / "ap_per_class.png",
    ).name
    grid = _detections_grid(student.model, cfg, union, out / "detections.png")
    if grid is not None:
        figures["detections"] = grid.name
    return figures


def _detections_grid(
    model: nn.Module,
    cfg: DemoConfig,
    union: Sequence[str],
    path: Path,
    device: torch.device | str = "cpu",
) -> Path | None:
    """Draw the student's detections on the first ``demo.grid_images`` test images."""
    import numpy as np

    from ka_rs.data import ShapesDataset, make_transforms
    from ka_rs.engine.plots import plot_detections
    from ka_rs.models import postprocess

    n = cfg.demo.grid_images
    if n <= 0:
        return None
    size = cfg.teacher.data.image_size or 128
    raw = ShapesDataset(cfg.demo.eval_split, max(n, 1), image_size=size, seed=cfg.teacher.data.seed)
    tf = make_transforms("val", size, cfg.teacher.data.max_size or round(size * 1333 / 800))
    pics, gts, dets = [], [], []
    names = list(raw.class_names)
    keep = [names.index(c) for c in union]
    model.eval()
    with torch.no_grad():
        for i in range(n):
            image, target = raw.load(i)
            pics.append(np.asarray(image))
            sel = torch.isin(target["labels"], torch.tensor(keep))
            gts.append({"boxes": target["boxes"][sel].numpy()})
            x, t = tf(image, target)
            out = model(x[None].to(device), None)
            head = model.config.class_head
            dets.extend(postprocess(out, t["orig_size"][None].to(device), class_head=head))
    return plot_detections(
        pics,
        dets,
        list(union),
        path,
        ground_truth=gts,
        threshold=cfg.demo.draw_threshold,
        title="student (label-free) on held-out test images — dashed: ground truth",
    )


# ----------------------------------------------------------------------------------------------
# the console table


def results_table(results: Mapping[str, Any]) -> Any:
    """Rich table: per teacher subset, teacher vs student AP50 / AP and the ratio; the union."""
    from rich.table import Table

    table = Table(title=f"ka-rs demo — {results['mode'].replace('_', '-')} student vs teachers")
    for col in ("classes", "model", "AP50", "AP", "AP75", "student/teacher AP50"):
        table.add_column(col, justify="left" if col in ("classes", "model") else "right")
    for name, v in results["per_teacher"].items():
        cls = f"{name}: " + ", ".join(v["classes"])
        ratio = v["ratio_AP50"]
        mark = "" if ratio is None else (" ✓" if ratio >= 0.9 else " ✗")
        table.add_row(cls, "teacher", *_ap_cells(v["teacher"]), "")
        ratio_cell = ("-" if ratio is None else f"{ratio:.2f}") + mark
        table.add_row("", "student", *_ap_cells(v["student"]), ratio_cell, end_section=True)
    table.add_row("union (all classes)", "student", *_ap_cells(results["student_union"]), "")
    e = results.get("ensemble_union")
    if e:
        table.add_row("", "both teachers pooled (ref.)", *_ap_cells(e), "")
    return table


def _ap_cells(m: Mapping[str, float]) -> list[str]:
    """AP50, AP, AP75 cells of the console table."""
    return [f"{m['AP50']:.3f}", f"{m['AP']:.3f}", f"{m['AP75']:.3f}"]


# ----------------------------------------------------------------------------------------------
# report.md


def render_report(results: Mapping[str, Any], cfg: DemoConfig) -> str:
    """``report.md`` of a demo run."""
    lines = [
        *_report_results(results),
        *_report_wall_time(results),
        *_report_figures(results),
        *_report_levers(cfg),
        *_report_extensions(results, cfg),
        "- No ground-truth label reached the student.",
        "",
        "Rerun: `ka-rs demo` (teachers come from the cache); `--fresh` retrains them.",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, results: Mapping[str, Any], cfg: DemoConfig) -> dict[str, Path]:
    """Write ``out/results.json`` and ``out/report.md``; ``{"results": path, "report": path}``.

    Raises:
        OutputError: a write failed (the message names the file and the reason); no partial
            file is left behind.
    """
    import json

    from ka_rs.engine.logging import atomic_write_text

    return {
        "results": atomic_write_text(out / "results.json", json.dumps(results, indent=2)),
        "report": atomic_write_text(out / "report.md", render_report(results, cfg)),
    }


def _report_results(results: Mapping[str, Any]) -> list[str]:
    """The title, what was compared, and the numbers."""
    machine = results["machine"]
    lines = [
        "# ka-rs demo report",
        "",
        f"ka_rs {results['ka_rs_version']}, torch {machine['torch']}, "
        f"{machine['cpus']} CPUs ({machine['torch_threads']} torch threads)"
        f", {machine['platform']}.",
        "",
        "Two teachers were trained on disjoint halves of the embedded shapes classes (each sees "
        "every training image but only its own classes' boxes); a student was then trained from "
        f"the frozen teachers **{results['mode'].replace('_', '-')}** "
        "(no ground-truth labels: the teachers are its only supervision) with sequence-level "
        "(SA) and task-level (TA) amalgamation. Numbers are COCO AP on "
        f"{results['evaluation']['num_images']} held-out `{results['evaluation']['split']}` "
        "images that no model trained on or was validated on.",
        "",
        "## Results",
        "",
        "| classes | teacher AP50 | student AP50 | student / teacher | teacher AP | student AP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in results["per_teacher"].items():
        r = v["ratio_AP50"]
        lines.append(
            f"| {name}: {', '.join(v['classes'])} | {_fmt(v['teacher']['AP50'])} | "
            f"{_fmt(v['student']['AP50'])} | {'-' if r is None else f'{r:.2f}'} | "
            f"{_fmt(v['teacher']['AP'])} | {_fmt(v['student']['AP'])} |"
        )
    u = results["student_union"]
    lines += [
        "",
        f"Student on the union of all classes: AP50 {_fmt(u['AP50'])}, AP {_fmt(u['AP'])}, "
        f"AP75 {_fmt(u['AP75'])}.",
    ]
    e = results.get("ensemble_union")
    if e:
        lines.append(
            f"Reference (not a baseline): both teachers run side by side with pooled detections "
            f"(twice the compute of one model): AP50 {_fmt(e['AP50'])}, AP {_fmt(e['AP'])}."
        )
    return lines


def _report_wall_time(results: Mapping[str, Any]) -> list[str]:
    """Seconds per stage, whether the teachers came from the cache, the load average."""
    cached = [x["name"] for x in results["teachers"] if x["cached"]]
    return [
        "",
        "## Wall time",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.0f} |" for k, v in results["timings_seconds"].items()),
        "",
        f"Teachers reused from the cache: {', '.join(cached) if cached else 'none (cold start)'}."
        f" Load average (1/5/15 min) at start {results['load_average'].get('start')}, "
        f"at the end {results['load_average'].get('end')}.",
        "",
    ]


def _report_figures(results: Mapping[str, Any]) -> list[str]:
    lines = ["## Figures", ""]
    for label, key in (
        ("Training loss and validation AP50", "loss_curves"),
        ("AP per class, teacher vs student", "ap_per_class"),
        ("Student detections on test images", "detections"),
    ):
        if key in results["figures"]:
            lines += [f"### {label}", "", f"![{label}]({results['figures'][key]})", ""]
    return lines


def _report_levers(cfg: DemoConfig) -> list[str]:
    """The detector, the teachers' and the student's budgets, the amalgamation losses."""
    tc, sc = cfg.teacher, cfg.student
    a = sc.amalgamation
    return [
        "## What ran (and the levers used to fit a 2-core CPU)",
        "",
        f"- Detector: the `{tc.model.preset}` preset (anchor-box queries refined per decoder "
        "layer, sigmoid/focal class head: converges much faster than plain DETR on a CPU), "
        f"images of {tc.data.image_size} px"
        + (f", model overrides {tc.model.overrides}." if tc.model.overrides else "."),
        f"- Teachers: {tc.train.max_steps or 'unlimited'} steps of batch {tc.train.batch_size}, "
        f"AdamW lr {tc.optim.lr:g}, ×{tc.optim.lr_gamma:g} at step(s) {tc.optim.lr_drop}.",
        f"- Student: {sc.train.max_steps or 'unlimited'} steps of batch {sc.train.batch_size}, "
        f"AdamW lr {sc.optim.lr:g}, ×{sc.optim.lr_gamma:g} at step(s) {sc.optim.lr_drop} "
        "(the lr decays before the final evaluation; AP at a constant lr moves by ±0.05)"
        + (
            f"; the teachers' architecture with {a.student} for the student."
            if a.student
            else "; the teachers' architecture."
        ),
        f"- Losses: SA {'on' if a.sa else 'off'}, TA {'on' if a.ta else 'off'}, aggregation "
        f"{'on' if a.aggregation else 'off'}, cross-slot attention "
        f"{'on' if a.cross_slot_attention else 'off'}; pseudo-targets threshold {a.threshold}, "
        f"top-{a.top_n}, fill logit {a.fill_logit}, T = {a.temperature}.",
    ]


def _report_extensions(results: Mapping[str, Any], cfg: DemoConfig) -> list[str]:
    """The student's initialisation, the worker processes and the teacher cache, as used."""
    sc = cfg.student
    a = sc.amalgamation
    lines = []
    if a.init_from:
        lines.append(
            f"- **Extension beyond the paper:** the student starts from teacher `{a.init_from}`'s "
            "weights (backbone, encoder, decoder, box head; its input projection copied into every "
            "slot; class-head rows copied from the teacher that knows each class), so it begins "
            f"as a copy of `{a.init_from}` and must learn the other teacher's classes from the "
            "amalgamation losses. The paper initialises the student from scratch/ImageNet."
        )
    procs = results.get("teacher_processes")
    if procs and procs[0] > 1:
        lines.append(
            f"- The teachers trained side by side in {procs[0]} processes with {procs[1]} torch "
            "thread(s) each (small models use processes far better than intra-op threads)."
        )
    sprocs = results.get("student", {}).get("processes", 1)
    if sprocs > 1:
        lines.append(
            f"- The student trained data-parallel (DDP, gloo) in {sprocs} processes of "
            f"{sc.train.batch_size // sprocs} images per step each: the same global batch of "
            f"{sc.train.batch_size}."
        )
    if a.cache_teachers:
        lines.append(
            "- Teacher cache: the student's training images were labelled once by the teachers "
            "(predictions and SA sequences kept in memory) and the student trained on those "
            "fixed images without augmentation; the teachers did not run during its training."
        )
    else:
        lines.append(
            "- The teachers ran live on every student batch (same augmented images as the student)."
        )
    return lines

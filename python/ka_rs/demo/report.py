"""What a demo run leaves behind: ``results.json``, ``report.md``, figures and a rich table.

- :func:`build_results`: every number of the run (evaluations, student/teacher ratios,
  timings, load average, machine, configs) as the ``results.json`` dict, for the first
  student seed (:func:`~ka_rs.demo.seeds.seed_statistics` then adds every seed and turns the
  student's numbers into means ± sd);
- :func:`render_report`: ``report.md`` (what ran on which split, the numbers — mean ± sd and
  every seed's when there are several —, the figures, the levers used);
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
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ka_rs import __version__
from ka_rs.demo.config import DemoConfig
from ka_rs.demo.evaluation import DemoEvaluation
from ka_rs.demo.jobs import resolve_workers
from ka_rs.demo.student import StudentRun
from ka_rs.demo.teachers import TeacherRun
from ka_rs.engine.amp import cpu_has_native_bf16, cpu_model_name, effective_amp
from ka_rs.teachers import Teacher

if TYPE_CHECKING:
    from ka_rs.models import DETR

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
            "cpu_model": cpu_model_name(),
            "native_bf16": cpu_has_native_bf16(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "precision": {
            role: {
                "amp": effective_amp(c.train.amp, c.train.device),
                "fused_adamw": c.optim.fused,
            }
            for role, c in (("teachers", cfg.teacher), ("student", cfg.student))
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
    *,
    student_per_class: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, str]:
    """Write the run's figures into ``out``; ``{figure: file name}``.

    ``student_per_class`` (per class AP / AP50, the mean over the student seeds; default: the
    first seed's) is drawn in ``ap_per_class.png``; the loss curves and ``detections.png`` show
    the first seed's student, and every title says which.
    """
    from ka_rs.engine.logging import read_metrics
    from ka_rs.engine.plots import plot_ap_per_class, plot_loss_curves

    figures: dict[str, str] = {}
    curves = {f"{r.name} (teacher)": read_metrics(r.run_dir / "metrics.jsonl") for r in runs}
    seed = cfg.student.train.seed
    curves[f"student (seed {seed})"] = read_metrics(student.output_dir / "metrics.jsonl")
    figures["loss_curves"] = plot_loss_curves(
        curves, out / "loss_curves.png", title="training loss and validation AP50"
    ).name
    # a class known to several teachers is shown with the first of them
    class_teacher = {c: t.name for t in reversed(teachers) for c in t.classes}
    teacher_pc: dict[str, dict[str, float]] = {}
    for t in reversed(teachers):
        teacher_pc.update(evaluation.teachers[t.name].per_class)
    union = student.class_names
    k = cfg.demo.seeds
    figures["ap_per_class"] = plot_ap_per_class(
        union,
        teacher_pc,
        evaluation.student.per_class if student_per_class is None else student_per_class,
        class_teacher,
        out / "ap_per_class.png",
        title=f"AP per class on '{cfg.demo.eval_split}' images: teacher vs student "
        + (
            f"(mean over {k} seeds)"
            if k > 1 and student_per_class is not None
            else f"(seed {seed})"
        ),
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
            head = cast("DETR", model).config.class_head  # the student: a ka_rs DETR
            dets.extend(postprocess(out, t["orig_size"][None].to(device), class_head=head))
    return plot_detections(
        pics,
        dets,
        list(union),
        path,
        ground_truth=gts,
        threshold=cfg.demo.draw_threshold,
        title=f"student (label-free, seed {cfg.student.train.seed}"
        + (f", 1 of {cfg.demo.seeds} seeds" if cfg.demo.seeds > 1 else "")
        + f") on '{cfg.demo.eval_split}' images — dashed: ground truth",
    )


# ----------------------------------------------------------------------------------------------
# the console table


def results_table(results: Mapping[str, Any]) -> Any:
    """Rich table: per teacher subset, teacher vs student AP50 / AP and the ratio; the union.

    With several student seeds the student's cells and the ratio are mean ± sample sd.
    """
    from rich.table import Table

    k = results.get("num_seeds", 1)
    ev = results["evaluation"]
    table = Table(
        title=f"ka-rs demo — {results['mode'].replace('_', '-')} student vs "
        f"{len(results['per_teacher'])} teachers; {ev['num_images']} `{ev['split']}` images"
        + (f"; student: mean ± sd over {k} seeds" if k > 1 else "")
    )
    for col in ("classes", "model", "AP50", "AP", "AP75", "student/teacher AP50"):
        table.add_column(col, justify="left" if col in ("classes", "model") else "right")
    for name, v in results["per_teacher"].items():
        cls = f"{name}: " + ", ".join(v["classes"])
        ratio = v["ratio_AP50"]
        mark = "" if ratio is None else (" ✓" if ratio >= 0.9 else " ✗")
        table.add_row(cls, "teacher", *_ap_cells(v["teacher"]), "")
        ratio_cell = _mean_sd(ratio, v.get("ratio_AP50_sd"), 2) + mark
        student_cells = _ap_cells(v["student"], v.get("student_sd"))
        table.add_row("", "student", *student_cells, ratio_cell, end_section=True)
    union = _ap_cells(results["student_union"], results.get("student_union_sd"))
    table.add_row("union (all classes)", "student", *union, "")
    e = results.get("ensemble_union")
    if e:
        table.add_row(
            "", f"{len(results['per_teacher'])} teachers pooled (ref.)", *_ap_cells(e), ""
        )
    return table


def _mean_sd(mean: float | None, sd: float | None, nd: int = 3) -> str:
    """``"0.480 ± 0.012"`` (``"0.480"`` without an sd, ``"-"`` when missing)."""
    if mean is None or mean < 0:
        return "-"
    return f"{mean:.{nd}f}" + ("" if sd is None else f" ± {sd:.{nd}f}")


def _ap_cells(m: Mapping[str, float], sd: Mapping[str, float | None] | None = None) -> list[str]:
    """AP50, AP, AP75 cells of the console table (``± sd`` where ``sd`` gives one)."""
    sd = sd or {}
    return [_mean_sd(m[k], sd.get(k)) for k in ("AP50", "AP", "AP75")]


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
    """The title, what was compared (teachers, split, images, seeds), and the numbers."""
    machine = results["machine"]
    per_teacher = results["per_teacher"]
    n = len(per_teacher)
    k = results.get("num_seeds", 1)
    seeds = results.get("seeds", [])
    ev = results["evaluation"]
    pooled = f"{n} teachers pooled, ref."
    lines = [
        "# ka-rs demo report",
        "",
        f"ka_rs {results['ka_rs_version']}, torch {machine['torch']}, "
        f"{machine['cpus']} CPUs"
        + (f" ({machine['cpu_model']})" if machine.get("cpu_model") else "")
        + f", {machine['torch_threads']} torch threads, {machine['platform']}"
        + _precision_sentence(results)
        + " Figures depend on the machine, the torch build, the precision and the seeds (the "
        "teachers' AP most of all): another machine gives other digits; compare the "
        "student/teacher ratios.",
        "",
        f"{_teachers_sentence(results)} A student was then trained from "
        f"the frozen teachers **{results['mode'].replace('_', '-')}** "
        "(no ground-truth labels: the teachers are its only supervision) with sequence-level "
        "(SA) and task-level (TA) amalgamation"
        + (
            f", once per student seed: **{k} seeds** ({', '.join(map(str, seeds))}); student "
            "numbers are the mean ± sample sd over them, the teachers are one run each."
            if k > 1
            else f", one student seed ({seeds[0] if seeds else '?'}): differences below "
            "~0.02-0.03 AP50 are within run-to-run noise (`--seeds 3` reports mean ± sd)."
        ),
        "",
        f"Numbers are COCO AP on {ev['num_images']} `{ev['split']}` images: "
        + (
            "the validation split, the one to choose settings on (the students' periodic "
            "validation read its first images; no checkpoint was selected on them)."
            if ev["split"] == "val"
            else "the held-out test split, which no model trained on or was validated on; "
            "report only, never choose settings on it."
        ),
        "",
        f"## Results (`{ev['split']}` split, {k} student seed{'s' if k != 1 else ''})",
        "",
        "| classes | teacher AP50 | student AP50 | student / teacher | teacher AP | student AP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in per_teacher.items():
        sd = v.get("student_sd") or {}
        lines.append(
            f"| {name}: {', '.join(v['classes'])} | {_fmt(v['teacher']['AP50'])} | "
            f"{_mean_sd(v['student']['AP50'], sd.get('AP50'))} | "
            f"{_mean_sd(v['ratio_AP50'], v.get('ratio_AP50_sd'), 2)} | "
            f"{_fmt(v['teacher']['AP'])} | {_mean_sd(v['student']['AP'], sd.get('AP'))} |"
        )
    u = results["student_union"]
    usd = results.get("student_union_sd") or {}
    e = results.get("ensemble_union")
    classes = list(dict.fromkeys(c for v in per_teacher.values() for c in v["classes"]))
    ratio = None if not e or not e["AP50"] or e["AP50"] <= 0 else u["AP50"] / e["AP50"]
    lines.append(
        f"| union ({len(classes)} classes) | "
        + (f"{_fmt(e['AP50'])} ({pooled})" if e else "-")
        + f" | {_mean_sd(u['AP50'], usd.get('AP50'))} | {_mean_sd(ratio, None, 2)} | "
        + (_fmt(e["AP"]) if e else "-")
        + f" | {_mean_sd(u['AP'], usd.get('AP'))} |"
    )
    lines += [
        "",
        f"Student on the union of all classes: AP50 {_mean_sd(u['AP50'], usd.get('AP50'))}, "
        f"AP {_mean_sd(u['AP'], usd.get('AP'))}, AP75 {_mean_sd(u['AP75'], usd.get('AP75'))}.",
    ]
    if e:
        lines.append(
            f"Reference (not a baseline): the {n} teachers run side by side with pooled "
            f"detections ({n} times the compute of one model): AP50 {_fmt(e['AP50'])}, "
            f"AP {_fmt(e['AP'])}."
        )
    if k > 1:
        lines += [
            "",
            "Every seed (student AP50 per teacher's classes and on the union):",
            "",
            "| seed | " + " | ".join(per_teacher) + " | union | source |",
            "|---:|" + "---:|" * (n + 1) + "---|",
        ]
        for i, rec in enumerate(results.get("students", [])):
            cells = [_fmt(v["student_per_seed"]["AP50"][i]) for v in per_teacher.values()]
            cells.append(_fmt(results["student_union_per_seed"]["AP50"][i]))
            lines.append(f"| {rec['seed']} | " + " | ".join(cells) + f" | {rec['source']} |")
    return lines


def _teachers_sentence(results: Mapping[str, Any]) -> str:
    """How many teachers, on which classes of which split, and which classes they share."""
    per_teacher = results["per_teacher"]
    split = results.get("config", {}).get("demo", {}).get("split", "")
    owners: dict[str, list[str]] = {}
    for name, v in per_teacher.items():
        for c in v["classes"]:
            owners.setdefault(c, []).append(name)
    shared = {c: ts for c, ts in owners.items() if len(ts) > 1}
    words = {2: "Two", 3: "Three", 4: "Four"}
    text = (
        f"{words.get(len(per_teacher), str(len(per_teacher)))} teachers were trained on the "
        f"`{split}` split of the embedded shapes classes ("
        + "; ".join(f"{t}: {', '.join(v['classes'])}" for t, v in per_teacher.items())
        + "); each sees every training image but only its own classes' boxes."
    )
    if shared:
        nms = results.get("config", {}).get("student", {}).get("amalgamation", {}).get("nms_iou")
        merged = (
            f"merged by class-aware NMS (IoU > {nms:g})"
            if nms is not None and nms >= 0
            else "kept (no NMS: nms_iou < 0)"
        )
        text += (
            " Classes known to several teachers ("
            + "; ".join(f"{c}: {', '.join(ts)}" for c, ts in shared.items())
            + f") get one index in the student's label space, and their duplicate "
            f"pseudo-targets are {merged}."
        )
    else:
        text += " The teachers' classes are disjoint."
    return text


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


def _precision_sentence(results: Mapping[str, Any]) -> str:
    """``; teachers in bf16 ..., student in ...`` from ``results["precision"]`` (older
    results without it: ``.``)."""
    prec = results.get("precision")
    if not prec:
        return "."
    names = {"off": "float32", "bf16": "bf16 forwards", "fp16": "fp16 forwards"}
    parts = [
        f"{role} {names.get(p['amp'], p['amp'])}"
        + (" + fused AdamW" if p["fused_adamw"] != "off" else "")
        for role, p in prec.items()
    ]
    native = results["machine"].get("native_bf16")
    cpu = {True: " (native bf16)", False: " (no native bf16)"}.get(native, "")
    return f"{cpu}; {', '.join(parts)}."


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
        "- Student layout: "
        + (
            "**compact** (an extension beyond the paper): the encoder and decoder see one "
            "teacher's token count, the teachers' input chunks merged by a learnt gate, SA "
            "through per-teacher linear views used in training only; inference costs about "
            'one teacher (`student_layout = "slots"` is the paper\'s N-slot student).'
            if a.student_layout == "compact"
            else "N-slot (the paper's): one token slot per SA teacher in the encoder."
        ),
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
            f"as a copy of `{a.init_from}` and must learn the other teachers' classes from the "
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

"""``ka-rs demo``: teachers on parts of the shapes classes, one label-free student (K seeds).

Steps (each timed; the total is the demo's wall time):

1. **Teachers** (:mod:`ka_rs.demo.teachers`): one per part of the ``demo.split`` preset (two on
   disjoint halves by default; ``--teachers 3``: three on overlapping thirds), trained once and
   cached by config (``--fresh`` retrains), side by side in worker processes
   (:mod:`ka_rs.demo.jobs`).
2. **Student** (:mod:`ka_rs.demo.student`): :func:`~ka_rs.engine.amalgamate.amalgamate` trains
   an N-slot student from the frozen teachers with SA + TA and **no labels** (label-free mode;
   the method is described in ``docs/method.md``). With ``demo.seeds = K > 1`` (``--seeds``)
   K − 1 more students with other seeds follow (:mod:`ka_rs.demo.seeds`).
3. **Evaluation** (:mod:`ka_rs.demo.evaluation`) on the ``demo.eval_split`` images: each teacher
   on its classes, every student on the union and on each teacher's classes (COCO AP / AP50 /
   AP75), plus — as a reference, not a baseline — the teachers pooled. The headline numbers
   are means ± sd over the student seeds.
4. **Report** (:mod:`ka_rs.demo.report`): a rich table, and the run folder::

       report.md          what ran, the figures, the numbers, the levers used
       results.json       every number (evaluations, per-seed values, ratios, timings, configs)
       loss_curves.png    training loss and validation AP50 of the teachers and the student
       ap_per_class.png   AP50 / AP per class: the class's teacher vs the student (seed mean)
       detections.png     test images with the first seed's detections drawn and labelled
       student/           the amalgamation run folder (config, metrics, checkpoint, eval)
       student-seed<s>/   the other seeds' run folders (when trained here)

The configuration is :mod:`ka_rs.demo.config`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ka_rs.demo.config import DemoConfig
from ka_rs.demo.evaluation import DemoEvaluation, evaluate_demo
from ka_rs.demo.jobs import student_processes
from ka_rs.demo.report import (
    build_results,
    load_average,
    render_figures,
    results_table,
    write_report,
)
from ka_rs.demo.seeds import mean_per_class, seed_record, seed_statistics, train_extra_seeds
from ka_rs.demo.stats import student_seeds
from ka_rs.demo.student import StudentRun, student_config, train_student, write_student_cache
from ka_rs.demo.teachers import TeacherRun, default_cache_dir, ensure_teachers
from ka_rs.engine.amalgamate import load_teachers
from ka_rs.engine.amalgamate_config import AmalgamateConfig

__all__ = ["run_demo"]


class _Clock:
    """Wall time per stage (``timings``) and the load average at named points (``load``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.load: dict[str, list[float]] = {"start": load_average()}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0

    def finish(self) -> None:
        self.timings["total"] = time.perf_counter() - self.start
        self.load["end"] = load_average()


def run_demo(
    cfg: DemoConfig,
    output: str | Path,
    cache_dir: str | Path | None = None,
    *,
    fresh: bool = False,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Run the whole demo (see the module docstring); return the ``results.json`` dict."""
    from rich.console import Console

    console = console or Console()
    clock = _Clock()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()

    def say(msg: str) -> None:
        console.print(f"[bold cyan]demo[/] {msg}")

    say(f"run folder {out}, teacher cache {cache}, torch threads {torch.get_num_threads()}")
    with clock.stage("teachers"):
        runs = ensure_teachers(cfg, cache, fresh=fresh, progress=progress, log=say, console=console)
    clock.load["after_teachers"] = load_average()

    teachers = load_teachers({r.name: str(r.checkpoint) for r in runs})
    seeds = student_seeds(cfg.demo.seeds, cfg.student.train.seed)
    scfg, processes, threads = _student_setup(cfg, runs, out, progress, say, len(seeds))
    with clock.stage("student"):
        student = train_student(
            scfg, teachers, processes, threads, progress=progress, console=console
        )
    clock.load["after_student"] = load_average()

    with clock.stage("evaluation"):
        union, subsets = student.class_names, student.subsets
        evaluation = evaluate_demo(cfg, teachers, student.model, union, subsets)
    first = seed_record(
        seeds[0],
        "trained",
        evaluation.student.to_dict(),
        student.output_dir,
        student.step,
        student.train_minutes,
    )
    extra: list[dict[str, Any]] = []
    if len(seeds) > 1:
        with clock.stage("student_seeds"):
            extra = train_extra_seeds(
                cfg,
                runs,
                scfg,
                seeds[1:],
                out,
                cache,
                reuse=not fresh,
                progress=progress,
                say=say,
                console=console,
            )
        clock.load["after_student_seeds"] = load_average()
    records = [first, *extra]
    with clock.stage("figures"):
        figures = render_figures(
            cfg, runs, teachers, evaluation, student, out, student_per_class=mean_per_class(records)
        )
    clock.finish()

    results = build_results(
        cfg,
        runs,
        teachers,
        evaluation,
        student,
        timings=clock.timings,
        load=clock.load,
        figures=figures,
    )
    results = seed_statistics(results, records)
    _write_run(out, cache, cfg, scfg, runs, results, evaluation, student)
    console.print(results_table(results))
    t = clock.timings
    say(
        f"done in {t['total'] / 60:.1f} min "
        f"(teachers {t['teachers'] / 60:.1f}, student {t['student'] / 60:.1f}); "
        f"load average {clock.load['end']}; report: {out / 'report.md'}"
    )
    return results


def _student_setup(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    out: Path,
    progress: bool,
    say: Callable[[str], None],
    num_seeds: int = 1,
) -> tuple[AmalgamateConfig, int, int]:
    """The (first seed's) student config (into ``out/student``) and ``(processes, threads)``;
    say how."""
    scfg = student_config(cfg, runs, out / "student")
    scfg.train.progress = progress
    processes, threads = student_processes(cfg.demo.student_processes, scfg.train.batch_size)
    how = (
        f"{processes} DDP processes x {threads} torch thread(s), "
        f"{scfg.train.batch_size // processes} images each per step"
        if processes > 1
        else f"{threads} torch thread(s)"
    )
    seeds = (
        f"; seed {scfg.train.seed}, then {num_seeds - 1} more seed(s) -> student-seed<s>/"
        if num_seeds > 1
        else ""
    )
    say(
        f"student: amalgamating {', '.join(r.name for r in runs)} (label-free; {how}) "
        f"-> student/{seeds}"
    )
    return scfg, processes, threads


def _write_run(
    out: Path,
    cache: Path,
    cfg: DemoConfig,
    scfg: AmalgamateConfig,
    runs: Sequence[TeacherRun],
    results: dict[str, Any],
    evaluation: DemoEvaluation,
    student: StudentRun,
) -> None:
    """The (first seed's) student cache entry (for ``ka-rs ablate``), ``results.json`` and
    ``report.md``."""
    record = {
        "eval": evaluation.student.to_dict(),
        "run_dir": student.output_dir,
        "steps": student.step,
        "train_minutes": student.train_minutes,
    }
    write_student_cache(cache, scfg, runs, cfg.demo, record, processes=student.processes)
    write_report(out, results, cfg)

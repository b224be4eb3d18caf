"""``ka-rs ablate``: which amalgamation losses matter, on the demo's teachers and budget.

Every variant starts from the same cached teachers (:func:`~ka_rs.demo.teachers.ensure_teachers`)
and trains a student with the demo's student config, changing only the losses:

=================  ===========================================================================
``ta``             TA only (no sequence-level term)
``sa_ta``          SA + TA (the demo's student; the paper's method)
``aggregation_ta`` the prior-KA "aggregation" hint (one-slot student, learnt N·d→d fusion,
                   projection trained) + TA
``sa_ta_cross``    SA + TA with cross-slot attention in the encoder
=================  ===========================================================================

Each is evaluated on the demo's held-out images (AP, AP50, AP75 on the union and on each
teacher's classes). A variant whose exact config was already trained and evaluated (e.g. the
demo's SA + TA student) is reused from the cache unless ``reuse=False``. Results go to
``ablation.json`` and ``ablation.md`` in the run folder; nothing here is tuned per variant.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ka_rs.demo.config import DemoConfig, _demo_from_dict
from ka_rs.demo.evaluation import eval_dataset, evaluate_on_test, evaluate_teachers
from ka_rs.demo.jobs import Job, resolve_workers, run_jobs, worker_setup
from ka_rs.demo.report import load_average
from ka_rs.demo.student import read_student_cache, student_config, write_student_cache
from ka_rs.demo.teachers import TeacherRun, default_cache_dir, ensure_teachers
from ka_rs.engine.amalgamate import amalgamate, load_teachers
from ka_rs.engine.amalgamate_config import AmalgamateConfig

__all__ = ["VARIANTS", "ablation_markdown", "ablation_table", "run_ablation"]

#: variant name -> (description, student.amalgamation overrides)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ta": ("TA only", ("amalgamation.sa=false", "amalgamation.aggregation=false")),
    "sa_ta": ("SA + TA", ("amalgamation.sa=true", "amalgamation.aggregation=false")),
    "aggregation_ta": (
        "aggregation + TA",
        ("amalgamation.sa=false", "amalgamation.aggregation=true"),
    ),
    "sa_ta_cross": (
        "SA + TA, cross-slot attention",
        (
            "amalgamation.sa=true",
            "amalgamation.aggregation=false",
            "amalgamation.cross_slot_attention=true",
        ),
    ),
}


def run_ablation(
    cfg: DemoConfig,
    output: str | Path,
    cache_dir: str | Path | None = None,
    *,
    variants: Sequence[str] | None = None,
    progress: bool = True,
    reuse: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Train and evaluate every variant; write ``ablation.json`` / ``ablation.md``; return rows."""
    from rich.console import Console

    console = console or Console()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    names = list(variants or VARIANTS)
    t_start = time.perf_counter()
    load = {"start": load_average()}

    def say(msg: str) -> None:
        console.print(f"[bold magenta]ablate[/] {msg}")

    runs = ensure_teachers(cfg, cache, progress=progress, log=say, console=console)
    rows, todo = _plan(cfg, runs, names, out, cache if reuse else None, say)
    if todo:
        results = _train_variants(todo, cfg, progress, say, console)
        for (name, scfg), info in zip(todo, results, strict=True):
            write_student_cache(
                cache,
                scfg,
                runs,
                cfg.demo,
                evaluation=info["eval"],
                run_dir=info["run_dir"],
                steps=info["steps"],
                train_minutes=info["train_minutes"],
            )
            rows[name] = _row(name, "trained", info)
    load["end"] = load_average()
    results = _ablation_results(cfg, runs, [rows[n] for n in names], load, t_start)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    (out / "ablation.md").write_text(ablation_markdown(results))
    console.print(ablation_table(results))
    say(f"done in {results['total_seconds'] / 60:.1f} min; table: {out / 'ablation.md'}")
    return results


def _plan(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    names: Sequence[str],
    out: Path,
    cache: Path | None,
    say: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, AmalgamateConfig]]]:
    """Each variant's student config; ``(rows reused from the cache, variants to train)``."""
    rows: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, AmalgamateConfig]] = []
    for name in names:
        scfg = student_config(cfg, runs, out / name, VARIANTS[name][1])
        info = read_student_cache(cache, scfg, runs, cfg.demo) if cache else None
        if info is not None:
            say(f"{VARIANTS[name][0]}: reusing the cached identical run {info.get('run_dir', '')}")
            rows[name] = _row(name, f"reused {info.get('run_dir', '')}", info)
        else:
            todo.append((name, scfg))
    return rows, todo


def _train_variants(
    todo: Sequence[tuple[str, AmalgamateConfig]],
    cfg: DemoConfig,
    progress: bool,
    say: Callable[[str], None],
    console: Any,
) -> list[dict[str, Any]]:
    """Train and evaluate the variants: here one by one, or side by side in worker processes."""
    processes, threads = resolve_workers(cfg.demo.workers, len(todo))
    say(
        f"training {len(todo)} variant(s) ({processes} process(es) x {threads} torch "
        f"thread(s)): {', '.join(VARIANTS[n][0] for n, _ in todo)}"
    )
    if processes == 1:
        results = []
        for name, scfg in todo:
            scfg.train.progress = progress
            say(f"{VARIANTS[name][0]}: training -> {scfg.train.output_dir}")
            results.append(_train_and_evaluate(scfg, cfg))
        return results
    jobs = []
    for name, scfg in todo:
        scfg.train.progress = False
        Path(scfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        jobs.append(
            Job(
                label=VARIANTS[name][0],
                fn=_job_amalgamate,
                kwargs={
                    "cfg_dict": scfg.to_dict(),
                    "demo_dict": cfg.to_dict(),
                    "log_path": str(Path(scfg.train.output_dir) / "train.log"),
                },
                metrics=Path(scfg.train.output_dir) / "metrics.jsonl",
                total_steps=scfg.train.max_steps or 0,
            )
        )
    return run_jobs(jobs, processes, threads, progress=progress, console=console)


def _train_and_evaluate(scfg: AmalgamateConfig, cfg: DemoConfig) -> dict[str, Any]:
    """Train one variant's student and evaluate it on the demo's held-out images."""
    t0 = time.perf_counter()
    res = amalgamate(scfg, keep_model=True)
    assert res.model is not None
    ev = evaluate_on_test(res.model, eval_dataset(cfg), res.class_names, res.subsets)
    return {
        "eval": ev.to_dict(),
        "run_dir": str(res.output_dir),
        "steps": res.step,
        "train_minutes": res.train_minutes,
        "seconds": time.perf_counter() - t0,
    }


def _job_amalgamate(
    cfg_dict: dict[str, Any], demo_dict: dict[str, Any], threads: int, log_path: str
) -> dict[str, Any]:
    """Worker process: one ablation variant (see :func:`run_ablation`)."""
    worker_setup(log_path, threads)
    scfg = AmalgamateConfig.from_dict(cfg_dict)
    return _train_and_evaluate(scfg, _demo_from_dict(demo_dict, "demo config"))


def _row(name: str, source: str, info: dict[str, Any]) -> dict[str, Any]:
    """One variant's row of ``ablation.json``."""
    desc = VARIANTS[name][0]
    return {
        "variant": name,
        "description": desc,
        "source": source,
        "steps": info.get("steps"),
        "train_minutes": info.get("train_minutes"),
        "seconds": round(float(info.get("seconds", 0.0)), 1),
        "subsets": {
            k: {m: v[m] for m in ("AP", "AP50", "AP75")} for k, v in info["eval"]["subsets"].items()
        },
    }


def _ablation_results(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    rows: list[dict[str, Any]],
    load: dict[str, list[float]],
    t_start: float,
) -> dict[str, Any]:
    """The ``ablation.json`` dict: the rows, each teacher on its own classes for reference."""
    teachers = load_teachers({r.name: str(r.checkpoint) for r in runs})
    teacher_evals = evaluate_teachers(teachers, eval_dataset(cfg))
    teacher_ref = {}
    for name, ev in teacher_evals.items():
        te = ev.subsets["all"]
        teacher_ref[name] = {m: te[m] for m in ("AP", "AP50", "AP75")}
    return {
        "rows": rows,
        "teachers": [r.name for r in runs],
        "teacher_reference": teacher_ref,
        "eval": {"split": cfg.demo.eval_split, "num_images": cfg.demo.num_eval_images},
        "student_budget": {
            "max_steps": cfg.student.train.max_steps,
            "batch_size": cfg.student.train.batch_size,
            "init_from": cfg.student.amalgamation.init_from,
        },
        "load_average": load,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "config": cfg.to_dict(),
    }


def _f(x: float | None) -> str:
    return "-" if x is None or x < 0 else f"{x:.3f}"


def _columns(results: dict[str, Any]) -> list[str]:
    return [*results["teachers"], "all"]


def ablation_markdown(results: dict[str, Any]) -> str:
    """The ablation table as markdown (AP50 / AP per teacher subset and on the union)."""
    cols = _columns(results)
    head = "| variant | " + " | ".join(
        f"{'union' if c == 'all' else c} AP50 | {'union' if c == 'all' else c} AP" for c in cols
    )
    lines = [
        "# ka-rs ablate",
        "",
        f"Same teachers and student budget ({results['student_budget']['max_steps']} steps of "
        f"batch {results['student_budget']['batch_size']}, init from "
        f"`{results['student_budget']['init_from'] or 'scratch'}`) for every variant; label-free; "
        f"{results['eval']['num_images']} held-out `{results['eval']['split']}` images. "
        "Single seed: differences below ~0.02-0.03 AP50 are within run-to-run noise.",
        "",
        head + " |",
        "|---|" + "---:|" * (2 * len(cols)),
    ]
    for row in results["rows"]:
        cells = []
        for c in cols:
            s = row["subsets"].get(c, {})
            cells += [_f(s.get("AP50")), _f(s.get("AP"))]
        lines.append(f"| {row['description']} | " + " | ".join(cells) + " |")
    ref = results.get("teacher_reference", {})
    if ref:
        cells = []
        for c in cols:
            s = ref.get(c, {})
            cells += [_f(s.get("AP50")), _f(s.get("AP"))]
        lines.append("| *teacher (own classes)* | " + " | ".join(cells) + " |")
    lines += ["", f"Load average: {results['load_average']}.", ""]
    return "\n".join(lines)


def ablation_table(results: dict[str, Any]) -> Any:
    """The ablation table as a rich Table."""
    from rich.table import Table

    cols = _columns(results)
    table = Table(title="ka-rs ablate (label-free students, same teachers and budget)")
    table.add_column("variant")
    for c in cols:
        label = "union" if c == "all" else c
        table.add_column(f"{label} AP50", justify="right")
        table.add_column(f"{label} AP", justify="right")
    for row in results["rows"]:
        cells = []
        for c in cols:
            s = row["subsets"].get(c, {})
            cells += [_f(s.get("AP50")), _f(s.get("AP"))]
        table.add_row(row["description"], *cells)
    ref = results.get("teacher_reference", {})
    if ref:
        cells = []
        for c in cols:
            s = ref.get(c, {})
            cells += [_f(s.get("AP50")), _f(s.get("AP"))]
        table.add_row("teacher (own classes)", *cells, style="dim")
    return table

"""The demo's student seeds: ``ka-rs demo --seeds K`` trains K students and reports mean ± sd.

The first seed (the config's ``student.train.seed``) is the demo's student as with one seed:
trained in this process (or ``demo.student_processes`` DDP workers) into ``<run>/student/``,
its model drawn in ``detections.png``. The other K − 1 seeds
(:func:`~ka_rs.demo.stats.student_seeds`) train side by side in worker processes into
``<run>/student-seed<seed>/`` (:func:`train_extra_seeds`), each evaluated on the same
``demo.eval_split`` images; a seed whose identical run is in the student cache (an earlier
``ka-rs demo --seeds`` or the ablation's SA + TA variant) is reused unless ``--fresh``.

:func:`seed_statistics` then turns the per-seed evaluations into the headline numbers of
``results.json``: per teacher the student's mean AP, its sample sd and every seed's value, and
the student/teacher ratio likewise (the teachers are one run each); the same for the union.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ka_rs.demo.config import DemoConfig
from ka_rs.demo.stats import summarize
from ka_rs.demo.student import (
    read_student_cache,
    seeded_config,
    train_and_evaluate_many,
    write_student_cache,
)
from ka_rs.demo.teachers import TeacherRun
from ka_rs.engine.amalgamate_config import AmalgamateConfig

__all__ = ["mean_per_class", "seed_record", "seed_statistics", "train_extra_seeds"]

_METRICS = ("AP", "AP50", "AP75")


def seed_record(
    seed: int,
    source: str,
    evaluation: Mapping[str, Any],
    run_dir: str | Path,
    steps: int | None,
    train_minutes: float | None,
) -> dict[str, Any]:
    """One student seed of ``results.json["students"]``: its evaluation (subsets, per class)."""
    return {
        "seed": seed,
        "source": source,
        "run_dir": str(run_dir),
        "steps": steps,
        "train_minutes": None if train_minutes is None else round(float(train_minutes), 3),
        "evaluation": {
            "subsets": {k: {m: v[m] for m in _METRICS} for k, v in evaluation["subsets"].items()},
            "per_class": dict(evaluation.get("per_class", {})),
        },
    }


def train_extra_seeds(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    scfg: AmalgamateConfig,
    seeds: Sequence[int],
    out: Path,
    cache: Path,
    *,
    reuse: bool = True,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Train (or reuse from ``cache``) the demo's student ``scfg`` with each of ``seeds`` into
    ``out/student-seed<seed>``; their :func:`seed_record` s in ``seeds``' order."""
    say = say or (lambda _msg: None)
    records: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, AmalgamateConfig]] = []
    for seed in seeds:
        s_cfg = seeded_config(scfg, seed, out / f"student-seed{seed}")
        info = read_student_cache(cache, s_cfg, runs, cfg.demo) if reuse else None
        if info is not None:
            say(f"student seed {seed}: reusing the cached identical run {info.get('run_dir', '')}")
            records[seed] = seed_record(
                seed,
                f"reused {info.get('run_dir', '')}",
                info["eval"],
                info.get("run_dir", ""),
                info.get("steps"),
                info.get("train_minutes"),
            )
        else:
            todo.append((seed, s_cfg))
    if todo:
        labels = [(f"student seed {seed}", s_cfg) for seed, s_cfg in todo]
        infos = train_and_evaluate_many(labels, cfg, progress=progress, say=say, console=console)
        for (seed, s_cfg), info in zip(todo, infos, strict=True):
            write_student_cache(cache, s_cfg, runs, cfg.demo, info)
            records[seed] = seed_record(
                seed,
                "trained",
                info["eval"],
                info["run_dir"],
                info["steps"],
                info["train_minutes"],
            )
    return [records[s] for s in seeds]


def mean_per_class(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per class, AP and AP50 averaged over the seeds' evaluations (a missing value, −1, is
    left out of its class's mean; a class missing for every seed is −1)."""
    out: dict[str, dict[str, float]] = {}
    classes = list(records[0]["evaluation"]["per_class"]) if records else []
    for c in classes:
        out[c] = {}
        for m in ("AP", "AP50"):
            vals = [r["evaluation"]["per_class"].get(c, {}).get(m) for r in records]
            kept = [float(v) for v in vals if v is not None and v >= 0]
            out[c][m] = sum(kept) / len(kept) if kept else -1.0
    return out


def _ratio(student: float | None, teacher: float | None) -> float | None:
    if student is None or teacher is None or student < 0 or teacher <= 0:
        return None
    return round(student / teacher, 4)


def seed_statistics(
    results: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """``results`` (from :func:`~ka_rs.demo.report.build_results`, the first seed's numbers)
    with the student's numbers over all ``records`` (one per seed, the first seed first).

    Adds ``seeds``, ``num_seeds`` and ``students`` (every seed's record). Per teacher:
    ``student`` becomes the mean over seeds, ``student_sd`` the sample sd (``None`` for one
    seed), ``student_per_seed`` every seed's value; ``ratio_AP50`` / ``ratio_AP`` become the mean
    of the per-seed student/teacher ratios, with ``ratio_AP50_sd`` / ``ratio_AP_sd`` and
    ``ratio_AP50_per_seed`` / ``ratio_AP_per_seed``. ``student_union`` likewise (with
    ``student_union_sd`` / ``student_union_per_seed``); ``min_ratio_AP50`` is the smallest
    mean ratio.
    """
    res = copy.deepcopy(dict(results))
    res["seeds"] = [int(r["seed"]) for r in records]
    res["num_seeds"] = len(records)
    res["students"] = [dict(r) for r in records]
    for name, v in res["per_teacher"].items():
        stats = {
            m: summarize([r["evaluation"]["subsets"][name][m] for r in records]) for m in _METRICS
        }
        v["student"] = {m: s["mean"] for m, s in stats.items()}
        v["student_sd"] = {m: s["sd"] for m, s in stats.items()}
        v["student_per_seed"] = {
            m: [r["evaluation"]["subsets"][name][m] for r in records] for m in _METRICS
        }
        for m in ("AP50", "AP"):
            ratios = [_ratio(x, v["teacher"][m]) for x in v["student_per_seed"][m]]
            s = summarize(ratios)
            v[f"ratio_{m}"] = s["mean"]
            v[f"ratio_{m}_sd"] = s["sd"]
            v[f"ratio_{m}_per_seed"] = ratios
    union = {
        m: summarize([r["evaluation"]["subsets"]["all"][m] for r in records]) for m in _METRICS
    }
    res["student_union"] = {m: s["mean"] for m, s in union.items()}
    res["student_union_sd"] = {m: s["sd"] for m, s in union.items()}
    res["student_union_per_seed"] = {
        m: [r["evaluation"]["subsets"]["all"][m] for r in records] for m in _METRICS
    }
    res["min_ratio_AP50"] = min(
        (v["ratio_AP50"] for v in res["per_teacher"].values() if v["ratio_AP50"] is not None),
        default=None,
    )
    return res

"""The demo's student: amalgamated from the cached teachers, its result cached for the ablation.

:func:`train_student` runs :func:`~ka_rs.engine.amalgamate.amalgamate` in this process, or in
``demo.student_processes`` data-parallel worker processes (DDP over gloo, each with
``batch_size / n`` images per step so that the global batch stays the same).

:func:`train_and_evaluate_many` trains several independent students (the demo's extra seeds,
the ablation's variants × seeds), side by side in worker processes, each evaluated on the
demo's held-out images; :func:`seeded_config` gives a student config its seed and folder.

:func:`write_student_cache` remembers a trained student's evaluation under
``<cache>/students/<key>/result.json``, keyed by its config (its seed ``train.seed``
included), the teachers and the evaluation set (:func:`student_key`): ``ka-rs ablate`` reuses
the demo's SA + TA runs from there, seed by seed.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ka_rs import __version__
from ka_rs.demo.config import DemoConfig, DemoSettings, _demo_from_dict
from ka_rs.demo.jobs import Job, resolve_workers, run_jobs, worker_setup
from ka_rs.demo.teachers import TeacherRun
from ka_rs.engine.amalgamate import amalgamate
from ka_rs.engine.amalgamate_config import (
    AmalgamateConfig,
    apply_amalgamate_overrides,
    config_hash,
)
from ka_rs.engine.amp import effective_amp
from ka_rs.teachers import Teacher

__all__ = [
    "StudentRun",
    "read_student_cache",
    "seeded_config",
    "student_config",
    "student_key",
    "train_and_evaluate",
    "train_and_evaluate_many",
    "train_student",
    "write_student_cache",
]


def student_config(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    output_dir: str | Path,
    overrides: Sequence[str] = (),
) -> AmalgamateConfig:
    """The demo's student config (plus ``overrides``) with the demo's teachers, writing to
    ``output_dir``; images of the teachers' size unless the student sets one."""
    scfg = (
        apply_amalgamate_overrides(cfg.student, overrides)
        if overrides
        else copy.deepcopy(cfg.student)
    )
    scfg.teachers = {r.name: str(r.checkpoint) for r in runs}
    scfg.train.output_dir = str(output_dir)
    if not scfg.data.image_size:
        scfg.data.image_size = cfg.teacher.data.image_size
    return scfg


def seeded_config(scfg: AmalgamateConfig, seed: int, output_dir: str | Path) -> AmalgamateConfig:
    """A copy of ``scfg`` with student seed ``train.seed = seed``, writing to ``output_dir``."""
    out = copy.deepcopy(scfg)
    out.train.seed = int(seed)
    out.train.output_dir = str(output_dir)
    return out


@dataclass
class StudentRun:
    """The demo's trained student: its model (eval mode) and what its run reported."""

    model: nn.Module
    output_dir: Path
    checkpoint: Path | None
    stopped_by: str
    step: int
    train_minutes: float
    class_names: list[str]
    subsets: dict[str, list[str]]
    processes: int

    @classmethod
    def from_summary(
        cls, model: nn.Module, summary: Mapping[str, Any], processes: int
    ) -> StudentRun:
        """Build from :func:`_run_summary`'s dict."""
        return cls(
            model,
            Path(summary["output_dir"]),
            Path(summary["checkpoint"]) if summary["checkpoint"] else None,
            str(summary["stopped_by"]),
            int(summary["step"]),
            float(summary["train_minutes"]),
            list(summary["class_names"]),
            dict(summary["subsets"]),
            processes,
        )


def _run_summary(res: Any) -> dict[str, Any]:
    """What :class:`StudentRun` needs of an ``AmalgamationResult``, as picklable primitives."""
    return {
        "output_dir": str(res.output_dir),
        "checkpoint": str(res.checkpoint) if res.checkpoint else None,
        "stopped_by": res.stopped_by,
        "step": res.step,
        "train_minutes": res.train_minutes,
        "class_names": list(res.class_names),
        "subsets": {k: list(v) for k, v in res.subsets.items()},
    }


def train_student(
    scfg: AmalgamateConfig,
    teachers: Sequence[Teacher],
    processes: int,
    threads: int,
    *,
    progress: bool = True,
    console: Any = None,
) -> StudentRun:
    """Amalgamate the demo's student in this process or in ``processes`` DDP workers."""
    from ka_rs.engine.amalgamate import load_student

    if processes == 1:
        res = amalgamate(scfg, teachers=teachers, keep_model=True)
        assert res.model is not None
        return StudentRun.from_summary(res.model, _run_summary(res), 1)
    out = Path(scfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _rank_jobs(scfg, processes, out)
    summary = run_jobs(jobs, processes, threads, progress=progress, console=console)[0]
    if not summary or not summary.get("checkpoint"):
        raise RuntimeError(f"student: rank 0 wrote no checkpoint; log: {out / 'train.log'}")
    return StudentRun.from_summary(load_student(summary["checkpoint"]).model, summary, processes)


def _rank_jobs(scfg: AmalgamateConfig, processes: int, out: Path) -> list[Job]:
    """One :class:`Job` per DDP rank, each with ``batch_size / processes`` images per step."""
    per_rank = copy.deepcopy(scfg)
    per_rank.train.batch_size = scfg.train.batch_size // processes
    per_rank.train.progress = False
    port = _free_port()
    return [
        Job(
            label=f"student (process {rank + 1}/{processes})",
            fn=_job_amalgamate_rank,
            kwargs={
                "cfg_dict": per_rank.to_dict(),
                "rank": rank,
                "world": processes,
                "port": port,
                "log_path": str(out / ("train.log" if rank == 0 else f"train_rank{rank}.log")),
            },
            metrics=out / "metrics.jsonl",  # rank 0 writes it; the ranks step together
            total_steps=scfg.train.max_steps or 0,
        )
        for rank in range(processes)
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _job_amalgamate_rank(
    cfg_dict: dict[str, Any], rank: int, world: int, port: int, threads: int, log_path: str
) -> dict[str, Any] | None:
    """Worker process: rank ``rank`` of a ``world``-process data-parallel student run."""
    worker_setup(log_path, threads)
    # torchrun's environment, read by ka_rs.engine.distributed.init_distributed
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    res = amalgamate(AmalgamateConfig.from_dict(cfg_dict))
    return _run_summary(res) if rank == 0 else None


# ----------------------------------------------------------------------------------------------
# several independent students (extra seeds, ablation variants), each evaluated


def train_and_evaluate(scfg: AmalgamateConfig, cfg: DemoConfig) -> dict[str, Any]:
    """Train one student (its teachers from ``scfg.teachers``) and evaluate it on the demo's
    ``demo.eval_split`` images: ``{"eval", "run_dir", "steps", "train_minutes", "seconds"}``."""
    from ka_rs.demo.evaluation import eval_dataset, evaluate_on_test

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


def train_and_evaluate_many(
    todo: Sequence[tuple[str, AmalgamateConfig]],
    cfg: DemoConfig,
    *,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    console: Any = None,
) -> list[dict[str, Any]]:
    """:func:`train_and_evaluate` every ``(label, config)`` of ``todo``: here one after the
    other (``demo.workers = 1``) or side by side in worker processes, each logging to its
    ``<output_dir>/train.log``. Results in ``todo``'s order."""
    say = say or (lambda _msg: None)
    processes, threads = resolve_workers(cfg.demo.workers, len(todo))
    say(
        f"training {len(todo)} student(s) ({processes} process(es) x {threads} torch "
        f"thread(s)): {', '.join(label for label, _ in todo)}"
    )
    if processes == 1:
        results = []
        for label, scfg in todo:
            scfg.train.progress = progress
            say(f"{label}: training -> {scfg.train.output_dir}")
            results.append(train_and_evaluate(scfg, cfg))
        return results
    jobs = []
    for label, scfg in todo:
        scfg.train.progress = False
        Path(scfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        jobs.append(
            Job(
                label=label,
                fn=_job_train_and_evaluate,
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


def _job_train_and_evaluate(
    cfg_dict: dict[str, Any], demo_dict: dict[str, Any], threads: int, log_path: str
) -> dict[str, Any]:
    """Worker process: one student of :func:`train_and_evaluate_many`."""
    worker_setup(log_path, threads)
    scfg = AmalgamateConfig.from_dict(cfg_dict)
    return train_and_evaluate(scfg, _demo_from_dict(demo_dict, "demo config"))


# ----------------------------------------------------------------------------------------------
# the student result cache (read by ``ka-rs ablate`` and by the demo's extra seeds)


def student_key(
    cfg: AmalgamateConfig,
    runs: Sequence[TeacherRun],
    demo: DemoSettings,
    processes: int = 1,
) -> str:
    """Cache key of a student result: its config (the student seed ``train.seed`` included, so
    each seed has its own entry), the process count it trained with (DDP sees other batches
    than one process), the teachers' keys and the evaluation set (split and image count)."""
    d = cfg.to_dict()
    d.pop("teachers", None)
    d["train"]["amp"] = effective_amp(d["train"]["amp"], d["train"]["device"])
    for section in ("train",):
        for k in ("output_dir", "progress", "plot", "device", "num_workers", "log_every_steps"):
            d[section].pop(k, None)
    return config_hash(
        {
            "student": d,
            "teachers": [r.key for r in runs],
            "eval": [demo.eval_split, demo.num_eval_images],
            "version": __version__,
            **({"processes": processes} if processes != 1 else {}),
        }
    )


def write_student_cache(
    cache: Path,
    scfg: AmalgamateConfig,
    runs: Sequence[TeacherRun],
    demo: DemoSettings,
    record: Mapping[str, Any],
    *,
    processes: int = 1,
) -> None:
    """Remember a student's evaluation (``ka-rs ablate`` reuses the demo's SA + TA runs).

    ``record`` holds the run's ``eval`` (an evaluation dict), ``run_dir``, ``steps`` and
    ``train_minutes`` — what :func:`read_student_cache` returns and what a trained run's
    summary already is; other keys are not stored.
    """
    key = student_key(scfg, runs, demo, processes)
    d = cache / "students" / key
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(
        json.dumps(
            {
                "eval": dict(record["eval"]),
                "run_dir": str(record["run_dir"]),
                "steps": record["steps"],
                "train_minutes": record["train_minutes"],
            },
            indent=2,
        )
    )


def read_student_cache(
    cache: Path, scfg: AmalgamateConfig, runs: Sequence[TeacherRun], demo: DemoSettings
) -> dict[str, Any] | None:
    """The cached result of a one-process student with exactly this config, if any."""
    path = cache / "students" / student_key(scfg, runs, demo) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None

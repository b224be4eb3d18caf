"""The demo's student: amalgamated from the cached teachers, its result cached for the ablation.

:func:`train_student` runs :func:`~ka_rs.engine.amalgamate.amalgamate` in this process, or in
``demo.student_processes`` data-parallel worker processes (DDP over gloo, each with
``batch_size / n`` images per step so that the global batch stays the same).

:func:`write_student_cache` remembers a trained student's test evaluation under
``<cache>/students/<key>/result.json``, keyed by its config, the teachers and the evaluation
set (:func:`student_key`): ``ka-rs ablate`` reuses the demo's SA + TA run from there.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ka_rs import __version__
from ka_rs.demo.config import DemoConfig, DemoSettings
from ka_rs.demo.jobs import Job, run_jobs, worker_setup
from ka_rs.demo.teachers import TeacherRun
from ka_rs.engine.amalgamate import amalgamate
from ka_rs.engine.amalgamate_config import (
    AmalgamateConfig,
    apply_amalgamate_overrides,
    config_hash,
)
from ka_rs.teachers import Teacher

__all__ = [
    "StudentRun",
    "read_student_cache",
    "student_config",
    "student_key",
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
# the student result cache (read by ``ka-rs ablate``)


def student_key(
    cfg: AmalgamateConfig,
    runs: Sequence[TeacherRun],
    demo: DemoSettings,
    processes: int = 1,
) -> str:
    """Cache key of a student result: its config, the process count it trained with (DDP
    sees other batches than one process), the teachers' keys and the evaluation set."""
    d = cfg.to_dict()
    d.pop("teachers", None)
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
    *,
    evaluation: Mapping[str, Any],
    run_dir: str | Path,
    steps: int,
    train_minutes: float,
    processes: int = 1,
) -> None:
    """Remember a student's test evaluation (``ka-rs ablate`` reuses the demo's SA + TA run)."""
    key = student_key(scfg, runs, demo, processes)
    d = cache / "students" / key
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(
        json.dumps(
            {
                "eval": dict(evaluation),
                "run_dir": str(run_dir),
                "steps": steps,
                "train_minutes": train_minutes,
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

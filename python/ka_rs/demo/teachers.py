"""The demo's teachers: trained once per config, cached, reused.

One teacher per part of the ``demo.split`` preset (default ``shapes-halves``:
circle/square/triangle/star vs cross/ring/diamond/crescent). Each teacher sees every training
image but only its own classes' boxes (the paper's protocol).

Trained teachers are cached under ``<cache>/teachers/<name>-<key>/``, the key a hash of their
training config and the ka_rs version (:func:`teacher_key`), so a second ``ka-rs demo`` reuses
them. A folder with ``done.json`` is a finished teacher; one with only ``checkpoint.pt`` (an
interrupted run) resumes; ``fresh`` deletes and retrains. Teachers that need training run side
by side in worker processes (:mod:`ka_rs.demo.jobs`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ka_rs import __version__
from ka_rs.demo.config import DemoConfig
from ka_rs.demo.jobs import Job, resolve_workers, run_jobs, worker_setup
from ka_rs.engine.amalgamate_config import config_hash
from ka_rs.engine.amp import effective_amp
from ka_rs.engine.config import Config

__all__ = ["TeacherRun", "default_cache_dir", "ensure_teachers", "teacher_key"]

#: Run-only settings that do not change the trained teacher, left out of its cache key.
_IGNORED_FOR_CACHE = (
    "train.output_dir",
    "train.progress",
    "train.plot",
    "train.device",
    "train.num_workers",
    "train.log_every_steps",
)


def default_cache_dir() -> Path:
    """``$KA_RS_CACHE`` or ``$XDG_CACHE_HOME/ka_rs`` or ``~/.cache/ka_rs``."""
    env = os.environ.get("KA_RS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ka_rs"


def teacher_key(cfg: DemoConfig, name: str) -> str:
    """Cache key of teacher ``name``: hash of its training config (``train.amp = "auto"`` as the
    mode it means on this machine) and the ka_rs version."""
    tcfg = cfg.teacher_config(name, "-").to_dict()
    tcfg["train"]["amp"] = effective_amp(tcfg["train"]["amp"], tcfg["train"]["device"])
    kept = {
        s: {k: v for k, v in sec.items() if f"{s}.{k}" not in _IGNORED_FOR_CACHE}
        for s, sec in tcfg.items()
    }
    return config_hash({"teacher": kept, "version": __version__})


@dataclass
class TeacherRun:
    """A demo teacher: where its checkpoint is and how it was obtained."""

    name: str
    classes: list[str]
    checkpoint: Path
    run_dir: Path
    key: str
    cached: bool
    train_minutes: float
    wall_seconds: float
    steps: int


@dataclass
class _Pending:
    """A teacher to train: its place in the split, its folder and config."""

    pos: int
    name: str
    classes: list[str]
    key: str
    run_dir: Path
    cfg: Config
    resume: bool


def ensure_teachers(
    cfg: DemoConfig,
    cache_dir: str | Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    workers: int | None = None,
    console: Any = None,
) -> list[TeacherRun]:
    """Train (or reuse from ``cache_dir``) one teacher per part of ``cfg.demo.split``.

    A cached teacher is used when its folder holds ``done.json``; a folder with only a
    ``checkpoint.pt`` (an interrupted run) is resumed; ``fresh`` deletes and retrains.
    Teachers that need training run side by side in worker processes (``demo.workers``,
    default: one per teacher up to the CPU count; their logs go to ``<run>/train.log``).
    """
    from ka_rs.data import get_split

    say = log or (lambda _msg: None)
    runs: list[TeacherRun | None] = []
    todo: list[_Pending] = []
    for name, classes in get_split(cfg.demo.split).items():
        key = teacher_key(cfg, name)
        run_dir = Path(cache_dir) / "teachers" / f"{name}-{key}"
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        cached = _cached_run(name, list(classes), key, run_dir)
        if cached is not None:
            say(f"teacher {name}: cached ({run_dir})")
            runs.append(cached)
            continue
        tcfg = cfg.teacher_config(name, run_dir)
        if device:
            tcfg.train.device = device
        resume = (run_dir / "checkpoint.pt").is_file()
        todo.append(_Pending(len(runs), name, list(classes), key, run_dir, tcfg, resume))
        runs.append(None)
    if todo:
        workers = cfg.demo.workers if workers is None else workers
        processes, threads = resolve_workers(workers, len(todo))
        if processes == 1:
            summaries = _train_here(todo, progress, say)
        else:
            summaries = _train_in_workers(todo, processes, threads, progress, say, console)
        for p, summary in zip(todo, summaries, strict=True):
            runs[p.pos] = _record_done(p, summary)
    return [r for r in runs if r is not None]


def _cached_run(name: str, classes: list[str], key: str, run_dir: Path) -> TeacherRun | None:
    """The finished teacher in ``run_dir`` (``done.json`` and ``checkpoint.pt``), if any."""
    done, ckpt = run_dir / "done.json", run_dir / "checkpoint.pt"
    if not (done.is_file() and ckpt.is_file()):
        return None
    info = json.loads(done.read_text())
    return TeacherRun(
        name,
        classes,
        ckpt,
        run_dir,
        key,
        True,
        float(info.get("train_minutes", 0.0)),
        0.0,
        int(info.get("step", 0)),
    )


def _record_done(p: _Pending, summary: dict[str, Any]) -> TeacherRun:
    """Mark a freshly trained teacher finished (``done.json``) and describe it."""
    (p.run_dir / "done.json").write_text(json.dumps({**summary, "version": __version__}, indent=2))
    return TeacherRun(
        p.name,
        p.classes,
        p.run_dir / "checkpoint.pt",
        p.run_dir,
        p.key,
        False,
        float(summary["train_minutes"]),
        float(summary["wall_seconds"]),
        int(summary["step"]),
    )


def train_one_teacher(cfg: Config, resume: bool) -> dict[str, Any]:
    """Train (or resume) one teacher; its summary for ``done.json`` (step, minutes, eval)."""
    from ka_rs.engine.train import train_teacher

    t0 = time.perf_counter()
    result = train_teacher(cfg, resume=True if resume else None)
    return {
        "step": result.state.step,
        "train_minutes": result.state.train_minutes,
        "stopped_by": result.stopped_by,
        "final_eval": dict(result.final_eval),
        "wall_seconds": time.perf_counter() - t0,
    }


def _train_here(
    todo: Sequence[_Pending], progress: bool, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Train the teachers one after the other in this process."""
    summaries = []
    for p in todo:
        say(f"teacher {p.name}: training on {', '.join(p.classes)} -> {p.run_dir}")
        p.cfg.train.progress = progress
        summaries.append(train_one_teacher(p.cfg, p.resume))
    return summaries


def _train_in_workers(
    todo: Sequence[_Pending],
    processes: int,
    threads: int,
    progress: bool,
    say: Callable[[str], None],
    console: Any,
) -> list[dict[str, Any]]:
    """Train the teachers side by side, one worker process each (:func:`run_jobs`)."""
    say(
        f"training {len(todo)} teachers side by side ({processes} processes x "
        f"{threads} torch thread(s)): "
        + "; ".join(f"{p.name} on {', '.join(p.classes)}" for p in todo)
    )
    jobs = []
    for p in todo:
        p.run_dir.mkdir(parents=True, exist_ok=True)
        p.cfg.train.progress = False
        jobs.append(
            Job(
                label=f"teacher {p.name}",
                fn=_job_train_teacher,
                kwargs={
                    "cfg_dict": p.cfg.to_dict(),
                    "resume": p.resume,
                    "log_path": str(p.run_dir / "train.log"),
                },
                metrics=p.run_dir / "metrics.jsonl",
                total_steps=p.cfg.train.max_steps or 0,
            )
        )
    return run_jobs(jobs, processes, threads, progress=progress, console=console)


def _job_train_teacher(
    cfg_dict: dict[str, Any], resume: bool, threads: int, log_path: str
) -> dict[str, Any]:
    """Worker process: train one teacher (see :func:`ensure_teachers`)."""
    worker_setup(log_path, threads)
    return train_one_teacher(Config.from_dict(cfg_dict), resume)

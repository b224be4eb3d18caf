"""The process pool: independent trainings side by side in spawned worker processes.

The demo trains its teachers, the ablation its variants and (optionally) the student's DDP
ranks as :class:`Job` s of :func:`run_jobs`. Each job runs ``fn(**kwargs, threads=...)`` in a
worker process whose output goes to the job's log file; this process shows one progress bar
per job, read from the job's ``metrics.jsonl``. Small models use several processes far better
than intra-op threads, hence :func:`resolve_workers` shares the cores out as processes.

A worker entry point (a module-level function, so that ``spawn`` can import it) starts with
:func:`worker_setup`: log redirection, the torch thread count, and exiting with its parent.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ka_rs.engine.config import ConfigError

__all__ = ["Job", "resolve_workers", "run_jobs", "student_processes", "worker_setup"]


def resolve_workers(workers: int, num_jobs: int) -> tuple[int, int]:
    """``(processes, torch threads each)`` for ``num_jobs`` independent trainings.

    ``workers = 0`` (auto): one process per job up to the CPU count, the cores shared out as
    threads (small models scale far better over processes than over intra-op threads);
    ``1``: in this process, torch's own thread setting.
    """
    cpus = os.cpu_count() or 1
    n = min(num_jobs, cpus) if workers == 0 else min(workers, max(num_jobs, 1))
    n = max(1, n)
    return n, max(1, cpus // n)


def student_processes(setting: int, batch_size: int) -> tuple[int, int]:
    """``(processes, torch threads each)`` for the demo's student (``demo.student_processes``).

    Raises:
        ConfigError: a setting below 1, or a batch that does not split over the processes.
    """
    if setting < 1:
        raise ConfigError(f"demo.student_processes: must be >= 1, got {setting}")
    if batch_size % setting:
        raise ConfigError(
            f"demo.student_processes: student.train.batch_size {batch_size} does not split "
            f"evenly over {setting} processes"
        )
    if setting == 1:
        return 1, torch.get_num_threads()
    return setting, max(1, (os.cpu_count() or 1) // setting)


# ----------------------------------------------------------------------------------------------
# inside a worker


def _exit_with_parent(poll_seconds: float = 2.0) -> None:
    """Stop this worker process when the process that spawned it is gone.

    Ctrl-C reaches the whole process group, but a SIGTERM or SIGKILL sent to the demo process
    alone (a job scheduler, ``kill``) would otherwise leave its workers training as orphans,
    holding the CPUs. A daemon thread polls the parent pid (re-parenting changes it).
    """
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="ka_rs-exit-with-parent", daemon=True).start()


def _redirect_output(log_path: str) -> None:
    """Worker-process setup: send stdout and stderr to ``log_path``; exit with the parent."""
    _exit_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def worker_setup(log_path: str, threads: int) -> None:
    """First call of a worker entry point: output to ``log_path``, ``threads`` torch threads,
    exit when the parent process is gone."""
    _redirect_output(log_path)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# the pool


@dataclass
class Job:
    """One training run for :func:`run_jobs`: ``fn(**kwargs)`` in a worker process."""

    label: str
    fn: Any
    kwargs: dict[str, Any]
    metrics: Path
    total_steps: int


def run_jobs(
    jobs: Sequence[Job],
    processes: int,
    threads: int,
    *,
    progress: bool = True,
    console: Any = None,
) -> list[Any]:
    """Run ``jobs`` in ``processes`` spawned workers (``threads`` torch threads each).

    Each job's output goes to its ``log_path``; this process shows one progress bar per job,
    read from the job's ``metrics.jsonl`` (step, loss, last validation AP50). Returns the jobs'
    results in order; a failed job raises ``RuntimeError`` naming it and its log.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from ka_rs.engine.logging import make_progress

    results: list[Any] = [None] * len(jobs)
    ctx = mp.get_context("spawn")
    with (
        cf.ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool,
        make_progress(enabled=progress) as bar,
    ):
        futures = {}
        tasks = {}
        for i, job in enumerate(jobs):
            futures[pool.submit(job.fn, **job.kwargs, threads=threads)] = i
            tasks[i] = bar.add_task(job.label, total=job.total_steps)
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=2.0)
            for i, job in enumerate(jobs):
                step, info = _job_progress(job)
                bar.update(tasks[i], completed=min(step, job.total_steps), info=info)
            for fut in done:
                i = futures[fut]
                results[i] = _job_result(fut, jobs[i])
                bar.update(tasks[i], completed=jobs[i].total_steps)
                if console is not None and not progress:
                    console.print(f"  {jobs[i].label}: done")
    return results


def _job_progress(job: Job) -> tuple[int, str]:
    """``(step, "loss … img/s  AP50 …")`` of a running job, from its ``metrics.jsonl``."""
    from ka_rs.engine.logging import read_metrics

    try:
        recs = read_metrics(job.metrics) if job.metrics.is_file() else []
    except (OSError, ValueError):
        recs = []
    train = [r for r in recs if r.get("type") == "train"]
    evals = [r for r in recs if r.get("type") == "eval" and "AP50" in r]
    info = ""
    if train:
        info = f"loss {train[-1]['loss']:.3f}  {train[-1].get('img_per_s', 0):.0f} img/s"
    if evals:
        info += f"  AP50 {evals[-1]['AP50']:.3f}"
    step = train[-1]["step"] if train else 0
    return step, info


def _job_result(fut: Any, job: Job) -> Any:
    """A finished job's result; its exception re-raised as one naming the job and its log."""
    try:
        return fut.result()
    except Exception as exc:
        log_path = job.kwargs.get("log_path", "")
        raise RuntimeError(
            f"{job.label}: failed in its worker process ({exc}); log: {log_path}"
        ) from exc

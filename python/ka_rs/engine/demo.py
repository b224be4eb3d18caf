"""``ka-rs demo``: two teachers on disjoint halves of the shapes classes, one label-free student.

Steps (each timed; the total is the demo's wall time):

1. **Teachers.** Train one teacher per part of the ``demo.split`` preset (default
   ``shapes-halves``: circle/square/triangle/star vs cross/ring/diamond/crescent). Each
   teacher sees every training image but only its own classes' boxes (the paper's protocol).
   Trained teachers are cached under ``<cache>/teachers/<name>-<hash>/`` keyed by a hash of
   their config (and the ka_rs version), so a second ``ka-rs demo`` reuses them; an
   interrupted teacher run resumes. ``--fresh`` retrains.
2. **Student.** :func:`~ka_rs.engine.amalgamate.amalgamate` trains an N-slot student from the
   frozen teachers with SA + TA and **no labels** (label-free mode).
3. **Evaluation** on the held-out ``demo.eval_split`` images: each teacher on its classes, the
   student on the union and on each teacher's classes (COCO AP / AP50 / AP75), plus — as a
   reference, not a baseline — both teachers run together with their detections pooled.
4. **Report**: a rich table, and the run folder::

       report.md          what ran, the figures, the numbers, the levers used
       results.json       every number (evaluations, ratios, timings, load average, configs)
       loss_curves.png    training loss and validation AP50 of the teachers and the student
       ap_per_class.png   AP50 / AP per class: the class's teacher vs the student
       detections.png     test images with the student's detections drawn and labelled
       student/           the amalgamation run folder (config, metrics, checkpoint, eval)

Config: :data:`DEMO_DEFAULTS` (mirrored in ``configs/demo.toml``) with sections ``[demo]``,
``[teacher.*]`` (an engine :class:`~ka_rs.engine.config.Config` shared by the teachers; the
demo fills in ``data.split`` / ``data.teacher``) and ``[student.*]`` (an
:class:`~ka_rs.engine.amalgamate.AmalgamateConfig` without teachers). Overrides:
``--set teacher.train.max_steps=800``, ``--set student.amalgamation.sa=false``,
``--set demo.num_eval_images=200``. ``--quick`` applies :data:`QUICK_OVERRIDES` first: tiny
budgets for a smoke test, no accuracy bar.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ka_rs.engine.amalgamate import amalgamate, load_teachers
from ka_rs.engine.amalgamate_config import (
    AmalgamateConfig,
    apply_amalgamate_overrides,
    config_hash,
)
from ka_rs.engine.config import (
    Config,
    ConfigError,
    _coerce,
    _section_from_dict,
    apply_overrides,
    config_from_dict,
    parse_override,
)
from ka_rs.teachers import Teacher

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "DEMO_DEFAULTS",
    "QUICK_OVERRIDES",
    "DemoConfig",
    "DemoSettings",
    "TeacherRun",
    "default_cache_dir",
    "ensure_teachers",
    "evaluate_on_test",
    "load_demo_config",
    "run_demo",
]


@dataclass
class DemoSettings:
    """The ``[demo]`` section.

    Attributes:
        split: split preset naming the teachers and their classes (``shapes-halves``).
        eval_split: shapes split used for the reported numbers (``test``: never trained on,
            never used for validation during training).
        num_eval_images: images of ``eval_split`` evaluated.
        grid_images: test images drawn in ``detections.png``.
        draw_threshold: minimum score of a drawn detection.
        workers: processes for independent trainings (the teachers; ablation variants):
            0 = one per job up to the CPU count, each with CPUs / processes torch threads;
            1 = one after the other in this process.
        student_processes: 1 = train the student in this process (default); n ≥ 2 = in n
            data-parallel processes (DDP over gloo), each with CPUs / n torch threads and
            ``batch_size / n`` images per step, so the global batch stays the same. On the
            2-core machine the 60-query student ran at 46 img/s in 2 processes vs 44 in one
            (labelling its images: 67 vs 58 s): no net gain there, unlike the teachers.
    """

    split: str = "shapes-halves"
    eval_split: str = "test"
    num_eval_images: int = 500
    grid_images: int = 8
    draw_threshold: float = 0.35
    workers: int = 0
    student_processes: int = 1


#: The full demo (``configs/demo.toml`` holds the same values). Budgets are in optimiser steps
#: so that results do not depend on the machine's speed; the learning rate drops ×0.1 for the
#: last ~15% of each run so that the final evaluation is not taken at a noisy constant lr.
DEMO_DEFAULTS: dict[str, Any] = {
    "demo": {
        "split": "shapes-halves",
        "eval_split": "test",
        "num_eval_images": 500,
        "grid_images": 8,
        "draw_threshold": 0.35,
        "workers": 0,
        "student_processes": 1,
    },
    "teacher": {
        "model": {"preset": "anchor_tiny"},
        "data": {"source": "shapes", "image_size": 96, "num_val_images": 200},
        "optim": {
            "lr": 1e-3,
            "lr_backbone": 1e-3,
            "lr_drop": [1050],
            "lr_drop_unit": "step",
        },
        "train": {
            "batch_size": 16,
            "epochs": 1000,
            "max_steps": 1200,
            "eval_every_epochs": 0,
            "eval_every_steps": 400,
            "checkpoint_every_steps": 400,
            "log_every_steps": 25,
            "seed": 42,
        },
    },
    "student": {
        "amalgamation": {
            "sa": True,
            "ta": True,
            "mode": "label_free",
            "threshold": 0.2,
            "init_from": "teacher_b",
            "student": {"num_queries": 60},
            "cache_teachers": True,
        },
        "data": {"source": "shapes", "num_val_images": 200},
        "optim": {
            "lr": 1e-3,
            "lr_backbone": 1e-3,
            "lr_drop": [1050],
            "lr_drop_unit": "step",
        },
        "train": {
            "batch_size": 16,
            "epochs": 1000,
            "max_steps": 1200,
            "eval_every_epochs": 0,
            "eval_every_steps": 400,
            "checkpoint_every_steps": 400,
            "log_every_steps": 25,
            "seed": 42,
        },
    },
}

#: ``--quick``: a smoke run of every stage in well under two minutes (no accuracy bar).
QUICK_OVERRIDES: tuple[str, ...] = (
    "teacher.data.image_size=64",
    "teacher.data.num_train_images=64",
    "teacher.data.num_val_images=8",
    "teacher.train.batch_size=8",
    "teacher.train.max_steps=6",
    "teacher.optim.lr_drop=[5]",
    "teacher.train.eval_every_steps=0",
    "teacher.train.checkpoint_every_steps=0",
    "teacher.train.log_every_steps=2",
    "teacher.model.overrides={hidden_dim = 32, nheads = 2, dim_feedforward = 64, "
    "num_queries = 10, cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 1}",
    "student.data.num_train_images=64",
    "student.data.num_val_images=8",
    "student.train.batch_size=8",
    "student.train.max_steps=6",
    "student.optim.lr_drop=[5]",
    "student.train.eval_every_steps=3",
    "student.train.checkpoint_every_steps=0",
    "student.train.log_every_steps=2",
    "demo.num_eval_images=16",
    "demo.grid_images=4",
)

_IGNORED_FOR_CACHE = (
    "train.output_dir",
    "train.progress",
    "train.plot",
    "train.device",
    "train.num_workers",
    "train.log_every_steps",
)


@dataclass
class DemoConfig:
    """``demo`` settings, the shared ``teacher`` Config and the ``student`` AmalgamateConfig."""

    demo: DemoSettings = field(default_factory=DemoSettings)
    teacher: Config = field(default_factory=Config)
    student: AmalgamateConfig = field(default_factory=AmalgamateConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (``teacher`` / ``student`` hold their own sections)."""
        return {
            "demo": asdict(self.demo),
            "teacher": self.teacher.to_dict(),
            "student": {k: v for k, v in self.student.to_dict().items() if k != "teachers"},
        }

    def teacher_config(self, name: str, output_dir: str | Path) -> Config:
        """The Config that trains teacher ``name`` of ``demo.split`` into ``output_dir``."""
        cfg = copy.deepcopy(self.teacher)
        cfg.data.split = self.demo.split
        cfg.data.teacher = name
        cfg.data.classes = []
        cfg.train.output_dir = str(output_dir)
        cfg.validate()
        return cfg


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _demo_from_dict(data: Mapping[str, Any], source: str) -> DemoConfig:
    for name in data:
        if name not in ("demo", "teacher", "student"):
            raise ConfigError(
                f"{source}: unknown demo config section '{name}'; valid: demo, teacher, student"
            )
    settings = _section_from_dict(DemoSettings, data.get("demo", {}), "demo", source)
    teacher = config_from_dict(data.get("teacher", {}), source=f"{source} [teacher]")
    student_data = dict(data.get("student", {}))
    if "teachers" in student_data:
        raise ConfigError(f"{source}: student.teachers: the demo trains its own teachers")
    student = AmalgamateConfig.from_dict(student_data, source=f"{source} [student]")
    from ka_rs.data import get_split

    try:
        split = get_split(settings.split)
    except ValueError as exc:
        raise ConfigError(f"{source}: demo.split: {exc}") from None
    if len(split) < 2:
        raise ConfigError(f"{source}: demo.split: {settings.split!r} names fewer than 2 teachers")
    init = student.amalgamation.init_from
    if init and init not in split:
        raise ConfigError(
            f"{source}: student.amalgamation.init_from: {init!r} is not a teacher of "
            f"{settings.split!r} ({', '.join(split)})"
        )
    if settings.num_eval_images < 1 or settings.grid_images < 0:
        raise ConfigError(f"{source}: demo.num_eval_images must be >= 1, grid_images >= 0")
    if teacher.data.source != "shapes" or student.data.source != "shapes":
        raise ConfigError(f"{source}: the demo runs on the embedded shapes data (data.source)")
    return DemoConfig(demo=settings, teacher=teacher, student=student)


def load_demo_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), *, quick: bool = False
) -> DemoConfig:
    """The demo config: :data:`DEMO_DEFAULTS`, then the TOML file at ``path`` (deep-merged),
    then :data:`QUICK_OVERRIDES` if ``quick``, then ``overrides``
    (``demo.KEY=V``, ``teacher.SECTION.KEY=V``, ``student.SECTION.KEY=V``)."""
    data = copy.deepcopy(DEMO_DEFAULTS)
    source = "demo defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            with p.open("rb") as f:
                data = _deep_merge(data, tomllib.load(f))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
        source = str(p)
    cfg = _demo_from_dict(data, source)
    ovs = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    return apply_demo_overrides(cfg, ovs) if ovs else cfg


def apply_demo_overrides(cfg: DemoConfig, overrides: Iterable[str]) -> DemoConfig:
    """Apply ``demo.*``, ``teacher.*`` and ``student.*`` overrides (see the module docstring)."""
    import typing

    teacher_ov: list[str] = []
    student_ov: list[str] = []
    settings = asdict(cfg.demo)
    hints = typing.get_type_hints(DemoSettings)
    for text in overrides:
        key, sep, value = text.partition("=")
        head, _, rest = key.strip().partition(".")
        if not sep or not rest:
            raise ConfigError(
                f"override {text!r}: expected demo.KEY=VALUE, teacher.SECTION.KEY=VALUE or "
                "student.SECTION.KEY=VALUE"
            )
        if head == "teacher":
            teacher_ov.append(f"{rest}={value}")
        elif head == "student":
            student_ov.append(f"{rest}={value}")
        elif head == "demo":
            path, parsed = parse_override(text)
            if len(path) != 2 or path[1] not in hints:
                raise ConfigError(
                    f"override {text!r}: unknown config key '{key.strip()}'; valid keys in "
                    "[demo]: " + ", ".join(hints)
                )
            try:
                settings[path[1]] = _coerce(parsed, hints[path[1]], f"demo.{path[1]}")
            except ConfigError as exc:
                raise ConfigError(f"override {text!r}: {exc}") from None
        else:
            raise ConfigError(
                f"override {text!r}: unknown section '{head}'; the demo config has demo, "
                "teacher.* and student.*"
            )
    try:
        teacher = apply_overrides(cfg.teacher, teacher_ov) if teacher_ov else cfg.teacher
        student = apply_amalgamate_overrides(cfg.student, student_ov)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in the demo's teacher./student. overrides)") from None
    data = {
        "demo": settings,
        "teacher": teacher.to_dict(),
        "student": {k: v for k, v in student.to_dict().items() if k != "teachers"},
    }
    return _demo_from_dict(data, "overrides")


def default_cache_dir() -> Path:
    """``$KA_RS_CACHE`` or ``$XDG_CACHE_HOME/ka_rs`` or ``~/.cache/ka_rs``."""
    env = os.environ.get("KA_RS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ka_rs"


# ----------------------------------------------------------------------------------------------
# teachers (cached)


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


def _version() -> str:
    try:
        from ka_rs import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "?"


def teacher_key(cfg: DemoConfig, name: str) -> str:
    """Cache key of teacher ``name``: hash of its training config and the ka_rs version."""
    tcfg = cfg.teacher_config(name, "-").to_dict()
    kept = {
        s: {k: v for k, v in sec.items() if f"{s}.{k}" not in _IGNORED_FOR_CACHE}
        for s, sec in tcfg.items()
    }
    return config_hash({"teacher": kept, "version": _version()})


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
    import sys

    _exit_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _job_train_teacher(
    cfg_dict: dict[str, Any], resume: bool, threads: int, log_path: str
) -> dict[str, Any]:
    """Child process: train one teacher (see :func:`ensure_teachers`)."""
    _redirect_output(log_path)
    torch.set_num_threads(threads)
    from ka_rs.engine.train import train_teacher

    cfg = Config.from_dict(cfg_dict)
    t0 = time.perf_counter()
    result = train_teacher(cfg, resume=True if resume else None)
    return {
        "step": result.state.step,
        "train_minutes": result.state.train_minutes,
        "stopped_by": result.stopped_by,
        "final_eval": dict(result.final_eval),
        "wall_seconds": time.perf_counter() - t0,
    }


def _job_amalgamate_rank(
    cfg_dict: dict[str, Any], rank: int, world: int, port: int, threads: int, log_path: str
) -> dict[str, Any] | None:
    """Child process: rank ``rank`` of a ``world``-process data-parallel student run."""
    _redirect_output(log_path)
    torch.set_num_threads(threads)
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


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    per_rank = copy.deepcopy(scfg)
    per_rank.train.batch_size = scfg.train.batch_size // processes
    per_rank.train.progress = False
    out = Path(scfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    jobs = [
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
    summary = run_jobs(jobs, processes, threads, progress=progress, console=console)[0]
    if not summary or not summary.get("checkpoint"):
        raise RuntimeError(f"student: rank 0 wrote no checkpoint; log: {out / 'train.log'}")
    return StudentRun.from_summary(load_student(summary["checkpoint"]).model, summary, processes)


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

    from ka_rs.engine.logging import make_progress, read_metrics

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
                try:
                    recs = read_metrics(job.metrics) if job.metrics.is_file() else []
                except (OSError, ValueError):
                    recs = []
                train = [r for r in recs if r.get("type") == "train"]
                evals = [r for r in recs if r.get("type") == "eval" and "AP50" in r]
                info = ""
                if train:
                    info = (
                        f"loss {train[-1]['loss']:.3f}  {train[-1].get('img_per_s', 0):.0f} img/s"
                    )
                if evals:
                    info += f"  AP50 {evals[-1]['AP50']:.3f}"
                step = train[-1]["step"] if train else 0
                bar.update(tasks[i], completed=min(step, job.total_steps), info=info)
            for fut in done:
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:
                    log_path = jobs[i].kwargs.get("log_path", "")
                    raise RuntimeError(
                        f"{jobs[i].label}: failed in its worker process ({exc}); log: {log_path}"
                    ) from exc
                bar.update(tasks[i], completed=jobs[i].total_steps)
                if console is not None and not progress:
                    console.print(f"  {jobs[i].label}: done")
    return results


def ensure_teachers(
    cfg: DemoConfig,
    cache_dir: str | Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    device: str | None = None,
    log: Any = None,
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

    runs: list[TeacherRun | None] = []
    todo: list[tuple[int, str, list[str], str, Path, Config, bool]] = []
    for name, classes in get_split(cfg.demo.split).items():
        key = teacher_key(cfg, name)
        run_dir = Path(cache_dir) / "teachers" / f"{name}-{key}"
        done = run_dir / "done.json"
        ckpt = run_dir / "checkpoint.pt"
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        if done.is_file() and ckpt.is_file():
            info = json.loads(done.read_text())
            if log:
                log(f"teacher {name}: cached ({run_dir})")
            runs.append(
                TeacherRun(
                    name,
                    list(classes),
                    ckpt,
                    run_dir,
                    key,
                    True,
                    float(info.get("train_minutes", 0.0)),
                    0.0,
                    int(info.get("step", 0)),
                )
            )
            continue
        tcfg = cfg.teacher_config(name, run_dir)
        if device:
            tcfg.train.device = device
        todo.append((len(runs), name, list(classes), key, run_dir, tcfg, ckpt.is_file()))
        runs.append(None)
    if todo:
        processes, threads = resolve_workers(
            cfg.demo.workers if workers is None else workers, len(todo)
        )
        summaries: list[dict[str, Any]]
        if processes == 1:
            from ka_rs.engine.train import train_teacher

            summaries = []
            for _, name, classes, _, run_dir, tcfg, resume in todo:
                if log:
                    log(f"teacher {name}: training on {', '.join(classes)} -> {run_dir}")
                tcfg.train.progress = progress
                t0 = time.perf_counter()
                result = train_teacher(tcfg, resume=True if resume else None)
                summaries.append(
                    {
                        "step": result.state.step,
                        "train_minutes": result.state.train_minutes,
                        "stopped_by": result.stopped_by,
                        "final_eval": dict(result.final_eval),
                        "wall_seconds": time.perf_counter() - t0,
                    }
                )
        else:
            if log:
                log(
                    f"training {len(todo)} teachers side by side ({processes} processes x "
                    f"{threads} torch thread(s)): "
                    + "; ".join(f"{n} on {', '.join(c)}" for _, n, c, *_ in todo)
                )
            jobs = []
            for _, name, _, _, run_dir, tcfg, resume in todo:
                run_dir.mkdir(parents=True, exist_ok=True)
                tcfg.train.progress = False
                jobs.append(
                    Job(
                        label=f"teacher {name}",
                        fn=_job_train_teacher,
                        kwargs={
                            "cfg_dict": tcfg.to_dict(),
                            "resume": resume,
                            "log_path": str(run_dir / "train.log"),
                        },
                        metrics=run_dir / "metrics.jsonl",
                        total_steps=tcfg.train.max_steps or 0,
                    )
                )
            summaries = run_jobs(jobs, processes, threads, progress=progress, console=console)
        for (pos, name, classes, key, run_dir, _, _), summary in zip(todo, summaries, strict=True):
            (run_dir / "done.json").write_text(
                json.dumps({**summary, "version": _version()}, indent=2)
            )
            runs[pos] = TeacherRun(
                name,
                classes,
                run_dir / "checkpoint.pt",
                run_dir,
                key,
                False,
                float(summary["train_minutes"]),
                float(summary["wall_seconds"]),
                int(summary["step"]),
            )
    return [r for r in runs if r is not None]


# ----------------------------------------------------------------------------------------------
# evaluation


def eval_dataset(cfg: DemoConfig) -> Any:
    """The held-out shapes images of ``demo.eval_split`` (all classes, eval transforms)."""
    from ka_rs.engine.train import build_datasets

    data = copy.deepcopy(cfg.teacher.data)
    data.split, data.teacher, data.classes = "", "", []
    data.val_set = cfg.demo.eval_split
    data.num_val_images = cfg.demo.num_eval_images
    _, ds, _ = build_datasets(data, train=False)
    return ds


class TeacherEnsemble(nn.Module):
    """Reference detector: the teachers run side by side, predictions pooled in union space.

    Query block k holds teacher k's Q_k queries with its logits written at its classes' union
    positions (others −1e4; a softmax teacher's no-object logit on the union background). All
    teachers must share one head kind. Output: ``{"pred_logits", "pred_boxes"}`` with
    ΣQ_k queries.
    """

    def __init__(self, teachers: Sequence[Teacher], union: Sequence[str]) -> None:
        super().__init__()
        kinds = {t.kind for t in teachers}
        if len(kinds) != 1:
            raise ValueError("teachers: the ensemble reference needs one head kind")
        self.kind = kinds.pop()
        self.models = nn.ModuleList(t.model for t in teachers)
        self.maps = [[list(union).index(c) for c in t.class_names] for t in teachers]
        self.num_union = len(union)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Pooled predictions (B, ΣQ_k, K_U) and boxes (B, ΣQ_k, 4)."""
        logits, boxes = [], []
        k_u = self.num_union + (1 if self.kind == "softmax" else 0)
        for model, cols in zip(self.models, self.maps, strict=True):
            out = model(images, mask)
            lg = out["pred_logits"]
            full = lg.new_full((*lg.shape[:2], k_u), -1e4)
            full[..., cols] = lg[..., : len(cols)]
            if self.kind == "softmax":
                full[..., -1] = lg[..., -1]
            logits.append(full)
            boxes.append(out["pred_boxes"])
        return {"pred_logits": torch.cat(logits, 1), "pred_boxes": torch.cat(boxes, 1)}


def evaluate_on_test(
    model: nn.Module,
    dataset: Any,
    class_names: Sequence[str],
    subsets: Mapping[str, Sequence[str]] | None = None,
    *,
    batch_size: int = 32,
    class_head: str | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """COCO evaluation of ``model`` on ``dataset`` (its classes, plus ``subsets``)."""
    from ka_rs.engine.evaluate import evaluate, make_eval_loader

    loader = make_eval_loader(dataset, batch_size)
    return evaluate(model, loader, class_names, subsets, device=device, class_head=class_head)


# ----------------------------------------------------------------------------------------------
# the demo


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


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


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


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

    from ka_rs.engine.logging import read_metrics
    from ka_rs.engine.plots import plot_ap_per_class, plot_loss_curves

    console = console or Console()
    t_start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    load = {"start": _loadavg()}
    timings: dict[str, float] = {}

    def say(msg: str) -> None:
        console.print(f"[bold cyan]demo[/] {msg}")

    say(f"run folder {out}, teacher cache {cache}, torch threads {torch.get_num_threads()}")
    # 1. teachers
    t0 = time.perf_counter()
    runs = ensure_teachers(cfg, cache, fresh=fresh, progress=progress, log=say, console=console)
    timings["teachers"] = time.perf_counter() - t0
    load["after_teachers"] = _loadavg()

    # 2. student
    teachers = load_teachers({r.name: str(r.checkpoint) for r in runs})
    scfg = copy.deepcopy(cfg.student)
    scfg.teachers = {r.name: str(r.checkpoint) for r in runs}
    scfg.train.output_dir = str(out / "student")
    scfg.train.progress = progress
    if not scfg.data.image_size:
        scfg.data.image_size = cfg.teacher.data.image_size
    processes, threads = student_processes(cfg.demo.student_processes, scfg.train.batch_size)
    how = (
        f"{processes} DDP processes x {threads} torch thread(s), "
        f"{scfg.train.batch_size // processes} images each per step"
        if processes > 1
        else f"{threads} torch thread(s)"
    )
    say(f"student: amalgamating {', '.join(r.name for r in runs)} (label-free; {how}) -> student/")
    t0 = time.perf_counter()
    res = train_student(scfg, teachers, processes, threads, progress=progress, console=console)
    timings["student"] = time.perf_counter() - t0
    load["after_student"] = _loadavg()
    student = res.model

    # 3. evaluation on held-out images
    t0 = time.perf_counter()
    test_ds = eval_dataset(cfg)
    union = res.class_names
    subsets = res.subsets
    teacher_evals = {t.name: evaluate_on_test(t.model, test_ds, t.class_names) for t in teachers}
    student_eval = evaluate_on_test(student, test_ds, union, subsets)
    ensemble_eval = None
    if len({t.kind for t in teachers}) == 1:
        ens = TeacherEnsemble(teachers, union)
        ensemble_eval = evaluate_on_test(ens, test_ds, union, subsets, class_head=teachers[0].head)
    timings["evaluation"] = time.perf_counter() - t0

    # 4. figures
    t0 = time.perf_counter()
    figures: dict[str, str] = {}
    curves = {f"{r.name} (teacher)": read_metrics(r.run_dir / "metrics.jsonl") for r in runs}
    curves["student"] = read_metrics(Path(scfg.train.output_dir) / "metrics.jsonl")
    figures["loss_curves"] = plot_loss_curves(
        curves, out / "loss_curves.png", title="training loss and validation AP50"
    ).name
    class_teacher = {c: t.name for t in reversed(teachers) for c in t.class_names}
    teacher_pc: dict[str, dict[str, float]] = {}
    for t in reversed(teachers):
        teacher_pc.update(teacher_evals[t.name].per_class)
    figures["ap_per_class"] = plot_ap_per_class(
        union, teacher_pc, student_eval.per_class, class_teacher, out / "ap_per_class.png"
    ).name
    grid = _detections_grid(student, cfg, union, out / "detections.png")
    if grid is not None:
        figures["detections"] = grid.name
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    load["end"] = _loadavg()

    # 5. results
    per_teacher = {}
    for t in teachers:
        te = teacher_evals[t.name].subsets["all"]
        se = student_eval.subsets[t.name]
        per_teacher[t.name] = {
            "classes": list(t.class_names),
            "teacher": {k: te[k] for k in ("AP", "AP50", "AP75")},
            "student": {k: se[k] for k in ("AP", "AP50", "AP75")},
            "ratio_AP50": _ratio(se["AP50"], te["AP50"]),
            "ratio_AP": _ratio(se["AP"], te["AP"]),
        }
    results: dict[str, Any] = {
        "ka_rs_version": _version(),
        "mode": "label_free" if cfg.student.amalgamation.mode == "label_free" else "label_assisted",
        "per_teacher": per_teacher,
        "student_union": {k: student_eval.subsets["all"][k] for k in ("AP", "AP50", "AP75")},
        "ensemble_union": (
            {k: ensemble_eval.subsets["all"][k] for k in ("AP", "AP50", "AP75")}
            if ensemble_eval
            else None
        ),
        "min_ratio_AP50": min(
            (v["ratio_AP50"] for v in per_teacher.values() if v["ratio_AP50"] is not None),
            default=None,
        ),
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "teacher_processes": list(resolve_workers(cfg.demo.workers, len(runs)))
        if any(not r.cached for r in runs)
        else None,
        "teachers": [
            {
                "name": r.name,
                "classes": r.classes,
                "checkpoint": str(r.checkpoint),
                "cache_key": r.key,
                "cached": r.cached,
                "steps": r.steps,
                "train_minutes": round(r.train_minutes, 3),
                "wall_seconds": round(r.wall_seconds, 2),
            }
            for r in runs
        ],
        "student": {
            "run_dir": str(res.output_dir),
            "checkpoint": str(res.checkpoint) if res.checkpoint else None,
            "steps": res.step,
            "train_minutes": round(res.train_minutes, 3),
            "stopped_by": res.stopped_by,
            "processes": res.processes,
        },
        "evaluation": {
            "split": cfg.demo.eval_split,
            "num_images": cfg.demo.num_eval_images,
            "teachers": {k: v.to_dict() for k, v in teacher_evals.items()},
            "student": student_eval.to_dict(),
            "ensemble": ensemble_eval.to_dict() if ensemble_eval else None,
        },
        "load_average": load,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "figures": figures,
        "config": cfg.to_dict(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_student_cache(
        cache,
        scfg,
        runs,
        cfg.demo,
        evaluation=student_eval.to_dict(),
        run_dir=res.output_dir,
        steps=res.step,
        train_minutes=res.train_minutes,
        processes=res.processes,
    )
    (out / "report.md").write_text(render_report(results, cfg))
    console.print(results_table(results))
    say(
        f"done in {timings['total'] / 60:.1f} min "
        f"(teachers {timings['teachers'] / 60:.1f}, student {timings['student'] / 60:.1f}); "
        f"load average {load['end']}; report: {out / 'report.md'}"
    )
    return results


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
            "version": _version(),
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


def results_table(results: Mapping[str, Any]) -> Any:
    """Rich table: per teacher subset, teacher vs student AP50 / AP and the ratio; the union."""
    from rich.table import Table

    table = Table(title=f"ka-rs demo — {results['mode'].replace('_', '-')} student vs teachers")
    for col in ("classes", "model", "AP50", "AP", "AP75", "student/teacher AP50"):
        table.add_column(col, justify="left" if col in ("classes", "model") else "right")
    for name, v in results["per_teacher"].items():
        cls = f"{name}: " + ", ".join(v["classes"])
        t, s = v["teacher"], v["student"]
        table.add_row(cls, "teacher", f"{t['AP50']:.3f}", f"{t['AP']:.3f}", f"{t['AP75']:.3f}", "")
        ratio = v["ratio_AP50"]
        mark = "" if ratio is None else (" ✓" if ratio >= 0.9 else " ✗")
        table.add_row(
            "",
            "student",
            f"{s['AP50']:.3f}",
            f"{s['AP']:.3f}",
            f"{s['AP75']:.3f}",
            ("-" if ratio is None else f"{ratio:.2f}") + mark,
            end_section=True,
        )
    u = results["student_union"]
    table.add_row(
        "union (all classes)",
        "student",
        f"{u['AP50']:.3f}",
        f"{u['AP']:.3f}",
        f"{u['AP75']:.3f}",
        "",
    )
    e = results.get("ensemble_union")
    if e:
        table.add_row(
            "",
            "both teachers pooled (ref.)",
            f"{e['AP50']:.3f}",
            f"{e['AP']:.3f}",
            f"{e['AP75']:.3f}",
            "",
        )
    return table


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None or x < 0 else f"{x:.{nd}f}"


def render_report(results: Mapping[str, Any], cfg: DemoConfig) -> str:
    """``report.md`` of a demo run."""
    t = results["timings_seconds"]
    lines = [
        "# ka-rs demo report",
        "",
        f"ka_rs {results['ka_rs_version']}, torch {results['machine']['torch']}, "
        f"{results['machine']['cpus']} CPUs ({results['machine']['torch_threads']} torch threads)"
        f", {results['machine']['platform']}.",
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
    cached = [x["name"] for x in results["teachers"] if x["cached"]]
    lines += [
        "",
        "## Wall time",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.0f} |" for k, v in t.items()),
        "",
        f"Teachers reused from the cache: {', '.join(cached) if cached else 'none (cold start)'}."
        f" Load average (1/5/15 min) at start {results['load_average'].get('start')}, "
        f"at the end {results['load_average'].get('end')}.",
        "",
        "## Figures",
        "",
    ]
    for label, key in (
        ("Training loss and validation AP50", "loss_curves"),
        ("AP per class, teacher vs student", "ap_per_class"),
        ("Student detections on test images", "detections"),
    ):
        if key in results["figures"]:
            lines += [f"### {label}", "", f"![{label}]({results['figures'][key]})", ""]
    tc, sc = cfg.teacher, cfg.student
    a = sc.amalgamation
    lines += [
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
    lines += [
        "- No ground-truth label reached the student.",
        "",
        "Rerun: `ka-rs demo` (teachers come from the cache); `--fresh` retrains them.",
        "",
    ]
    return "\n".join(lines)

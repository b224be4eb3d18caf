"""Amalgamation engine: train one student from N ≥ 2 frozen teachers (``ka-rs amalgamate``).

:func:`amalgamate` is orchestration only: it loads the teachers (:func:`load_teachers`, any
source of :mod:`ka_rs.teachers`), builds the student
(:func:`ka_rs.amalgamation.build_amalgamation_student`) and the
:class:`~ka_rs.amalgamation.AmalgamationStep` (the loss of one step, which a user's own loop
can call the same way), optionally caches the teachers' outputs
(:class:`~ka_rs.engine.teacher_cache.TeacherCache`), and hands the step to the engine's
:class:`~ka_rs.engine.loop.TrainLoop` (optimiser, schedule, budgets, progress, JSON-lines
metrics, atomic checkpoints, ``--resume``, torchrun/DDP). The configuration is
:class:`~ka_rs.engine.amalgamate_config.AmalgamateConfig`; the method is in docs/method.md.

Run folder (``train.output_dir``): ``config.toml``, ``metrics.jsonl``, ``checkpoint.pt`` (kind
``"student"``; :func:`load_student` / ``ka-rs evaluate`` rebuild it), ``eval.json`` (union and
per-teacher-subset AP) and ``curves.png``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ka_rs.engine.amalgamate_config import STUDENT_KIND, AmalgamateConfig, teacher_specs
from ka_rs.engine.config import ConfigError, TrainConfig
from ka_rs.teachers import Teacher

__all__ = [
    "AmalgamationResult",
    "amalgamate",
    "load_student",
    "load_teachers",
]


def load_teachers(teachers: Mapping[str, Any], device: torch.device | str = "cpu") -> list[Teacher]:
    """Load named teachers in order, frozen and in eval mode.

    Args:
        teachers: ``{name: source}`` or ``{name: {"source": ..., "classes": ...}}`` (a
            ``[teachers]`` table); sources as in :func:`ka_rs.load_teacher`.
        device: where they run.

    Raises:
        ValueError: a source that cannot be loaded; the message starts with
            ``teachers.<name>:`` and names the file.
    """
    from ka_rs.teachers import load_teacher

    out = []
    for name, spec in teacher_specs(teachers).items():
        try:
            out.append(
                load_teacher(spec["source"], name=name, classes=spec["classes"], device=device)
            )
        except ValueError as exc:
            raise type(exc)(f"teachers.{name}: {exc}") from None
    return out


def load_student(path: str | Path, device: torch.device | str = "cpu") -> Any:
    """Rebuild a student checkpoint (:class:`~ka_rs.engine.checkpoint.LoadedDetector`).

    ``.model`` is the :class:`~ka_rs.models.AmalgamationStudent` (eval mode), ``.class_names``
    the union, ``.checkpoint["student"]`` the slot count, teachers and their classes.
    """
    from ka_rs.engine.checkpoint import CheckpointError, load_detector

    det = load_detector(path, device=device)
    if not det.checkpoint.get("student"):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a student checkpoint")
    return det


def _average_grads_across_ranks(params: Iterable[nn.Parameter]) -> None:
    """Average these parameters' gradients over ranks in backward (they live outside DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    for p in params:
        p.register_hook(hook)


@dataclass
class AmalgamationResult:
    """What :func:`amalgamate` returns (on every rank)."""

    output_dir: Path
    checkpoint: Path | None
    final_eval: dict[str, float]
    eval_result: Any
    stopped_by: str
    step: int
    train_minutes: float
    class_names: list[str]
    teachers: list[str]
    subsets: dict[str, list[str]]
    sa_coverage: str = ""
    model: nn.Module | None = None
    hint: nn.Module | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for the CLI)."""
        return {
            "output_dir": str(self.output_dir),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "stopped_by": self.stopped_by,
            "step": self.step,
            "train_minutes": round(self.train_minutes, 3),
            "teachers": self.teachers,
            "sa_coverage": self.sa_coverage,
            **self.final_eval,
        }


def _effective_epochs(train: TrainConfig, batches_per_epoch: int) -> int:
    epochs = train.epochs
    if train.max_steps:
        epochs = min(epochs, max(1, math.ceil(train.max_steps / max(batches_per_epoch, 1))))
    return max(1, epochs)


def amalgamate(
    config: AmalgamateConfig,
    *,
    resume: str | Path | bool | None = None,
    info: Any = None,
    teachers: Sequence[Teacher] | None = None,
    keep_model: bool = False,
) -> AmalgamationResult:
    """Train a student from the teachers as ``config`` says (see the module docstring).

    Args:
        config: the run configuration (``config.teachers`` needs ≥ 2 entries unless
            ``teachers`` is given).
        resume: a checkpoint path, or True for ``<output_dir>/checkpoint.pt``: continue that
            run exactly where it stopped.
        info: an existing :class:`~ka_rs.engine.distributed.DistInfo`; by default torchrun's
            environment is read (and the process group torn down at the end).
        teachers: already loaded, named teachers (skips loading ``config.teachers``).
        keep_model: put the trained student (unwrapped, eval mode) and the step (with the
            trained aggregation hint, if any) in the result.

    Returns:
        :class:`AmalgamationResult`; ``final_eval`` holds union ``AP``/``AP50``/``AP75`` and
        ``"<teacher>/AP50"`` etc. per teacher subset.
    """
    from ka_rs.engine.distributed import cleanup_distributed, init_distributed
    from ka_rs.engine.logging import setup_logging

    if teachers is None:
        config.validate()
    elif len(teachers) < 2:
        raise ValueError(f"teachers: amalgamation needs at least 2 teachers, got {len(teachers)}")
    config = copy.deepcopy(config)  # resolved values (image size) are recorded in the run
    own_dist = info is None
    info = info or init_distributed(config.train.device)
    setup_logging(info.rank)
    try:
        torch.manual_seed(config.train.seed)
        if teachers is None:
            teachers = load_teachers(config.teachers, device=info.device)
        else:
            for t in teachers:
                t.to(info.device).freeze()
        return _run(config, list(teachers), info, resume, keep_model)
    finally:
        if own_dist:
            cleanup_distributed()


def _run(
    config: AmalgamateConfig,
    teachers: list[Teacher],
    info: Any,
    resume: str | Path | bool | None,
    keep_model: bool,
) -> AmalgamationResult:
    """The body of :func:`amalgamate` once teachers and the process group are ready."""
    from ka_rs.engine.distributed import unwrap_model
    from ka_rs.engine.logging import atomic_write_text, get_logger

    log = get_logger("ka_rs.amalgamate")
    student, step = _student_and_step(config, teachers, info)
    union = list(step.label_space.names)
    train_ds, val_ds = _datasets(config, teachers, union)
    cache = _teacher_cache(config, step, train_ds, info, log)
    if cache is not None:
        train_ds = cache.dataset
    loop, last = _make_loop(config, student, step, cache, train_ds, val_ds, info)
    if resume:
        _resume(loop, step, loop.checkpoint_path if resume is True else Path(resume), info)
    if info.is_main:
        log.info(
            "amalgamating %d teachers (%s) into a %s student over %d classes; losses: %s; %s; %s",
            len(teachers),
            ", ".join(f"{t.name}: {len(t.classes)} cls" for t in teachers),
            "compact" if student.layout == "compact" else f"{step.num_slots}-slot",
            len(union),
            _losses_text(config.amalgamation),
            step.coverage(),
            config.amalgamation.mode,
        )
    result = loop.fit()
    if info.is_main and "result" in last:
        atomic_write_text(loop.output_dir / "eval.json", last["result"].to_json())
    net = unwrap_model(loop.model)
    net.eval()
    return AmalgamationResult(
        output_dir=loop.output_dir,
        checkpoint=result.checkpoint,
        final_eval=dict(result.final_eval),
        eval_result=last.get("result"),
        stopped_by=result.stopped_by,
        step=result.state.step,
        train_minutes=result.state.train_minutes,
        class_names=union,
        teachers=[t.name for t in teachers],
        subsets={t.name: list(t.classes) for t in teachers},
        sa_coverage=step.coverage(),
        model=net if keep_model else None,
        hint=step.hint_loss if keep_model else None,
    )


def _student_and_step(
    config: AmalgamateConfig, teachers: list[Teacher], info: Any
) -> tuple[Any, Any]:
    """The student (on the run's device) and the :class:`AmalgamationStep` that trains it."""
    from ka_rs.amalgamation import AmalgamationStep, build_amalgamation_student

    amg = config.amalgamation
    student = build_amalgamation_student(
        teachers,
        aggregation=amg.aggregation,
        cross_slot_attention=amg.cross_slot_attention,
        init_from=amg.init_from,
        overrides=amg.student,
        student_layout=amg.student_layout,
    )
    step = AmalgamationStep(
        teachers,
        student.config,
        amp=config.train.amp,
        **{k: getattr(amg, k) for k in _STEP_OPTIONS},
    )
    return student.to(info.device), step.to(info.device)


def _make_loop(
    config: AmalgamateConfig,
    student: Any,
    step: Any,
    cache: Any,
    train_ds: Any,
    val_ds: Any,
    info: Any,
) -> tuple[Any, dict[str, Any]]:
    """The engine's TrainLoop running ``step`` on ``student``; ``last["result"]`` will hold
    the latest full evaluation."""
    from ka_rs.engine.evaluate import evaluate, make_eval_loader
    from ka_rs.engine.loop import TrainLoop, build_optimizer

    amg = config.amalgamation
    union = list(step.label_space.names)
    subsets = {t.name: list(t.classes) for t in step.teacher_list}
    optimizer = build_optimizer(student, config.optim)
    hint_params = list(step.trainable_parameters())
    if hint_params:  # the aggregation baseline's fusion trains with the student
        optimizer.add_param_group({"params": hint_params, "lr": config.optim.lr, "name": "hint"})
        _average_grads_across_ranks(hint_params)
    eval_bs = config.train.eval_batch_size or 2 * config.train.batch_size
    val_loader = make_eval_loader(val_ds, eval_bs, config.train.num_workers, info)
    val_loader.generator = torch.Generator().manual_seed(config.train.seed)
    last: dict[str, Any] = {}
    epochs: list[int] = []  # the run's epochs, known once the loop is built

    def loss_fn(
        net: nn.Module, images: torch.Tensor, mask: torch.Tensor, targets: list[dict[str, Any]]
    ) -> Any:
        w_amg = 1.0
        if amg.mode == "label_assisted":  # the paper's 1 - e/E decay
            w_amg = max(0.0, 1.0 - loop.state.epoch / epochs[0])
        cached = cache.outputs(targets, images.device) if cache is not None else None
        return step(net, images, mask, targets, teacher_outputs=cached, amalgamation_weight=w_amg)

    def evaluate_fn(running: TrainLoop) -> dict[str, float]:
        res = evaluate(
            running.model, val_loader, union, subsets, device=info.device, amp=config.train.amp
        )
        last["result"] = res
        return res.metrics

    def extra() -> dict[str, Any]:
        meta: dict[str, Any] = {"student": _student_meta(step.teacher_list, student, step)}
        if step.hint_loss is not None:
            meta["hint"] = {k: v.detach().cpu() for k, v in step.hint_loss.state_dict().items()}
        return meta

    loop = TrainLoop(
        student,
        train_ds,
        loss_fn,
        optim=config.optim,
        train=config.train,
        class_names=union,
        config_dict=config.to_dict(),
        evaluate_fn=evaluate_fn,
        info=info,
        kind=STUDENT_KIND,
        optimizer=optimizer,
        extra_checkpoint=extra,
        find_unused_parameters=not amg.ta,
    )
    epochs.append(_effective_epochs(config.train, loop.batches_per_epoch))
    return loop, last


#: AmalgamationConfig fields that are AmalgamationStep options
_STEP_OPTIONS = (
    "sa",
    "ta",
    "aggregation",
    "sa_weight",
    "ta_weight",
    "mode",
    "gt_weight",
    "threshold",
    "top_n",
    "fill_logit",
    "nms_iou",
    "temperature",
    "eos_coef",
    "weight_class",
    "weight_bbox",
    "weight_giou",
)


def _losses_text(amg: Any) -> str:
    parts = (
        ("SA", amg.sa),
        ("aggregation", amg.aggregation),
        ("TA", amg.ta),
        ("GT", amg.mode == "label_assisted"),
    )
    return "+".join(n for n, on in parts if on)


def _datasets(
    config: AmalgamateConfig, teachers: Sequence[Teacher], union: list[str]
) -> tuple[Any, Any]:
    """The student's training and validation data; classes = the teachers' union."""
    from ka_rs.data import ClassSubset
    from ka_rs.engine.datasets import build_datasets

    data = config.data
    if not data.image_size:
        data.image_size = next((t.image_size for t in teachers if t.image_size), 0) or 128
    if data.split or data.teacher or data.classes:
        raise ConfigError(
            "data.split / data.teacher / data.classes: the student's classes are the "
            "teachers' union; leave these empty"
        )
    if config.amalgamation.cache_teachers:  # fixed images: cached outputs must stay valid
        data.flip, data.color_jitter, data.scales = False, 0.0, [data.image_size]
    train_ds, val_ds, all_classes = build_datasets(data)
    missing = [c for c in union if c not in all_classes]
    if missing:
        raise ValueError(
            f"data: the teachers' classes {missing} are not classes of the dataset "
            f"({', '.join(all_classes)}); evaluation needs them"
        )
    if union != all_classes:
        train_ds = ClassSubset(train_ds, union)
        val_ds = ClassSubset(val_ds, union)
    return train_ds, val_ds


def _teacher_cache(config: AmalgamateConfig, step: Any, train_ds: Any, info: Any, log: Any) -> Any:
    """The teachers' outputs on every training image (``cache_teachers``), or None."""
    amg = config.amalgamation
    if not amg.cache_teachers:
        return None
    from ka_rs.engine.teacher_cache import TeacherCache

    cache = TeacherCache.build(
        step.teacher_list,
        train_ds,
        batch_size=config.train.eval_batch_size or 2 * config.train.batch_size,
        device=info.device,
        sequences=step.sa_teachers if (amg.sa or amg.aggregation) else (),
        progress=config.train.progress and info.is_main,
        run=step.run_teachers,
    )
    if info.is_main:
        log.info(
            "teacher cache: %d images labelled by %d teachers in %.1f s (%.0f MiB)",
            len(cache),
            len(step.teacher_list),
            cache.seconds,
            cache.nbytes / 2**20,
        )
    return cache


def _resume(loop: Any, step: Any, path: Path, info: Any) -> None:
    loop.resume(path)
    if step.hint_loss is not None:
        from ka_rs.engine.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, map_location=info.device)
        if "hint" in ckpt:
            step.hint_loss.load_state_dict(ckpt["hint"])


def _student_meta(teachers: Sequence[Teacher], student: Any, step: Any) -> dict[str, Any]:
    return {
        "num_slots": int(student.num_slots),
        "cross_slot_attention": bool(student.cross_slot_attention),
        "layout": str(student.layout),
        "teachers": [t.name for t in teachers],
        "teacher_classes": {t.name: list(t.class_names) for t in teachers},
        "teacher_checkpoints": {t.name: t.source for t in teachers},
        "sa_teachers": [teachers[k].name for k in step.sa_teachers],
    }

"""The training loop: reusable, resumable, distributed (teacher training and amalgamation).

:class:`TrainLoop` owns everything that does not depend on *what* is trained: the optimiser
(AdamW, separate backbone learning rate), the step LR schedule, gradient clipping, the
(seed, epoch)-deterministic and resumable data order, DDP, progress bars, JSON-lines metrics,
periodic evaluation logged against training minutes, atomic checkpoints and ``--resume``.
What is trained is given as a ``loss_fn(model, images, mask, targets) -> dict`` and an
``evaluate_fn(loop) -> dict[str, float]``; :func:`train_teacher` plugs in a DETR, its
:class:`~ka_rs.losses.SetCriterion` and COCO evaluation (:mod:`ka_rs.engine.train`); the
amalgamation engine plugs in a student and its :class:`~ka_rs.amalgamation.AmalgamationStep`
the same way (:mod:`ka_rs.engine.amalgamate`).

Mixed precision (``train.amp``, :mod:`ka_rs.engine.amp`): the ``loss_fn`` runs its model
forwards under :func:`ka_rs.engine.amp.autocast` and its losses in float32 on
:func:`~ka_rs.engine.amp.float_outputs`; the loop owns the fp16 gradient scaler (scaled
backward, unscale before clipping, scaled step, update; its state is checkpointed).

Run folder (``train.output_dir``)::

    config.toml          the exact config (rerun with --config)
    metrics.jsonl        {"type": "train", step, epoch, loss, loss_*, lr, lr_backbone, grad_norm,
                          img_per_s, train_minutes, wall_minutes}  every log_every_steps steps
                         {"type": "eval", step, epoch, train_minutes, AP, AP50, AP75, ...}
    checkpoint.pt        latest checkpoint (atomic; --resume continues from it)
    eval.json            final evaluation (COCO AP per subset and per class)
    curves.png           AP50 / AP vs training minutes, loss vs step

Divergence: a non-finite loss, a non-finite gradient norm (without the fp16 scaler, which skips
such steps by design) or a non-finite weight at checkpoint time stops the run with
:class:`~ka_rs.engine.checkpoint.NonFiniteError` before the optimiser step / the write, so the
last good ``checkpoint.pt`` is never overwritten; the message names the step and the checkpoint
kept. A failed write of any output raises :class:`~ka_rs.engine.logging.OutputError` naming the
file (atomic writes leave the previous file intact).

Resume checks: the checkpoint must be of this loop's ``kind`` (teacher vs student) and its
weights must fit the model built from the config; when they do not, the error lists the model
config fields that differ and the first weights of another shape.

Exact resume: data order and augmentation are functions of (seed, epoch, index) only
(:class:`~ka_rs.engine.distributed.ResumableDistributedSampler`,
:class:`~ka_rs.engine.distributed.SeededDataset`), DataLoaders draw their worker seeds from
their own generator, and checkpoints carry the optimiser, scheduler, loop position and every
global RNG state; on a CPU a run stopped at step k and resumed ends with bit-identical weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ka_rs.engine.amp import check_amp, make_grad_scaler, resolve_amp
from ka_rs.engine.checkpoint import (
    CheckpointError,
    NonFiniteError,
    _plain,
    load_checkpoint,
    non_finite_tensor,
    restore_rng_state,
    save_checkpoint,
)
from ka_rs.engine.config import OptimConfig, TrainConfig, dump_toml
from ka_rs.engine.distributed import (
    DistInfo,
    ResumableDistributedSampler,
    SeededDataset,
    all_reduce_mean,
    barrier,
    broadcast_object,
    unwrap_model,
    wrap_ddp,
)
from ka_rs.engine.logging import (
    MetricsWriter,
    OutputError,
    atomic_write_text,
    get_logger,
    make_progress,
    plot_training_curves,
    read_metrics,
)

__all__ = [
    "CHECKPOINT_NAME",
    "SCALER_KEY",
    "Batch",
    "LossFn",
    "NonFiniteError",
    "TrainLoop",
    "TrainResult",
    "TrainState",
    "build_optimizer",
    "build_scheduler",
    "move_targets",
]

log = get_logger("ka_rs.train")

Batch = tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]
#: ``loss_fn(model, images, mask, targets) -> {"loss": total, **components}``
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, list[dict[str, Any]]], dict[str, Any]]
CHECKPOINT_NAME = "checkpoint.pt"
#: checkpoint entry holding the fp16 GradScaler's state (``train.amp = "fp16"`` only)
SCALER_KEY = "grad_scaler"


@dataclass
class TrainState:
    """Loop position: optimiser steps done, epoch, batches done in it, time and images spent."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)

    @property
    def train_minutes(self) -> float:
        """Training wall time in minutes (evaluation and checkpointing excluded)."""
        return self.train_seconds / 60.0


@dataclass
class TrainResult:
    """What a finished (or stopped) run returns."""

    output_dir: Path
    state: TrainState
    final_eval: dict[str, Any]
    checkpoint: Path | None
    stopped_by: str
    eval_result: Any = None  # the final EvalResult, when the engine evaluates with COCO AP


# ----------------------------------------------------------------------------------------------
# optimiser and schedule


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups: backbone (``lr_backbone``) and the rest (``lr``).

    Parameters whose name contains ``"backbone"`` go to the backbone group; with
    ``lr_backbone = 0`` they are frozen (``requires_grad = False``) instead. ``optim.fused``
    picks torch's fused AdamW kernel: ``"auto"`` where torch supports it for these parameters
    (else the default implementation), ``"on"`` or an error, ``"off"`` never.
    """
    net = unwrap_model(model)
    backbone, rest = [], []
    for name, p in net.named_parameters():
        if "backbone" in name:
            if optim.lr_backbone == 0:
                p.requires_grad_(False)
            if p.requires_grad:
                backbone.append(p)
        elif p.requires_grad:
            rest.append(p)
    groups: list[dict[str, Any]] = [{"params": rest, "lr": optim.lr, "name": "main"}]
    if backbone:
        groups.append({"params": backbone, "lr": optim.lr_backbone, "name": "backbone"})
    if optim.fused != "off":
        try:
            return torch.optim.AdamW(
                groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=True
            )
        except RuntimeError as exc:  # a device / dtype the fused kernel does not support
            if optim.fused == "on":
                raise ValueError(f"optim.fused='on': {exc}") from None
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig
) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply every LR by ``lr_gamma`` at each ``lr_drop`` milestone.

    The caller steps it once per epoch or once per optimiser step, per ``lr_drop_unit``; for
    ``"minute"`` it steps it once per milestone passed (the scheduler then counts drops).
    """
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=_milestones(optim), gamma=optim.lr_gamma
    )


def _milestones(optim: OptimConfig) -> list[int]:
    if optim.lr_drop_unit == "minute":  # the scheduler's "epoch" counts the drops done
        return list(range(1, len(optim.lr_drop) + 1))
    return sorted(int(m) for m in optim.lr_drop)


def move_targets(targets: Any, device: torch.device) -> Any:
    """Move every tensor inside ``targets`` (dicts / lists / tuples nested) to ``device``."""
    if torch.is_tensor(targets):
        return targets.to(device, non_blocking=True)
    if isinstance(targets, Mapping):
        return {k: move_targets(v, device) for k, v in targets.items()}
    if isinstance(targets, (list, tuple)):
        return type(targets)(move_targets(v, device) for v in targets)
    return targets


def _data_loader_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))


# ----------------------------------------------------------------------------------------------
# the loop


class TrainLoop:
    """Epoch loop shared by teacher training and amalgamation (see the module docstring).

    Args:
        model: the module to train, on ``info.device`` (wrapped in DDP here when distributed).
        train_dataset: map-style dataset of ``(image, target)``; wrapped in
            :class:`SeededDataset` so augmentation depends on (seed, epoch, index) only.
        loss_fn: ``(model, images, mask, targets) -> {"loss": Tensor, **components}``; targets
            are already on the device. Components may be tensors or floats. **Mixed-precision
            contract** (``train.amp`` != ``"off"``): the loop does not autocast anything
            itself. ``loss_fn`` must run each model forward (the trained model's and any
            frozen teacher's) inside ``ka_rs.engine.amp.autocast(train.amp, device)``, pass the
            outputs through ``ka_rs.engine.amp.float_outputs`` and compute every loss outside
            the autocast region, so that ``"loss"`` is a float32 tensor. The loop does the
            rest: with ``"fp16"`` it owns a :class:`torch.amp.GradScaler` (``self.scaler``,
            None otherwise) and runs scaled backward -> unscale -> gradient clipping on the
            true gradients -> ``scaler.step`` (skipped when a gradient is inf/NaN) ->
            ``scaler.update``, and saves / restores the scaler's state in checkpoints.
        optim / train: config sections.
        class_names: stored in checkpoints (the model's label order).
        config_dict: the whole run config as a plain dict (stored in checkpoints / config.toml).
        evaluate_fn: ``(loop) -> {"AP": ..., "AP50": ..., ...}`` called on every rank at
            evaluation time (it must be collective-safe), or None.
        collate_fn: batch builder (default :func:`ka_rs.data.collate_fn`).
        info: distributed setup from :func:`init_distributed`.
        kind: checkpoint ``kind``.
        optimizer: a pre-built optimiser (default :func:`build_optimizer`).
        extra_checkpoint: ``() -> dict`` of extra plain entries saved in each checkpoint.
        find_unused_parameters: passed to DDP (True when some trainable parameters may get
            no gradient in a step).

    Raises:
        ValueError: ``train.amp`` is not a mode, or torch's autocast cannot run it on
            ``info.device`` (:func:`ka_rs.engine.amp.check_amp`).
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Any,
        loss_fn: LossFn,
        *,
        optim: OptimConfig,
        train: TrainConfig,
        class_names: Sequence[str],
        config_dict: Mapping[str, Any],
        evaluate_fn: Callable[[TrainLoop], Mapping[str, float]] | None = None,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
        info: DistInfo | None = None,
        kind: str = "teacher",
        optimizer: torch.optim.Optimizer | None = None,
        extra_checkpoint: Callable[[], Mapping[str, Any]] | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        if collate_fn is None:
            from ka_rs.data import collate_fn as default_collate

            collate_fn = default_collate
        self.info = info or DistInfo()
        self.optim_cfg = optim
        self.train_cfg = train
        self.class_names = list(class_names)
        self.config_dict = dict(config_dict)
        self.loss_fn = loss_fn
        self.evaluate_fn = evaluate_fn
        self.kind = kind
        self.extra_checkpoint = extra_checkpoint
        self.output_dir = Path(train.output_dir)
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        #: the mode ``train.amp`` stands for on this device (``"auto"`` resolved)
        self.amp = resolve_amp(train.amp, self.info.device)
        if train.amp == "auto":
            log.info("train.amp='auto' -> %r on %s", self.amp, self.info.device)
        check_amp(self.amp, self.info.device)
        #: the fp16 loss scaler (None unless ``train.amp == "fp16"``)
        self.scaler = make_grad_scaler(self.amp, self.info.device)
        self.model = wrap_ddp(model, self.info, find_unused_parameters=find_unused_parameters)
        self.optimizer = optimizer or build_optimizer(self.model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.state = TrainState()
        self.dataset = SeededDataset(train_dataset, train.seed)
        if len(self.dataset) == 0:
            raise ValueError("train dataset: it is empty")
        self.sampler = ResumableDistributedSampler(
            self.dataset,
            num_replicas=self.info.world_size,
            rank=self.info.rank,
            shuffle=True,
            seed=train.seed,
            drop_last=True,
        )
        self.collate_fn = collate_fn
        self.batches_per_epoch = len(self.sampler) // train.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"train.batch_size: {train.batch_size} per process × {self.info.world_size} "
                f"process(es) exceeds the {len(self.dataset)} training images"
            )
        self.metrics: MetricsWriter | None = None
        self.last_eval_result: Any = None
        #: step of the last checkpoint written or resumed from, per path
        self._saved_step: dict[str, int] = {}
        self._t_start = time.perf_counter()

    # -- checkpoints

    def save(self, path: Path | None = None) -> Path | None:
        """Write a checkpoint on rank 0 (atomic); other ranks wait at a barrier."""
        path = path or self.checkpoint_path
        # every rank checks (the weights are the same everywhere), so that all of them stop
        bad = non_finite_tensor(unwrap_model(self.model).state_dict())
        if bad is not None:
            raise NonFiniteError(
                f"model weight {bad} is not finite after step {self.state.step}; not writing "
                f"checkpoint {str(path)!r}"
            )
        if self.info.is_main:
            st = self.state
            save_checkpoint(
                path,
                model=self.model,
                class_names=self.class_names,
                config=self.config_dict,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                step=st.step,
                epoch=st.epoch,
                batch_in_epoch=st.batch_in_epoch,
                train_seconds=st.train_seconds,
                images_seen=st.images_seen,
                metrics=st.last_eval,
                kind=self.kind,
                extra=self._checkpoint_extra(),
                check_finite=False,  # checked above on every rank
            )
        self._saved_step[str(path)] = self.state.step
        barrier()
        return path if self.info.is_main else None

    def _checkpoint_extra(self) -> dict[str, Any] | None:
        extra = dict(self.extra_checkpoint()) if self.extra_checkpoint else {}
        if self.scaler is not None:
            extra[SCALER_KEY] = self.scaler.state_dict()
        return extra or None

    def resume(self, path: str | Path) -> None:
        """Restore model, optimiser, scheduler, loop position, RNG states and (fp16) the
        gradient scaler from ``path``."""
        ckpt = load_checkpoint(path, map_location=self.info.device)
        if ckpt.get("kind") != self.kind:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a {ckpt.get('kind')!r} checkpoint, not {self.kind!r}"
            )
        if "optimizer" not in ckpt:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds weights only (no optimiser state); cannot resume"
            )
        net = unwrap_model(self.model)
        _check_weights_fit(net, ckpt, path)
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: its weights do not fit this model "
                f"(different model config?): {exc}"
            ) from None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: optimiser state does not fit: {exc}"
            ) from None
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
            # the config may change the milestones on resume: the config wins
            self.scheduler.milestones = type(self.scheduler.milestones)(_milestones(self.optim_cfg))
        self._warn_learning_rates_kept(path)
        self.state = TrainState(
            step=int(ckpt["step"]),
            epoch=int(ckpt["epoch"]),
            batch_in_epoch=int(ckpt["batch_in_epoch"]),
            train_seconds=float(ckpt.get("train_seconds", 0.0)),
            images_seen=int(ckpt.get("images_seen", 0)),
            last_eval=dict(ckpt.get("metrics") or {}),
        )
        self._saved_step[str(path)] = self.state.step
        if "rng" in ckpt:
            restore_rng_state(ckpt["rng"])
        if self.scaler is not None:
            if SCALER_KEY in ckpt:
                self.scaler.load_state_dict(ckpt[SCALER_KEY])
            elif self.info.is_main:
                log.warning(
                    "checkpoint %s has no gradient-scaler state (written without "
                    "train.amp='fp16'); the fp16 loss scale starts afresh",
                    path,
                )
        if self.info.is_main:
            log.info(
                "resumed from %s: step %d, epoch %d (+%d batches), %.2f training minutes",
                path,
                self.state.step,
                self.state.epoch,
                self.state.batch_in_epoch,
                self.state.train_minutes,
            )

    def _warn_learning_rates_kept(self, path: str | Path) -> None:
        """Say so when the config's learning rates differ from those of the resumed optimiser
        (its state, learning rates included, wins: the resumed run continues exactly)."""
        wanted = {"main": self.optim_cfg.lr, "backbone": self.optim_cfg.lr_backbone}
        keys = {"main": "optim.lr", "backbone": "optim.lr_backbone"}
        for group in self.optimizer.param_groups:
            name = group.get("name")
            base = group.get("initial_lr", group.get("lr"))
            if name in wanted and base is not None and not math.isclose(base, wanted[name]):
                if self.info.is_main:
                    log.warning(
                        "%s = %g in the config, but checkpoint %s was trained with %g: resuming "
                        "keeps the checkpoint's learning rates (start a new run to change them)",
                        keys[name],
                        wanted[name],
                        path,
                        base,
                    )

    # -- helpers

    def lrs(self) -> dict[str, float]:
        """Current learning rate of each parameter group (``lr``, ``lr_backbone``)."""
        out = {}
        for g in self.optimizer.param_groups:
            out["lr_backbone" if g.get("name") == "backbone" else "lr"] = float(g["lr"])
        return out

    def _make_loader(self, epoch: int, start_batch: int) -> torch.utils.data.DataLoader[Any]:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_batch * self.train_cfg.batch_size)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.train_cfg.batch_size,
            sampler=self.sampler,
            num_workers=self.train_cfg.num_workers,
            collate_fn=self.collate_fn,
            drop_last=True,
            pin_memory=self.info.device.type == "cuda",
            generator=_data_loader_generator(self.train_cfg.seed, epoch),
            persistent_workers=False,
        )

    def _total_steps(self) -> int:
        total = self.train_cfg.epochs * self.batches_per_epoch
        if self.train_cfg.max_steps:
            total = min(total, self.train_cfg.max_steps)
        return total

    def compute_gradients(self, batch: Batch) -> dict[str, float]:
        """Forward + backward on ``batch`` (gradients averaged over ranks by DDP), no step.

        Returns the loss components as floats. Raises :class:`NonFiniteError` (a
        ``FloatingPointError``) naming the step when the loss is not finite. With
        ``train.amp = "fp16"`` the gradients are left multiplied by the scaler's scale
        (:meth:`train_step` unscales them).
        """
        images, mask, targets = batch
        dev = self.info.device
        images = images.to(dev, non_blocking=True)
        mask = mask.to(dev, non_blocking=True)
        targets = move_targets(targets, dev)
        self.model.train()
        try:
            losses = self.loss_fn(self.model, images, mask, targets)
        except ValueError as exc:
            # the matcher / losses refuse NaN or inf predictions ("pred_boxes: non-finite
            # value at ..."): the model has diverged
            text = str(exc)
            if "non-finite" not in text and "not finite" not in text:
                raise
            raise NonFiniteError(
                f"the model's outputs are not finite at step {self.state.step + 1} ({text}); "
                "stopping before the optimiser step"
            ) from exc
        loss = losses["loss"]
        comps = {
            k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()
        }
        if not math.isfinite(comps["loss"]):
            raise NonFiniteError(
                f"loss is {comps['loss']} at step {self.state.step + 1}; stopping before "
                f"the optimiser step (components: {comps})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # gradients stay scaled until train_step
        else:
            loss.backward()
        return comps

    def train_step(self, batch: Batch) -> tuple[dict[str, float], float]:
        """One optimiser step on ``batch``; returns (loss components as floats, grad norm).

        With the fp16 scaler the gradients are unscaled before clipping (the norm and the clip
        see the true gradients), the step is skipped when any gradient is inf/NaN (the norm is
        then inf/NaN) and the scale is updated; ``grad_scale`` is added to the components.
        Without the scaler an inf/NaN gradient norm raises :class:`NonFiniteError` before the
        optimiser step (the weights stay as they were).
        """
        comps = self.compute_gradients(batch)
        max_norm = self.optim_cfg.clip_max_norm if self.optim_cfg.clip_max_norm > 0 else math.inf
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler is None and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(
                f"gradient norm is {float(grad_norm)} at step {self.state.step + 1} (loss "
                f"{comps['loss']:.4g}); stopping before the optimiser step"
            )
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                comps["grad_scale"] = float(self.scaler.get_scale())
            else:
                self.optimizer.step()
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            raise NonFiniteError(
                f"the optimiser step overflowed at step {self.state.step + 1} ({exc}); the "
                f"learning rates ({', '.join(f'{v:g}' for v in self.lrs().values())}) are "
                "too large"
            ) from exc
        return comps, float(grad_norm)

    def run_evaluation(self) -> dict[str, float]:
        """Call ``evaluate_fn`` (all ranks), log an ``eval`` record, remember the result."""
        if self.evaluate_fn is None:
            return {}
        metrics = dict(self.evaluate_fn(self))
        self.state.last_eval = {k: float(v) for k, v in metrics.items()}
        record = {
            "type": "eval",
            "step": self.state.step,
            "epoch": self.state.epoch,
            "train_minutes": self.state.train_minutes,
            "wall_minutes": (time.perf_counter() - self._t_start) / 60.0,
            "images_seen": self.state.images_seen,
            **self.state.last_eval,
        }
        if self.metrics is not None:
            self.metrics.write(record)
        if self.info.is_main:
            shown = ", ".join(
                f"{k} {v:.3f}" for k, v in self.state.last_eval.items() if "/" not in k
            )
            log.info(
                "eval @ step %d (%.2f training min): %s",
                self.state.step,
                self.state.train_minutes,
                shown,
            )
        return self.state.last_eval

    # -- main loop

    def _log_train(self, window: _Window, now: float) -> str:
        """Write a ``train`` record averaged over ``window`` (all ranks); return a summary."""
        st = self.state
        avg = all_reduce_mean({k: v / window.steps for k, v in window.sums.items()})
        record = {
            "type": "train",
            "step": st.step,
            "epoch": st.epoch,
            **avg,
            **self.lrs(),
            "img_per_s": window.images / max(window.seconds, 1e-9),
            "train_minutes": st.train_minutes,
            "wall_minutes": (now - self._t_start) / 60.0,
        }
        if self.metrics is not None:
            self.metrics.write(record)
        text = (
            f"step {st.step}  loss {avg['loss']:.3f}  {record['img_per_s']:.0f} img/s  "
            f"{st.train_minutes:.1f} min"
        )
        if "AP50" in st.last_eval:
            text += f"  AP50 {st.last_eval['AP50']:.3f}"
        return text

    def _kept_checkpoint_note(self) -> str:
        """What a stopped run left on disk (for the divergence message)."""
        path = self.checkpoint_path
        if str(path) in self._saved_step:
            return (
                f"the last good checkpoint {path} (step {self._saved_step[str(path)]}) is "
                "kept unchanged"
            )
        if path.exists():
            return f"the existing checkpoint {path} is kept unchanged"
        return "no checkpoint was written"

    def _stop_reason(self) -> str:
        """Why training must stop before the next step ("" = it must not)."""
        cfg, st = self.train_cfg, self.state
        if st.epoch >= cfg.epochs:
            return "epochs"
        if cfg.max_steps and st.step >= cfg.max_steps:
            return "max_steps"
        budget_s = cfg.time_budget_minutes * 60.0
        # time-based decisions come from rank 0, so that all ranks agree
        if budget_s > 0 and broadcast_object(st.train_seconds >= budget_s):
            return "time_budget"
        return ""

    def fit(self) -> TrainResult:
        """Train until the epoch / step / time budget is used up; return the result.

        After every optimiser step, in this order: LR schedule (per step), metrics record
        (every ``log_every_steps``), epoch bookkeeping (schedule per epoch), evaluation and
        checkpoint when due. The final evaluation and checkpoint come after the loop.
        """
        cfg, info, st = self.train_cfg, self.info, self.state
        self._t_start = time.perf_counter()
        if info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.toml", dump_toml(self.config_dict))
            log.info(
                "training %s: %d images, %d steps/epoch, batch %d × %d process(es), device %s",
                self.kind,
                len(self.dataset),
                self.batches_per_epoch,
                cfg.batch_size,
                info.world_size,
                info.device,
            )
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl", enabled=info.is_main)
        total = self._total_steps()
        budget_s = cfg.time_budget_minutes * 60.0
        eval_min = cfg.eval_every_minutes
        next_eval_min = (math.floor(st.train_minutes / eval_min) + 1) * eval_min if eval_min else 0
        step_unit = self.optim_cfg.lr_drop_unit == "step"
        minute_drops = (
            sorted(self.optim_cfg.lr_drop) if self.optim_cfg.lr_drop_unit == "minute" else []
        )
        by_time = budget_s > 0  # the bar counts training seconds, else optimiser steps
        stopped_by = self._stop_reason()
        window = _Window()

        def done() -> float:
            return min(st.train_seconds, budget_s) if by_time else min(st.step, total)

        try:
            with make_progress(enabled=cfg.progress and info.is_main) as bar:
                task = bar.add_task(
                    "train [s]" if by_time else "train",
                    total=int(budget_s) if by_time else total,
                    completed=done(),
                )
                while not stopped_by:
                    t_last = time.perf_counter()
                    for batch in self._make_loader(st.epoch, st.batch_in_epoch):
                        comps, grad_norm = self.train_step(batch)
                        if step_unit:
                            self.scheduler.step()
                        now = time.perf_counter()
                        n_img = int(batch[0].shape[0]) * info.world_size
                        st.step += 1
                        st.batch_in_epoch += 1
                        st.train_seconds += now - t_last
                        st.images_seen += n_img
                        window.add({**comps, "grad_norm": grad_norm}, n_img, now - t_last)

                        eval_due_by_time = False
                        if budget_s > 0 or eval_min > 0 or minute_drops:
                            # rank 0's clock decides, so that every rank agrees
                            passed = sum(m <= st.train_minutes for m in minute_drops)
                            over, eval_due_by_time, drop_due = broadcast_object(
                                (
                                    budget_s > 0 and st.train_seconds >= budget_s,
                                    eval_min > 0 and st.train_minutes >= next_eval_min,
                                    passed > self.scheduler.last_epoch,
                                )
                            )
                            stopped_by = "time_budget" if over else ""
                            if drop_due:
                                self.scheduler.step()
                        if cfg.max_steps and st.step >= cfg.max_steps:
                            stopped_by = "max_steps"

                        if st.step % cfg.log_every_steps == 0 or stopped_by:
                            text = self._log_train(window, now)
                            window = _Window()
                            bar.update(task, completed=done(), info=text)
                            if info.is_main and not _is_rich(bar):
                                log.info("epoch %d  %s  lr %.2e", st.epoch, text, self.lrs()["lr"])
                        else:
                            bar.update(task, completed=done())

                        epoch_done = st.batch_in_epoch >= self.batches_per_epoch
                        if epoch_done:
                            st.epoch += 1
                            st.batch_in_epoch = 0
                            if self.optim_cfg.lr_drop_unit == "epoch":
                                self.scheduler.step()
                            if st.epoch >= cfg.epochs:
                                stopped_by = stopped_by or "epochs"
                        if not stopped_by:
                            if (
                                eval_due_by_time
                                or (cfg.eval_every_steps and st.step % cfg.eval_every_steps == 0)
                                or (
                                    epoch_done
                                    and cfg.eval_every_epochs
                                    and st.epoch % cfg.eval_every_epochs == 0
                                )
                            ):
                                self.run_evaluation()
                                while eval_min and next_eval_min <= st.train_minutes:
                                    next_eval_min += eval_min
                            every = cfg.checkpoint_every_steps
                            if (every and st.step % every == 0) or (epoch_done and not every):
                                self.save()
                        if stopped_by or epoch_done:
                            break
                        t_last = time.perf_counter()
                    stopped_by = stopped_by or self._stop_reason()
            final_eval = self.run_evaluation()
            ckpt = self.save()
            if info.is_main:
                log.info(
                    "stopped (%s) at step %d, epoch %d after %.2f training minutes; checkpoint %s",
                    stopped_by,
                    st.step,
                    st.epoch,
                    st.train_minutes,
                    ckpt,
                )
        except NonFiniteError as exc:
            raise NonFiniteError(f"{exc}; {self._kept_checkpoint_note()}") from exc
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if info.is_main and cfg.plot:
            try:
                plot_training_curves(
                    read_metrics(self.output_dir / "metrics.jsonl"),
                    self.output_dir / "curves.png",
                    title=f"{self.kind}: {self.output_dir.name}",
                )
            except OutputError:  # the disk is full / read-only: the command must say so
                raise
            except Exception as exc:  # a plotting problem must never fail a finished run
                log.warning("could not draw curves.png: %s", exc)
        return TrainResult(
            output_dir=self.output_dir,
            state=st,
            final_eval=final_eval,
            checkpoint=ckpt,
            stopped_by=stopped_by,
        )


@dataclass
class _Window:
    """Sums of logged values over the steps since the last ``train`` record."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, values: Mapping[str, float], images: int, seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images
        self.seconds += seconds


def _is_rich(bar: Any) -> bool:
    return type(bar).__name__ != "_NullProgress"


# ----------------------------------------------------------------------------------------------
# teacher training


def _check_weights_fit(net: nn.Module, ckpt: Mapping[str, Any], path: str | Path) -> None:
    """Refuse to resume ``net`` from ``ckpt`` when the stored weights do not fit it.

    The error names the model config fields that differ (the checkpoint's ``model_config``
    vs the model built from the run config) and the weights that are missing, unexpected or of
    another shape. A config that differs only in fields that leave every weight's shape alone
    (dropout, loss weights) is allowed, with a warning naming the fields.
    """
    stored = ckpt.get("model")
    if not isinstance(stored, Mapping):
        return  # load_state_dict reports it
    fields: list[str] = []
    stored_cfg = ckpt.get("model_config")
    mine = getattr(net, "config", None)
    if isinstance(stored_cfg, Mapping) and stored_cfg and mine is not None:
        try:
            mine_cfg = _plain(mine)
        except TypeError:
            mine_cfg = None
        if isinstance(mine_cfg, Mapping):
            missing_value = object()
            for key in sorted(set(stored_cfg) | set(mine_cfg)):
                a, b = mine_cfg.get(key, missing_value), stored_cfg.get(key, missing_value)
                if a != b:
                    shown_a = "absent" if a is missing_value else repr(a)
                    shown_b = "absent" if b is missing_value else repr(b)
                    fields.append(f"{key} = {shown_a} here vs {shown_b} in the checkpoint")
    state = net.state_dict()
    missing = [k for k in state if k not in stored]
    unexpected = [k for k in stored if k not in state]
    shapes = [
        f"{k} {tuple(stored[k].shape)} in the checkpoint vs {tuple(v.shape)} here"
        for k, v in state.items()
        if k in stored and torch.is_tensor(stored[k]) and tuple(stored[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        if fields:
            log.warning(
                "checkpoint %s: the model config differs (%s); the weights fit, resuming",
                path,
                "; ".join(fields),
            )
        return

    def listed(items: list[str], n: int = 3) -> str:
        more = f" (+{len(items) - n} more)" if len(items) > n else ""
        return ", ".join(items[:n]) + more

    parts = []
    if fields:
        parts.append("model config fields differ: " + listed(fields, 6))
    if shapes:
        parts.append("weights of another shape: " + listed(shapes))
    if missing:
        parts.append(f"{len(missing)} weight(s) absent from the checkpoint: {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) this model lacks: {listed(unexpected)}")
    raise CheckpointError(
        f"checkpoint {str(path)!r}: its weights do not fit this model ({'; '.join(parts)}); "
        "resume with the model config the checkpoint was trained with"
    )

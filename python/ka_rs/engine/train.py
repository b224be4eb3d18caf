"""Teacher training (``ka-rs train-teacher``): a DETR, its set criterion and COCO evaluation
plugged into the engine's :class:`~ka_rs.engine.loop.TrainLoop`.

The run folder is the loop's (``config.toml``, ``metrics.jsonl``, ``checkpoint.pt``,
``curves.png``: see :mod:`ka_rs.engine.loop`) plus ``eval.json``, the final evaluation (COCO AP
per subset and per class), written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ka_rs.engine.amp import autocast, float_outputs
from ka_rs.engine.config import Config
from ka_rs.engine.datasets import build_datasets, preset_hints
from ka_rs.engine.distributed import DistInfo, cleanup_distributed, init_distributed
from ka_rs.engine.logging import atomic_write_text, setup_logging
from ka_rs.engine.loop import TrainLoop, TrainResult

__all__ = ["build_teacher_loop", "summary_json", "train_teacher"]


def build_teacher_loop(config: Config, info: DistInfo) -> TrainLoop:
    """Data, DETR, set criterion, optimiser and COCO evaluation for one teacher, as a loop.

    ``loop.last_eval_result`` holds the latest full :class:`~ka_rs.engine.evaluate.EvalResult`.
    Seeds torch with ``train.seed`` first, so the initial weights depend on the seed only.
    """
    from ka_rs.engine.evaluate import evaluate, make_eval_loader
    from ka_rs.losses import build_criterion
    from ka_rs.models import build_model

    config.validate()
    torch.manual_seed(config.train.seed)
    hints = preset_hints(config.model.preset)
    train_ds, val_ds, class_names = build_datasets(
        config.data, image_size=int(hints.get("image_size", 128))
    )
    model = build_model(config.model.preset, len(class_names), **config.model.overrides)
    model.to(info.device)
    criterion = build_criterion(model.config).to(info.device)

    amp = config.train.amp

    def loss_fn(
        net: nn.Module, images: torch.Tensor, mask: torch.Tensor, targets: list[dict[str, Any]]
    ) -> dict[str, Any]:
        with autocast(amp, images.device):  # forward only; the losses run in float32
            out = net(images, mask)
        losses = criterion(float_outputs(out), targets)
        # log the total and the final layer's components (not every auxiliary layer's)
        return {k: v for k, v in losses.items() if not k[-1].isdigit()}

    eval_bs = config.train.eval_batch_size or 2 * config.train.batch_size
    val_loader = make_eval_loader(val_ds, eval_bs, config.train.num_workers, info)
    # worker seeds from a private generator: evaluation never touches the global RNG
    val_loader.generator = torch.Generator().manual_seed(config.train.seed)

    def evaluate_fn(loop: TrainLoop) -> dict[str, float]:
        res = evaluate(loop.model, val_loader, class_names, device=info.device, amp=amp)
        loop.last_eval_result = res
        return res.metrics

    return TrainLoop(
        model,
        train_ds,
        loss_fn,
        optim=config.optim,
        train=config.train,
        class_names=class_names,
        config_dict=config.to_dict(),
        evaluate_fn=evaluate_fn,
        info=info,
        kind="teacher",
    )


def train_teacher(
    config: Config,
    *,
    resume: str | Path | bool | None = None,
    info: DistInfo | None = None,
) -> TrainResult:
    """Train one DETR teacher as ``config`` says (see :class:`~ka_rs.engine.config.Config`).

    Args:
        config: the run configuration.
        resume: a checkpoint path, or True for ``<output_dir>/checkpoint.pt``: continue that
            run exactly where it stopped (model, optimiser, schedule, data order, RNG).
        info: an existing distributed setup; by default :func:`init_distributed` reads
            torchrun's environment (and the process group is torn down at the end).

    Returns:
        :class:`TrainResult` on every rank (the final evaluation is the same everywhere).
    """
    config.validate()
    own_dist = info is None
    info = info or init_distributed(config.train.device)
    setup_logging(info.rank)
    threads = torch.get_num_threads()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    try:
        loop = build_teacher_loop(config, info)
        if resume:
            path = loop.checkpoint_path if resume is True else Path(resume)
            loop.resume(path)
        result = loop.fit()
        result.eval_result = loop.last_eval_result
        if info.is_main and loop.last_eval_result is not None:
            atomic_write_text(loop.output_dir / "eval.json", loop.last_eval_result.to_json())
        return result
    finally:
        torch.set_num_threads(threads)
        if own_dist:
            cleanup_distributed()


def summary_json(result: TrainResult) -> str:
    """A short JSON summary of a finished run (for the CLI)."""
    return json.dumps(
        {
            "output_dir": str(result.output_dir),
            "stopped_by": result.stopped_by,
            "step": result.state.step,
            "epoch": result.state.epoch,
            "train_minutes": round(result.state.train_minutes, 3),
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            **{k: v for k, v in result.final_eval.items()},
        },
        indent=2,
    )

"""``ka-rs`` subcommands of the engine: ``train-teacher``, ``evaluate``, ``convert``,
``export-shapes``.

Registered by :mod:`ka_rs.cli` (see there for the contract). Only argparse is imported at
module level; torch and the engine load when a command runs. :func:`add_config_arguments` and
:func:`load_run_config` are shared with later commands (``amalgamate``) so that every training
command takes ``--config`` / ``--set`` / ``--output`` / ``--resume`` the same way.

Every output a command writes goes through :mod:`ka_rs.engine.logging`'s failure-safe
writers; a failed write surfaces as :class:`~ka_rs.engine.logging.OutputError`, printed as
``ka-rs <command>: error: <path>: <reason>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "add_config_arguments",
    "cmd_convert",
    "cmd_evaluate",
    "cmd_export_shapes",
    "cmd_train_teacher",
    "load_run_config",
    "register",
]


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` (repeatable), ``--output``, ``--device``, ``--resume [CKPT]``."""
    p.add_argument(
        "--config", "-c", metavar="TOML", help="config file (default: built-in defaults)"
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=2e-4 --set train.epochs=10 "
        '(repeatable; values are TOML: 1e-4, true, [1, 2], "text" or a bare word)',
    )
    p.add_argument("--output", "-o", metavar="DIR", help="run folder (sets train.output_dir)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (sets train.device)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT",
        help="continue a stopped run from CKPT (default: <output>/checkpoint.pt); without "
        "--config the checkpoint's own config is used (plus --set overrides)",
    )


def load_run_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The :class:`~ka_rs.engine.config.Config` for ``args`` and the resume target.

    Resume target: None, or the checkpoint path to continue from. With ``--resume`` and no
    ``--config``, the config stored in the checkpoint is the base.
    """
    from ka_rs.engine.config import Config, apply_overrides, load_config

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"train.output_dir={_toml_str(args.output)}")
    if args.device:
        overrides.append(f"train.device={_toml_str(args.device)}")
    resume: Path | None = None
    if args.resume is not None:
        if args.resume is True:
            if args.config:
                base = load_config(args.config, overrides)
            else:
                base = apply_overrides(Config(), overrides)
            resume = Path(base.train.output_dir) / "checkpoint.pt"
        else:
            resume = Path(args.resume)
        if not args.config:
            from ka_rs.engine.checkpoint import load_checkpoint

            ckpt = load_checkpoint(resume)
            cfg = Config.from_dict(ckpt.get("config") or {}, source=f"config in {resume}")
            return (apply_overrides(cfg, overrides) if overrides else cfg), resume
    return load_config(args.config, overrides), resume


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
# train-teacher


def cmd_train_teacher(args: argparse.Namespace) -> int:
    """Train one teacher; print a JSON summary on rank 0."""
    cfg, resume = load_run_config(args)  # config errors surface before torch is imported
    from ka_rs.engine.logging import output_errors
    from ka_rs.engine.train import summary_json, train_teacher

    if args.no_progress:
        cfg.train.progress = False
    with output_errors(cfg.train.output_dir):
        result = train_teacher(cfg, resume=resume)
    if _is_rank0():
        if result.eval_result is not None and sys.stderr.isatty():
            from rich.console import Console

            from ka_rs.engine.evaluate import results_table

            title = f"final evaluation: {result.output_dir}"
            Console(stderr=True).print(results_table(result.eval_result, title=title))
        print(summary_json(result))
    return 0


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") in ("", "0")


# ---------------------------------------------------------------------------------------------
# evaluate


def _parse_subsets(specs: list[str], model_classes: list[str]) -> dict[str, list[str]]:
    """``--subsets`` values: split presets / ``name=a,b;...`` strings, intersected with the
    model's classes (teachers with no class in the model are dropped)."""
    from ka_rs.data import get_split

    out: dict[str, list[str]] = {}
    known = set(model_classes)
    for spec in specs:
        for name, classes in get_split(spec).items():
            mine = [c for c in classes if c in known]
            if mine:
                out[name] = mine
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a detector from any teacher source; print a rich table and optionally JSON.

    With ``--skip-invalid`` invalid images and annotations are left out (as training's
    ``data.skip_invalid`` does) and the counts are printed (and stored under ``skipped`` in
    the JSON).
    """
    import json

    from rich.console import Console

    from ka_rs.data import DatasetError
    from ka_rs.engine.distributed import cleanup_distributed, init_distributed
    from ka_rs.engine.evaluate import evaluate, results_table
    from ka_rs.engine.logging import atomic_write_text
    from ka_rs.teachers import load_teacher

    teacher = load_teacher(args.checkpoint, classes=_classes_arg(args.classes))
    cfg = _evaluation_config(args, teacher.run_config)
    info = init_distributed(cfg.train.device)
    try:
        loader, skipped = _evaluation_loader(args, cfg, teacher.image_size, info)
        classes = [c for c in teacher.class_names if c is not None]
        subsets = _parse_subsets(args.subsets, classes)
        for spec in args.subset:
            name, _, names = spec.partition("=")
            if not names:
                raise ValueError(f"--subset {spec!r}: expected NAME=class,class,...")
            subsets[name] = [c.strip() for c in names.split(",") if c.strip()]
        result = evaluate(
            teacher.to(info.device),
            loader,
            teacher.class_names,
            subsets,
            device=info.device,
            class_head=teacher.head,
            progress=not args.no_progress,
        )
    except DatasetError as exc:
        if cfg.data.skip_invalid:
            raise
        hint = "--skip-invalid leaves invalid images and annotations out"
        raise DatasetError(exc.file, exc.item, f"{exc.problem} ({hint})") from exc
    finally:
        cleanup_distributed()
    if info.is_main:
        record = result.to_dict()
        if skipped is not None:
            record["skipped"] = skipped
        text = json.dumps(record, indent=2)
        if args.json == "-":
            print(text)
        else:
            Console().print(results_table(result, title=f"{args.checkpoint}"))
            if args.json:
                atomic_write_text(args.json, text)
    return 0


def _evaluation_config(args: argparse.Namespace, stored: dict[str, Any]) -> Any:
    """The run config ``ka-rs evaluate`` uses: ``--config``, else the one a ka_rs checkpoint
    stores (a student's: its data/train sections), else the defaults; then the flags.

    The detector's classes are scored on the data's full label set (matched by name), so any
    class subset of the config is dropped.
    """
    from ka_rs.engine.config import Config, apply_overrides, load_config

    if args.config:
        cfg = load_config(args.config)
    else:
        try:
            cfg = Config.from_dict(stored, source=f"config in {args.checkpoint}")
        except ValueError:
            try:  # e.g. a student's amalgamation config: keep its data/train sections
                engine = {k: v for k, v in stored.items() if k in ("data", "train")}
                cfg = Config.from_dict(engine, source=f"config in {args.checkpoint}")
            except ValueError:
                cfg = Config()
    overrides = list(args.overrides)
    if args.data == "coco" and not (args.root and args.ann_file):
        raise ValueError("--root and --ann-file: both required with --data coco")
    flags = {
        "source": args.data,
        "root": args.root,
        "val_root": args.root if args.data == "coco" else None,
        "val_ann_file": args.ann_file,
        "ann_file": args.ann_file,  # a coco config needs one; evaluation reads val_ann_file
        "val_set": args.split,
    }
    overrides += [f"data.{k}={_toml_str(v)}" for k, v in flags.items() if v is not None]
    if args.num_images is not None:
        overrides.append(f"data.num_val_images={int(args.num_images)}")
    if args.image_size:
        overrides.append(f"data.image_size={int(args.image_size)}")
    if args.device:
        overrides.append(f"train.device={_toml_str(args.device)}")
    if args.skip_invalid:
        overrides.append("data.skip_invalid=true")
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    cfg.data.classes, cfg.data.split, cfg.data.teacher = [], "", ""
    return cfg


def _evaluation_loader(
    args: argparse.Namespace, cfg: Any, image_size: int, info: Any
) -> tuple[Any, dict[str, int] | None]:
    """The evaluation DataLoader (this rank's shard) and, with ``--skip-invalid``, the counts
    of what was left out."""
    import torch

    from ka_rs.engine.datasets import build_datasets, preset_hints
    from ka_rs.engine.evaluate import make_eval_loader

    data = cfg.data
    size = image_size or int(preset_hints(cfg.model.preset).get("image_size", 128))
    _, val_ds, _ = build_datasets(data, image_size=size, train=False)
    skipped: dict[str, int] | None = None
    if data.skip_invalid and data.source != "shapes":
        val_ds, skipped = _without_invalid_images(val_ds)
        if not skipped["scored_images"]:
            raise ValueError(
                f"--skip-invalid: all {skipped['images']} image(s) of the evaluation data "
                "are invalid; nothing to evaluate"
            )
        if info.is_main:
            print(
                f"ka-rs evaluate: skipped {skipped['images']} invalid image(s) and "
                f"{skipped['annotations']} invalid annotation(s); scoring "
                f"{skipped['scored_images']} image(s)",
                file=sys.stderr,
            )
    bs = args.batch_size or cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    loader = make_eval_loader(val_ds, bs, args.num_workers, info)
    loader.generator = torch.Generator().manual_seed(0)
    return loader, skipped


def _without_invalid_images(dataset: Any) -> tuple[Any, dict[str, int]]:
    """Decode every image of an evaluation dataset built with ``skip_invalid`` once, and
    leave the unreadable ones out; return it with the counts of what was skipped.

    The check runs up front because a dataset that meets an unreadable image while loading
    substitutes the next one, and an evaluation would then score that image twice. Skipped
    images are not scored (their ground truth is not counted either).
    """
    import torch

    base = dataset
    while not hasattr(base, "check_images") and hasattr(base, "dataset"):
        base = base.dataset
    if not hasattr(base, "check_images"):
        return dataset, {"images": 0, "annotations": 0, "scored_images": len(dataset)}
    bad = set(base.check_images())
    if bad and len(base) == len(dataset):  # wrappers such as ClassSubset keep every image
        keep = [i for i in range(len(dataset)) if i not in bad]
        dataset = torch.utils.data.Subset(dataset, keep)
    found = list(getattr(base, "skipped", []))
    counts = {
        "images": sum(s.kind == "image" for s in found),
        "annotations": sum(s.kind == "annotation" for s in found),
        "scored_images": len(dataset),
    }
    return dataset, counts


def _classes_arg(spec: str | None) -> Any:
    """``--classes``: a file of names, or a comma-separated list; None when not given."""
    if not spec:
        return None
    if Path(spec).is_file() or "," not in spec:
        return spec
    return [c.strip() for c in spec.split(",") if c.strip()]


# ---------------------------------------------------------------------------------------------
# convert


def cmd_convert(args: argparse.Namespace) -> int:
    """Write any teacher source as a ka_rs checkpoint (config, class names, weights)."""
    import json

    from ka_rs.engine.logging import output_errors
    from ka_rs.teachers import load_teacher
    from ka_rs.teachers.convert import save_teacher_checkpoint

    teacher = load_teacher(args.source, classes=_classes_arg(args.classes))
    with output_errors(args.dest):
        path = save_teacher_checkpoint(teacher, args.dest)
    summary = {"source": args.source, "checkpoint": str(path), **teacher.describe()}
    summary.pop("class_names", None)
    summary["num_classes"] = len(teacher.classes)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# export-shapes


def cmd_export_shapes(args: argparse.Namespace) -> int:
    """Write the embedded shapes dataset to DIR in COCO layout."""
    import json

    from ka_rs.data import export_shapes
    from ka_rs.engine.logging import output_errors

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    num: int | dict[str, int] | None = args.num_images
    with output_errors(args.dir):
        res = export_shapes(
            args.dir,
            splits=splits,
            seed=args.seed,
            num_images=num,
            image_size=args.image_size,
            image_format=args.format,
            progress=not args.no_progress and sys.stdout.isatty(),
        )
    print(json.dumps(res, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# registration


def register(sub: Any) -> None:
    """Add ``train-teacher``, ``evaluate`` and ``export-shapes`` to the ``ka-rs`` parser."""
    p = sub.add_parser(
        "train-teacher",
        help="train one DETR teacher (resumable; runs under torchrun)",
        description="Train a DETR teacher on shapes / COCO / VOC data as a TOML config says. "
        "Writes <output>/config.toml, metrics.jsonl, checkpoint.pt, eval.json and curves.png.",
    )
    add_config_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser(
        "evaluate",
        help="COCO AP / AP50 / AP75 of a detector (any teacher source), overall and per subset",
        description="Evaluate a detector: a ka_rs checkpoint, detr:PATH (facebookresearch/detr), "
        "hf:DIR or hf:ORG/ID (Hugging Face). By default on the validation data of the config "
        "stored in a ka_rs checkpoint; --data/--root/--ann-file/--split choose another "
        "dataset. Only the model's classes are scored (matched to the data by name).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="SOURCE",
        help="ka_rs checkpoint path, detr:PATH, detr-c5:PATH, detr-dc5:PATH, hf:DIR, hf:ORG/ID",
    )
    p.add_argument(
        "--classes",
        metavar="FILE|a,b,c",
        help="the detector's class names in head order (needed for non-COCO detr: files)",
    )
    p.add_argument(
        "--image-size",
        dest="image_size",
        type=int,
        default=0,
        help="shorter image side (default: the source's training size)",
    )
    p.add_argument("--config", "-c", metavar="TOML", help="take the data section from here")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[])
    p.add_argument("--data", choices=("shapes", "coco", "voc"), help="dataset kind")
    p.add_argument("--root", help="coco: image folder; voc: the VOC folder")
    p.add_argument("--ann-file", dest="ann_file", help="coco: annotation JSON")
    p.add_argument("--split", help="shapes split (val/test) or VOC image set (e.g. test)")
    p.add_argument("--num-images", dest="num_images", type=int, help="shapes: number of images")
    p.add_argument(
        "--subsets",
        action="append",
        default=[],
        metavar="SPLIT",
        help="also score each teacher's classes of a split preset (e.g. shapes-halves) or "
        "'name=a,b;name2=c'",
    )
    p.add_argument("--subset", action="append", default=[], metavar="NAME=a,b,c")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=0)
    p.add_argument("--num-workers", dest="num_workers", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON ('-' = stdout)")
    p.add_argument(
        "--skip-invalid",
        dest="skip_invalid",
        action="store_true",
        help="leave invalid images (unreadable, wrong size) and annotations out instead of "
        "stopping (like data.skip_invalid in training); says how many were skipped",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "convert",
        help="write any teacher source (detr:, hf:, ...) as a ka_rs checkpoint",
        description="Convert a teacher source into a ka_rs checkpoint (model config, class "
        "names, weights) that every ka-rs command and ka_rs.load_teacher read.",
    )
    p.add_argument("source", metavar="SOURCE", help="detr:PATH, hf:DIR, hf:ORG/ID, ...")
    p.add_argument("dest", metavar="DEST", help="the checkpoint file to write (.pt)")
    p.add_argument("--classes", metavar="FILE|a,b,c", help="class names in head order")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export-shapes",
        help="write the embedded shapes dataset to a folder in COCO format",
        description="Write DIR/<split>/*.png and DIR/annotations/instances_<split>.json.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits")
    p.add_argument("--num-images", dest="num_images", type=int, default=None)
    p.add_argument("--image-size", dest="image_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png", "jpeg"), default="png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export_shapes)

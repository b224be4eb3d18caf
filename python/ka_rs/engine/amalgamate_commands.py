"""``ka-rs`` subcommands of the amalgamation engine: ``amalgamate``, ``demo``, ``ablate``.

Registered by :mod:`ka_rs.cli`. Only argparse is imported at module level; torch and the
engine load when a command runs. A failed write of a run's outputs ends the command with
``ka-rs <command>: error: <path>: <reason>``
(:func:`ka_rs.engine.logging.output_errors`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["cmd_ablate", "cmd_amalgamate", "cmd_demo", "register"]


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


# ---------------------------------------------------------------------------------------------
# amalgamate


def load_amalgamate_run_config(args: argparse.Namespace) -> tuple[Any, Path | None]:
    """The :class:`~ka_rs.engine.amalgamate.AmalgamateConfig` for ``args`` and the resume path.

    With ``--resume`` and no ``--config``, the config stored in the checkpoint is the base
    (``--set`` / ``--teacher`` still apply).
    """
    from ka_rs.engine.amalgamate_config import (
        AmalgamateConfig,
        apply_amalgamate_overrides,
        load_amalgamate_config,
    )
    from ka_rs.engine.checkpoint import load_checkpoint

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"train.output_dir={_toml_str(args.output)}")
    if args.device:
        overrides.append(f"train.device={_toml_str(args.device)}")
    if args.no_progress:
        overrides.append("train.progress=false")
    teachers = list(args.teacher)
    classes = list(args.teacher_classes)
    resume: Path | None = None
    if args.resume is not None:
        if args.resume is True:
            base = load_amalgamate_config(args.config, overrides, teachers, classes)
            resume = Path(base.train.output_dir) / "checkpoint.pt"
        else:
            resume = Path(args.resume)
        if not args.config:
            ckpt = load_checkpoint(resume)
            cfg = AmalgamateConfig.from_dict(ckpt.get("config") or {}, source=f"config in {resume}")
            return apply_amalgamate_overrides(cfg, overrides, teachers, classes), resume
    return load_amalgamate_config(args.config, overrides, teachers, classes), resume


def cmd_amalgamate(args: argparse.Namespace) -> int:
    """Train a student from N ≥ 2 teachers; print a JSON summary on rank 0."""
    import json

    from ka_rs.engine.amalgamate import amalgamate
    from ka_rs.engine.logging import output_errors

    cfg, resume = load_amalgamate_run_config(args)
    with output_errors(cfg.train.output_dir):
        result = amalgamate(cfg, resume=resume)
    if _is_rank0():
        print(json.dumps(result.summary(), indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# demo / ablate


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _default_output(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_demo(args: argparse.Namespace) -> int:
    """Teachers (cached) -> label-free student -> evaluation, table, report, figures."""
    from ka_rs.demo import flag_overrides, load_demo_config, run_demo
    from ka_rs.engine.logging import output_errors

    _set_threads(args.threads)
    overrides = flag_overrides(
        args.overrides, teachers=args.teachers, seeds=args.seeds, eval_split=args.eval_split
    )
    cfg = load_demo_config(args.config, overrides, quick=args.quick)
    out = (
        Path(args.output)
        if args.output
        else _default_output("demo-quick" if args.quick else "demo")
    )
    with output_errors(out):
        res = run_demo(cfg, out, args.cache_dir, fresh=args.fresh, progress=not args.no_progress)
    if args.check and not args.quick:
        ratio = res.get("min_ratio_AP50")
        if ratio is None or ratio < 0.9:
            print(f"ka-rs demo: student/teacher AP50 {ratio} is below 0.9")
            return 1
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """The loss ablation on the demo's teachers and budget."""
    from ka_rs.demo import VARIANTS, flag_overrides, load_demo_config, run_ablation
    from ka_rs.engine.logging import output_errors

    _set_threads(args.threads)
    overrides = flag_overrides(
        args.overrides,
        teachers=args.teachers,
        seeds=args.seeds,
        eval_split=args.eval_split,
        ablate=True,
    )
    cfg = load_demo_config(args.config, overrides, quick=args.quick)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    out = (
        Path(args.output)
        if args.output
        else _default_output("ablate-quick" if args.quick else "ablate")
    )
    with output_errors(out):
        run_ablation(
            cfg,
            out,
            args.cache_dir,
            variants=variants,
            progress=not args.no_progress,
            reuse=not args.no_reuse,
        )
    return 0


def _add_demo_arguments(p: argparse.ArgumentParser, seeds_help: str) -> None:
    p.add_argument(
        "--config", "-c", metavar="TOML", help="demo config (default: built-in = configs/demo.toml)"
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. --set teacher.train.max_steps=800 "
        "--set student.amalgamation.student_layout=slots --set demo.num_eval_images=200",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run with tiny budgets (no accuracy bar)"
    )
    p.add_argument("--output", "-o", metavar="DIR", help="run folder (default runs/<name>-<time>)")
    p.add_argument(
        "--cache-dir",
        dest="cache_dir",
        metavar="DIR",
        help="teacher cache (default $KA_RS_CACHE or ~/.cache/ka_rs)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--teachers",
        type=int,
        choices=(2, 3),
        help="2: two teachers on disjoint halves of the shapes classes (shapes-halves, the "
        "default); 3: three teachers on overlapping thirds (shapes-thirds-overlap)",
    )
    p.add_argument("--seeds", type=int, metavar="K", help=seeds_help)
    p.add_argument(
        "--eval-split",
        dest="eval_split",
        choices=("val", "test"),
        help="images the tables are computed on: test (held-out, the default; report only) or "
        "val (the split to choose settings on)",
    )


def register(sub: Any) -> None:
    """Add ``amalgamate``, ``demo`` and ``ablate`` to the ``ka-rs`` parser."""
    from ka_rs.engine.commands import add_config_arguments

    p = sub.add_parser(
        "amalgamate",
        help="train one student from N >= 2 frozen teachers (SA + TA; resumable; torchrun)",
        description="Knowledge amalgamation: a student over the union of the teachers' classes "
        "learns from frozen teacher checkpoints (label-free by default). Writes <output>/"
        "config.toml, metrics.jsonl, checkpoint.pt, eval.json and curves.png.",
    )
    p.add_argument(
        "--teacher",
        "-t",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="a teacher, once per teacher in slot order: a ka_rs checkpoint path, "
        "detr:PATH (facebookresearch/detr; detr-c5:/detr-dc5: state the backbone), "
        "hf:DIR or hf:ORG/ID (Hugging Face)",
    )
    p.add_argument(
        "--teacher-classes",
        dest="teacher_classes",
        action="append",
        default=[],
        metavar="NAME=FILE|a,b,c",
        help="class names of teacher NAME in its head's order (a file with one per line, or "
        "a comma-separated list; N/A marks a non-class slot)",
    )
    add_config_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_amalgamate)

    p = sub.add_parser(
        "demo",
        help="train two (or three) teachers on the embedded shapes data, amalgamate a "
        "label-free student",
        description="Teachers on disjoint halves of the shapes classes (--teachers 3: "
        "overlapping thirds; cached), a label-free student amalgamated from them (--seeds K: "
        "K students, mean +- sd), evaluation on held-out images, a rich table and a run folder "
        "with report.md, results.json and PNG figures.",
    )
    _add_demo_arguments(
        p,
        "student seeds (default: demo.seeds, 1): K students, headline numbers mean +- sd",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="retrain the teachers and every student seed (ignore the cache)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless the student reaches 0.9x each teacher's AP50 (mean over seeds)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "ablate",
        help="loss ablation on the demo's teachers: TA / SA+TA / aggregation+TA / cross-slot",
        description="Train students per variant and seed from the demo's (cached) teachers "
        "with the demo's budget and print/save the table (AP, AP50 per teacher subset and "
        "union: mean +- sd over seeds; paired differences with 95% t-intervals) and "
        "ablation.png.",
    )
    _add_demo_arguments(
        p,
        "student seeds per variant (default: demo.ablate_seeds, 3), the same for every variant",
    )
    p.add_argument(
        "--variants", help="comma-separated subset of: ta, sa_ta, aggregation_ta, sa_ta_cross"
    )
    p.add_argument(
        "--no-reuse",
        action="store_true",
        help="retrain every variant (default: reuse a cached identical run, e.g. the demo's)",
    )
    p.set_defaults(func=cmd_ablate)

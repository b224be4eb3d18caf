"""Write facebookresearch/detr ``main.py`` checkpoints built by the OFFICIAL code (random weights).

Not part of CI (it needs a checkout of https://github.com/facebookresearch/detr, which ka_rs
never vendors). It stands in for the teachers a user trained with DETR's ``main.py``: the same
files, key names, ``args`` namespace and optimiser state, with random weights (frozen BatchNorm
statistics randomised as in tools/verify_official_detr.py), so that ``detr:`` sources can be run
end to end (``ka-rs amalgamate``, ``ka-rs evaluate``) and timed without a GPU-trained model.

Usage::

    mkdir -p /tmp/detr && git -C <detr clone> archive HEAD | tar -x -C /tmp/detr
    python tools/make_detr_teachers.py --detr-repo /tmp/detr --out /tmp/teachers \\
        --teacher a=circle,square,triangle,star --teacher b=cross,ring,diamond,crescent

writes ``/tmp/teachers/a.pth`` (a DETR-R50 with a 4-class head, +1 "no object") and ``b.pth``,
and ``a.txt`` / ``b.txt`` with their class names (for ``--teacher-classes``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from verify_official_detr import import_official, randomise_frozen_bn


def main(argv: list[str] | None = None) -> int:
    """Build and save one official DETR per ``--teacher NAME=class,class,...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detr-repo", type=Path, required=True, help="facebookresearch/detr")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--teacher", action="append", required=True, metavar="NAME=c1,c2,...", help="repeatable"
    )
    parser.add_argument("--backbone", default="resnet50", choices=("resnet50", "resnet101"))
    parser.add_argument("--dilation", action="store_true", help="DC5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--foreground-bias",
        type=float,
        default=2.0,
        help="added to the foreground logits' biases so that random weights still give "
        "confident detections (TA gets pseudo-targets, as from a trained teacher); 0 = none",
    )
    opts = parser.parse_args(argv)
    official_main, official_models, _ = import_official(opts.detr_repo.resolve())
    opts.out.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(opts.teacher):
        name, _, classes = spec.partition("=")
        names = [c.strip() for c in classes.split(",") if c.strip()]
        if not name or not names:
            raise SystemExit(f"--teacher {spec!r}: expected NAME=class,class,...")
        extra = ["--backbone", opts.backbone] + (["--dilation"] if opts.dilation else [])
        args = official_main.get_args_parser().parse_args(["--device", "cpu", *extra])
        torch.manual_seed(opts.seed + i)
        model, _, _ = official_models.build_model(args)
        # a head over this teacher's classes (+1 "no object"), as main.py builds for a dataset
        # with len(names) classes
        model.class_embed = torch.nn.Linear(model.class_embed.in_features, len(names) + 1)
        with torch.no_grad():
            model.class_embed.bias[:-1] += opts.foreground_bias
            randomise_frozen_bn(model, torch.Generator().manual_seed(opts.seed + 100 + i))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
        path = opts.out / f"{name}.pth"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "epoch": 0,
                "args": args,
            },
            path,
        )
        (opts.out / f"{name}.txt").write_text("\n".join(names) + "\n")
        print(f"{path}: DETR-{opts.backbone}{'-DC5' if opts.dilation else ''}, classes {names}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Check ka_rs's ``detr:`` teachers against the OFFICIAL facebookresearch/detr code.

Not part of CI (it needs a checkout of https://github.com/facebookresearch/detr, which ka_rs
never vendors). For each architecture it builds the official model with ``models.build_model``
(random weights; ``models.backbone.is_main_process`` patched to return False so torchvision does
not download ImageNet weights), randomises its frozen-BatchNorm statistics (they are the
identity when built), saves it as a model-zoo file (``{"model": ...}``) and as a ``main.py``
checkpoint (``model``, ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``), loads both with
``ka_rs.teachers.load_teacher`` and runs the official model and the teacher on the same padded
random images (a ``NestedTensor`` for the official model, ka_rs's padding mask for the teacher).
It prints max |Δ| of ``pred_logits``, ``pred_boxes`` and the auxiliary outputs per model and
exits with status 1 when one exceeds ``--tol``.

Usage::

    mkdir -p /tmp/detr && git -C <detr clone> archive HEAD | tar -x -C /tmp/detr
    python tools/verify_official_detr.py --detr-repo /tmp/detr
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

#: (row name, official main.py arguments, source prefix for the zoo file)
MODELS: tuple[tuple[str, list[str], str], ...] = (
    ("R50", [], "detr-c5"),
    ("R50 pre-norm", ["--pre_norm"], "detr-c5"),
    ("R101", ["--backbone", "resnet101"], "detr-c5"),
    ("DC5-R50", ["--dilation"], "detr-dc5"),
    ("DC5-R101", ["--backbone", "resnet101", "--dilation"], "detr-dc5"),
)


def check_frozen_bn(official_backbone: ModuleType) -> float:
    """max |Δ| between the official FrozenBatchNorm2d and ka_rs's, with variances near 0.

    The official one hard-codes eps 1e-5 in its forward; with running variances of ~1e-5 a
    different eps would show as an O(1) difference.
    """
    from ka_rs.models.backbone import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(123)
    theirs, ours = official_backbone.FrozenBatchNorm2d(8), FrozenBatchNorm2d(8)
    state = {
        "weight": torch.rand(8, generator=gen) + 0.5,
        "bias": torch.randn(8, generator=gen),
        "running_mean": torch.randn(8, generator=gen),
        "running_var": torch.rand(8, generator=gen) * 2e-5,
    }
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.randn(2, 8, 5, 5, generator=gen)
    return max_abs(theirs(x), ours(x))


def import_official(repo: Path) -> tuple[ModuleType, ModuleType, Any]:
    """The official ``main`` and ``models`` modules and ``NestedTensor``, imported from ``repo``.

    ``models.backbone.is_main_process`` is patched to return False: the official backbone then
    asks torchvision for no pretrained weights (nothing is downloaded).
    """
    if not (repo / "models" / "detr.py").is_file() or not (repo / "main.py").is_file():
        raise SystemExit(f"--detr-repo {repo}: not a facebookresearch/detr checkout")
    sys.path.insert(0, str(repo))
    import main as official_main  # type: ignore[import-not-found]
    import models as official_models  # type: ignore[import-not-found]
    import models.backbone as official_backbone  # type: ignore[import-not-found]
    from util.misc import NestedTensor  # type: ignore[import-not-found]

    official_backbone.is_main_process = lambda: False
    return official_main, official_models, NestedTensor


def randomise_frozen_bn(model: nn.Module, generator: torch.Generator) -> int:
    """Give every frozen BatchNorm random statistics and affine terms; returns their count.

    The official model builds them as the identity (weight 1, bias 0, mean 0, var 1), which
    would not test their use. Gains stay below 1 so 100 layers of random convolutions keep
    finite activations.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ != "FrozenBatchNorm2d":
            continue
        n = module.weight.numel()
        module.weight.copy_(torch.rand(n, generator=generator) * 0.3 + 0.2)
        module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
        module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
        module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        count += 1
    return count


def padded_batch(size: tuple[int, int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two standardised random images (B=2, 3, H, W), the second padded right and bottom.

    Returns ``(images, mask)``; ``mask`` (2, H, W) bool, True = padded pixel, and the padded
    pixels are 0 (as ``nested_tensor_from_tensor_list`` pads).
    """
    h, w = size
    images = torch.randn(2, 3, h, w, generator=generator)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, (h * 3) // 4 :, :] = True
    mask[1, :, (w * 2) // 3 :] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def max_abs(a: Tensor, b: Tensor) -> float:
    """max |a - b| (shapes must agree)."""
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch: official {tuple(a.shape)} vs ka_rs {tuple(b.shape)}")
    return float((a - b).abs().max())


def compare(official: dict[str, Any], ours: Any) -> dict[str, float]:
    """max |Δ| of the final and (max over layers) auxiliary logits and boxes."""
    aux_o, aux_k = official.get("aux_outputs", []), ours.aux_outputs
    if len(aux_o) != len(aux_k):
        raise SystemExit(f"aux outputs: official {len(aux_o)} layers, ka_rs {len(aux_k)}")
    return {
        "logits": max_abs(official["pred_logits"], ours.pred_logits),
        "boxes": max_abs(official["pred_boxes"], ours.pred_boxes),
        "aux logits": max((max_abs(a["pred_logits"], b["pred_logits"])
                           for a, b in zip(aux_o, aux_k, strict=True)), default=0.0),
        "aux boxes": max((max_abs(a["pred_boxes"], b["pred_boxes"])
                          for a, b in zip(aux_o, aux_k, strict=True)), default=0.0),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit status (0 = every |Δ| ≤ --tol)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detr-repo", type=Path, required=True, help="facebookresearch/detr")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 288), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    # the official backbone passes torchvision's deprecated pretrained=; nothing to act on
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")

    official_main, official_models, nested_tensor = import_official(opts.detr_repo.resolve())
    from ka_rs.models.backbone import FrozenBatchNorm2d
    from ka_rs.teachers import DetrTeacher, load_teacher

    bn_diff = check_frozen_bn(sys.modules["models.backbone"])
    header = (
        "model", "file", "source", "stride", "max|feat|", "max|logit|",
        "features", "logits", "boxes", "aux logits", "aux boxes",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="verify_detr_") as tmp:
        for name, extra, zoo_prefix in MODELS:
            if opts.only and name not in opts.only:
                continue
            t0 = time.perf_counter()
            args = official_main.get_args_parser().parse_args(["--device", "cpu", *extra])
            torch.manual_seed(opts.seed)
            model, _, _ = official_models.build_model(args)
            gen = torch.Generator().manual_seed(opts.seed + 1)
            with torch.no_grad():
                n_bn = randomise_frozen_bn(model, gen)
            model.eval()
            assert n_bn > 0, "no FrozenBatchNorm2d found in the official model"
            # the official FrozenBatchNorm2d uses eps 1e-5 (hard-coded in its forward);
            # ka_rs's default must match
            assert FrozenBatchNorm2d(1).eps == 1e-5

            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
            stem = name.lower().replace(" ", "-")
            zoo = Path(tmp) / f"detr-{stem}-zoo.pth"
            ckpt = Path(tmp) / f"{stem}-checkpoint.pth"
            state = model.state_dict()
            torch.save({"model": state}, zoo)
            torch.save(
                {
                    "model": state,
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(),
                    "epoch": 7,
                    "args": args,
                },
                ckpt,
            )
            del optimizer, scheduler, params

            images, mask = padded_batch(tuple(opts.size), gen)
            with torch.no_grad():
                official = model(nested_tensor(images, mask))
                official_feats = model.backbone(nested_tensor(images, mask))[0][-1].tensors
            for label, source in (("zoo", f"{zoo_prefix}:{zoo}"), ("main.py", f"detr:{ckpt}")):
                teacher = load_teacher(source)
                assert isinstance(teacher, DetrTeacher)
                assert teacher.info["layout"] == label, teacher.info
                assert teacher.detr_config is not None
                with torch.no_grad():
                    ours = teacher(images, mask)
                    feats = teacher.model.backbone(images, mask)[0]
                diffs = {"features": max_abs(official_feats, feats), **compare(official, ours)}
                worst = max(worst, *diffs.values())
                stride = 16 if teacher.detr_config.dilation else 32
                feat_scale = float(official_feats.abs().max())
                scale = float(official["pred_logits"].abs().max())
                rows.append(
                    (name, label, f"{zoo_prefix if label == 'zoo' else 'detr'}:", str(stride),
                     f"{feat_scale:.2f}", f"{scale:.2f}", *(f"{v:.2e}" for v in diffs.values()))
                )  # fmt: skip
                del teacher, ours
            del model, official, official_feats, state
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"max |official - ka_rs| over B=2 padded {opts.size[0]}x{opts.size[1]} images, "
          f"seed {opts.seed}, float32 CPU")  # fmt: skip
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(line)
    print(f"FrozenBatchNorm2d (official eps 1e-5 vs ka_rs, variances ~1e-5): max |Δ| {bn_diff:.2e}")
    worst = max(worst, bn_diff)
    ok = worst <= opts.tol
    print(f"worst {worst:.2e} {'<=' if ok else '>'} tol {opts.tol:.0e}: {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

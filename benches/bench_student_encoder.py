"""Benchmark: inference cost of the amalgamation student's layouts against its teachers.

Variants, all built in this process from one preset (random weights: the cost does not depend
on them), N = ``--teachers`` teachers of ``--classes`` classes each, the student over N·classes:

* ``teacher``: one teacher (a plain DETR);
* ``teachers_side_by_side``: all N teachers run one after the other on the batch (what an
  ensemble of the teachers costs);
* ``slots_masked``: the N-slot student, no cross-slot attention, encoder as ONE masked
  attention over N·S tokens (``slot_encoder="masked"``, the implementation before the per-slot
  encoder) -- the baseline of the ratios;
* ``slots_per_slot``: the same student (same weights), encoder as N·B sequences of S tokens
  (``slot_encoder="per_slot"``, the default);
* ``compact``: the compact student (``student_layout="compact"``): S encoder tokens.

``--encoder-only`` adds rows timing only the encoder call (:meth:`DETR.encode` on a prepared
encoder input) of the three students, which isolates what the per-slot encoder changes.

Timing: inference (eval mode, ``torch.inference_mode``), images of ``--image-size`` pixels, no
padding. Rounds are interleaved (every variant once per round, in rotating order) so that load
changes hit all variants alike; after ``--warmup`` untimed rounds each round times one forward
per variant. Printed per batch size: parameters (all, and those inference uses: the compact
student's SA heads only run in training), the median time per batch, images per second from
it, forward GFLOP per image (torch's FLOP formulas: matmuls, convolutions, attention),
the ratio of medians to ``slots_masked`` and the median of the per-round ratios; the load
average before and after. The machine may be shared: quote the load with the figures.

    python benches/bench_student_encoder.py --preset anchor_tiny --image-size 96 \\
        --batch 16 1 --threads 2 --rounds 15
    python benches/bench_student_encoder.py --preset detr_r50 --image-size 512 --batch 1 \\
        --threads 2 --rounds 5 --variants slots_masked slots_per_slot compact
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from ka_rs.engine.amp import cpu_model_name
from ka_rs.models import build_model
from ka_rs.models.presets import preset_config
from ka_rs.models.student import AmalgamationStudent, build_student
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

VARIANTS = ("teacher", "teachers_side_by_side", "slots_masked", "slots_per_slot", "compact")
BASELINE = "slots_masked"


def _cpu_name() -> str:
    return cpu_model_name() or platform.machine()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inference_params(module: nn.Module) -> int:
    """Parameters a forward in eval mode uses (the compact student's SA heads are training-only)."""
    heads = getattr(module, "sa_heads", None)
    return _params(module) - (_params(heads) if heads is not None else 0)


def build_variants(
    preset: str, teachers: int, classes: int, seed: int = 0, student_queries: int = 0
) -> tuple[dict[str, list[nn.Module]], dict[str, AmalgamationStudent]]:
    """``{variant: [models it runs]}`` and ``{variant: student}`` for the student variants
    (``student_queries`` > 0: the students' query count, e.g. the demo's 60)."""
    torch.manual_seed(seed)
    t_models = [build_model(preset, classes).eval() for _ in range(teachers)]
    cfgs = [preset_config(preset, classes) for _ in range(teachers)]
    extra: dict[str, Any] = {"num_queries": student_queries} if student_queries > 0 else {}
    n = teachers * classes
    masked = build_student(cfgs, n, slot_encoder="masked", **extra).eval()
    per_slot = build_student(cfgs, n, slot_encoder="per_slot", **extra).eval()
    per_slot.load_state_dict(masked.state_dict())
    compact = build_student(cfgs, n, layout="compact", **extra).eval()
    students = {"slots_masked": masked, "slots_per_slot": per_slot, "compact": compact}
    models: dict[str, list[nn.Module]] = {
        "teacher": t_models[:1],
        "teachers_side_by_side": t_models,
        **{k: [v] for k, v in students.items()},
    }
    return models, students


def _forward_fn(models: list[nn.Module], images: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        return [m(images) for m in models]

    return run


def _encoder_fn(student: AmalgamationStudent, images: torch.Tensor) -> Callable[[], Any]:
    """The student's encoder alone, on the encoder input of ``images`` (computed once)."""
    with torch.inference_mode():
        mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
        features, feat_mask = student.backbone(images, mask)
        pos = student.position(feat_mask).to(features.dtype)
        enc = student.encoder_input(features, feat_mask, pos)

    def run() -> Any:
        return student.encode(enc, None)

    return run


class _FlopCount(TorchDispatchMode):
    """Sums torch's FLOP formulas (``torch.utils.flop_counter.flop_registry``: matmuls,
    convolutions, attention) over every op run inside it. FlopCounterMode itself is not used:
    its per-module tracker needs autograd graph nodes that a no-grad forward does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:

            def shape(x: Any) -> Any:
                return x.shape if isinstance(x, torch.Tensor) else x

            self.total += formula(
                *tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out)
            )
        return out


def _gflop_per_image(fn: Callable[[], Any], batch: int) -> float:
    """Forward GFLOP per image by torch's FLOP formulas (a multiply-add counts as 2 FLOPs;
    element-wise ops, softmax and norms are not counted)."""
    with torch.no_grad(), _FlopCount() as counter:
        fn()
    return counter.total / batch / 1e9


def measure(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], list[str]]:
    """Interleaved timing: per variant, the seconds of each timed round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                fns[name]()
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[name].append(elapsed)
    return times, names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print the table; returns the results (also ``--out`` JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="anchor_tiny")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--classes", type=int, default=4, help="classes per teacher")
    ap.add_argument(
        "--student-queries", type=int, default=0, help="students' queries (0: the teachers')"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--encoder-only", action="store_true", help="also time the encoders alone")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if BASELINE not in args.variants:
        args.variants = [BASELINE, *args.variants]
    torch.set_num_threads(args.threads)
    models, students = build_variants(
        args.preset, args.teachers, args.classes, student_queries=args.student_queries
    )
    load_before = os.getloadavg()
    print(
        f"preset {args.preset}, {args.teachers} teachers x {args.classes} classes, "
        f"student queries {args.student_queries or 'as the teachers'}, "
        f"{args.image_size} px, {args.threads} threads, {args.rounds} rounds "
        f"(+{args.warmup} warm-up), torch {torch.__version__}, {_cpu_name()}; "
        f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )
    results: dict[str, Any] = {"args": vars(args), "load_before": load_before, "rows": []}
    header = (
        f"{'variant':<26}{'params':>9}{'infer.':>9}{'GFLOP/img':>10}{'batch':>6}{'ms/batch':>10}"
        f"{'img/s':>9}{'x masked':>10}{'med. ratio':>11}"
    )
    for batch in args.batch:
        images = torch.randn(batch, 3, args.image_size, args.image_size)
        fns = {v: _forward_fn(models[v], images) for v in args.variants}
        if args.encoder_only:
            for name, student in students.items():
                if name in args.variants:
                    fns[f"encoder:{name}"] = _encoder_fn(student, images)
        times, names = measure(fns, args.rounds, args.warmup)
        print()
        print(header)
        for name in names:
            base = BASELINE if not name.startswith("encoder:") else f"encoder:{BASELINE}"
            med = statistics.median(times[name])
            base_med = statistics.median(times[base])
            per_round = statistics.median(
                t / b for t, b in zip(times[name], times[base], strict=True)
            )
            mods = models[name.removeprefix("encoder:")]
            params = sum(_params(m) for m in mods)
            infer = sum(_inference_params(m) for m in mods)
            gflop = _gflop_per_image(fns[name], batch)
            row = {
                "variant": name,
                "batch": batch,
                "params": params,
                "inference_params": infer,
                "gflop_per_image": gflop,
                "median_s": med,
                "img_per_s": batch / med,
                "ratio_of_medians": med / base_med,
                "median_ratio": per_round,
            }
            results["rows"].append(row)
            print(
                f"{name:<26}{params / 1e6:>8.2f}M{infer / 1e6:>8.2f}M{gflop:>10.3f}{batch:>6}"
                f"{med * 1e3:>10.1f}{batch / med:>9.1f}{med / base_med:>10.2f}{per_round:>11.2f}"
            )
    load_after = os.getloadavg()
    results["load_after"] = load_after
    print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

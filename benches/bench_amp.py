"""Benchmark: one teacher training step under each mixed-precision mode (``train.amp``).

The step is :meth:`ka_rs.engine.loop.TrainLoop.train_step` of the loop that
:func:`ka_rs.engine.train.build_teacher_loop` builds for ``configs/teacher_shapes.toml`` (the
``anchor_tiny`` preset, batch 16, 96 px shapes images): forward, set-criterion losses,
backward, gradient clipping and the AdamW step. Data loading is excluded: a few batches are
drawn once and reused. Variants, each with its own loop (same seed, same initial weights):

* ``off`` / ``bf16`` / ``fp16``: ``train.amp``, with the fused AdamW kernel off and on
  (``optim.fused``);
* ``bf16-naive`` (reference, not a mode): the forward **and** the losses under bf16 autocast
  with the attention in bf16 too (what wrapping the whole step in ``torch.autocast`` gives),
  fused AdamW on.

Rounds are interleaved (every variant once per round, in rotating order) so that load
changes hit all variants alike; each round times ``--steps`` steps per variant. Printed: the
median step time per variant and its ratio to ``off`` (non-fused) from the medians, and the
median of the per-round ratios, with the load average before and after. The machine may be
shared: quote the load with the figures.

    python benches/bench_amp.py --threads 1 --rounds 7 --steps 4 --out bench_amp.json

``--optimizer`` instead times the AdamW step alone on the same model's parameters (random
gradients), fused kernel vs torch's default implementation, interleaved (30 rounds of 10 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
from ka_rs.engine import amp as amp_mod
from ka_rs.engine.config import load_config
from ka_rs.engine.distributed import DistInfo
from ka_rs.engine.loop import TrainLoop
from ka_rs.engine.train import build_teacher_loop
from ka_rs.models import transformer

CONFIG = "configs/teacher_shapes.toml"

# name -> (train.amp, optim.fused, naive)
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "off": ("off", "off", False),
    "off+fused": ("off", "on", False),
    "bf16": ("bf16", "off", False),
    "bf16+fused": ("bf16", "on", False),
    "fp16": ("fp16", "off", False),
    "fp16+fused": ("fp16", "on", False),
    "bf16-naive+fused": ("off", "on", True),
}


@contextlib.contextmanager
def naive_bf16() -> Iterator[None]:
    """Everything under bf16 autocast, the attention included (no float32 attention core)."""
    saved = transformer._plain_mha
    transformer._plain_mha = lambda mha: False  # attention() falls back to nn.MultiheadAttention
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        transformer._plain_mha = saved


def build_loop(amp: str, fused: str, out_dir: str, seed: int) -> TrainLoop:
    cfg = load_config(
        CONFIG,
        [
            f"train.amp={amp}",
            f"optim.fused={fused}",
            f"train.seed={seed}",
            "data.num_val_images=8",
            "train.progress=false",
            f"train.output_dir={json.dumps(out_dir)}",
        ],
    )
    return build_teacher_loop(cfg, DistInfo())


def timed_steps(loop: TrainLoop, batches: list[Any], steps: int, naive: bool) -> float:
    """Seconds per step, averaged over ``steps`` steps."""
    t0 = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        if naive:
            with naive_bf16():
                loop.train_step(batch)
        else:
            loop.train_step(batch)
    return (time.perf_counter() - t0) / steps


def optimizer_step_times(rounds: int = 30, steps: int = 10) -> dict[str, float]:
    """Median seconds of one AdamW step on the anchor_tiny teacher's parameters, per kernel."""
    from ka_rs.models import build_model

    opts = {}
    for name, fused in (("default", None), ("fused", True)):
        torch.manual_seed(0)
        model = build_model("anchor_tiny", 4)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=fused)
        opts[name].step()  # allocate the state
    times: dict[str, list[float]] = {n: [] for n in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / steps)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant and round")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches reused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants"
    )
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument(
        "--optimizer", action="store_true", help="time the AdamW step alone (fused vs default)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.optimizer:
        print(f"{args.threads} thread(s), load average {os.getloadavg()}")
        for name, sec in optimizer_step_times().items():
            print(f"AdamW step, {name} kernel: {sec * 1e3:.2f} ms")
        print(f"load average after {os.getloadavg()}")
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "off" not in names:
        parser.error(f"--variants: must include 'off' and name only {list(VARIANTS)}")
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {load_before}")
    print(f"native bf16 on this CPU: {amp_mod.cpu_has_native_bf16()}")

    with tempfile.TemporaryDirectory() as tmp:
        loops = {}
        for name in names:
            amp, fused, _ = VARIANTS[name]
            loops[name] = build_loop(amp, fused, os.path.join(tmp, name), args.seed)
            # build_teacher_loop sets the thread count of the config (all cores); restore
            torch.set_num_threads(args.threads)
        first = loops["off"]
        loader = first._make_loader(0, 0)
        batches = [b for _, b in zip(range(args.batches), loader, strict=False)]
        # warm-up: one pass of every variant
        for name in names:
            timed_steps(loops[name], batches, len(batches), VARIANTS[name][2])
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(timed_steps(loops[name], batches, args.steps, VARIANTS[name][2]))
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names)
                + f"  (load {os.getloadavg()[0]:.2f})"
            )
    load_after = os.getloadavg()
    base = statistics.median(times["off"])
    rows = []
    print(f"\n{'variant':<18} {'median ms':>10} {'ratio':>7} {'med. per-round ratio':>21}")
    for name in names:
        med = statistics.median(times[name])
        per_round = statistics.median(t / b for t, b in zip(times[name], times["off"], strict=True))
        rows.append(
            {
                "variant": name,
                "median_s": med,
                "ratio_vs_off": med / base,
                "median_round_ratio": per_round,
                "times_s": times[name],
            }
        )
        print(f"{name:<18} {med * 1e3:>10.1f} {med / base:>6.2f}x {per_round:>20.2f}x")
    print(f"load average before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "rounds": args.rounds,
                    "steps": args.steps,
                    "load_before": load_before,
                    "load_after": load_after,
                    "results": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()

"""The demo's teachers in bf16 (+ fused AdamW) vs float32, over teacher seeds.

For each seed, trains (or reuses from the cache) the demo's two teachers twice — with
``teacher.train.amp=auto`` + ``teacher.optim.fused=auto`` (the demo's defaults: bf16 where the CPU
has it natively) and with ``amp=off`` + ``fused=off`` (float32) — and evaluates each teacher on
its own classes on the demo's 500 test images. Prints one JSON line per (seed, precision) with
the teacher stage's wall seconds and each teacher's AP50 / AP, and writes them all to OUT.
Run each configuration alone on the machine if the times matter::

    python benches/demo_teacher_precision.py /tmp/precision-cache 42,7,123 /tmp/precision.json
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from ka_rs.demo.config import load_demo_config
from ka_rs.demo.evaluation import eval_dataset, evaluate_teachers
from ka_rs.demo.teachers import ensure_teachers
from ka_rs.engine.amalgamate import load_teachers

PRECISIONS = {
    "bf16+fused": ["teacher.train.amp=auto", "teacher.optim.fused=auto"],
    "float32": ["teacher.train.amp=off", "teacher.optim.fused=off"],
}


def measure(cache: str, seed: int, mode: str) -> dict[str, Any]:
    """Train (or reuse) the two teachers of ``seed`` in precision ``mode``; their test AP."""
    cfg = load_demo_config(None, [*PRECISIONS[mode], f"teacher.train.seed={seed}"])
    start = time.time()
    runs = ensure_teachers(cfg, cache, progress=False)
    wall = time.time() - start
    teachers = load_teachers({r.name: str(r.checkpoint) for r in runs})
    results = evaluate_teachers(teachers, eval_dataset(cfg))
    return {
        "seed": seed,
        "mode": mode,
        "wall_s": wall,
        "cached": [r.cached for r in runs],
        "train_minutes": [r.train_minutes for r in runs],
        **{n: {k: r.subsets["all"][k] for k in ("AP50", "AP")} for n, r in results.items()},
    }


def main() -> None:
    """``CACHE SEEDS OUT``: e.g. ``/tmp/cache 42,7,123 /tmp/precision.json``."""
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    cache, seeds, out = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
    rows = []
    for seed in seeds:
        for mode in PRECISIONS:
            row = measure(cache, seed, mode)
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":  # the teachers train in spawned worker processes
    main()

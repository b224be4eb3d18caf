"""``ka-rs ablate``: which amalgamation losses matter, on the demo's teachers and budget.

Every variant starts from the same cached teachers (:func:`~ka_rs.demo.teachers.ensure_teachers`)
and trains students with the demo's student config, changing only the losses and the student's
layout (each variant names it):

=================  ===========================================================================
``ta``             TA only (no sequence-level term), N-slot student
``sa_ta``          SA + TA, N-slot student (the paper's method)
``aggregation_ta`` the prior-KA "aggregation" hint (one-slot student, learnt N·d→d fusion,
                   projection trained) + TA
``sa_ta_cross``    SA + TA with cross-slot attention in the encoder
``sa_ta_compact``  SA + TA, compact student (``student_layout = "compact"``: one teacher's
                   token count, SA through per-teacher linear views; an extension; the
                   demo's default student)
=================  ===========================================================================

**Seeds.** Each variant trains one student per seed (``demo.ablate_seeds`` / ``--seeds``,
default 3: :func:`~ka_rs.demo.stats.student_seeds`, the config's ``student.train.seed`` first),
the same seeds for every variant, into ``<run>/<variant>/seed-<seed>/``. Each student is
evaluated on ``demo.eval_split`` (``test`` by default; ``val`` to choose settings on: AP, AP50,
AP75 on the union and on each teacher's classes). A row reports the mean ± sample sd over the
seeds; :data:`COMPARISONS` are the per-seed paired differences (SA + TA − TA only,
aggregation + TA − TA only, cross − no-cross, compact − N-slot) with their mean and 95 % t-interval
(:func:`~ka_rs.demo.stats.paired_difference`).

A (variant, seed) whose exact config was already trained and evaluated on the same images
(e.g. the demo's SA + TA student of that seed) is reused from the cache unless
``reuse=False``. Results go to ``ablation.json`` (every per-seed number), ``ablation.md`` and
``ablation.png`` (error bars) in the run folder; nothing here is tuned per variant.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ka_rs.demo.config import DemoConfig
from ka_rs.demo.evaluation import eval_dataset, evaluate_teachers
from ka_rs.demo.report import load_average
from ka_rs.demo.stats import (
    fmt_interval,
    fmt_mean_sd,
    paired_difference,
    student_seeds,
    summarize,
)
from ka_rs.demo.student import (
    read_student_cache,
    seeded_config,
    student_config,
    train_and_evaluate_many,
    write_student_cache,
)
from ka_rs.demo.teachers import TeacherRun, default_cache_dir, ensure_teachers
from ka_rs.engine.amalgamate import load_teachers
from ka_rs.engine.amalgamate_config import AmalgamateConfig

__all__ = [
    "COMPARISONS",
    "VARIANTS",
    "ablation_markdown",
    "ablation_table",
    "plot_ablation",
    "run_ablation",
]

# every variant names its student layout, whatever the demo's default is
_SLOTS = "amalgamation.student_layout=slots"

#: variant name -> (description, student.amalgamation overrides)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ta": (
        "TA only",
        ("amalgamation.sa=false", "amalgamation.aggregation=false", _SLOTS),
    ),
    "sa_ta": (
        "SA + TA",
        ("amalgamation.sa=true", "amalgamation.aggregation=false", _SLOTS),
    ),
    "aggregation_ta": (
        "aggregation + TA",
        ("amalgamation.sa=false", "amalgamation.aggregation=true", _SLOTS),
    ),
    "sa_ta_cross": (
        "SA + TA, cross-slot attention",
        (
            "amalgamation.sa=true",
            "amalgamation.aggregation=false",
            "amalgamation.cross_slot_attention=true",
            _SLOTS,
        ),
    ),
    "sa_ta_compact": (
        "SA + TA, compact student",
        (
            "amalgamation.sa=true",
            "amalgamation.aggregation=false",
            "amalgamation.cross_slot_attention=false",
            "amalgamation.student_layout=compact",
        ),
    ),
}

#: Paired comparisons ``(a, b, description)``: per seed ``a − b``, when both variants ran.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("sa_ta", "ta", "SA + TA − TA only"),
    ("aggregation_ta", "ta", "aggregation + TA − TA only"),
    ("sa_ta_cross", "sa_ta", "cross − no-cross (SA + TA)"),
    ("sa_ta_compact", "sa_ta", "compact − N-slot student (SA + TA)"),
)

_METRICS = ("AP", "AP50", "AP75")
_TABLE_METRICS = ("AP50", "AP")


def run_ablation(
    cfg: DemoConfig,
    output: str | Path,
    cache_dir: str | Path | None = None,
    *,
    variants: Sequence[str] | None = None,
    progress: bool = True,
    reuse: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Train and evaluate every variant with ``demo.ablate_seeds`` seeds; write
    ``ablation.json`` / ``ablation.md`` / ``ablation.png``; return the ``ablation.json`` dict."""
    from rich.console import Console

    console = console or Console()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    names = list(variants or VARIANTS)
    seeds = student_seeds(cfg.demo.ablate_seeds, cfg.student.train.seed)
    t_start = time.perf_counter()
    load = {"start": load_average()}

    def say(msg: str) -> None:
        console.print(f"[bold magenta]ablate[/] {msg}")

    runs = ensure_teachers(cfg, cache, progress=progress, log=say, console=console)
    say(
        f"{len(names)} variant(s) x {len(seeds)} student seed(s) ({', '.join(map(str, seeds))}); "
        f"evaluation on {cfg.demo.num_eval_images} `{cfg.demo.eval_split}` images"
    )
    done, todo = _plan(cfg, runs, names, seeds, out, cache if reuse else None, say)
    if todo:
        labels = [(f"{VARIANTS[n][0]}, seed {s}", scfg) for n, s, scfg in todo]
        infos = train_and_evaluate_many(labels, cfg, progress=progress, say=say, console=console)
        for (name, seed, scfg), info in zip(todo, infos, strict=True):
            write_student_cache(cache, scfg, runs, cfg.demo, info)
            done[(name, seed)] = _seed_record(seed, "trained", info)
    rows = [_variant_row(n, [done[(n, s)] for s in seeds]) for n in names]
    load["end"] = load_average()
    results = _ablation_results(cfg, runs, seeds, rows, load, t_start)
    results["figure"] = plot_ablation(results, out / "ablation.png").name
    _write(out, results)
    console.print(ablation_table(results))
    say(f"done in {results['total_seconds'] / 60:.1f} min; table: {out / 'ablation.md'}")
    return results


def _write(out: Path, results: Mapping[str, Any]) -> None:
    """``ablation.json`` and ``ablation.md``, each written atomically."""
    from ka_rs.engine.logging import atomic_write_text

    atomic_write_text(out / "ablation.json", json.dumps(results, indent=2))
    atomic_write_text(out / "ablation.md", ablation_markdown(results))


def _plan(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    names: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    cache: Path | None,
    say: Callable[[str], None],
) -> tuple[dict[tuple[str, int], dict[str, Any]], list[tuple[str, int, AmalgamateConfig]]]:
    """Each (variant, seed)'s student config: ``(records reused from the cache, to train)``."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    todo: list[tuple[str, int, AmalgamateConfig]] = []
    for name in names:
        base = student_config(cfg, runs, out / name, VARIANTS[name][1])
        for seed in seeds:
            scfg = seeded_config(base, seed, out / name / f"seed-{seed}")
            info = read_student_cache(cache, scfg, runs, cfg.demo) if cache else None
            if info is not None:
                say(
                    f"{VARIANTS[name][0]}, seed {seed}: reusing the cached identical run "
                    f"{info.get('run_dir', '')}"
                )
                done[(name, seed)] = _seed_record(seed, f"reused {info.get('run_dir', '')}", info)
            else:
                todo.append((name, seed, scfg))
    return done, todo


def _seed_record(seed: int, source: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """One student (variant, seed) of ``ablation.json``: where it came from and its numbers."""
    return {
        "seed": seed,
        "source": source,
        "run_dir": info.get("run_dir"),
        "steps": info.get("steps"),
        "train_minutes": info.get("train_minutes"),
        "seconds": round(float(info.get("seconds", 0.0)), 1),
        "subsets": {k: {m: v[m] for m in _METRICS} for k, v in info["eval"]["subsets"].items()},
    }


def _variant_row(name: str, per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A variant's row: mean (``subsets``) and sample sd (``sd``) over its seeds, per subset
    and metric, and every seed's record (``per_seed``)."""
    subsets = list(per_seed[0]["subsets"])
    stats = {
        c: {m: summarize([r["subsets"].get(c, {}).get(m) for r in per_seed]) for m in _METRICS}
        for c in subsets
    }
    return {
        "variant": name,
        "description": VARIANTS[name][0],
        "seeds": [r["seed"] for r in per_seed],
        "source": ", ".join(sorted({r["source"].split(" ")[0] for r in per_seed})),
        "subsets": {c: {m: s["mean"] for m, s in ms.items()} for c, ms in stats.items()},
        "sd": {c: {m: s["sd"] for m, s in ms.items()} for c, ms in stats.items()},
        "per_seed": list(per_seed),
    }


def _differences(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:data:`COMPARISONS` whose two variants ran: per subset and metric, the paired
    difference over seeds (:func:`~ka_rs.demo.stats.paired_difference`)."""
    by_name = {r["variant"]: r for r in rows}
    out = []
    for a, b, desc in COMPARISONS:
        if a not in by_name or b not in by_name:
            continue
        ra, rb = by_name[a], by_name[b]
        assert ra["seeds"] == rb["seeds"], "variants are paired by seed"
        subsets = {
            c: {
                m: paired_difference(
                    [x["subsets"].get(c, {}).get(m) for x in ra["per_seed"]],
                    [x["subsets"].get(c, {}).get(m) for x in rb["per_seed"]],
                )
                for m in _METRICS
            }
            for c in ra["subsets"]
        }
        out.append(
            {"a": a, "b": b, "description": desc, "seeds": list(ra["seeds"]), "subsets": subsets}
        )
    return out


def _ablation_results(
    cfg: DemoConfig,
    runs: Sequence[TeacherRun],
    seeds: Sequence[int],
    rows: list[dict[str, Any]],
    load: dict[str, list[float]],
    t_start: float,
) -> dict[str, Any]:
    """The ``ablation.json`` dict: the rows, the paired differences, each teacher on its own
    classes (same images) for reference."""
    teachers = load_teachers({r.name: str(r.checkpoint) for r in runs})
    teacher_evals = evaluate_teachers(teachers, eval_dataset(cfg))
    teacher_ref = {}
    for name, ev in teacher_evals.items():
        te = ev.subsets["all"]
        teacher_ref[name] = {m: te[m] for m in _METRICS}
    return {
        "rows": rows,
        "differences": _differences(rows),
        "seeds": list(seeds),
        "num_seeds": len(seeds),
        "teachers": [r.name for r in runs],
        "teacher_classes": {r.name: list(r.classes) for r in runs},
        "split": cfg.demo.split,
        "teacher_reference": teacher_ref,
        "eval": {"split": cfg.demo.eval_split, "num_images": cfg.demo.num_eval_images},
        "student_budget": {
            "max_steps": cfg.student.train.max_steps,
            "batch_size": cfg.student.train.batch_size,
            "init_from": cfg.student.amalgamation.init_from,
        },
        "load_average": load,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "config": cfg.to_dict(),
    }


# ----------------------------------------------------------------------------------------------
# tables and the figure


def _f(x: float | None) -> str:
    return "-" if x is None or x < 0 else f"{x:.3f}"


def _columns(results: Mapping[str, Any]) -> list[str]:
    return [*results["teachers"], "all"]


def _label(column: str) -> str:
    return "union" if column == "all" else column


def _cell(row: Mapping[str, Any], column: str, metric: str) -> str:
    """``mean ± sd`` of a row's subset ``column`` and ``metric`` (the mean alone for 1 seed)."""
    mean = row["subsets"].get(column, {}).get(metric)
    sd = row.get("sd", {}).get(column, {}).get(metric)
    return fmt_mean_sd({"mean": mean if mean is None or mean >= 0 else None, "sd": sd})


def _split_words(results: Mapping[str, Any]) -> str:
    """``500 `test` images (held-out test split)`` or the validation equivalent."""
    ev = results["eval"]
    kind = (
        "validation split: the split to choose settings on"
        if ev["split"] == "val"
        else "held-out test split: report only, never choose settings on it"
    )
    return f"{ev['num_images']} `{ev['split']}` images ({kind})"


def ablation_markdown(results: Mapping[str, Any]) -> str:
    """``ablation.md``: mean ± sd per variant, the paired differences with their t-intervals,
    the union AP50 of every seed; the split and the number of seeds are stated."""
    cols = _columns(results)
    seeds = results["seeds"]
    k = len(seeds)
    budget = results["student_budget"]
    head = "| variant | " + " | ".join(f"{_label(c)} {m}" for c in cols for m in _TABLE_METRICS)
    rule = "|---|" + "---:|" * (len(_TABLE_METRICS) * len(cols))
    lines = [
        "# ka-rs ablate",
        "",
        f"Teachers `{results.get('split', '')}` ("
        + "; ".join(f"{t}: {', '.join(cs)}" for t, cs in results.get("teacher_classes", {}).items())
        + f"). Same teachers and student budget ({budget['max_steps']} steps of batch "
        f"{budget['batch_size']}, init from `{budget['init_from'] or 'scratch'}`) for every "
        f"variant; label-free; **{k} student seed{'s' if k != 1 else ''}** per variant "
        f"({', '.join(map(str, seeds))}), the same for every variant. Evaluated on "
        f"{_split_words(results)}.",
        "",
        f"## Mean{' ± sample sd' if k > 1 else ''} over {k} seed{'s' if k != 1 else ''} "
        f"(`{results['eval']['split']}` split)",
        "",
        head + " |",
        rule,
    ]
    for row in results["rows"]:
        cells = [_cell(row, c, m) for c in cols for m in _TABLE_METRICS]
        lines.append(f"| {row['description']} | " + " | ".join(cells) + " |")
    ref = results.get("teacher_reference", {})
    if ref:
        cells = [_f(ref.get(c, {}).get(m)) for c in cols for m in _TABLE_METRICS]
        lines.append("| *teacher (own classes)* | " + " | ".join(cells) + " |")
    diffs = results.get("differences", [])
    if diffs:
        level = next(
            (d["subsets"]["all"]["AP50"]["level"] for d in diffs if "all" in d["subsets"]),
            0.95,
        )
        lines += [
            "",
            f"## Paired differences (`{results['eval']['split']}` split, {k} seeds)",
            "",
            (
                f"Per seed, variant a − variant b; mean and {level:.0%} t-interval over the "
                f"seeds (df = {k - 1}). An interval that contains 0 shows no difference at "
                "this number of seeds."
                if k > 1
                else "One seed: the difference of one pair of runs, no interval. Differences "
                "below ~0.02-0.03 AP50 are within run-to-run noise; use `--seeds 3` or more."
            ),
            "",
            head.replace("| variant |", "| a − b |") + " |",
            rule,
        ]
        for d in diffs:
            cells = [
                fmt_interval(d["subsets"].get(c, {}).get(m)) for c in cols for m in _TABLE_METRICS
            ]
            lines.append(f"| {d['description']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Union AP50 of every seed (`{results['eval']['split']}` split)",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | source |",
        "|---|" + "---:|" * k + "---|",
    ]
    for row in results["rows"]:
        vals = [_f(r["subsets"].get("all", {}).get("AP50")) for r in row["per_seed"]]
        lines.append(f"| {row['description']} | " + " | ".join(vals) + f" | {row['source']} |")
    if results.get("figure"):
        lines += ["", f"![AP50 per variant, {k} seeds]({results['figure']})"]
    lines += ["", f"Load average: {results['load_average']}.", ""]
    return "\n".join(lines)


def _console_columns(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(subset, metric)`` of the console table: AP50 per teacher subset, AP50 and AP on the
    union (``ablation.md`` has AP per subset too)."""
    return [*((t, "AP50") for t in results["teachers"]), ("all", "AP50"), ("all", "AP")]


def ablation_table(results: Mapping[str, Any]) -> Any:
    """The ablation as a rich Table: mean ± sd per variant, then the paired differences with
    their 95 % t-intervals (AP50 per teacher subset, AP50 and AP on the union)."""
    from rich.table import Table

    cols = _console_columns(results)
    k = len(results["seeds"])
    ev = results["eval"]
    table = Table(
        title=f"ka-rs ablate: label-free students, same teachers and budget; {k} seed(s) per "
        f"variant ({', '.join(map(str, results['seeds']))}); {ev['num_images']} "
        f"`{ev['split']}` images" + ("; mean ± sd, a − b: mean [95% t-interval]" if k > 1 else "")
    )
    table.add_column("variant")
    for c, m in cols:
        table.add_column(f"{_label(c)} {m}", justify="right")
    for row in results["rows"]:
        table.add_row(row["description"], *(_cell(row, c, m) for c, m in cols))
    ref = results.get("teacher_reference", {})
    if ref:
        cells = [_f(ref.get(c, {}).get(m)) for c, m in cols]
        table.add_row("teacher (own classes)", *cells, style="dim", end_section=True)
    for d in results.get("differences", []):
        cells = [fmt_interval(d["subsets"].get(c, {}).get(m)) for c, m in cols]
        table.add_row(d["description"], *cells, style="italic")
    return table


def plot_ablation(results: Mapping[str, Any], path: str | Path) -> Path:
    """``ablation.png``: left, AP50 per teacher subset and on the union for every variant (bar
    = mean, error bar = sample sd, dots = the seeds); right, the paired differences of union
    AP50 with their 95 % t-intervals. The title states the seeds and the split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ka_rs.engine.logging import save_figure

    cols = _columns(results)
    rows = results["rows"]
    diffs = results.get("differences", [])
    k = len(results["seeds"])
    fig, axes = plt.subplots(
        1, 2, figsize=(11, 4.0), gridspec_kw={"width_ratios": [2.2, 1]}, squeeze=False
    )
    ax = axes[0][0]
    x = np.arange(len(cols))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        pos = x - 0.4 + width * (i + 0.5)
        means = [max(row["subsets"].get(c, {}).get("AP50") or 0.0, 0.0) for c in cols]
        sds = [row["sd"].get(c, {}).get("AP50") or 0.0 for c in cols]
        err = sds if k > 1 else None
        ax.bar(
            pos, means, width * 0.9, yerr=err, capsize=3, label=row["description"], color=f"C{i}"
        )
        for j, c in enumerate(cols):
            vals = [r["subsets"].get(c, {}).get("AP50") for r in row["per_seed"]]
            vals = [v for v in vals if v is not None and v >= 0]
            ax.plot([pos[j]] * len(vals), vals, "k.", ms=3)
    ax.set_xticks(x)
    ax.set_xticklabels([_label(c) for c in cols])
    ax.set_ylabel("AP50")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"AP50: mean ± sd over {k} seed(s), dots = seeds", fontsize=9)
    ax = axes[0][1]
    names = [r["variant"] for r in rows]
    shown = [
        d for d in diffs if d["subsets"].get("all", {}).get("AP50", {}).get("mean") is not None
    ]
    for i, d in enumerate(shown):
        s = d["subsets"]["all"]["AP50"]
        lo, hi = s["ci"] if s["ci"] else (s["mean"], s["mean"])
        color = f"C{names.index(d['a'])}" if d["a"] in names else "k"
        xerr = [[s["mean"] - lo], [hi - s["mean"]]]
        ax.errorbar(s["mean"], i, xerr=xerr, fmt="o", color=color, capsize=4)
        ax.plot(s["diffs"], [i] * len(s["diffs"]), "k.", ms=3)
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([d["description"] for d in shown], fontsize=7)
    ax.set_xlabel("union AP50 difference (a − b)")
    ax.set_title(
        "paired by seed: mean, 95% t-interval" if k > 1 else "one seed: no interval", fontsize=9
    )
    ax.grid(axis="x", alpha=0.3)
    ev = results["eval"]
    fig.suptitle(
        f"ka-rs ablate: {k} student seed(s) per variant, {ev['num_images']} images of the "
        f"'{ev['split']}' split",
        fontsize=10,
    )
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)

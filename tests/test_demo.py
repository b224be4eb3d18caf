"""``ka-rs demo --quick`` and ``ka-rs ablate --quick`` end to end (tiny budgets, no accuracy
bar), the teacher cache, the demo config file and override errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ka_rs.cli import main
from ka_rs.demo import DEMO_DEFAULTS, load_demo_config, teacher_key
from ka_rs.engine.config import ConfigError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The commands below run with ``--threads 1``; give the rest of the session its setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    cache, out = root / "cache", root / "run"
    threads = torch.get_num_threads()
    try:  # one thread: tiny models gain nothing from more, and a busy CI box loses a lot
        code = main(
            [
                *("demo", "--quick", "--threads", "1", "--cache-dir", str(cache)),
                *("--output", str(out), "--no-progress"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return cache, out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_the_run_folder(quick_demo):
    _, out, res = quick_demo
    for name in ("report.md", "results.json", "loss_curves.png", "ap_per_class.png"):
        assert (out / name).is_file(), name
    assert (out / "detections.png").stat().st_size > 1000
    assert (out / "student" / "checkpoint.pt").is_file()
    assert set(res["per_teacher"]) == {"teacher_a", "teacher_b"}
    assert res["per_teacher"]["teacher_b"]["classes"] == ["cross", "ring", "diamond", "crescent"]
    for v in res["per_teacher"].values():
        assert set(v["teacher"]) == set(v["student"]) == {"AP", "AP50", "AP75"}
        assert all(-1.0 <= x <= 1.0 for x in [*v["teacher"].values(), *v["student"].values()])
    assert res["mode"] == "label_free"
    assert set(res["evaluation"]["student"]["subsets"]) == {"all", "teacher_a", "teacher_b"}
    assert len(res["evaluation"]["student"]["per_class"]) == 8
    assert not any(t["cached"] for t in res["teachers"])
    assert res["timings_seconds"]["total"] >= res["timings_seconds"]["student"] > 0
    assert res["load_average"]["start"] and res["load_average"]["end"]
    report = (out / "report.md").read_text()
    assert "label-free" in report and "![AP per class" in report and "Wall time" in report
    assert "Extension beyond the paper" in report  # the demo starts the student from teacher_b
    assert "{'num_queries': 60} for the student" in report
    assert "Student layout: **compact** (an extension beyond the paper)" in report
    # one student seed by default; the report names the split and the seed count
    assert res["seeds"] == [42] and res["num_seeds"] == 1 and len(res["students"]) == 1
    assert res["per_teacher"]["teacher_a"]["student_sd"]["AP50"] is None
    assert "## Results (`test` split, 1 student seed)" in report
    assert "one student seed (42)" in report and "`shapes-halves` split" in report
    assert "The teachers' classes are disjoint." in report
    # the machine and the precision each role really trained in (demo default amp = "auto")
    from ka_rs.engine.amp import cpu_has_native_bf16

    mode = "bf16" if cpu_has_native_bf16() else "off"
    assert res["precision"] == {
        role: {"amp": mode, "fused_adamw": "auto"} for role in ("teachers", "student")
    }
    assert res["machine"]["native_bf16"] == cpu_has_native_bf16()
    shown = "bf16 forwards" if mode == "bf16" else "float32"
    assert f"teachers {shown} + fused AdamW, student {shown} + fused AdamW." in report
    assert "another machine gives other digits" in report


def test_second_demo_reuses_the_cached_teachers(quick_demo, tmp_path):
    cache, _, first = quick_demo
    out = tmp_path / "again"
    args = ["demo", "--quick", "--threads", "1", "--cache-dir", str(cache), "--output", str(out)]
    args.append("--no-progress")
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert all(t["cached"] for t in res["teachers"])
    assert [t["checkpoint"] for t in res["teachers"]] == [
        t["checkpoint"] for t in first["teachers"]
    ]
    # the same teachers give the same teacher numbers
    assert (
        res["per_teacher"]["teacher_a"]["teacher"] == first["per_teacher"]["teacher_a"]["teacher"]
    )
    # another teacher config is another cache entry; run-only settings are not part of the key
    base = load_demo_config(None, quick=True)
    keys = {teacher_key(base, "teacher_a")}
    for extra in ("teacher.train.max_steps=4", "teacher.optim.lr=3e-3", "teacher.data.seed=1"):
        keys.add(teacher_key(load_demo_config(None, [extra], quick=True), "teacher_a"))
    assert len(keys) == 4
    same = load_demo_config(None, ["teacher.train.log_every_steps=1"], quick=True)
    assert teacher_key(same, "teacher_a") == teacher_key(base, "teacher_a")
    assert teacher_key(base, "teacher_a") != teacher_key(base, "teacher_b")


def test_quick_demo_student_trains_data_parallel(quick_demo, tmp_path):
    cache, _, first = quick_demo
    out = tmp_path / "ddp"
    args = ["demo", "--quick", "--threads", "1", "--cache-dir", str(cache), "--output", str(out)]
    assert main([*args, "--no-progress", "--set", "demo.student_processes=2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert all(t["cached"] for t in res["teachers"])
    assert res["student"]["processes"] == 2 and res["student"]["steps"] == 6
    # both ranks logged; rank 0 wrote the metrics and the checkpoint the demo evaluated
    assert (out / "student" / "train.log").is_file()
    assert (out / "student" / "train_rank1.log").is_file()
    recs = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in recs) == 6
    assert set(res["evaluation"]["student"]["subsets"]) == {"all", "teacher_a", "teacher_b"}
    assert "data-parallel (DDP, gloo) in 2 processes of 4 images" in (out / "report.md").read_text()
    # the teachers are the cached ones, so their numbers are unchanged
    teacher_b = res["per_teacher"]["teacher_b"]["teacher"]
    assert teacher_b == first["per_teacher"]["teacher_b"]["teacher"]


def test_student_processes_setting():
    from ka_rs.demo import student_processes

    assert student_processes(1, 16) == (1, torch.get_num_threads())
    assert student_processes(2, 16)[0] == 2
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        student_processes(3, 16)
    with pytest.raises(ConfigError, match="must be >= 1"):
        student_processes(0, 16)


def test_quick_ablation_over_two_seeds_reuses_the_demo_student(quick_demo, tmp_path, capsys):
    cache, _, _ = quick_demo
    out = tmp_path / "abl"
    args = ["ablate", "--quick", "--threads", "1", "--cache-dir", str(cache), "--output", str(out)]
    assert (
        main(
            [
                *args,
                "--no-progress",
                "--seeds",
                "2",
                "--variants",
                "sa_ta_compact,ta,aggregation_ta",
            ]
        )
        == 0
    )
    res = json.loads((out / "ablation.json").read_text())
    assert res["seeds"] == [42, 7] and res["num_seeds"] == 2
    assert res["eval"] == {"split": "test", "num_images": 16}
    assert [r["variant"] for r in res["rows"]] == ["sa_ta_compact", "ta", "aggregation_ta"]
    rows = {r["variant"]: r for r in res["rows"]}
    # seed 42 of the compact SA + TA student is the demo's identical run; seed 7 and the
    # others are new
    compact = {r["seed"]: r for r in rows["sa_ta_compact"]["per_seed"]}
    assert compact[42]["source"].startswith("reused") and compact[7]["source"] == "trained"
    for name in ("ta", "aggregation_ta"):
        assert [r["seed"] for r in rows[name]["per_seed"]] == [42, 7]
        for r in rows[name]["per_seed"]:  # trained side by side, each logging to its folder
            assert r["source"] == "trained" and r["steps"] == 6
            d = out / name / f"seed-{r['seed']}"
            assert (d / "train.log").is_file() and (d / "checkpoint.pt").is_file()
    # every per-seed number is kept; the row is their mean and sample sd
    for r in rows.values():
        assert len(r["per_seed"]) == 2
        for sub in ("all", "teacher_a", "teacher_b"):
            for m in ("AP", "AP50", "AP75"):
                vals = [x["subsets"][sub][m] for x in r["per_seed"]]
                assert r["subsets"][sub][m] == pytest.approx(sum(vals) / 2)
                assert r["sd"][sub][m] == pytest.approx(abs(vals[0] - vals[1]) / 2**0.5)
    # the paired differences that both variants allow, per seed
    diffs = {(d["a"], d["b"]): d for d in res["differences"]}
    assert set(diffs) == {("aggregation_ta", "ta")}  # no N-slot SA + TA, no cross-slot run
    d = diffs[("aggregation_ta", "ta")]["subsets"]["all"]["AP50"]
    a = [x["subsets"]["all"]["AP50"] for x in rows["aggregation_ta"]["per_seed"]]
    b = [x["subsets"]["all"]["AP50"] for x in rows["ta"]["per_seed"]]
    assert d["diffs"] == pytest.approx([a[0] - b[0], a[1] - b[1]]) and d["df"] == 1
    assert d["t"] == pytest.approx(12.7062, abs=1e-4) and len(d["ci"]) == 2
    md = (out / "ablation.md").read_text()
    assert "aggregation + TA" in md and "SA + TA" in md and "teacher_a AP50" in md
    assert "**2 student seeds**" in md and "(42, 7)" in md and "`test` split" in md
    assert "aggregation + TA − TA only" in md and "95% t-interval" in md and "ablation.png" in md
    assert (out / "ablation.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "aggregation + TA" in printed and "2 seed(s)" in printed
    assert main([*args, "--variants", "nope"]) == 2


def test_quick_ablation_on_the_validation_split(quick_demo, tmp_path):
    cache, _, _ = quick_demo
    out = tmp_path / "abl-val"
    args = ["ablate", "--quick", "--threads", "1", "--cache-dir", str(cache), "--output", str(out)]
    args += ["--no-progress", "--seeds", "1", "--eval-split", "val"]
    assert main([*args, "--variants", "sa_ta,sa_ta_compact"]) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert res["eval"]["split"] == "val" and res["seeds"] == [42]
    # the demo's cached seed-42 student was evaluated on test images: not reused for val
    assert res["rows"][0]["per_seed"][0]["source"] == "trained"
    # the compact student trains (its own folder, one teacher's token count) and is compared
    compact = res["rows"][1]
    assert compact["variant"] == "sa_ta_compact" and compact["per_seed"][0]["steps"] == 6
    cfg = (out / "sa_ta_compact" / "seed-42" / "config.toml").read_text()
    assert 'student_layout = "compact"' in cfg
    assert [(d["a"], d["b"]) for d in res["differences"]] == [("sa_ta_compact", "sa_ta")]
    md = (out / "ablation.md").read_text()
    assert "`val` images (validation split" in md and "**1 student seed**" in md
    assert "compact − N-slot student (SA + TA)" in md


def test_student_cache_keys_differ_per_seed_and_evaluation_split(tmp_path):
    from ka_rs.demo.student import seeded_config, student_config, student_key
    from ka_rs.demo.teachers import TeacherRun

    cfg = load_demo_config(None, quick=True)
    runs = [
        TeacherRun(n, [], tmp_path / f"{n}.pt", tmp_path, f"key-{n}", True, 0.0, 0.0, 1)
        for n in ("teacher_a", "teacher_b")
    ]
    base = student_config(cfg, runs, tmp_path / "student")
    keys = {
        s: student_key(seeded_config(base, s, tmp_path / f"s{s}"), runs, cfg.demo)
        for s in (42, 7, 123)
    }
    assert len(set(keys.values())) == 3
    # the seed and the evaluation set are in the key; the output folder is not
    assert student_key(base, runs, cfg.demo) == keys[42]
    assert student_key(seeded_config(base, 7, tmp_path / "elsewhere"), runs, cfg.demo) == keys[7]
    val = load_demo_config(None, ["demo.eval_split=val"], quick=True).demo
    assert student_key(base, runs, val) != keys[42]


def test_statistics_on_known_numbers():
    from ka_rs.demo.stats import (
        fmt_interval,
        fmt_mean_sd,
        paired_difference,
        student_seeds,
        summarize,
        t_quantile,
    )

    s = summarize([0.5, 0.6, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.1)
    assert fmt_mean_sd(s) == "0.600 ± 0.100"
    one = summarize([0.42])
    assert one["mean"] == pytest.approx(0.42) and one["sd"] is None and fmt_mean_sd(one) == "0.420"
    assert summarize([0.5, -1.0])["mean"] is None  # COCO's -1: no ground truth
    # t quantiles (two-sided 95 %) from the tables
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(9, 0.9) == pytest.approx(1.8331, abs=1e-4)
    # paired by seed: diffs 0.05, 0.02, 0.08 -> mean 0.05, sd 0.03, ci 0.05 -+ 4.3027*0.03/sqrt 3
    d = paired_difference([0.60, 0.62, 0.58], [0.55, 0.60, 0.50])
    assert d["diffs"] == pytest.approx([0.05, 0.02, 0.08])
    assert d["mean"] == pytest.approx(0.05) and d["sd"] == pytest.approx(0.03) and d["df"] == 2
    assert d["ci"] == pytest.approx([-0.0245241, 0.1245241], abs=1e-6)
    assert fmt_interval(d) == "+0.050 [-0.025, +0.125]"
    # the same interval as scipy's paired t-test
    from scipy.stats import ttest_rel

    ci = ttest_rel([0.60, 0.62, 0.58], [0.55, 0.60, 0.50]).confidence_interval()
    assert d["ci"] == pytest.approx([ci.low, ci.high])
    single = paired_difference([0.6], [0.5])
    assert single["mean"] == pytest.approx(0.1) and single["ci"] is None
    assert fmt_interval(single) == "+0.100"
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_difference([0.1, 0.2], [0.1])
    # the seed list: the config's seed first, then a fixed list
    assert student_seeds(1) == [42] and student_seeds(3) == [42, 7, 123]
    assert student_seeds(3, first=7) == [7, 42, 123] and student_seeds(2, first=5) == [5, 42]
    with pytest.raises(ValueError, match="1 to 10"):
        student_seeds(0)


def _seed_eval(a: float, b: float, union: float) -> dict:
    def m(x: float) -> dict:
        return {"AP": x / 2, "AP50": x, "AP75": x / 4}

    return {
        "subsets": {"all": m(union), "teacher_a": m(a), "teacher_b": m(b)},
        "per_class": {"circle": {"AP": a / 2, "AP50": a}, "cross": {"AP": b / 2, "AP50": b}},
    }


def test_ablation_rows_and_paired_differences_on_known_numbers(tmp_path):
    from ka_rs.demo.ablate import (
        _differences,
        _seed_record,
        _variant_row,
        ablation_markdown,
        plot_ablation,
    )

    sa = [(0.60, 0.70, 0.60), (0.62, 0.72, 0.62), (0.58, 0.68, 0.58)]
    ta = [(0.55, 0.70, 0.55), (0.60, 0.71, 0.60), (0.50, 0.69, 0.50)]
    rows = [
        _variant_row(
            name,
            [
                _seed_record(s, "trained", {"eval": _seed_eval(*v)})
                for s, v in zip((42, 7, 123), vals, strict=True)
            ],
        )
        for name, vals in (("ta", ta), ("sa_ta", sa))
    ]
    assert rows[1]["subsets"]["all"]["AP50"] == pytest.approx(0.60)
    assert rows[1]["sd"]["all"]["AP50"] == pytest.approx(0.02)
    assert rows[1]["sd"]["all"]["AP"] == pytest.approx(0.01)  # AP = AP50 / 2 here
    diffs = _differences(rows)
    assert [(d["a"], d["b"]) for d in diffs] == [("sa_ta", "ta")]
    d = diffs[0]["subsets"]["all"]["AP50"]
    assert d["mean"] == pytest.approx(0.05) and d["sd"] == pytest.approx(0.03)
    assert d["ci"] == pytest.approx([-0.0245241, 0.1245241], abs=1e-6)
    results = {
        "rows": rows,
        "differences": diffs,
        "seeds": [42, 7, 123],
        "teachers": ["teacher_a", "teacher_b"],
        "teacher_classes": {"teacher_a": ["circle"], "teacher_b": ["cross"]},
        "split": "shapes-halves",
        "teacher_reference": {"teacher_a": {"AP": 0.3, "AP50": 0.6, "AP75": 0.2}},
        "eval": {"split": "val", "num_images": 200},
        "student_budget": {"max_steps": 1200, "batch_size": 16, "init_from": "teacher_b"},
        "load_average": {},
    }
    results["figure"] = plot_ablation(results, tmp_path / "ablation.png").name
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    md = ablation_markdown(results)
    assert "| SA + TA | 0.600 ± 0.020 |" in md
    assert "| SA + TA − TA only |" in md and "+0.050 [-0.025, +0.125]" in md
    assert "**3 student seeds**" in md and "df = 2" in md
    assert "200 `val` images (validation split" in md and "`val` split" in md


def test_demo_seed_statistics_on_known_numbers():
    from ka_rs.demo.seeds import mean_per_class, seed_record, seed_statistics

    records = [
        seed_record(s, "trained", _seed_eval(*v), f"run{s}", 6, 0.1)
        for s, v in ((42, (0.40, 0.70, 0.55)), (7, (0.50, 0.80, 0.65)))
    ]
    first = {
        "per_teacher": {
            name: {
                "classes": [],
                "teacher": {"AP": 0.25, "AP50": 0.5, "AP75": 0.1},
                "student": {"AP": 0.2, "AP50": x, "AP75": 0.1},
                "ratio_AP50": x / 0.5,
                "ratio_AP": 0.8,
            }
            for name, x in (("teacher_a", 0.40), ("teacher_b", 0.70))
        },
        "student_union": {"AP": 0.275, "AP50": 0.55, "AP75": 0.1375},
    }
    res = seed_statistics(first, records)
    assert res["seeds"] == [42, 7] and res["num_seeds"] == 2 and len(res["students"]) == 2
    a = res["per_teacher"]["teacher_a"]
    assert a["student"]["AP50"] == pytest.approx(0.45)
    assert a["student_sd"]["AP50"] == pytest.approx(0.1 / 2**0.5)
    assert a["student_per_seed"]["AP50"] == [0.40, 0.50]
    assert a["ratio_AP50_per_seed"] == pytest.approx([0.8, 1.0])
    assert a["ratio_AP50"] == pytest.approx(0.9) and a["ratio_AP50_sd"] == pytest.approx(
        0.1414, abs=1e-4
    )
    assert res["per_teacher"]["teacher_b"]["ratio_AP50"] == pytest.approx(1.5)
    assert res["student_union"]["AP50"] == pytest.approx(0.60)
    assert res["student_union_per_seed"]["AP50"] == [0.55, 0.65]
    assert res["min_ratio_AP50"] == pytest.approx(0.9)
    assert first["per_teacher"]["teacher_a"]["student"]["AP50"] == 0.40  # input left as it was
    assert mean_per_class(records)["circle"]["AP50"] == pytest.approx(0.45)


@pytest.fixture(scope="module")
def quick_three_teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo3")
    out = root / "run"
    threads = torch.get_num_threads()
    try:
        code = main(
            [
                *("demo", "--quick", "--threads", "1", "--cache-dir", str(root / "cache")),
                *("--output", str(out), "--no-progress", "--teachers", "3", "--seeds", "2"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_with_three_overlapping_teachers_and_two_seeds(quick_three_teachers):
    out, res = quick_three_teachers
    assert res["config"]["demo"]["split"] == "shapes-thirds-overlap"
    assert list(res["per_teacher"]) == ["teacher_a", "teacher_b", "teacher_c"]
    assert res["per_teacher"]["teacher_c"]["classes"] == ["circle", "diamond", "crescent"]
    # one union index per class: 8 classes although 11 (teacher, class) pairs
    assert len(res["evaluation"]["student"]["per_class"]) == 8
    subsets = {"all", "teacher_a", "teacher_b", "teacher_c"}
    assert set(res["evaluation"]["student"]["subsets"]) == subsets
    assert len(res["teachers"]) == 3 and res["ensemble_union"] is not None
    # two student seeds: the first in student/, the second in student-seed7/
    assert res["seeds"] == [42, 7] and [s["seed"] for s in res["students"]] == [42, 7]
    assert res["students"][1]["source"] == "trained"
    assert (out / "student" / "checkpoint.pt").is_file()
    assert (out / "student-seed7" / "checkpoint.pt").is_file()
    for name, v in res["per_teacher"].items():
        vals = [s["evaluation"]["subsets"][name]["AP50"] for s in res["students"]]
        assert v["student_per_seed"]["AP50"] == vals
        assert v["student"]["AP50"] == pytest.approx(sum(vals) / 2)
        assert v["student_sd"]["AP50"] == pytest.approx(abs(vals[0] - vals[1]) / 2**0.5)
    report = (out / "report.md").read_text()
    assert "Three teachers were trained on the `shapes-thirds-overlap` split" in report
    assert "circle: teacher_a, teacher_c" in report and "merged by class-aware NMS" in report
    assert (
        "**2 seeds** (42, 7)" in report and "## Results (`test` split, 2 student seeds)" in report
    )
    for name in ("teacher_a", "teacher_b", "teacher_c", "union (8 classes)"):
        assert f"| {name}" in report
    assert "| 7 |" in report  # the per-seed table


def test_demo_flags_choose_the_split_seeds_and_evaluation_images(capsys):
    from ka_rs.demo import flag_overrides

    ov = flag_overrides([], teachers=3, seeds=2, eval_split="val")
    cfg = load_demo_config(None, ov, quick=True)
    assert cfg.demo.split == "shapes-thirds-overlap" and cfg.demo.seeds == 2
    assert cfg.demo.eval_split == "val" and cfg.demo.ablate_seeds == 3
    abl = load_demo_config(None, flag_overrides([], seeds=5, ablate=True), quick=True)
    assert abl.demo.ablate_seeds == 5 and abl.demo.seeds == 1
    assert load_demo_config(None, flag_overrides([], teachers=2)).demo.split == "shapes-halves"
    with pytest.raises(ConfigError, match="--teachers and --set demo.split"):
        flag_overrides(["demo.split=shapes-halves"], teachers=3)
    with pytest.raises(ConfigError, match="demo.seeds: expected 1 to 10"):
        load_demo_config(None, flag_overrides([], seeds=11))
    with pytest.raises(ConfigError, match="demo.eval_split"):
        load_demo_config(None, ["demo.eval_split=train"])
    assert main(["demo", "--quick", "--teachers", "3", "--set", "demo.split=shapes-halves"]) == 2
    assert "--teachers and --set demo.split" in capsys.readouterr().err
    assert main(["ablate", "--quick", "--seeds", "0"]) == 2
    assert "demo.ablate_seeds" in capsys.readouterr().err


def test_configs_demo_toml_mirrors_the_built_in_defaults():
    with (REPO / "configs" / "demo.toml").open("rb") as f:
        data = tomllib.load(f)
    assert data == DEMO_DEFAULTS
    assert load_demo_config(REPO / "configs" / "demo.toml") == load_demo_config()


def test_demo_overrides(tmp_path):
    cfg = load_demo_config(
        None,
        [
            "teacher.train.max_steps=7",
            "student.amalgamation.sa=false",
            "student.amalgamation.student_layout=slots",
            "demo.num_eval_images=12",
        ],
    )
    assert cfg.teacher.train.max_steps == 7 and not cfg.student.amalgamation.sa
    # the default compact student needs SA: the error says what to set instead
    with pytest.raises(ConfigError, match="sa = false .*student_layout = 'slots'"):
        load_demo_config(None, ["student.amalgamation.sa=false"])
    assert cfg.demo.num_eval_images == 12
    assert cfg.teacher_config("teacher_b", tmp_path).data.teacher == "teacher_b"
    quick = load_demo_config(None, quick=True)
    assert quick.teacher.train.max_steps < 50 and quick.student.train.max_steps < 50


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("demo.nope=1", "demo.nope"),
        ("teacher.train.max_stpes=3", "train.max_stpes"),
        ("student.amalgamation.topn=3", "amalgamation.topn"),
        ("student.amalgamation.init_from=teacher_z", "init_from"),
        ("demo.split=nope", "demo.split"),
        ("model.preset=x", "unknown section 'model'"),
    ],
)
def test_demo_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_demo_config(None, [override])


def test_cli_demo_bad_override_is_a_one_line_error(capsys):
    assert main(["demo", "--quick", "--set", "demo.grid_images=many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ka-rs demo: error:") and "demo.grid_images" in err


def test_a_failing_worker_names_its_job_and_log(tmp_path):
    from ka_rs.demo.jobs import Job, run_jobs
    from ka_rs.demo.teachers import _job_train_teacher

    log = tmp_path / "train.log"
    job = Job(
        label="teacher broken",
        fn=_job_train_teacher,
        kwargs={"cfg_dict": {"train": {"batch_sise": 2}}, "resume": False, "log_path": str(log)},
        metrics=tmp_path / "metrics.jsonl",
        total_steps=1,
    )
    with pytest.raises(RuntimeError, match="teacher broken: failed .*train.batch_sise") as err:
        run_jobs([job, job], 2, 1, progress=False)
    assert str(log) in str(err.value)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_workers_exit_when_the_demo_process_dies(tmp_path):
    import subprocess
    import sys
    import textwrap
    import time

    pidfile = tmp_path / "worker.pid"
    worker = (
        "import os, time; from ka_rs.demo.jobs import _exit_with_parent; "
        f"_exit_with_parent(0.1); open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
        "time.sleep(120)"
    )
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {worker!r}])
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        worker_pid = int(pidfile.read_text())
        assert _alive(worker_pid)
        proc.kill()  # SIGKILL to the parent alone, as a scheduler might
        proc.wait()
        deadline = time.monotonic() + 30
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker_pid), "the worker outlived its parent"
    finally:
        proc.kill()


def test_teacher_ensemble_skips_non_class_slots():
    from ka_rs.demo import TeacherEnsemble
    from ka_rs.teachers import Teacher

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images, mask=None):
            b = images.shape[0]
            q = self.logits.shape[0]
            return {"pred_logits": self.logits.expand(b, -1, -1), "pred_boxes": torch.rand(b, q, 4)}

    # softmax heads: slots [a, None, b] + no-object, and [c] + no-object
    t1 = Teacher(Fixed([[1.0, 2.0, 3.0, 4.0]]), ["a", None, "b"], "softmax", name="t1")
    t2 = Teacher(Fixed([[5.0, 6.0]]), ["c"], "softmax", name="t2")
    ens = TeacherEnsemble([t1, t2], ["a", "b", "c"])
    out = ens(torch.zeros(2, 3, 8, 8))
    assert out["pred_logits"].shape == (2, 2, 4) and out["pred_boxes"].shape == (2, 2, 4)
    assert out["pred_logits"][0, 0].tolist() == [1.0, 3.0, -1e4, 4.0]  # the None slot is dropped
    assert out["pred_logits"][0, 1].tolist() == [-1e4, -1e4, 5.0, 6.0]

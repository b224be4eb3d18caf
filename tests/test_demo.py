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


def test_quick_ablation_reuses_the_demo_student(quick_demo, tmp_path, capsys):
    cache, _, _ = quick_demo
    out = tmp_path / "abl"
    args = ["ablate", "--quick", "--threads", "1", "--cache-dir", str(cache), "--output", str(out)]
    assert main([*args, "--no-progress", "--variants", "sa_ta,ta,aggregation_ta"]) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in res["rows"]] == ["sa_ta", "ta", "aggregation_ta"]
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["sa_ta"]["source"].startswith("reused")  # the demo's identical SA + TA run
    # the other two trained side by side in worker processes, each logging to its folder
    for name in ("ta", "aggregation_ta"):
        assert rows[name]["source"] == "trained" and rows[name]["steps"] == 6
        assert (out / name / "train.log").is_file() and (out / name / "checkpoint.pt").is_file()
    for r in rows.values():
        assert set(r["subsets"]) == {"all", "teacher_a", "teacher_b"}
    md = (out / "ablation.md").read_text()
    assert "aggregation + TA" in md and "SA + TA" in md and "teacher_a AP50" in md
    assert "aggregation + TA" in capsys.readouterr().out
    assert main([*args, "--variants", "nope"]) == 2


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
            "demo.num_eval_images=12",
        ],
    )
    assert cfg.teacher.train.max_steps == 7 and not cfg.student.amalgamation.sa
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

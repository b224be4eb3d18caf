"""`ka-rs` command line: smoke runs via subprocess, user errors without tracebacks (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ka_rs.cli import SUBCOMMAND_MODULES, build_parser, main
from ka_rs.engine.checkpoint import load_checkpoint

TINY = [
    "model.preset=anchor_tiny",
    "model.overrides={hidden_dim = 32, nheads = 2, dim_feedforward = 64, num_queries = 8, "
    "cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 2}",
    "data.image_size=32",
    "data.num_train_images=16",
    "data.num_val_images=6",
    "data.split=shapes-halves",
    "data.teacher=teacher_b",
    "train.batch_size=4",
    "train.max_steps=3",
    "train.plot=false",
    "train.num_threads=1",
]
SETS = [a for s in TINY for a in ("--set", s)]


def ka_rs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ka_rs.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "teacher"
    res = ka_rs("train-teacher", *SETS, "-o", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["step"] == 3 and summary["stopped_by"] == "max_steps"
    assert "AP50" in summary
    return out


def test_train_teacher_smoke(trained):
    assert (trained / "checkpoint.pt").is_file() and (trained / "metrics.jsonl").is_file()
    ckpt = load_checkpoint(trained / "checkpoint.pt")
    assert ckpt["class_names"] == ["cross", "ring", "diamond", "crescent"]


def test_train_teacher_from_config_file(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(
        '[model]\npreset = "detr_tiny"\n'
        "overrides = { hidden_dim = 32, nheads = 2, dim_feedforward = 64, num_queries = 6, "
        "cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 1 }\n"
        "[data]\nimage_size = 32\nnum_train_images = 8\nnum_val_images = 4\n"
        'classes = ["circle", "star"]\n'
        "[train]\nbatch_size = 4\nepochs = 1\nplot = false\n"
    )
    res = ka_rs("train-teacher", "-c", str(cfg), "-o", str(tmp_path / "run"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["stopped_by"] == "epochs"
    assert load_checkpoint(tmp_path / "run/checkpoint.pt")["class_names"] == ["circle", "star"]


def test_evaluate_smoke(trained, tmp_path):
    out = tmp_path / "eval.json"
    res = ka_rs(
        "evaluate",
        "--checkpoint",
        str(trained / "checkpoint.pt"),
        "--subsets",
        "shapes-halves",
        "--split",
        "test",
        "--num-images",
        "5",
        "--json",
        str(out),
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    assert "AP50" in res.stdout and "teacher_b" in res.stdout  # the rich table
    data = json.loads(out.read_text())
    assert set(data["subsets"]) == {"all", "teacher_b"}  # teacher_a has no class in this model
    assert data["num_images"] == 5
    res = ka_rs("evaluate", "--checkpoint", str(trained / "checkpoint.pt"), "--json", "-")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["num_images"] == 6


def test_resume_finished_run_from_its_own_config(trained):
    res = ka_rs("train-teacher", "--resume", "-o", str(trained), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["step"] == 3


def test_export_shapes(tmp_path):
    res = ka_rs(
        "export-shapes", str(tmp_path / "shapes"), "--splits", "val", "--num-images", "3",
        "--image-size", "48",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ann = json.loads((tmp_path / "shapes/annotations/instances_val.json").read_text())
    assert len(ann["images"]) == 3 and len(list((tmp_path / "shapes/val").iterdir())) == 3


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["train-teacher", "--set", "optim.lrr=1"], ["optim.lrr", "did you mean 'lr'"]),
        (["train-teacher", "--set", "train.epochs=many"], ["train.epochs"]),
        (["train-teacher", "--config", "/nonexistent/x.toml"], ["/nonexistent/x.toml"]),
        (["train-teacher", "--set", 'data.classes=["unicorn"]'], ["unicorn"]),
        (["train-teacher", "--resume", "/nonexistent/ckpt.pt"], ["/nonexistent/ckpt.pt"]),
        (["evaluate", "--checkpoint", "/nonexistent/c.pt"], ["does not exist"]),
        (["export-shapes", "/tmp/x", "--splits", "bogus"], ["bogus"]),
    ],
)
def test_user_errors_exit_2_without_traceback(args, needles, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"ka-rs {args[0]}: error: ")
    for needle in needles:
        assert needle in err, (needle, err)


def test_user_error_exit_code_of_the_real_command():
    assert_user_error(ka_rs("train-teacher", "--set", "optim.lrr=1"), "optim.lrr")


def test_foreign_checkpoint_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    assert main(["train-teacher", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("bad.pt") == 2 and "not a PyTorch" in err and "Traceback" not in err


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nbatch_sise = 4\n")
    assert main(["train-teacher", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "train.batch_sise" in err


def test_help_and_registration(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train-teacher", "evaluate", "export-shapes"} <= set(sub.choices)
    assert SUBCOMMAND_MODULES[0] == "ka_rs.engine.commands"
    assert main([]) == 2  # no command: usage on stderr
    assert "usage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train-teacher", "--help"])
    assert exc.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_debug_flag_shows_traceback():
    res = ka_rs("--debug", "train-teacher", "--set", "optim.lrr=1")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_train_and_evaluate_on_a_coco_folder(tmp_path):
    """The COCO-format path end to end: export shapes as files, train on them, evaluate."""
    root = tmp_path / "shapes"
    res = ka_rs(
        "export-shapes", str(root), "--splits", "train,val", "--num-images", "8",
        "--image-size", "32", "--no-progress",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    coco = [
        "data.source=coco",
        f"data.root={json.dumps(str(root / 'train'))}",
        f"data.ann_file={json.dumps(str(root / 'annotations/instances_train.json'))}",
        f"data.val_root={json.dumps(str(root / 'val'))}",
        f"data.val_ann_file={json.dumps(str(root / 'annotations/instances_val.json'))}",
        "data.classes=ring,star",
    ]
    train = ["train.batch_size=4", "train.epochs=1", "train.plot=false", "train.num_threads=1"]
    sets = [a for s in TINY[:3] + train + coco for a in ("--set", s)]
    res = ka_rs("train-teacher", *sets, "-o", str(tmp_path / "run"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["step"] == 2  # 8 images, batch 4: 2 steps per epoch
    ckpt = tmp_path / "run/checkpoint.pt"
    assert load_checkpoint(ckpt)["class_names"] == ["ring", "star"]
    res = ka_rs(
        "evaluate", "--checkpoint", str(ckpt), "--data", "coco", "--root", str(root / "val"),
        "--ann-file", str(root / "annotations/instances_val.json"), "--json", "-",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["num_images"] == 8 and set(data["per_class"]) == {"ring", "star"}

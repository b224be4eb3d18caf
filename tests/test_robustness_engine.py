"""Engine robustness (issue 12): nothing crashes and nothing is silently wrong.

Hostile inputs per area, each expected to end in a named error (for ``ka-rs``: one line,
``ka-rs <command>: error: <message>``, exit 2) or, where the input is legal, a logged warning:

* integrity: corrupted tensors (model / optimiser bytes flipped), NaN / inf weights, forged
  digests, checkpoints written without a digest, ``ka-rs evaluate`` / ``convert`` on them;
* full disk: every output of a run pointed at ``/dev/full`` (metrics.jsonl, checkpoint.pt,
  config.toml, curves.png, eval.json, ``evaluate --json``, ``convert``'s output,
  ``export-shapes``' images, the demo's results.json / report.md, figures) and a checkpoint
  write failing half-way: the error names the file, the last good checkpoint stays, no
  temporary file is left and ``/dev/full`` stays a device;
* metadata: class names that do not fit the class head, ``--resume`` with another model or a
  checkpoint of another kind;
* config values: None / wrong types for every numeric key, 64-bit overflow (``train.seed``),
  a directory given as config, repeated TOML keys, ``evaluate --skip-invalid``;
* teachers: the same source under two names (warning), a repeated ``[teachers]`` key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import typing
import zipfile
from pathlib import Path

import pytest
import torch
from ka_rs.cli import main
from ka_rs.engine.checkpoint import (
    DIGEST_KEY,
    CheckpointError,
    NonFiniteError,
    atomic_save,
    checkpoint_digest,
    load_checkpoint,
    load_detector,
    save_checkpoint,
    seal_checkpoint,
)
from ka_rs.engine.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)
from ka_rs.engine.logging import MetricsWriter, OutputError, atomic_write_text
from ka_rs.engine.train import train_teacher
from ka_rs.models import build_model

DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full (Linux)")

TINY_MODEL = {
    "hidden_dim": 32,
    "nheads": 2,
    "dim_feedforward": 64,
    "num_queries": 8,
    "cnn_channels": [8, 16, 16, 32],
    "enc_layers": 1,
    "dec_layers": 2,
}
TINY = [
    "model.preset=anchor_tiny",
    "model.overrides={hidden_dim = 32, nheads = 2, dim_feedforward = 64, num_queries = 8, "
    "cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 2}",
    "data.image_size=32",
    "data.num_train_images=8",
    "data.num_val_images=4",
    "data.split=shapes-halves",
    "data.teacher=teacher_a",
    "train.batch_size=4",
    "train.progress=false",
    "train.plot=false",
    "train.num_threads=1",
    "train.log_every_steps=1",
    "train.seed=7",
]
SETS = [a for s in TINY for a in ("--set", s)]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "crescent"]


def tiny_config(out: Path, *extra: str):
    return load_config(None, [*TINY, f"train.output_dir={json.dumps(str(out))}", *extra])


def tiny_detector(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("anchor_tiny", num_classes, **TINY_MODEL)


def detector_checkpoint(
    path: Path, class_names: list[str] | None = None, config: dict | None = None, **kw
) -> Path:
    """A ka_rs checkpoint of an untrained tiny detector (evaluation runs on it)."""
    names = class_names or SHAPES[:4]
    return save_checkpoint(
        path,
        model=tiny_detector(len(names)),
        class_names=names,
        config=config or {"data": {"image_size": 32}},
        include_rng=False,
        **kw,
    )


def one_line_error(capsys, command: str, *needles: str) -> str:
    """The stderr of a failed ``main()``: one line ``ka-rs <command>: error: ...``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ka-rs ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ka-rs {command}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_temp_files(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def flip_tensor_bytes(path: Path, out: Path, member_index: int = 0) -> Path:
    """Copy ``path`` with a few bytes flipped inside one stored tensor (``data/<n>``)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        members = sorted(
            (i for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 16),
            key=lambda i: i.file_size,
            reverse=True,
        )
        info = members[member_index]
    head = info.header_offset  # the local header's name / extra lengths (torch pads extra)
    name_len = int.from_bytes(data[head + 26 : head + 28], "little")
    extra_len = int.from_bytes(data[head + 28 : head + 30], "little")
    start = head + 30 + name_len + extra_len
    for i in range(start + 4, start + 12):
        data[i] ^= 0x5A
    out.write_bytes(bytes(data))
    return out


# ---------------------------------------------------------------------------------------------
# 1. checkpoint integrity


def test_flipped_weight_bytes_are_detected(tmp_path):
    path = detector_checkpoint(tmp_path / "good.pt")
    assert load_checkpoint(path)[DIGEST_KEY].startswith("sha256:")
    bad = flip_tensor_bytes(path, tmp_path / "bad.pt")
    # the archive itself is intact: torch alone loads the corrupted weights without a word
    assert torch.load(bad, weights_only=True)["format"] == "ka_rs.checkpoint"
    with pytest.raises(CheckpointError, match="weights are corrupted") as exc:
        load_checkpoint(bad)
    assert "bad.pt" in str(exc.value)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_detector(bad)


def test_flipped_optimizer_bytes_are_detected(tmp_path):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ck.pt", model=model, class_names=[], optimizer=opt)
    ckpt = torch.load(path, weights_only=True)
    # corrupt the optimiser's exp_avg_sq only (the weights stay intact)
    ckpt["optimizer"]["state"][0]["exp_avg_sq"][0, 0] += 1.0
    atomic_save(ckpt, tmp_path / "opt.pt")  # saved without re-sealing
    with pytest.raises(CheckpointError, match="corrupted") as exc:
        load_checkpoint(tmp_path / "opt.pt")
    assert "opt.pt" in str(exc.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, value):
    model = tiny_detector(2)
    state = model.state_dict()
    name = "class_embed.weight" if "class_embed.weight" in state else next(iter(state))
    ckpt = {
        "format": "ka_rs.checkpoint",
        "version": 1,
        "kind": "teacher",
        "model": {k: v.clone() for k, v in state.items()},
        "class_names": ["a", "b"],
    }
    ckpt["model"][name].view(-1)[3] = value
    atomic_save(seal_checkpoint(ckpt), tmp_path / "nan.pt")  # a valid digest over bad values
    with pytest.raises(CheckpointError, match="not finite") as exc:
        load_checkpoint(tmp_path / "nan.pt")
    assert name in str(exc.value) and "nan.pt" in str(exc.value)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = tiny_detector(2)
    path = save_checkpoint(tmp_path / "ck.pt", model=model, class_names=["a", "b"], step=1)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        save_checkpoint(path, model=model, class_names=["a", "b"], step=2)
    assert path.read_bytes() == before and no_temp_files(tmp_path)


def test_checkpoint_without_digest_loads_with_a_warning(tmp_path, caplog):
    path = detector_checkpoint(tmp_path / "new.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt[DIGEST_KEY]
    atomic_save(ckpt, tmp_path / "old.pt")  # as ka_rs wrote it before digests existed
    with caplog.at_level(logging.WARNING, logger="ka_rs.checkpoint"):
        loaded = load_checkpoint(tmp_path / "old.pt")
    assert DIGEST_KEY not in loaded
    warned = [r.getMessage() for r in caplog.records if "no tensor digest" in r.getMessage()]
    assert len(warned) == 1 and "old.pt" in warned[0]
    assert load_detector(tmp_path / "old.pt").class_names == SHAPES[:4]


@pytest.mark.parametrize("forged", [123, "md5:00", "sha256:" + "0" * 64])
def test_forged_digest_entries_are_refused(tmp_path, forged):
    path = detector_checkpoint(tmp_path / "ck.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt[DIGEST_KEY] = forged
    atomic_save(ckpt, tmp_path / "forged.pt")
    with pytest.raises(CheckpointError, match="corrupted") as exc:
        load_checkpoint(tmp_path / "forged.pt")
    assert "forged.pt" in str(exc.value)
    with pytest.raises(ValueError, match="clash"):
        save_checkpoint(
            tmp_path / "x.pt", model=torch.nn.Linear(1, 1), class_names=[], extra={DIGEST_KEY: "x"}
        )


def test_digest_covers_names_dtypes_shapes_and_values():
    base = {"model": {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, "step": 1}
    d = checkpoint_digest(base)
    assert d == checkpoint_digest(
        {"step": 5, "model": {"b": torch.ones(2), "a": base["model"]["a"]}}
    )
    variants = [
        {"model": {"a": torch.arange(6.0).reshape(3, 2), "b": torch.ones(2)}},  # shape
        {"model": {"a": torch.arange(6.0).reshape(2, 3).double(), "b": torch.ones(2)}},  # dtype
        {"model": {"a2": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}},  # name
        {"model": {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, 2.0])}},  # value
        {"model": {"a": torch.arange(6.0).reshape(2, 3)}},  # missing tensor
    ]
    assert len({d, *(checkpoint_digest(v) for v in variants)}) == 1 + len(variants)
    # non-contiguous tensors hash as their values
    t = torch.arange(6.0).reshape(3, 2).t()
    assert checkpoint_digest({"m": {"t": t}}) == checkpoint_digest({"m": {"t": t.contiguous()}})


def test_cli_evaluate_and_convert_refuse_a_corrupted_checkpoint(tmp_path, capsys):
    bad = flip_tensor_bytes(detector_checkpoint(tmp_path / "good.pt"), tmp_path / "bad.pt")
    assert main(["evaluate", "--checkpoint", str(bad), "--num-images", "2"]) == 2
    one_line_error(capsys, "evaluate", "bad.pt", "weights are corrupted")
    assert main(["convert", str(bad), str(tmp_path / "out.pt")]) == 2
    one_line_error(capsys, "convert", "bad.pt", "corrupted")
    assert not (tmp_path / "out.pt").exists()


def test_convert_writes_a_digest(tmp_path, capsys):
    src = detector_checkpoint(tmp_path / "src.pt")
    assert main(["convert", str(src), str(tmp_path / "conv.pt")]) == 0
    capsys.readouterr()
    ckpt = load_checkpoint(tmp_path / "conv.pt")
    assert ckpt[DIGEST_KEY] == checkpoint_digest(ckpt)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(flip_tensor_bytes(tmp_path / "conv.pt", tmp_path / "conv_bad.pt"))


# ---------------------------------------------------------------------------------------------
# 1b. divergence: a NaN loss / gradient / weight stops the run, the last good checkpoint stays


@pytest.mark.parametrize(
    ("lr", "expected"),
    [
        ("1e30", "not finite"),  # weights ~1e30 after one step: the next outputs overflow
        ("1e38", "optimiser step overflowed"),  # lr / (1 - beta1) overflows float32 in AdamW
    ],
)
def test_diverged_training_is_one_line_and_keeps_the_checkpoint(tmp_path, capsys, lr, expected):
    out = tmp_path / "run"
    train_teacher(tiny_config(out, "train.max_steps=2"))
    before = (out / "checkpoint.pt").read_bytes()
    # a new run into the same folder with an absurd learning rate stops before writing any
    # checkpoint: the previous run's stays as it was
    lr = [f"optim.lr={lr}", f"optim.lr_backbone={lr}", "optim.clip_max_norm=0"]
    sets = [a for s in [*lr, "train.max_steps=6"] for a in ("--set", s)]
    assert main(["train-teacher", *SETS, *sets, "-o", str(out)]) == 2
    one_line_error(capsys, "train-teacher", "at step", expected, "is kept unchanged")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert no_temp_files(out)


def test_resume_with_other_learning_rates_warns(tmp_path, caplog):
    out = tmp_path / "run"
    train_teacher(tiny_config(out, "train.max_steps=1"))
    with caplog.at_level(logging.WARNING, logger="ka_rs.train"):
        train_teacher(tiny_config(out, "train.max_steps=2", "optim.lr=0.5"), resume=True)
    msgs = [r.getMessage() for r in caplog.records if "learning rates" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("optim.lr = 0.5 in the config")


# ---------------------------------------------------------------------------------------------
# 2. full disk: every output pointed at /dev/full


@needs_dev_full
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("metrics.jsonl", []),
        ("checkpoint.pt", ["train.checkpoint_every_steps=1"]),
        ("config.toml", []),
        ("curves.png", ["train.plot=true"]),
        ("eval.json", []),
    ],
)
def test_train_teacher_outputs_on_a_full_disk(tmp_path, capsys, name, extra):
    out = tmp_path / "run"
    train_teacher(tiny_config(out, "train.max_steps=1"))  # the last good checkpoint: step 1
    before = (out / "checkpoint.pt").read_bytes()
    target = out / name
    target.unlink(missing_ok=True)
    target.symlink_to(DEV_FULL)
    sets = [a for s in ["train.max_steps=2", *extra] for a in ("--set", s)]
    assert main(["train-teacher", *SETS, *sets, "-o", str(out)]) == 2
    line = one_line_error(capsys, "train-teacher", f"{target}: No space left on device")
    assert line.endswith(f"error: {target}: No space left on device")
    assert stat.S_ISCHR(DEV_FULL.stat().st_mode)  # the device was written through, not replaced
    assert no_temp_files(out)
    if name != "checkpoint.pt":  # the last good checkpoint is intact (and still loads)
        assert load_checkpoint(out / "checkpoint.pt")["step"] >= 1
        if name in ("metrics.jsonl", "config.toml"):  # failed before any new checkpoint
            assert (out / "checkpoint.pt").read_bytes() == before


def test_checkpoint_write_failing_half_way_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = detector_checkpoint(tmp_path / "checkpoint.pt", step=1)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError) as exc:
        detector_checkpoint(path, step=2)
    assert str(exc.value) == f"{path}: No space left on device"
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert no_temp_files(tmp_path)


@needs_dev_full
def test_evaluate_json_on_a_full_disk(tmp_path, capsys):
    ckpt = detector_checkpoint(tmp_path / "ck.pt")
    args = ["evaluate", "--checkpoint", str(ckpt), "--num-images", "2", "--no-progress"]
    assert main([*args, "--json", str(DEV_FULL)]) == 2
    one_line_error(capsys, "evaluate", "/dev/full: No space left on device")
    link = tmp_path / "eval.json"
    link.symlink_to(DEV_FULL)
    assert main([*args, "--json", str(link)]) == 2
    one_line_error(capsys, "evaluate", f"{link}: No space left on device")
    assert stat.S_ISCHR(DEV_FULL.stat().st_mode)


@needs_dev_full
def test_convert_to_a_full_disk(tmp_path, capsys):
    src = detector_checkpoint(tmp_path / "src.pt")
    assert main(["convert", str(src), str(DEV_FULL)]) == 2
    one_line_error(capsys, "convert", "/dev/full: No space left on device")
    assert stat.S_ISCHR(DEV_FULL.stat().st_mode)


@needs_dev_full
def test_export_shapes_to_a_full_disk(tmp_path, capsys):
    root = tmp_path / "shapes"
    (root / "val").mkdir(parents=True)
    (root / "val" / "000000.png").symlink_to(DEV_FULL)
    args = ["export-shapes", str(root), "--splits", "val", "--num-images", "2", "--no-progress"]
    assert main(args) == 2
    one_line_error(
        capsys, "export-shapes", f"{root / 'val' / '000000.png'}: No space left on device"
    )


@needs_dev_full
def test_metrics_writer_and_figures_on_a_full_disk(tmp_path):
    (tmp_path / "m.jsonl").symlink_to(DEV_FULL)
    writer = MetricsWriter(tmp_path / "m.jsonl")
    with pytest.raises(OutputError, match=r"m\.jsonl: No space left on device"):
        writer.write({"type": "train", "step": 1, "loss": 1.0})
    writer.write({"step": 2})  # abandoned after the failure: nothing more, no second error
    writer.close()
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(OutputError, match="dir.jsonl"):
        MetricsWriter(tmp_path / "dir.jsonl")

    from ka_rs.engine.plots import plot_loss_curves

    (tmp_path / "curves.png").symlink_to(DEV_FULL)
    records = [{"type": "train", "step": 1, "loss": 1.0}]
    with pytest.raises(OutputError, match=r"curves\.png: No space left on device"):
        plot_loss_curves({"run": records}, tmp_path / "curves.png")
    assert plot_loss_curves({"run": records}, tmp_path / "ok.png").stat().st_size > 0
    with pytest.raises(OutputError, match=r"full\.txt: No space left"):
        (tmp_path / "full.txt").symlink_to(DEV_FULL)
        atomic_write_text(tmp_path / "full.txt", "x")
    assert stat.S_ISCHR(DEV_FULL.stat().st_mode)


@needs_dev_full
@pytest.mark.parametrize("name", ["results.json", "report.md"])
def test_demo_report_on_a_full_disk(tmp_path, monkeypatch, name):
    from ka_rs.demo import report

    monkeypatch.setattr(report, "render_report", lambda results, cfg: "# report\n")
    (tmp_path / name).symlink_to(DEV_FULL)
    with pytest.raises(OutputError) as exc:
        report.write_report(tmp_path, {"AP50": 0.5}, cfg=None)  # type: ignore[arg-type]
    assert str(exc.value) == f"{tmp_path / name}: No space left on device"
    assert no_temp_files(tmp_path)


def test_read_only_run_folder_is_a_named_error(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(["train-teacher", *SETS, "--set", "train.max_steps=1", "-o", str(out)]) == 2
        one_line_error(capsys, "train-teacher", str(out), "Permission denied")
    finally:
        out.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# 3. metadata cross-checks


def test_class_names_that_do_not_fit_the_head(tmp_path, capsys):
    path = save_checkpoint(
        tmp_path / "ck.pt", model=tiny_detector(4), class_names=["a", "b", "c"], include_rng=False
    )
    with pytest.raises(
        CheckpointError, match="3 class names but its model's sigmoid class head has 4"
    ):
        load_detector(path)
    assert main(["evaluate", "--checkpoint", str(path), "--num-images", "2"]) == 2
    one_line_error(capsys, "evaluate", "ck.pt", "3 class names")
    odd = save_checkpoint(
        tmp_path / "odd.pt", model=tiny_detector(2), class_names=[1, 2], include_rng=False
    )
    with pytest.raises(CheckpointError, match="not a list of names"):
        load_detector(odd)


def test_external_checkpoint_class_names_vs_its_head(tmp_path):
    from ka_rs.teachers import load_teacher

    ckpt = {
        "format": "ka_rs.checkpoint",
        "version": 1,
        "kind": "teacher",
        "model": {"w": torch.zeros(2)},
        "model_config": {},
        "class_names": ["a", "b", "c"],
        "external": {
            "library": "transformers",
            "model_type": "rt_detr",
            "config": {"id2label": {"0": "a", "1": "b"}},
        },
    }
    atomic_save(seal_checkpoint(ckpt), tmp_path / "ext.pt")
    with pytest.raises(CheckpointError, match="3 class names but its rt_detr model's class head"):
        load_teacher(str(tmp_path / "ext.pt"))


def test_resume_with_another_model_names_the_field_and_shape(tmp_path, capsys):
    out = tmp_path / "run"
    train_teacher(tiny_config(out, "train.max_steps=1"))
    cfg = tmp_path / "other.toml"
    cfg.write_text(
        '[model]\npreset = "anchor_tiny"\n'
        "overrides = { hidden_dim = 32, nheads = 2, dim_feedforward = 64, num_queries = 5, "
        "cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 2 }\n"
        "[data]\nimage_size = 32\nnum_train_images = 8\nnum_val_images = 4\n"
        'split = "shapes-halves"\nteacher = "teacher_a"\n'
        "[train]\nbatch_size = 4\nmax_steps = 2\nplot = false\nprogress = false\n"
    )
    assert main(["train-teacher", "-c", str(cfg), "-o", str(out), "--resume"]) == 2
    one_line_error(
        capsys,
        "train-teacher",
        "checkpoint.pt",
        "num_queries = 5 here vs 8 in the checkpoint",
        "anchors (8, 4) in the checkpoint vs (5, 4) here",
    )


def test_resume_with_a_shape_neutral_model_change_warns(tmp_path, caplog):
    out = tmp_path / "run"
    train_teacher(tiny_config(out, "train.max_steps=1"))
    with caplog.at_level(logging.WARNING, logger="ka_rs.train"):
        res = train_teacher(
            tiny_config(out, "train.max_steps=2", "model.overrides.dropout=0.3"), resume=True
        )
    assert res.state.step == 2
    assert any("dropout = 0.3 here" in r.getMessage() for r in caplog.records)


def test_resume_of_another_kind_or_a_weights_only_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    model = tiny_detector(4)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(
        out / "checkpoint.pt",
        model=model,
        class_names=SHAPES[:4],
        optimizer=opt,
        kind="student",
        config=tiny_config(out).to_dict(),
    )
    assert main(["train-teacher", "--resume", "-o", str(out)]) == 2
    one_line_error(capsys, "train-teacher", "is a 'student' checkpoint, not 'teacher'")
    detector_checkpoint(out / "checkpoint.pt", config=tiny_config(out).to_dict())
    assert main(["train-teacher", "--resume", "-o", str(out)]) == 2
    one_line_error(capsys, "train-teacher", "weights only")


# ---------------------------------------------------------------------------------------------
# 4. config values


def _numeric_keys() -> list[str]:
    keys = []
    for section, cls in (("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                keys.append(f"{section}.{f.name}")
    return keys


NUMERIC_KEYS = _numeric_keys()


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", [None, "1", True, [1]])
def test_numeric_config_values_of_the_wrong_type(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as exc:
        config_from_dict({section: {name: value}}, source="run.toml")
    assert key in str(exc.value) and "run.toml" in str(exc.value)


@pytest.mark.parametrize(
    "override",
    [
        "train.seed=99999999999999999999",
        "train.seed=-99999999999999999999",
        "data.seed=18446744073709551616",
        "train.max_steps=1e30",
        "train.batch_size=9223372036854775808",
    ],
)
def test_integers_overflowing_64_bits_are_named(override, capsys):
    key = override.split("=")[0]
    assert main(["train-teacher", "--set", override]) == 2
    one_line_error(capsys, "train-teacher", key, "does not fit a 64-bit integer")


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_extreme_seeds_that_fit_train(tmp_path, seed):
    res = train_teacher(tiny_config(tmp_path, "train.max_steps=1", f"train.seed={seed}"))
    assert res.state.step == 1


def test_config_that_is_a_directory_or_repeats_a_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a directory, not a TOML file"):
        load_config(tmp_path)
    assert main(["train-teacher", "-c", str(tmp_path)]) == 2
    one_line_error(capsys, "train-teacher", str(tmp_path), "is a directory, not a TOML file")
    dup = tmp_path / "dup.toml"
    dup.write_text("[train]\nepochs = 2\nseed = 1\nseed = 2\n")
    with pytest.raises(ConfigError, match="key 'train.seed' is given more than once") as exc:
        load_config(dup)
    assert "dup.toml" in str(exc.value) and "line 4" in str(exc.value)


def _coco_with_invalid_items(root: Path, capsys) -> tuple[Path, Path]:
    assert main(["export-shapes", str(root), "--splits", "val", "--num-images", "4",
                 "--image-size", "32", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    ann = root / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    (root / "val" / data["images"][1]["file_name"]).write_bytes(b"not a png")  # unreadable
    data["annotations"][0]["bbox"] = [1.0, 1.0, -3.0, 4.0]  # negative width
    ann.write_text(json.dumps(data))
    return root / "val", ann


def test_evaluate_skip_invalid(tmp_path, capsys):
    images, ann = _coco_with_invalid_items(tmp_path / "coco", capsys)
    ckpt = detector_checkpoint(tmp_path / "ck.pt", class_names=SHAPES)
    base = ["evaluate", "--checkpoint", str(ckpt), "--data", "coco", "--root", str(images),
            "--ann-file", str(ann), "--no-progress"]  # fmt: skip
    assert main(base) == 2
    one_line_error(capsys, "evaluate", "instances_val.json", "--skip-invalid")
    out = tmp_path / "eval.json"
    assert main([*base, "--skip-invalid", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 invalid image(s) and 1 invalid annotation(s); scoring 3 image(s)" in err
    result = json.loads(out.read_text())
    assert result["num_images"] == 3
    assert result["skipped"] == {"images": 1, "annotations": 1, "scored_images": 3}
    for image in images.iterdir():  # nothing readable left
        image.write_bytes(b"")
    assert main([*base, "--skip-invalid"]) == 2
    one_line_error(capsys, "evaluate", "all 4 image(s)", "nothing to evaluate")


# ---------------------------------------------------------------------------------------------
# 5. teachers


def test_same_source_under_two_names_warns(caplog):
    from ka_rs.engine.amalgamate_config import load_amalgamate_config

    with caplog.at_level(logging.WARNING, logger="ka_rs.amalgamate"):
        cfg = load_amalgamate_config(None, [], ["a=runs/t/checkpoint.pt", "b=runs/t/checkpoint.pt"])
    assert list(cfg.teachers) == ["a", "b"]
    msgs = [r.getMessage() for r in caplog.records if "same source" in r.getMessage()]
    assert len(msgs) == 1 and "a and b" in msgs[0] and "runs/t/checkpoint.pt" in msgs[0]


def test_repeated_teachers_key_in_toml_is_refused(tmp_path, capsys):
    from ka_rs.engine.amalgamate_config import load_amalgamate_config

    cfg = tmp_path / "amg.toml"
    cfg.write_text('[teachers]\na = "x.pt"\nb = "y.pt"\na = "z.pt"\n')
    with pytest.raises(ConfigError) as exc:
        load_amalgamate_config(cfg)
    assert "amg.toml" in str(exc.value) and "line 4" in str(exc.value)
    assert main(["amalgamate", "-c", str(cfg)]) == 2
    one_line_error(capsys, "amalgamate", "amg.toml", "line 4")
    assert main(["amalgamate", "--teacher", "a=x.pt", "--teacher", "a=y.pt"]) == 2
    one_line_error(capsys, "amalgamate", "teacher 'a' is given twice")

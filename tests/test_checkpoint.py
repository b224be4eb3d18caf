"""Checkpoints: round trip, weights_only loading, atomic writes, clear errors for bad files."""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch
from ka_rs.engine.checkpoint import (
    DIGEST_KEY,
    CheckpointError,
    atomic_save,
    capture_rng_state,
    checkpoint_digest,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from ka_rs.engine.config import Config
from ka_rs.engine.logging import OutputError
from torch import nn


def make_parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def save(path, model, opt, sched, **kw):
    return save_checkpoint(
        path,
        model=model,
        class_names=["a", "b"],
        config=Config().to_dict(),
        optimizer=opt,
        scheduler=sched,
        step=7,
        epoch=2,
        batch_in_epoch=3,
        train_seconds=12.5,
        images_seen=99,
        metrics={"AP50": 0.5},
        **kw,
    )


def test_round_trip(tmp_path):
    model, opt, sched = make_parts()
    path = save(tmp_path / "ck.pt", model, opt, sched)
    ckpt = load_checkpoint(path)
    # loads with the strict loader directly as well
    torch.load(path, weights_only=True)
    assert ckpt["step"] == 7 and ckpt["epoch"] == 2 and ckpt["batch_in_epoch"] == 3
    assert ckpt["train_seconds"] == 12.5 and ckpt["images_seen"] == 99
    assert ckpt["class_names"] == ["a", "b"] and ckpt["metrics"] == {"AP50": 0.5}
    assert Config.from_dict(ckpt["config"]) == Config()
    model2, opt2, sched2 = make_parts()
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == sched.last_epoch


def test_rng_state_round_trip():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(10)
    random.random()
    np.random.rand(5)
    restore_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_rng_state_survives_save_load(tmp_path):
    model, opt, sched = make_parts()
    torch.manual_seed(5)
    path = save(tmp_path / "ck.pt", model, opt, sched)
    expected = torch.rand(4)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_atomic_write_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"format": "x", "v": 1}, path)
    before = path.read_bytes()

    def boom(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OutputError, match="disk full") as exc:
        atomic_save({"v": 2}, path)
    assert str(exc.value) == f"{path}: disk full"  # names the file (ka-rs prints it as is)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temp file left behind


def test_atomic_write_replaces(tmp_path):
    model, opt, sched = make_parts()
    path = tmp_path / "sub" / "ck.pt"
    save(path, model, opt, sched)
    save_checkpoint(path, model=model, class_names=["a", "b"], step=9)
    assert load_checkpoint(path)["step"] == 9
    assert sorted(os.listdir(path.parent)) == ["ck.pt"]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as exc:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(exc.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)") as exc:
        load_checkpoint(empty)
    assert "empty.pt" in str(exc.value)
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, keep):
    model, opt, sched = make_parts()
    path = save(tmp_path / "ck.pt", model, opt, sched)
    data = path.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as exc:
        load_checkpoint(bad)
    assert "trunc.pt" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_corrupted_member(tmp_path):
    model, opt, sched = make_parts()
    path = save(tmp_path / "ck.pt", model, opt, sched)
    data = bytearray(path.read_bytes())
    # flip bytes inside the pickle payload of the zip archive
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start, start + 40):
        data[i] ^= 0xFF
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad)
    assert "corrupt.pt" in str(exc.value)


def test_foreign_files(tmp_path):
    # plain text
    txt = tmp_path / "notes.pt"
    txt.write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as exc:
        load_checkpoint(txt)
    assert "notes.pt" in str(exc.value)
    # a raw pickle (legacy / arbitrary object)
    pk = tmp_path / "obj.pt"
    pk.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(pk)
    # a PyTorch file that is a bare state dict (e.g. torchvision weights)
    sd = tmp_path / "resnet.pth"
    torch.save(nn.Linear(2, 2).state_dict(), sd)
    with pytest.raises(CheckpointError, match="foreign file, not written by ka_rs") as exc:
        load_checkpoint(sd)
    assert "resnet.pth" in str(exc.value)
    # a PyTorch file that is a tensor
    t = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), t)
    with pytest.raises(CheckpointError, match="foreign file"):
        load_checkpoint(t)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ka_rs.checkpoint", "version": 1, "model": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only") as exc:
        load_checkpoint(path)
    assert "evil.pt" in str(exc.value)


def test_newer_version_rejected(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": "ka_rs.checkpoint", "version": 99, "model": {}}, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)


def test_extra_entries_cannot_shadow(tmp_path):
    model, opt, sched = make_parts()
    with pytest.raises(ValueError, match="clash"):
        save_checkpoint(tmp_path / "x.pt", model=model, class_names=[], extra={"step": 1})
    save_checkpoint(
        tmp_path / "x.pt", model=model, class_names=[], extra={"teachers": {"a": "p.pt"}}
    )
    assert load_checkpoint(tmp_path / "x.pt")["teachers"] == {"a": "p.pt"}


def test_checkpoints_carry_a_verified_digest(tmp_path):
    model, opt, sched = make_parts()
    path = save(tmp_path / "ck.pt", model, opt, sched)
    raw = torch.load(path, weights_only=True)
    assert raw[DIGEST_KEY] == checkpoint_digest(raw) and raw[DIGEST_KEY].startswith("sha256:")
    # every tensor counts, the optimiser's and the RNG state's too
    raw["rng"]["torch"][0] ^= 1
    atomic_save(raw, tmp_path / "rng.pt")
    with pytest.raises(CheckpointError, match="rng.pt.*weights are corrupted"):
        load_checkpoint(tmp_path / "rng.pt")

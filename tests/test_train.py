"""Training engine: a short run writes its outputs; stop/kill + --resume equals an uninterrupted
run bit for bit (CPU, fixed seeds); data order depends on (seed, epoch) only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ka_rs.engine.checkpoint import NonFiniteError, load_checkpoint, load_detector
from ka_rs.engine.config import Config, ConfigError, OptimConfig, TrainConfig, load_config
from ka_rs.engine.distributed import ResumableDistributedSampler, SeededDataset
from ka_rs.engine.logging import read_metrics
from ka_rs.engine.loop import TrainLoop, build_optimizer
from ka_rs.engine.train import train_teacher
from ka_rs.models import build_model
from torch import nn

# a very small anchor model on 32-px shapes: a few steps take well under a second each
TINY = [
    "model.preset=anchor_tiny",
    "model.overrides={hidden_dim = 32, nheads = 2, dim_feedforward = 64, num_queries = 8, "
    "cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 2}",
    "data.image_size=32",
    "data.num_train_images=24",
    "data.num_val_images=6",
    "data.split=shapes-halves",
    "data.teacher=teacher_a",
    "train.batch_size=4",
    "train.progress=false",
    "train.plot=false",
    "train.num_threads=1",
    "train.log_every_steps=1",
    "train.seed=7",
]


def tiny_config(tmp_path: Path, *extra: str) -> Config:
    return load_config(None, [*TINY, f"train.output_dir={json.dumps(str(tmp_path))}", *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_short_run_writes_outputs(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "train.epochs=2",
        "train.plot=true",
        "optim.lr_drop=[1]",
        "train.eval_every_steps=4",
    )
    res = train_teacher(cfg)
    assert res.stopped_by == "epochs" and res.state.step == 12 and res.state.epoch == 2
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.toml", "metrics.jsonl", "checkpoint.pt", "eval.json", "curves.png"} <= files
    assert load_config(tmp_path / "config.toml") == cfg

    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    evals = read_metrics(tmp_path / "metrics.jsonl", "eval")
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "lr_backbone", "grad_norm"):
        assert all(key in r for r in train), key
    assert all(r["img_per_s"] > 0 and r["wall_minutes"] >= r["train_minutes"] for r in train)
    # StepLR: milestone 1 epoch -> x0.1 from the second epoch on
    assert train[0]["lr"] == pytest.approx(1e-4) and train[-1]["lr"] == pytest.approx(1e-5)
    assert train[-1]["lr_backbone"] == pytest.approx(1e-6)
    # evaluations: step 4 and 8 (eval_every_steps), epoch 1 end (step 6), final (step 12)
    assert [r["step"] for r in evals] == [4, 6, 8, 12]
    minutes = [r["train_minutes"] for r in evals]
    assert minutes == sorted(minutes) and all("AP50" in r for r in evals)
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert set(summary["per_class"]) == {"circle", "square", "triangle", "star"}

    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["kind"] == "teacher" and ckpt["step"] == 12 and ckpt["epoch"] == 2
    assert ckpt["class_names"] == ["circle", "square", "triangle", "star"]
    assert Config.from_dict(ckpt["config"]) == cfg
    det = load_detector(tmp_path / "checkpoint.pt")
    assert det.model.config.num_classes == 4 and not det.model.training
    x = torch.randn(1, 3, 32, 32)
    assert det.model(x).pred_logits.shape == (1, 8, 4)


def test_lr_drop_in_training_minutes(tmp_path):
    # unit "minute": a milestone at 1e-6 minutes is passed after the first step, one far away
    # never
    now = tiny_config(
        tmp_path / "now", "optim.lr_drop=[1e-6]", "optim.lr_drop_unit=minute", "train.max_steps=3"
    )
    train = read_metrics(Path(train_teacher(now).output_dir) / "metrics.jsonl", "train")
    assert [r["lr"] for r in train] == pytest.approx([1e-5] * 3)
    assert train[-1]["lr_backbone"] == pytest.approx(1e-6)
    later = tiny_config(
        tmp_path / "later", "optim.lr_drop=[600]", "optim.lr_drop_unit=minute", "train.max_steps=3"
    )
    train = read_metrics(Path(train_teacher(later).output_dir) / "metrics.jsonl", "train")
    assert [r["lr"] for r in train] == pytest.approx([1e-4] * 3)
    with pytest.raises(ConfigError, match="lr_drop_unit"):
        tiny_config(tmp_path, "optim.lr_drop_unit=hour")
    with pytest.raises(ConfigError, match="whole numbers"):
        tiny_config(tmp_path, "optim.lr_drop=[2.5]", "optim.lr_drop_unit=step")


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    # dropout on (RNG state matters), a step LR drop inside the run, an epoch boundary crossed
    # (6 batches per epoch) and checkpoints every 2 steps.
    extra = [
        "model.overrides.dropout=0.1",
        "optim.lr_drop=[5]",
        "optim.lr_drop_unit=step",
        "train.epochs=3",
        "train.checkpoint_every_steps=2",
        "train.max_steps=9",
    ]
    full = train_teacher(tiny_config(tmp_path / "full", *extra))
    assert full.state.step == 9
    part = train_teacher(tiny_config(tmp_path / "part", *extra, "train.max_steps=4"))
    assert part.stopped_by == "max_steps" and part.state.step == 4
    resumed = train_teacher(tiny_config(tmp_path / "part", *extra), resume=True)
    assert resumed.state.step == 9 and resumed.state.epoch == 1
    assert_same_weights(
        weights(tmp_path / "full/checkpoint.pt"), weights(tmp_path / "part/checkpoint.pt")
    )
    # the logged losses of the resumed steps equal the uninterrupted run's
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full/metrics.jsonl", "train")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part/metrics.jsonl", "train")}
    assert a == b


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ka_rs.cli", *args], capture_output=True, text=True, **kw
    )


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a CLI training run right after a mid-run checkpoint, resume it with --resume."""
    extra = [
        "--set",
        "train.epochs=4",
        "--set",
        "train.checkpoint_every_steps=3",
        "--set",
        "model.overrides.dropout=0.1",
    ]
    sets = [a for s in TINY for a in ("--set", s)]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ka_rs.cli", "train-teacher", *sets, *extra, "-o", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = run_dir / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 24, "the run finished before it could be killed"
    # no torn temp file is mistaken for a checkpoint; resume continues from the last one
    out = run_cli("train-teacher", "--resume", str(ckpt), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["step"] == 24
    full = run_cli("train-teacher", *sets, *extra, "-o", str(tmp_path / "full"), "--no-progress")
    assert full.returncode == 0, full.stderr
    assert_same_weights(weights(tmp_path / "full/checkpoint.pt"), weights(ckpt))


def test_time_budget_stops_the_run(tmp_path):
    res = train_teacher(tiny_config(tmp_path, "train.time_budget_minutes=0.0001"))
    assert res.stopped_by == "time_budget" and res.state.step >= 1
    assert res.state.train_minutes >= 0.0001


def test_resume_of_a_finished_run_does_not_train_more(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=2")
    train_teacher(cfg)
    before = weights(tmp_path / "checkpoint.pt")
    res = train_teacher(cfg, resume=True)
    assert res.state.step == 2
    assert_same_weights(before, weights(tmp_path / "checkpoint.pt"))


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    train_teacher(tiny_config(tmp_path, "train.max_steps=1"))
    other = tiny_config(tmp_path, "train.max_steps=2", "model.overrides.num_queries=5")
    with pytest.raises(ValueError, match="checkpoint.pt.*do not fit") as exc:
        train_teacher(other, resume=True)
    assert "num_queries = 5 here vs 8 in the checkpoint" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# the generic loop on a toy problem


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 20) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        noise = torch.rand(1)  # "augmentation": must be reproducible per (seed, epoch, index)
        return torch.tensor([float(i)]), noise


def toy_collate(items):
    xs, noise = zip(*items, strict=True)
    return torch.stack(xs), torch.zeros(len(xs), dtype=torch.bool), list(noise)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(1, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


def toy_loss(model, x, mask, noise):
    target = x * 0.5 + torch.stack(noise)
    return {"loss": ((model(x) - target) ** 2).mean()}


def toy_loop(tmp_path: Path, loss=toy_loss, **train_kw) -> TrainLoop:
    torch.manual_seed(0)
    kw = {"batch_size": 4, "epochs": 2, "output_dir": str(tmp_path), "progress": False}
    kw.update(train_kw)
    return TrainLoop(
        Toy(),
        ToyData(),
        loss,
        optim=OptimConfig(lr=1e-2, lr_backbone=1e-3),
        train=TrainConfig(**kw, plot=False),
        class_names=["x"],
        config_dict={},
        collate_fn=toy_collate,
    )


def test_optimizer_groups_and_frozen_backbone():
    model = Toy()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, lr_backbone=1e-5))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == 1e-5 and groups["main"]["lr"] == 1e-3
    assert {id(p) for p in groups["backbone"]["params"]} == {
        id(p) for p in model.backbone.parameters()
    }
    model = Toy()
    opt = build_optimizer(model, OptimConfig(lr_backbone=0))
    assert len(opt.param_groups) == 1
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_gradient_clipping(tmp_path):
    def huge(model, x, mask, noise):
        return {"loss": 1e6 * model(x).sum()}

    loop = toy_loop(tmp_path, loss=huge)
    loop.optim_cfg.clip_max_norm = 0.1
    batch = toy_collate([loop.dataset.dataset[i] for i in range(4)])
    _, grad_norm = loop.train_step(batch)
    total = torch.norm(torch.stack([p.grad.norm() for p in loop.params]))
    assert grad_norm > 1e3 and total == pytest.approx(0.1, rel=1e-4)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    def nan_loss(model, x, mask, noise):
        return {"loss": model(x).sum() * float("nan")}

    with pytest.raises(FloatingPointError, match="step 1"):
        toy_loop(tmp_path, loss=nan_loss).fit()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    def nan_at_step_3(model, x, mask, noise):
        calls.append(1)
        loss = toy_loss(model, x, mask, noise)["loss"]
        return {"loss": loss * float("nan") if len(calls) == 3 else loss}

    calls: list[int] = []
    loop = toy_loop(tmp_path, loss=nan_at_step_3, checkpoint_every_steps=1)
    with pytest.raises(NonFiniteError) as exc:
        loop.fit()
    msg = str(exc.value)
    assert "loss is nan at step 3" in msg
    assert f"last good checkpoint {tmp_path / 'checkpoint.pt'} (step 2) is kept unchanged" in msg
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert_same_weights(ckpt["model"], loop.model.state_dict())  # no step after the NaN


def test_infinite_gradient_stops_before_the_step(tmp_path):
    def inf_grad(model, x, mask, noise):
        out = model(x)
        # finite loss, infinite gradient: d/dx sqrt(x) at 0
        return {"loss": torch.sqrt(out.sum() * 0.0).sum() + toy_loss(model, x, mask, noise)["loss"]}

    loop = toy_loop(tmp_path, loss=inf_grad)
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    batch = toy_collate([loop.dataset.dataset[i] for i in range(4)])
    with pytest.raises(NonFiniteError, match="gradient norm is (nan|inf) at step 1"):
        loop.train_step(batch)
    assert_same_weights(before, loop.model.state_dict())


def test_non_finite_weight_is_never_checkpointed(tmp_path):
    def poison_at_step_3(model, x, mask, noise):
        calls.append(1)
        if len(calls) == 3:  # a weight the loss does not use: the loss stays finite
            with torch.no_grad():
                model.unused.fill_(float("inf"))
        return toy_loss(model, x, mask, noise)

    calls: list[int] = []
    loop = toy_loop(tmp_path, loss=poison_at_step_3, checkpoint_every_steps=1)
    loop.model.register_buffer("unused", torch.zeros(3))
    with pytest.raises(NonFiniteError, match=r"'unused' \(0 NaN, 3 inf of 3 values\)"):
        loop.fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_toy_loop_resume_mid_epoch_is_exact(tmp_path):
    full = toy_loop(tmp_path / "a", max_steps=8)
    full.fit()
    part = toy_loop(tmp_path / "b", max_steps=3)
    part.fit()
    resumed = toy_loop(tmp_path / "b", max_steps=8)
    resumed.resume(tmp_path / "b/checkpoint.pt")
    assert resumed.state.step == 3 and resumed.state.batch_in_epoch == 3
    resumed.fit()
    assert_same_weights(full.model.state_dict(), resumed.model.state_dict())


def test_data_order_depends_on_seed_and_epoch_only():
    ds = SeededDataset(ToyData(), seed=3)

    def epoch_items(epoch, workers):
        sampler = ResumableDistributedSampler(ds, seed=3)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=toy_collate
        )
        return [(x.flatten().tolist(), [float(n) for n in noise]) for x, _, noise in loader]

    torch.manual_seed(0)
    e0 = epoch_items(0, 0)
    torch.manual_seed(123)  # the global RNG does not matter
    assert epoch_items(0, 0) == e0
    assert epoch_items(0, 2) == e0  # nor the number of workers
    e1 = epoch_items(1, 0)
    assert e1 != e0 and sorted(sum((x for x, _ in e1), [])) == list(map(float, range(20)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_build_model_matches_preset():
    # the engine builds the preset with overrides exactly as ka_rs.models does
    m = build_model("anchor_tiny", 4, hidden_dim=32, nheads=2)
    assert m.config.hidden_dim == 32

"""Distributed pieces: sharded samplers, per-sample seeding, and a real 2-process torchrun (gloo,
CPU) run whose averaged gradients equal a single process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ka_rs.engine.checkpoint import load_checkpoint
from ka_rs.engine.distributed import (
    DistInfo,
    InferenceSampler,
    ResumableDistributedSampler,
    SeededDataset,
    all_gather_objects,
    all_reduce_mean,
    broadcast_object,
    init_distributed,
    sample_seed,
    wrap_ddp,
)
from ka_rs.engine.logging import read_metrics


def test_rank_shards_union_is_the_single_process_batch():
    data = list(range(37))
    single = ResumableDistributedSampler(data, 1, 0, seed=5, drop_last=True, yield_epoch=False)
    ranks = [
        ResumableDistributedSampler(data, 2, r, seed=5, drop_last=True, yield_epoch=False)
        for r in range(2)
    ]
    for s in (single, *ranks):
        s.set_epoch(3)
    one = list(single)
    per_rank = [list(s) for s in ranks]
    b = 4  # per rank; the single process uses 2 * b
    for i in range(len(per_rank[0]) // b):
        union = sorted(per_rank[0][i * b : (i + 1) * b] + per_rank[1][i * b : (i + 1) * b])
        assert union == sorted(one[i * 2 * b : (i + 1) * 2 * b])
    # disjoint shards, deterministic in (seed, epoch), different across epochs
    assert not set(per_rank[0]) & set(per_rank[1])
    again = ResumableDistributedSampler(data, 2, 0, seed=5, drop_last=True, yield_epoch=False)
    again.set_epoch(3)
    assert list(again) == per_rank[0]
    again.set_epoch(4)
    assert list(again) != per_rank[0]


def test_sampler_start_and_epoch_keys():
    s = ResumableDistributedSampler(list(range(10)), seed=1)
    s.set_epoch(2)
    full = list(s)
    assert all(e == 2 for e, _ in full)
    s.set_start(6)
    assert list(s) == full[6:] and len(s) == 4
    s.set_epoch(2)  # a new epoch starts from the beginning
    assert list(s) == full
    with pytest.raises(ValueError, match="start"):
        s.set_start(-1)


def test_inference_sampler_covers_each_item_once():
    for n, world in [(10, 3), (2, 4), (9, 1)]:
        seen = [i for r in range(world) for i in InferenceSampler(n, world, r)]
        assert seen == list(range(n))


class Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.rand(2)


def test_seeded_dataset_is_deterministic_and_leaves_global_rng_alone():
    ds = SeededDataset(Noisy(), seed=11)
    torch.manual_seed(0)
    a = ds[(1, 3)]
    state = torch.get_rng_state()
    b = ds[(1, 3)]
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(ds[(2, 3)], a)  # another epoch, another draw
    assert not torch.equal(SeededDataset(Noisy(), seed=12)[(1, 3)], a)
    assert torch.equal(ds[3], ds[(0, 3)])
    assert len(ds) == 5 and sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


def test_single_process_helpers_are_identities():
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main
    m = torch.nn.Linear(2, 2)
    assert wrap_ddp(m, info) is m
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert broadcast_object(3) == 3
    assert all_reduce_mean({"x": torch.tensor(2.0)}) == {"x": 2.0}


def test_bad_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed("cpu")


# ---------------------------------------------------------------------------------------------
# 2 processes vs 1

SETTINGS = [
    "model.preset=anchor_tiny",
    "model.overrides={hidden_dim = 32, nheads = 2, dim_feedforward = 64, num_queries = 8, "
    "cnn_channels = [8, 16, 16, 32], enc_layers = 1, dec_layers = 2, dropout = 0.0}",
    "data.image_size=32",
    "data.scales=[32]",  # one size: padding (and GroupNorm statistics) alike in both runs
    "data.num_train_images=32",
    "data.num_val_images=6",
    "train.progress=false",
    "train.plot=false",
    "train.num_threads=1",
    "train.log_every_steps=1",
    "train.max_steps=3",
    "train.seed=3",
    "optim.lr=1e-3",
]

WORKER = textwrap.dedent(
    """
    import sys, torch
    from ka_rs.engine.config import load_config
    from ka_rs.engine.distributed import init_distributed, cleanup_distributed, unwrap_model
    from ka_rs.engine.train import build_teacher_loop

    out, settings = sys.argv[1], sys.argv[2:]
    info = init_distributed("cpu")
    loop = build_teacher_loop(load_config(None, settings), info)
    batch = next(iter(loop._make_loader(0, 0)))
    comps = loop.compute_gradients(batch)
    grads = {n: p.grad.clone() for n, p in unwrap_model(loop.model).named_parameters()
             if p.grad is not None}
    if info.is_main:
        torch.save({"grads": grads, "loss": comps["loss"], "world": info.world_size}, out)
    cleanup_distributed()
    """
)


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("torchrun")
    cmd = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc-per-node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_two_process_gradients_equal_single_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    two = torchrun(
        2, [str(worker), str(tmp_path / "two.pt"), *SETTINGS, "train.batch_size=3"], tmp_path
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "one.pt"), *SETTINGS, "train.batch_size=6"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "two.pt", weights_only=True)
    b = torch.load(tmp_path / "one.pt", weights_only=True)
    assert a["world"] == 2 and b["world"] == 1
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for name, g in a["grads"].items():
        torch.testing.assert_close(g, b["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    # rank 0's loss is its own shard's (global normalisers), so it differs from the total
    assert a["loss"] != pytest.approx(b["loss"], rel=1e-6)


def test_torchrun_training_matches_single_process(tmp_path):
    """`ka-rs train-teacher` under torchrun: same per-step losses and gradient norms as one
    process with the doubled batch, and (nearly) the same weights after 3 AdamW steps."""
    sets = [a for s in SETTINGS for a in ("--set", s)]
    two = torchrun(
        2,
        ["-m", "ka_rs.cli", "train-teacher", *sets, "--set", "train.batch_size=3"]
        + ["-o", str(tmp_path / "two")],
        tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout)  # printed once, by rank 0
    assert summary["step"] == 3
    one = subprocess.run(
        [sys.executable, "-m", "ka_rs.cli", "train-teacher", *sets]
        + ["--set", "train.batch_size=6", "-o", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    m2 = read_metrics(tmp_path / "two/metrics.jsonl", "train")
    m1 = read_metrics(tmp_path / "one/metrics.jsonl", "train")
    assert [r["step"] for r in m2] == [1, 2, 3] == [r["step"] for r in m1]
    for r2, r1 in zip(m2, m1, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-3)
    w2 = load_checkpoint(tmp_path / "two/checkpoint.pt")["model"]
    w1 = load_checkpoint(tmp_path / "one/checkpoint.pt")["model"]
    for k in w1:
        # AdamW moves each weight by at most ~lr per step: allow a small fraction of that
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=3e-4, msg=k)
    # evaluation gathered both ranks' predictions: every validation image scored once
    assert json.loads((tmp_path / "two/eval.json").read_text())["num_images"] == 6
    assert json.loads((tmp_path / "one/eval.json").read_text())["num_images"] == 6

"""Mixed precision (``train.amp``): config checks, the float32 attention core under autocast,
float32 outputs for the losses, bf16 / fp16 teacher training, fp16 scaler checkpoints, and
evaluation under bf16."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ka_rs.engine import amp
from ka_rs.engine.checkpoint import load_checkpoint
from ka_rs.engine.config import _CHOICES, Config, ConfigError, load_config
from ka_rs.engine.distributed import DistInfo
from ka_rs.engine.evaluate import evaluate, make_eval_loader
from ka_rs.engine.logging import read_metrics
from ka_rs.engine.loop import SCALER_KEY
from ka_rs.engine.train import build_teacher_loop, train_teacher
from ka_rs.models import DetrOutput, build_model, transformer
from ka_rs.models.student import AmalgamationStudent
from torch import nn

# the small anchor teacher of test_train.py: 32-px shapes, a step takes well under a second
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
TINY_MODEL = {
    "hidden_dim": 32,
    "nheads": 2,
    "dim_feedforward": 64,
    "num_queries": 8,
    "cnn_channels": (8, 16, 16, 32),
    "enc_layers": 1,
    "dec_layers": 2,
}


def tiny_config(out: Path, *extra: str) -> Config:
    return load_config(None, [*TINY, f"train.output_dir={json.dumps(str(out))}", *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def images_and_mask(batch: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=gen)
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    mask[-1, :, size * 3 // 4 :] = True  # padding: exercises the key-padding mask
    return images, mask


# ---------------------------------------------------------------------------------------------
# configuration and the policy helpers


def test_config_amp_and_fused_are_validated(tmp_path):
    assert Config().train.amp == "off"
    for mode in ("off", "auto", "bf16", "fp16"):
        assert tiny_config(tmp_path, f"train.amp={mode}").train.amp == mode
    with pytest.raises(ConfigError, match=r"train\.amp.*'off', 'auto', 'bf16', 'fp16'.*'fp32'"):
        tiny_config(tmp_path, "train.amp=fp32")
    with pytest.raises(ConfigError, match=r"optim\.fused.*'auto', 'on', 'off'"):
        tiny_config(tmp_path, "optim.fused=yes")
    # the config keeps its own copy of the modes (no torch import): it must not drift
    assert _CHOICES[("train", "amp")] == amp.AMP_MODES


def test_validate_and_autocast_contexts():
    with pytest.raises(ValueError, match=r"train\.amp.*'bf16'"):
        amp.validate_amp("bfloat16")
    with amp.autocast("off", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with amp.autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with amp.autocast("fp16", "cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
    assert not torch.is_autocast_enabled("cpu")
    assert amp.make_grad_scaler("off", "cpu") is None
    assert amp.make_grad_scaler("bf16", "cpu") is None
    scaler = amp.make_grad_scaler("fp16", "cpu")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def test_auto_is_bf16_only_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(amp, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert amp.resolve_amp("auto", "cpu") == "bf16"
    with amp.autocast("auto", "cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert amp.make_grad_scaler("auto", "cpu") is None
    # a cache key names the precision the run really had
    assert amp.effective_amp("auto", "cpu") == "bf16"
    monkeypatch.setattr(amp, "_cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    assert amp.resolve_amp("auto", "cpu") == "off"
    with amp.autocast("auto", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert amp.effective_amp("auto", "cpu") == "off"
    monkeypatch.setattr(amp, "_cpu_flags", lambda: None)  # not Linux: never guess bf16
    assert amp.resolve_amp("auto", "cpu") == "off"
    for mode in ("off", "bf16", "fp16"):
        assert amp.resolve_amp(mode, "cpu") == mode == amp.effective_amp(mode, "auto")
    with pytest.raises(ValueError, match=r"train\.amp.*'auto'"):
        amp.resolve_amp("AUTO", "cpu")


def test_loop_resolves_auto_and_says_so(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ka_rs.train")
    for flags, expected in ((frozenset({"avx512_bf16"}), "bf16"), (frozenset({"avx2"}), "off")):
        monkeypatch.setattr(amp, "_cpu_flags", lambda flags=flags: flags)
        cfg = tiny_config(tmp_path / expected, "train.amp=auto")
        loop = build_teacher_loop(cfg, DistInfo())
        assert loop.amp == expected
        assert f"train.amp='auto' -> {expected!r}" in caplog.text


def test_cpuinfo_fields_give_flags_and_model_name(monkeypatch):
    monkeypatch.setattr(
        amp, "_cpuinfo", lambda: {"model name": "AMD EPYC", "flags": "avx2 avx512_bf16"}
    )
    assert amp._cpu_flags() == frozenset({"avx2", "avx512_bf16"})
    assert amp.cpu_model_name() == "AMD EPYC" and amp.cpu_has_native_bf16() is True
    monkeypatch.setattr(amp, "_cpuinfo", lambda: {"Features": "fp asimd bf16"})  # Arm
    assert amp.cpu_has_native_bf16() is True
    monkeypatch.setattr(amp, "_cpuinfo", lambda: None)  # not Linux
    assert amp._cpu_flags() is None and amp.cpu_has_native_bf16() is None
    monkeypatch.setattr(amp.platform, "processor", lambda: "")
    assert amp.cpu_model_name() is None


def test_check_amp_refuses_devices_autocast_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda dev: False)
    with amp._reset_checks(), pytest.raises(ValueError, match="does not support device type"):
        amp.check_amp("bf16", "cpu")
    monkeypatch.undo()

    # torch's own reaction to an unsupported dtype is a warning and float32: refused instead
    class Disabled:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._enabled = False

    monkeypatch.setattr(torch, "autocast", Disabled)
    with amp._reset_checks(), pytest.raises(ValueError, match="does not support"):
        amp.check_amp("fp16", "cpu")
    amp.check_amp("off", "meta")  # "off" never needs autocast


def test_bf16_without_native_support_warns_once(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="ka_rs.amp")
    monkeypatch.setattr(amp, "_cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    with amp._reset_checks():
        for _ in range(3):
            amp.check_amp("bf16", "cpu")
            with amp.autocast("bf16", "cpu"):
                pass
    warned = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warned) == 1
    caplog.clear()
    monkeypatch.setattr(amp, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    with amp._reset_checks():
        amp.check_amp("bf16", "cpu")
    assert not caplog.records
    with amp._reset_checks():
        amp.check_amp("fp16", "cpu")  # native bf16 is not native fp16
    assert any("without native fp16" in r.getMessage() for r in caplog.records)


def test_float_outputs_casts_floating_tensors_only():
    bf = torch.ones(2, 3, dtype=torch.bfloat16)
    fp32 = torch.ones(2, 3)
    out = DetrOutput(
        pred_logits=bf,
        pred_boxes=fp32,
        aux_outputs=[{"pred_logits": bf.half(), "pred_boxes": bf}],
        sequences=[bf, fp32],
        padding_mask=torch.zeros(2, 3, dtype=torch.bool),
        enc_outputs={"pred_logits": bf, "token_xy": fp32, "padding_mask": torch.zeros(2, 3) > 1},
    )
    res = amp.float_outputs(out)
    assert isinstance(res, DetrOutput) and res is not out
    assert res.pred_logits.dtype == torch.float32 and torch.equal(res.pred_logits, fp32)
    assert res.pred_boxes is fp32  # float32 already: not copied
    assert all(t.dtype == torch.float32 for t in res.aux_outputs[0].values())
    assert [t.dtype for t in res.sequences] == [torch.float32, torch.float32]
    assert res.padding_mask.dtype == torch.bool
    assert res.enc_outputs["pred_logits"].dtype == torch.float32
    assert res.enc_outputs["padding_mask"].dtype == torch.bool
    assert out.pred_logits.dtype == torch.bfloat16  # the input is left alone
    d = amp.float_outputs({"pred_logits": bf, "labels": torch.arange(3), "n": 3})
    assert d["pred_logits"].dtype == torch.float32 and d["labels"].dtype == torch.int64
    assert d["n"] == 3
    # differentiable: the gradient reaches the low-precision tensor
    x = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    amp.float_outputs({"pred_logits": x * 2})["pred_logits"].sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.full((3,), 2.0, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# the attention core


@pytest.mark.parametrize("masks", ["none", "padding", "bool", "float", "padding+bool"])
def test_fp32_attention_core_equals_multihead_attention(masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    b, lq, s = 3, 5, 7
    x, mem = torch.randn(b, lq, 16), torch.randn(b, s, 16)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, -3:] = True
    forbid = torch.rand(lq, s) < 0.3
    forbid[:, 0] = False
    bias = torch.randn(b * 4, lq, s)
    kp = pad if "padding" in masks else None
    am = forbid if "bool" in masks else bias if masks == "float" else None
    mem_ref = mem.clone().requires_grad_(True)
    mem_new = mem.clone().requires_grad_(True)
    ref = mha(x, mem_ref, mem_ref, key_padding_mask=kp, attn_mask=am, need_weights=False)[0]
    new = transformer._attention_fp32_core(mha, x, mem_new, mem_new, kp, am)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    ref.square().sum().backward()
    new.square().sum().backward()
    torch.testing.assert_close(mem_new.grad, mem_ref.grad, rtol=1e-5, atol=1e-6)


class SdpaRecorder:
    """Wraps F.scaled_dot_product_attention; records input dtypes and the autocast state."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.dtype, torch.dtype, torch.dtype, bool]] = []
        self.original = F.scaled_dot_product_attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any):
        self.calls.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return self.original(q, k, v, *a, **kw)


@pytest.mark.parametrize("model_kind", ["anchor", "detr", "student"])
def test_bf16_forward_runs_attention_in_fp32_and_outputs_float32(model_kind, monkeypatch):
    torch.manual_seed(0)
    if model_kind == "student":  # 2 slots, block-diagonal encoder mask + key padding
        model: nn.Module = AmalgamationStudent(
            build_model("anchor_tiny", 3, **TINY_MODEL).config, num_slots=2
        )
    else:
        preset = "anchor_tiny" if model_kind == "anchor" else "detr_tiny"
        model = build_model(preset, 3, **TINY_MODEL)
    model.eval()
    images, mask = images_and_mask()
    with torch.no_grad():
        ref = model(images, mask)
    recorder = SdpaRecorder()
    # nn.MultiheadAttention and ka_rs's core both look the function up in torch.nn.functional
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorder)
    with torch.no_grad():
        with amp.autocast("bf16", "cpu"):
            raw = model(images, mask)
        out = amp.float_outputs(raw)
    # encoder self-attention + decoder self- and cross-attention, each in float32, no autocast
    assert len(recorder.calls) == 1 + 2 * 2
    assert all(c == (torch.float32,) * 3 + (False,) for c in recorder.calls), recorder.calls
    assert raw.pred_logits.dtype == torch.bfloat16  # the forward itself ran in bf16
    assert out.pred_logits.dtype == out.pred_boxes.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in out.sequences)
    assert all(v.dtype == torch.float32 for a in out.aux_outputs for v in a.values())
    # close to float32 on average (two-stage query selection is a top-k: a near tie may pick
    # another token in bf16 and change that query's logits)
    assert (out.pred_boxes - ref.pred_boxes).abs().mean() < 0.01
    assert (out.pred_logits - ref.pred_logits).abs().mean() < 0.1


def test_amp_off_leaves_the_forward_bit_identical(monkeypatch):
    torch.manual_seed(0)
    model = build_model("anchor_tiny", 3, **TINY_MODEL)
    images, mask = images_and_mask()
    ref = model(images, mask)
    calls: list[int] = []
    core = transformer._attention_fp32_core
    monkeypatch.setattr(transformer, "_attention_fp32_core", lambda *a: calls.append(1) or core(*a))
    with amp.autocast("off", "cpu"):
        out = amp.float_outputs(model(images, mask))
    assert not calls  # without autocast the nn.MultiheadAttention modules run as before
    for name in ("pred_logits", "pred_boxes"):
        assert torch.equal(out[name], ref[name])
    assert all(torch.equal(a, b) for a, b in zip(out.sequences, ref.sequences, strict=True))


# ---------------------------------------------------------------------------------------------
# training


def _loss_fn_inputs(loop: Any) -> tuple[Any, ...]:
    images, mask, targets = next(iter(loop._make_loader(0, 0)))
    return loop.model, images, mask, targets


def test_teacher_loss_fn_autocasts_the_forward_only(tmp_path, monkeypatch):
    import ka_rs.losses

    seen: list[tuple[torch.dtype, bool]] = []
    build = ka_rs.losses.build_criterion

    def recording_build(config: Any) -> nn.Module:
        crit = build(config)
        crit.register_forward_pre_hook(
            lambda mod, args: seen.append(
                (args[0]["pred_logits"].dtype, torch.is_autocast_enabled("cpu"))
            )
        )
        return crit

    monkeypatch.setattr(ka_rs.losses, "build_criterion", recording_build)
    cores: list[bool] = []
    core = transformer._attention_fp32_core
    monkeypatch.setattr(
        transformer, "_attention_fp32_core", lambda *a: cores.append(True) or core(*a)
    )
    loop = build_teacher_loop(tiny_config(tmp_path, "train.amp=bf16"), DistInfo())
    losses = loop.loss_fn(*_loss_fn_inputs(loop))
    assert cores  # the forward ran under autocast (the float32 attention core was used)
    assert seen == [(torch.float32, False)]  # the criterion: float32 inputs, no autocast
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_teacher_trains_under_amp(tmp_path, mode):
    cfg = tiny_config(tmp_path, f"train.amp={mode}", "train.max_steps=4", "train.epochs=1")
    init = build_teacher_loop(cfg, DistInfo()).model.state_dict()
    init = {k: v.clone() for k, v in init.items()}
    res = train_teacher(cfg)
    assert res.state.step == 4
    final = weights(tmp_path / "checkpoint.pt")
    changed = [k for k in init if not torch.equal(init[k], final[k])]
    assert len(changed) > len(init) // 2
    assert all(v.dtype == init[k].dtype for k, v in final.items())  # weights stay float32
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    if mode == "fp16":
        assert all(r["grad_scale"] > 0 for r in train)
        assert ckpt[SCALER_KEY]["scale"] == train[-1]["grad_scale"]
    else:
        assert SCALER_KEY not in ckpt and "grad_scale" not in train[-1]


def test_amp_off_training_step_equals_a_plain_fp32_step(tmp_path):
    """The amp plumbing (autocast "off", float_outputs, no scaler) changes nothing in a
    float32 step: same weights as criterion(model(x)) -> backward -> clip -> AdamW step."""
    from ka_rs.engine.loop import build_optimizer
    from ka_rs.losses import build_criterion

    cfg = tiny_config(tmp_path, "train.amp=off")
    loop = build_teacher_loop(cfg, DistInfo())
    assert loop.scaler is None
    net, images, mask, targets = _loss_fn_inputs(loop)
    twin = build_model("anchor_tiny", 4, **TINY_MODEL)
    twin.load_state_dict(net.state_dict())
    opt = build_optimizer(twin, cfg.optim)
    crit = build_criterion(twin.config)
    twin.train()
    loss = crit(twin(images, mask), targets)["loss"]
    opt.zero_grad()
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]  # the loop's norm order
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_max_norm)
    opt.step()
    comps, _ = loop.train_step((images, mask, targets))
    assert comps["loss"] == float(loss.detach())
    for k, v in twin.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


def test_fp16_resume_restores_the_scaler_and_is_exact(tmp_path):
    extra = ["train.amp=fp16", "train.epochs=2", "train.checkpoint_every_steps=3"]
    full = train_teacher(tiny_config(tmp_path / "full", *extra, "train.max_steps=8"))
    part = train_teacher(tiny_config(tmp_path / "part", *extra, "train.max_steps=3"))
    assert full.state.step == 8 and part.state.step == 3
    saved = load_checkpoint(tmp_path / "part/checkpoint.pt")[SCALER_KEY]
    train_teacher(tiny_config(tmp_path / "part", *extra, "train.max_steps=8"), resume=True)
    a, b = weights(tmp_path / "full/checkpoint.pt"), weights(tmp_path / "part/checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        load_checkpoint(tmp_path / "full/checkpoint.pt")[SCALER_KEY]
        == load_checkpoint(tmp_path / "part/checkpoint.pt")[SCALER_KEY]
    )

    # a scaler state unlike a fresh one's is restored as saved
    path = tmp_path / "edited.pt"
    ckpt = load_checkpoint(tmp_path / "part/checkpoint.pt")
    ckpt[SCALER_KEY] = {**saved, "scale": 1024.0, "_growth_tracker": 3}
    torch.save(ckpt, path)
    loop = build_teacher_loop(tiny_config(tmp_path / "x", *extra), DistInfo())
    loop.resume(path)
    assert loop.scaler is not None and loop.scaler.get_scale() == 1024.0
    assert loop.scaler.state_dict()["_growth_tracker"] == 3


def test_fused_optimizer_setting(monkeypatch):
    from ka_rs.engine.config import OptimConfig
    from ka_rs.engine.loop import build_optimizer

    model = build_model("anchor_tiny", 3, **TINY_MODEL)
    assert OptimConfig().fused == "off"  # the default reproduces earlier runs bit for bit
    assert not build_optimizer(model, OptimConfig()).defaults["fused"]
    assert build_optimizer(model, OptimConfig(fused="on")).defaults["fused"] is True
    assert build_optimizer(model, OptimConfig(fused="auto")).defaults["fused"] is True
    assert not build_optimizer(model, OptimConfig(fused="off")).defaults["fused"]

    class NoFusedKernel(torch.optim.AdamW):  # as torch's AdamW on a device without the kernel
        def __init__(self, *args: Any, fused: bool | None = None, **kwargs: Any) -> None:
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be ... supported")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedKernel)
    assert not build_optimizer(model, OptimConfig(fused="auto")).defaults["fused"]
    with pytest.raises(ValueError, match="optim.fused='on': `fused=True` requires"):
        build_optimizer(model, OptimConfig(fused="on"))


# ---------------------------------------------------------------------------------------------
# evaluation


@pytest.fixture(scope="module")
def overfit_teacher(tmp_path_factory) -> tuple[nn.Module, Any, list[str]]:
    """A float32 tiny teacher trained to recognise its 24 training images (AP50 > 0.9).

    Confident predictions keep the comparison meaningful: with AP near 0.3 (300 steps) a few
    near-tie scores that bf16 reorders moved AP50 by up to 0.05 on these 24 images."""
    out = tmp_path_factory.mktemp("overfit")
    cfg = tiny_config(
        out,
        "data.num_val_images=24",
        "data.val_set=train",  # evaluate on the training images: a high AP after ~12 s
        "data.flip=false",
        "data.color_jitter=0",
        "optim.lr=2e-3",
        "optim.lr_backbone=2e-3",
        "train.max_steps=500",
        "train.epochs=1000",
        "train.eval_every_epochs=0",
        "train.log_every_steps=100",
    )
    loop = build_teacher_loop(cfg, DistInfo())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop.fit()
    finally:
        torch.set_num_threads(threads)
    from ka_rs.engine.datasets import build_datasets

    _, val_ds, classes = build_datasets(cfg.data)
    return loop.model, make_eval_loader(val_ds, 8), classes


def test_evaluate_under_bf16_matches_fp32_ap(overfit_teacher):
    model, loader, classes = overfit_teacher
    fp32 = evaluate(model, loader, classes)
    bf16 = evaluate(model, loader, classes, amp="bf16")
    assert fp32["AP50"] > 0.7  # the comparison means something
    assert bf16["AP50"] == pytest.approx(fp32["AP50"], abs=0.03)
    assert bf16["AP"] == pytest.approx(fp32["AP"], abs=0.03)
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="amp"):
        evaluate(model, loader, classes, amp="half")

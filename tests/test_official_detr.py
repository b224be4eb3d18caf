"""``detr:`` teacher sources: facebookresearch/detr files (model zoo and main.py checkpoints).

The files are built here with the official key names and shapes (random weights, small
Transformer, real ResNet-50/101 bodies) and checked against an independent re-implementation of
DETR's forward pass written from those keys: a functional ResNet (torchvision's layout and its
``replace_stride_with_dilation`` semantics for DC5) and DETR's sequence-first post-/pre-norm
Transformer. ``tools/verify_official_detr.py`` checks the same loaders against the official code.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ka_rs.data.splits import COCO_CLASSES
from ka_rs.models import DETR, DetrConfig, ResNet
from ka_rs.models.student import _stride
from ka_rs.teachers import DetrTeacher, SourceError, load_teacher
from ka_rs.teachers.coco import COCO_91_SLOTS, COCO_UNUSED_IDS
from ka_rs.teachers.official_detr import convert_detr_state_dict, load_official_detr

D, HEADS, FFN, ENC, DEC, QUERIES, CLASSES = 32, 4, 64, 2, 3, 7, 5
R18, R50, R101 = (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3)
H, W = 64, 96  # image size: 2x3 cells at stride 32, 4x6 at stride 16


# -- official-format state dicts -------------------------------------------------------------


def _randomise(shapes: dict[str, tuple[int, ...]], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values that keep 100 layers of activations finite (frozen-BN gains < 1)."""
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean") or (k.endswith("bias") and "body" in k):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        elif "body" in k and len(shape) == 1:  # frozen BN weight
            sd[k] = 0.2 + 0.3 * torch.rand(shape, generator=g)
        elif "norm" in k and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def resnet_shapes(counts: tuple[int, ...], skip: int = 0) -> dict[str, tuple[int, ...]]:
    """``backbone.0.body.*`` keys and shapes of a torchvision ResNet body (frozen BN: 4 buffers).

    Bottleneck blocks unless ``counts`` is ResNet-18's; ``skip`` leaves out the stem and the
    first ``skip`` blocks of every stage (to extend a shallower body).
    """
    bottleneck = counts != R18
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        out[f"backbone.0.body.{name}.weight"] = (cout, cin, k, k)

    def bn(name: str, c: int) -> None:
        for s in ("weight", "bias", "running_mean", "running_var"):
            out[f"backbone.0.body.{name}.{s}"] = (c,)

    if not skip:
        conv("conv1", 64, 3, 7)
        bn("bn1", 64)
    cin = 64
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), counts, strict=True), start=1):
        cout = width * 4 if bottleneck else width
        for j in range(n):
            p = f"layer{stage}.{j}"
            if j >= skip:
                if bottleneck:
                    conv(f"{p}.conv1", width, cin, 1)
                    bn(f"{p}.bn1", width)
                    conv(f"{p}.conv2", width, width, 3)
                    bn(f"{p}.bn2", width)
                    conv(f"{p}.conv3", cout, width, 1)
                    bn(f"{p}.bn3", cout)
                else:
                    conv(f"{p}.conv1", width, cin, 3)
                    bn(f"{p}.bn1", width)
                    conv(f"{p}.conv2", width, width, 3)
                    bn(f"{p}.bn2", width)
                if j == 0 and cin != cout or j == 0 and stage > 1:
                    conv(f"{p}.downsample.0", cout, cin, 1)
                    bn(f"{p}.downsample.1", cout)
            cin = cout
    return out


def head_shapes(
    channels: int, pre_norm: bool = False, classes: int = CLASSES
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of DETR's input projection, Transformer and heads."""

    def attn(p: str) -> dict[str, tuple[int, ...]]:
        return {
            f"{p}.in_proj_weight": (3 * D, D),
            f"{p}.in_proj_bias": (3 * D,),
            f"{p}.out_proj.weight": (D, D),
            f"{p}.out_proj.bias": (D,),
        }

    def lin(p: str, cout: int, cin: int) -> dict[str, tuple[int, ...]]:
        return {f"{p}.weight": (cout, cin), f"{p}.bias": (cout,)}

    def norm(p: str) -> dict[str, tuple[int, ...]]:
        return {f"{p}.weight": (D,), f"{p}.bias": (D,)}

    shapes: dict[str, tuple[int, ...]] = {
        "input_proj.weight": (D, channels, 1, 1),
        "input_proj.bias": (D,),
        "query_embed.weight": (QUERIES, D),
    }
    for i in range(ENC):
        p = f"transformer.encoder.layers.{i}"
        shapes |= attn(f"{p}.self_attn") | lin(f"{p}.linear1", FFN, D)
        shapes |= lin(f"{p}.linear2", D, FFN) | norm(f"{p}.norm1") | norm(f"{p}.norm2")
    if pre_norm:
        shapes |= norm("transformer.encoder.norm")
    for i in range(DEC):
        p = f"transformer.decoder.layers.{i}"
        shapes |= attn(f"{p}.self_attn") | attn(f"{p}.multihead_attn")
        shapes |= lin(f"{p}.linear1", FFN, D) | lin(f"{p}.linear2", D, FFN)
        shapes |= norm(f"{p}.norm1") | norm(f"{p}.norm2") | norm(f"{p}.norm3")
    shapes |= norm("transformer.decoder.norm")
    shapes |= lin("class_embed", classes + 1, D)
    shapes |= lin("bbox_embed.layers.0", D, D) | lin("bbox_embed.layers.1", D, D)
    shapes |= lin("bbox_embed.layers.2", 4, D)
    return shapes


@pytest.fixture(scope="module")
def bodies() -> dict[str, dict[str, torch.Tensor]]:
    """Random ResNet-18/50/101 bodies; R101 shares R50's tensors (built once per module)."""
    g = torch.Generator().manual_seed(0)
    r50 = _randomise(resnet_shapes(R50), g)
    extra = resnet_shapes(R101, skip=6)  # layer3.6 .. layer3.22
    r101 = r50 | _randomise(extra, g)
    return {"resnet18": _randomise(resnet_shapes(R18), g), "resnet50": r50, "resnet101": r101}


def official_state(
    body: dict[str, torch.Tensor], pre_norm: bool = False, classes: int = CLASSES, seed: int = 1
) -> dict[str, torch.Tensor]:
    """A facebookresearch/detr ``model`` state dict: ``body`` + a small random Transformer."""
    channels = body["backbone.0.body.layer4.0.downsample.0.weight"].shape[0]
    g = torch.Generator().manual_seed(seed)
    return body | _randomise(head_shapes(channels, pre_norm, classes), g)


def main_py_args(**kw: object) -> argparse.Namespace:
    """The ``args`` a facebookresearch/detr main.py checkpoint holds (the fields read here)."""
    base = dict(
        backbone="resnet50", dilation=False, position_embedding="sine", enc_layers=ENC,
        dec_layers=DEC, dim_feedforward=FFN, hidden_dim=D, dropout=0.1, nheads=HEADS,
        num_queries=QUERIES, pre_norm=False, masks=False, aux_loss=True, dataset_file="coco",
        lr=1e-4, output_dir="", device="cuda",
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def save(path: Path, state: dict[str, torch.Tensor], args: argparse.Namespace | None) -> Path:
    """A zoo file (``args`` None) or a main.py checkpoint."""
    if args is None:
        torch.save({"model": state}, path)
    else:
        opt = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
        torch.save(
            {"model": state, "optimizer": opt, "lr_scheduler": {"step_size": 200, "last_epoch": 3},
             "epoch": 3, "args": args},
            path,
        )  # fmt: skip
    return path


# -- an independent DETR forward over the official keys -------------------------------------


def _bn(sd: dict[str, torch.Tensor], x: torch.Tensor, p: str) -> torch.Tensor:
    scale = sd[f"{p}.weight"] * (sd[f"{p}.running_var"] + 1e-5).rsqrt()
    shift = sd[f"{p}.bias"] - sd[f"{p}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def reference_backbone(sd, images, mask, counts, dilation=False):
    """torchvision's ResNet (v1.5) from the official keys; DC5: the last stage has stride 1,
    its first block dilation 1 and the others dilation 2 (replace_stride_with_dilation)."""
    p = "backbone.0.body"
    x = F.relu(_bn(sd, F.conv2d(images, sd[f"{p}.conv1.weight"], stride=2, padding=3), f"{p}.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    bottleneck = f"{p}.layer1.0.conv3.weight" in sd
    for stage, n in enumerate(counts, start=1):
        dilate = dilation and stage == 4
        for j in range(n):
            q = f"{p}.layer{stage}.{j}"
            s = 2 if (j == 0 and stage > 1 and not dilate) else 1
            d = 2 if (dilate and j > 0) else 1
            if bottleneck:
                out = F.relu(_bn(sd, F.conv2d(x, sd[f"{q}.conv1.weight"]), f"{q}.bn1"))
                out = F.conv2d(out, sd[f"{q}.conv2.weight"], stride=s, padding=d, dilation=d)
                out = F.relu(_bn(sd, out, f"{q}.bn2"))
                out = _bn(sd, F.conv2d(out, sd[f"{q}.conv3.weight"]), f"{q}.bn3")
            else:
                out = F.conv2d(x, sd[f"{q}.conv1.weight"], stride=s, padding=1)
                out = F.relu(_bn(sd, out, f"{q}.bn1"))
                out = _bn(sd, F.conv2d(out, sd[f"{q}.conv2.weight"], padding=1), f"{q}.bn2")
            if f"{q}.downsample.0.weight" in sd:
                x = _bn(
                    sd, F.conv2d(x, sd[f"{q}.downsample.0.weight"], stride=s), f"{q}.downsample.1"
                )
            x = F.relu(out + x)
    fmask = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
    return x, fmask


def _ref_pos(mask: torch.Tensor, feats: int) -> torch.Tensor:
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / feats)
    px, py = x[:, :, :, None] / dim_t, y[:, :, :, None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def reference_detr(sd, features, mask, pre_norm=False, nheads=HEADS):
    """DETR's transformer + heads from the official keys -> logits, boxes (L, B, Q, ·)."""

    def mha(q, k, v, p, kpm=None):
        return F.multi_head_attention_forward(
            q, k, v, D, nheads, sd[f"{p}.in_proj_weight"], sd[f"{p}.in_proj_bias"],
            None, None, False, 0.0, sd[f"{p}.out_proj.weight"], sd[f"{p}.out_proj.bias"],
            training=False, key_padding_mask=kpm, need_weights=False,
        )[0]  # fmt: skip

    def ln(x, p):
        return F.layer_norm(x, (D,), sd[f"{p}.weight"], sd[f"{p}.bias"])

    def ffn(x, p):
        h = F.relu(F.linear(x, sd[f"{p}.linear1.weight"], sd[f"{p}.linear1.bias"]))
        return F.linear(h, sd[f"{p}.linear2.weight"], sd[f"{p}.linear2.bias"])

    src = F.conv2d(features, sd["input_proj.weight"], sd["input_proj.bias"])
    pos = _ref_pos(mask, D // 2)
    b = src.shape[0]
    src = src.flatten(2).permute(2, 0, 1)  # (S, B, d)
    pos = pos.flatten(2).permute(2, 0, 1)
    kpm = mask.flatten(1)
    query = sd["query_embed.weight"].unsqueeze(1).repeat(1, b, 1)
    mem = src
    for i in range(ENC):
        p = f"transformer.encoder.layers.{i}"
        if pre_norm:
            x = ln(mem, f"{p}.norm1")
            mem = mem + mha(x + pos, x + pos, x, f"{p}.self_attn", kpm)
            mem = mem + ffn(ln(mem, f"{p}.norm2"), p)
        else:
            mem = ln(mem + mha(mem + pos, mem + pos, mem, f"{p}.self_attn", kpm), f"{p}.norm1")
            mem = ln(mem + ffn(mem, p), f"{p}.norm2")
    if pre_norm:
        mem = ln(mem, "transformer.encoder.norm")
    out = torch.zeros_like(query)
    hs = []
    for i in range(DEC):
        p = f"transformer.decoder.layers.{i}"
        if pre_norm:
            x = ln(out, f"{p}.norm1")
            out = out + mha(x + query, x + query, x, f"{p}.self_attn")
            x = ln(out, f"{p}.norm2")
            out = out + mha(x + query, mem + pos, mem, f"{p}.multihead_attn", kpm)
            out = out + ffn(ln(out, f"{p}.norm3"), p)
        else:
            out = ln(out + mha(out + query, out + query, out, f"{p}.self_attn"), f"{p}.norm1")
            out = ln(
                out + mha(out + query, mem + pos, mem, f"{p}.multihead_attn", kpm), f"{p}.norm2"
            )
            out = ln(out + ffn(out, p), f"{p}.norm3")
        hs.append(ln(out, "transformer.decoder.norm"))
    hs = torch.stack(hs).transpose(1, 2)  # (L, B, Q, d)
    logits = F.linear(hs, sd["class_embed.weight"], sd["class_embed.bias"])
    h = hs
    for j in range(3):
        h = F.linear(h, sd[f"bbox_embed.layers.{j}.weight"], sd[f"bbox_embed.layers.{j}.bias"])
        h = F.relu(h) if j < 2 else h
    return logits, h.sigmoid()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images (2, 3, H, W), the second padded on the right and bottom."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, H, W, generator=g)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[1, :, 64:] = True  # cells padded at both strides
    mask[1, 48:, :] = True
    images[1][:, mask[1]] = 0
    return images, mask


def assert_matches_reference(teacher, sd, counts, dilation, pre_norm, nheads):
    images, mask = batch()
    with torch.no_grad():
        out = teacher(images, mask)
        feats, fmask = reference_backbone(sd, images, mask, counts, dilation)
        ref_logits, ref_boxes = reference_detr(sd, feats, fmask, pre_norm, nheads)
        own_feats, _ = teacher.model.backbone(images, mask)
    stride = 16 if dilation else 32
    assert feats.shape[-2:] == (H // stride, W // stride) == own_feats.shape[-2:]
    assert fmask[1].any() and not fmask[0].any()
    torch.testing.assert_close(own_feats, feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pred_logits, ref_logits[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pred_boxes, ref_boxes[-1], atol=1e-5, rtol=1e-4)
    assert len(out.aux_outputs) == DEC - 1
    for i, aux in enumerate(out.aux_outputs):
        torch.testing.assert_close(aux["pred_logits"], ref_logits[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(aux["pred_boxes"], ref_boxes[i], atol=1e-5, rtol=1e-4)
    assert len(out.sequences) == ENC + 1
    assert out.sequences[0].shape == (2, (H // stride) * (W // stride), D)
    return out


NAMES = [f"c{i}" for i in range(CLASSES)]


# -- loading and reproducing DETR ------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "layout", "prefix", "dilation", "pre_norm"),
    [
        ("resnet50", "main.py", "detr", False, False),
        ("resnet50", "zoo", "detr-c5", False, True),
        ("resnet50", "main.py", "detr", True, False),
        ("resnet101", "main.py", "detr-c5", False, False),
        ("resnet101", "zoo", "detr-dc5", True, True),
    ],
)
def test_official_files_reproduce_detr(
    tmp_path, bodies, backbone, layout, prefix, dilation, pre_norm
):
    sd = official_state(bodies[backbone], pre_norm)
    args = None
    if layout == "main.py":
        args = main_py_args(backbone=backbone, dilation=dilation, pre_norm=pre_norm)
    path = save(tmp_path / "checkpoint.pth", sd, args)
    teacher = load_teacher(f"{prefix}:{path}", classes=NAMES, name="detr_t")
    assert isinstance(teacher, DetrTeacher) and teacher.name == "detr_t"
    assert teacher.source == f"{prefix}:{path}" and teacher.image_size == 800
    assert teacher.info == {
        "format": "facebookresearch/detr", "backbone": backbone, "dilation": dilation,
        "pre_norm": pre_norm, "layout": layout,
    }  # fmt: skip
    cfg = teacher.detr_config
    nheads = HEADS if args is not None else 8  # zoo files: DETR's default
    assert (cfg.backbone, cfg.dilation, cfg.pre_norm, cfg.variant) == (
        backbone, dilation, pre_norm, "detr",
    )  # fmt: skip
    assert (cfg.num_classes, cfg.hidden_dim, cfg.nheads) == (CLASSES, D, nheads)
    assert (cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.num_queries) == (
        ENC, DEC, FFN, QUERIES,
    )  # fmt: skip
    assert _stride(cfg) == (16 if dilation else 32)
    assert teacher.class_names == tuple(NAMES) and teacher.head == "softmax"
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    counts = R101 if backbone == "resnet101" else R50
    out = assert_matches_reference(teacher, sd, counts, dilation, pre_norm, nheads)
    assert out.pred_logits.shape == (2, QUERIES, CLASSES + 1)
    # explicit key map spot checks: cross attention and the backbone prefix
    own = teacher.model.state_dict()
    torch.testing.assert_close(
        own["transformer.decoder.layers.1.cross_attn.in_proj_weight"],
        sd["transformer.decoder.layers.1.multihead_attn.in_proj_weight"],
    )
    torch.testing.assert_close(
        own["backbone.body.layer3.5.bn2.running_var"],
        sd["backbone.0.body.layer3.5.bn2.running_var"],
    )


def test_dc5_is_the_same_weights_at_stride_16(tmp_path, bodies):
    sd = official_state(bodies["resnet50"])
    path = save(tmp_path / "detr-r50-dc5.pth", sd, None)
    plain = load_teacher(f"detr-c5:{path}", classes=NAMES)
    dc5 = load_teacher(f"detr-dc5:{path}", classes=NAMES)
    assert dc5.info["dilation"] and dc5.info["layout"] == "zoo" and not plain.info["dilation"]
    b = assert_matches_reference(dc5, sd, R50, dilation=True, pre_norm=False, nheads=8)
    images, mask = batch()
    with torch.no_grad():
        f_plain, _ = plain.model.backbone(images, mask)
        f_dc5, m_dc5 = dc5.model.backbone(images, mask)
        a = plain(images, mask)
    assert f_plain.shape[-2:] == (H // 32, W // 32)
    assert f_dc5.shape[-2:] == m_dc5.shape[-2:] == (H // 16, W // 16)
    assert dc5.model.backbone.stride == 16 and plain.model.backbone.stride == 32
    layer4 = dc5.model.backbone.body.layer4
    assert layer4[0].conv2.stride == (1, 1) and layer4[0].conv2.dilation == (1, 1)
    assert layer4[0].downsample[0].stride == (1, 1)
    assert layer4[1].conv2.dilation == (2, 2) and layer4[1].conv2.padding == (2, 2)
    assert not torch.allclose(a.pred_logits, b.pred_logits, atol=1e-3)
    assert b.sequences[0].shape[1] == 4 * a.sequences[0].shape[1]


def test_coco_head_keeps_91_slots_with_none_at_unused_ids(tmp_path, bodies):
    sd = official_state(bodies["resnet50"], classes=91)
    path = save(tmp_path / "detr-r50-e632da11.pth", sd, None)
    teacher = load_teacher(f"detr-c5:{path}")
    assert len(teacher.class_names) == 91 and teacher.num_logits == 92
    assert [i for i, n in enumerate(teacher.class_names) if n is None] == list(COCO_UNUSED_IDS)
    assert list(COCO_UNUSED_IDS) == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert teacher.classes == tuple(COCO_CLASSES)
    assert teacher.class_names[1] == "person" and teacher.class_names[90] == "toothbrush"
    assert teacher.class_names == COCO_91_SLOTS
    images, mask = batch()
    with torch.no_grad():
        out = teacher(images, mask)
    assert out.pred_logits.shape == (2, QUERIES, 92)  # the whole head, no-object last
    torch.testing.assert_close(teacher.model.class_embed.weight, sd["class_embed.weight"])
    # renaming with a 91-long list (N/A marks unused ids) works; 80 names do not fit
    renamed = ["N/A" if n is None else n.upper() for n in COCO_91_SLOTS]
    t2 = load_teacher(f"detr-c5:{path}", classes=renamed)
    assert t2.class_names[0] is None and t2.class_names[1] == "PERSON"
    with pytest.raises(SourceError, match=r"80 class names given for a head with 91.*N/A") as exc:
        load_teacher(f"detr-c5:{path}", classes=COCO_CLASSES)
    assert path.name in str(exc.value)


def test_bare_state_dict_with_ddp_prefix_and_counters(tmp_path, bodies):
    sd = {f"module.{k}": v for k, v in official_state(bodies["resnet18"]).items()}
    sd["module.backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "bare.pth"
    torch.save(sd, path)
    teacher = load_official_detr(path, dilation=False, classes=NAMES)
    assert teacher.info["layout"] == "state_dict" and teacher.source == str(path)
    assert teacher.detr_config.backbone == "resnet18" and teacher.detr_config.nheads == 8


def test_convert_returns_a_strict_loadable_state_dict(bodies):
    config, converted = convert_detr_state_dict(
        official_state(bodies["resnet18"]), dilation=False, args=main_py_args(backbone="resnet18")
    )
    assert config.nheads == HEADS
    DETR(config).load_state_dict(converted, strict=True)
    assert all(not k.startswith("backbone.0.") for k in converted)


def test_resnet101_and_dilation_in_the_backbone():
    assert ResNet("resnet101").stride == 32
    assert ResNet("resnet101", dilation=True).stride == 16
    with pytest.raises(ValueError, match="dilation"):
        ResNet("resnet18", dilation=True)
    with pytest.raises(ValueError, match="dilation"):
        DetrConfig(num_classes=2, backbone="small_cnn", dilation=True)
    cfg = DetrConfig(num_classes=2, backbone="resnet101", dilation=True)
    assert _stride(cfg) == 16 and DetrConfig.from_dict(cfg.to_dict()) == cfg


# -- refusals: one line, naming the file ------------------------------------------------------


def refused(source: str, match: str, **kw: object) -> str:
    with pytest.raises(SourceError, match=match) as exc:
        load_teacher(source, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_directory_empty_truncated_and_text_files(tmp_path, bodies):
    assert "nope.pth" in refused(f"detr:{tmp_path / 'nope.pth'}", "no such file")
    (tmp_path / "folder.pth").mkdir()
    assert "folder.pth" in refused(f"detr:{tmp_path / 'folder.pth'}", "is a directory")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty.pth" in refused(f"detr:{tmp_path / 'empty.pth'}", "empty")
    path = save(tmp_path / "cut.pth", official_state(bodies["resnet18"]), None)
    path.write_bytes(path.read_bytes()[:100_000])
    assert "cut.pth" in refused(f"detr-c5:{path}", "truncated")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "notes.txt" in refused(f"detr:{tmp_path / 'notes.txt'}", "not a readable PyTorch")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pth"
    torch.save({"model": _Evil(marker)}, zipped)
    msg = refused(f"detr:{zipped}", r"refused: not plain weights \(it asks for \w+\.system\)")
    assert "evil.pth" in msg
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))
    assert "evil_raw.pth" in refused(f"detr:{raw}", "refused")
    assert not marker.exists()


def test_other_architectures_are_refused(tmp_path, bodies):
    expected = "expected a facebookresearch/detr DETR state dict"
    # a ka_rs checkpoint
    from ka_rs.engine.checkpoint import save_checkpoint

    cfg = DetrConfig(
        num_classes=2, backbone="small_cnn", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
        dim_feedforward=32, num_queries=3,
    )  # fmt: skip
    tiny = DETR(cfg)
    ka = save_checkpoint(tmp_path / "ka.pt", model=tiny, class_names=["a", "b"], include_rng=False)
    assert "ka.pt" in refused(f"detr:{ka}", f"{expected}.*ka_rs checkpoint")
    # its state dict alone
    torch.save(tiny.state_dict(), tmp_path / "ka_sd.pth")
    assert "ka_sd.pth" in refused(f"detr:{tmp_path / 'ka_sd.pth'}", expected)
    # a torchvision ResNet file
    tv = {k[len("backbone.0.body.") :]: v for k, v in bodies["resnet18"].items()}
    tv |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(tv, tmp_path / "resnet18-f37072fd.pth")
    msg = refused(f"detr:{tmp_path / 'resnet18-f37072fd.pth'}", f"{expected}.*torchvision ResNet")
    assert "resnet18-f37072fd.pth" in msg
    # a Deformable-DETR state dict (its names, small tensors)
    deformable = {
        "backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7),
        "transformer.level_embed": torch.zeros(4, D),
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight": torch.zeros(8, D),
        "input_proj.0.0.weight": torch.zeros(D, 512, 1, 1),
        "class_embed.0.weight": torch.zeros(91, D),
        "query_embed.weight": torch.zeros(QUERIES, 2 * D),
    }
    torch.save({"model": deformable}, tmp_path / "r50_deformable_detr.pth")
    msg = refused(f"detr:{tmp_path / 'r50_deformable_detr.pth'}", f"{expected}.*Deformable")
    assert "r50_deformable_detr.pth" in msg
    # junk
    for name, obj in [
        ("junk.pth", {"foo": 1, "bar": "x"}),
        ("tensor_model.pth", {"model": torch.zeros(3)}),
        ("list.pth", [1, 2, 3]),
        ("int_keys.pth", {1: torch.zeros(1)}),
    ]:
        torch.save(obj, tmp_path / name)
        assert name in refused(f"detr:{tmp_path / name}", expected)
    # a DETR key with the wrong shape, and one key too many
    sd = official_state(bodies["resnet18"])
    sd["transformer.encoder.layers.1.linear1.weight"] = torch.zeros(FFN + 1, D)
    path = save(tmp_path / "misshaped.pth", sd, None)
    assert "misshaped.pth" in refused(
        f"detr-c5:{path}", r"encoder.layers.1.linear1.weight has shape"
    )
    sd = official_state(bodies["resnet18"]) | {"extra_head.weight": torch.zeros(3)}
    path = save(tmp_path / "extra.pth", sd, None)
    assert "extra.pth" in refused(f"detr-c5:{path}", r"keys no DETR has: \['extra_head.weight'\]")
    sd = official_state(bodies["resnet18"])
    del sd["transformer.decoder.layers.1.norm3.bias"]
    path = save(tmp_path / "short.pth", sd, None)
    assert "short.pth" in refused(f"detr-c5:{path}", r"missing \['transformer.decoder.layers.1")


def test_panoptic_learned_positions_and_unsupported_backbones(tmp_path, bodies):
    sd = official_state(bodies["resnet18"])
    segm = {f"detr.{k}": v for k, v in sd.items()} | {"mask_head.lay1.weight": torch.zeros(1)}
    path = save(tmp_path / "detr-r50-panoptic.pth", segm, None)
    assert "detr-r50-panoptic.pth" in refused(f"detr-c5:{path}", "panoptic")
    path = save(tmp_path / "masks.pth", sd, main_py_args(backbone="resnet18", masks=True))
    assert "masks.pth" in refused(f"detr:{path}", "panoptic")
    learned = sd | {"backbone.1.row_embed.weight": torch.zeros(50, D // 2)}
    path = save(tmp_path / "learned.pth", learned, None)
    assert "learned.pth" in refused(f"detr-c5:{path}", "learned position embedding")
    path = save(tmp_path / "r18dc5.pth", sd, None)
    assert "r18dc5.pth" in refused(f"detr-dc5:{path}", "DC5.*ResNet-50/101.*resnet18")
    deeper = dict(sd)
    for k in [k for k in sd if k.startswith("backbone.0.body.layer3.1.")]:
        deeper[k.replace("layer3.1.", "layer3.2.")] = sd[k]
    path = save(tmp_path / "deeper.pth", deeper, None)
    assert "deeper.pth" in refused(f"detr-c5:{path}", r"unsupported backbone.*\(2, 2, 3, 2\)")


def test_dilation_must_be_known_and_consistent(tmp_path, bodies):
    sd = official_state(bodies["resnet50"])
    zoo = save(tmp_path / "detr-r50.pth", sd, None)
    msg = refused(f"detr:{zoo}", "identical weight shapes")
    assert f"detr-c5:{zoo}" in msg and f"detr-dc5:{zoo}" in msg and "file name" not in msg
    dc5_zoo = save(tmp_path / "detr-r50-dc5-f0fb7ef5.pth", sd, None)
    msg = refused(f"detr:{dc5_zoo}", re.escape(f"file name says DC5: probably detr-dc5:{dc5_zoo}"))
    ckpt = save(tmp_path / "checkpoint.pth", sd, main_py_args(dilation=True))
    assert "checkpoint.pth" in refused(f"detr-c5:{ckpt}", "args.dilation is True.*plain")
    ckpt = save(tmp_path / "checkpoint0099.pth", sd, main_py_args(dilation=False))
    assert "checkpoint0099.pth" in refused(f"detr-dc5:{ckpt}", "args.dilation is False.*dilated")


def test_args_must_match_the_weights(tmp_path, bodies):
    sd = official_state(bodies["resnet50"])
    path = save(tmp_path / "r101args.pth", sd, main_py_args(backbone="resnet101"))
    assert "r101args.pth" in refused(f"detr:{path}", "args.backbone is 'resnet101'.*resnet50")
    path = save(tmp_path / "prenorm.pth", sd, main_py_args(pre_norm=True))
    assert "prenorm.pth" in refused(f"detr:{path}", "args.pre_norm is True")
    path = save(tmp_path / "heads.pth", sd, main_py_args(nheads=5))
    assert "heads.pth" in refused(f"detr:{path}", "unsupported DETR architecture.*nheads=5")
    torch.save({"model": sd, "args": [1, 2]}, tmp_path / "listargs.pth")
    assert "listargs.pth" in refused(f"detr:{tmp_path / 'listargs.pth'}", "argparse.Namespace")


def test_class_names_required_and_fitting(tmp_path, bodies):
    path = save(tmp_path / "custom.pth", official_state(bodies["resnet18"]), None)
    msg = refused(f"detr-c5:{path}", f"the head has {CLASSES} classes.*give classes=")
    assert "custom.pth" in msg
    msg = refused(
        f"detr-c5:{path}", "3 class names given for a head with 5", classes=["a", "b", "c"]
    )
    assert "custom.pth" in msg
    dup = ["a", "b", "a", "c", "d"]
    assert "custom.pth" in refused(f"detr-c5:{path}", "listed twice", classes=dup)
    teacher = load_teacher(f"detr-c5:{path}", classes=["N/A", "b", "c", "d", "e"])
    assert teacher.class_names == (None, "b", "c", "d", "e")

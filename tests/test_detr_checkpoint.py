"""load_detr_checkpoint on fake facebookresearch/detr checkpoints built with the official key
names and shapes, checked against an independent re-implementation of DETR's (post-norm,
sequence-first) forward pass written from those keys."""

from __future__ import annotations

import argparse
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from ka_rs.models import load_detr_checkpoint
from ka_rs.models.detr_checkpoint import convert_detr_state_dict

D, HEADS, FFN, ENC, DEC, QUERIES, CLASSES = 32, 4, 64, 2, 3, 7, 5


def _resnet18_keys() -> dict[str, tuple[int, ...]]:
    """backbone.0.body.* keys and shapes of DETR's ResNet-18 body (frozen BN: 4 buffers)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        out[f"backbone.0.body.{name}.weight"] = (cout, cin, k, k)

    def bn(name: str, c: int) -> None:
        for s in ("weight", "bias", "running_mean", "running_var"):
            out[f"backbone.0.body.{name}.{s}"] = (c,)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p = f"layer{stage}.{j}"
            conv(f"{p}.conv1", width, cin, 3)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            if j == 0 and stage > 1:
                conv(f"{p}.downsample.0", width, cin, 1)
                bn(f"{p}.downsample.1", width)
            cin = width
    return out


def _attn(prefix: str) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.in_proj_weight": (3 * D, D),
        f"{prefix}.in_proj_bias": (3 * D,),
        f"{prefix}.out_proj.weight": (D, D),
        f"{prefix}.out_proj.bias": (D,),
    }


def _lin(prefix: str, cout: int, cin: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)}


def _norm(prefix: str) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (D,), f"{prefix}.bias": (D,)}


def official_shapes(pre_norm: bool = False) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a facebookresearch/detr ``model`` state dict (ResNet-18 body)."""
    shapes = _resnet18_keys()
    shapes["input_proj.weight"] = (D, 512, 1, 1)
    shapes["input_proj.bias"] = (D,)
    shapes["query_embed.weight"] = (QUERIES, D)
    for i in range(ENC):
        p = f"transformer.encoder.layers.{i}"
        shapes |= _attn(f"{p}.self_attn") | _lin(f"{p}.linear1", FFN, D)
        shapes |= _lin(f"{p}.linear2", D, FFN) | _norm(f"{p}.norm1") | _norm(f"{p}.norm2")
    if pre_norm:
        shapes |= _norm("transformer.encoder.norm")
    for i in range(DEC):
        p = f"transformer.decoder.layers.{i}"
        shapes |= _attn(f"{p}.self_attn") | _attn(f"{p}.multihead_attn")
        shapes |= _lin(f"{p}.linear1", FFN, D) | _lin(f"{p}.linear2", D, FFN)
        shapes |= _norm(f"{p}.norm1") | _norm(f"{p}.norm2") | _norm(f"{p}.norm3")
    shapes |= _norm("transformer.decoder.norm")
    shapes |= _lin("class_embed", CLASSES + 1, D)
    shapes |= _lin("bbox_embed.layers.0", D, D) | _lin("bbox_embed.layers.1", D, D)
    shapes |= _lin("bbox_embed.layers.2", 4, D)
    return shapes


def fake_state_dict(pre_norm: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_shapes(pre_norm).items():
        if k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif ".bn" in k or "downsample.1" in k or k.endswith(("bn1.weight", "bn1.bias")):
            sd[k] = 0.1 * torch.randn(shape, generator=g) + (0.3 if k.endswith("weight") else 0)
        elif "norm" in k and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def _args(**kw) -> argparse.Namespace:
    base = dict(nheads=HEADS, dropout=0.1, dilation=False, masks=False, backbone="resnet18")
    base.update(kw)
    return argparse.Namespace(**base)


# -- an independent DETR forward over the official keys (post-norm, sequence-first) ----------


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


def reference_detr(sd, features, mask, pre_norm=False):
    """DETR's transformer + heads from the official keys; features (B, 512, h, w)."""

    def mha(q, k, v, p, kpm=None):
        return F.multi_head_attention_forward(
            q, k, v, D, HEADS, sd[f"{p}.in_proj_weight"], sd[f"{p}.in_proj_bias"],
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


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pre_norm", [False, True])
def test_loaded_checkpoint_reproduces_detr(tmp_path, pre_norm):
    sd = fake_state_dict(pre_norm)
    path = tmp_path / "detr.pth"
    torch.save({"model": sd, "args": _args(), "epoch": 3}, path)
    model = load_detr_checkpoint(path)
    cfg = model.config
    assert not model.training
    assert (cfg.num_classes, cfg.hidden_dim, cfg.nheads) == (CLASSES, D, HEADS)
    assert (cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward) == (ENC, DEC, FFN)
    assert (cfg.num_queries, cfg.backbone, cfg.variant) == (QUERIES, "resnet18", "detr")
    assert cfg.pre_norm is pre_norm

    # explicit key map spot checks: cross attention and the backbone prefix
    own = model.state_dict()
    torch.testing.assert_close(
        own["transformer.decoder.layers.1.cross_attn.in_proj_weight"],
        sd["transformer.decoder.layers.1.multihead_attn.in_proj_weight"],
    )
    torch.testing.assert_close(
        own["backbone.body.layer3.0.downsample.1.running_var"],
        sd["backbone.0.body.layer3.0.downsample.1.running_var"],
    )

    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 64:] = True
    with torch.no_grad():
        out = model(images, mask)
        feats, fmask = model.backbone(images, mask)
        ref_logits, ref_boxes = reference_detr(sd, feats, fmask, pre_norm)
    assert fmask[1].any()
    torch.testing.assert_close(out.pred_logits, ref_logits[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pred_boxes, ref_boxes[-1], atol=1e-5, rtol=1e-4)
    for i, aux in enumerate(out.aux_outputs):
        torch.testing.assert_close(aux["pred_logits"], ref_logits[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(aux["pred_boxes"], ref_boxes[i], atol=1e-5, rtol=1e-4)


def test_bare_state_dict_ddp_prefix_and_nheads_argument(tmp_path):
    sd = fake_state_dict()
    sd = {f"module.{k}": v for k, v in sd.items()}
    sd["module.backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "bare.pth"
    torch.save(sd, path)
    model = load_detr_checkpoint(path, nheads=HEADS)
    assert model.config.nheads == HEADS and model.config.num_classes == CLASSES
    # without args the default is DETR's 8 heads (32 is divisible by 8, so it builds)
    assert load_detr_checkpoint(path).config.nheads == 8


def test_convert_returns_a_strict_loadable_state_dict():
    from ka_rs.models import DETR

    config, converted = convert_detr_state_dict(fake_state_dict(), nheads=HEADS)
    DETR(config).load_state_dict(converted, strict=True)
    assert all(not k.startswith("backbone.0.") for k in converted)


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_detr_checkpoint(tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    path = _save(tmp_path, {"model": fake_state_dict(), "args": _args()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"ckpt\.pth.*truncated or foreign"):
        load_detr_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_foreign_files_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        load_detr_checkpoint(text)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": _Evil()}, protocol=2))
    with pytest.raises(ValueError, match="evil.pth"):
        load_detr_checkpoint(evil)
    with pytest.raises(ValueError, match="expected a dict"):
        load_detr_checkpoint(_save(tmp_path, [1, 2, 3], "list.pth"))
    resnet = {k[len("backbone.0.body.") :]: v for k, v in fake_state_dict().items() if "body" in k}
    with pytest.raises(ValueError, match="not a facebookresearch/detr"):
        load_detr_checkpoint(_save(tmp_path, {"model": resnet}, "resnet.pth"))
    with pytest.raises(ValueError, match="not a dict"):
        load_detr_checkpoint(_save(tmp_path, {"model": torch.zeros(3)}, "weird.pth"))


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = fake_state_dict()
    del sd["transformer.decoder.layers.1.norm3.bias"]
    with pytest.raises(ValueError, match=r"missing \['transformer.decoder.layers.1.norm3.bias'\]"):
        load_detr_checkpoint(_save(tmp_path, {"model": sd, "args": _args()}))
    sd = fake_state_dict()
    sd["extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="extra_head.weight"):
        load_detr_checkpoint(_save(tmp_path, {"model": sd, "args": _args()}))
    sd = fake_state_dict()
    sd["transformer.encoder.layers.1.linear1.weight"] = torch.zeros(FFN + 1, D)
    with pytest.raises(ValueError, match=r"encoder.layers.1.linear1.weight has shape"):
        load_detr_checkpoint(_save(tmp_path, {"model": sd, "args": _args()}))


def test_unsupported_architectures(tmp_path):
    sd = fake_state_dict()
    with pytest.raises(ValueError, match="DC5"):
        load_detr_checkpoint(_save(tmp_path, {"model": sd, "args": _args(dilation=True)}))
    deeper = dict(sd)
    for k in [k for k in sd if k.startswith("backbone.0.body.layer3.1.")]:
        deeper[k.replace("layer3.1.", "layer3.2.")] = sd[k]
    with pytest.raises(ValueError, match="unsupported backbone"):
        load_detr_checkpoint(_save(tmp_path, {"model": deeper, "args": _args()}))
    segm = {f"detr.{k}": v for k, v in sd.items()}
    with pytest.raises(ValueError, match="segmentation"):
        load_detr_checkpoint(_save(tmp_path, {"model": segm, "args": _args()}))

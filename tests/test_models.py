"""ka_rs.models: backbones, positional encoding, transformer, DETR (both variants), presets."""

from __future__ import annotations

import math

import pytest
import torch
from ka_rs.models import (
    DETR,
    PRESETS,
    DetrConfig,
    DetrOutput,
    EncoderInput,
    FrozenBatchNorm2d,
    PositionEmbeddingSine,
    ResNet,
    TransformerEncoder,
    build_model,
    postprocess,
    preset_config,
)
from ka_rs.models.detr import token_centres
from torch import nn


def _tiny_config(variant: str = "detr", **kw) -> DetrConfig:
    fields = dict(
        num_classes=3,
        backbone="small_cnn",
        cnn_channels=(8, 16),  # stride 4
        hidden_dim=16,
        nheads=2,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=32,
        dropout=0.0,
        num_queries=5,
        variant=variant,
    )
    fields.update(kw)
    return DetrConfig(**fields)


def _batch(b: int = 2, h: int = 32, w: int = 40, pad_cols: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[-1, :, w - pad_cols :] = True
    images[mask[:, None].expand_as(images)] = 0.0
    return images, mask


# -- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_output_shapes_and_sequences(preset):
    torch.manual_seed(0)
    model = build_model(preset, num_classes=4).eval()
    cfg = model.config
    if preset == "detr_r50":
        b, h, w, pad = 1, 64, 64, 0
    else:
        b, h, w, pad = 2, 64, 96, 32
    images, mask = _batch(b, h, w, pad)
    with torch.no_grad():
        out = model(images, mask)
    assert isinstance(out, DetrOutput)
    k = 5 if cfg.variant == "detr" else 4
    q, d = cfg.num_queries, cfg.hidden_dim
    assert out.pred_logits.shape == (b, q, k)
    assert out.pred_boxes.shape == (b, q, 4)
    assert bool(((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all())
    assert len(out.aux_outputs) == cfg.dec_layers - 1
    for aux in out.aux_outputs:
        assert aux["pred_logits"].shape == (b, q, k)
        assert aux["pred_boxes"].shape == (b, q, 4)
    stride = model.backbone.stride
    s = math.ceil(h / stride) * math.ceil(w / stride)
    assert len(out.sequences) == cfg.enc_layers + 1
    assert all(seq.shape == (b, s, d) for seq in out.sequences)
    assert out.padding_mask.shape == (b, s)
    assert out.padding_mask.dtype == torch.bool
    expected_pad = math.ceil(h / stride) * (pad // stride)  # only the last image is padded
    assert int(out.padding_mask.sum()) == expected_pad
    assert torch.isfinite(out.pred_logits).all()


def test_preset_table_matches_the_paper_and_cpu_sizes():
    r50 = preset_config("detr_r50", 91)
    assert (r50.backbone, r50.hidden_dim, r50.nheads) == ("resnet50", 256, 8)
    assert (r50.enc_layers, r50.dec_layers, r50.dim_feedforward) == (6, 6, 2048)
    assert (r50.num_queries, r50.dropout, r50.variant, r50.num_logits) == (100, 0.1, "detr", 92)
    assert r50.pre_norm
    for name in ("detr_small", "detr_tiny", "anchor_small", "anchor_tiny"):
        cfg = preset_config(name, 4)
        assert cfg.backbone == "small_cnn"
        assert cfg.variant == name.split("_")[0]
        params = sum(p.numel() for p in DETR(cfg).parameters())
        assert params < 3_000_000, (name, params)


def test_build_model_overrides_and_errors():
    model = build_model("anchor_tiny", 2, num_queries=7, dec_layers=3)
    assert model.config.num_queries == 7 and model.config.dec_layers == 3
    assert model.config.class_head == "sigmoid" and model.config.num_logits == 2
    with pytest.raises(ValueError, match="preset"):
        build_model("detr_huge", 2)
    with pytest.raises(ValueError, match="unknown DetrConfig"):
        build_model("detr_tiny", 2, hidden_size=64)


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backbone", "vgg16"),
        ("variant", "dino"),
        ("nheads", 5),
        ("num_queries", 0),
        ("num_classes", 0),
        ("dropout", 1.0),
        ("cnn_channels", (8, 12)),
        ("anchor_size", 0.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    kw = {"num_classes": 3, field: value}
    if field == "nheads":
        kw["hidden_dim"] = 16
    with pytest.raises(ValueError, match=field if field != "nheads" else "hidden_dim"):
        DetrConfig(**kw)


def test_config_roundtrip_and_heads():
    cfg = _tiny_config("anchor")
    assert DetrConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.class_head == "sigmoid" and cfg.num_logits == 3
    detr = _tiny_config("detr")
    assert detr.class_head == "softmax" and detr.num_logits == 4
    with pytest.raises(ValueError, match="bogus"):
        DetrConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# -- DETR forward ----------------------------------------------------------------------------


def test_output_is_dict_compatible():
    model = DETR(_tiny_config()).eval()
    out = model(*_batch())
    assert out["pred_logits"] is out.pred_logits
    assert out["aux_outputs"] is out.aux_outputs
    assert set(out.keys()) == {
        "pred_logits",
        "pred_boxes",
        "aux_outputs",
        "sequences",
        "padding_mask",
        "enc_outputs",
    }
    assert out["enc_outputs"] is None  # no dense head in this config
    assert "pred_boxes" in out and "memory" not in out
    assert out.get("memory", 3) == 3
    with pytest.raises(KeyError):
        out["memory"]


def test_forward_validates_inputs():
    model = DETR(_tiny_config()).eval()
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="images"):
        model(torch.randint(0, 255, (1, 3, 32, 32)))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32))


def test_mask_none_equals_all_false_mask():
    model = DETR(_tiny_config()).eval()
    images, _ = _batch(pad_cols=0)
    a = model(images)
    b = model(images, torch.zeros(2, 32, 40, dtype=torch.bool))
    torch.testing.assert_close(a.pred_logits, b.pred_logits)
    assert not a.padding_mask.any()


class _NoisyPadding(DETR):
    """Adds noise to the tokens of the selected cells (padded or not) through the hook."""

    noise_on_padding = True

    def encoder_input(self, features, mask, pos):
        enc = super().encoder_input(features, mask, pos)
        where = enc.padding_mask if self.noise_on_padding else ~enc.padding_mask
        noise = 100.0 * torch.randn_like(enc.tokens) * where[..., None]
        return EncoderInput(enc.tokens + noise, enc.pos, enc.padding_mask, enc.attn_mask)


@pytest.mark.parametrize("variant", ["detr", "anchor"])
def test_padded_tokens_do_not_influence_predictions(variant):
    torch.manual_seed(0)
    base = DETR(_tiny_config(variant)).eval()
    noisy = _NoisyPadding(_tiny_config(variant)).eval()
    noisy.load_state_dict(base.state_dict())
    images, mask = _batch()
    ref = base(images, mask)
    out = noisy(images, mask)
    assert out.padding_mask[1].any() and not out.padding_mask[0].any()
    torch.testing.assert_close(out.pred_logits, ref.pred_logits)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes)
    # the same noise on valid tokens does change the predictions (the check has teeth)
    noisy.noise_on_padding = False
    moved = noisy(images, mask)
    assert not torch.allclose(moved.pred_logits, ref.pred_logits, atol=1e-3)


def test_sequences_are_the_projected_input_and_unnormed_encoder_outputs():
    model = DETR(_tiny_config()).eval()
    images, mask = _batch()
    out = model(images, mask)
    feats, fmask = model.backbone(images, mask)
    tokens = model.input_proj(feats).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.sequences[0], tokens)
    pos = model.position(fmask).flatten(2).transpose(1, 2)
    layers, memory = model.transformer.encoder(tokens, pos, fmask.flatten(1))
    for got, want in zip(out.sequences[1:], layers, strict=True):
        torch.testing.assert_close(got, want)
    # pre-norm: the hook points are before the encoder's final norm, the memory after it
    torch.testing.assert_close(memory, model.transformer.encoder.norm(layers[-1]))
    assert not torch.allclose(layers[-1], memory, atol=1e-3)


def test_anchor_variant_starts_at_its_anchors_in_every_layer():
    torch.manual_seed(0)
    model = DETR(_tiny_config("anchor", anchor_size=0.2)).eval()
    out = model(*_batch())
    anchors = model.anchors.sigmoid()
    assert torch.allclose(anchors[:, 2:], torch.full_like(anchors[:, 2:], 0.2), atol=1e-5)
    for boxes in [a["pred_boxes"] for a in out.aux_outputs] + [out.pred_boxes]:
        torch.testing.assert_close(boxes, anchors.expand_as(boxes))
    # focal prior: every class starts at probability ~0.01
    torch.testing.assert_close(
        out.pred_logits.sigmoid().mean(), torch.tensor(0.01), atol=5e-3, rtol=0
    )


def test_anchor_decoder_adds_deltas_in_logit_space_and_detaches_between_layers():
    torch.manual_seed(0)
    model = DETR(_tiny_config("anchor")).eval()
    decoder = model.transformer.decoder
    b, q, d = 2, 5, 16
    memory = torch.randn(b, 7, d)
    anchors = torch.randn(b, q, 4)
    delta = torch.tensor([0.3, -0.2, 0.1, 0.5], requires_grad=True)

    def box_head(h):
        return delta + 0.0 * h[..., :4]

    hidden, boxes = decoder.forward_refine(torch.zeros(b, q, d), memory, anchors, box_head)
    assert hidden.shape == (3, b, q, d) and boxes.shape == (3, b, q, 4)
    for layer in range(3):  # box_l = sigmoid(logit(anchor) + (l + 1) * delta)
        want = (anchors + (layer + 1) * delta).sigmoid()
        torch.testing.assert_close(boxes[layer], want.detach())
    # detached between layers: the last layer's box depends on delta only through its own step
    boxes[-1].sum().backward()
    s = boxes[-1].detach()
    torch.testing.assert_close(delta.grad, (s * (1 - s)).sum((0, 1)))


def test_token_centres_follow_the_valid_extent():
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[1, :, 2:] = True  # image 1: 2 valid columns
    xy = token_centres(mask)
    assert xy.shape == (2, 8, 2)
    torch.testing.assert_close(xy[0, :4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(xy[0, ::4, 1], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(xy[1, :2, 0], torch.tensor([0.25, 0.75]))


def test_box_prior_peaks_at_the_box_and_widens_per_head():
    decoder = DETR(_tiny_config("anchor", box_prior=True)).transformer.decoder
    boxes = torch.tensor([[[0.25, 0.75, 0.2, 0.4]]])  # (B=1, Q=1, 4)
    xy = torch.tensor([[[0.25, 0.75], [0.45, 0.75], [0.25, 0.35], [0.9, 0.1]]])
    bias = decoder.box_prior(0, boxes, xy)  # (B·H, Q, S) = (2, 1, 4)
    assert bias.shape == (2, 1, 4)
    assert (bias[:, 0, 0] == 0).all() and (bias[:, 0, 1:] < 0).all()
    # one box width right == one box height down: both are one "box unit" away
    torch.testing.assert_close(bias[:, 0, 1], bias[:, 0, 2])
    assert bias[0, 0, 3] < bias[1, 0, 3]  # head 0 is the narrowest
    with pytest.raises(ValueError, match="box_prior"):
        _tiny_config("detr", box_prior=True)


def test_box_prior_variant_trains_and_tiles_slots():
    torch.manual_seed(0)
    model = DETR(_tiny_config("anchor", box_prior=True))
    images, mask = _batch()
    out = model(images, mask)
    assert torch.isfinite(out.pred_logits).all() and torch.isfinite(out.pred_boxes).all()
    (out.pred_boxes.sum() + out.pred_logits.sum()).backward()
    assert model.transformer.decoder.box_prior_log_scale.grad is not None
    # a memory holding two copies of the cell grid (like a two-slot student) gets tiled centres
    feats, fmask = model.backbone(images, mask)
    enc = model.encoder_input(feats, fmask, model.position(fmask))
    memory = torch.cat([enc.tokens, enc.tokens], dim=1)
    pos = torch.cat([enc.pos, enc.pos], dim=1)
    pad = torch.cat([enc.padding_mask, enc.padding_mask], dim=1)
    logits, boxes = model.decode(memory, pos, pad, token_centres(fmask))
    assert logits.shape == (3, 2, 5, 3) and torch.isfinite(boxes).all()
    with pytest.raises(ValueError, match="token_xy"):
        model.decode(memory[:, :-1], pos[:, :-1], pad[:, :-1], token_centres(fmask))


def test_dense_aux_head_scores_every_token():
    model = DETR(_tiny_config("anchor", dense_aux=True)).eval()
    images, mask = _batch()
    out = model(images, mask)
    enc = out.enc_outputs
    s = out.padding_mask.shape[1]
    assert enc["pred_logits"].shape == (2, s, 3)
    assert enc["token_xy"].shape == (2, s, 2)
    assert torch.equal(enc["padding_mask"], out.padding_mask)
    assert enc["pred_logits"].sigmoid().mean() < 0.05  # focal prior: starts near 0.01


def test_two_stage_queries_come_from_the_best_scored_tokens():
    torch.manual_seed(0)
    model = DETR(_tiny_config("anchor", dense_aux=True, two_stage=True)).eval()
    assert "anchors" not in dict(model.named_parameters())  # a buffer: no unused parameter
    images, mask = _batch()
    out = model(images, mask)
    enc = out.enc_outputs
    s = out.padding_mask.shape[1]
    assert enc["pred_boxes"].shape == (2, s, 4)
    # at initialisation (zero box delta) each token's proposal sits at its cell centre
    torch.testing.assert_close(enc["pred_boxes"][0, :, :2], enc["token_xy"][0])
    memory = torch.randn(2, s, 16)
    content, anchors = model.select_queries(memory, enc)
    scores = enc["pred_logits"].amax(-1).masked_fill(enc["padding_mask"], float("-inf"))
    best = scores.topk(5, dim=1).indices
    for i in range(2):
        torch.testing.assert_close(content[i], memory[i, best[i]])
        torch.testing.assert_close(anchors[i].sigmoid(), enc["pred_boxes"][i, best[i]])
        assert not enc["padding_mask"][i, best[i]].any()  # padded tokens are never chosen
    # fewer tokens than queries: the fixed anchors fill the rest
    few = {k: v[:, :3] for k, v in enc.items()}
    content, anchors = model.select_queries(memory[:, :3], few)
    assert content.shape == (2, 5, 16) and anchors.shape == (2, 5, 4)
    torch.testing.assert_close(anchors[0, 3:], model.anchors[3:])
    with pytest.raises(ValueError, match="two_stage"):
        _tiny_config("anchor", two_stage=True)
    with pytest.raises(ValueError, match="two_stage"):
        _tiny_config("detr", dense_aux=True, two_stage=True)


def test_gradients_reach_every_trainable_parameter():
    for variant in ("detr", "anchor"):
        model = DETR(_tiny_config(variant))
        out = model(*_batch())
        loss = out.pred_logits.sum() + out.pred_boxes.sum()
        loss = loss + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out.aux_outputs)
        loss.backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None]
        assert not dead, (variant, dead)


def test_postprocess_softmax_and_sigmoid():
    logits = torch.full((1, 3, 3), -10.0)
    logits[0, 0, 1] = 10.0  # query 0: class 1
    logits[0, 1, 2] = 10.0  # query 1: no object (softmax) / class 2 (sigmoid)
    logits[0, 2, 2] = 5.0  # query 2: no object (softmax) / weaker class 2 (sigmoid)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    out = {"pred_logits": logits, "pred_boxes": boxes}
    soft = postprocess(out, [(100, 200)], "softmax", num_detections=2)[0]
    assert soft["labels"][0] == 1 and soft["scores"][0] > 0.99
    torch.testing.assert_close(soft["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    assert soft["scores"][1] < 0.01 and len(soft["scores"]) == 2
    sig = postprocess(out, torch.tensor([[100, 200]]), "sigmoid", num_detections=2)[0]
    assert sorted(sig["labels"].tolist()) == [1, 2]  # the two 10.0 logits, not the 5.0 one
    torch.testing.assert_close(sig["boxes"][sig["labels"] == 2][0], torch.tensor([0.0, 0, 100, 50]))
    with pytest.raises(ValueError, match="target_sizes"):
        postprocess(out, [(1, 2), (3, 4)])


# -- building blocks -------------------------------------------------------------------------


def test_position_embedding_is_normalised_per_image():
    pe = PositionEmbeddingSine(num_pos_feats=8)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 3:] = True  # image 1: valid 4×3
    small = pe(torch.zeros(1, 4, 3, dtype=torch.bool))
    pos = pe(mask)
    assert pos.shape == (2, 16, 4, 6)
    torch.testing.assert_close(pos[1, :, :, :3], small[0])
    # DETR's formula: y channels first; channel 0 = sin(y_norm), channel 1 = cos(y_norm)
    y_norm = torch.arange(1, 5, dtype=torch.float32) / (4 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[0, 0, :, 0], y_norm.sin())
    torch.testing.assert_close(pos[0, 1, :, 0], y_norm.cos())
    x_norm = torch.arange(1, 7, dtype=torch.float32) / (6 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[0, 8, 0, :], x_norm.sin())
    # channel 2: next frequency 10000^(2/8)
    torch.testing.assert_close(pos[0, 2, :, 0], (y_norm / 10000 ** (2 / 8)).sin())


def test_encoder_attn_mask_isolates_blocks():
    torch.manual_seed(0)
    enc = TransformerEncoder(2, 16, 2, 32, dropout=0.0).eval()
    x = torch.randn(1, 8, 16)
    block = torch.arange(8) // 4
    attn_mask = block[:, None] != block[None, :]
    out, _ = enc(x, None, None, attn_mask)
    x2 = x.clone()
    x2[:, 4:] += 5.0
    out2, _ = enc(x2, None, None, attn_mask)
    torch.testing.assert_close(out[-1][:, :4], out2[-1][:, :4])
    full, _ = enc(x2, None, None, None)
    assert not torch.allclose(full[-1][:, :4], out[-1][:, :4], atol=1e-3)


def test_frozen_batchnorm_matches_batchnorm_in_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))
    assert not list(frozen.parameters())


def _torchvision_resnet_keys(depth: str) -> set[str]:
    """Keys of torchvision.models.<depth>(weights=None).state_dict(), from torchvision if
    importable, else from torchvision's documented layout."""
    try:
        import torchvision  # type: ignore[import-not-found]
    except ImportError:
        torchvision = None
    if torchvision is not None:
        return set(getattr(torchvision.models, depth)(weights=None).state_dict())
    bottleneck = depth in ("resnet50", "resnet101")
    counts = {
        "resnet18": (2, 2, 2, 2),
        "resnet34": (3, 4, 6, 3),
        "resnet50": (3, 4, 6, 3),
        "resnet101": (3, 4, 23, 3),
    }[depth]
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{s}" for s in bn)}
    for stage, count in enumerate(counts, start=1):
        for j in range(count):
            p = f"layer{stage}.{j}."
            for c in (1, 2, 3) if bottleneck else (1, 2):
                keys.add(f"{p}conv{c}.weight")
                keys.update(f"{p}bn{c}.{s}" for s in bn)
            if j == 0 and (stage > 1 or bottleneck):
                keys.add(f"{p}downsample.0.weight")
                keys.update(f"{p}downsample.1.{s}" for s in bn)
    return keys


@pytest.mark.parametrize(
    ("depth", "torchvision_params", "fc_params", "channels"),
    [
        ("resnet18", 11_689_512, 513_000, 512),
        ("resnet34", 21_797_672, 513_000, 512),
        ("resnet50", 25_557_032, 2_049_000, 2048),
        ("resnet101", 44_549_160, 2_049_000, 2048),
    ],
)
def test_resnet_state_dict_matches_torchvision(depth, torchvision_params, fc_params, channels):
    net = ResNet(depth)
    sd = net.state_dict()
    tv = _torchvision_resnet_keys(depth)
    expected = {k for k in tv if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(sd) == expected
    # torchvision's parameter count (BN affine included) minus its classifier
    learnable = sum(v.numel() for k, v in sd.items() if "running_" not in k)
    assert learnable == torchvision_params - fc_params
    assert net.num_channels == channels
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, channels, 2, 2)


def test_resnet_loads_a_torchvision_style_state_dict():
    torch.manual_seed(1)
    src = ResNet("resnet18")
    for k, v in src.state_dict().items():
        if "running_var" in k:
            v.uniform_(0.5, 2.0)
        elif ".bn" in k or k.startswith("bn") or "downsample.1" in k:
            v.normal_(0.5 if k.endswith("weight") else 0.0, 0.1)
    torch.manual_seed(2)
    tv = dict(src.state_dict())
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    tv["bn1.num_batches_tracked"] = torch.tensor(7)
    dst = ResNet("resnet18")
    dst.load_torchvision_state_dict(tv)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(ValueError, match="state_dict"):
        ResNet("resnet34").load_torchvision_state_dict(tv)
    with pytest.raises(ValueError, match="shape"):
        ResNet("resnet18").load_torchvision_state_dict({**tv, "conv1.weight": torch.zeros(1)})


def test_dilated_resnet_matches_torchvision_replace_stride_with_dilation():
    """DC5: ResNet(depth, dilation=True) is torchvision's replace_stride_with_dilation=[F, F, T]
    with the same weights (BatchNorm in eval mode = frozen BatchNorm, eps 1e-5)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(
        weights=None, replace_stride_with_dilation=[False, False, True]
    )
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 0.5)
            m.bias.data.normal_(0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    tv.eval()
    ours = ResNet("resnet50", dilation=True)
    ours.load_torchvision_state_dict(tv.state_dict())
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        y = tv.layer4(tv.layer3(tv.layer2(tv.layer1(y))))
        out = ours(x)
        plain = ResNet("resnet50")
        plain.load_torchvision_state_dict(tv.state_dict())
        undilated = plain(x)
    assert out.shape == y.shape == (1, 2048, 4, 5) and ours.stride == 16
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-4)
    assert undilated.shape == (1, 2048, 2, 3) and plain.stride == 32
    with pytest.raises(ValueError, match="dilation"):
        ResNet("resnet34", dilation=True)


def test_backbone_mask_is_downsampled_to_the_feature_map():
    model = DETR(_tiny_config())
    images, mask = _batch(h=32, w=40, pad_cols=16)
    feats, fmask = model.backbone(images, mask)
    assert feats.shape[-2:] == fmask.shape[-2:] == (8, 10)
    assert fmask[1, :, 6:].all() and not fmask[1, :, :6].any() and not fmask[0].any()

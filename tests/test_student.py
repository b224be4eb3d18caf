"""AmalgamationStudent / build_student (docs/method.md §2) and a student+SA+TA overfit step."""

from __future__ import annotations

import pytest
import torch
from ka_rs.losses.sa import AggregationHintLoss, SequenceAmalgamationLoss
from ka_rs.losses.ta import TaskAmalgamationLoss
from ka_rs.models.detr import DETR, DetrConfig
from ka_rs.models.student import AmalgamationStudent, build_student, slot_attention_mask

D = 16


def _cfg(num_classes: int = 2, **kw) -> DetrConfig:
    fields = dict(
        num_classes=num_classes,
        backbone="small_cnn",
        cnn_channels=(8, 16),  # stride 4
        hidden_dim=D,
        nheads=2,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=32,
        dropout=0.0,
        num_queries=6,
    )
    fields.update(kw)
    return DetrConfig(**fields)


def _images(b: int = 2, h: int = 16, w: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1, :, -8:] = True  # image 1 padded on the right: 2 padded feature columns
    return images, mask


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("variant", ["detr", "anchor"])
def test_slots_shapes_and_masks(n, variant):
    teachers = [_cfg(2, variant=variant, num_queries=4 + k) for k in range(n)]
    student = build_student(teachers, num_classes=2 * n).eval()
    assert isinstance(student, AmalgamationStudent) and isinstance(student, DETR)
    assert student.num_slots == n
    assert student.config.num_classes == 2 * n
    assert student.config.num_queries == 4 + n - 1  # the largest teacher query count
    assert student.input_proj.out_channels == n * D
    images, mask = _images()
    out = student(images, mask)
    s = (16 // 4) * (20 // 4)  # tokens per slot
    assert len(out.sequences) == 1 + 2  # projected input + 2 encoder layers
    assert all(seq.shape == (2, n * s, D) for seq in out.sequences)
    k_logits = 2 * n + 1 if variant == "detr" else 2 * n
    assert out.pred_logits.shape == (2, student.num_queries, k_logits)
    assert len(out.aux_outputs) == 1
    # padding mask repeated per slot
    assert out.padding_mask.shape == (2, n * s)
    one = mask[:, ::4, ::4].flatten(1)
    assert torch.equal(out.padding_mask, one.repeat(1, n))
    assert out.padding_mask[1].sum() == n * 2 * 4  # 2 padded columns × 4 rows per slot
    # slot k of the projected input = channel chunk k of the 1×1 projection
    with torch.no_grad():
        proj = student.input_proj(student.backbone(images, mask)[0])
    for k in range(n):
        chunk = proj[:, k * D : (k + 1) * D].flatten(2).transpose(1, 2)
        assert torch.allclose(student.slot(out.sequences[0], k), chunk, atol=1e-6)
    # block-diagonal encoder mask
    attn = student._attn_mask(s, torch.device("cpu"))
    assert attn.shape == (n * s, n * s)
    expected = torch.ones(n * s, n * s, dtype=torch.bool)
    for k in range(n):
        expected[k * s : (k + 1) * s, k * s : (k + 1) * s] = False
    assert torch.equal(attn, expected)
    assert torch.equal(slot_attention_mask(n, s), expected)
    cross = build_student(teachers, 2 * n, cross_slot_attention=True)
    assert cross._attn_mask(s, torch.device("cpu")) is None


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_no_attention_leak_across_slots(n, cross):
    torch.manual_seed(0)
    student = build_student([_cfg() for _ in range(n)], 2 * n, cross_slot_attention=cross).eval()
    images, mask = _images()
    with torch.no_grad():
        feats, fmask = student.backbone(images, mask)
        pos = student.position(fmask)
        enc = student.encoder_input(feats, fmask, pos)
        s = enc.tokens.shape[1] // n
        tokens2 = enc.tokens.clone()
        tokens2[:, s : 2 * s] += torch.randn_like(tokens2[:, s : 2 * s])  # perturb slot 1
        padding = enc.padding_mask
        outs1, _ = student.transformer.encoder(enc.tokens, enc.pos, padding, enc.attn_mask)
        outs2, _ = student.transformer.encoder(tokens2, enc.pos, padding, enc.attn_mask)
    valid = ~padding[:, :s]
    for o1, o2 in zip(outs1, outs2, strict=True):
        slot0_1, slot0_2 = o1[:, :s][valid], o2[:, :s][valid]
        if cross:
            assert not torch.allclose(slot0_1, slot0_2, atol=1e-4)
        else:
            assert torch.allclose(slot0_1, slot0_2, atol=1e-5)
        if n == 3:  # slot 2 likewise
            same = torch.allclose(o1[:, 2 * s :][valid], o2[:, 2 * s :][valid], atol=1e-5)
            assert same != cross


def test_one_slot_student_and_validation():
    teachers = [_cfg(), _cfg()]
    plain = build_student(teachers, 4, num_slots=1)
    assert plain.num_slots == 1 and plain.input_proj.out_channels == D
    images, mask = _images()
    out = plain(images, mask)
    assert out.sequences[0].shape == (2, 20, D)
    assert plain._attn_mask(20, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="adapter"):
        build_student([_cfg(), _cfg(hidden_dim=32, nheads=2)], 4)
    with pytest.raises(ValueError, match="enc_layers"):
        build_student([_cfg(), _cfg(enc_layers=3)], 4)
    with pytest.raises(ValueError, match="strides"):
        build_student([_cfg(), _cfg(cnn_channels=(8, 16, 16))], 4)
    with pytest.raises(ValueError, match="num_slots"):
        build_student(teachers, 4, num_slots=3)
    with pytest.raises(ValueError, match="teacher_configs"):
        build_student([], 4)
    with pytest.raises(ValueError, match="overrides"):
        build_student(teachers, 4, not_a_field=1)
    student = build_student(teachers, 4, variant="anchor", num_queries=9)
    assert student.config.variant == "anchor" and student.num_queries == 9


def _pseudo_targets(teacher_outs, num_classes_per_teacher: int, kind: str = "softmax"):
    """Simple union-space pseudo-targets from disjoint teachers (the top query per teacher)."""
    targets = []
    c_k = num_classes_per_teacher
    u = c_k * len(teacher_outs)
    for b in range(teacher_outs[0].pred_logits.shape[0]):
        labels, boxes, soft = [], [], []
        for k, out in enumerate(teacher_outs):
            logits = out.pred_logits[b]  # (Q, C + 1) softmax / (Q, C) sigmoid
            prob = logits.softmax(-1)[:, :-1] if kind == "softmax" else logits[:, :c_k].sigmoid()
            q = int(prob.max(-1).values.argmax())
            c = int(prob[q].argmax())
            row = torch.full((u + 1,), -5.0)
            lo = k * c_k
            row[lo : lo + c_k] = logits[q, :c_k]
            if kind == "softmax":
                row[u] = logits[q, -1]
            labels.append(lo + c)
            boxes.append(out.pred_boxes[b, q])
            soft.append(row)
        targets.append(
            {
                "labels": torch.tensor(labels),
                "boxes": torch.stack(boxes),
                "soft_logits": torch.stack(soft),
            }
        )
    return targets


@pytest.mark.parametrize("variant", ["detr", "anchor"])
def test_student_sa_ta_overfit_step_decreases_loss(variant):
    torch.manual_seed(0)
    teachers = [DETR(_cfg(2, variant=variant)).eval() for _ in range(2)]
    for t in teachers:
        t.requires_grad_(False)
    student = build_student([t.config for t in teachers], num_classes=4)
    assert student.config.variant == variant
    images, mask = _images(seed=1)
    with torch.no_grad():
        t_outs = [t(images, mask) for t in teachers]
    head = student.config.class_head
    targets = _pseudo_targets(t_outs, 2, head)
    sa = SequenceAmalgamationLoss()
    ta = TaskAmalgamationLoss(num_classes=4, class_head=head)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)

    def step():
        out = student(images, mask)
        sa_loss = sa(out, t_outs)["loss"]
        ta_loss = ta(out, targets)["loss"]
        return sa_loss, ta_loss

    losses = []
    for _ in range(10):
        sa_loss, ta_loss = step()
        loss = sa_loss + ta_loss
        losses.append((loss.item(), sa_loss.item(), ta_loss.item()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for t in teachers for p in t.parameters())
    first, last = losses[0], losses[-1]
    # the anchor variant's boxes start from zero-initialised deltas and move more slowly
    assert last[0] < (0.7 if variant == "detr" else 0.85) * first[0], losses
    assert last[1] < first[1] and last[2] < first[2], losses


def test_aggregation_student_step_trains_projection():
    torch.manual_seed(0)
    teachers = [DETR(_cfg(2)).eval(), DETR(_cfg(2)).eval()]
    student = build_student([t.config for t in teachers], num_classes=4, num_slots=1)
    images, mask = _images()
    with torch.no_grad():
        t_outs = [t(images, mask) for t in teachers]
    agg = AggregationHintLoss(num_teachers=2, hidden_dim=D, num_points=3)
    opt = torch.optim.AdamW([*student.parameters(), *agg.parameters()], lr=1e-3)
    before = [p.detach().clone() for p in agg.parameters()]
    out = agg(student(images, mask), t_outs)
    out["loss"].backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, agg.parameters(), strict=True))


@pytest.mark.parametrize("student_variant", ["detr", "anchor"])
def test_end_to_end_with_build_pseudo_targets(student_variant):
    """Real label space + Rust pseudo-targets from a softmax and a sigmoid teacher (overlapping
    class sets) feed TA on either student head; SA on the same step; gradients flow."""
    from ka_rs.labels import LabelSpace, build_pseudo_targets

    torch.manual_seed(0)
    space = LabelSpace.from_teachers({"a": ["cat", "dog"], "b": ["dog", "car"]})
    teachers = [DETR(_cfg(2, variant="detr")).eval(), DETR(_cfg(2, variant="anchor")).eval()]
    kinds = ["softmax", "sigmoid"]
    images, mask = _images(seed=2)
    with torch.no_grad():
        t_outs = [t(images, mask) for t in teachers]
    targets = build_pseudo_targets(space, t_outs, kinds=kinds, threshold=0.0, top_n=5)
    assert all(t["soft_logits"].shape[1] == space.num_classes + 1 for t in targets)
    assert sum(len(t["labels"]) for t in targets) > 0
    student = build_student(
        [t.config for t in teachers], space.num_classes, variant=student_variant
    )
    out = student(images, mask)
    ta = TaskAmalgamationLoss(
        space.num_classes, class_head=student.config.class_head, teacher_kinds=kinds
    )
    loss = SequenceAmalgamationLoss()(out, t_outs)["loss"] + ta(out, targets)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert student.class_embed.weight.grad.abs().sum() > 0
    assert student.input_proj.weight.grad.abs().sum() > 0


# -- per-slot encoder (the default for no-cross students) -------------------------------------

_VARIANTS = {
    "detr": {"variant": "detr"},
    "anchor": {"variant": "anchor", "box_prior": True},
    "two_stage": {"variant": "anchor", "box_prior": True, "dense_aux": True, "two_stage": True},
}


def _encoder_calls(student):
    """Record the (tokens shape, attn_mask given) of every encoder call of ``student``."""
    calls = []

    def hook(module, args):
        src, attn_mask = args[0], args[3] if len(args) > 3 else None
        calls.append((tuple(src.shape), attn_mask is not None))

    return calls, student.transformer.encoder.register_forward_pre_hook(hook)


def _flat_outputs(out) -> dict[str, torch.Tensor]:
    flat = {"pred_logits": out.pred_logits, "pred_boxes": out.pred_boxes}
    for i, aux in enumerate(out.aux_outputs):
        flat[f"aux{i}_logits"], flat[f"aux{i}_boxes"] = aux["pred_logits"], aux["pred_boxes"]
    for i, seq in enumerate(out.sequences):
        flat[f"sequence{i}"] = seq
    for key, value in (out.enc_outputs or {}).items():
        if value.is_floating_point():
            flat[f"enc_{key}"] = value
    return flat


@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize("n", [2, 3])
def test_per_slot_encoder_matches_the_masked_encoder(n, variant):
    """Per-slot and masked encoders give the same predictions, sequences (every SA hook
    point), auxiliary outputs and gradients, with padding; the per-slot one runs N·B sequences
    of S tokens without an attention mask."""
    import copy

    torch.manual_seed(n)
    teachers = [_cfg(2, **_VARIANTS[variant]) for _ in range(n)]
    per_slot = build_student(teachers, num_classes=2 * n)
    assert per_slot.slot_encoder == "per_slot"  # the default
    masked = copy.deepcopy(per_slot)
    masked.slot_encoder = "masked"
    images, mask = _images(b=3, seed=n)
    s = (16 // 4) * (20 // 4)
    outs, grads = [], []
    for model in (per_slot, masked):
        calls, handle = _encoder_calls(model)
        out = model(images, mask)  # train mode (dropout 0): gradients below
        handle.remove()
        expected = (3 * n, s, D) if model is per_slot else (3, n * s, D)
        assert calls == [(expected, model is masked)]
        flat = _flat_outputs(out)
        # a loss touching every output, so every parameter's gradient is compared
        g = torch.Generator().manual_seed(0)
        loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in flat.values())
        model.zero_grad()
        loss.backward()
        outs.append({k: v.detach() for k, v in flat.items()})
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) >= 7
    for key in outs[0]:
        assert outs[0][key].shape == outs[1][key].shape, key
        assert torch.allclose(outs[0][key], outs[1][key], atol=1e-5, rtol=1e-4), key
    assert grads[0].keys() == grads[1].keys()
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in grads[0]
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-4, rtol=1e-3), key


@pytest.mark.parametrize("cross", [False, True])
def test_slot_encoder_choice_only_changes_the_no_cross_student(cross):
    """With cross-slot attention (or one slot) both settings run the one full encoder."""
    n = 2
    student = build_student([_cfg()] * n, 4, cross_slot_attention=cross).eval()
    images, mask = _images()
    calls, handle = _encoder_calls(student)
    with torch.no_grad():
        student(images, mask)
        student.slot_encoder = "masked"
        student(images, mask)
    handle.remove()
    if cross:
        assert calls == [((2, n * 20, D), False)] * 2
    else:
        assert calls == [((2 * n, 20, D), False), ((2, n * 20, D), True)]
    one = build_student([_cfg()] * n, 4, num_slots=1)
    calls, handle = _encoder_calls(one)
    one(images, mask)
    handle.remove()
    assert calls == [((2, 20, D), False)]
    with pytest.raises(ValueError, match="slot_encoder"):
        build_student([_cfg()] * n, 4, slot_encoder="blocky")


def test_per_slot_encoder_under_bf16_autocast_matches_masked():
    """Mixed precision (attention in float32 under autocast) works per slot too."""
    import copy

    torch.manual_seed(0)
    per_slot = build_student([_cfg(2, **_VARIANTS["two_stage"])] * 2, 4).eval()
    masked = copy.deepcopy(per_slot)
    masked.slot_encoder = "masked"
    images, mask = _images(seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = per_slot(images, mask), masked(images, mask)
    for seq_a, seq_b in zip(a.sequences, b.sequences, strict=True):
        assert seq_a.dtype == torch.bfloat16 and torch.isfinite(seq_a.float()).all()
        assert torch.allclose(seq_a.float(), seq_b.float(), atol=0.05, rtol=0.05)
    assert torch.allclose(a.pred_boxes.float(), b.pred_boxes.float(), atol=0.02)

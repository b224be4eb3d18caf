"""The compact student (``amalgamation.student_layout = "compact"``, an extension): its encoder
sees one teacher's S tokens, SA reaches each teacher through per-teacher views, and it trains
with AmalgamationStep, saves and loads like the slot student."""

from __future__ import annotations

import pytest
import torch
from ka_rs import AmalgamationStep, build_amalgamation_student
from ka_rs.data import ShapesDataset, collate_fn, get_split, make_transforms
from ka_rs.engine.amalgamate import load_student
from ka_rs.engine.amalgamate_config import load_amalgamate_config
from ka_rs.engine.checkpoint import save_checkpoint
from ka_rs.engine.config import ConfigError
from ka_rs.losses.sa import SequenceAmalgamationLoss
from ka_rs.models import build_model
from ka_rs.models.student import (
    AmalgamationStudent,
    CompactAmalgamationStudent,
    CompactStudentOutput,
    build_student,
)
from ka_rs.teachers import DetrTeacher

TINY = {
    "hidden_dim": 32,
    "nheads": 2,
    "dim_feedforward": 64,
    "num_queries": 8,
    "cnn_channels": [8, 16, 16],  # stride 8: a 4×4 grid at 32 px
    "enc_layers": 2,
    "dec_layers": 2,
}
SPLIT = get_split("shapes-halves")
S = 16  # tokens per teacher at 32 px


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _detr(name: str, seed: int) -> DetrTeacher:
    torch.manual_seed(seed)
    names = list(SPLIT[name])
    model = build_model("anchor_tiny", len(names), **TINY)
    with torch.no_grad():  # some confident queries, so that TA has pseudo-targets
        model.class_embed.bias.add_(torch.linspace(0, 4, model.class_embed.bias.numel()))
    return DetrTeacher(model, names, source=f"<{name}>", name=name, image_size=32)


def _teachers() -> list[DetrTeacher]:
    return [_detr("teacher_a", 0), _detr("teacher_b", 1)]


def _batch(n: int = 4, pad: bool = True):
    ds = ShapesDataset("train", n, image_size=32, seed=0, transforms=make_transforms("val", 32))
    images, mask, targets = collate_fn([ds[i] for i in range(n)])
    if pad:  # image 1 padded on the right: one padded token column
        mask = mask.clone()
        mask[1, :, -8:] = True
    return images, mask, targets


def _encoder_shapes(model) -> tuple[list[tuple[int, ...]], object]:
    shapes: list[tuple[int, ...]] = []
    handle = model.transformer.encoder.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape))
    )
    return shapes, handle


def test_compact_student_builds_and_its_encoder_sees_one_teachers_tokens():
    teachers = _teachers()
    student = build_amalgamation_student(teachers, student_layout="compact")
    slots = build_amalgamation_student(teachers)
    assert isinstance(student, CompactAmalgamationStudent) and student.layout == "compact"
    assert type(slots) is AmalgamationStudent and slots.layout == "slots"
    assert student.num_slots == 2 and student.input_proj.out_channels == 2 * 32
    images, mask, _ = _batch()
    shapes, handle = _encoder_shapes(student)
    out = student(images, mask)  # train mode: teacher views computed
    handle.remove()
    assert shapes == [(4, S, 32)]  # ONE teacher's token count
    assert isinstance(out, CompactStudentOutput)
    assert [tuple(s.shape) for s in out.sequences] == [(4, S, 32)] * 3
    assert out.padding_mask.shape == (4, S) and int(out.padding_mask[1].sum()) == 4
    assert [tuple(v.shape) for v in out.teacher_views] == [(4, 2 * S, 32)] * 3
    # view 0 = the unmerged chunks of the input projection (the slot layout)
    with torch.no_grad():
        proj = student.input_proj(student.backbone(images, mask)[0])  # (B, 2·d, 4, 4)
    for k in range(2):
        chunk = proj[:, k * 32 : (k + 1) * 32].flatten(2).transpose(1, 2)
        assert torch.allclose(student.slot(out.teacher_views[0], k), chunk, atol=1e-6)
    # the merge starts as the chunks' average; the heads start at the identity
    avg = (proj[:, :32] + proj[:, 32:]).flatten(2).transpose(1, 2) / 2
    assert torch.allclose(out.sequences[0], avg, atol=1e-5)
    assert torch.allclose(student.slot(out.teacher_views[2], 1), out.sequences[2], atol=1e-6)
    # eval mode: no views (inference skips the heads), same predictions
    student.eval()
    with torch.no_grad():
        inf = student(images, mask)
    assert inf.teacher_views is None and torch.allclose(inf.pred_boxes, out.pred_boxes, atol=1e-6)
    with pytest.raises(ValueError, match=r"student\.train\(\)"):
        SequenceAmalgamationLoss()(inf, [t(images, mask) for t in teachers])
    # it is smaller at inference than the slot student only in the encoder's work, not weights
    n_compact = sum(p.numel() for p in student.parameters())
    n_slots = sum(p.numel() for p in slots.parameters())
    heads = sum(p.numel() for p in student.sa_heads.parameters())
    merge = sum(p.numel() for p in student.slot_merge.parameters())
    assert n_compact == n_slots + heads + merge


def test_compact_student_from_init_from_reproduces_that_teacher():
    teachers = _teachers()
    student = build_amalgamation_student(teachers, student_layout="compact", init_from="teacher_b")
    images, mask, _ = _batch()
    student.eval()
    with torch.no_grad():
        s_out, t_out = student(images, mask), teachers[1](images, mask)
    # (predictions differ: the union class heads also hold teacher_a's rows, which changes the
    # two-stage query selection; the encoder is the teacher's)
    for s_seq, t_seq in zip(s_out.sequences, t_out.sequences, strict=True):
        assert torch.allclose(s_seq, t_seq, atol=1e-5)
    # SA to teacher_b starts at zero: its chunk and its identity heads copy it exactly
    student.train()
    out = student(images, mask)
    sa_b = SequenceAmalgamationLoss()(out, [t_out, t_out])["loss"].detach()
    sa_a = SequenceAmalgamationLoss()(out, [teachers[0](images, mask)] * 2)["loss"].detach()
    assert float(sa_b) < 1e-8 < float(sa_a)


def test_compact_student_trains_with_sa_and_ta_and_its_losses_decrease():
    teachers = _teachers()
    torch.manual_seed(0)
    student = build_amalgamation_student(teachers, student_layout="compact")
    step = AmalgamationStep(teachers, student.config, threshold=0.05)
    assert step.num_slots == 2 and step.sa_teachers == [0, 1]
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    images, mask, targets = _batch()
    heads_before = student.sa_heads[0][0].weight.detach().clone()
    merge_before = student.slot_merge.weight.detach().clone()
    rows = []
    for _ in range(8):
        out = step(student, images, mask, targets)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        rows.append((out["loss"].item(), out["loss_sa"].item(), out["loss_ta"].item()))
    first, last = rows[0], rows[-1]
    assert last[0] < 0.8 * first[0], rows
    assert last[1] < first[1] and last[2] < first[2], rows
    assert not torch.equal(heads_before, student.sa_heads[0][0].weight)
    assert not torch.equal(merge_before, student.slot_merge.weight)
    assert all(p.grad is None for t in teachers for p in t.parameters())


def test_compact_step_under_bf16_autocast():
    teachers = _teachers()
    student = build_amalgamation_student(teachers, student_layout="compact", init_from="teacher_a")
    images, mask, _ = _batch()
    full = AmalgamationStep(teachers, student.config, threshold=0.05)(student, images, mask)
    out = AmalgamationStep(teachers, student.config, threshold=0.05, amp="bf16")(
        student, images, mask
    )
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert float(out["loss_sa"]) == pytest.approx(float(full["loss_sa"]), rel=0.1, abs=1e-3)
    out["loss"].backward()
    assert student.sa_heads[1][1].weight.grad is not None


def test_compact_checkpoint_saves_and_loads(tmp_path):
    teachers = _teachers()
    torch.manual_seed(3)
    student = build_amalgamation_student(teachers, student_layout="compact")
    with torch.no_grad():  # make every new weight differ from its initialisation
        student.slot_merge.weight.normal_()
        for heads in student.sa_heads:
            for head in heads:
                head.weight.add_(0.1 * torch.randn_like(head.weight))
    step = AmalgamationStep(teachers, student.config)
    meta = {  # what ka_rs.engine.amalgamate records for a student
        "num_slots": student.num_slots,
        "cross_slot_attention": student.cross_slot_attention,
        "teachers": [t.name for t in teachers],
        "teacher_classes": {t.name: list(t.class_names) for t in teachers},
        "teacher_checkpoints": {t.name: t.source for t in teachers},
        "sa_teachers": [t.name for t in teachers],
    }
    path = save_checkpoint(
        tmp_path / "checkpoint.pt",
        model=student,
        class_names=list(step.label_space.names),
        kind="student",
        extra={"student": meta},
    )
    loaded = load_student(path).model
    assert isinstance(loaded, CompactAmalgamationStudent) and not loaded.training
    assert loaded.state_dict().keys() == student.state_dict().keys()
    images, mask, _ = _batch()
    student.eval()
    with torch.no_grad():
        a, b = student(images, mask), loaded(images, mask)
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    # an explicit layout in the metadata is honoured (and checked)
    path2 = save_checkpoint(
        tmp_path / "c2.pt",
        model=student,
        class_names=list(step.label_space.names),
        kind="student",
        extra={"student": {**meta, "layout": "compact"}},
    )
    assert isinstance(load_student(path2).model, CompactAmalgamationStudent)
    slots = build_amalgamation_student(teachers)
    path3 = save_checkpoint(
        tmp_path / "c3.pt",
        model=slots,
        class_names=list(step.label_space.names),
        kind="student",
        extra={"student": meta},
    )
    assert type(load_student(path3).model) is AmalgamationStudent


def test_layout_option_in_the_config_and_the_builders():
    base = ["train.output_dir=/tmp/x"]
    cfg = load_amalgamate_config(None, [*base, "amalgamation.student_layout=compact"])
    assert cfg.amalgamation.student_layout == "compact"
    assert load_amalgamate_config(None, base).amalgamation.student_layout == "slots"
    with pytest.raises(ConfigError, match="student_layout: must be one of"):
        load_amalgamate_config(None, [*base, "amalgamation.student_layout=packed"])
    for clash in ("amalgamation.sa=false", "amalgamation.cross_slot_attention=true"):
        with pytest.raises(ConfigError, match="compact"):
            load_amalgamate_config(None, [*base, "amalgamation.student_layout=compact", clash])
    teachers = _teachers()
    with pytest.raises(ValueError, match="student_layout: expected one of"):
        build_amalgamation_student(teachers, student_layout="packed")
    with pytest.raises(ValueError, match="aggregation"):
        build_amalgamation_student(teachers, student_layout="compact", aggregation=True)
    with pytest.raises(ValueError, match="cross_slot_attention"):
        build_amalgamation_student(teachers, student_layout="compact", cross_slot_attention=True)
    # one SA teacher: nothing to compact, the one-slot student
    one = build_student([teachers[0].detr_config], 4, layout="compact")
    assert type(one) is AmalgamationStudent and one.num_slots == 1
    with pytest.raises(ValueError, match="N >= 2"):
        CompactAmalgamationStudent(teachers[0].detr_config, 1)
    three = build_student([teachers[0].detr_config] * 3, 6, layout="compact").train()
    images, mask, _ = _batch(2)
    out = three(images, mask)
    assert [tuple(v.shape) for v in out.teacher_views] == [(2, 3 * S, 32)] * 3


def test_engine_trains_a_compact_student_and_loads_it(tmp_path):
    import json

    from ka_rs.engine.amalgamate import amalgamate
    from ka_rs.engine.checkpoint import load_checkpoint

    teachers = _teachers()
    cfg = load_amalgamate_config(
        None,
        [
            "data.num_train_images=8",
            "data.num_val_images=4",
            "data.image_size=32",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.progress=false",
            "train.plot=false",
            "amalgamation.threshold=0.05",
            "amalgamation.student_layout=compact",
            f"train.output_dir={json.dumps(str(tmp_path / 'run'))}",
        ],
    )
    res = amalgamate(cfg, teachers=teachers)
    assert res.step == 2
    assert load_checkpoint(res.checkpoint)["student"].get("layout") == "compact"
    assert isinstance(load_student(res.checkpoint).model, CompactAmalgamationStudent)

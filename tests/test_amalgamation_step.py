"""AmalgamationStep: the one object a user's loop and the engine both call; which teachers SA
covers (TA-only teachers), where the student's architecture comes from, non-class slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ka_rs import AmalgamationStep, build_amalgamation_student, load_teacher
from ka_rs.data import ShapesDataset, collate_fn, get_split, make_transforms
from ka_rs.engine.amalgamate import amalgamate, load_student
from ka_rs.engine.amalgamate_config import load_amalgamate_config
from ka_rs.engine.checkpoint import load_checkpoint, save_checkpoint
from ka_rs.engine.logging import read_metrics
from ka_rs.models import build_model
from ka_rs.teachers import DetrTeacher, Teacher

TINY = {
    "hidden_dim": 32,
    "nheads": 2,
    "dim_feedforward": 64,
    "num_queries": 8,
    "cnn_channels": [8, 16, 16, 32],
    "enc_layers": 1,
    "dec_layers": 2,
}
SPLIT = get_split("shapes-halves")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _detr(name: str, seed: int, names: list[str | None] | None = None, **overrides) -> DetrTeacher:
    torch.manual_seed(seed)
    names = names or list(SPLIT[name])
    model = build_model("anchor_tiny", len(names), **{**TINY, **overrides})
    with torch.no_grad():  # some confident queries, so that TA has pseudo-targets
        model.class_embed.bias.add_(torch.linspace(0, 4, model.class_embed.bias.numel()))
    return DetrTeacher(model, names, source=f"<{name}>", name=name, image_size=32)


class _Foreign(torch.nn.Module):
    """A detector that is no ka_rs DETR (like a transformers model): predictions only."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.inner = build_model("anchor_tiny", num_classes, **TINY)

    def forward(self, images, mask=None):
        out = self.inner(images, mask)
        return {"pred_logits": out.pred_logits + 3.0, "pred_boxes": out.pred_boxes}


def _foreign(name: str) -> Teacher:
    torch.manual_seed(7)
    return Teacher(
        _Foreign(len(SPLIT[name])), list(SPLIT[name]), "sigmoid", source="<x>", name=name
    )


def _batch(n: int = 4):
    ds = ShapesDataset("train", n, image_size=32, seed=0, transforms=make_transforms("val", 32))
    return collate_fn([ds[i] for i in range(n)])


def test_a_users_own_loop_trains_the_student_with_the_step():
    teachers = [_detr("teacher_a", 0), _detr("teacher_b", 1)]
    student = build_amalgamation_student(teachers, init_from="teacher_b")
    step = AmalgamationStep(teachers, student.config, threshold=0.05)
    assert step.num_slots == student.num_slots == 2 and step.sa_teachers == [0, 1]
    assert step.coverage() == "SA covers teacher_a, teacher_b"
    optimizer = torch.optim.AdamW([*student.parameters(), *step.trainable_parameters()], lr=1e-3)
    images, mask, targets = _batch()
    before = [p.detach().clone() for p in student.parameters()]
    losses = []
    for _ in range(3):
        out = step(student, images, mask, targets)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"].detach()))
        assert {"loss_ta", "loss_sa", "pseudo_per_image", "w_amg"} <= set(out)
        assert out["pseudo_per_image"] > 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert all(not p.requires_grad and p.grad is None for t in teachers for p in t.parameters())


def test_a_teacher_without_matching_sequences_is_ta_only():
    # teacher_b: a foreign detector; teacher_c: a ka_rs DETR of another width
    c_names = ["cross", "ring"]
    teachers = [
        _detr("teacher_a", 0),
        _foreign("teacher_b"),
        _detr("t_c", 2, c_names, hidden_dim=48),
    ]
    student = build_amalgamation_student(teachers)
    assert student.num_slots == 1  # only teacher_a's sequences fit the student
    step = AmalgamationStep(teachers, student.config, threshold=0.05)
    assert step.sa_teachers == [0]
    assert step.coverage() == "SA covers teacher_a; TA-only: teacher_b, t_c"
    images, mask, targets = _batch()
    out = step(student, images, mask, targets)
    assert "loss_sa" in out and out["loss"].requires_grad
    out["loss"].backward()
    # a step with SA off says so; aggregation needs an SA teacher
    assert AmalgamationStep(teachers, student.config, sa=False).coverage() == "SA off"
    foreign = [_foreign("teacher_a"), _foreign("teacher_b")]
    with pytest.raises(ValueError, match="preset"):
        build_amalgamation_student(foreign)
    s2 = build_amalgamation_student(foreign, overrides={"preset": "anchor_tiny", **TINY})
    step2 = AmalgamationStep(foreign, s2.config)
    assert step2.coverage().startswith("SA covers no teacher (all TA-only")
    with pytest.raises(ValueError, match="aggregation"):
        AmalgamationStep(foreign, s2.config, sa=False, aggregation=True)


def test_student_architecture_errors_name_the_option():
    teachers = [_detr("teacher_a", 0), _foreign("teacher_b")]
    with pytest.raises(ValueError, match="init_from: teacher 'teacher_b'"):
        build_amalgamation_student(teachers, init_from="teacher_b")
    with pytest.raises(ValueError, match="is not a teacher"):
        build_amalgamation_student(teachers, init_from="nobody")
    with pytest.raises(ValueError, match="unknown preset"):
        build_amalgamation_student([_foreign("teacher_a")], overrides={"preset": "detr_r9000"})
    student = build_amalgamation_student(teachers)
    with pytest.raises(ValueError, match="union has"):
        AmalgamationStep([teachers[0]], student.config)
    with pytest.raises(ValueError, match="unknown amalgamation option"):
        AmalgamationStep(teachers, student.config, treshold=0.2)
    with pytest.raises(ValueError, match="appear more than once"):
        AmalgamationStep([teachers[0], _detr("teacher_a", 3)], student.config)
    step = AmalgamationStep(teachers, student.config, mode="label_assisted")
    images, mask, _ = _batch(2)
    with pytest.raises(ValueError, match="label-assisted mode needs the ground truth"):
        step(student, images, mask)


def test_coco_style_head_with_non_class_slots_never_yields_na(tmp_path):
    """A 91-slot-like head: slots marked None keep their logits but are never classes."""
    names_a = [None, "circle", None, "square", "triangle", None, "star"]
    a = _detr("teacher_a", 0, names_a)
    with torch.no_grad():  # make the non-class slots the most confident: they must not count
        a.model.class_embed.bias[[0, 2, 5]] += 20.0
    b = _detr("teacher_b", 1)
    student = build_amalgamation_student([a, b])
    step = AmalgamationStep([a, b], student.config, threshold=0.05)
    assert None not in step.label_space.names and len(step.label_space.names) == 8
    images, mask, targets = _batch()
    from ka_rs.labels import build_pseudo_targets

    pseudo = build_pseudo_targets(
        step.label_space, step.run_teachers(images, mask), **step._pseudo_kwargs
    )
    assert all(((p["labels"] >= 0) & (p["labels"] < 8)).all() for p in pseudo)
    from_a = torch.cat([p["labels"][p["teacher"] == 0] for p in pseudo])
    assert set(from_a.tolist()) <= {0, 1, 2, 3}  # circle, square, triangle, star only


def test_engine_trains_with_a_ta_only_teacher_and_records_coverage(tmp_path, capfd):
    path_a = tmp_path / "a.pt"
    a = _detr("teacher_a", 0)
    save_checkpoint(
        path_a,
        model=a.model,
        class_names=list(a.class_names),
        config={"model": {"preset": "anchor_tiny"}, "data": {"image_size": 32}},
    )
    cfg = load_amalgamate_config(
        None,
        [
            "data.num_train_images=8",
            "data.num_val_images=4",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.progress=false",
            "train.plot=false",
            "train.log_every_steps=1",
            "amalgamation.threshold=0.05",
            f"train.output_dir={json.dumps(str(tmp_path / 'run'))}",
        ],
    )
    teachers = [load_teacher(path_a, name="teacher_a"), _foreign("teacher_b")]
    res = amalgamate(cfg, teachers=teachers)
    assert "SA covers teacher_a; TA-only: teacher_b" in capfd.readouterr().err
    assert res.sa_coverage == "SA covers teacher_a; TA-only: teacher_b" and res.step == 2
    rows = read_metrics(Path(res.output_dir) / "metrics.jsonl", "train")
    assert len(rows) == 2 and all("loss_sa" in r and "loss_ta" in r for r in rows)
    meta = load_checkpoint(res.checkpoint)["student"]
    assert meta["sa_teachers"] == ["teacher_a"] and meta["num_slots"] == 1
    assert load_student(res.checkpoint).model.num_slots == 1


@pytest.mark.parametrize("builder", ["save_tiny_deformable_detr", "save_tiny_rt_detr"])
def test_cli_amalgamates_with_a_hugging_face_ta_teacher(tmp_path, capfd, builder):
    """`ka-rs amalgamate` with a ka_rs DETR teacher and a tiny transformers Deformable-DETR /
    RT-DETR folder (a TA-only teacher run by transformers itself) trains two steps."""
    pytest.importorskip("transformers")
    import hf_models
    from ka_rs.cli import main

    path_a = tmp_path / "a.pt"
    a = _detr("teacher_a", 0)
    save_checkpoint(
        path_a,
        model=a.model,
        class_names=list(a.class_names),
        config={"model": {"preset": "anchor_tiny"}, "data": {"image_size": 32}},
    )
    hf_dir = getattr(hf_models, builder)(
        tmp_path / "hf", {i: n for i, n in enumerate(SPLIT["teacher_b"])}
    )
    out = tmp_path / "run"
    code = main(
        [
            "amalgamate",
            "--teacher",
            f"teacher_a={path_a}",
            "--teacher",
            f"teacher_b=hf:{hf_dir}",
            "--set",
            "data.num_train_images=4",
            "--set",
            "data.num_val_images=2",
            "--set",
            "data.image_size=32",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.log_every_steps=1",
            "--set",
            "train.plot=false",
            "--set",
            "amalgamation.threshold=0.01",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "SA covers teacher_a; TA-only: teacher_b" in captured.err
    summary = json.loads(captured.out)
    assert summary["step"] == 2 and summary["sa_coverage"].endswith("TA-only: teacher_b")
    rows = read_metrics(out / "metrics.jsonl", "train")
    assert len(rows) == 2 and all(r["pseudo_per_image"] > 0 for r in rows)
    meta = load_checkpoint(out / "checkpoint.pt")["student"]
    assert meta["teacher_checkpoints"]["teacher_b"] == f"hf:{hf_dir}"


def test_step_under_bf16_autocast_gives_float32_losses_close_to_fp32():
    teachers = [_detr("teacher_a", 0), _detr("teacher_b", 1)]
    student = build_amalgamation_student(teachers, init_from="teacher_b")
    images, mask, targets = _batch()
    full = AmalgamationStep(teachers, student.config, threshold=0.05)(student, images, mask)
    half = AmalgamationStep(teachers, student.config, threshold=0.05, amp="bf16")
    out = half(student, images, mask)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert float(out["loss_sa"]) == pytest.approx(float(full["loss_sa"]), rel=0.1, abs=1e-3)
    out["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in student.parameters())
    with pytest.raises(ValueError, match="amp"):
        AmalgamationStep(teachers, student.config, amp="fp8")

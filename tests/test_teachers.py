"""The teacher interface and sources: class names with non-class slots, source parsing and
its errors, ka_rs checkpoints as teachers, ``ka-rs convert`` / ``evaluate`` on sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ka_rs import LabelSpace, build_pseudo_targets, load_teacher
from ka_rs.cli import main
from ka_rs.engine.checkpoint import save_checkpoint
from ka_rs.models import build_model
from ka_rs.teachers import NON_CLASS, DetrTeacher, SourceError, Teacher, parse_source
from ka_rs.teachers.sources import read_class_names

TINY = {
    "hidden_dim": 32,
    "nheads": 2,
    "dim_feedforward": 64,
    "num_queries": 6,
    "cnn_channels": [8, 16, 16, 32],
    "enc_layers": 1,
    "dec_layers": 2,
}


def _checkpoint(path: Path, names: list[str | None], preset: str = "detr_tiny") -> Path:
    torch.manual_seed(0)
    model = build_model(preset, len(names), **TINY)
    save_checkpoint(
        path,
        model=model,
        class_names=names,  # type: ignore[arg-type]
        config={"model": {"preset": preset}, "data": {"image_size": 32}},
    )
    return path


# ---------------------------------------------------------------------------------------------
# the interface


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = build_model("detr_tiny", 3, **TINY)
    t = DetrTeacher(model, ["a", None, "c"], source="x")
    assert all(not p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    assert t.classes == ("a", "c") and t.num_logits == 4 and t.head == "softmax"
    assert t.has_sequences and t.detr_config is model.config
    out = t(torch.randn(2, 3, 32, 32))
    assert out.pred_logits.shape == (2, 6, 4) and out.sequences


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([None, None, None], "no classes"),
        (["a", "a", "b"], "listed twice"),
        (["a", "", "b"], "non-empty string"),
        (["a", "b"], "2 class names for a head with 3 classes"),
    ],
)
def test_teacher_rejects_bad_class_names(names, message):
    with pytest.raises(ValueError, match=message):
        DetrTeacher(build_model("detr_tiny", 3, **TINY), names, source="x")


def test_a_generic_detector_is_a_ta_only_teacher():
    class Dense(torch.nn.Module):
        """Any detector: pred_logits / pred_boxes as a dict, no encoder sequences."""

        def forward(self, images, mask=None):
            b = images.shape[0]
            return {"pred_logits": torch.zeros(b, 5, 2), "pred_boxes": torch.full((b, 5, 4), 0.5)}

    t = Teacher(Dense(), ["x", "y"], "sigmoid", source="mine")
    out = t(torch.zeros(3, 3, 16, 16))
    assert out.pred_logits.shape == (3, 5, 2) and out.sequences == []
    assert not t.has_sequences and t.num_logits == 2
    with pytest.raises(ValueError, match="head"):
        Teacher(Dense(), ["x"], "softmaxx")


# ---------------------------------------------------------------------------------------------
# non-class slots in the label space and the pseudo-targets


def test_non_class_slots_never_enter_the_union_or_the_pseudo_targets():
    space = LabelSpace.from_teachers({"coco": [None, "person", None, "car"], "b": ["car", "dog"]})
    assert space.names == ("person", "car", "dog")
    assert space.local_to_union("coco").tolist() == [-1, 0, -1, 1]
    assert space.classes("coco") == (None, "person", None, "car")
    assert space.is_overlapping
    # queries whose largest logit is on a non-class slot: the best real class decides
    logits = torch.tensor(
        [[[9.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 3.0, 0.0], [0.0, 4.0, 0.0, 0.0, 0.0]]]
    )
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3])
    b_logits = torch.tensor([[[-9.0, -9.0, 9.0]] * 2])  # teacher b: background everywhere
    pseudo = build_pseudo_targets(
        space,
        {
            "coco": {"pred_logits": logits, "pred_boxes": boxes},
            "b": {"pred_logits": b_logits, "pred_boxes": boxes[:, :2]},
        },
        threshold=0.0,
        nms_iou=None,
    )[0]
    assert sorted(pseudo["labels"].tolist()) == [0, 0, 1]  # person, person, car; never -1
    # the teacher's own softmax (over all 5 logits) gives the scores
    p = logits[0].softmax(-1)
    expected = sorted([p[0, 1].item(), p[1, 3].item(), p[2, 1].item()], reverse=True)
    np.testing.assert_allclose(pseudo["scores"].tolist(), expected, rtol=1e-5)
    # soft rows hold the real classes' logits only (non-class slots are not written)
    row = pseudo["soft_logits"][pseudo["scores"].argmax()]
    assert row[2].item() == -5.0  # dog: not the coco teacher's class


def test_label_space_refuses_a_teacher_of_only_non_class_slots():
    with pytest.raises(ValueError, match="no classes"):
        LabelSpace.from_teachers({"a": [None, None], "b": ["x"]})


# ---------------------------------------------------------------------------------------------
# sources


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("runs/a/checkpoint.pt", ("", "runs/a/checkpoint.pt")),
        ("detr:/m/detr-r50.pth", ("detr", "/m/detr-r50.pth")),
        ("DETR-DC5:/m/x.pth", ("detr-dc5", "/m/x.pth")),
        ("hf:facebook/detr-resnet-50", ("hf", "facebook/detr-resnet-50")),
        ("C:/models/a.pt", ("", "C:/models/a.pt")),  # a drive letter is not a prefix
    ],
)
def test_parse_source(text, expected):
    assert parse_source(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zoo:/m/a.pth", "unknown teacher source prefix 'zoo'"),
        ("detr:", "nothing after"),
        ("", "empty"),
    ],
)
def test_parse_source_errors(text, message):
    with pytest.raises(SourceError, match=message):
        parse_source(text)


def test_read_class_names_from_lists_and_files(tmp_path):
    assert read_class_names(["a", NON_CLASS, "b"]) == ["a", None, "b"]
    txt = tmp_path / "c.txt"
    txt.write_text("# my classes\ncat\n\nN/A\ndog\n")
    assert read_class_names(txt) == ["cat", None, "dog"]
    js = tmp_path / "c.json"
    js.write_text('["x", "y"]')
    assert read_class_names(str(js)) == ["x", "y"]
    js.write_text('{"x": 1}')
    with pytest.raises(SourceError, match="JSON list"):
        read_class_names(js)
    with pytest.raises(SourceError, match="does not exist"):
        read_class_names(tmp_path / "none.txt")


def test_ka_rs_checkpoint_teacher_and_renaming(tmp_path):
    ckpt = _checkpoint(tmp_path / "t.pt", ["a", "b", "c"])
    t = load_teacher(ckpt, name="t1")
    assert isinstance(t, DetrTeacher) and t.name == "t1" and t.class_names == ("a", "b", "c")
    assert t.image_size == 32 and t.run_config["data"]["image_size"] == 32
    renamed = load_teacher(str(ckpt), classes=["x", NON_CLASS, "z"])
    assert renamed.class_names == ("x", None, "z")
    with pytest.raises(ValueError, match="2 class names given for a head with 3 classes"):
        load_teacher(str(ckpt), classes=["x", "y"])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{tmp}/missing.pt", "does not exist"),
        ("{tmp}", "is a directory"),
        ("bogus:{tmp}/x", "unknown teacher source prefix"),
    ],
)
def test_missing_and_unknown_sources_are_one_line_cli_errors(tmp_path, capsys, source, message):
    src = source.format(tmp=tmp_path)
    code = main(["evaluate", "--checkpoint", src, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ka-rs evaluate: error:") and message in err
    assert len(err.splitlines()) == 1


def test_convert_round_trip_and_evaluate_a_converted_teacher(tmp_path, capsys):
    src = _checkpoint(tmp_path / "src.pt", ["circle", None, "square"])
    dest = tmp_path / "converted.pt"
    assert main(["convert", str(src), str(dest)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"] == str(dest) and summary["num_classes"] == 2
    a, b = load_teacher(src), load_teacher(dest)
    assert b.class_names == ("circle", None, "square") and b.image_size == 32
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(b(images).pred_logits, a(images).pred_logits)
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(dest),
            "--data",
            "shapes",
            "--split",
            "val",
            "--num-images",
            "4",
            "--json",
            "-",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class"]) <= {"circle", "square"}  # the N/A slot is never a class

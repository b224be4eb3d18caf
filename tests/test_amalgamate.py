"""Amalgamation engine: config, teachers frozen, student init, losses switches, label-assisted
schedule, aggregation projection trained, resume exactness, CLI errors, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ka_rs.amalgamation import init_student_from_teacher
from ka_rs.cli import main
from ka_rs.data import get_split
from ka_rs.engine.amalgamate import amalgamate, load_student, load_teachers
from ka_rs.engine.amalgamate_config import AmalgamateConfig, load_amalgamate_config
from ka_rs.engine.checkpoint import load_checkpoint, save_checkpoint
from ka_rs.engine.config import ConfigError, dump_toml
from ka_rs.engine.logging import read_metrics
from ka_rs.labels import LabelSpace
from ka_rs.losses import TaskAmalgamationLoss
from ka_rs.models import AmalgamationStudent, build_model, build_student

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
    """Tiny models: one intra-op thread is as fast and does not oversubscribe a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save_teacher(
    path: Path, name: str, seed: int, variant: str = "anchor", **overrides: object
) -> Path:
    torch.manual_seed(seed)
    preset = "anchor_tiny" if variant == "anchor" else "detr_tiny"
    model = build_model(preset, len(SPLIT[name]), **{**TINY, **overrides})
    with torch.no_grad():  # make some queries confident so that TA gets pseudo-targets
        model.class_embed.bias.add_(torch.linspace(0, 4, model.class_embed.bias.numel()))
    save_checkpoint(
        path,
        model=model,
        class_names=list(SPLIT[name]),
        config={"model": {"preset": preset}, "data": {"image_size": 32}},
    )
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("teachers")
    return {
        name: str(_save_teacher(d / f"{name}.pt", name, seed))
        for seed, name in enumerate(("teacher_a", "teacher_b"))
    }


def run_config(out: Path, teachers: dict[str, str], *extra: str) -> AmalgamateConfig:
    return load_amalgamate_config(
        None,
        [
            "data.num_train_images=16",
            "data.num_val_images=4",
            "train.batch_size=4",
            "train.epochs=1",
            "train.progress=false",
            "train.plot=false",
            "train.log_every_steps=1",
            "train.seed=3",
            "amalgamation.threshold=0.05",
            f"train.output_dir={json.dumps(str(out))}",
            *extra,
        ],
        [f"{k}={v}" for k, v in teachers.items()],
    )


# ---------------------------------------------------------------------------------------------
# config


def test_config_defaults_overrides_and_toml_round_trip(tmp_path):
    cfg = load_amalgamate_config(
        None,
        ["amalgamation.sa=false", "amalgamation.student.num_queries=12", "optim.lr=3e-4"],
        ["a=/x/a.pt", "b=/x/b.pt"],
    )
    assert cfg.teachers == {"a": "/x/a.pt", "b": "/x/b.pt"}
    assert not cfg.amalgamation.sa and cfg.amalgamation.ta
    assert cfg.amalgamation.student == {"num_queries": 12}
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.output_dir == "runs/student"
    # the paper's defaults (docs/method.md §6)
    a = AmalgamateConfig().amalgamation
    assert (a.threshold, a.top_n, a.fill_logit, a.temperature, a.eos_coef) == (
        0.1,
        50,
        -5.0,
        4.0,
        0.1,
    )
    assert a.mode == "label_free" and not a.cross_slot_attention
    path = tmp_path / "amg.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    assert load_amalgamate_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "teachers", "message"),
    [
        (["amalgamation.sa_wieght=2"], [], "amalgamation.sa_wieght"),
        (["amalgamation.top_n=abc"], [], "amalgamation.top_n"),
        (["amalgamation.aggregation=true"], [], "set amalgamation.sa = false"),
        (["amalgamation.mode=semi"], [], "amalgamation.mode"),
        (["model.preset=detr_r50"], [], "no [model] section"),
        (["train.batch_sise=2"], [], "train.batch_sise"),
        ([], ["noequals"], "NAME=SOURCE"),
        ([], ["a=x.pt", "a=y.pt", "b=z.pt"], "teacher .a. is given twice"),
        (["amalgamation.sa=false", "amalgamation.ta=false"], [], "nothing to train"),
    ],
)
def test_config_errors_name_the_key(overrides, teachers, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_amalgamate_config(None, overrides, teachers)


def test_one_teacher_is_rejected(teachers, tmp_path):
    cfg = run_config(tmp_path, {"teacher_a": teachers["teacher_a"]})
    with pytest.raises(ConfigError, match="at least 2 teachers"):
        amalgamate(cfg)


def test_missing_teacher_file_names_the_teacher(teachers, tmp_path):
    cfg = run_config(tmp_path, {**teachers, "teacher_c": str(tmp_path / "nope.pt")})
    with pytest.raises(ValueError, match=r"teachers\.teacher_c: .*does not exist"):
        amalgamate(cfg)


def test_cli_amalgamate_user_errors(teachers, capsys):
    assert main(["amalgamate", "--teacher", f"a={teachers['teacher_a']}"]) == 2
    assert "at least 2 teachers" in capsys.readouterr().err
    args = ["amalgamate", *[f"--teacher={k}={v}" for k, v in teachers.items()]]
    assert main([*args, "--set", "amalgamation.nope=1"]) == 2
    assert "amalgamation.nope" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# student initialisation (extension)


# the anchor variant without and with its optional aids (the preset has them all), and plain DETR
_PLAIN = {"box_prior": False, "dense_aux": False, "two_stage": False}
_VARIANTS = [
    ("anchor", _PLAIN),
    ("detr", {}),
    ("anchor", {**_PLAIN, "box_prior": True, "dense_aux": True}),
    ("anchor", {"box_prior": True, "dense_aux": True, "two_stage": True}),
]


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize(("variant", "extra"), _VARIANTS)
def test_student_initialised_from_a_teacher_reproduces_it(tmp_path, cross, variant, extra):
    paths = {
        n: str(_save_teacher(tmp_path / f"{n}.pt", n, s, variant, **extra))
        for s, n in enumerate(("teacher_a", "teacher_b"))
    }
    ts = load_teachers(paths)
    space = LabelSpace.from_teachers({t.name: t.class_names for t in ts})
    student = build_student(
        [t.model.config for t in ts],
        space.num_classes,
        cross,
        **({"dense_aux": True} if extra.get("dense_aux") else {}),
    )
    fresh = init_student_from_teacher(student, ts[0], space, ts)
    assert fresh == []
    student.eval()
    images = torch.randn(2, 3, 48, 64)
    mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    mask[1, :, 48:] = True
    with torch.no_grad():
        s_out, t_out = student(images, mask), ts[0].model(images, mask)
    cols = space.local_to_union("teacher_a").tolist()
    if extra.get("two_stage"):
        # the student's queries are chosen by its dense scores over the whole union (teacher
        # B's rows too), so its predictions differ from A's: compare the SA sequences only
        pass
    elif variant == "detr":
        cols = [*cols, space.background_index]
        # the other teacher's foreground logits are extra columns in the softmax: compare
        # probabilities renormalised over the teacher's own columns
        s_p = s_out.pred_logits[..., cols].softmax(-1)
        torch.testing.assert_close(s_p, t_out.pred_logits.softmax(-1), atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(
            s_out.pred_logits[..., cols], t_out.pred_logits, atol=1e-5, rtol=1e-4
        )
    if not extra.get("two_stage"):
        torch.testing.assert_close(s_out.pred_boxes, t_out.pred_boxes, atol=1e-5, rtol=1e-4)
    # every slot starts as the teacher's sequence
    s_len = t_out.sequences[0].shape[1]
    for s_seq, t_seq in zip(s_out.sequences, t_out.sequences, strict=True):
        for k in range(2):
            torch.testing.assert_close(
                s_seq[:, k * s_len : (k + 1) * s_len], t_seq, atol=1e-5, rtol=1e-4
            )
    # the other teacher's classes take their rows from that teacher's class head
    b_cols = space.local_to_union("teacher_b").tolist()
    torch.testing.assert_close(
        student.class_embed.weight[b_cols], ts[1].model.class_embed.weight[: len(b_cols)]
    )
    if extra.get("dense_aux"):  # the dense encoder head too (per token, sigmoid)
        a_cols = space.local_to_union("teacher_a").tolist()
        s_enc = s_out.enc_outputs["pred_logits"]
        t_enc = t_out.enc_outputs["pred_logits"]
        torch.testing.assert_close(s_enc[:, :s_len, a_cols], t_enc, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s_enc[:, s_len:, a_cols], t_enc, atol=1e-5, rtol=1e-4)


def test_student_of_dense_aux_teachers_has_no_dense_head_by_default():
    # the dense head learns from ground truth only; a label-free student would leave it
    # without gradients (DistributedDataParallel rejects that)
    cfg = build_model("anchor_tiny", 2, **{**TINY, "dense_aux": True, "two_stage": False}).config
    assert build_student([cfg, cfg], 4).config.dense_aux is False
    student = build_student([cfg, cfg], 4, dense_aux=True)
    assert student.config.dense_aux is True


def test_two_stage_student_keeps_its_dense_heads_and_ta_trains_every_parameter():
    # a two-stage student needs the dense head to pick its queries; TA trains it (and the
    # dense box head) on the pseudo-targets, so a label-free step reaches every parameter
    extra = {"box_prior": True, "dense_aux": True, "two_stage": True}
    cfg = build_model("anchor_tiny", 2, **{**TINY, **extra}).config
    student = build_student([cfg, cfg], 4)
    assert student.config.two_stage and student.config.dense_aux
    out = student(torch.randn(2, 3, 32, 32))
    # one proposal per token of both slots
    assert out.enc_outputs["pred_boxes"].shape[:2] == out.padding_mask.shape
    pseudo = [
        {
            "labels": torch.tensor([0, 3]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
            "soft_logits": torch.randn(2, 5),
        },
        {
            "labels": torch.tensor([1]),
            "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
            "soft_logits": torch.randn(1, 5),
        },
    ]
    losses = TaskAmalgamationLoss(4, class_head="sigmoid")(out, pseudo)
    assert {"loss_dense", "loss_dense_bbox", "loss_dense_giou"} <= set(losses)
    losses["loss"].backward()
    dead = [n for n, p in student.named_parameters() if p.grad is None]
    assert not dead, dead
    no_dense = TaskAmalgamationLoss(4, class_head="sigmoid", weight_dense=0.0)(out, pseudo)
    assert "loss_dense" not in no_dense


# ---------------------------------------------------------------------------------------------
# training runs


def test_label_free_run_writes_outputs_and_leaves_teachers_untouched(teachers, tmp_path):
    before = {k: load_checkpoint(v)["model"] for k, v in teachers.items()}
    cfg = run_config(tmp_path, teachers, "train.max_steps=3", "train.eval_every_steps=2")
    res = amalgamate(cfg)
    assert res.stopped_by == "max_steps" and res.step == 3
    assert res.class_names == [*SPLIT["teacher_a"], *SPLIT["teacher_b"]]
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.toml", "metrics.jsonl", "checkpoint.pt", "eval.json"} <= files
    # the run records its resolved config: the image size comes from the first teacher
    assert cfg.data.image_size == 0
    cfg.data.image_size = 32
    assert load_amalgamate_config(tmp_path / "config.toml") == cfg
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("loss", "loss_sa", "loss_ta", "loss_ta_class", "pseudo_per_image", "grad_norm"):
        assert all(key in r for r in train), key
    assert all(r["w_amg"] == 1.0 and "loss_gt" not in r for r in train)
    assert any(r["pseudo_per_image"] > 0 for r in train)
    evals = read_metrics(tmp_path / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [2, 3]
    for key in ("AP50", "teacher_a/AP50", "teacher_b/AP", "teacher_b/AP75"):
        assert key in evals[-1]
    assert set(res.final_eval) >= {"AP", "AP50", "teacher_a/AP50", "teacher_b/AP50"}
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert set(summary["subsets"]) == {"all", "teacher_a", "teacher_b"}

    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["kind"] == "student" and ckpt["student"]["num_slots"] == 2
    assert ckpt["student"]["teacher_classes"]["teacher_b"] == SPLIT["teacher_b"]
    det = load_student(tmp_path / "checkpoint.pt")
    assert isinstance(det.model, AmalgamationStudent) and det.model.num_slots == 2
    assert not det.model.cross_slot_attention
    # teachers: frozen, never updated
    for name, path in teachers.items():
        after = load_checkpoint(path)["model"]
        assert all(torch.equal(before[name][k], after[k]) for k in after)
    with pytest.raises(ValueError, match="not a student"):
        load_student(teachers["teacher_a"])


def test_loss_switches(teachers, tmp_path):
    res = amalgamate(
        run_config(tmp_path / "ta", teachers, "train.max_steps=2", "amalgamation.sa=false")
    )
    train = read_metrics(res.output_dir / "metrics.jsonl", "train")
    assert all("loss_ta" in r and "loss_sa" not in r for r in train)
    res = amalgamate(
        run_config(
            tmp_path / "sa",
            teachers,
            "train.max_steps=2",
            "amalgamation.ta=false",
            "amalgamation.cross_slot_attention=true",
        )
    )
    train = read_metrics(res.output_dir / "metrics.jsonl", "train")
    assert all("loss_sa" in r and "loss_ta" not in r for r in train)
    assert all(r["loss"] == pytest.approx(r["loss_sa"]) for r in train)
    det = load_student(res.output_dir / "checkpoint.pt")
    assert det.model.cross_slot_attention


def test_aggregation_baseline_trains_its_projection(teachers, tmp_path):
    cfg = run_config(
        tmp_path,
        teachers,
        "train.max_steps=3",
        "amalgamation.sa=false",
        "amalgamation.aggregation=true",
    )
    res = amalgamate(cfg, keep_model=True)
    assert res.model is not None and res.model.num_slots == 1
    assert res.hint is not None
    d = res.model.config.hidden_dim
    init = (torch.eye(d) / 2).repeat(1, 2)
    for proj in res.hint.projections:
        assert not torch.allclose(proj.weight, init), "the projection was never optimised"
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["student"]["num_slots"] == 1
    for k, v in res.hint.state_dict().items():
        assert torch.equal(ckpt["hint"][k], v)
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert all("loss_hint" in r and "loss_sa" not in r for r in train)


def test_label_assisted_mode_decays_the_amalgamation_weight(teachers, tmp_path):
    cfg = run_config(tmp_path, teachers, "train.epochs=2", "amalgamation.mode=label_assisted")
    amalgamate(cfg)
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert all("loss_gt" in r for r in train)
    # E = 2 epochs of 4 steps: w_amg = 1 - e/E
    assert [r["w_amg"] for r in train] == [1.0] * 4 + [0.5] * 4


def test_stop_and_resume_equals_uninterrupted(teachers, tmp_path):
    full = run_config(tmp_path / "full", teachers, "train.max_steps=4", "train.eval_every_epochs=0")
    amalgamate(full)
    part = run_config(tmp_path / "part", teachers, "train.max_steps=2", "train.eval_every_epochs=0")
    amalgamate(part)
    part.train.max_steps = 4
    amalgamate(part, resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_amalgamate_and_evaluate_a_student(teachers, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "amalgamate",
        *[f"--teacher={k}={v}" for k, v in teachers.items()],
        "--output",
        str(out),
        "--no-progress",
        "--set",
        "data.num_train_images=8",
        "--set",
        "data.num_val_images=4",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.plot=false",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["teachers"] == ["teacher_a", "teacher_b"]
    # resume from the checkpoint's own config, with one more step
    assert (
        main(["amalgamate", "--resume", str(out / "checkpoint.pt"), "--set", "train.max_steps=3"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["step"] == 3
    # ka-rs evaluate rebuilds the student from its checkpoint
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--data",
                "shapes",
                "--num-images",
                "4",
                "--subsets",
                "shapes-halves",
                "--json",
                "-",
                "--no-progress",
            ]
        )
        == 0
    )
    ev = json.loads(capsys.readouterr().out)
    assert set(ev["subsets"]) == {"all", "teacher_a", "teacher_b"}


def test_torchrun_two_processes_keep_student_and_hint_in_sync(teachers, tmp_path):
    """DDP syncs the student; the aggregation projection (outside DDP) is all-reduced too."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys, torch
            from ka_rs.engine.amalgamate import amalgamate
            from ka_rs.engine.amalgamate_config import load_amalgamate_config
            cfg = load_amalgamate_config(None, {
                json.dumps(
                    [
                        "data.num_train_images=16",
                        "data.num_val_images=4",
                        "train.batch_size=2",
                        "train.max_steps=3",
                        "train.progress=false",
                        "train.plot=false",
                        "train.device=cpu",
                        "amalgamation.sa=false",
                        "amalgamation.aggregation=true",
                        "amalgamation.threshold=0.05",
                        f"train.output_dir={json.dumps(str(tmp_path / 'out'))}",
                    ]
                )
            }, {json.dumps([f"{k}={v}" for k, v in teachers.items()])})
            res = amalgamate(cfg, keep_model=True)
            hint = {{"hint." + k: v for k, v in res.hint.state_dict().items()}}
            state = {{**res.model.state_dict(), **hint}}
            torch.save(state, sys.argv[1] + f"/rank{{os.environ['RANK']}}.pt")
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--standalone",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize(
    ("name", "split", "source", "recipe"),
    [
        ("voc-10+10", "voc-10+10", "voc", (200, [150], 4 * 8)),
        ("coco-40+40", "coco-40+40", "coco", (60, [50], 3 * 8)),
    ],
)
def test_paper_split_configs_are_the_papers_recipes(name, split, source, recipe):
    """The paper's label-assisted recipes; teachers named as detr: sources with the split's
    classes in head order; the label-free variant is one override away."""
    from ka_rs.engine.amalgamate_config import teacher_specs

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    cfg = load_amalgamate_config(path)
    cfg.validate()
    specs = teacher_specs(cfg.teachers)
    assert {k: v["classes"] for k, v in specs.items()} == get_split(split)
    assert all(v["source"].startswith("detr:") for v in specs.values())
    assert cfg.data.source == source and cfg.data.image_size == 800
    a = cfg.amalgamation
    assert a.sa and a.ta and not a.aggregation and not a.cross_slot_attention
    assert a.mode == "label_assisted" and a.nms_iou < 0 and a.threshold == 0.1
    epochs, drop, total_batch = recipe
    assert (cfg.train.epochs, cfg.optim.lr_drop, cfg.train.batch_size * 8) == (
        epochs,
        drop,
        total_batch,
    )
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.clip_max_norm) == (1e-4, 1e-5, 0.1)
    free = load_amalgamate_config(path, ["amalgamation.mode=label_free"])
    assert free.amalgamation.mode == "label_free"


def test_teacher_cache_matches_live_teachers(teachers, tmp_path):
    """Cached teacher outputs give the losses that live teachers give on the same images."""
    fixed = ("data.flip=false", "data.color_jitter=0.0", "data.scales=[32]")
    live = amalgamate(run_config(tmp_path / "live", teachers, "train.max_steps=2", *fixed))
    cached = amalgamate(
        run_config(
            tmp_path / "cached", teachers, "train.max_steps=2", "amalgamation.cache_teachers=true"
        )
    )
    a = read_metrics(live.output_dir / "metrics.jsonl", "train")
    b = read_metrics(cached.output_dir / "metrics.jsonl", "train")
    for ra, rb in zip(a, b, strict=True):
        assert rb["pseudo_per_image"] == ra["pseudo_per_image"]
        assert rb["loss_ta"] == pytest.approx(ra["loss_ta"], rel=1e-4)
        assert rb["loss_sa"] == pytest.approx(ra["loss_sa"], rel=2e-3)  # float16 sequences
    # the run records the fixed-image data settings it trained with
    cfg = load_amalgamate_config(cached.output_dir / "config.toml")
    assert (cfg.data.flip, cfg.data.color_jitter, cfg.data.scales) == (False, 0.0, [32])


def test_teacher_cache_refuses_images_of_several_sizes(teachers, tmp_path):
    from ka_rs.engine.teacher_cache import TeacherCache

    ts = load_teachers(teachers)
    items = [
        (torch.zeros(3, 32, 32), {"image_id": 1}),
        (torch.zeros(3, 32, 48), {"image_id": 2}),
    ]
    with pytest.raises(ConfigError, match="one size"):
        TeacherCache.build(ts, items)

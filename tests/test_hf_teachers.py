"""``hf:`` teacher sources: transformers DETR-family folders, loaded offline with random weights.

DETR converts into ka_rs's DETR and must give transformers' outputs (padded batch, eval mode);
the other detectors run inside transformers and must receive the pixels their own image
processor gives.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from hf_models import (  # noqa: E402
    save_tiny_conditional_detr,
    save_tiny_dab_detr,
    save_tiny_deformable_detr,
    save_tiny_detr,
    save_tiny_rt_detr,
    save_tiny_rt_detr_v2,
)
from ka_rs.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from ka_rs.models import BACKBONES, DETR  # noqa: E402
from ka_rs.teachers import DetrTeacher, SourceError, load_teacher  # noqa: E402
from ka_rs.teachers.hf import HFDetectorTeacher  # noqa: E402

TOL = 1e-5
H, W = 64, 96


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(raw [0, 1] pixels, ka_rs pixels, mask)``: 2 images, the second one 30×40 padded to
    64×96 (ka_rs pads with zeros after standardising; mask True = padded)."""
    gen = torch.Generator().manual_seed(1)
    raw = torch.rand(2, 3, H, W, generator=gen)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[1, 30:, :] = True
    mask[1, :, 40:] = True
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    images = ((raw - mean) / std).masked_fill(mask[:, None], 0.0)
    return raw, images, mask


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _variant(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of folder ``src`` (weights linked, not copied) with config.json fields changed."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def detr_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DETR-R50 folders in both backbone layouts (built once for the module)."""
    root = tmp_path_factory.mktemp("hf_detr")
    return {
        "hf-resnet": save_tiny_detr(root / "hf-resnet", timm_backbone=False),
        "timm": save_tiny_detr(root / "timm", timm_backbone=True, seed=1),
    }


def _hf_detr(folder: Path) -> torch.nn.Module:
    return transformers.DetrForObjectDetection.from_pretrained(folder).eval()


# -- DETR: converted into ka_rs's DETR ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf-resnet", "timm"])
def test_detr_converts_exactly(detr_dirs: dict[str, Path], layout: str) -> None:
    folder = detr_dirs[layout]
    teacher = load_teacher("hf:" + str(folder), name="t")
    assert isinstance(teacher, DetrTeacher) and teacher.has_sequences
    assert teacher.head == "softmax" and teacher.name == "t"
    assert teacher.class_names == ("cat", None, "dog")  # id2label's "N/A" -> None slot
    assert teacher.image_size == 800  # DetrImageProcessor: size.shortest_edge
    assert teacher.info == {
        "format": "huggingface",
        "model_type": "detr",
        "backbone_layout": layout,
        "backbone": "resnet50",
        "dilation": False,
    }
    cfg = teacher.detr_config
    assert cfg is not None and not cfg.pre_norm and cfg.variant == "detr"
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers) == (32, 4, 1, 2)
    assert (cfg.num_queries, cfg.num_classes, cfg.dim_feedforward) == (5, 3, 48)

    _, images, mask = _batch()
    hf = _hf_detr(folder)
    with torch.no_grad():
        ours = teacher(images, mask)
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long())
        unmasked = teacher(images, None)
    assert ours.pred_logits.shape == (2, 5, 4)
    assert _maxdiff(ours.pred_logits, theirs.logits) < TOL
    assert _maxdiff(ours.pred_boxes, theirs.pred_boxes) < TOL
    assert len(ours.aux_outputs) == 1 and len(ours.sequences) == 2  # input tokens + 1 layer
    # the comparison sees the mask: ignoring it changes the padded image's predictions
    assert _maxdiff(unmasked.pred_logits[1], theirs.logits[1]) > 1e-3


def test_detr_auxiliary_loss_decoder(detr_dirs: dict[str, Path], tmp_path: Path) -> None:
    """transformers' decoder with auxiliary_loss=True re-norms between layers; ka_rs follows."""
    folder = _variant(detr_dirs["hf-resnet"], tmp_path / "aux", auxiliary_loss=True)
    teacher = load_teacher("hf:" + str(folder))
    assert "decoder" in teacher.info and teacher.detr_config.renorm_decoder_layers
    _, images, mask = _batch()
    hf = _hf_detr(folder)
    with torch.no_grad():
        ours = teacher(images, mask)
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long())
        inner = hf.model(pixel_values=images, pixel_mask=(~mask).long())
        aux_logits = hf.class_labels_classifier(inner.intermediate_hidden_states)
        aux_boxes = hf.bbox_predictor(inner.intermediate_hidden_states).sigmoid()
        assert teacher.detr_config is not None
        std_config = dataclasses.replace(teacher.detr_config, renorm_decoder_layers=False)
        plain = DETR(std_config).eval()  # the standard (official DETR) decoder
        plain.load_state_dict(teacher.model.state_dict())
        standard = plain(images, mask)
    assert _maxdiff(ours.pred_logits, theirs.logits) < TOL
    assert _maxdiff(ours.pred_boxes, theirs.pred_boxes) < TOL
    assert len(ours.aux_outputs) == 1
    assert _maxdiff(ours.aux_outputs[0]["pred_logits"], aux_logits[0]) < TOL
    assert _maxdiff(ours.aux_outputs[0]["pred_boxes"], aux_boxes[0]) < TOL
    assert _maxdiff(standard.pred_logits, theirs.logits) > 1e-2  # the difference is real
    # a converted checkpoint keeps the decoder: `ka-rs convert` then load gives HF's outputs
    from ka_rs.teachers.convert import save_teacher_checkpoint

    again = load_teacher(save_teacher_checkpoint(teacher, tmp_path / "aux.pt"))
    with torch.no_grad():
        assert _maxdiff(again(images, mask).pred_logits, theirs.logits) < TOL


def test_detr_resnet101_dc5(tmp_path: Path) -> None:
    """timm ResNet-101 with a dilated last stage (``dilation=True``: output_stride 16)."""
    if "resnet101" not in BACKBONES:
        pytest.skip("ka_rs's DETR has no resnet101 backbone yet")
    folder = save_tiny_detr(
        tmp_path / "r101", timm_backbone=True, backbone="resnet101", dilation=True
    )
    teacher = load_teacher("hf:" + str(folder))
    assert teacher.info["backbone"] == "resnet101" and teacher.info["dilation"] is True
    _, images, mask = _batch()
    hf = _hf_detr(folder)
    with torch.no_grad():
        ours = teacher(images, mask)
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long())
    assert ours.padding_mask is not None and ours.padding_mask.shape == (2, 4 * 6)  # stride 16
    assert _maxdiff(ours.pred_logits, theirs.logits) < TOL
    assert _maxdiff(ours.pred_boxes, theirs.pred_boxes) < TOL


def test_detr_weight_names_and_files(detr_dirs: dict[str, Path], tmp_path: Path) -> None:
    """transformers 5 writes model.safetensors with the 4.x names (``conv_encoder``,
    ``out_proj``, ``fc1``); its modules use the 5.x names (``o_proj``, ``mlp.fc1``). Both
    convert alike, and pytorch_model.bin (read with weights_only=True) like safetensors."""
    from safetensors.torch import load_file

    src = detr_dirs["timm"]
    stored = load_file(src / "model.safetensors")
    assert "model.backbone.conv_encoder.model.conv1.weight" in stored
    assert "model.encoder.layers.0.fc1.weight" in stored
    in_memory = _hf_detr(src).state_dict()
    assert "model.encoder.layers.0.mlp.fc1.weight" in in_memory
    assert "model.encoder.layers.0.self_attn.o_proj.weight" in in_memory
    dst = tmp_path / "bin"
    dst.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(src / name, dst / name)
    torch.save(in_memory, dst / "pytorch_model.bin")
    a = load_teacher("hf:" + str(src)).model.state_dict()
    b = load_teacher("hf:" + str(dst)).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_detr_legacy_config(detr_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A transformers 4.x config.json: ``use_timm_backbone`` / ``backbone`` / ``dilation`` at
    the top, no ``backbone_config`` (5.x turns it into one; the converter reads it either way)."""
    from ka_rs.teachers.hf_detr import convert_hf_detr_state_dict
    from safetensors.torch import load_file

    src = detr_dirs["timm"]
    legacy = {"backbone_config": None, "use_timm_backbone": True, "backbone": "resnet50"}
    folder = _variant(src, tmp_path / "v", dilation=False, **legacy)
    a = load_teacher("hf:" + str(src)).model.state_dict()
    b = load_teacher("hf:" + str(folder)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((src / "config.json").read_text()) | legacy
    cfg, converted, facts = convert_hf_detr_state_dict(config, load_file(src / "model.safetensors"))
    assert facts["backbone_layout"] == "timm" and cfg.backbone == "resnet50"
    assert all(torch.equal(a[k], converted[k]) for k in a)


def test_detr_classes_rename_and_length(detr_dirs: dict[str, Path]) -> None:
    folder = "hf:" + str(detr_dirs["hf-resnet"])
    teacher = load_teacher(folder, classes=["a", "N/A", "c"])
    assert teacher.class_names == ("a", None, "c")
    with pytest.raises(SourceError, match=r"2 class names given for a head with 3 classes"):
        load_teacher(folder, classes=["a", "b"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"position_embedding_type": "learned"}, r"position_embedding_type 'learned'"),
        ({"activation_function": "gelu"}, r"activation_function 'gelu'"),
        ({"architectures": ["DetrForSegmentation"]}, r"DetrForSegmentation"),
        ({"decoder_ffn_dim": 64}, r"encoder_ffn_dim=48 differs from decoder_ffn_dim=64"),
        ({"id2label": {"0": "cat", "1": "dog"}}, r"id2label has 2 entries for a head with 3"),
    ],
)
def test_detr_refuses_what_ka_rs_cannot_reproduce(
    detr_dirs: dict[str, Path], tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    folder = _variant(detr_dirs["hf-resnet"], tmp_path / "v", **changes)
    with pytest.raises(SourceError, match=message) as err:
        load_teacher("hf:" + str(folder))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_detr_refuses_other_pixels(detr_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A converted DETR runs on ka_rs's pixels: another normalisation cannot be honoured."""
    folder = _variant(detr_dirs["hf-resnet"], tmp_path / "v")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").unlink()
    processor |= {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(SourceError, match=r"normalises pixels differently from ka_rs"):
        load_teacher("hf:" + str(folder))


def test_detr_refuses_other_backbones(detr_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = json.loads((detr_dirs["timm"] / "config.json").read_text())
    backbone = dict(config["backbone_config"], backbone="resnext50_32x4d")
    folder = _variant(detr_dirs["timm"], tmp_path / "v", backbone_config=backbone)
    with pytest.raises(SourceError, match=r"timm backbone 'resnext50_32x4d' is not supported"):
        load_teacher("hf:" + str(folder))


# -- the other detectors: run by transformers, TA only ------------------------------------------

DETECTORS: dict[str, tuple[Callable[..., Path], str]] = {
    "conditional_detr": (save_tiny_conditional_detr, "ConditionalDetrForObjectDetection"),
    "deformable_detr": (save_tiny_deformable_detr, "DeformableDetrForObjectDetection"),
    "dab-detr": (save_tiny_dab_detr, "DabDetrForObjectDetection"),
    "rt_detr": (save_tiny_rt_detr, "RTDetrForObjectDetection"),
    "rt_detr_v2": (save_tiny_rt_detr_v2, "RTDetrV2ForObjectDetection"),
}


@pytest.mark.parametrize("model_type", list(DETECTORS))
def test_detector_teacher(tmp_path: Path, model_type: str) -> None:
    save, cls_name = DETECTORS[model_type]
    folder = save(tmp_path / model_type)
    teacher = load_teacher("hf:" + str(folder))
    assert isinstance(teacher, HFDetectorTeacher) and not isinstance(teacher, DetrTeacher)
    assert teacher.head == "sigmoid" and teacher.detr_config is None and not teacher.has_sequences
    assert teacher.class_names == ("cat", None, "dog") and teacher.num_logits == 3
    assert teacher.info["model_type"] == model_type and teacher.info["architecture"] == cls_name
    rt = model_type.startswith("rt_detr")
    assert teacher.image_size == (640 if rt else 800)
    assert teacher.info["pixels"]["do_normalize"] is (not rt)

    raw, images, mask = _batch()
    hf = getattr(transformers, cls_name).from_pretrained(folder).eval()
    with torch.no_grad():
        ours = teacher(images, mask)
        if rt:  # [0, 1] pixels; the padded image's valid 30×40 region resized to 64×96
            pixels = raw.clone()
            pixels[1] = F.interpolate(raw[1:, :, :30, :40], size=(H, W), mode="bilinear")[0]
            theirs = hf(pixel_values=pixels)
        else:  # ImageNet-standardised, zero padding, pixel_mask 1 = valid
            theirs = hf(pixel_values=images, pixel_mask=(~mask).long())
    num_queries = hf.config.num_queries
    assert ours.pred_logits.shape == (2, num_queries, 3)  # no no-object logit
    assert ours.pred_boxes.shape == (2, num_queries, 4)
    assert _maxdiff(ours.pred_logits, theirs.logits) < TOL
    assert _maxdiff(ours.pred_boxes, theirs.pred_boxes) < TOL
    assert ours.sequences == [] and ours.padding_mask is None
    if rt:  # per-layer predictions: the earlier decoder layer
        assert len(ours.aux_outputs) == hf.config.decoder_layers - 1
        assert _maxdiff(ours.aux_outputs[0]["pred_logits"], theirs.intermediate_logits[:, 0]) < TOL

    # the pixels are those the folder's own image processor makes of the same image
    image = (raw[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    expected = processor(images=image, do_resize=False, do_pad=False, return_tensors="pt")
    ka_rs_pixels = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255
        - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_STD)[:, None, None]
    given = teacher.model_inputs(ka_rs_pixels[None])["pixel_values"]
    assert _maxdiff(given, expected["pixel_values"]) < TOL


@pytest.mark.parametrize("model_type", ["deformable_detr", "rt_detr"])
def test_ka_rs_convert_stores_a_ta_only_teacher(tmp_path: Path, model_type: str) -> None:
    """`ka-rs convert hf:DIR DEST` on a TA-only model: the ka_rs checkpoint rebuilds the same
    transformers model (weights, pixels, class names) without the folder."""
    from ka_rs.cli import main

    save, _ = DETECTORS[model_type]
    folder = save(tmp_path / model_type)
    dest = tmp_path / "converted.pt"
    assert main(["convert", "hf:" + str(folder), str(dest)]) == 0
    shutil.rmtree(folder)
    again = load_teacher(dest)
    assert isinstance(again, HFDetectorTeacher) and again.class_names == ("cat", None, "dog")
    assert again.info["model_type"] == model_type and again.detr_config is None
    _, images, mask = _batch()
    save(tmp_path / "fresh")  # the same seeded weights, to compare with
    with torch.no_grad():
        ours = again(images, mask)
        reference = load_teacher("hf:" + str(tmp_path / "fresh"))(images, mask)
    assert _maxdiff(ours.pred_logits, reference.pred_logits) < TOL
    assert _maxdiff(ours.pred_boxes, reference.pred_boxes) < TOL


def test_detector_teacher_classes_and_frozen(tmp_path: Path) -> None:
    folder = save_tiny_rt_detr(tmp_path / "rt", id2label={0: "car", 1: "bus", 2: "N/A"})
    teacher = load_teacher("hf:" + str(folder), classes=["a", "b", "c"])
    assert teacher.class_names == ("a", "b", "c")
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training
    assert load_teacher("hf:" + str(folder)).class_names == ("car", "bus", None)
    with pytest.raises(SourceError, match=r"4 class names given for a head with 3 classes"):
        load_teacher("hf:" + str(folder), classes=["a", "b", "c", "d"])

    # RT-DETR's feature pyramid needs sizes divisible by its coarsest stride (16 here): a
    # 70×100 batch reaches it resized to 80×112, its boxes still relative to the image
    assert isinstance(teacher, HFDetectorTeacher) and teacher.size_divisor == 16
    raw = torch.rand(1, 3, 70, 100, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        ours = teacher((raw - mean) / std, torch.zeros(1, 70, 100, dtype=torch.bool))
        pixels = F.interpolate(raw, size=(80, 112), mode="bilinear")
        theirs = transformers.RTDetrForObjectDetection.from_pretrained(folder).eval()(
            pixel_values=pixels
        )
    assert _maxdiff(ours.pred_logits, theirs.logits) < TOL
    assert _maxdiff(ours.pred_boxes, theirs.pred_boxes) < TOL


# -- errors ---------------------------------------------------------------------------------


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match=r"has no config\.json; expected a folder written by"):
        load_teacher(f"hf:{tmp_path}")


def test_unsupported_model_type(tmp_path: Path) -> None:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2
    )
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(SourceError) as err:
        load_teacher(f"hf:{tmp_path}")
    text = str(err.value)
    assert str(tmp_path) in text and "'resnet'" in text and "rt_detr_v2" in text


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"does not exist"):
        load_teacher(f"hf:{tmp_path / 'absent' / 'model' / 'dir'}")


def test_transformers_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SourceError, match=r'pip install "ka_rs\[hf\]"'):
        load_teacher(f"hf:{tmp_path}")


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as err:
        load_teacher("hf:ka-rs-tests/no-such-detector")
    text = str(err.value)
    assert "'ka-rs-tests/no-such-detector'" in text and "\n" not in text
    assert "could not reach the Hugging Face Hub" in text and "not in the local cache" in text

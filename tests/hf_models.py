"""Tiny random-weight Hugging Face transformers detectors saved with ``save_pretrained``.

Plain helpers (not fixtures) so any test can build a folder for ``load_teacher("hf:" + dir)``.
Each ``save_tiny_*`` writes ``config.json``, ``model.safetensors`` and the model's own
``preprocessor_config.json`` into ``dir`` and returns it; all run offline (no pretrained
weights) and seed torch themselves, so a folder's weights depend only on the arguments.

DETR needs a real ResNet (ka_rs's ResNet has fixed widths); its transformer is tiny. The other
models are tiny throughout (basic-block ResNets of 16–32 channels). Their frozen BatchNorm
statistics are randomised so the backbone is not the identity-like initial one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ID2LABEL",
    "randomise_dense_layers",
    "randomise_frozen_batchnorm",
    "save_tiny_conditional_detr",
    "save_tiny_dab_detr",
    "save_tiny_deformable_detr",
    "save_tiny_detr",
    "save_tiny_rt_detr",
    "save_tiny_rt_detr_v2",
]

#: a small label map with one DETR-style non-class slot
ID2LABEL: dict[int, str] = {0: "cat", 1: "N/A", 2: "dog"}


def randomise_frozen_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Random (but tame) affine parameters and statistics in every frozen BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "FrozenBatchNorm" not in type(module).__name__ and not isinstance(
                module, nn.BatchNorm2d
            ):
                continue
            n = module.weight.shape[0]
            module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
            module.bias.copy_(0.1 * torch.randn(n, generator=gen))
            module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))


def randomise_dense_layers(model: nn.Module, seed: int = 0) -> None:
    """Unit-scale random Linear / Embedding / LayerNorm parameters (transformers initialises
    Linear layers with std 0.02, which makes every output nearly constant and a comparison
    between two implementations nearly blind)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def _labels(id2label: Mapping[int, str]) -> dict[str, object]:
    return {
        "num_labels": len(id2label),
        "id2label": {int(k): v for k, v in id2label.items()},
        "label2id": {v: int(k) for k, v in id2label.items()},
    }


def _save(model: nn.Module, processor: object, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(folder)  # type: ignore[attr-defined]
    processor.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def _tiny_resnet(out_features: list[str]) -> object:
    import transformers

    return transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 24, 32],
        depths=[1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


def save_tiny_detr(
    folder: str | Path,
    id2label: Mapping[int, str] = ID2LABEL,
    *,
    timm_backbone: bool,
    auxiliary_loss: bool = False,
    backbone: str = "resnet50",
    dilation: bool = False,
    seed: int = 0,
) -> Path:
    """``DetrForObjectDetection``: a real ResNet (transformers' own or timm's), d_model 32,
    4 heads, 1 encoder + 2 decoder layers, 5 queries."""
    import transformers

    torch.manual_seed(seed)
    kw: dict[str, object] = {}
    if timm_backbone:
        kw = {"use_timm_backbone": True, "backbone": backbone, "dilation": dilation}
    else:
        depths = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}[backbone]
        kw = {
            "use_timm_backbone": False,
            "backbone_config": transformers.ResNetConfig(depths=depths, out_features=["stage4"]),
        }
    config = transformers.DetrConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=5,
        auxiliary_loss=auxiliary_loss,
        **kw,
        **_labels(id2label),
    )
    model = transformers.DetrForObjectDetection(config)
    randomise_frozen_batchnorm(model, seed)
    randomise_dense_layers(model, seed)
    return _save(model, transformers.DetrImageProcessor(), folder)


def _detr_like(d_model_key: str = "d_model") -> dict[str, object]:
    return {
        d_model_key: 32,
        "encoder_layers": 1,
        "decoder_layers": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "num_queries": 7,
    }


def save_tiny_conditional_detr(
    folder: str | Path, id2label: Mapping[int, str] = ID2LABEL, seed: int = 0
) -> Path:
    """``ConditionalDetrForObjectDetection`` on a 3-stage basic ResNet (16–32 channels)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.ConditionalDetrConfig(
        backbone_config=_tiny_resnet(["stage3"]), **_detr_like(), **_labels(id2label)
    )
    model = transformers.ConditionalDetrForObjectDetection(config)
    randomise_frozen_batchnorm(model, seed)
    randomise_dense_layers(model, seed)
    return _save(model, transformers.ConditionalDetrImageProcessor(), folder)


def save_tiny_deformable_detr(
    folder: str | Path, id2label: Mapping[int, str] = ID2LABEL, seed: int = 0
) -> Path:
    """``DeformableDetrForObjectDetection``: 2 feature levels, 2 sampling points."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeformableDetrConfig(
        backbone_config=_tiny_resnet(["stage2", "stage3"]),
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
        **_detr_like(),
        **_labels(id2label),
    )
    model = transformers.DeformableDetrForObjectDetection(config)
    randomise_frozen_batchnorm(model, seed)
    randomise_dense_layers(model, seed)
    return _save(model, transformers.DeformableDetrImageProcessor(), folder)


def save_tiny_dab_detr(
    folder: str | Path, id2label: Mapping[int, str] = ID2LABEL, seed: int = 0
) -> Path:
    """``DabDetrForObjectDetection`` (its processor is DETR's)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DabDetrConfig(
        backbone_config=_tiny_resnet(["stage3"]),
        **_detr_like("hidden_size"),
        **_labels(id2label),
    )
    model = transformers.DabDetrForObjectDetection(config)
    randomise_frozen_batchnorm(model, seed)
    randomise_dense_layers(model, seed)
    return _save(model, transformers.DetrImageProcessor(), folder)


def _rt_detr_kwargs() -> dict[str, object]:
    import transformers

    return {
        "backbone_config": transformers.RTDetrResNetConfig(
            embedding_size=16,
            hidden_sizes=[16, 24, 32],
            depths=[1, 1, 1],
            layer_type="basic",
            out_indices=[1, 2, 3],
        ),
        "encoder_hidden_dim": 16,
        "encoder_in_channels": [16, 24, 32],
        "feat_strides": [4, 8, 16],
        "encoder_ffn_dim": 32,
        "encoder_attention_heads": 2,
        "d_model": 32,
        "decoder_in_channels": [16, 16, 16],
        "decoder_ffn_dim": 32,
        "decoder_layers": 2,
        "decoder_attention_heads": 2,
        "decoder_n_points": 2,
        "num_queries": 7,
        "num_denoising": 0,
    }


def save_tiny_rt_detr(
    folder: str | Path, id2label: Mapping[int, str] = ID2LABEL, seed: int = 0
) -> Path:
    """``RTDetrForObjectDetection`` (its processor only rescales to [0, 1])."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.RTDetrConfig(**_rt_detr_kwargs(), **_labels(id2label))
    model = transformers.RTDetrForObjectDetection(config)
    randomise_frozen_batchnorm(model, seed)
    randomise_dense_layers(model, seed)
    return _save(model, transformers.RTDetrImageProcessor(), folder)


def save_tiny_rt_detr_v2(
    folder: str | Path, id2label: Mapping[int, str] = ID2LABEL, seed: int = 0
) -> Path:
    """``RTDetrV2ForObjectDetection`` (RT-DETR's processor)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.RTDetrV2Config(**_rt_detr_kwargs(), **_labels(id2label))
    model = transformers.RTDetrV2ForObjectDetection(config)
    randomise_frozen_batchnorm(model, seed)
    randomise_dense_layers(model, seed)
    return _save(model, transformers.RTDetrImageProcessor(), folder)

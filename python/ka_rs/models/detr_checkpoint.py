"""Load facebookresearch/detr checkpoints into ka_rs's :class:`~ka_rs.models.DETR`.

A DETR checkpoint (``detr-r50-*.pth`` from the DETR model zoo, or ``checkpoint.pth`` written by
its ``main.py``) is a dict whose ``"model"`` entry is the state dict; training checkpoints also
hold ``"optimizer"``, ``"lr_scheduler"``, ``"epoch"`` and ``"args"`` (an ``argparse.Namespace``).
The file is read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` is the one extra
type allowed) and nothing in it is executed.

Key map (:data:`DETR_KEY_MAP`, applied top to bottom; the first matching rule wins, ``N`` is a
layer index; a key no rule matches is an error):

==============================================  ==============================================
facebookresearch/detr                           ka_rs
==============================================  ==============================================
``backbone.0.body.<torchvision resnet key>``    ``backbone.body.<same>``
``input_proj.{weight,bias}``                    ``input_proj.{weight,bias}``
``query_embed.weight``                          ``query_embed.weight``
``transformer.encoder.layers.N.<p>``            ``transformer.encoder.layers.N.<p>``
``transformer.encoder.norm.*`` (pre-norm only)  ``transformer.encoder.norm.*``
``transformer.decoder.layers.N.multihead_attn.``  ``transformer.decoder.layers.N.cross_attn.``
``transformer.decoder.layers.N.<p>``            ``transformer.decoder.layers.N.<p>``
``transformer.decoder.norm.*``                  ``transformer.decoder.norm.*``
``class_embed.{weight,bias}``                   ``class_embed.{weight,bias}``
``bbox_embed.layers.{0,1,2}.{weight,bias}``     ``bbox_embed.layers.{0,1,2}.{weight,bias}``
==============================================  ==============================================

``<p>`` is one of ``self_attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}``,
``linear1.*``, ``linear2.*``, ``norm1.*`` .. ``norm3.*`` (same layout in both; ka_rs's attention
is batch-first but ``nn.MultiheadAttention`` keeps the same parameters). BatchNorm
``num_batches_tracked`` counters are dropped and a ``module.`` prefix (DDP) is stripped.

**Pre-norm vs post-norm.** ka_rs's default Transformer is pre-norm (DESIGN §1.1), while DETR's
released models are post-norm (``--pre_norm`` off; their state dict has no
``transformer.encoder.norm``). The loader detects which one a checkpoint is and sets
``DetrConfig.pre_norm`` accordingly, so a converted checkpoint runs **the same architecture**
and reproduces DETR's outputs (same sine encoding, heads and layer order); it does not silently
load post-norm weights into a pre-norm model. Dilated (DC5) and ResNet-101 backbones, and
panoptic-segmentation checkpoints, are rejected with a ``ValueError``.

Inferred from the shapes: ``num_classes`` (``class_embed`` rows − 1), ``hidden_dim``,
``num_queries``, ``enc_layers`` / ``dec_layers``, ``dim_feedforward``, the ResNet depth. The
number of attention heads is not visible in the weights: it comes from the checkpoint's
``args.nheads`` when present, else the ``nheads`` argument (DETR's default 8).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ka_rs.models.detr import DETR, DetrConfig

__all__ = ["DETR_KEY_MAP", "convert_detr_state_dict", "load_detr_checkpoint"]

#: (regex over a facebookresearch/detr key, replacement) — first match wins
DETR_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^backbone\.0\.body\.", "backbone.body."),
    (r"^input_proj\.", "input_proj."),
    (r"^query_embed\.", "query_embed."),
    (r"^transformer\.encoder\.layers\.(\d+)\.", r"transformer.encoder.layers.\1."),
    (r"^transformer\.encoder\.norm\.", "transformer.encoder.norm."),
    (
        r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.",
        r"transformer.decoder.layers.\1.cross_attn.",
    ),
    (r"^transformer\.decoder\.layers\.(\d+)\.", r"transformer.decoder.layers.\1."),
    (r"^transformer\.decoder\.norm\.", "transformer.decoder.norm."),
    (r"^class_embed\.", "class_embed."),
    (r"^bbox_embed\.layers\.", "bbox_embed.layers."),
)

_RESNET_BLOCKS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
}


def _map_key(key: str) -> str | None:
    for pattern, repl in DETR_KEY_MAP:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def _count_layers(keys: list[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _infer_backbone(keys: list[str], where: str) -> str:
    body = "backbone.0.body."
    bottleneck = f"{body}layer1.0.conv3.weight" in keys
    counts = tuple(_count_layers(keys, f"{body}layer{i}.") for i in range(1, 5))
    name = _RESNET_BLOCKS.get((bottleneck, counts))
    if name is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(
            f"{where}: unsupported backbone ({kind} blocks per stage {counts}); ka_rs loads "
            "ResNet-18/34/50 DETR checkpoints"
        )
    return name


def convert_detr_state_dict(
    state_dict: Mapping[str, Tensor],
    nheads: int = 8,
    where: str = "state_dict",
    args: Any = None,
) -> tuple[DetrConfig, dict[str, Tensor]]:
    """Map a facebookresearch/detr ``model`` state dict to a ka_rs config and state dict.

    Args:
        state_dict: the official state dict (keys as in the module docstring).
        nheads: attention heads, used when ``args`` does not say (DETR's default 8).
        where: name used in error messages (the file path).
        args: the checkpoint's ``args`` namespace, if any (``nheads``, ``dropout``,
            ``dilation``, ``masks`` are read from it).

    Returns:
        ``(config, ka_rs_state_dict)``; ``DETR(config).load_state_dict(ka_rs_state_dict)``
        succeeds with ``strict=True``.

    Raises:
        ValueError: missing, unexpected or mis-shaped keys, or an unsupported architecture.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if any(k.startswith("detr.") for k in sd) or any(k.startswith("mask_head.") for k in sd):
        raise ValueError(f"{where}: a DETR panoptic-segmentation checkpoint; not supported")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {bad[:5]}")
    required = (
        "input_proj.weight",
        "query_embed.weight",
        "class_embed.weight",
        "transformer.encoder.layers.0.linear1.weight",
        "transformer.decoder.layers.0.linear1.weight",
        "backbone.0.body.conv1.weight",
    )
    absent = [k for k in required if k not in sd]
    if absent:
        raise ValueError(f"{where}: not a facebookresearch/detr DETR state dict (missing {absent})")
    if args is not None and getattr(args, "dilation", False):
        raise ValueError(f"{where}: dilated (DC5) DETR backbones are not supported")

    mapped: dict[str, Tensor] = {}
    unmatched = []
    for key, value in sd.items():
        new = _map_key(key)
        if new is None:
            unmatched.append(key)
        else:
            mapped[new] = value
    if unmatched:
        raise ValueError(f"{where}: unexpected keys with no ka_rs counterpart: {unmatched[:8]}")

    keys = list(sd)
    config = DetrConfig(
        num_classes=int(sd["class_embed.weight"].shape[0]) - 1,
        backbone=_infer_backbone(keys, where),
        hidden_dim=int(sd["input_proj.weight"].shape[0]),
        nheads=int(getattr(args, "nheads", nheads)),
        enc_layers=_count_layers(keys, "transformer.encoder.layers."),
        dec_layers=_count_layers(keys, "transformer.decoder.layers."),
        dim_feedforward=int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        dropout=float(getattr(args, "dropout", 0.1)),
        num_queries=int(sd["query_embed.weight"].shape[0]),
        variant="detr",
        pre_norm="transformer.encoder.norm.weight" in sd,
    )

    with torch.device("meta"):  # shapes only, no memory
        expected = DETR(config).state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: keys do not match a DETR of the inferred shape "
            f"(missing {missing[:8]}, unexpected {unexpected[:8]})"
        )
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{where}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
    return config, {
        k: v.to(torch.float32) if v.is_floating_point() else v for k, v in mapped.items()
    }


def load_detr_checkpoint(path: str | Path, nheads: int = 8) -> DETR:
    """Build a ka_rs :class:`DETR` from a facebookresearch/detr checkpoint file.

    Args:
        path: the ``.pth`` file (a dict with a ``"model"`` state dict, or the bare state dict).
        nheads: attention heads when the checkpoint has no ``args`` (DETR's default 8).

    Returns:
        The model with the checkpoint's weights, in eval mode, on the CPU. Its
        ``config.pre_norm`` is False for DETR's released (post-norm) models.

    Raises:
        ValueError: the file is missing, truncated or not a PyTorch checkpoint, is not a DETR
            checkpoint, or has missing / unexpected / mis-shaped keys; the message names the
            file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, disallowed global, ...
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint (truncated or foreign file?): {err}"
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    args = obj.get("args")
    state = obj.get("model", obj)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: checkpoint['model'] is {type(state).__name__}, not a dict")
    config, converted = convert_detr_state_dict(state, nheads=nheads, where=str(path), args=args)
    model = DETR(config)
    model.load_state_dict(converted)
    return model.eval()

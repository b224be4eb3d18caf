"""Hugging Face ``DetrForObjectDetection`` weights -> ka_rs's :class:`~ka_rs.models.DETR`.

transformers' DETR is facebookresearch/detr's post-norm DETR under other names, so its weights
convert exactly into ``DetrConfig(variant="detr", pre_norm=False)``. The state dict is read as
stored (no transformers model is built, so a timm-backbone checkpoint converts without timm);
the names of transformers 4.x (``backbone.conv_encoder``, ``out_proj``, ``layers.N.fc1``) are
first renamed to the 5.x ones, as transformers does when it loads them.

Key map (5.x names, ``N`` a layer index; a key no rule matches is an error). Backbone, under
``model.backbone.model.`` -> ``backbone.body.``:

- timm layout: ``<torchvision key>`` -> ``<same>`` (``conv1``, ``bn1``, ``layer1`` .. ``layer4``);
- transformers' ResNet: ``embedder.embedder.convolution`` -> ``conv1``,
  ``embedder.embedder.normalization`` -> ``bn1``,
  ``encoder.stages.S.layers.J.layer.I.convolution`` / ``.normalization`` ->
  ``layer{S+1}.J.conv{I+1}`` / ``bn{I+1}``,
  ``encoder.stages.S.layers.J.shortcut.convolution`` / ``.normalization`` ->
  ``layer{S+1}.J.downsample.0`` / ``.1``.

Transformer, ``model.{encoder,decoder}.layers.N.`` -> ``transformer.{encoder,decoder}.layers.N.``:

- ``self_attn.{q,k,v}_proj.{weight,bias}`` -> ``self_attn.in_proj_{weight,bias}`` (rows q; k; v),
  ``self_attn.o_proj`` -> ``self_attn.out_proj``; the decoder's ``encoder_attn.*`` ->
  ``cross_attn.*`` the same way;
- ``mlp.fc1`` / ``mlp.fc2`` -> ``linear1`` / ``linear2``;
- encoder: ``self_attn_layer_norm`` -> ``norm1``, ``final_layer_norm`` -> ``norm2``; decoder:
  ``self_attn_layer_norm`` -> ``norm1``, ``encoder_attn_layer_norm`` -> ``norm2``,
  ``final_layer_norm`` -> ``norm3`` (post-norm: each follows its residual add, as in ka_rs).

The rest: ``model.decoder.layernorm`` -> ``transformer.decoder.norm``, ``model.input_projection``
-> ``input_proj``, ``model.query_position_embeddings`` -> ``query_embed``,
``class_labels_classifier`` -> ``class_embed`` (C + 1 rows, the last "no object"),
``bbox_predictor.layers.{0,1,2}`` -> ``bbox_embed.layers.{0,1,2}``.

Both backbone layouts of transformers are read: its own ResNet (``use_timm_backbone=False``:
``embedder`` / ``encoder.stages``; ResNet v1.5, stride on the 3×3 convolution, which is what
``downsample_in_bottleneck=False`` builds) and timm's (``use_timm_backbone=True``: torchvision
names). The depth comes from the backbone config (ResNet-18/34/50/101, as ka_rs's ResNet has
them). Dilation follows what transformers runs: a timm backbone with ``output_stride=16`` (what
``DetrConfig(dilation=True)`` sets up) is DC5 and becomes ``DetrConfig.dilation``; transformers'
own ResNet has no dilation, so there ``config.dilation`` has no effect in either library.

What transformers' DETR computes and ka_rs reproduces exactly: the padding mask is
``pixel_mask`` (1 = valid pixel) inverted, downsampled nearest-neighbour like ka_rs's (the same
source pixels, so the same cells); the sine position encoding normalises the cumulative valid
extent with eps 1e-6 and scale 2π over ``d_model // 2`` channels per axis, y first; frozen
BatchNorm and LayerNorm use eps 1e-5; attention scales by ``head_dim ** -0.5``. One behaviour
differs from facebookresearch/detr: with ``config.auxiliary_loss=True`` transformers feeds each
decoder layer the *layer-normed* output of the previous one and layer-norms the last output
twice. Such a model converts with ``DetrConfig.renorm_decoder_layers = True`` (same
parameters, that computation), so its outputs still match, and a converted checkpoint keeps it.

Refused with a :class:`HfDetrError` naming the reason: learned position embeddings, a
non-ReLU activation, unequal encoder/decoder widths or head counts, a backbone other than a
torchvision-layout ResNet of a supported depth, a ResNet v1 (``downsample_in_bottleneck``) or
``downsample_in_first_stage`` backbone, an output stride other than 32 or 16, segmentation
checkpoints (``DetrForSegmentation``: masks head).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ka_rs.models.backbone import BACKBONES
from ka_rs.models.detr import DETR, DetrConfig
from ka_rs.models.weights import state_dict_mismatch

__all__ = [
    "HF_DETR_KEY_MAP",
    "HfDetrError",
    "build_hf_detr",
    "convert_hf_detr_state_dict",
    "rename_legacy_keys",
]


class HfDetrError(ValueError):
    """A transformers DETR checkpoint that ka_rs's DETR cannot reproduce, or a broken one."""


# -- transformers 4.x -> 5.x names ------------------------------------------------------------

_LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.backbone\.conv_encoder\.", ".backbone."),
    (r"\.out_proj\.", ".o_proj."),
    (r"\.layers\.(\d+)\.fc([12])\.", r".layers.\1.mlp.fc\2."),
)


def rename_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename transformers 4.x DETR keys to the 5.x names (5.x keys pass unchanged).

    ``model.backbone.conv_encoder.`` -> ``model.backbone.``, ``.out_proj.`` -> ``.o_proj.``,
    ``layers.N.fc1/fc2`` -> ``layers.N.mlp.fc1/fc2``. BatchNorm ``num_batches_tracked``
    counters are dropped.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key
        for pattern, repl in _LEGACY_RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


# -- the key map --------------------------------------------------------------------------------

_ATTN = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}
_ENC_NORMS = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
_DEC_NORMS = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
}


def _hf_resnet_conv(m: re.Match[str]) -> str:
    stage, block, conv, rest = int(m["s"]), m["j"], int(m["i"]), m["rest"]
    kind = "conv" if m["what"] == "convolution" else "bn"
    return f"backbone.body.layer{stage + 1}.{block}.{kind}{conv + 1}.{rest}"


def _hf_resnet_shortcut(m: re.Match[str]) -> str:
    part = "0" if m["what"] == "convolution" else "1"
    return f"backbone.body.layer{int(m['s']) + 1}.{m['j']}.downsample.{part}.{m['rest']}"


def _layer(m: re.Match[str]) -> str:
    side, n, sub, rest = m["side"], m["n"], m["sub"], m["rest"]
    norms = _ENC_NORMS if side == "encoder" else _DEC_NORMS
    if sub in norms:
        return f"transformer.{side}.layers.{n}.{norms[sub]}.{rest}"
    if sub in ("mlp.fc1", "mlp.fc2"):
        return f"transformer.{side}.layers.{n}.linear{sub[-1]}.{rest}"
    attn, proj = sub.split(".")
    if side == "encoder" and attn != "self_attn":
        raise KeyError(sub)
    target = f"transformer.{side}.layers.{n}.{_ATTN[attn]}"
    if proj == "o_proj":
        return f"{target}.out_proj.{rest}"
    # q/k/v: collected per projection, fused into in_proj_{weight,bias} afterwards
    return f"{target}.in_proj_{rest}#{proj[0]}"


#: (regex over a transformers 5.x key, ka_rs key or a function of the match); first match wins.
#: A ``#q`` / ``#k`` / ``#v`` suffix marks one third of a fused attention input projection.
HF_DETR_KEY_MAP: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (
        r"^model\.backbone\.model\.embedder\.embedder\.convolution\.weight$",
        "backbone.body.conv1.weight",
    ),
    (
        r"^model\.backbone\.model\.embedder\.embedder\.normalization\.(?P<rest>\w+)$",
        r"backbone.body.bn1.\g<rest>",
    ),
    (
        r"^model\.backbone\.model\.encoder\.stages\.(?P<s>\d+)\.layers\.(?P<j>\d+)\.layer\."
        r"(?P<i>\d+)\.(?P<what>convolution|normalization)\.(?P<rest>\w+)$",
        _hf_resnet_conv,
    ),
    (
        r"^model\.backbone\.model\.encoder\.stages\.(?P<s>\d+)\.layers\.(?P<j>\d+)\.shortcut\."
        r"(?P<what>convolution|normalization)\.(?P<rest>\w+)$",
        _hf_resnet_shortcut,
    ),
    (r"^model\.backbone\.model\.(?P<rest>(conv1|bn1|layer[1-4])\..+)$", r"backbone.body.\g<rest>"),
    (r"^model\.input_projection\.(?P<rest>weight|bias)$", r"input_proj.\g<rest>"),
    (r"^model\.query_position_embeddings\.weight$", "query_embed.weight"),
    (
        r"^model\.(?P<side>encoder|decoder)\.layers\.(?P<n>\d+)\."
        r"(?P<sub>self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm|mlp\.fc[12]|"
        r"(self_attn|encoder_attn)\.[qkvo]_proj)\.(?P<rest>weight|bias)$",
        _layer,
    ),
    (r"^model\.decoder\.layernorm\.(?P<rest>weight|bias)$", r"transformer.decoder.norm.\g<rest>"),
    (r"^class_labels_classifier\.(?P<rest>weight|bias)$", r"class_embed.\g<rest>"),
    (
        r"^bbox_predictor\.layers\.(?P<i>[0-2])\.(?P<rest>weight|bias)$",
        r"bbox_embed.layers.\g<i>.\g<rest>",
    ),
)

_COMPILED = tuple((re.compile(p), r) for p, r in HF_DETR_KEY_MAP)


def _map_key(key: str) -> str | None:
    for pattern, repl in _COMPILED:
        m = pattern.match(key)
        if m is None:
            continue
        if callable(repl):
            try:
                return repl(m)
            except KeyError:
                return None
        return m.expand(repl)
    return None


# -- the backbone -------------------------------------------------------------------------------

_DEPTHS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
}
_TIMM_RESNETS = {"resnet18", "resnet34", "resnet50", "resnet101"}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _backbone_spec(config: Any, where: str) -> tuple[str, str, bool]:
    """``(ka_rs backbone name, layout "hf-resnet" | "timm", dilated last stage)``."""
    bb = _get(config, "backbone_config")
    if bb is None:  # transformers 4.x: use_timm_backbone / backbone / dilation at the top
        if _get(config, "use_timm_backbone", True):
            bb = {
                "model_type": "timm_backbone",
                "backbone": _get(config, "backbone", None) or "resnet50",
                "output_stride": 16 if _get(config, "dilation", False) else 32,
            }
        else:  # 4.x default: transformers' ResNet-50 read at stage4
            bb = {"model_type": "resnet", "layer_type": "bottleneck", "depths": [3, 4, 6, 3]}
            bb |= {"hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64}
    kind = _get(bb, "model_type")
    if kind == "resnet":
        layer_type = _get(bb, "layer_type", "bottleneck")
        depths = tuple(int(d) for d in _get(bb, "depths", ()))
        name = _DEPTHS.get((layer_type, depths))
        if name is None:
            raise HfDetrError(
                f"{where}: unsupported ResNet backbone ({layer_type} blocks {list(depths)}); "
                "ka_rs's DETR has ResNet-18/34/50/101"
            )
        expansion = 4 if layer_type == "bottleneck" else 1
        widths = [w * expansion for w in (64, 128, 256, 512)]
        if list(_get(bb, "hidden_sizes", [])) != widths or _get(bb, "embedding_size") != 64:
            raise HfDetrError(
                f"{where}: ResNet backbone with non-standard widths (embedding_size "
                f"{_get(bb, 'embedding_size')}, hidden_sizes {_get(bb, 'hidden_sizes')}); "
                f"ka_rs's {name} has 64 and {widths}"
            )
        if _get(bb, "downsample_in_bottleneck", False):
            raise HfDetrError(
                f"{where}: ResNet v1 backbone (downsample_in_bottleneck=True, stride on the 1×1 "
                "convolution); ka_rs's ResNet is v1.5 (stride on the 3×3)"
            )
        if _get(bb, "downsample_in_first_stage", False):
            raise HfDetrError(f"{where}: ResNet backbone with downsample_in_first_stage=True")
        if _get(bb, "hidden_act", "relu") != "relu":
            raise HfDetrError(f"{where}: ResNet backbone activation {_get(bb, 'hidden_act')!r}")
        out = list(_get(bb, "out_features", None) or [])
        if out and out[-1] != "stage4":
            raise HfDetrError(
                f"{where}: the DETR reads backbone feature {out[-1]!r}; ka_rs's reads stage4"
            )
        return name, "hf-resnet", False
    if kind == "timm_backbone":
        arch = str(_get(bb, "backbone", "") or "").split(".")[0]
        arch = arch.removeprefix("tv_")
        if arch not in _TIMM_RESNETS:
            raise HfDetrError(
                f"{where}: timm backbone {_get(bb, 'backbone')!r} is not supported; ka_rs's DETR "
                f"has the torchvision-layout ResNets {sorted(_TIMM_RESNETS)}"
            )
        out_indices = list(_get(bb, "out_indices", None) or [4])
        if out_indices[-1] not in (4, -1):
            raise HfDetrError(
                f"{where}: the DETR reads timm feature index {out_indices[-1]}; ka_rs's reads "
                "the last stage (4)"
            )
        stride = _get(bb, "output_stride", None) or 32
        if stride not in (16, 32):
            raise HfDetrError(
                f"{where}: backbone output_stride {stride}; ka_rs's DETR has 32 (C5) or 16 (DC5)"
            )
        return arch, "timm", stride == 16
    raise HfDetrError(
        f"{where}: backbone of model_type {kind!r}; ka_rs's DETR converts transformers ResNet "
        "and timm ResNet backbones"
    )


# -- conversion -----------------------------------------------------------------------------------


def _count(keys: list[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _check_architecture(config: Any, sd: Mapping[str, Tensor], where: str) -> None:
    archs = [str(a) for a in (_get(config, "architectures") or [])]
    segmentation = any("Segmentation" in a for a in archs) or any(
        k.startswith(("detr.", "mask_head.", "bbox_attention.")) for k in sd
    )
    if segmentation:
        raise HfDetrError(
            f"{where}: a DetrForSegmentation checkpoint (masks head); ka_rs converts "
            "DetrForObjectDetection"
        )
    pos = _get(config, "position_embedding_type", "sine")
    if pos != "sine" or any("row_embeddings" in k for k in sd):
        raise HfDetrError(
            f"{where}: position_embedding_type {pos!r}; ka_rs's DETR has the sine encoding only"
        )
    act = _get(config, "activation_function", "relu")
    if act != "relu":
        raise HfDetrError(f"{where}: activation_function {act!r}; ka_rs's DETR uses relu")
    for a, b in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if _get(config, a) != _get(config, b):
            raise HfDetrError(
                f"{where}: {a}={_get(config, a)} differs from {b}={_get(config, b)}; ka_rs's "
                "DETR uses one value for both"
            )
    if "class_labels_classifier.weight" not in sd:
        raise HfDetrError(
            f"{where}: no class_labels_classifier weights; expected a DetrForObjectDetection "
            "checkpoint (a bare DetrModel has no detection head)"
        )


def _ka_rs_config(**fields: Any) -> DetrConfig:
    """``DetrConfig(**fields)``, saying which ka_rs feature is missing if one is."""
    if fields.get("backbone") not in BACKBONES:
        raise HfDetrError(
            f"ka_rs's DETR has no {fields.get('backbone')!r} backbone (it has {list(BACKBONES)})"
        )
    if fields.get("dilation") and "dilation" not in {
        f.name for f in dataclasses.fields(DetrConfig)
    }:
        raise HfDetrError("this ka_rs has no dilated (DC5) backbone (DetrConfig.dilation)")
    if not fields.get("dilation"):
        fields.pop("dilation", None)
    return DetrConfig(**fields)


def convert_hf_detr_state_dict(
    config: Any, state_dict: Mapping[str, Tensor], where: str = "state_dict"
) -> tuple[DetrConfig, dict[str, Tensor], dict[str, Any]]:
    """Map a transformers ``DetrForObjectDetection`` state dict to ka_rs's DETR.

    Args:
        config: the transformers ``DetrConfig`` (or a mapping with the same fields): read are
            ``backbone_config``, ``d_model``, ``encoder_attention_heads``, ``encoder_ffn_dim``,
            ``dropout``, ``num_queries``, ``position_embedding_type``, ``activation_function``,
            ``auxiliary_loss``, ``architectures`` and the ``*_attention_heads`` / ``*_ffn_dim``
            pairs.
        state_dict: the checkpoint's weights (4.x or 5.x names).
        where: what to name in error messages (the folder).

    Returns:
        ``(ka_rs_config, ka_rs_state_dict, facts)``: :func:`build_hf_detr` builds the model;
        ``facts`` holds ``backbone_layout`` (``"hf-resnet"`` | ``"timm"``), ``backbone``,
        ``dilation`` and ``auxiliary_loss_decoder`` (True: transformers' re-normed decoder,
        set in ``ka_rs_config.renorm_decoder_layers``).

    Raises:
        HfDetrError: an architecture ka_rs cannot reproduce, or missing / unexpected /
            mis-shaped weights (the message names ``where``).
    """
    sd = rename_legacy_keys(state_dict)
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise HfDetrError(f"{where}: entries that are not tensors: {bad[:5]}")
    _check_architecture(config, sd, where)
    backbone, layout, dilation = _backbone_spec(config, where)
    has_hf = any(k.startswith("model.backbone.model.embedder.") for k in sd)
    has_timm = "model.backbone.model.conv1.weight" in sd
    if (layout == "hf-resnet" and not has_hf) or (layout == "timm" and not has_timm):
        raise HfDetrError(
            f"{where}: config.json describes a {layout} backbone but the weights hold "
            f"{'timm' if has_timm else 'transformers ResNet' if has_hf else 'no backbone'} keys"
        )

    mapped: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unmatched = []
    for key, value in sd.items():
        new = _map_key(key)
        if new is None:
            unmatched.append(key)
        elif "#" in new:
            name, part = new.split("#")
            qkv.setdefault(name, {})[part] = value
        else:
            mapped[new] = value
    if unmatched:
        raise HfDetrError(f"{where}: weights with no ka_rs counterpart: {unmatched[:8]}")
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise HfDetrError(f"{where}: {name}: q/k/v projections incomplete ({sorted(parts)})")
        mapped[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)

    keys = list(sd)
    cfg = _ka_rs_config(
        num_classes=int(sd["class_labels_classifier.weight"].shape[0]) - 1,
        backbone=backbone,
        dilation=dilation,
        hidden_dim=int(_get(config, "d_model")),
        nheads=int(_get(config, "encoder_attention_heads")),
        enc_layers=_count(keys, "model.encoder.layers."),
        dec_layers=_count(keys, "model.decoder.layers."),
        dim_feedforward=int(_get(config, "encoder_ffn_dim")),
        dropout=float(_get(config, "dropout", 0.1)),
        num_queries=int(sd["model.query_position_embeddings.weight"].shape[0])
        if "model.query_position_embeddings.weight" in sd
        else int(_get(config, "num_queries")),
        variant="detr",
        pre_norm=False,
        renorm_decoder_layers=bool(_get(config, "auxiliary_loss", False)),
    )
    with torch.device("meta"):  # shapes only
        expected = DETR(cfg).state_dict()
    problem = state_dict_mismatch(expected, mapped)
    if problem:
        raise HfDetrError(
            f"{where}: weights do not match a {backbone} DETR of this config ({problem})"
        )
    facts = {
        "backbone_layout": layout,
        "backbone": backbone,
        "dilation": dilation,
        "auxiliary_loss_decoder": bool(_get(config, "auxiliary_loss", False)),
    }
    converted = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in mapped.items()}
    return cfg, converted, facts


def build_hf_detr(config: DetrConfig, state_dict: Mapping[str, Tensor]) -> DETR:
    """The ka_rs DETR holding converted weights, in eval mode.

    Args:
        config, state_dict: from :func:`convert_hf_detr_state_dict`.
    """
    model = DETR(config)
    model.load_state_dict(dict(state_dict))
    return model.eval()

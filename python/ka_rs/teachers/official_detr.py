"""Teachers from facebookresearch/detr files: ``detr:PATH``, ``detr-c5:PATH``, ``detr-dc5:PATH``.

A DETR file is either a **model-zoo** file (``detr-r50-e632da11.pth``: ``{"model": state_dict}``)
or a **main.py** checkpoint (``checkpoint.pth``: ``model``, ``optimizer``, ``lr_scheduler``,
``epoch`` and ``args``, an ``argparse.Namespace``); a bare state dict is accepted too. The file
is read with ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the one extra type
allowed: a pickle that asks for anything else (a function, a class, a numpy array) is refused,
and nothing in it is executed.

The state dict becomes a ka_rs :class:`~ka_rs.models.DETR` running the **same architecture**
(ResNet-18/34/50/101 body with frozen BatchNorm, eps 1e-5; DETR's normalised sine positions;
post- or pre-norm Transformer; 3-layer MLP box head), wrapped in a
:class:`~ka_rs.teachers.DetrTeacher` (SA + TA).

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
``class_embed.{weight,bias}``                   ``class_embed.{weight,bias}`` (all rows kept)
``bbox_embed.layers.{0,1,2}.{weight,bias}``     ``bbox_embed.layers.{0,1,2}.{weight,bias}``
==============================================  ==============================================

``<p>`` is one of ``self_attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}``,
``linear1.*``, ``linear2.*``, ``norm1.*`` .. ``norm3.*`` (same layout in both; ka_rs's attention
is batch-first but ``nn.MultiheadAttention`` keeps the same parameters). BatchNorm
``num_batches_tracked`` counters are dropped and a ``module.`` prefix (DDP) is stripped.

Architecture, read from the weights and ``args``:

==================  ===========================================================================
what                where it comes from
==================  ===========================================================================
backbone            blocks per stage and block kind (``layer1.0.conv3`` = bottleneck):
                    (3, 4, 6, 3) bottleneck = ResNet-50, (3, 4, 23, 3) = ResNet-101, basic
                    blocks = ResNet-18/34; ``args.backbone`` must agree
dilation (DC5)      ``args.dilation``; **not visible in the weights** (R50 and DC5-R50 have the
                    same shapes): a file without ``args`` needs ``detr-c5:`` or ``detr-dc5:``,
                    and a stated dilation that contradicts ``args`` is an error
pre/post-norm       ``transformer.encoder.norm.*`` present = pre-norm (``--pre_norm``); DETR's
                    released models are post-norm (``DetrConfig.pre_norm = False``)
nheads              ``args.nheads``, else DETR's default 8 (not visible in the weights)
dims, layers, Q     ``input_proj`` rows, layer indices, ``linear1`` rows, ``query_embed`` rows;
                    ``args`` values, where present, must agree
classes             ``class_embed`` rows − 1; 91 = COCO's category-id slots
                    (:data:`~ka_rs.teachers.coco.COCO_91_SLOTS`, ``None`` at the 11 unused ids),
                    other heads need the user's class names
==================  ===========================================================================

Refused, each with a one-line :class:`~ka_rs.teachers.SourceError` naming the file: missing,
empty, truncated or non-PyTorch files; pickles needing other types; panoptic-segmentation
checkpoints (``args.masks``, ``detr.*`` / ``mask_head.*`` keys); learned position embeddings;
any state dict of another architecture (a ka_rs checkpoint, a torchvision ResNet, Deformable
DETR, ...).

The head is kept whole (all ``num_classes + 1`` logits): dropping the unused COCO slots would
change the softmax. The teacher's ``image_size`` is DETR's training scale, 800.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ka_rs.models.detr import DETR, DetrConfig
from ka_rs.models.weights import state_dict_mismatch
from ka_rs.teachers.base import DetrTeacher
from ka_rs.teachers.coco import COCO_91_SLOTS
from ka_rs.teachers.sources import SourceError

__all__ = [
    "DETR_IMAGE_SIZE",
    "DETR_KEY_MAP",
    "convert_detr_state_dict",
    "load_official_detr",
    "read_detr_file",
]

#: DETR's training scale (shorter side), the teacher's ``image_size``.
DETR_IMAGE_SIZE = 800

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

# (bottleneck blocks?, blocks per stage) -> torchvision name
_RESNET_BLOCKS: dict[tuple[bool, tuple[int, ...]], str] = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}

_REQUIRED = (
    "backbone.0.body.conv1.weight",
    "input_proj.weight",
    "query_embed.weight",
    "class_embed.weight",
    "transformer.encoder.layers.0.linear1.weight",
    "transformer.decoder.layers.0.linear1.weight",
)

# main.py checkpoint entries besides "model"
_MAIN_PY_KEYS = ("args", "optimizer", "lr_scheduler", "epoch")

_EXPECTED = "expected a facebookresearch/detr DETR state dict"


# -- reading the file ----------------------------------------------------------------------------


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message (or its type), shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_weights_only(path: Path, where: str) -> Any:
    """``torch.load(path, weights_only=True)`` allowing ``argparse.Namespace``; SourceError."""
    if not path.exists():
        raise SourceError(f"{where}: no such file; expected a facebookresearch/detr .pth file")
    if path.is_dir():
        raise SourceError(
            f"{where}: is a directory; expected a facebookresearch/detr .pth file (a model-zoo "
            "file or a main.py checkpoint.pth)"
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(f"{where}: cannot read the file: {_one_line(exc)}") from None
    if size == 0:
        raise SourceError(f"{where}: the file is empty; expected a facebookresearch/detr .pth file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes from the weights-only loader
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m is not None:
            raise SourceError(
                f"{where}: refused: not plain weights (it asks for {m.group(1)}); a "
                "facebookresearch/detr .pth holds only tensors, plain values and an "
                "argparse.Namespace, and ka_rs loads nothing else (weights_only=True, nothing "
                "executed)"
            ) from None
        op = re.search(r"Unsupported [^\n.]*", text)
        reason = op.group(0) if op else _one_line(exc)
        raise SourceError(
            f"{where}: not a readable PyTorch file (a foreign pickle or no pickle at all: "
            f"{reason}); expected a facebookresearch/detr .pth file"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # truncated zip, text file, foreign binary, ...
        raise SourceError(
            f"{where}: not a readable PyTorch file (truncated or foreign: {_one_line(exc)}); "
            "expected a facebookresearch/detr .pth file"
        ) from None


def read_detr_file(path: str | Path, where: str = "") -> tuple[dict[str, Any], Any, str]:
    """Read a facebookresearch/detr file: ``(state_dict, args, layout)``.

    Args:
        path: the ``.pth`` file.
        where: the name used in messages (default: the path).

    Returns:
        The ``model`` state dict (a plain dict, values untouched), the ``args`` namespace (or
        None) and the layout: ``"zoo"`` (``{"model": ...}``), ``"main.py"`` (``model`` with
        ``args`` / ``optimizer`` / ``lr_scheduler`` / ``epoch``) or ``"state_dict"`` (a bare
        state dict).

    Raises:
        SourceError: a missing, empty, truncated or foreign file, a pickle needing types other
            than tensors and ``argparse.Namespace``, or a file that holds no state dict.
    """
    path = Path(path)
    where = where or str(path)
    obj = _load_weights_only(path, where)
    if not isinstance(obj, Mapping):
        raise SourceError(f"{where}: {_EXPECTED}, but the file holds a {type(obj).__name__}")
    if obj.get("format") == "ka_rs.checkpoint":
        raise SourceError(
            f"{where}: {_EXPECTED}, but this is a ka_rs checkpoint; give its path without the "
            "detr: prefix"
        )
    if "model" in obj:
        state = obj["model"]
        if not isinstance(state, Mapping):
            raise SourceError(
                f"{where}: {_EXPECTED}, but its 'model' entry is a {type(state).__name__}"
            )
        layout = "main.py" if any(k in obj for k in _MAIN_PY_KEYS) else "zoo"
    else:
        state, layout = obj, "state_dict"
    args = obj.get("args") if "model" in obj else None
    if args is not None and not isinstance(args, (argparse.Namespace, Mapping)):
        raise SourceError(
            f"{where}: its 'args' entry is a {type(args).__name__}; expected the "
            "argparse.Namespace facebookresearch/detr's main.py saves"
        )
    return dict(state), args, layout


# -- architecture ------------------------------------------------------------------------------


_UNSET = object()


def _arg(args: Any, name: str) -> Any:
    """``args.name`` (Namespace or mapping), or ``_UNSET``."""
    if args is None:
        return _UNSET
    if isinstance(args, Mapping):
        return args.get(name, _UNSET)
    return getattr(args, name, _UNSET)


def _map_key(key: str) -> str | None:
    for pattern, repl in DETR_KEY_MAP:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def _count_layers(keys: Sequence[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _looks_like(keys: Sequence[str]) -> str:
    """A guess at what a foreign state dict is, for the error message."""
    sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    ks = set(keys)
    if not keys:
        return "it is empty"
    if any(k.startswith("backbone.body.") for k in keys) and "class_embed.weight" in ks:
        return "this looks like a ka_rs DETR state dict (give a ka_rs checkpoint without detr:)"
    if all(k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
           for k in keys):  # fmt: skip
        return f"this looks like a torchvision ResNet state dict ({sample})"
    if "transformer.level_embed" in ks or any("sampling_offsets" in k for k in keys):
        return f"this looks like a Deformable-DETR state dict ({sample})"
    return f"its keys are {sample}"


def _infer_backbone(keys: Sequence[str], where: str) -> str:
    body = "backbone.0.body."
    bottleneck = f"{body}layer1.0.conv3.weight" in keys
    counts = tuple(_count_layers(keys, f"{body}layer{i}.") for i in range(1, 5))
    name = _RESNET_BLOCKS.get((bottleneck, counts))
    if name is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise SourceError(
            f"{where}: unsupported backbone ({kind} blocks per stage {counts}); ka_rs loads "
            "facebookresearch/detr files with ResNet-18/34/50/101 backbones"
        )
    return name


def _clean_state_dict(state_dict: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """Drop ``num_batches_tracked``, strip ``module.``; SourceError unless every key is a
    facebookresearch/detr DETR key (panoptic, learned-position and foreign dicts refused)."""
    if not all(isinstance(k, str) for k in state_dict):
        raise SourceError(f"{where}: {_EXPECTED}, but its keys are not all strings")
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    keys = list(sd)
    if any(k.startswith(("detr.", "mask_head.", "bbox_attention.")) for k in keys):
        raise SourceError(
            f"{where}: a panoptic-segmentation DETR (detr.* / mask_head.* keys); ka_rs loads "
            "detection DETRs only"
        )
    if any(k.startswith("backbone.1.") for k in keys) and "input_proj.weight" in sd:
        raise SourceError(
            f"{where}: a DETR with a learned position embedding (backbone.1.* keys); ka_rs runs "
            "DETR's sine position embedding only"
        )
    absent = [k for k in _REQUIRED if k not in sd]
    if absent:
        raise SourceError(f"{where}: {_EXPECTED}, but {_looks_like(keys)} (no {absent[0]})")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise SourceError(f"{where}: {_EXPECTED}, but entry {bad[0]!r} is not a tensor")
    unmatched = [k for k in keys if _map_key(k) is None]
    if unmatched:
        raise SourceError(
            f"{where}: {_EXPECTED}, but it has keys no DETR has: {unmatched[:4]}"
            + (f" (+{len(unmatched) - 4} more)" if len(unmatched) > 4 else "")
        )
    return sd


def _check_args(args: Any, config: DetrConfig, where: str) -> None:
    """``args`` values that the weights also show must agree with them."""
    if _arg(args, "masks") is True or _arg(args, "dataset_file") == "coco_panoptic":
        raise SourceError(
            f"{where}: a panoptic-segmentation DETR (trained with --masks); ka_rs loads "
            "detection DETRs only"
        )
    pos = _arg(args, "position_embedding")
    if pos is not _UNSET and pos not in ("sine", "v2"):
        raise SourceError(
            f"{where}: trained with --position_embedding {pos}; ka_rs runs DETR's sine position "
            "embedding only"
        )
    backbone = _arg(args, "backbone")
    if backbone is not _UNSET and backbone != config.backbone:
        raise SourceError(
            f"{where}: args.backbone is {backbone!r} but the weights are a {config.backbone} "
            "(blocks per stage differ); the file is inconsistent"
        )
    seen = {
        "hidden_dim": config.hidden_dim,
        "enc_layers": config.enc_layers,
        "dec_layers": config.dec_layers,
        "dim_feedforward": config.dim_feedforward,
        "num_queries": config.num_queries,
        "pre_norm": config.pre_norm,
    }
    for name, value in seen.items():
        given = _arg(args, name)
        if given is not _UNSET and given != value:
            raise SourceError(
                f"{where}: args.{name} is {given!r} but the weights give {value!r}; the file is "
                "inconsistent"
            )


def convert_detr_state_dict(
    state_dict: Mapping[str, Any],
    *,
    dilation: bool,
    args: Any = None,
    where: str = "state_dict",
) -> tuple[DetrConfig, dict[str, Tensor]]:
    """Map a facebookresearch/detr ``model`` state dict to a ka_rs config and state dict.

    Args:
        state_dict: the official state dict (keys as in the module docstring).
        dilation: whether the backbone is dilated (DC5); the weights cannot tell.
        args: the checkpoint's ``args`` (``argparse.Namespace`` or mapping), if any:
            ``nheads``, ``dropout`` and the checks of the module docstring.
        where: name used in error messages (the file).

    Returns:
        ``(config, ka_rs_state_dict)``: ``DETR(config).load_state_dict(ka_rs_state_dict)``
        succeeds with ``strict=True``; floating tensors are float32.

    Raises:
        SourceError: a state dict of another architecture (missing, unexpected or mis-shaped
            keys), an unsupported backbone or head, a panoptic or learned-position model, or
            ``args`` that contradict the weights or ``dilation``.
    """
    return _convert(state_dict, dilation, args, where)[:2]


def _convert(
    state_dict: Mapping[str, Any], dilation: bool, args: Any, where: str
) -> tuple[DetrConfig, dict[str, Tensor], DETR]:
    """:func:`convert_detr_state_dict`, plus the DETR built on the meta device to check it."""
    sd = _clean_state_dict(state_dict, where)
    keys = list(sd)
    mapped = {_map_key(k) or k: v for k, v in sd.items()}  # every key maps (checked above)

    backbone = _infer_backbone(keys, where)
    stated = _arg(args, "dilation")
    if stated is not _UNSET and bool(stated) != dilation:
        raise SourceError(
            f"{where}: args.dilation is {bool(stated)} but the backbone was stated "
            f"{'dilated (detr-dc5:)' if dilation else 'plain (detr-c5:)'}; use detr:PATH to "
            "follow the file's args"
        )
    if dilation and backbone not in ("resnet50", "resnet101"):
        raise SourceError(
            f"{where}: a dilated (DC5) backbone needs ResNet-50/101; this file's is {backbone}"
        )
    hidden_dim = int(sd["input_proj.weight"].shape[0])
    nheads = _arg(args, "nheads")
    if nheads is _UNSET:
        nheads = 8  # DETR's default; the weights do not show it
    dropout = _arg(args, "dropout")
    if not isinstance(dropout, float) or not 0.0 <= dropout < 1.0:
        dropout = 0.1  # eval only: it never acts in a teacher
    class_rows = int(sd["class_embed.weight"].shape[0])
    if class_rows < 2:
        raise SourceError(f"{where}: {_EXPECTED}, but class_embed has {class_rows} row(s)")
    try:
        config = DetrConfig(
            num_classes=class_rows - 1,
            backbone=backbone,
            hidden_dim=hidden_dim,
            nheads=nheads,
            enc_layers=_count_layers(keys, "transformer.encoder.layers."),
            dec_layers=_count_layers(keys, "transformer.decoder.layers."),
            dim_feedforward=int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0]),
            dropout=dropout,
            num_queries=int(sd["query_embed.weight"].shape[0]),
            variant="detr",
            pre_norm="transformer.encoder.norm.weight" in sd,
            dilation=dilation,
        )
    except ValueError as exc:  # e.g. nheads that does not divide hidden_dim
        raise SourceError(f"{where}: unsupported DETR architecture: {_one_line(exc)}") from None
    _check_args(args, config, where)

    with torch.device("meta"):  # shapes only, no memory
        meta_model = DETR(config)
    problem = state_dict_mismatch(meta_model.state_dict(), mapped, limit=4)
    if problem:
        raise SourceError(
            f"{where}: {_EXPECTED}, but its weights do not fit a DETR of the inferred shape "
            f"({problem})"
        )
    for k, v in mapped.items():
        if not v.is_floating_point():
            raise SourceError(f"{where}: {_EXPECTED}, but {k} has dtype {v.dtype}")
    return config, {k: v.to(torch.float32) for k, v in mapped.items()}, meta_model


# -- the teacher -------------------------------------------------------------------------------


def _resolve_dilation(stated: bool | None, args: Any, path: Path, where: str) -> bool:
    """The dilation the user stated, else ``args.dilation``; SourceError when neither says."""
    if stated is not None:
        return bool(stated)  # disagreement with args is checked in convert_detr_state_dict
    from_args = _arg(args, "dilation")
    if from_args is not _UNSET:
        return bool(from_args)
    hint = ""
    if "dc5" in path.name.lower():
        hint = f" (the file name says DC5: probably detr-dc5:{path})"
    missing = "no args" if args is None else "args without a dilation entry"
    raise SourceError(
        f"{where}: the file has {missing}, so whether its backbone is dilated is unknown: "
        "R50/R101 and their DC5 variants have identical weight shapes; load it as "
        f"detr-c5:{path} (plain) or detr-dc5:{path} (dilated, DC5){hint}"
    )


def _build(meta_model: DETR, state: dict[str, Tensor]) -> DETR:
    """The meta-device ``meta_model`` given ``state``'s tensors (no random init, no copy)."""
    model = meta_model
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):  # pragma: no cover
        model = DETR(model.config)  # a tensor outside the state dict: build it for real
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_official_detr(
    path: str | Path,
    *,
    dilation: bool | None,
    classes: Sequence[str | None] | None,
    source: str = "",
) -> DetrTeacher:
    """A teacher from a facebookresearch/detr file (see the module docstring).

    Args:
        path: the ``.pth`` file (model zoo, ``main.py`` checkpoint or bare state dict).
        dilation: True = DC5 backbone (``detr-dc5:``), False = plain (``detr-c5:``), None =
            read ``args.dilation`` (``detr:``; an error when the file has no ``args``).
        classes: class names in head order (``None`` = non-class slot); required unless the
            head has COCO's 91 slots; its length must be the head's class count.
        source: the source string for messages and ``teacher.source`` (default: the path).

    Returns:
        A frozen :class:`DetrTeacher` on the CPU: ``class_names`` (``None`` at unused COCO
        ids), ``image_size`` 800, ``info`` = ``{"format": "facebookresearch/detr",
        "backbone", "dilation", "pre_norm", "layout": "zoo" | "main.py" | "state_dict"}``.
        Its forward gives ``pred_logits`` (B, Q, num_classes + 1), ``pred_boxes`` (B, Q, 4).

    Raises:
        SourceError: one line naming the file and what was expected (see the module
            docstring).
    """
    path = Path(path)
    where = source or str(path)
    state, args, layout = read_detr_file(path, where)
    _clean_state_dict(state, where)  # a foreign dict is named before dilation is asked for
    dil = _resolve_dilation(dilation, args, path, where)
    config, converted, meta_model = _convert(state, dil, args, where)
    del state
    n = config.num_classes
    if classes is None:
        if n != len(COCO_91_SLOTS):
            raise SourceError(
                f"{where}: the head has {n} classes and the file names none; give classes= "
                f"({n} names in head order, 'N/A' for a slot that is not a class)"
            )
        names: list[str | None] = list(COCO_91_SLOTS)
    else:
        names = list(classes)
        if len(names) != n:
            coco = (
                " (a 91-slot COCO head is indexed by category id: 'N/A' marks unused ids)"
                if n == len(COCO_91_SLOTS)
                else ""
            )
            raise SourceError(
                f"{where}: {len(names)} class names given for a head with {n} classes{coco}"
            )
    model = _build(meta_model, converted)
    info = {
        "format": "facebookresearch/detr",
        "backbone": config.backbone,
        "dilation": config.dilation,
        "pre_norm": config.pre_norm,
        "layout": layout,
    }
    try:
        return DetrTeacher(model, names, source=where, image_size=DETR_IMAGE_SIZE, info=info)
    except ValueError as exc:  # duplicate / empty class names
        raise SourceError(_one_line(exc, limit=300)) from None

"""Teachers from Hugging Face transformers: ``hf:DIR`` (``save_pretrained`` folder), ``hf:ORG/ID``.

=====================  ====================================  ==============  =================
``model_type``         transformers class                    head            teacher
=====================  ====================================  ==============  =================
``detr``               ``DetrForObjectDetection``            softmax (C+1)   ka_rs DETR, SA+TA
``conditional_detr``   ``ConditionalDetrForObjectDetection``  sigmoid (C)     TA only
``deformable_detr``    ``DeformableDetrForObjectDetection``  sigmoid (C)     TA only
``dab-detr``           ``DabDetrForObjectDetection``         sigmoid (C)     TA only
``rt_detr``            ``RTDetrForObjectDetection``          sigmoid (C)     TA only
``rt_detr_v2``         ``RTDetrV2ForObjectDetection``        sigmoid (C)     TA only
=====================  ====================================  ==============  =================

DETR's weights are converted into ka_rs's own :class:`~ka_rs.models.DETR`
(:mod:`ka_rs.teachers.hf_detr`), which then gives the encoder sequences SA compares. The others
keep transformers' own model, wrapped in :class:`HFDetectorTeacher`: their encoders are
multi-scale (no single token sequence per layer), so they teach through their predictions only.
Every one of them is trained with a sigmoid focal or varifocal class loss over ``num_labels``
logits, without a no-object logit.

**Pixels.** A teacher must see the pixels its own image processor would give it. ka_rs's images
are standardised with the ImageNet mean/std (:class:`ka_rs.data.transforms.Normalize`) and
zero-padded, with a padding mask. :class:`PixelTransform` undoes that and applies the folder's
``preprocessor_config.json`` (``do_rescale`` / ``rescale_factor``, ``do_normalize`` /
``image_mean`` / ``image_std``; without the file, the model type's processor defaults):
RT-DETR's processor only rescales to ``[0, 1]``. Models that take ``pixel_mask`` (DETR,
Conditional / Deformable / DAB-DETR) get it (1 = valid pixel, the inverse of ka_rs's mask) and
zeros on padded pixels, as their processors pad. RT-DETR ignores a mask and its processor never
pads (it resizes every image to one fixed size, 640×640): each image's valid region is resized
(bilinear) to the batch's padded size, rounded up to a multiple of the model's coarsest feature
stride (``config.feat_strides``; its feature pyramid needs exact halvings), before the model
sees it, so its boxes stay relative to each image like every ka_rs prediction.

Class names come from ``config.id2label`` in id order; ``"N/A"`` entries (DETR's COCO
convention) become ``None`` (non-class slots). ``classes=`` replaces them and must have one
entry per class logit.

``transformers`` (and ``safetensors``) are the optional extra ``pip install "ka_rs[hf]"``; they
are imported only when an ``hf:`` source is loaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ka_rs.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ka_rs.models.detr import DetrOutput
from ka_rs.teachers.base import DetrTeacher, Teacher
from ka_rs.teachers.sources import NON_CLASS, SourceError

__all__ = [
    "HF_DETECTORS",
    "HFDetectorTeacher",
    "PixelTransform",
    "external_record",
    "load_hf_teacher",
    "teacher_from_record",
    "resolve_hf_ref",
]

_INSTALL = 'pip install "ka_rs[hf]"'

#: model_type -> transformers ``*ForObjectDetection`` class name (DETR is converted instead)
HF_DETECTORS: dict[str, str] = {
    "detr": "DetrForObjectDetection",
    "conditional_detr": "ConditionalDetrForObjectDetection",
    "deformable_detr": "DeformableDetrForObjectDetection",
    "dab-detr": "DabDetrForObjectDetection",
    "rt_detr": "RTDetrForObjectDetection",
    "rt_detr_v2": "RTDetrV2ForObjectDetection",
}

#: model types whose forward uses ``pixel_mask`` (their processors pad); the others get each
#: image's valid region resized to the batch size instead
_TAKES_PIXEL_MASK = frozenset({"detr", "conditional_detr", "deformable_detr", "dab-detr"})

#: model types whose image processor does not normalise by default (only rescales to [0, 1])
_NO_NORMALIZE = frozenset({"rt_detr", "rt_detr_v2"})

_DEFAULT_SIZE = {"rt_detr": 640, "rt_detr_v2": 640}

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# "org/name": one slash, hub-legal characters, not a path-looking string
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# -- optional dependencies ----------------------------------------------------------------------


def _require(module: str, source: str) -> Any:
    """Import ``module`` or raise :class:`SourceError` naming the extra to install."""
    try:
        return __import__(module)
    except ImportError:
        raise SourceError(
            f"{source}: Hugging Face teachers need the {module!r} package; {_INSTALL}"
        ) from None


# -- where the files are ------------------------------------------------------------------------


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def resolve_hf_ref(ref: str, source: str) -> Path:
    """The local folder of ``ref``: an existing folder, or a hub id fetched (or cached).

    A hub id is fetched with ``huggingface_hub.snapshot_download`` (config, processor config
    and weights only); with ``HF_HUB_OFFLINE=1`` only the local cache is looked at.

    Raises:
        SourceError: ``ref`` is a file, does not exist and is not a hub id, or is a hub id
            that cannot be fetched (no network / not cached, unknown or gated repository).
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(
                f"{source}: {str(path)!r} is a file; expected a folder written by "
                "save_pretrained (config.json + model.safetensors) or a hub id org/name"
            )
        return path
    if not _HUB_ID.match(ref):
        raise SourceError(
            f"{source}: {str(path)!r} does not exist (expected a folder written by "
            "save_pretrained, or a hub id org/name)"
        )
    _require("transformers", source)
    hub = _require("huggingface_hub", source)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        # the configs and safetensors weights; pytorch_model*.bin only where those are absent
        folder = Path(
            hub.snapshot_download(
                ref, allow_patterns=["*.json", "model*.safetensors"], local_files_only=offline
            )
        )
        if not any((folder / f).is_file() for f in _WEIGHT_FILES[:2]):
            folder = Path(
                hub.snapshot_download(
                    ref, allow_patterns=["pytorch_model*.bin"], local_files_only=offline
                )
            )
    except Exception as err:  # offline, not cached, unknown / gated repo, HTTP errors
        name = type(err).__name__
        if "GatedRepo" in name:
            why = "the repository is gated (accept its terms on the Hub and log in)"
        elif "RepositoryNotFound" in name:
            why = "the Hub has no such public repository"
        else:
            why = (
                "this machine could not reach the Hugging Face Hub"
                + (" (HF_HUB_OFFLINE is set)" if offline else "")
                + " and the id is not in the local cache"
            )
        raise SourceError(
            f"{source}: cannot load hub id {ref!r}: {why} ({type(err).__name__}); download it "
            "where the Hub is reachable or give a local save_pretrained folder"
        ) from None
    return folder


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{source}: cannot read {str(path)!r}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{source}: {str(path)!r} is not a JSON object")
    return data


def _read_config(folder: Path, source: str) -> tuple[str, Any]:
    """``(model_type, transformers config)`` of ``folder``."""
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(
            f"{source}: {str(folder)!r} has no config.json; expected a folder written by "
            "save_pretrained (config.json + model.safetensors or pytorch_model.bin)"
        )
    raw = _read_json(path, source)
    model_type = raw.get("model_type")
    if model_type not in HF_DETECTORS:
        raise SourceError(
            f"{source}: {str(folder)!r} holds a model_type {model_type!r} model; supported: "
            f"{', '.join(HF_DETECTORS)} (*ForObjectDetection)"
        )
    transformers = _require("transformers", source)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # an old transformers, a malformed field, ...
        raise SourceError(
            f"{source}: transformers cannot read {str(path)!r}: {_one_line(err)}"
        ) from None
    return str(model_type), config


def _read_state_dict(folder: Path, source: str) -> dict[str, Tensor]:
    """The weights of ``folder``: safetensors (single or sharded) or ``pytorch_model.bin``."""
    present = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise SourceError(
            f"{source}: {str(folder)!r} has no weights; expected one of {list(_WEIGHT_FILES)}"
        )
    name = present[0]
    files = [folder / name]
    if name.endswith(".index.json"):
        index = _read_json(folder / name, source).get("weight_map", {})
        files = [folder / f for f in sorted(set(index.values()))]
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                st = _require("safetensors", source)
                __import__("safetensors.torch")
                state.update(st.torch.load_file(str(file), device="cpu"))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except SourceError:
            raise
        except Exception as err:  # truncated, foreign pickle, missing shard
            raise SourceError(
                f"{source}: cannot read weights {str(file)!r}: {_one_line(err)}"
            ) from None
    return state


# -- class names --------------------------------------------------------------------------------


def _class_names(
    config: Any, num_classes: int, classes: Sequence[str | None] | None, source: str
) -> list[str | None]:
    """``classes`` (checked against the head) or ``config.id2label`` in id order, "N/A" ->
    None."""
    if classes is not None:
        if len(classes) != num_classes:
            raise SourceError(
                f"{source}: {len(classes)} class names given for a head with {num_classes} classes"
            )
        return list(classes)
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    absent = [i for i in range(num_classes) if i not in id2label]
    if absent or len(id2label) != num_classes:
        raise SourceError(
            f"{source}: config.json's id2label has {len(id2label)} entries for a head with "
            f"{num_classes} classes (ids {absent[:5]} missing); give classes="
        )
    names: list[str | None] = [
        None if id2label[i] == NON_CLASS else str(id2label[i]) for i in range(num_classes)
    ]
    real = [n for n in names if n is not None]
    if len(set(real)) != len(real):
        dup = sorted({n for n in real if real.count(n) > 1})
        raise SourceError(f"{source}: id2label gives {dup} to more than one id; give classes=")
    return names


# -- pixels -------------------------------------------------------------------------------------


def _three(values: Sequence[float] | float, name: str) -> Tensor:
    """``values`` as a float64 tensor of 3 channels (one number = all three)."""
    try:
        t = torch.tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected 1 or 3 numbers, got {values!r}") from None
    if t.numel() == 1:
        t = t.repeat(3)
    if t.numel() != 3:
        raise ValueError(f"{name}: expected 1 or 3 numbers, got {values!r}")
    return t


class PixelTransform(nn.Module):
    """ka_rs pixels -> the pixels a teacher's image processor gives, one affine map per channel.

    ka_rs: ``x = (p - IMAGENET_MEAN) / IMAGENET_STD`` with ``p`` in [0, 1]. Teacher: ``p·255``,
    times ``rescale_factor`` if ``do_rescale``, then ``(· - image_mean) / image_std`` if
    ``do_normalize``. So ``teacher = scale · x + shift`` per channel.

    Args:
        do_rescale, rescale_factor, do_normalize, image_mean, image_std: the processor's
            settings (``preprocessor_config.json``); a mean or std may be one number for all
            three channels.

    Raises:
        ValueError: a mean / std that is not 1 or 3 numbers, or a std that is not positive.
    """

    # buffers (registered in __init__)
    scale: Tensor
    shift: Tensor

    def __init__(
        self,
        *,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | float = IMAGENET_MEAN,
        image_std: Sequence[float] | float = IMAGENET_STD,
    ) -> None:
        super().__init__()
        k_mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        k_std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        c = 255.0 * (float(rescale_factor) if do_rescale else 1.0)
        scale, shift = c * k_std, c * k_mean
        if do_normalize:
            t_mean, t_std = _three(image_mean, "image_mean"), _three(image_std, "image_std")
            if bool((t_std <= 0).any()):
                raise ValueError(f"image_std: expected positive values, got {image_std}")
            scale, shift = scale / t_std, (shift - t_mean) / t_std
        self.identity = bool(
            torch.allclose(scale, torch.ones(3, dtype=torch.float64), atol=1e-6)
            and torch.allclose(shift, torch.zeros(3, dtype=torch.float64), atol=1e-6)
        )
        self.register_buffer("scale", scale.to(torch.float32), persistent=False)
        self.register_buffer("shift", shift.to(torch.float32), persistent=False)
        self.settings = {
            "do_rescale": bool(do_rescale),
            "rescale_factor": float(rescale_factor),
            "do_normalize": bool(do_normalize),
            "image_mean": _three(image_mean, "image_mean").tolist(),
            "image_std": _three(image_std, "image_std").tolist(),
        }

    @classmethod
    def from_processor_config(cls, data: Mapping[str, Any], model_type: str) -> PixelTransform:
        """From a ``preprocessor_config.json`` dict; absent fields take the model type's
        processor defaults (RT-DETR: no normalisation)."""
        return cls(
            do_rescale=bool(data.get("do_rescale", True)),
            rescale_factor=float(data.get("rescale_factor") or 1 / 255),
            do_normalize=bool(data.get("do_normalize", model_type not in _NO_NORMALIZE)),
            image_mean=data.get("image_mean") or IMAGENET_MEAN,
            image_std=data.get("image_std") or IMAGENET_STD,
        )

    def forward(self, images: Tensor) -> Tensor:
        """``images`` (B, 3, H, W) ka_rs-standardised -> (B, 3, H, W) teacher pixels."""
        if self.identity:
            return images
        return images * self.scale[:, None, None] + self.shift[:, None, None]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


def _processor_config(folder: Path, source: str) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    return _read_json(path, source) if path.is_file() else {}


def _image_size(processor: Mapping[str, Any], model_type: str) -> int:
    """The shorter side the processor resizes to (``size.shortest_edge``, else the smaller of
    ``size.height``/``width``, else an int ``size``), else the processor default."""
    size = processor.get("size")
    if isinstance(size, Mapping):
        if size.get("shortest_edge"):
            return int(size["shortest_edge"])
        if size.get("height") and size.get("width"):
            return int(min(size["height"], size["width"]))
    elif isinstance(size, (int, float)) and size > 0:
        return int(size)
    return _DEFAULT_SIZE.get(model_type, 800)


def stretch_valid_regions(
    images: Tensor, mask: Tensor | None, size: tuple[int, int] | None = None
) -> Tensor:
    """Resize each image's valid (unpadded, top-left) region to ``size``.

    Args:
        images: (B, C, H, W).
        mask: (B, H, W) bool, True = padded pixel (padding at the bottom and right), or None
            (no padding).
        size: ``(H', W')``; None = ``(H, W)``.

    Returns:
        (B, C, H', W'): bilinear resize of ``images[i, :, :h_i, :w_i]`` for each image.
    """
    h, w = images.shape[-2:]
    size = (h, w) if size is None else (int(size[0]), int(size[1]))
    if mask is None:
        rows, cols = [h] * images.shape[0], [w] * images.shape[0]
    else:
        valid = ~mask
        rows = valid.any(dim=2).sum(dim=1).tolist()
        cols = valid.any(dim=1).sum(dim=1).tolist()
    out = []
    for i, (hi, wi) in enumerate(zip(rows, cols, strict=True)):
        crop = images[i : i + 1, :, : max(int(hi), 1), : max(int(wi), 1)]
        if crop.shape[-2:] != size:
            crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)
        out.append(crop)
    return torch.cat(out)


# -- the TA-only teacher ------------------------------------------------------------------------


class HFDetectorTeacher(Teacher):
    """A transformers ``*ForObjectDetection`` model run by transformers (TA only, sigmoid head).

    Args:
        model: the transformers model (frozen here).
        class_names: one entry per logit, ``None`` = non-class slot.
        pixels: ka_rs pixels -> the model's pixels.
        takes_pixel_mask: pass ``pixel_mask`` (and zero padded pixels); False = resize each
            image's valid region to the batch size instead (models that ignore padding),
            rounded up to a multiple of ``size_divisor``.
        size_divisor: the input size multiple a model without ``pixel_mask`` needs (RT-DETR:
            its coarsest feature stride, which its feature pyramid halves exactly).
        source, name, image_size, info: as :class:`Teacher`.

    :meth:`forward` returns ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) normalised
    cxcywh relative to each (unpadded) image, and ``aux_outputs`` where the model returns
    per-layer predictions (RT-DETR: ``intermediate_logits`` /
    ``intermediate_reference_points``).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str | None],
        *,
        pixels: PixelTransform,
        takes_pixel_mask: bool,
        size_divisor: int = 1,
        source: str = "",
        name: str = "",
        image_size: int = 0,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            class_names,
            "sigmoid",
            source=source,
            name=name,
            image_size=image_size,
            info=info,
        )
        self.pixels = pixels
        self.takes_pixel_mask = bool(takes_pixel_mask)
        if isinstance(size_divisor, bool) or not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError(f"size_divisor: expected a positive integer, got {size_divisor!r}")
        self.size_divisor = size_divisor

    def model_inputs(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """The keyword arguments the wrapped model is called with.

        Args:
            images: (B, 3, H, W) ka_rs pixels (ImageNet-standardised, zero-padded).
            mask: (B, H, W) bool, True = padded pixel, or None.

        Returns:
            ``{"pixel_values": (B, 3, H, W)}`` in the teacher's pixel space, plus
            ``"pixel_mask"`` (B, H, W) int64 (1 = valid pixel) for models that take one; for
            the others each image's valid region resized to (H, W) rounded up to a multiple
            of ``size_divisor``.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images: expected a float (B, 3, H, W) tensor, got shape "
                f"{tuple(images.shape)} dtype {images.dtype}"
            )
        b, _, h, w = images.shape
        if mask is not None and (mask.shape != (b, h, w) or mask.dtype != torch.bool):
            raise ValueError(
                f"mask: expected a bool tensor of shape {(b, h, w)}, got shape "
                f"{tuple(mask.shape)} dtype {mask.dtype}"
            )
        pixels = self.pixels(images)
        padded = mask is not None and bool(mask.any())
        if not self.takes_pixel_mask:
            m = self.size_divisor
            size = (-(-h // m) * m, -(-w // m) * m)
            if padded or size != (h, w):
                pixels = stretch_valid_regions(pixels, mask if padded else None, size)
            return {"pixel_values": pixels}
        if mask is None:
            mask = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        if padded:
            pixels = pixels.masked_fill(mask[:, None], 0.0)
        return {"pixel_values": pixels, "pixel_mask": (~mask).to(torch.long)}

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetrOutput:
        """Predictions for ka_rs ``images`` (B, 3, H, W) and ``mask`` (B, H, W) bool."""
        out = self.model(**self.model_inputs(images, mask))
        aux: list[dict[str, Tensor]] = []
        logits_l = getattr(out, "intermediate_logits", None)
        boxes_l = getattr(out, "intermediate_reference_points", None)
        if (
            isinstance(logits_l, Tensor)
            and isinstance(boxes_l, Tensor)
            and logits_l.ndim == 4
            and boxes_l.ndim == 4
            and boxes_l.shape[-1] == 4
        ):
            aux = [
                {"pred_logits": logits_l[:, i], "pred_boxes": boxes_l[:, i]}
                for i in range(logits_l.shape[1] - 1)
            ]
        return DetrOutput(pred_logits=out.logits, pred_boxes=out.pred_boxes, aux_outputs=aux)


# -- loading ------------------------------------------------------------------------------------


def _load_detr(
    folder: Path,
    config: Any,
    classes: Sequence[str | None] | None,
    pixels: PixelTransform,
    image_size: int,
    source: str,
) -> DetrTeacher:
    from ka_rs.teachers.hf_detr import HfDetrError, build_hf_detr, convert_hf_detr_state_dict

    if not pixels.identity:
        raise SourceError(
            f"{source}: preprocessor_config.json normalises pixels differently from ka_rs "
            f"({pixels.extra_repr()}); a converted DETR runs on ka_rs's ImageNet-standardised "
            "pixels"
        )
    state = _read_state_dict(folder, source)
    try:
        cfg, converted, facts = convert_hf_detr_state_dict(config, state, where=str(folder))
    except HfDetrError as err:
        raise SourceError(f"{source}: {err}") from None
    names = _class_names(config, cfg.num_classes, classes, source)
    model = build_hf_detr(cfg, converted)
    info = {
        "format": "huggingface",
        "model_type": "detr",
        "backbone_layout": facts["backbone_layout"],
        "backbone": facts["backbone"],
        "dilation": facts["dilation"],
    }
    if facts["auxiliary_loss_decoder"]:
        info["decoder"] = "transformers auxiliary_loss (layer outputs re-normed between layers)"
    return DetrTeacher(model, names, source=source, image_size=image_size, info=info)


def _load_detector(
    folder: Path,
    model_type: str,
    config: Any,
    classes: Sequence[str | None] | None,
    pixels: PixelTransform,
    image_size: int,
    source: str,
) -> HFDetectorTeacher:
    transformers = _require("transformers", source)
    cls_name = HF_DETECTORS[model_type]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise SourceError(
            f"{source}: this transformers ({transformers.__version__}) has no {cls_name}; "
            "upgrade transformers"
        )
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if any("Segmentation" in a for a in archs):
        raise SourceError(
            f"{source}: {str(folder)!r} holds a {archs[0]} (segmentation) checkpoint; "
            f"expected {cls_name}"
        )
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise SourceError(
            f"{source}: {str(folder)!r} has no weights; expected one of {list(_WEIGHT_FILES)}"
        )
    try:
        model, loading = cls.from_pretrained(str(folder), output_loading_info=True)
    except Exception as err:
        raise SourceError(
            f"{source}: transformers cannot load {str(folder)!r}: {_one_line(err)}"
        ) from None
    missing = list(loading.get("missing_keys") or [])
    mismatched = list(loading.get("mismatched_keys") or [])
    if missing or mismatched:
        raise SourceError(
            f"{source}: the weights in {str(folder)!r} do not fill a {cls_name} (missing "
            f"{sorted(missing)[:5]}, mis-shaped {[m[0] for m in mismatched][:5]})"
        )
    model = model.float().eval()
    num_classes = int(config.num_labels)
    names = _class_names(config, num_classes, classes, source)
    info = {
        "format": "huggingface",
        "model_type": model_type,
        "architecture": cls_name,
        "pixels": pixels.settings,
    }
    return HFDetectorTeacher(
        model,
        names,
        pixels=pixels,
        takes_pixel_mask=model_type in _TAKES_PIXEL_MASK,
        size_divisor=max((int(v) for v in getattr(config, "feat_strides", None) or [1]), default=1),
        source=source,
        image_size=image_size,
        info=info,
    )


def load_hf_teacher(ref: str, *, classes: Sequence[str | None] | None, source: str) -> Teacher:
    """A teacher from a transformers ``*ForObjectDetection`` folder or hub id.

    Args:
        ref: a local ``save_pretrained`` folder, or a hub id ``org/name``.
        classes: class names in the head's order (``None`` = non-class slot) replacing
            ``config.id2label``; None keeps id2label's (``"N/A"`` -> ``None``).
        source: the whole source string (``hf:...``), for messages and ``teacher.source``.

    Returns:
        A :class:`~ka_rs.teachers.DetrTeacher` (``model_type == "detr"``, SA + TA) or an
        :class:`HFDetectorTeacher` (TA only), frozen and in eval mode.

    Raises:
        SourceError: transformers missing, a missing folder / unreachable hub id, no
            config.json or weights, an unsupported model_type or architecture, a class list
            of the wrong length (each message names the source).
    """
    _require("transformers", source)
    folder = resolve_hf_ref(ref, source)
    model_type, config = _read_config(folder, source)
    processor = _processor_config(folder, source)
    try:
        pixels = PixelTransform.from_processor_config(processor, model_type)
    except (TypeError, ValueError) as err:
        raise SourceError(f"{source}: preprocessor_config.json: {_one_line(err)}") from None
    image_size = _image_size(processor, model_type)
    if model_type == "detr":
        return _load_detr(folder, config, classes, pixels, image_size, source)
    return _load_detector(folder, model_type, config, classes, pixels, image_size, source)


# -- TA-only teachers inside ka_rs checkpoints (``ka-rs convert``) -------------------------------


def external_record(teacher: HFDetectorTeacher) -> dict[str, Any]:
    """Plain data that, with the model's state dict, rebuilds ``teacher`` without its folder
    (stored by ``ka-rs convert`` in a ka_rs checkpoint; JSON-friendly, ``weights_only``-safe)."""
    hf_model: Any = teacher.model  # a transformers PreTrainedModel (an optional extra)
    config = hf_model.config.to_dict()
    return {
        "library": "transformers",
        "model_type": str(teacher.info["model_type"]),
        "config": json.loads(json.dumps(config, default=str)),
        "pixels": dict(teacher.pixels.settings),
        "takes_pixel_mask": teacher.takes_pixel_mask,
        "size_divisor": teacher.size_divisor,
    }


def teacher_from_record(
    record: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    class_names: Sequence[str | None],
    *,
    source: str,
    image_size: int = 0,
) -> HFDetectorTeacher:
    """Inverse of :func:`external_record`: the transformers model rebuilt from its config and
    ``state_dict`` (every weight must fit), wrapped as the same TA-only teacher.

    Raises:
        SourceError: transformers missing, an unknown model type, or weights that do not fit.
    """
    transformers = _require("transformers", source)
    model_type = str(record.get("model_type"))
    if model_type not in HF_DETECTORS or model_type == "detr":
        raise SourceError(f"{source}: unknown stored transformers model type {model_type!r}")
    cls = getattr(transformers, HF_DETECTORS[model_type], None)
    if cls is None:
        raise SourceError(
            f"{source}: this transformers ({transformers.__version__}) has no "
            f"{HF_DETECTORS[model_type]}; upgrade transformers"
        )
    fields = {k: v for k, v in dict(record["config"]).items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
        model = cls(config)
        model.load_state_dict(dict(state_dict))
    except Exception as err:
        raise SourceError(f"{source}: cannot rebuild the stored {model_type} model: "
                          f"{_one_line(err)}") from None  # fmt: skip
    info = {
        "format": "huggingface",
        "model_type": model_type,
        "architecture": HF_DETECTORS[model_type],
        "pixels": dict(record["pixels"]),
    }
    return HFDetectorTeacher(
        model.float().eval(),
        class_names,
        pixels=PixelTransform(**record["pixels"]),
        takes_pixel_mask=bool(record["takes_pixel_mask"]),
        size_divisor=int(record["size_divisor"]),
        source=source,
        image_size=image_size,
        info=info,
    )

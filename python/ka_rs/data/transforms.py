"""Joint image + target transforms (no torchvision needed).

A transform is a callable ``(image, target) -> (image, target)``; ``image`` is a PIL image or a
float tensor ``(3, H, W)``. Until :class:`Normalize`, ``target["boxes"]`` holds float32 ``(T, 4)``
**absolute xyxy** pixel boxes (what the datasets produce) and every geometric transform moves
them with the image and updates ``target["size"]`` = ``(h, w)`` (and ``"area"``).
:class:`Normalize` standardises the image with the ImageNet mean/std and converts boxes to
**normalised cxcywh** relative to the (unpadded) transformed image, the model convention.

Randomness comes from ``torch``'s generator (the global one unless a ``generator`` is given),
so DataLoader workers get distinct, reproducible streams. Inputs are never modified in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import Target, Transform
from .images import to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ColorJitter",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "ToTensor",
    "hflip",
    "make_transforms",
    "resize",
    "resized_shape",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma

Image_ = Image.Image | torch.Tensor


def _hw(image: Image_) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        return int(image.shape[-2]), int(image.shape[-1])
    raise ValueError(
        f"image: expected a PIL image or a (3, H, W) tensor, got {type(image).__name__}"
        + (f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else "")
    )


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * _rand(generator)


def _size_tensor(h: int, w: int) -> torch.Tensor:
    return torch.tensor([h, w], dtype=torch.int64)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        """Apply every transform to ``(image, target)``."""
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


# ---------------------------------------------------------------- geometry


def hflip(image: Image_, target: Target) -> tuple[Image_, Target]:
    """Mirror left-right; xyxy boxes become ``(W - x2, y1, W - x1, y2)``."""
    _, w = _hw(image)
    if isinstance(image, Image.Image):
        flipped: Image_ = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        flipped = image.flip(-1)
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return flipped, target


def resized_shape(
    h: int, w: int, size: int | Sequence[int], max_size: int | None = None
) -> tuple[int, int]:
    """Output ``(h, w)`` of :func:`resize`.

    ``size`` int: the shorter side becomes ``size`` (aspect ratio kept), reduced if needed so
    that the longer side is at most ``max_size`` (``None``/0 = no limit); ``(h, w)``: exact.
    """
    if not isinstance(size, int):
        oh, ow = (int(v) for v in size)
        if oh < 1 or ow < 1:
            raise ValueError(f"size: expected positive (h, w), got {tuple(size)}")
        return oh, ow
    if size < 1:
        raise ValueError(f"size: expected a positive int, got {size}")
    short, long = min(h, w), max(h, w)
    target_short = float(size)
    if max_size and long / short * target_short > max_size:
        target_short = max_size * short / long
    scale = target_short / short
    if h <= w:
        return max(1, int(round(target_short))), max(1, int(round(w * scale)))
    return max(1, int(round(h * scale))), max(1, int(round(target_short)))


def resize(
    image: Image_, target: Target, size: int | Sequence[int], max_size: int | None = None
) -> tuple[Image_, Target]:
    """Bilinear resize (see :func:`resized_shape`); boxes and area are scaled accordingly."""
    h, w = _hw(image)
    oh, ow = resized_shape(h, w, size, max_size)
    if (oh, ow) == (h, w):
        return image, target
    if isinstance(image, Image.Image):
        out: Image_ = image.resize((ow, oh), Image.Resampling.BILINEAR)
    else:
        out = F.interpolate(
            image[None].float(), size=(oh, ow), mode="bilinear", align_corners=False, antialias=True
        )[0]
    sx, sy = ow / w, oh / h
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (sx * sy)
    target["size"] = _size_tensor(oh, ow)
    return out, target


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def __call__(self, image: Image_, target: Target) -> tuple[Image_, Target]:
        """Flip ``(image, target)`` with probability ``p``."""
        if self.p > 0 and _rand(self.generator) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize the shorter side to ``size`` (or to exactly ``(h, w)``), longer side capped at
    ``max_size``; see :func:`resized_shape`."""

    def __init__(self, size: int | Sequence[int], max_size: int | None = None) -> None:
        resized_shape(1, 1, size)  # validate
        self.size = size
        self.max_size = max_size

    def __call__(self, image: Image_, target: Target) -> tuple[Image_, Target]:
        """Resize ``(image, target)``."""
        return resize(image, target, self.size, self.max_size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, max_size={self.max_size})"


class RandomResize:
    """Resize the shorter side to a size drawn uniformly from ``sizes`` (DETR multi-scale)."""

    def __init__(
        self,
        sizes: Sequence[int],
        max_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes: expected a non-empty list of positive ints, got {sizes}")
        self.max_size = max_size
        self.generator = generator

    def __call__(self, image: Image_, target: Target) -> tuple[Image_, Target]:
        """Resize ``(image, target)`` to a random size."""
        k = int(torch.randint(len(self.sizes), (), generator=self.generator))
        return resize(image, target, self.sizes[k], self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


# ---------------------------------------------------------------- pixels


def _to_array(image: Image_) -> np.ndarray:
    """A new float32 ``(3, H, W)`` array (safe to modify in place) in [0, 1] for PIL / uint8.

    A PIL image that is not ``"RGB"`` is mapped by :func:`ka_rs.data.images.to_rgb` (16-bit
    scaled by 65535, alpha composited on white, ...; ``ValueError`` for modes it refuses).
    Pixel arithmetic runs in numpy, single-threaded: torch's intra-op thread pool costs more
    than it saves on images this small, badly so on a busy machine.
    """
    if isinstance(image, Image.Image):
        rgb = image if image.mode == "RGB" else to_rgb(image)
        if isinstance(rgb, torch.Tensor):  # a new float image in [0, 1] (16-bit / float source)
            return rgb.numpy()
        arr = np.asarray(rgb)
        out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
        np.multiply(arr.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=out)
        return out
    _hw(image)
    src = image.detach().cpu().numpy()
    if src.dtype == np.uint8:
        scaled: np.ndarray = np.multiply(src, np.float32(1.0 / 255.0), dtype=np.float32)
        return scaled
    return np.array(src, dtype=np.float32, copy=True)


def _to_tensor(image: Image_) -> torch.Tensor:
    if isinstance(image, torch.Tensor) and image.dtype == torch.float32:
        _hw(image)
        return image
    return torch.from_numpy(_to_array(image))


class ToTensor:
    """PIL image (any mode :func:`ka_rs.data.images.to_rgb` reads) or uint8 tensor -> float32
    ``(3, H, W)`` in [0, 1]; float tensors pass."""

    def __call__(self, image: Image_, target: Target) -> tuple[torch.Tensor, Target]:
        """Convert the image; the target is unchanged."""
        return _to_tensor(image), target

    def __repr__(self) -> str:
        return "ToTensor()"


class ColorJitter:
    """Random brightness, contrast and saturation (each factor in ``[1 - x, 1 + x]``, applied in
    that order), on a float ``(3, H, W)`` tensor in [0, 1]; a PIL image is converted first. The
    result is clamped to [0, 1]. Applied with probability ``p``."""

    def __init__(
        self,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, v in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if not (0.0 <= v < 1.0) or not math.isfinite(v):
                raise ValueError(f"{name}: expected a value in [0, 1), got {v}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.p = p
        self.generator = generator

    def __call__(self, image: Image_, target: Target) -> tuple[torch.Tensor, Target]:
        """Jitter the image colours; the target is unchanged."""
        if self.p < 1.0 and _rand(self.generator) >= self.p:
            return _to_tensor(image), target
        g = self.generator
        b = _uniform(1 - self.brightness, 1 + self.brightness, g)
        c = _uniform(1 - self.contrast, 1 + self.contrast, g)
        s = _uniform(1 - self.saturation, 1 + self.saturation, g)
        img = _to_array(image)
        # brightness x*b, contrast (y - mean_gray(y))*c + mean_gray(y), saturation
        # (y - gray(y))*s + gray(y) compose into one affine map of x and gray(x):
        #   out = a*(s*x + (1 - s)*gray(x)) + k,  a = b*c,  k = b*mean_gray(x)*(1 - c)
        gray = np.tensordot(_GRAY_WEIGHTS, img, axes=1)
        a = b * c
        k = b * float(gray.mean()) * (1.0 - c)
        img *= np.float32(a * s)
        gray *= np.float32(a * (1.0 - s))
        gray += np.float32(k)
        img += gray[None]
        np.clip(img, 0.0, 1.0, out=img)
        return torch.from_numpy(img), target

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, p={self.p})"
        )


class Normalize:
    """Standardise the image (``(x - mean) / std`` per channel) and convert boxes from absolute
    xyxy to normalised cxcywh w.r.t. the current (unpadded) image size."""

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std: expected 3 values each, std > 0; got {mean}, {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._mean = self.mean.numpy()
        self._inv_std = (1.0 / self.std).numpy()

    def __call__(self, image: Image_, target: Target) -> tuple[torch.Tensor, Target]:
        """Normalise the image and the boxes."""
        arr = _to_array(image)
        h, w = int(arr.shape[1]), int(arr.shape[2])
        arr -= self._mean
        arr *= self._inv_std
        img = torch.from_numpy(arr)
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"]
            cxcywh = torch.stack(
                [
                    (b[:, 0] + b[:, 2]) / 2,
                    (b[:, 1] + b[:, 3]) / 2,
                    b[:, 2] - b[:, 0],
                    b[:, 3] - b[:, 1],
                ],
                dim=1,
            )
            target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        target["size"] = _size_tensor(h, w)
        return img, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


# ---------------------------------------------------------------- presets


def default_scales(image_size: int) -> list[int]:
    """Training scales for ``image_size``: multiples of 8 from 75% of it up to it (DETR-style
    multi-scale, e.g. 96..128 for 128; 600..800 for 800)."""
    lo = max(8, int(math.ceil(0.75 * image_size / 8)) * 8)
    scales = list(range(lo, image_size + 1, 8))
    if not scales or scales[-1] != image_size:
        scales.append(image_size)
    return scales


def make_transforms(
    train: bool | str,
    image_size: int,
    max_size: int | None = None,
    *,
    scales: Sequence[int] | None = None,
    flip: bool = True,
    color_jitter: float = 0.2,
) -> Compose:
    """Standard pipelines.

    ``train`` (``True`` or ``"train"``): random horizontal flip, :class:`RandomResize` over
    ``scales`` (default :func:`default_scales`), :class:`ToTensor`, :class:`ColorJitter`
    (``color_jitter`` for brightness/contrast/saturation; 0 disables), :class:`Normalize`.
    Evaluation (``False`` or ``"val"``/``"test"``/``"eval"``): :class:`Resize` to ``image_size``,
    :class:`ToTensor`, :class:`Normalize`. ``max_size`` caps the longer side (``None``/0 =
    no cap). Resizing is skipped when the image already has the target size.
    """
    if isinstance(train, str):
        if train not in ("train", "val", "test", "eval"):
            raise ValueError(
                f"train: expected a bool or 'train'/'val'/'test'/'eval', got {train!r}"
            )
        train = train == "train"
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    max_size = max_size or None
    if not train:
        return Compose([Resize(image_size, max_size), ToTensor(), Normalize()])
    steps: list[Transform] = []
    if flip:
        steps.append(RandomHorizontalFlip(0.5))
    steps.append(RandomResize(list(scales) if scales else default_scales(image_size), max_size))
    steps.append(ToTensor())
    if color_jitter > 0:
        steps.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    steps.append(Normalize())
    return Compose(steps)

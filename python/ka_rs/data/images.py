"""Image decoding for the detection datasets: every Pillow mode to RGB in [0, 1], or a refusal.

:func:`load_rgb_image` opens a file with Pillow, decodes it fully, applies its EXIF orientation
and maps its pixels to RGB. The result is either a PIL image in mode ``"RGB"`` (sources with at
most 8 bits per sample: exact, and what the PIL fast paths of :mod:`ka_rs.data.transforms` take)
or a float32 tensor ``(3, H, W)`` in [0, 1] (16-bit and float sources, whose precision 8 bits
would lose); every transform accepts both, and :class:`~ka_rs.data.transforms.ToTensor` turns
either into the float ``(3, H, W)`` image in [0, 1] the model pipeline works on.

Mode -> decoded RGB (``v`` is a sample value):

=====================================  =========================================================
``RGB``, ``RGBX``                      as stored (the padding byte of ``RGBX`` is dropped)
``1``                                  0 -> black, 1 -> white
``L``                                  grey: ``v`` on all three channels
``P``                                  palette colours; transparent entries as for alpha below
``LA``, ``La``, ``PA``, ``RGBA``,      alpha composited over opaque white
``RGBa``                               (:data:`ALPHA_BACKGROUND`): ``a*c + (1 - a)*white``
``1``/``L``/``RGB``/``I;16`` with a    pixels equal to the transparent colour become white
``transparency`` key (PNG ``tRNS``)
``CMYK``                               Pillow's conversion ``R = (1 - C)(1 - K)`` etc.; no ICC
                                       profile is applied (Adobe's inverted CMYK JPEGs are
                                       un-inverted by Pillow's decoder)
``YCbCr``                              Pillow's conversion (JPEG/JFIF full-range BT.601)
``LAB``                                CIE L*a*b* (D50) to sRGB with Pillow's ImageCms
``HSV``                                Pillow's conversion
``I;16``, ``I;16L``, ``I;16B``,        grey ``v / 65535`` (float tensor); the full 16-bit range
``I;16N``                              maps to [0, 1], whatever bits the content really uses
``I`` (32-bit int) holding 16-bit      grey ``v / 65535`` (float tensor): the decoder's raw mode
samples                                (``I;16``/``I;16B``/``I;16L``/``I;16N``, or a PNM file,
                                       which Pillow scales to 0..65535) says so
``I`` holding 32-bit samples           **refused**: no scale fits both a full-range 32-bit image
                                       and the small-valued depth / count / label maps stored
                                       this way, and signed samples have no intensity reading
``F`` (32-bit float)                   grey ``v`` (float tensor) when every sample is finite and
                                       in [0, 1]; otherwise **refused** (the message gives the
                                       range): [0, 255], [0, 65535] and HDR data all look alike
any other mode                         **refused**
=====================================  =========================================================

A refusal raises :class:`~ka_rs.data.base.ImageDecodeError` (a
:class:`~ka_rs.data.base.DatasetError`) naming the file, the item and the mode, so the
datasets' ``skip_invalid`` handling treats it like any unreadable image. Truncated or corrupt
files raise the same error (``mode`` ``None``) instead of Pillow's own exceptions; this relies
on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``. Multi-frame files (GIF, TIFF,
APNG) give their first frame. Embedded ICC colour profiles are not applied: samples are taken
as sRGB (as torchvision and detectron2 do).

**EXIF orientation** (tag 0x0112, values 2..8) is applied before anything else, with the same
transposes as :func:`PIL.ImageOps.exif_transpose`: annotations are taken to be in the
*displayed* orientation, the one photo viewers and annotation tools such as labelme and VIA
show, and the one detectron2's ``read_image`` loads (torchvision's COCO reader ignores the tag).
Values 0, 1, out-of-range or non-integer tags, and an EXIF block Pillow skips as corrupt, mean
"as stored"; one Pillow raises on is refused. The width and height compared with the
annotation file are the displayed ones; when they differ and the stored ones match, the error
says the annotations were made on the un-rotated pixels (see :func:`load_rgb_image`). A flip or
a 180 degree turn (tags 2, 3, 4) keeps the size, so such a disagreement cannot be detected: if
your annotations ignore the tag, reset it to 1 without touching the pixels (e.g.
``exiftool -n -Orientation=1 FILE``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFile

from .base import DatasetError, ImageDecodeError

if TYPE_CHECKING:
    from PIL.ImageCms import ImageCmsTransform

__all__ = [
    "ALPHA_BACKGROUND",
    "EXIF_ORIENTATION_TAG",
    "DecodedImage",
    "exif_orientation",
    "image_size",
    "load_rgb_image",
    "read_image_size",
    "to_rgb",
]

#: What transparent pixels are composited over (opaque white, 8-bit RGB).
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

#: The EXIF ``Orientation`` tag.
EXIF_ORIENTATION_TAG = 0x0112

#: A decoded image: PIL ``"RGB"`` (8-bit sources) or float32 ``(3, H, W)`` in [0, 1].
DecodedImage = Image.Image | torch.Tensor

_T = Image.Transpose
#: EXIF orientation -> the transpose that shows the stored pixels upright (as ``exif_transpose``).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_PLAIN_8BIT = frozenset({"RGB", "RGBX", "1", "L", "CMYK", "YCbCr", "HSV"})
_WITH_ALPHA = frozenset({"LA", "La", "PA", "RGBA", "RGBa", "P"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # also the unsigned 16-bit rawmodes
_PNM_CODECS = frozenset({"ppm", "ppm_plain"})  # Pillow scales maxval > 255 to 0..65535 ("I")


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1..8; 1 ("as stored") when absent or not a valid value.

    Pillow skips an EXIF directory it cannot parse with a warning (no tag, so 1); what it raises
    instead propagates (the callers turn it into an :class:`~ka_rs.data.base.ImageDecodeError`
    rather than guess the orientation).
    """
    value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    if isinstance(value, int) and not isinstance(value, bool) and value in _ORIENTATION_TRANSPOSE:
        return value
    return 1


def _decoder_range(image: ImageFile.ImageFile) -> float | None:
    """For a not yet loaded mode-``"I"`` image: the sample maximum its decoder declares
    (65535 for 16-bit raw modes and PNM files), ``None`` when the samples are 32-bit or unknown.
    """
    if not image.tile:
        return None
    tile = image.tile[0]  # (codec, extents, offset, args); a namedtuple in Pillow >= 11
    codec, args = tile[0], tile[3]
    if codec in _PNM_CODECS:
        return 65535.0
    rawmode = args if isinstance(args, str) else None
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        rawmode = args[0]
    return 65535.0 if rawmode in _UINT16_MODES else None


@lru_cache(maxsize=1)
def _lab_to_srgb() -> ImageCmsTransform:
    try:
        from PIL import ImageCms
    except ImportError as e:  # Pillow built without LittleCMS
        raise ValueError(f"converting CIE L*a*b* needs Pillow's ImageCms ({e})") from e
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_tensor(grey: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.repeat(grey[None].astype(np.float32, copy=False), 3, axis=0))


def to_rgb(image: Image.Image, *, sample_max: float | None = None) -> DecodedImage:
    """Map a (loaded) PIL image of any supported mode to RGB, as in the module's mode table.

    Returns a new PIL ``"RGB"`` image for 8-bit modes, a new float32 ``(3, H, W)`` tensor in
    [0, 1] for 16-bit / ``I`` / ``F`` images. ``sample_max`` is the sample maximum of a mode
    ``"I"`` image (from its decoder, see :func:`load_rgb_image`); without it such an image is
    refused. EXIF orientation is *not* applied here.

    Raises:
        ValueError: the mode has no sensible RGB reading (the message says why).
    """
    mode = image.mode
    transparent = image.info.get("transparency")
    if mode in _WITH_ALPHA or (transparent is not None and mode in ("1", "L", "RGB")):
        if mode == "La":
            image = image.convert("LA")
        return _composite(image.convert("RGBA"))
    if mode in _PLAIN_8BIT:
        return image.convert("RGB")
    if mode == "LAB":
        return _lab_to_srgb().apply(image)
    if mode in _UINT16_MODES or mode == "I":
        if mode == "I":
            if sample_max is None:
                raise ValueError(
                    "32-bit integer samples have no intensity scale (they may be full-range "
                    "data, depth, counts or labels); save the image as 16-bit (I;16) or as "
                    "float (F) in [0, 1]"
                )
        else:
            sample_max = 65535.0
        raw = np.asarray(image)
        lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if lo < 0 or hi > sample_max:
            raise ValueError(f"samples span {lo}..{hi}, outside the declared 0..{sample_max:.0f}")
        grey = raw.astype(np.float32) / np.float32(sample_max)
        if isinstance(transparent, int) and not isinstance(transparent, bool):
            grey[raw == transparent] = 1.0  # PNG tRNS grey value -> the white background
        return _grey_tensor(grey)
    if mode == "F":
        raw = np.asarray(image, dtype=np.float32)
        if not np.isfinite(raw).all():
            raise ValueError("float samples include NaN or infinity")
        low, high = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float samples span {low:g}..{high:g}, not [0, 1]: the intended scale (1, 255, "
                "65535, HDR) is ambiguous; rescale to [0, 1] or save as 8/16-bit"
            )
        return _grey_tensor(raw)
    raise ValueError("no RGB reading is defined for this mode")


def image_size(image: DecodedImage) -> tuple[int, int]:
    """``(width, height)`` of a decoded image (PIL image or ``(3, H, W)`` tensor)."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def load_rgb_image(
    path: str | os.PathLike[str],
    item: str | None,
    expected_size: tuple[int, int] | None = None,
    size_source: str = "the annotation's width x height",
) -> DecodedImage:
    """Decode an image file fully, apply its EXIF orientation and return it as RGB.

    Returns a PIL ``"RGB"`` image or a float32 ``(3, H, W)`` tensor in [0, 1] (see the
    module's mode table). ``expected_size`` = ``(width, height)`` from the annotations is
    checked against the displayed (EXIF-oriented) size; ``size_source`` names it in the error.

    Raises:
        DatasetError: the file is missing ("image file not found"), or its displayed size is not
            ``expected_size`` (when the stored size is, the message says the annotations seem to
            ignore the EXIF orientation).
        ImageDecodeError: the file is truncated, corrupt, not an image, has an unreadable EXIF
            block, or is in a mode with no RGB reading (``.mode`` says which).
    """
    try:
        with Image.open(path) as im:
            sample_max = _decoder_range(im) if im.mode == "I" else None
            im.load()
            orientation = exif_orientation(im)
            stored_size = im.size
            method = _ORIENTATION_TRANSPOSE.get(orientation)
            upright = im.transpose(method) if method is not None else im
            upright.info = dict(im.info)  # keep tRNS transparency, whichever Pillow transposed
            mode = upright.mode
            try:
                rgb = to_rgb(upright, sample_max=sample_max)
            except ValueError as e:
                raise ImageDecodeError(path, item, f"image mode {mode!r}: {e}", mode=mode) from e
    except FileNotFoundError as e:
        raise DatasetError(path, item, "image file not found") from e
    except DatasetError:
        raise
    except Exception as e:  # Pillow's plugins raise many exception types on bad input
        # (OSError, SyntaxError, EOFError, struct.error, zlib.error, IndexError, KeyError, ...)
        raise ImageDecodeError(path, item, f"cannot decode image: {_describe(e)}") from e
    if expected_size is not None:
        w, h = expected_size
        got = image_size(rgb)
        if got != (w, h):
            msg = f"decoded size {got[0]}x{got[1]} differs from {size_source} {w}x{h}"
            if orientation in _SWAPS_AXES and stored_size == (w, h):
                msg += (
                    f"; the file is stored as {w}x{h} with EXIF orientation {orientation}, which"
                    f" turns it to {got[0]}x{got[1]} for display: the annotations seem made on"
                    " the stored, un-rotated pixels (ka_rs applies the EXIF orientation, as"
                    " viewers and detectron2 do); reset the tag to 1 without rotating the pixels"
                    " (e.g. exiftool -n -Orientation=1 FILE) or fix the width/height and boxes"
                )
            raise DatasetError(path, item, msg)
    return rgb


def read_image_size(path: str | os.PathLike[str], item: str | None) -> tuple[int, int]:
    """``(width, height)`` of an image file as displayed (after EXIF orientation), read from
    its header without decoding the pixels.

    A PNG's EXIF is only looked for ahead of its pixel data (where the PNG specification puts
    the ``eXIf`` chunk): Pillow would decode the whole image to find a late one. Should such a
    file rotate, :func:`load_rgb_image` reports the size mismatch.

    Raises:
        DatasetError: the file is missing.
        ImageDecodeError: the header or EXIF block cannot be read.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            late_png_exif = im.format == "PNG" and "exif" not in im.info
            orientation = 1 if late_png_exif else exif_orientation(im)
    except FileNotFoundError as e:
        raise DatasetError(path, item, "image file not found") from e
    except Exception as e:  # as in load_rgb_image
        raise ImageDecodeError(path, item, f"cannot read image header: {_describe(e)}") from e
    return (h, w) if orientation in _SWAPS_AXES else (w, h)

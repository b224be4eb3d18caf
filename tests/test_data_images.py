"""Image decoding: every Pillow mode to its real RGB content in [0, 1], EXIF orientation applied
before the boxes are used, and named refusals for what has no RGB reading or does not decode.

Every expectation is computed here from the written sample values (numpy), not by asking
Pillow to convert the same image, so a decoder that clips, rescales or mis-rotates is caught.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ka_rs.data import CocoDetection, DatasetError, VocDetection, make_transforms
from ka_rs.data.base import ImageDecodeError
from ka_rs.data.images import (
    ALPHA_BACKGROUND,
    exif_orientation,
    image_size,
    load_rgb_image,
    read_image_size,
    to_rgb,
)
from ka_rs.data.transforms import ToTensor
from PIL import Image

WHITE = np.array(ALPHA_BACKGROUND, dtype=np.float64) / 255.0


def _rgb01(img: Image.Image | torch.Tensor) -> np.ndarray:
    """A decoded image as float64 ``(H, W, 3)`` in [0, 1], whichever form it came in."""
    if isinstance(img, Image.Image):
        assert img.mode == "RGB"
        return np.asarray(img, dtype=np.float64) / 255.0
    assert img.dtype == torch.float32 and img.dim() == 3 and img.shape[0] == 3
    return img.permute(1, 2, 0).double().numpy()


def _load(path: Path) -> np.ndarray:
    out = _rgb01(load_rgb_image(path, "img"))
    assert out.min() >= 0.0 and out.max() <= 1.0
    return out


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None].astype(np.float64), 3, axis=-1)


def _frombytes(mode: str, arr: np.ndarray) -> Image.Image:
    """A PIL image of ``mode`` from an ``(H, W[, C])`` uint8 array (``fromarray(mode=)`` is
    deprecated)."""
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())


def _image16(mode: str, arr: np.ndarray) -> Image.Image:
    """A 16-bit PIL image holding ``arr`` (``convert`` between 16-bit modes clips at 255)."""
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.astype(dtype).tobytes())


def _ramp16(h: int = 4, w: int = 64) -> np.ndarray:
    """A dark-to-bright 16-bit ramp: every row runs 0 .. 65535 left to right."""
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


# ------------------------------------------------------------------ high bit depth


def test_16bit_png_ramp_decodes_to_a_linear_ramp(tmp_path):
    ramp = _ramp16()
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as im:
        assert im.mode in ("I;16", "I")  # Pillow >= 10.? opens it as I;16, older as I
    img = load_rgb_image(tmp_path / "ramp.png", "img")
    assert isinstance(img, torch.Tensor)  # 16 bits kept, not squeezed into 8
    out = _rgb01(img)
    np.testing.assert_allclose(out, _grey(ramp / 65535.0), atol=1e-6)
    assert out[0, 0, 0] == 0.0 and out[0, -1, 0] == 1.0
    assert abs(out.mean() - 0.5) < 1e-3  # the old decoder gave ~0.99 (clipped at 255)
    # the 16-bit precision survives: neighbouring ramp steps (~1040 apart) stay distinct
    assert len(np.unique(out[0, :, 0])) == ramp.shape[1]


def test_16bit_ramp_through_a_coco_dataset_and_both_pipelines(tmp_path):
    ramp = _ramp16(8, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    data = {
        "images": [{"id": 1, "file_name": "ramp.png", "width": 64, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 32, 8]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    val = CocoDetection(tmp_path, tmp_path / "ann.json", transforms=make_transforms("val", 8))
    x, t = val[0]
    np.testing.assert_allclose((x * std + mean)[0, 0].numpy(), ramp[0] / 65535.0, atol=1e-5)
    assert t["boxes"].tolist() == [[0.25, 0.5, 0.5, 1.0]]
    train = CocoDetection(tmp_path, tmp_path / "ann.json", transforms=make_transforms("train", 8))
    x, t = train[0]  # flip / multi-scale resize / colour jitter on the float tensor
    assert x.shape[0] == 3 and torch.isfinite(x).all() and t["boxes"].shape == (1, 4)
    rgb = x * std + mean
    assert -1e-5 <= float(rgb.min()) and float(rgb.max()) <= 1 + 1e-5
    assert 0.3 < float(rgb.mean()) < 0.7  # a ramp, not the old near-white image


@pytest.mark.parametrize("save_mode", ["I;16", "I;16B"])
def test_16bit_tiff_little_and_big_endian(tmp_path, save_mode):
    ramp = _ramp16(3, 17)
    _image16(save_mode, ramp).save(tmp_path / "r.tif")
    with Image.open(tmp_path / "r.tif") as im:
        assert im.mode == save_mode  # I;16 = little endian, I;16B = big endian
    np.testing.assert_allclose(_load(tmp_path / "r.tif"), _grey(ramp / 65535.0), atol=1e-6)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_16bit_modes_in_memory_and_through_the_transforms(mode):
    ramp = _ramp16(2, 9)
    im = _image16(mode, ramp)
    assert im.mode == mode
    expected = ramp / 65535.0
    np.testing.assert_allclose(_rgb01(to_rgb(im)), _grey(expected), atol=1e-6)
    # a 16-bit PIL image handed straight to the transforms is scaled the same way
    x, _ = ToTensor()(im, {})
    np.testing.assert_allclose(x.numpy(), np.repeat(expected[None], 3, 0), atol=1e-6)


def test_16bit_pgm_opens_as_mode_I_and_is_scaled_by_65535(tmp_path):
    ramp = _ramp16(2, 11)
    (tmp_path / "r.pgm").write_bytes(b"P5\n11 2\n65535\n" + ramp.astype(">u2").tobytes())
    with Image.open(tmp_path / "r.pgm") as im:
        assert im.mode == "I"
    np.testing.assert_allclose(_load(tmp_path / "r.pgm"), _grey(ramp / 65535.0), atol=1e-6)
    # a 12-bit PGM (maxval 4095): Pillow scales it to 0..65535, so 4095 is white
    (tmp_path / "r12.pgm").write_bytes(b"P2\n3 1\n4095\n0 2048 4095\n")
    out = _load(tmp_path / "r12.pgm")[0, :, 0]
    np.testing.assert_allclose(out, [0.0, 2048 / 4095, 1.0], atol=1e-4)


def test_16bit_png_with_transparent_grey_value(tmp_path):
    arr = np.array([[0, 300, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "t.png", transparency=300)
    out = _load(tmp_path / "t.png")
    np.testing.assert_allclose(out[0], [[0, 0, 0], WHITE, [1, 1, 1]], atol=1e-6)


def test_32bit_int_image_is_refused_with_path_and_mode(tmp_path):
    Image.fromarray(np.array([[0, 70000, 2**31 - 1]], dtype=np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ImageDecodeError, match=r"i\.tif \(img\): image mode 'I'.*32-bit") as e:
        load_rgb_image(tmp_path / "i.tif", "img")
    assert e.value.mode == "I" and e.value.file.endswith("i.tif")
    assert isinstance(e.value, DatasetError)
    # an in-memory mode-I image has no decoder to say its sample range either
    with pytest.raises(ValueError, match="32-bit"):
        to_rgb(Image.new("I", (2, 2), 5))


def test_float_image_in_unit_range_is_kept(tmp_path):
    vals = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(vals).save(tmp_path / "f.tif")
    img = load_rgb_image(tmp_path / "f.tif", "img")
    assert isinstance(img, torch.Tensor)
    np.testing.assert_array_equal(_rgb01(img), _grey(vals))


@pytest.mark.parametrize(
    "values, pattern",
    [
        ([0.0, 128.0, 255.0], r"span 0\.\.255, not \[0, 1\]"),
        ([-0.5, 0.5, 1.0], r"span -0\.5\.\.1"),
        ([0.0, float("nan"), 1.0], "NaN or infinity"),
        ([0.0, float("inf"), 1.0], "NaN or infinity"),
    ],
)
def test_float_image_out_of_range_or_not_finite_is_refused(tmp_path, values, pattern):
    Image.fromarray(np.array([values], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageDecodeError, match=r"f\.tif.*image mode 'F'.*" + pattern) as e:
        load_rgb_image(tmp_path / "f.tif", "img")
    assert e.value.mode == "F"


# ------------------------------------------------------------------ 8-bit modes


def test_bilevel_grey_and_rgb(tmp_path):
    bits = np.array([[0, 1, 1, 0]], dtype=bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as im:
        assert im.mode == "1"
    np.testing.assert_array_equal(_load(tmp_path / "b.png"), _grey(bits.astype(float)))

    grey = np.array([[0, 1, 127, 254, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    np.testing.assert_array_equal(_load(tmp_path / "l.png"), _grey(grey / 255.0))

    rgb = np.array([[[255, 0, 0], [0, 128, 255]]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = load_rgb_image(tmp_path / "rgb.png", "img")
    assert isinstance(img, Image.Image)  # 8-bit sources stay PIL (exact)
    np.testing.assert_array_equal(_rgb01(img), rgb / 255.0)


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    colours = np.array([[255, 0, 0], [0, 255, 0], [10, 20, 30]], dtype=np.uint8)
    idx = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    im = _frombytes("P", idx)
    im.putpalette(colours.flatten().tolist() + [0] * (768 - colours.size))
    return im, colours[idx[0]]


def test_palette_without_and_with_transparency(tmp_path):
    im, expected = _palette_image()
    im.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as f:
        assert f.mode == "P" and "transparency" not in f.info
    np.testing.assert_array_equal(_load(tmp_path / "p.png")[0], expected / 255.0)
    # palette entry 1 transparent: PNG (tRNS) and GIF both turn it into the white background
    for name in ("pt.png", "pt.gif"):
        im.save(tmp_path / name, transparency=1)
        with Image.open(tmp_path / name) as f:
            assert f.mode == "P" and f.info["transparency"] == 1
        out = _load(tmp_path / name)[0]
        np.testing.assert_array_equal(out[[0, 2]], expected[[0, 2]] / 255.0)
        np.testing.assert_array_equal(out[1], WHITE)
        np.testing.assert_array_equal(out[3], WHITE)


def test_alpha_is_composited_on_white(tmp_path):
    rgb = np.array([[200, 100, 50], [200, 100, 50], [200, 100, 50], [7, 8, 9]], dtype=np.uint8)
    alpha = np.array([255, 128, 0, 0], dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha[:, None]], axis=1)[None]).save(tmp_path / "rgba.png")
    a = alpha[:, None] / 255.0
    expected = a * rgb / 255.0 + (1 - a) * WHITE
    out = _load(tmp_path / "rgba.png")[0]
    np.testing.assert_allclose(out, expected, atol=1.01 / 255)
    # fully transparent pixels are white whatever colour hides under alpha 0
    np.testing.assert_array_equal(out[2], WHITE)
    np.testing.assert_array_equal(out[3], WHITE)

    la = np.array([[[0, 255], [0, 64], [180, 0]]], dtype=np.uint8)
    _frombytes("LA", la).save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as f:
        assert f.mode == "LA"
    a = la[0, :, 1:] / 255.0
    expected = a * (la[0, :, :1] / 255.0) + (1 - a) * WHITE
    np.testing.assert_allclose(_load(tmp_path / "la.png")[0], expected, atol=1.01 / 255)


def test_grey_and_rgb_with_trns_colour(tmp_path):
    grey = Image.fromarray(np.array([[50, 7, 50]], dtype=np.uint8))
    grey.save(tmp_path / "l.png", transparency=7)
    np.testing.assert_allclose(
        _load(tmp_path / "l.png")[0], [[50 / 255] * 3, WHITE, [50 / 255] * 3], atol=1e-9
    )
    rgb = np.array([[[1, 2, 3], [9, 9, 9]]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(1, 2, 3))
    np.testing.assert_allclose(_load(tmp_path / "rgb.png")[0], [WHITE, [9 / 255] * 3], atol=1e-9)
    Image.fromarray(np.array([[0, 1]], dtype=bool)).save(tmp_path / "b.png", transparency=1)
    np.testing.assert_allclose(_load(tmp_path / "b.png")[0], [[0, 0, 0], WHITE], atol=1e-9)


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    c, m, y, k = (cmyk[..., i] / 255.0 for i in range(4))
    return np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], axis=-1)


def test_cmyk_tiff_and_jpeg(tmp_path):
    cmyk = np.array(
        [[[0, 255, 255, 0], [255, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0], [0, 128, 0, 64]]],
        dtype=np.uint8,
    )
    _frombytes("CMYK", cmyk).save(tmp_path / "c.tif")
    np.testing.assert_allclose(_load(tmp_path / "c.tif"), _cmyk_to_rgb(cmyk), atol=1.01 / 255)
    # JPEG (lossy, Adobe-inverted on disk): flat 16x16 blocks, compare the block centres
    blocks = np.repeat(np.repeat(cmyk, 16, axis=0), 16, axis=1)
    _frombytes("CMYK", blocks).save(tmp_path / "c.jpg", quality=100)
    with Image.open(tmp_path / "c.jpg") as f:
        assert f.mode == "CMYK"
    out = _load(tmp_path / "c.jpg")[8, 8::16]
    np.testing.assert_allclose(out, _cmyk_to_rgb(cmyk)[0], atol=6 / 255)


def test_ycbcr_tiff(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
    r, g, b = (rgb[..., i].astype(float) for i in range(3))  # JFIF full-range BT.601
    ycc = np.stack(
        [
            0.299 * r + 0.587 * g + 0.114 * b,
            128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
            128 + 0.5 * r - 0.418688 * g - 0.081312 * b,
        ],
        axis=-1,
    )
    _frombytes("YCbCr", ycc.round().clip(0, 255).astype(np.uint8)).save(tmp_path / "y.tif")
    with Image.open(tmp_path / "y.tif") as f:
        assert f.mode == "YCbCr"
    np.testing.assert_allclose(_load(tmp_path / "y.tif"), rgb / 255.0, atol=3 / 255)


def test_lab_tiff(tmp_path):
    # Pillow's LAB: L* scaled to 0..255, a* and b* signed bytes
    lab = np.array([[[255, 0, 0], [0, 0, 0], [138, 81, 70]]], dtype=np.uint8)
    _frombytes("LAB", lab).save(tmp_path / "lab.tif")
    with Image.open(tmp_path / "lab.tif") as f:
        assert f.mode == "LAB"
    out = _load(tmp_path / "lab.tif")[0]
    np.testing.assert_allclose(out[0], [1, 1, 1], atol=2 / 255)  # L*=100: white
    np.testing.assert_allclose(out[1], [0, 0, 0], atol=2 / 255)  # L*=0: black
    # L*=54, a*=81, b*=70: sRGB red
    np.testing.assert_allclose(out[2], [1, 0, 0], atol=6 / 255)


@pytest.mark.parametrize(
    "mode, pixel, expected",
    [
        ("RGBX", (10, 20, 30, 99), (10, 20, 30)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("HSV", (85, 255, 255), (0, 255, 0)),
        ("RGBa", (100, 50, 0, 128), None),  # premultiplied: 100/0.502 = 199 over white
        ("La", (100, 128), None),
        ("PA", None, None),
    ],
)
def test_in_memory_modes_files_rarely_hold(mode, pixel, expected):
    if mode == "PA":
        im = Image.new("PA", (1, 1), (1, 0))
        im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        np.testing.assert_array_equal(_rgb01(to_rgb(im))[0, 0], WHITE)  # alpha 0
        im = Image.new("PA", (1, 1), (1, 255))
        im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        np.testing.assert_array_equal(_rgb01(to_rgb(im))[0, 0], [0, 0, 1])
        return
    out = _rgb01(to_rgb(Image.new(mode, (1, 1), pixel)))[0, 0] * 255
    if mode == "RGBa":
        expected = [199 * 128 / 255 + 255 * 127 / 255, 100 * 128 / 255 + 255 * 127 / 255, 127]
    elif mode == "La":
        expected = [199 * 128 / 255 + 255 * 127 / 255] * 3
    np.testing.assert_allclose(out, expected, atol=1.5)


def test_multi_frame_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    np.testing.assert_allclose(_load(tmp_path / "a.gif")[0, 0], [1, 0, 0], atol=1e-9)


# ------------------------------------------------------------------ EXIF orientation


def _displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The upright view of ``stored`` (H, W, C) per the EXIF 2.3 definition of the tag."""
    return {
        1: lambda a: a,
        2: np.fliplr,  # mirrored horizontally
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: a.transpose(1, 0, 2),  # mirrored + 90 CW = transposed
        6: lambda a: np.rot90(a, -1),  # 90 clockwise
        7: lambda a: np.rot90(np.fliplr(a), -1),  # transverse
        8: lambda a: np.rot90(a, 1),  # 90 counter-clockwise
    }[orientation](stored)


def _stored_for(displayed: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels that ``orientation`` turns into ``displayed`` (found by search)."""
    inverse = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}[orientation]
    stored = np.ascontiguousarray(_displayed(displayed, inverse))
    assert np.array_equal(_displayed(stored, orientation), displayed)
    return stored


def _scene(w: int = 64, h: int = 32) -> tuple[np.ndarray, list[float]]:
    """Upright ``h x w`` picture: grey, a red 'object' at a known COCO box, a blue corner mark."""
    img = np.full((h, w, 3), 128, dtype=np.uint8)
    x, y, bw, bh = 40, 4, 16, 16  # off-centre both ways: no flip or turn maps it onto itself
    img[y : y + bh, x : x + bw] = (255, 0, 0)
    img[:8, :8] = (0, 0, 255)
    return img, [float(x), float(y), float(bw), float(bh)]


def _save_jpeg(arr: np.ndarray, path: Path, orientation: int | None) -> None:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, subsampling=0, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright, _ = _scene()
    _save_jpeg(_stored_for(upright, orientation), tmp_path / "o.jpg", orientation)
    with Image.open(tmp_path / "o.jpg") as im:
        assert exif_orientation(im) == orientation
    out = _load(tmp_path / "o.jpg")
    assert out.shape == upright.shape
    assert np.abs(out - upright / 255.0).mean() < 0.01
    assert read_image_size(tmp_path / "o.jpg", "img") == (64, 32)


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_invalid_orientation_values_mean_as_stored(tmp_path, value):
    upright, _ = _scene()
    _save_jpeg(upright, tmp_path / "o.jpg", value)
    assert np.abs(_load(tmp_path / "o.jpg") - upright / 255.0).mean() < 0.01


def test_orientation_applies_to_16bit_png_too(tmp_path):
    ramp = _ramp16(2, 5)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(ramp).save(tmp_path / "r.png", exif=exif.tobytes())
    out = _load(tmp_path / "r.png")
    np.testing.assert_allclose(out, _grey(np.rot90(ramp, -1) / 65535.0), atol=1e-6)
    assert read_image_size(tmp_path / "r.png", "img") == (2, 5)  # eXIf ahead of IDAT


def _coco(tmp_path: Path, size: tuple[int, int] | None, bbox: list[float]) -> tuple[Path, Path]:
    image = {"id": 1, "file_name": "o.jpg"}
    if size is not None:
        image["width"], image["height"] = size
    data = {
        "images": [image],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path, tmp_path / "ann.json"


def _box_mean(img: Image.Image | torch.Tensor, box: list[float]) -> np.ndarray:
    x1, y1, x2, y2 = (round(v) for v in box)
    return _rgb01(img)[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean(axis=(0, 1))


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("size_in_file", [True, False])
def test_coco_box_stays_on_the_object_of_a_rotated_jpeg(tmp_path, orientation, size_in_file):
    upright, bbox = _scene()
    _save_jpeg(_stored_for(upright, orientation), tmp_path / "o.jpg", orientation)
    ds = CocoDetection(*_coco(tmp_path, (64, 32) if size_in_file else None, bbox))
    assert ds.coco.imgs[1]["width"] == 64 and ds.coco.imgs[1]["height"] == 32
    img, t = ds[0]
    assert image_size(img) == (64, 32)
    assert t["orig_size"].tolist() == [32, 64]
    box = t["boxes"][0].tolist()
    assert box == [40.0, 4.0, 56.0, 20.0]
    np.testing.assert_allclose(_box_mean(img, box), [1, 0, 0], atol=0.05)  # red under the box
    # and after the standard pipeline the normalised box still sits on the red object
    x, tt = make_transforms("val", 32)(img, t)
    cx, cy, bw, bh = tt["boxes"][0].tolist()
    h, w = x.shape[1:]
    crop = x[:, round((cy - bh / 4) * h) : round((cy + bh / 4) * h)]
    crop = crop[:, :, round((cx - bw / 4) * w) : round((cx + bw / 4) * w)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1)
    rgb = (crop.flatten(1) * std + mean).mean(1)
    assert rgb[0] > 0.9 and rgb[1] < 0.1 and rgb[2] < 0.1


def test_coco_size_of_the_stored_pixels_is_a_clear_error(tmp_path):
    upright, bbox = _scene()
    _save_jpeg(_stored_for(upright, 6), tmp_path / "o.jpg", 6)
    # annotated on the un-rotated 32x64 bitmap: width/height are the stored ones
    ds = CocoDetection(*_coco(tmp_path, (32, 64), [2.0, 2.0, 8.0, 8.0]))
    pattern = (
        r"o\.jpg \(image id 1\): decoded size 64x32 differs from the annotation file's width x "
        r"height 32x64; the file is stored as 32x64 with EXIF orientation 6.*stored, un-rotated"
    )
    with pytest.raises(DatasetError, match=pattern):
        ds[0]
    lenient = CocoDetection(*_coco(tmp_path, (32, 64), [2.0, 2.0, 8.0, 8.0]), skip_invalid=True)
    assert lenient.check_images() == [0]
    assert "EXIF orientation 6" in lenient.skipped[0].message


def test_voc_rotated_jpeg(tmp_path):
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    upright, (x, y, bw, bh) = _scene()
    _save_jpeg(_stored_for(upright, 8), root / "JPEGImages" / "a.jpg", 8)
    _save_jpeg(_stored_for(upright, 5), root / "JPEGImages" / "b.jpg", 5)
    box = (
        f"<xmin>{x + 1:g}</xmin><ymin>{y + 1:g}</ymin>"
        f"<xmax>{x + bw:g}</xmax><ymax>{y + bh:g}</ymax>"
    )
    obj = f"<object><name>car</name><difficult>0</difficult><bndbox>{box}</bndbox></object>"
    sizes = {"a": "<size><width>64</width><height>32</height></size>", "b": ""}  # b: header
    for name, size in sizes.items():
        xml = f"<annotation><filename>{name}.jpg</filename>{size}{obj}</annotation>"
        (root / "Annotations" / f"{name}.xml").write_text(xml)
    (root / "ImageSets/Main/trainval.txt").write_text("a\nb\n")
    ds = VocDetection(root, "trainval")
    for i in range(2):
        img, t = ds[i]
        assert image_size(img) == (64, 32)
        assert t["boxes"][0].tolist() == [40.0, 4.0, 56.0, 20.0]
        np.testing.assert_allclose(_box_mean(img, t["boxes"][0].tolist()), [1, 0, 0], atol=0.05)


# ------------------------------------------------------------------ hostile files


def _png_bytes() -> bytes:
    from io import BytesIO

    buf = BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(exif: bytes | None = None) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _corrupt_idat(data: bytes) -> bytes:
    i = data.index(b"IDAT") + 20
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def _bad_zlib_png() -> bytes:
    """A PNG whose IDAT has a valid CRC but is not zlib data."""
    ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    sig = b"\x89PNG\r\n\x1a\n"
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib at all") + chunk(b"IEND", b"")


def _broken_exif_jpeg() -> bytes:
    """A JPEG whose EXIF IFD0 claims entries far past the end of the block."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff\xff" + b"\x01\x12\x00\x03"
    return _jpeg_bytes(b"Exif\x00\x00" + tiff)


HOSTILE = {
    "empty.png": lambda: b"",
    "text.jpg": lambda: b"this is not an image at all\n",
    "random.png": lambda: np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes(),
    "png_signature_only.png": lambda: b"\x89PNG\r\n\x1a\n",
    "truncated_half.png": lambda: _png_bytes()[: len(_png_bytes()) // 2],
    "truncated_in_idat.png": lambda: _png_bytes()[:-40],
    "bad_crc.png": lambda: _corrupt_idat(_png_bytes()),
    "bad_zlib.png": _bad_zlib_png,
    "truncated.jpg": lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
    "jpeg_header_only.jpg": lambda: _jpeg_bytes()[:200],
    "jpeg_soi_only.jpg": lambda: b"\xff\xd8\xff\xe0",
    "tiff_bad_ifd.tif": lambda: b"II*\x00\xff\xff\xff\x7f" + b"\x00" * 64,
    "tiff_header_only.tif": lambda: b"II*\x00\x08\x00\x00\x00\x01\x00",
    "gif_truncated.gif": lambda: b"GIF89a\x04\x00\x04\x00\x80\x00\x00",
    "bmp_truncated.bmp": lambda: b"BM" + b"\x00" * 20,
    "pgm_short.pgm": lambda: b"P5\n4 4\n65535\n\x00\x01",
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_corrupt_and_truncated_files_raise_a_named_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE[name]())
    with pytest.raises(ImageDecodeError, match=re.escape(f"{name} (img): cannot")) as e:
        load_rgb_image(path, "img")
    assert e.value.mode is None and e.value.file == str(path)
    assert isinstance(e.value.__cause__, Exception)  # Pillow's error kept as the cause


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_corrupt_exif_block_reads_as_no_orientation(tmp_path):
    # Pillow skips an IFD0 it cannot parse (with a warning): no orientation tag is read, so the
    # pixels are used as stored (a parse error Pillow raised instead would be an ImageDecodeError)
    path = tmp_path / "e.jpg"
    path.write_bytes(_broken_exif_jpeg())
    with Image.open(path) as im:
        assert exif_orientation(im) == 1
    assert image_size(load_rgb_image(path, "img")) == (32, 32)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.png \(img\): image file not found"):
        load_rgb_image(tmp_path / "nope.png", "img")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageDecodeError, match=r"dir\.png \(img\): cannot decode image"):
        load_rgb_image(tmp_path / "dir.png", "img")
    with pytest.raises(ImageDecodeError, match=r"dir\.png \(img\): cannot read image header"):
        read_image_size(tmp_path / "dir.png", "img")


def test_decompression_bomb_is_a_named_error(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match=r"big\.png.*cannot decode image.*exceeds"):
        load_rgb_image(tmp_path / "big.png", "img")


def test_refusals_and_corrupt_files_are_skipped_with_skip_invalid(tmp_path):
    names = {"ok.png": None, "int32.tif": "I", "float255.tif": "F", "trunc.png": None}
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    Image.fromarray(np.full((8, 8), 7, np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray(np.full((8, 8), 255.0, np.float32)).save(tmp_path / "float255.tif")
    (tmp_path / "trunc.png").write_bytes(_png_bytes()[:100])
    data = {
        "images": [
            {"id": i + 1, "file_name": n, "width": 8 if n != "trunc.png" else 32, "height": 8}
            for i, n in enumerate(names)
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    data["images"][3]["height"] = 32
    (tmp_path / "ann.json").write_text(json.dumps(data))
    strict = CocoDetection(tmp_path, tmp_path / "ann.json")
    with pytest.raises(ImageDecodeError, match=r"int32\.tif \(image id 2\): image mode 'I'"):
        strict[1]
    ds = CocoDetection(tmp_path, tmp_path / "ann.json", skip_invalid=True)
    assert ds.check_images() == [1, 2, 3]
    assert [s.item for s in ds.skipped] == ["image id 2", "image id 3", "image id 4"]
    assert "image mode 'F'" in ds.skipped[1].message and "cannot decode" in ds.skipped[2].message
    img, t = ds[2]  # falls through the bad ones to the next readable item (wraps to 0)
    assert t["image_id"] == 1 and image_size(img) == (8, 8)

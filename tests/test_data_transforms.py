"""Transforms move boxes with the image; collate pads and masks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from ka_rs.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    Resize,
    ShapesDataset,
    ToTensor,
    collate_fn,
    make_transforms,
)
from ka_rs.data.transforms import default_scales, resized_shape
from PIL import Image


def _target(boxes, h, w) -> dict:
    b = torch.tensor(boxes, dtype=torch.float32)
    size = torch.tensor([h, w])
    return {
        "boxes": b,
        "labels": torch.arange(len(b)),
        "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
        "iscrowd": torch.zeros(len(b), dtype=torch.int64),
        "image_id": 1,
        "orig_size": size,
        "size": size.clone(),
    }


def _image_with_block(h: int, w: int, box: tuple[int, int, int, int]) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = 255
    return Image.fromarray(arr)


def _bright_bbox(img) -> list[float]:
    a = np.asarray(img) if isinstance(img, Image.Image) else img.permute(1, 2, 0).numpy() * 255
    ys, xs = np.nonzero(a[..., 0] > 127)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flip_moves_boxes_with_pixels(as_tensor):
    img = _image_with_block(20, 30, (3, 4, 10, 12))
    image = ToTensor()(img, {})[0] if as_tensor else img
    t = _target([[3, 4, 10, 12]], 20, 30)
    out, ot = RandomHorizontalFlip(p=1.0)(image, t)
    assert ot["boxes"].tolist() == [[20, 4, 27, 12]]
    assert _bright_bbox(out) == [20, 4, 27, 12]
    assert t["boxes"].tolist() == [[3, 4, 10, 12]]  # input untouched
    same, st = RandomHorizontalFlip(p=0.0)(image, t)
    assert st["boxes"].tolist() == [[3, 4, 10, 12]]


def test_flip_probability_uses_generator():
    g = torch.Generator().manual_seed(0)
    flip = RandomHorizontalFlip(0.5, generator=g)
    t = _target([[0, 0, 1, 1]], 4, 4)
    flips = sum(flip(torch.zeros(3, 4, 4), t)[1]["boxes"][0, 0].item() == 3 for _ in range(400))
    assert 150 < flips < 250


def test_resized_shape_rules():
    assert resized_shape(480, 640, 240) == (240, 320)
    assert resized_shape(640, 480, 240) == (320, 240)
    assert resized_shape(100, 1000, 200, max_size=500) == (50, 500)  # long side capped
    assert resized_shape(100, 1000, 200) == (200, 2000)
    assert resized_shape(50, 60, (10, 20)) == (10, 20)
    with pytest.raises(ValueError, match="size"):
        resized_shape(10, 10, 0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_resize_scales_boxes_area_and_size(as_tensor):
    img = _image_with_block(40, 60, (6, 8, 30, 24))
    image = ToTensor()(img, {})[0] if as_tensor else img
    t = _target([[6, 8, 30, 24]], 40, 60)
    out, ot = Resize(20)(image, t)
    size = (out.height, out.width) if isinstance(out, Image.Image) else tuple(out.shape[1:])
    assert size == (20, 30)
    assert ot["boxes"].tolist() == [[3, 4, 15, 12]]
    assert ot["area"].tolist() == [pytest.approx(24 * 16 / 4)]
    assert ot["size"].tolist() == [20, 30] and ot["orig_size"].tolist() == [40, 60]
    assert _bright_bbox(out) == [3, 4, 15, 12]
    # exact (h, w) resize: anisotropic
    _, ot2 = Resize((80, 30))(image, t)
    assert ot2["boxes"].tolist() == [[3, 16, 15, 48]]


def test_random_resize_picks_from_sizes_and_respects_max_size():
    g = torch.Generator().manual_seed(1)
    rr = RandomResize([16, 24, 32], max_size=40, generator=g)
    seen = set()
    for _ in range(50):
        out, ot = rr(torch.zeros(3, 20, 40), _target([[0, 0, 40, 20]], 20, 40))
        h, w = out.shape[1:]
        assert w <= 40 and ot["size"].tolist() == [h, w]
        assert ot["boxes"].tolist() == [[0, 0, w, h]]
        seen.add(h)
    assert seen == {16, 20}  # 24 and 32 would exceed max_size: capped to 20x40
    assert default_scales(128) == [96, 104, 112, 120, 128]
    with pytest.raises(ValueError, match="sizes"):
        RandomResize([])


def test_normalize_converts_boxes_to_cxcywh_and_standardises():
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    t = _target([[10, 5, 30, 15], [0, 0, 40, 20]], 20, 40)
    x, nt = Normalize()(img, t)
    assert x.shape == (3, 20, 40)
    expect = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]]
    assert torch.allclose(x[:2, 0, 0], torch.tensor(expect))
    assert torch.allclose(nt["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]))
    assert nt["size"].tolist() == [20, 40]


def test_color_jitter_changes_colours_not_geometry():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = _target([[1, 1, 4, 4]], 8, 8)
    out, ot = ColorJitter(0.4, 0.4, 0.4, generator=g)(x, t)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert out.min() >= 0 and out.max() <= 1
    assert ot is t
    # zero strength is the identity
    same, _ = ColorJitter(0.0, 0.0, 0.0)(x, t)
    assert torch.allclose(same, x)
    # brightness alone scales the pixels
    bright, _ = ColorJitter(0.5, 0, 0, generator=torch.Generator().manual_seed(3))(x * 0.5, t)
    ratio = bright / (x * 0.5)
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5)
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=1.5)


def test_color_jitter_equals_sequential_definition():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.6 + 0.2
    out, _ = ColorJitter(0.3, 0.3, 0.3, generator=torch.Generator().manual_seed(5))(x, {})
    g = torch.Generator().manual_seed(5)
    b, c, s = (0.7 + 0.6 * float(torch.rand((), generator=g)) for _ in range(3))
    w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    y = x * b
    m = (y * w).sum(0).mean()
    y = (y - m) * c + m
    gray = (y * w).sum(0, keepdim=True)
    y = ((y - gray) * s + gray).clamp(0, 1)
    assert torch.allclose(out, y, atol=1e-6)


def test_make_transforms_pipelines():
    ds = ShapesDataset("val", 4, image_size=64)
    img, t = ds[0]
    ev = make_transforms(False, 64)
    x, et = ev(img, t)
    assert x.shape == (3, 64, 64)
    assert torch.allclose(et["boxes"][:, 2], (t["boxes"][:, 2] - t["boxes"][:, 0]) / 64)
    assert make_transforms("val", 64).transforms[0].size == 64
    torch.manual_seed(0)
    tr = make_transforms("train", 64, max_size=64)
    sizes = set()
    for _ in range(20):
        x, tt = tr(img, t)
        sizes.add(x.shape[1])
        assert torch.all((tt["boxes"] >= 0) & (tt["boxes"] <= 1))
        assert tt["size"].tolist() == list(x.shape[1:])
    assert sizes <= set(default_scales(64)) and len(sizes) > 1
    assert isinstance(tr, Compose)
    with pytest.raises(ValueError, match="train"):
        make_transforms("training", 64)


def test_collate_pads_and_masks():
    a = torch.ones(3, 4, 6)
    b = torch.full((3, 5, 3), 2.0)
    ta, tb = {"labels": torch.tensor([1])}, {"labels": torch.tensor([2, 3])}
    images, mask, targets = collate_fn([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :4, :6], a) and images[0, :, 4:].abs().sum() == 0
    assert torch.equal(images[1, :, :5, :3], b) and images[1, :, :, 3:].abs().sum() == 0
    assert mask[0, :4, :6].sum() == 0 and mask[0, 4:].all()
    assert mask[1, :5, :3].sum() == 0 and mask[1, :, 3:].all()
    assert int((~mask).sum()) == 4 * 6 + 5 * 3
    assert targets == [ta, tb]
    images, mask, _ = functools.partial(collate_fn, pad_to_multiple=4)([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 8, 8) and mask[:, 5:].all()


def test_collate_rejects_untransformed_items():
    raw = ShapesDataset("val", 2, image_size=32)
    with pytest.raises(ValueError, match=r"item 0 image is a Image.*make_transforms"):
        collate_fn([raw[0], raw[1]])
    with pytest.raises(ValueError, match="empty"):
        collate_fn([])


def test_dataloader_with_workers_end_to_end():
    ds = ShapesDataset("val", 8, image_size=48, transforms=make_transforms(True, 48))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_fn)
    batches = list(loader)
    assert len(batches) == 2
    images, mask, targets = batches[0]
    assert images.shape[0] == 4 and mask.shape == (4, *images.shape[2:])
    for i, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert not mask[i, :h, :w].any() and mask[i].sum() == mask.shape[1] * mask.shape[2] - h * w
        assert t["boxes"].shape[0] == t["labels"].shape[0] >= 1

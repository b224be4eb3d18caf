"""CNN backbones: ResNet-18/34/50/101 with frozen BatchNorm, and a small CNN for CPU presets.

Every backbone maps images ``(B, 3, H, W)`` to ONE feature map ``(B, C, H/s, W/s)`` (the last
stage only, as in DETR) and downsamples the padding mask ``(B, H, W)`` (bool, True = padded
pixel) to the feature map's size.

The ResNets follow torchvision's layout (ResNet v1.5: the stride sits on the 3×3 convolution of
a bottleneck) and name their modules like torchvision (``conv1``, ``bn1``, ``layer1`` ..
``layer4``), so the state dict of a torchvision ResNet weights file you own loads with
:meth:`ResNet.load_torchvision_state_dict` (its ``fc.*`` classifier and BatchNorm
``num_batches_tracked`` counters are dropped). Nothing is downloaded.

**Dilation (DC5).** ``ResNet(depth, dilation=True)`` is torchvision's
``replace_stride_with_dilation=[False, False, True]`` (DETR's ``--dilation``, the "DC5" models):
the last stage keeps the resolution of the one before, so the output stride is 16 instead of 32.
In that stage the first block's 3×3 convolution and its 1×1 ``downsample`` shortcut have stride
1 (the 3×3 keeps dilation 1, as torchvision gives the first block the previous dilation), and the
3×3 convolutions of the other blocks have dilation 2 and padding 2. The weights and their shapes
are those of the undilated ResNet: only the convolutions' stride / dilation / padding change.
Only the bottleneck ResNets (50, 101) can be dilated, as in torchvision.

BatchNorm is *frozen* (:class:`FrozenBatchNorm2d`: fixed affine transform from stored running
statistics), as DETR does for pretrained ResNets. A ResNet trained from scratch therefore has no
normalisation at all; train from scratch with the small CNN instead, which uses GroupNorm
(independent of the batch, so results do not depend on how a batch is split across processes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ka_rs.models.weights import state_dict_mismatch

__all__ = [
    "BACKBONES",
    "DILATABLE",
    "Backbone",
    "FrozenBatchNorm2d",
    "ResNet",
    "SmallCNN",
    "build_backbone",
]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, never trained).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel. The state
    dict holds ``weight``, ``bias``, ``running_mean``, ``running_var`` like ``nn.BatchNorm2d``;
    a ``num_batches_tracked`` entry in a loaded state dict is ignored.
    """

    # buffers (registered in __init__)
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` (B, C, H, W) channel-wise; returns the same shape."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3×3 convolutions and a shortcut (no dilated form)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        if dilation != 1:
            raise ValueError("dilation: ResNet-18/34 basic blocks cannot be dilated")
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = FrozenBatchNorm2d(width)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != width:
            self.downsample = nn.Sequential(
                _conv1x1(in_ch, width, stride), FrozenBatchNorm2d(width)
            )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, width, H/stride, W/stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """ResNet-50/101 block: 1×1 reduce, 3×3 (strided, v1.5; optionally dilated), 1×1 expand ×4,
    and a shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_ch)
        self.bn3 = FrozenBatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                _conv1x1(in_ch, out_ch, stride), FrozenBatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, 4·width, H/stride, W/stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + shortcut)


_RESNET_SPECS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}

#: the ResNets that can be dilated (bottleneck blocks, as in torchvision)
DILATABLE = ("resnet50", "resnet101")


class ResNet(nn.Module):
    """ResNet body without the classifier; returns the last stage (stride 32, or 16 dilated).

    Args:
        depth: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``.
        dilation: DC5: dilate the last stage instead of striding it (see the module
            docstring); ``"resnet50"`` / ``"resnet101"`` only.

    Attributes:
        num_channels: channels of the output feature map (512, or 2048 for ResNet-50/101).
        stride: total downsampling factor (32, or 16 with ``dilation``).
        dilation: whether the last stage is dilated.
    """

    def __init__(self, depth: str = "resnet50", dilation: bool = False) -> None:
        super().__init__()
        if depth not in _RESNET_SPECS:
            raise ValueError(f"depth: expected one of {sorted(_RESNET_SPECS)}, got {depth!r}")
        if dilation and depth not in DILATABLE:
            raise ValueError(
                f"dilation: only {list(DILATABLE)} can be dilated (bottleneck blocks), "
                f"got {depth!r}"
            )
        block, counts = _RESNET_SPECS[depth]
        self.dilation = bool(dilation)
        self.stride = 16 if self.dilation else 32
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        stages = []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            dilate = self.dilation and i == 3  # DC5: the last stage trades stride for dilation
            blocks = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0 and not dilate) else 1
                # torchvision: the stage's first block keeps the previous dilation (1)
                block_dilation = 2 if (dilate and j > 0) else 1
                blocks.append(block(in_ch, width, stride, block_dilation))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_channels = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_channels, ~H/stride, ~W/stride) (ceil(H/32), or ceil(H/16)
        dilated)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out: Tensor = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return out

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the state dict of a torchvision ResNet of the same depth.

        ``fc.*`` (the ImageNet classifier) and ``*.num_batches_tracked`` entries are dropped;
        every other key must match exactly. A dilated ResNet loads the same weights as the
        undilated one (dilation changes no shape).

        Raises:
            ValueError: missing or unexpected keys, or a shape mismatch (wrong depth).
        """
        own = self.state_dict()
        kept = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
        }
        problem = state_dict_mismatch(own, kept, limit=5)
        if problem:
            raise ValueError(
                f"state_dict: not a torchvision ResNet state dict for this depth ({problem})"
            )
        self.load_state_dict(kept)


class SmallCNN(nn.Module):
    """A few strided 3×3 conv stages with GroupNorm, for CPU-sized presets.

    Stage ``i`` halves the resolution (3×3 conv, stride 2) and adds one 3×3 conv (stride 1) with a
    residual connection; each conv is followed by GroupNorm (8 groups) and ReLU. Output stride is
    ``2 ** len(channels)``.

    Args:
        channels: output channels of each stage, e.g. ``(32, 64, 128, 128)`` (stride 16).

    Attributes:
        num_channels: channels of the output feature map (``channels[-1]``).
        stride: total downsampling factor.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 128)) -> None:
        super().__init__()
        if not channels or any(c <= 0 or c % 8 for c in channels):
            raise ValueError(f"channels: expected positive multiples of 8, got {channels!r}")
        self.stages = nn.ModuleList()
        in_ch = 3
        for out_ch in channels:
            self.stages.append(
                nn.ModuleDict(
                    {
                        "down": nn.Sequential(
                            nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                            nn.GroupNorm(8, out_ch),
                            nn.ReLU(inplace=True),
                        ),
                        "refine": nn.Sequential(
                            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                            nn.GroupNorm(8, out_ch),
                        ),
                    }
                )
            )
            in_ch = out_ch
        self.num_channels = in_ch
        self.stride = 2 ** len(channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_channels, ~H/stride, ~W/stride)."""
        for stage in cast("Iterable[nn.ModuleDict]", self.stages):
            x = stage["down"](x)
            x = F.relu(x + stage["refine"](x))
        return x


#: backbone names accepted by :func:`build_backbone` / ``DetrConfig.backbone``
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "small_cnn")


class Backbone(nn.Module):
    """A CNN body plus padding-mask downsampling.

    Args:
        name: one of :data:`BACKBONES`.
        cnn_channels: stage widths of ``small_cnn`` (ignored by the ResNets).
        dilation: DC5, a dilated last stage (output stride 16); ResNet-50/101 only.

    Attributes:
        body: the CNN (:class:`ResNet` or :class:`SmallCNN`); in a DETR its state-dict keys are
            ``backbone.body.<torchvision key>``.
        num_channels: channels of the feature map.
        stride: total downsampling factor.
    """

    def __init__(
        self,
        name: str = "resnet50",
        cnn_channels: tuple[int, ...] = (32, 64, 128, 128),
        dilation: bool = False,
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone: expected one of {list(BACKBONES)}, got {name!r}")
        if dilation and name not in DILATABLE:
            raise ValueError(
                f"dilation: only the {list(DILATABLE)} backbones can be dilated, got {name!r}"
            )
        self.name = name
        self.body: ResNet | SmallCNN
        self.body = SmallCNN(cnn_channels) if name == "small_cnn" else ResNet(name, dilation)
        self.num_channels = self.body.num_channels
        self.stride = self.body.stride

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Features of ``images`` (B, 3, H, W) and ``mask`` (B, H, W) bool (True = padding).

        Returns:
            ``(features (B, C, h, w), mask (B, h, w) bool)``; the mask is nearest-neighbour
            downsampled to the feature map, as in DETR.
        """
        features = self.body(images)
        small = F.interpolate(mask[:, None].float(), size=features.shape[-2:])[:, 0]
        return features, small.to(torch.bool)


def build_backbone(
    name: str, cnn_channels: tuple[int, ...] = (32, 64, 128, 128), dilation: bool = False
) -> Backbone:
    """The backbone called ``name`` (see :data:`BACKBONES`), randomly initialised."""
    return Backbone(name, cnn_channels, dilation)

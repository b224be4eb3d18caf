"""Hungarian matcher for DETR-family detectors, a drop-in for DETR's ``HungarianMatcher``.

The cost of assigning query ``q`` to target ``t`` of the same image is::

    cost_class * C_class[q, t] + cost_bbox * ||box_q - box_t||_1 - cost_giou * GIoU(box_q, box_t)

with L1 on normalised (cx, cy, w, h) boxes and GIoU on their xyxy corners. The class cost is
``-softmax(logits)[label]`` for softmax heads (DETR: ``K = C + 1`` logits, the last one is
"no object"), or the sigmoid focal cost of Deformable DETR / DINO for sigmoid heads (``K = C``)::

    alpha * (1 - p)^gamma * -log(p + 1e-8) - (1 - alpha) * p^gamma * -log(1 - p + 1e-8)

Unlike the reference implementation, which builds one [B·Q, ΣT] matrix for the whole batch in
torch (most of it cross-image blocks it throws away), copies it to the CPU and loops over images
with scipy, the Rust core builds only each image's own Q×T_i block and solves every image and
every decoder layer in one call with the GIL released.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

from ka_rs import _native
from ka_rs.ops import _torch_memory

__all__ = ["HungarianMatcher", "MatchIndices"]

#: (query indices, target indices) of one image: two int64 tensors of equal length.
MatchIndices = tuple[torch.Tensor, torch.Tensor]

_CLASS_COSTS = ("softmax", "focal")
_F32_MAX = float(np.finfo(np.float32).max)


def _field(obj: Any, key: str, where: str) -> Any:
    """``obj[key]`` for mappings (and DetrOutput-like objects), else ``obj.key``."""
    if isinstance(obj, Mapping):
        if key in obj:
            return obj[key]
    else:
        value = getattr(obj, key, None)
        if value is not None:
            return value
        if hasattr(obj, "__getitem__"):
            try:
                return obj[key]
            except (KeyError, TypeError, IndexError):
                pass
    raise ValueError(f"{where}: missing {key!r} (expected a mapping or object with {key!r})")


# An input array on the host (numpy, possibly a zero-copy view of a CPU tensor) or a tensor
# still on its device (CUDA, MPS, ...). Host work is done with numpy only: numpy never touches
# torch's intra-op thread pool, so the matcher also works in a plainly forked child process.
_Array = np.ndarray | torch.Tensor


def _check_tensor(x: torch.Tensor, name: str) -> None:
    """Reject tensors that hold no readable dense data, naming the argument."""
    if x.layout != torch.strided:
        raise TypeError(
            f"{name}: expected a dense (strided) tensor, got layout {x.layout}; "
            "convert it with .to_dense()"
        )
    if x.device.type == "meta":
        raise ValueError(f"{name}: got a tensor on the 'meta' device, which holds no data")


def _host_view(x: Any, name: str) -> _Array:
    """Zero-copy numpy view of a CPU tensor / numpy array; device tensors are returned as is."""
    if isinstance(x, torch.Tensor):
        _check_tensor(x, name)
        if not x.is_cpu:
            return x.detach()
        try:
            return x.detach().numpy() if x.requires_grad else x.numpy()
        except (RuntimeError, TypeError):  # bfloat16, conjugate / negative views
            with _torch_memory(name):
                t = x.detach().resolve_conj().resolve_neg()
                return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")


def _is_float(x: _Array) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return x.dtype.kind == "f"


def _is_int(x: _Array) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    return x.dtype.kind in "iu"


def _host_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.is_floating_point() else torch.int64


def _on_host(items: list[_Array]) -> list[np.ndarray]:
    """Bring device tensors to the host: one compact transfer per device (stack first there)."""
    devices = {x.device for x in items if isinstance(x, torch.Tensor)}
    if not devices:
        return cast("list[np.ndarray]", items)  # no tensor: all numpy already
    with _torch_memory("pred_logits/pred_boxes/targets"):
        return _transfer(items, devices)


def _transfer(items: list[_Array], devices: set[torch.device]) -> list[np.ndarray]:
    """:func:`_on_host`'s transfers."""
    out = list(items)
    for dev in devices:
        on_dev = [
            (i, x) for i, x in enumerate(items) if isinstance(x, torch.Tensor) and x.device == dev
        ]
        ids = [i for i, _ in on_dev]
        group = [x for _, x in on_dev]
        if len({t.dtype for t in group}) > 1:
            group = [t.to(_host_dtype(t)) for t in group]
        if len(ids) > 1 and len({t.shape[1:] for t in group}) == 1:
            sizes = [t.shape[0] for t in group]
            host = torch.cat(group).cpu()  # one transfer, in the tensors' own dtype
            if host.dtype == torch.bfloat16:
                host = host.float()
            for i, part in zip(ids, host.split(sizes), strict=True):
                out[i] = part.numpy()
        else:
            for i, t in zip(ids, group, strict=True):
                host = t.cpu()
                out[i] = (host.float() if host.dtype == torch.bfloat16 else host).numpy()
    return cast("list[np.ndarray]", out)  # every tensor was replaced by its numpy copy


def _concat(items: list[_Array], dtype: type) -> np.ndarray:
    """Concatenate along axis 0 into a C-contiguous array of ``dtype``."""
    host = _on_host(items)
    if len(host) == 1 and host[0].dtype == dtype and host[0].flags.c_contiguous:
        return host[0]
    return np.concatenate(host, axis=0, dtype=dtype, casting="unsafe")


def _float32_layers(items: list[_Array]) -> list[np.ndarray]:
    """Each prediction set as a float32 host array, zero-copy for float32 CPU tensors and
    arrays (the Rust side copies non-contiguous ones itself); device tensors come over in one
    transfer per device."""
    return [x if x.dtype == np.float32 else x.astype(np.float32) for x in _on_host(items)]


_TARGET_ERROR = re.compile(r"target_(labels|boxes): image (\d+): (.*)", re.DOTALL)


def _name_target(err: ValueError) -> ValueError:
    """The native error about a concatenated target array, renamed after the user's argument:
    ``targets[i]['labels']`` / ``targets[i]['boxes']``."""
    found = _TARGET_ERROR.fullmatch(str(err))
    if found is None:
        return err
    key, image, problem = found.groups()
    return ValueError(f"targets[{image}][{key!r}]: {problem}")


class HungarianMatcher:
    """Optimal one-to-one assignment between predictions and targets, per image.

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 cost on normalised cxcywh boxes.
        cost_giou: weight of the (negative) generalized-IoU cost.
        class_cost: ``"softmax"`` (DETR: logits over C classes + "no object") or ``"focal"``
            (Deformable DETR, DINO, RT-DETR: sigmoid logits over C classes).
        focal_alpha: alpha of the focal class cost (``"focal"`` only).
        focal_gamma: gamma of the focal class cost (``"focal"`` only).

    Weights are real numbers (int, float, numpy scalars); a bool is a :class:`TypeError`, a
    non-finite or out-of-range value a :class:`ValueError`, both naming the argument.

    Use :meth:`detr` (softmax, 1/5/2) or :meth:`deformable` (focal, 2/5/2) for the usual
    settings. The matcher holds no tensors and no gradient flows through it; it is picklable and
    safe to use in forked DataLoader workers.

    Example:
        >>> matcher = HungarianMatcher.detr()
        >>> outputs = {"pred_logits": torch.randn(2, 100, 92), "pred_boxes": torch.rand(2, 100, 4)}
        >>> targets = [{"labels": torch.tensor([3, 7]), "boxes": torch.rand(2, 4)},
        ...            {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
        >>> [(q.tolist(), t.tolist()) for q, t in matcher(outputs, targets)][1]
        ([], [])
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        for name, value in (
            ("cost_class", cost_class),
            ("cost_bbox", cost_bbox),
            ("cost_giou", cost_giou),
            ("focal_alpha", focal_alpha),
            ("focal_gamma", focal_gamma),
        ):
            # a bool is not a weight (cost_class=True is a mistake, not 1.0)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"{name}: expected a real number, got {type(value).__name__} {value!r}"
                )
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            if abs(value) > _F32_MAX:
                raise ValueError(
                    f"{name}: {value!r} is beyond float32's range (the costs are float32)"
                )
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class: cost_class, cost_bbox and cost_giou can't all be 0")
        if not isinstance(class_cost, str):
            raise TypeError(
                f"class_cost: expected one of {_CLASS_COSTS}, got {type(class_cost).__name__} "
                f"{class_cost!r}"
            )
        if class_cost not in _CLASS_COSTS:
            raise ValueError(f"class_cost: expected one of {_CLASS_COSTS}, got {class_cost!r}")
        if not 0.0 <= focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha: expected a value in [0, 1], got {focal_alpha!r}")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma: expected a value >= 0, got {focal_gamma!r}")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.class_cost = class_cost
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    @classmethod
    def detr(cls, **overrides: Any) -> HungarianMatcher:
        """DETR's matcher: softmax class cost, weights class 1 / L1 5 / GIoU 2."""
        kwargs: dict[str, Any] = {
            "cost_class": 1.0,
            "cost_bbox": 5.0,
            "cost_giou": 2.0,
            "class_cost": "softmax",
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def deformable(cls, **overrides: Any) -> HungarianMatcher:
        """Deformable DETR / DINO matcher: focal class cost (α 0.25, γ 2), weights 2 / 5 / 2."""
        kwargs: dict[str, Any] = {
            "cost_class": 2.0,
            "cost_bbox": 5.0,
            "cost_giou": 2.0,
            "class_cost": "focal",
            "focal_alpha": 0.25,
            "focal_gamma": 2.0,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, class_cost={self.class_cost!r}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma})"
        )

    @torch.no_grad()
    def __call__(self, outputs: Any, targets: Sequence[Mapping[str, Any]]) -> list[MatchIndices]:
        """Match one prediction set to the targets.

        Args:
            outputs: mapping (or object such as ``DetrOutput``) with ``"pred_logits"`` (B, Q, K)
                and ``"pred_boxes"`` (B, Q, 4) normalised cxcywh; torch tensors (any device,
                any float dtype) or numpy arrays.
            targets: B mappings with ``"labels"`` (T_i,) int and ``"boxes"`` (T_i, 4) normalised
                cxcywh.

        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length
            ``min(Q, T_i)``, sorted by ``query_idx`` (like DETR's matcher). An image without
            targets gets two empty tensors.

        Raises:
            ValueError: inconsistent shapes, NaN/inf in ``pred_logits`` / ``pred_boxes`` or the
                target boxes, labels out of range, a tensor on the ``meta`` device; the message
                names the argument.
            TypeError: a sparse tensor; the message names the argument.
            MemoryError: an image's Q×T cost block does not fit in memory (the message names
                the block); the process is never aborted.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, outputs_list: Sequence[Any], targets: Sequence[Mapping[str, Any]]
    ) -> list[list[MatchIndices]]:
        """Match several prediction sets (decoder layers) to the same targets in one native call.

        Typical use: ``matcher.match_layers([outputs, *outputs["aux_outputs"]], targets)``.

        Args:
            outputs_list: L prediction sets, each as in :meth:`__call__`. All sets share B;
                sets with the same (Q, K) are stacked into one (L, B, Q, K) batch and solved in
                a single call (sets of other shapes get one call per shape).
            targets: B mappings with ``"labels"`` (T_i,) and ``"boxes"`` (T_i, 4) cxcywh.

        Returns:
            ``result[l][b] = (query_idx, target_idx)``, int64 CPU tensors, as in
            :meth:`__call__`.

        Raises:
            ValueError: as in :meth:`__call__`.
        """
        if isinstance(outputs_list, Mapping) or not isinstance(outputs_list, Sequence):
            raise ValueError(
                "outputs_list: expected a sequence of prediction sets, e.g. [outputs, *aux]"
            )
        if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
            raise ValueError("targets: expected a sequence of per-image mappings")
        num_layers = len(outputs_list)
        if num_layers == 0:
            return []
        batch = len(targets)

        logits: list[_Array] = []
        boxes: list[_Array] = []
        for i, out in enumerate(outputs_list):
            where = "outputs" if num_layers == 1 else f"outputs_list[{i}]"
            lg = _host_view(_field(out, "pred_logits", where), "pred_logits")
            bx = _host_view(_field(out, "pred_boxes", where), "pred_boxes")
            if lg.ndim != 3 or not _is_float(lg):
                raise ValueError(
                    f"pred_logits: expected a float (B, Q, K) tensor in {where}, "
                    f"got shape {tuple(lg.shape)} dtype {lg.dtype}"
                )
            if bx.ndim != 3 or bx.shape[-1] != 4 or not _is_float(bx):
                raise ValueError(
                    f"pred_boxes: expected a float (B, Q, 4) tensor in {where}, "
                    f"got shape {tuple(bx.shape)} dtype {bx.dtype}"
                )
            if tuple(bx.shape[:2]) != tuple(lg.shape[:2]):
                raise ValueError(
                    f"pred_boxes: shape {tuple(bx.shape)} does not match pred_logits "
                    f"{tuple(lg.shape)} in {where}"
                )
            if lg.shape[0] != batch:
                raise ValueError(
                    f"targets: got {batch} images but pred_logits has batch size {lg.shape[0]}"
                    f" in {where}"
                )
            logits.append(lg)
            boxes.append(bx)

        if batch == 0:
            return [[] for _ in range(num_layers)]
        tgt_labels, tgt_boxes, sizes = self._targets(targets)

        # group layers by (Q, K) so that the usual case (all decoder layers alike) is ONE call
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lg in enumerate(logits):
            groups.setdefault((lg.shape[1], lg.shape[2]), []).append(i)

        result: list[list[MatchIndices]] = [[] for _ in range(num_layers)]
        for layer_ids in groups.values():
            try:
                indices, counts = _native.match_layers(
                    _float32_layers([logits[i] for i in layer_ids]),
                    _float32_layers([boxes[i] for i in layer_ids]),
                    tgt_labels,
                    tgt_boxes,
                    sizes,
                    self.cost_class,
                    self.cost_bbox,
                    self.cost_giou,
                    self.class_cost,
                    self.focal_alpha,
                    self.focal_gamma,
                )
            except ValueError as err:
                raise _name_target(err) from None
            # query indices of every block, then target indices of every block: one split
            parts = torch.from_numpy(indices).split(counts + counts)
            blocks = len(counts)
            for j, layer in enumerate(layer_ids):
                lo, hi = j * batch, (j + 1) * batch
                result[layer] = list(
                    zip(parts[lo:hi], parts[blocks + lo : blocks + hi], strict=True)
                )
        return result

    @staticmethod
    def _targets(
        targets: Sequence[Mapping[str, Any]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Concatenate per-image targets into (ΣT,) int64 labels, (ΣT, 4) f32 boxes, (B,) sizes."""
        fast = HungarianMatcher._targets_fast(targets)
        return fast if fast is not None else HungarianMatcher._targets_checked(targets)

    @staticmethod
    def _targets_fast(
        targets: Sequence[Mapping[str, Any]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The common case (torch tensors of the right ranks, one device) with one ``torch.cat``
        per field and one transfer; None sends anything unusual to :meth:`_targets_checked`."""
        try:
            labels = [t["labels"] for t in targets]
            boxes = [t["boxes"] for t in targets]
            if not all(type(x) is torch.Tensor for x in labels) or not all(
                type(x) is torch.Tensor for x in boxes
            ):
                return None
            # sparse or meta tensors: the checked path names them
            if not all(
                x.layout == torch.strided and x.device.type != "meta" for x in (*labels, *boxes)
            ):
                return None
            counts = [x.shape[0] for x in labels]  # 0-d labels raise: the checked path names them
            if counts != [x.shape[0] for x in boxes]:
                return None
            lab = torch.cat(labels)  # small: serial, no intra-op pool
            box = torch.cat(boxes)
        except Exception:  # missing keys, mixed devices, ...: the checked path names the problem
            return None
        # after the cat, 1-D labels and (ΣT, 4) boxes mean every image had (T_i,) and (T_i, 4)
        # (cat only joins tensors of one rank; legacy empty (0,) boxes of an empty image are fine)
        if lab.dim() != 1 or box.dim() != 2 or box.shape[1] != 4:
            return None
        sizes = np.array(counts, dtype=np.int64)
        if not _is_int(lab) or not box.is_floating_point():
            return None
        with _torch_memory("targets"):
            lab = lab.cpu() if lab.dtype == torch.int64 else lab.cpu().to(torch.int64)
            box = box.cpu() if box.dtype == torch.float32 else box.cpu().to(torch.float32)
        return lab.numpy(), box.numpy(), sizes

    @staticmethod
    def _targets_checked(
        targets: Sequence[Mapping[str, Any]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image validation (any array kind) with errors naming ``targets[i][key]``."""
        labels: list[_Array] = []
        boxes: list[_Array] = []
        sizes = np.empty(len(targets), dtype=np.int64)
        for i, tgt in enumerate(targets):
            if not isinstance(tgt, Mapping):
                raise ValueError(
                    f"targets[{i}]: expected a mapping with 'labels' and 'boxes', "
                    f"got {type(tgt).__name__}"
                )
            for key in ("labels", "boxes"):
                if key not in tgt:
                    raise ValueError(f"targets[{i}]: missing {key!r}")
            lab = _host_view(tgt["labels"], f"targets[{i}]['labels']")
            box = _host_view(tgt["boxes"], f"targets[{i}]['boxes']")
            if lab.ndim != 1 or not (_is_int(lab) or lab.shape[0] == 0):
                raise ValueError(
                    f"targets[{i}]['labels']: expected an integer (T,) tensor, "
                    f"got shape {tuple(lab.shape)} dtype {lab.dtype}"
                )
            if box.ndim == 1 and box.shape[0] == 0:
                box = box.reshape(0, 4)
            if box.ndim != 2 or box.shape[1] != 4 or not _is_float(box):
                raise ValueError(
                    f"targets[{i}]['boxes']: expected a float (T, 4) tensor, "
                    f"got shape {tuple(box.shape)} dtype {box.dtype}"
                )
            if box.shape[0] != lab.shape[0]:
                raise ValueError(
                    f"targets[{i}]['boxes']: has {box.shape[0]} rows but "
                    f"'labels' has {lab.shape[0]}"
                )
            sizes[i] = lab.shape[0]
            labels.append(lab)
            boxes.append(box)
        return (
            _concat(labels, np.int64) if labels else np.zeros(0, np.int64),
            _concat(boxes, np.float32) if boxes else np.zeros((0, 4), np.float32),
            sizes,
        )

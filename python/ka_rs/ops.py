"""Box operations and an exact linear-sum-assignment solver, implemented in Rust.

Every function accepts numpy arrays or torch tensors and returns the same kind:

* numpy ``float32`` / ``float64`` arrays and contiguous torch CPU tensors are passed to Rust
  without a copy, and the result (a fresh array) is wrapped without a copy;
* CUDA (or other device) tensors are moved to the CPU once, and the result is moved back to
  the input's device;
* tensors that require grad are detached: these ops are not differentiable.

Box formats (all in the same units, e.g. pixels or normalised [0, 1] coordinates):

* ``"xyxy"``: (x1, y1, x2, y2), top-left and bottom-right corners;
* ``"cxcywh"``: (cx, cy, w, h), centre and size (DETR's model output);
* ``"xywh"``: (x1, y1, w, h), top-left corner and size (COCO annotations).

Bad input raises :class:`ValueError` whose message starts with the argument's name, e.g.
``"boxes1: expected shape (N, 4), got (3, 5)"``; an argument of the wrong kind altogether
(a sparse tensor, a ``str`` for ``maximize``, a bool for a number, text for a cost matrix)
raises :class:`TypeError`, named the same way. A result (or a copy of an input) too large for
memory raises :class:`MemoryError` naming the buffer, and a size that cannot exist at all
raises :class:`ValueError`; the process is never aborted. Numpy arrays in non-native byte
order are converted (never misread); results come back in native byte order.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import numpy as np
import torch

from ka_rs import _native
from ka_rs._native import InfeasibleAssignmentError

__all__ = [
    "BOX_FORMATS",
    "InfeasibleAssignmentError",
    "batched_nms",
    "box_convert",
    "box_iou",
    "generalized_box_iou",
    "linear_sum_assignment",
]

#: Box formats understood by :func:`box_convert`.
BOX_FORMATS: tuple[str, ...] = ("xyxy", "cxcywh", "xywh")

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

_FLOAT_NP = (np.dtype(np.float32), np.dtype(np.float64))
_TORCH_TO_NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_NP_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


# --------------------------------------------------------------------------------------------
# conversion helpers (shared with ka_rs.matcher)
# --------------------------------------------------------------------------------------------


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor of dtype {x.dtype}"
    if isinstance(x, np.ndarray):
        return f"numpy array of dtype {x.dtype}"
    return type(x).__name__


def _check_tensor(t: torch.Tensor, name: str) -> None:
    """Reject tensors that hold no readable dense data, naming the argument."""
    if t.layout != torch.strided:
        raise TypeError(
            f"{name}: expected a dense (strided) tensor, got layout {t.layout}; "
            "convert it with .to_dense()"
        )
    if t.device.type == "meta":
        raise ValueError(f"{name}: got a tensor on the 'meta' device, which holds no data")


def _asarray(x: Any, name: str) -> np.ndarray:
    """``np.asarray(x)`` for nested sequences, with numpy's errors (ragged rows, objects it
    cannot convert) renamed after the argument."""
    try:
        return np.asarray(x)
    except ValueError as err:
        raise ValueError(
            f"{name}: cannot be read as an array (ragged or inconsistent nesting?): {err}"
        ) from None
    except TypeError as err:
        raise TypeError(f"{name}: cannot be read as an array: {err}") from None


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def _real(x: Any, name: str) -> float:
    """A real number argument as float: ``TypeError`` naming ``name`` for a bool (not a
    number here), a string or anything else that is not a real number."""
    if _is_bool(x) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__} {x!r}")
    return float(x)


@contextlib.contextmanager
def _torch_memory(name: str) -> Iterator[None]:
    """torch reports a failed allocation (materialising an expanded tensor, a dtype or device
    copy) as a RuntimeError: turn it into the MemoryError numpy and the core raise, naming the
    argument."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "can't allocate memory" in text or "out of memory" in text.lower():
            raise MemoryError(f"{name}: out of memory converting the tensor: {text}") from err
        raise


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """CPU view of ``t`` as a C-contiguous numpy array (copies only when it must)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return np.ascontiguousarray(t.numpy())


def _as_float_array(
    x: Any, name: str, *, ndim: int, last: int | None = None
) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """Validate ``x`` as a float tensor/array of rank ``ndim`` and return ``(array, restore)``.

    ``array`` is a C-contiguous float32/float64 numpy array sharing memory with ``x`` whenever
    possible; ``restore(result)`` turns a numpy result back into the input's kind (torch tensor on
    the input's device and floating dtype, or numpy array). float16/bfloat16 tensors are computed
    in float32 and cast back.
    """
    if isinstance(x, torch.Tensor):
        _check_tensor(x, name)
        if not (x.is_floating_point()):
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        device, dtype = x.device, x.dtype
        with _torch_memory(name):
            if dtype not in _TORCH_TO_NP:
                x = x.detach().to(torch.float32)
            arr = _tensor_to_numpy(x)

        def restore_tensor(res: np.ndarray) -> torch.Tensor:
            out = torch.from_numpy(res)
            if out.is_floating_point() and out.dtype != dtype:
                out = out.to(dtype)
            return out if device.type == "cpu" else out.to(device)

        restore: Callable[[np.ndarray], Any] = restore_tensor

    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise ValueError(f"{name}: expected a float32 or float64 array, got dtype {x.dtype}")
        # native byte order (a big-endian array is converted, never misread); float16 is
        # computed in float32 and long double in float64
        np_dtype = x.dtype.newbyteorder("=")
        if np_dtype in _FLOAT_NP:
            work = np_dtype
        else:
            work = np.dtype(np.float32 if x.itemsize <= 4 else np.float64)
        arr = np.ascontiguousarray(x) if x.dtype == work else np.ascontiguousarray(x, dtype=work)

        def restore_array(res: np.ndarray) -> np.ndarray:
            # float16 / long double input was computed in float32 / float64: hand back its
            # dtype (unless the other operand promoted the result)
            return res.astype(np_dtype) if np_dtype != work and res.dtype == work else res

        restore = restore_array

    elif _is_array_like(x):
        arr = _asarray(x, name)
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name}: expected numbers, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float64)

        def restore_same(res: np.ndarray) -> np.ndarray:
            return res

        restore = restore_same

    else:
        raise ValueError(f"{name}: expected a numpy array or torch tensor, got {_describe(x)}")

    if ndim == 2 and last is not None and arr.shape == (0,):
        arr = arr.reshape(0, last)  # no boxes at all ([] or an empty 1-d array)
    if arr.ndim != ndim or (last is not None and arr.shape[-1] != last):
        want = (
            "(N, 4)"
            if (ndim == 2 and last == 4)
            else f"{ndim}-d" + (f" with last dimension {last}" if last is not None else "")
        )
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    return arr, restore


def _is_array_like(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or hasattr(x, "__array__")


def _common_float(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Promote two float arrays to a common dtype (float64 wins)."""
    if a.dtype == b.dtype:
        return a, b
    return a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)


def _restore_pair(
    restore1: Callable[[np.ndarray], Any], x1: Any, x2: Any
) -> Callable[[np.ndarray], Any]:
    """For binary ops with mixed float precisions, return the promoted dtype (like torch)."""
    if isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor) and x1.dtype != x2.dtype:
        dtype = torch.promote_types(x1.dtype, x2.dtype)
        device = x1.device

        def restore(res: np.ndarray) -> torch.Tensor:
            out = torch.from_numpy(res)
            out = out if out.dtype == dtype else out.to(dtype)
            return out if device.type == "cpu" else out.to(device)

        return restore
    return restore1


# --------------------------------------------------------------------------------------------
# box ops
# --------------------------------------------------------------------------------------------


def box_convert(boxes: ArrayT, in_fmt: str, out_fmt: str) -> ArrayT:
    """Convert boxes between formats.

    Args:
        boxes: (N, 4) float32/float64 numpy array or torch tensor, in ``in_fmt``.
        in_fmt: one of ``"xyxy"``, ``"cxcywh"``, ``"xywh"``.
        out_fmt: one of ``"xyxy"``, ``"cxcywh"``, ``"xywh"``.

    Returns:
        (N, 4) boxes in ``out_fmt``, same kind, dtype and device as ``boxes``.

    Raises:
        ValueError: ``boxes`` is not (N, 4) floating point or not finite, or a format is unknown.
    """
    for fname, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"{fname}: unknown box format {fmt!r}, expected one of {BOX_FORMATS}")
    arr, restore = _as_float_array(boxes, "boxes", ndim=2, last=4)
    return cast(ArrayT, restore(_native.box_convert(arr, in_fmt, out_fmt)))


def box_iou(boxes1: ArrayT, boxes2: ArrayT) -> ArrayT:
    """Pairwise intersection-over-union of two sets of xyxy boxes.

    Args:
        boxes1: (N, 4) xyxy boxes, float32/float64 numpy array or torch tensor.
        boxes2: (M, 4) xyxy boxes, same kind.

    Returns:
        (N, M) IoU matrix (same kind, promoted dtype, device of ``boxes1``). A pair whose union
        has zero area gives 0, never NaN.

    Raises:
        ValueError: wrong shape/dtype, non-finite values, or an inverted box (x2 < x1 or
            y2 < y1); the message names ``boxes1`` or ``boxes2``.
    """
    a, restore = _as_float_array(boxes1, "boxes1", ndim=2, last=4)
    b, _ = _as_float_array(boxes2, "boxes2", ndim=2, last=4)
    a, b = _common_float(a, b)
    return cast(ArrayT, _restore_pair(restore, boxes1, boxes2)(_native.box_iou(a, b)))


def generalized_box_iou(boxes1: ArrayT, boxes2: ArrayT) -> ArrayT:
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of two sets of xyxy boxes.

    ``GIoU = IoU - (area(C) - area(A ∪ B)) / area(C)`` with ``C`` the smallest enclosing box;
    values lie in [-1, 1]. Degenerate (zero-area) boxes are allowed: their IoU term is 0, and a
    zero-area enclosing box gives GIoU 0, never NaN.

    Args:
        boxes1: (N, 4) xyxy boxes, float32/float64 numpy array or torch tensor.
        boxes2: (M, 4) xyxy boxes, same kind.

    Returns:
        (N, M) GIoU matrix (same kind, promoted dtype, device of ``boxes1``).

    Raises:
        ValueError: wrong shape/dtype, non-finite values, or an inverted box (x2 < x1 or
            y2 < y1); the message names ``boxes1`` or ``boxes2``.
    """
    a, restore = _as_float_array(boxes1, "boxes1", ndim=2, last=4)
    b, _ = _as_float_array(boxes2, "boxes2", ndim=2, last=4)
    a, b = _common_float(a, b)
    return cast(ArrayT, _restore_pair(restore, boxes1, boxes2)(_native.generalized_box_iou(a, b)))


def batched_nms(boxes: ArrayT, scores: ArrayT, labels: ArrayT, iou_threshold: float) -> ArrayT:
    """Class-aware non-maximum suppression (same contract as ``torchvision.ops.batched_nms``).

    Boxes of different labels never suppress each other. Within a label, a box is dropped when
    its IoU with a higher-scoring kept box exceeds ``iou_threshold``.

    Args:
        boxes: (N, 4) xyxy boxes (computed in float32).
        scores: (N,) scores (computed in float32).
        labels: (N,) integer class labels.
        iou_threshold: suppression threshold in [0, 1].

    Returns:
        int64 indices into ``boxes`` of the kept boxes, sorted by decreasing score; a torch tensor
        on ``boxes``' device if ``boxes`` is a tensor, else a numpy array.

    Raises:
        ValueError: shapes disagree, wrong dtypes, non-finite values, inverted boxes, or a
            threshold outside [0, 1]; the message names the argument.
    """
    b, _ = _as_float_array(boxes, "boxes", ndim=2, last=4)
    s, _ = _as_float_array(scores, "scores", ndim=1)
    lab = _as_int_array(labels, "labels")
    if lab.ndim != 1:
        raise ValueError(f"labels: expected shape (N,), got {tuple(lab.shape)}")
    n = b.shape[0]
    if s.shape[0] != n:
        raise ValueError(f"scores: expected shape ({n},) to match boxes, got {tuple(s.shape)}")
    if lab.shape[0] != n:
        raise ValueError(f"labels: expected shape ({n},) to match boxes, got {tuple(lab.shape)}")
    thr = _real(iou_threshold, "iou_threshold")
    if not 0.0 <= thr <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in [0, 1], got {iou_threshold!r}")
    b32 = _to_float32(b, "boxes")
    s32 = _to_float32(s, "scores")
    keep = _native.batched_nms(b32, s32, lab, thr)
    if isinstance(boxes, torch.Tensor):
        out = torch.from_numpy(keep)
        return out if boxes.device.type == "cpu" else out.to(boxes.device)
    return keep


_F32_MAX = float(np.finfo(np.float32).max)


def _to_float32(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as float32 (batched NMS computes in float32, like torchvision); a finite float64
    value beyond float32's range would become inf: a ValueError naming it instead."""
    if a.dtype == np.float32:
        return a
    big = np.abs(a) > _F32_MAX  # False for NaN; non-finite input is reported by the core
    if big.any():
        where = np.unravel_index(int(np.argmax(big)), a.shape)
        what = "box" if a.ndim == 2 else "score"
        raise ValueError(
            f"{name}: {what} {where[0]} has value {float(a[where])!r}, beyond float32's range "
            "(batched_nms computes in float32)"
        )
    return a.astype(np.float32)


def _as_int_array(x: Any, name: str) -> np.ndarray:
    """C-contiguous int64 numpy view/copy of an integer array or tensor."""
    if isinstance(x, torch.Tensor):
        _check_tensor(x, name)
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
        with _torch_memory(name):
            if x.dtype != torch.int64:
                x = x.detach().to(torch.int64)
            return _tensor_to_numpy(x)
    if isinstance(x, np.ndarray) or _is_array_like(x):
        arr = _asarray(x, name)
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected an integer array, got dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.itemsize == 8 and arr.size and arr.max() > 2**63 - 1:
            raise ValueError(f"{name}: value {arr.max()} does not fit in int64")
        return np.ascontiguousarray(arr, dtype=np.int64)
    raise ValueError(f"{name}: expected a numpy array or torch tensor, got {_describe(x)}")


# --------------------------------------------------------------------------------------------
# assignment
# --------------------------------------------------------------------------------------------


def linear_sum_assignment(cost: Any, maximize: bool = False) -> tuple[Any, Any]:
    """Solve the rectangular linear sum assignment problem exactly.

    A drop-in for ``scipy.optimize.linear_sum_assignment``: the shortest-augmenting-path
    algorithm of Crouse (2016), in Rust with float64 arithmetic. For an (n, m) ``cost`` it
    assigns ``min(n, m)`` rows to distinct columns minimising (or maximising) the total cost.

    Args:
        cost: (n, m) cost matrix: numpy array, torch tensor or nested sequence of numbers
            (bool, integer or float; computed in float64). ``+inf`` (``-inf`` when
            ``maximize``) marks a forbidden pair. 0×m and n×0 are allowed.
        maximize: maximise the total instead of minimising it; a bool (``True`` / ``False``
            or a numpy bool), anything else is a :class:`TypeError`.

    Returns:
        ``(row_ind, col_ind)``: int64 index arrays of length ``min(n, m)``, ``row_ind`` sorted
        ascending; ``cost[row_ind, col_ind].sum()`` is optimal. torch tensors (on ``cost``'s
        device) if ``cost`` is a tensor, else numpy arrays.

    Raises:
        ValueError: ``cost`` is not 2-d, or contains NaN, or ``-inf`` when minimising
            (``+inf`` when maximising); the message names ``cost``.
        TypeError: ``cost`` holds no real numbers (strings, complex, objects: "Cannot cast
            array data ...", as scipy), or ``maximize`` is not a bool.
        InfeasibleAssignmentError: (a ``ValueError``) forbidden pairs leave no complete
            assignment; the message contains "infeasible".
        MemoryError: the float64 copy the solver works on does not fit in memory.
    """
    if not _is_bool(maximize):
        raise TypeError(
            f"maximize: expected a bool (True or False), got {type(maximize).__name__} {maximize!r}"
        )
    if isinstance(cost, torch.Tensor):
        _check_tensor(cost, "cost")
        if cost.is_complex():
            raise TypeError(
                f"cost: Cannot cast array data from dtype {cost.dtype} to float64 "
                "(expected a real-valued matrix)"
            )
        with _torch_memory("cost"):
            arr = _tensor_to_numpy(cost if cost.dtype == torch.float64 else cost.to(torch.float64))
    elif isinstance(cost, np.ndarray) or _is_array_like(cost):
        arr = _asarray(cost, "cost")
        if arr.ndim != 2:
            raise ValueError(f"cost: expected a matrix (2-d), got shape {tuple(arr.shape)}")
        if arr.dtype.kind not in "biuf":
            # scipy's wording (its test suite matches it)
            raise TypeError(
                f"cost: Cannot cast array data from {arr.dtype!r} to dtype('float64') "
                "(expected a real-valued matrix)"
            )
        arr = np.ascontiguousarray(arr, dtype=np.float64)
    else:
        raise ValueError(f"cost: expected a numpy array or torch tensor, got {_describe(cost)}")
    if arr.ndim != 2:
        raise ValueError(f"cost: expected a matrix (2-d), got shape {tuple(arr.shape)}")
    rows, cols = _native.linear_sum_assignment(arr, bool(maximize))
    if isinstance(cost, torch.Tensor):
        r, c = torch.from_numpy(rows), torch.from_numpy(cols)
        if cost.device.type != "cpu":
            r, c = r.to(cost.device), c.to(cost.device)
        return r, c
    return rows, cols

"""Mixed-precision policy: which part of a training or evaluation step runs in low precision.

``train.amp`` is one of :data:`AMP_MODES`:

* ``"off"``: everything in float32 (the default; bit-identical to a run without this module).
* ``"auto"``: ``"bf16"`` where the device runs bf16 natively (a CPU whose /proc/cpuinfo lists
  ``avx512_bf16`` / ``amx_bf16`` / Arm ``bf16``; a CUDA GPU with bf16 support), else ``"off"``
  (:func:`resolve_amp`). The demo's default: fast where bf16 is native, never emulated.
* ``"bf16"``: the **model forward** runs under :func:`torch.autocast` with bfloat16 (convolutions,
  linear layers and the Transformer's projections and feed-forward blocks in bf16), except
  the attention itself (q·kᵀ, softmax, ·v), which :mod:`ka_rs.models.transformer` always runs
  in float32. No loss scaling is needed (bf16 has float32's exponent range).
* ``"fp16"``: as ``"bf16"`` with float16, plus a :class:`torch.amp.GradScaler` (created by
  :func:`make_grad_scaler`, owned by :class:`~ka_rs.engine.loop.TrainLoop`) so that small
  gradients do not underflow.

Losses are always computed in float32: wrap only the forward in :func:`autocast` and pass its
result through :func:`float_outputs` before the criterion::

    with autocast(amp, device):
        out = model(images, mask)
    losses = criterion(float_outputs(out), targets)

Why this split (measured on a 2-core AMD EPYC with native bf16, see docs/performance.md): a
teacher training step with the forward in bf16 and the attention in float32 took 0.60-0.66x
the float32 step; autocasting the whole step, losses and attention included, only 0.81-0.91x
(bf16 attention backward is about twice as slow as float32 attention on that CPU). fp16 on
that CPU (no native fp16) took 12x the float32 step.

:func:`check_amp` refuses a mode that torch's autocast cannot run on the device (instead of
torch's own behaviour of warning and silently running in float32) and logs a warning, once,
when bf16 (fp16) is asked on a CPU without native bf16 (fp16) instructions, where it is
emulated and usually slower than float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ka_rs.engine.distributed import resolve_device
from ka_rs.engine.logging import get_logger

__all__ = [
    "AMP_DTYPES",
    "AMP_MODES",
    "autocast",
    "check_amp",
    "cpu_has_native_bf16",
    "cpu_has_native_fp16",
    "cpu_model_name",
    "effective_amp",
    "float_outputs",
    "make_grad_scaler",
    "resolve_amp",
    "validate_amp",
]

log = get_logger("ka_rs.amp")

#: accepted values of ``train.amp``
AMP_MODES = ("off", "auto", "bf16", "fp16")
#: the autocast dtype of each low-precision mode
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

# (mode, device type) pairs already checked (the check and its warnings run once per process)
_checked: set[tuple[str, str]] = set()


def validate_amp(amp: str, key: str = "train.amp") -> str:
    """Return ``amp`` if it is one of :data:`AMP_MODES`, else raise ``ValueError`` naming ``key``
    and the choices."""
    if not isinstance(amp, str) or amp not in AMP_MODES:
        raise ValueError(f"{key}: must be one of {', '.join(map(repr, AMP_MODES))}, got {amp!r}")
    return amp


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """The mode ``amp`` stands for on ``device``: ``"auto"`` becomes ``"bf16"`` where bf16 is
    native there (CPU: :func:`cpu_has_native_bf16` is True; CUDA: a GPU with bf16 support), else
    ``"off"``; every other mode is returned as it is (after :func:`validate_amp`)."""
    validate_amp(amp)
    if amp != "auto":
        return amp
    dev = _device_type(device)
    if dev == "cpu":
        return "bf16" if cpu_has_native_bf16() else "off"
    if dev == "cuda" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "off"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str] | None:
    """The first value of every field of /proc/cpuinfo (``model name``, x86 ``flags``, Arm
    ``Features``...), or None when it cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())
    return fields


def _cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags of /proc/cpuinfo (x86 ``flags``, Arm ``Features``), or None when
    they cannot be read (not Linux)."""
    info = _cpuinfo()
    flags = None if info is None else info.get("flags", info.get("Features"))
    return None if flags is None else frozenset(flags.split())


def cpu_model_name() -> str | None:
    """This CPU's model name (/proc/cpuinfo ``model name``, else :func:`platform.processor`),
    None when neither tells; for reports and benchmarks next to :func:`cpu_has_native_bf16`."""
    return (_cpuinfo() or {}).get("model name") or platform.processor() or None


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU has bf16 arithmetic instructions (x86 ``avx512_bf16`` or ``amx_bf16``,
    Arm ``bf16``); None when /proc/cpuinfo cannot tell."""
    flags = _cpu_flags()
    if flags is None:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_fp16() -> bool | None:
    """Whether this CPU has float16 arithmetic instructions (x86 ``avx512_fp16`` or
    ``amx_fp16``, Arm ``fphp`` / ``asimdhp``); None when /proc/cpuinfo cannot tell."""
    flags = _cpu_flags()
    if flags is None:
        return None
    return bool(flags & {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"})


def effective_amp(amp: str, device: str) -> str:
    """The mode a run with ``train.amp = amp`` and ``train.device = device`` (``"auto"``,
    ``"cpu"``, ``"cuda"``...) trains in on this machine: ``"auto"`` resolved (:func:`resolve_amp`)
    on the device ``device`` names (:func:`~ka_rs.engine.distributed.resolve_device`, which
    refuses ``"cuda"`` where there is none, as training would). Result caches key on it, so
    that a cached ``"auto"`` run is reused only where it meant the same precision; reports
    print it."""
    if amp != "auto":
        return amp
    return resolve_amp(amp, resolve_device(device))


def check_amp(amp: str, device: torch.device | str) -> None:
    """Check that torch's autocast can run ``amp`` on ``device`` (once per mode and device type).

    Raises:
        ValueError: ``amp`` is not a mode, or torch has no autocast for the device type, or
            its autocast does not support the dtype there (torch itself would only warn and
            run in float32), or CUDA bf16 on a GPU without bf16 support.

    Logs a warning (once) for bf16 / fp16 on a CPU whose /proc/cpuinfo lists no native
    bf16 / fp16 instructions: autocast then emulates the type and is usually slower than
    float32 (fp16 on a CPU with native bf16 but no fp16 measured 12x slower than float32 for a
    teacher step, docs/performance.md).
    """
    amp = resolve_amp(amp, device)
    if amp == "off":
        return
    dev = _device_type(device)
    if (amp, dev) in _checked:
        return
    dtype = AMP_DTYPES[amp]
    available = getattr(torch.amp.autocast_mode, "is_autocast_available", None)
    if available is not None and not available(dev):
        raise ValueError(
            f"train.amp={amp!r}: torch's autocast does not support device type {dev!r}; "
            "use train.amp='off'"
        )
    if dev == "cuda" and amp == "bf16" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ValueError(
                "train.amp='bf16': this GPU does not support bfloat16; use train.amp='fp16' "
                "(with loss scaling) or 'off'"
            )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ctx = torch.autocast(device_type=dev, dtype=dtype)
        except RuntimeError as exc:
            raise ValueError(
                f"train.amp={amp!r}: torch's autocast cannot run {dtype} on {dev!r}: {exc}"
            ) from None
    if not getattr(ctx, "_enabled", True) or any("not supported" in str(w.message) for w in caught):
        raise ValueError(
            f"train.amp={amp!r}: torch's {dev} autocast does not support {dtype} "
            f"(torch {torch.__version__}); use train.amp='off'"
        )
    if dev == "cpu" and amp == "bf16" and cpu_has_native_bf16() is False:
        log.warning(
            "train.amp='bf16' on a CPU without native bf16 instructions (no avx512_bf16 / "
            "amx_bf16 in /proc/cpuinfo): bf16 is emulated and usually slower than float32"
        )
    if dev == "cpu" and amp == "fp16" and cpu_has_native_fp16() is False:
        log.warning(
            "train.amp='fp16' on a CPU without native fp16 instructions (no avx512_fp16 / "
            "amx_fp16 in /proc/cpuinfo): fp16 is emulated and much slower than float32; "
            "use 'bf16' (if the CPU has it) or 'off'"
        )
    _checked.add((amp, dev))


def autocast(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Context manager for a model **forward** under ``amp`` on ``device``.

    ``"off"``: a no-op (nothing changes, float32 stays bit-identical). ``"bf16"`` /
    ``"fp16"``: :func:`torch.autocast` with that dtype, after :func:`check_amp`. ``"auto"``:
    whichever of those :func:`resolve_amp` picks for ``device``. Compute losses outside it, on
    :func:`float_outputs` of the forward's result.
    """
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    check_amp(amp, device)
    return torch.autocast(device_type=_device_type(device), dtype=AMP_DTYPES[amp])


def _to_float32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        # .float() returns the tensor itself when it is float32 already (no copy)
        return obj.float() if obj.is_floating_point() else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _to_float32(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **{k: v for k, v in changes.items() if _is_init(obj, k)})
    if isinstance(obj, Mapping):
        return {k: _to_float32(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_to_float32(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float32(v) for v in obj)
    return obj


def _is_init(obj: Any, name: str) -> bool:
    return any(f.name == name and f.init for f in dataclasses.fields(obj))


def float_outputs(out: Any) -> Any:
    """``out`` with every floating tensor cast to float32, for float32 losses.

    Accepts a :class:`~ka_rs.models.DetrOutput` (returns a new one), a dict such as
    ``{"pred_logits", "pred_boxes", "aux_outputs", "sequences", "enc_outputs"}`` (returns a new
    dict), or a tensor, list or tuple, nested in any way. Integer and bool tensors (masks,
    indices) and non-tensors are kept as they are; tensors that are float32 already are
    returned as they are (not copied), so under ``amp="off"`` this changes nothing. The casts
    are differentiable: gradients flow back into the low-precision forward.
    """
    return _to_float32(out)


def make_grad_scaler(amp: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A :class:`torch.amp.GradScaler` for ``"fp16"`` on ``device``; None for ``"off"`` and
    ``"bf16"`` (which need no loss scaling), and for ``"auto"`` (never fp16)."""
    amp = resolve_amp(amp, device)
    if amp != "fp16":
        return None
    check_amp(amp, device)
    return torch.amp.GradScaler(_device_type(device))


@contextlib.contextmanager
def _reset_checks() -> Iterator[None]:
    """Forget which (mode, device) pairs were checked, for the duration (tests)."""
    saved = set(_checked)
    _checked.clear()
    try:
        yield
    finally:
        _checked.clear()
        _checked.update(saved)

"""Atomic, ``weights_only``-loadable training checkpoints.

A checkpoint is a dict saved with :func:`torch.save` holding only tensors and plain Python
data, so it loads with ``torch.load(weights_only=True)`` (no arbitrary code is unpickled)::

    format        "ka_rs.checkpoint"
    version       1
    kind          "teacher" (the engine that wrote it; later engines add their own kinds)
    model         model state dict (unwrapped from DDP)
    model_config  dict of DetrConfig fields (rebuilds the architecture without the preset)
    class_names   list[str], the detector's classes in label order
    optimizer, scheduler   state dicts (absent in weights-only exports)
    step, epoch, batch_in_epoch, train_seconds, images_seen   loop position
    rng           {"torch", "cuda", "python", "numpy"} generator states (as tensors)
    config        Config.to_dict()
    metrics       last evaluation results (dict of floats), may be empty

Writes go to a temporary file in the destination's folder, are flushed and fsynced, and then
``os.replace``-d over the destination, so a crash leaves either the old or the new file, never
a torn one. Loading a missing, empty, truncated or foreign file raises :class:`CheckpointError`
(a ``ValueError``) naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "LoadedDetector",
    "atomic_save",
    "capture_rng_state",
    "detector_from_checkpoint",
    "load_checkpoint",
    "load_detector",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "ka_rs.checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("format", "version", "model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, empty, truncated, corrupt or not a ka_rs checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (tmp file in the same folder + replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not supported everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def capture_rng_state() -> dict[str, Any]:
    """Every global random generator's state, as tensors and plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["gauss"],
        )
    )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, ValueError):  # different GPU count: skip
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    class_names: list[str],
    config: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    epoch: int = 0,
    batch_in_epoch: int = 0,
    train_seconds: float = 0.0,
    images_seen: int = 0,
    metrics: Mapping[str, Any] | None = None,
    kind: str = "teacher",
    include_rng: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (see the module docstring for its contents).

    ``model`` may be wrapped in DDP; the inner module's state dict is stored. ``extra`` holds
    further plain entries (for other engines) and must not shadow the standard keys.
    """
    module = model.module if hasattr(model, "module") else model
    model_config = getattr(module, "config", None)
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": kind,
        "model": module.state_dict(),
        "model_config": _plain(model_config) if model_config is not None else {},
        "class_names": list(class_names),
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "train_seconds": float(train_seconds),
        "images_seen": int(images_seen),
        "config": _plain(config) if config is not None else {},
        "metrics": _plain(metrics) if metrics is not None else {},
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if include_rng:
        ckpt["rng"] = capture_rng_state()
    if extra:
        clash = sorted(set(extra) & set(ckpt))
        if clash:
            raise ValueError(f"extra: keys {clash} clash with standard checkpoint keys")
        ckpt.update(extra)
    return atomic_save(ckpt, path)


def _plain(obj: Any) -> Any:
    """Convert dataclasses / mappings / sequences into plain dicts, lists and primitives."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: {obj!r}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ka_rs checkpoint with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` naming ``path`` when the file is missing, empty,
    truncated/corrupt, not a PyTorch file, holds objects other than tensors and plain data,
    or is a PyTorch file written by something other than ka_rs.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} is a directory, not a file")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {str(p)!r} is empty (0 bytes)")
    with p.open("rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise CheckpointError(
            f"checkpoint {str(p)!r} is not a PyTorch checkpoint (unrecognised file format, "
            f"{size} bytes)"
        )
    if not zipfile.is_zipfile(p):
        raise CheckpointError(
            f"checkpoint {str(p)!r} is truncated or corrupt ({size} bytes; the archive's "
            "directory is missing)"
        )
    try:
        with _warnings_silenced():
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {str(p)!r} holds objects other than tensors and plain data, "
            f"refusing to unpickle it (weights_only=True): {first}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(p)!r} is truncated or corrupt: {exc}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"checkpoint {str(p)!r} is a foreign file: it holds a {type(ckpt).__name__}, "
            "not a ka_rs checkpoint dict"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing or ckpt.get("format") != CHECKPOINT_FORMAT:
        keys = ", ".join(sorted(map(str, ckpt))[:8])
        raise CheckpointError(
            f"checkpoint {str(p)!r} is a foreign file, not written by ka_rs "
            f"(format={ckpt.get('format')!r}, top-level keys: {keys}). For a "
            "facebookresearch/detr file use the source detr:PATH (ka_rs.load_teacher)."
        )
    if int(ckpt["version"]) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(p)!r} has format version {ckpt['version']}, newer than this "
            f"ka_rs supports ({CHECKPOINT_VERSION}); upgrade ka_rs"
        )
    return ckpt


@contextlib.contextmanager
def _warnings_silenced() -> Any:
    """Silence warnings raised while loading (e.g. torch's storage deprecation notes)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass
class LoadedDetector:
    """A detector rebuilt from a checkpoint (in eval mode) with its metadata."""

    model: torch.nn.Module
    class_names: list[str]
    config: dict[str, Any]
    checkpoint: dict[str, Any]


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> LoadedDetector:
    """Rebuild the detector stored in a ka_rs checkpoint, load its weights, set eval mode."""
    return detector_from_checkpoint(load_checkpoint(path), path, device)


def detector_from_checkpoint(
    ckpt: dict[str, Any], path: str | Path, device: str | torch.device = "cpu"
) -> LoadedDetector:
    """The detector of an already loaded checkpoint dict (``path`` names it in errors)."""
    from ka_rs.models import DETR, DetrConfig

    mc = ckpt.get("model_config")
    if not mc:
        raise CheckpointError(f"checkpoint {str(path)!r} has no model_config; cannot rebuild")
    try:
        dcfg = DetrConfig.from_dict(mc)
        student = ckpt.get("student")  # written by ka_rs.engine.amalgamate
        if student:
            from ka_rs.models import AmalgamationStudent

            model = AmalgamationStudent(
                dcfg, int(student["num_slots"]), bool(student["cross_slot_attention"])
            )
        else:
            model = DETR(dcfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: model_config does not match this ka_rs's DetrConfig: {exc}"
        ) from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit: {exc}") from None
    model.to(device).eval()
    return LoadedDetector(
        model=model,
        class_names=list(ckpt.get("class_names", [])),
        config=dict(ckpt.get("config", {})),
        checkpoint=ckpt,
    )

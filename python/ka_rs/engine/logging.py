"""Console logging, rich progress bars, JSON-lines metrics and training-curve plots.

Only rank 0 talks: :func:`setup_logging` gives other ranks a WARNING-level logger, progress bars
are disabled off rank 0 or when stdout is not a terminal (then a plain log line is printed every
``log_every_steps`` steps instead), and :class:`MetricsWriter` writes nothing on other ranks.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MetricsWriter",
    "get_logger",
    "is_tty",
    "make_progress",
    "plot_training_curves",
    "read_metrics",
    "setup_logging",
]

LOGGER_NAME = "ka_rs"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The package logger (``ka_rs``) or a child of it."""
    return logging.getLogger(name)


def is_tty() -> bool:
    """True when stdout is an interactive terminal."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``ka_rs`` logger once: rich handler on a TTY, plain otherwise.

    Ranks other than 0 log warnings and errors only, prefixed with their rank.
    """
    logger = get_logger()
    for h in list(logger.handlers):
        if getattr(h, "_ka_rs", False):
            logger.removeHandler(h)
    handler: logging.Handler
    if rank == 0 and is_tty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
        )
    handler._ka_rs = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


class _NullProgress:
    """Stand-in with the part of rich.Progress's API the engine uses."""

    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        return 0

    def update(self, task: int, **kwargs: Any) -> None:
        return None

    def advance(self, task: int, advance: float = 1) -> None:
        return None

    def reset(self, task: int, **kwargs: Any) -> None:
        return None


def make_progress(enabled: bool = True, transient: bool = False) -> Any:
    """A rich ``Progress`` (spinner, bar, M/N, rate, elapsed, remaining, free text), or a no-op.

    Disabled (a do-nothing stand-in) when ``enabled`` is false or stdout is not a terminal.
    Tasks accept a ``info`` field shown at the end of the line (``bar.update(t, info=...)``).
    """
    if not (enabled and is_tty()):
        return _NullProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Progress(Progress):
        def add_task(self, description: str, *args: Any, **fields: Any) -> Any:
            fields.setdefault("info", "")
            return super().add_task(description, *args, **fields)

    return _Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=transient,
        refresh_per_second=4,
    )


class MetricsWriter:
    """Append JSON objects, one per line, to ``path`` (only when ``enabled``; rank 0).

    Each record is flushed immediately, so a killed run keeps everything logged so far. Non
    finite floats are written as ``null``.
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._f = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        if self._f is None:
            return
        self._f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Read a metrics JSON-lines file (records of one ``type`` when ``kind`` is given).

    A partial last line (a run killed mid-write) is ignored.
    """
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or rec.get("type") == kind:
                records.append(rec)
    return records


def plot_training_curves(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    title: str = "",
    metrics: Sequence[str] = ("AP50", "AP"),
) -> Path:
    """Write a PNG: eval metrics vs training minutes (left), training loss vs step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    evals = [r for r in records if r.get("type") == "eval"]
    trains = [r for r in records if r.get("type") == "train" and r.get("loss") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in metrics:
        pts = [(r["train_minutes"], r[m]) for r in evals if r.get(m) is not None and r[m] >= 0]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax1.plot(xs, ys, marker="o", label=m)
            for x, y in pts[-1:]:
                ax1.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax1.set_xlabel("training minutes (evaluation excluded)")
    ax1.set_ylabel("COCO AP")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="upper left")
    ax1.set_title("validation AP vs training time")
    if trains:
        losses = [r["loss"] for r in trains]
        ax2.plot([r["step"] for r in trains], losses, lw=1)
        if min(losses) > 0 and max(losses) / min(losses) > 20:  # log only for wide ranges
            ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.grid(alpha=0.3)
    ax2.set_title("training loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

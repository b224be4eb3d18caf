"""Console logging, rich progress bars, JSON-lines metrics, training-curve plots and the
failure-safe writing of a run's output files.

Only rank 0 talks: :func:`setup_logging` gives other ranks a WARNING-level logger, progress bars
are disabled off rank 0 or when stdout is not a terminal (then a plain log line is printed every
``log_every_steps`` steps instead), and :class:`MetricsWriter` writes nothing on other ranks.

Output files: every file a run writes (metrics, checkpoints, ``config.toml``, ``eval.json``,
figures, reports) goes through :func:`atomic_write` / :func:`atomic_write_text` or
:class:`MetricsWriter`; a failed write (full disk, read-only folder, quota) raises
:class:`OutputError`, an ``OSError`` whose message is ``<path>: <reason>``, which ``ka-rs``
prints as one line. Atomic writes go to a temporary file next to the destination that is
removed when the write fails, so the previous file (the last good checkpoint) stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "MetricsWriter",
    "OutputError",
    "atomic_write",
    "atomic_write_text",
    "get_logger",
    "is_tty",
    "make_progress",
    "output_errors",
    "plot_training_curves",
    "read_metrics",
    "save_figure",
    "setup_logging",
]

#: errno values that only a write produces: an OSError with one of them and no file name is
#: attributed to the output being written (see :func:`output_errors`)
WRITE_ERRNOS = frozenset(
    e
    for e in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EROFS,
        errno.EFBIG,
    )
    if e is not None
)


class OutputError(OSError):
    """Writing one of a run's output files failed; ``str()`` is ``"<path>: <reason>"``.

    Attributes: ``path`` (the output as the run names it, e.g. ``runs/x/metrics.jsonl``, even
    when it is a link to another file), ``reason`` (the system's message, e.g. ``No space left
    on device``), and ``errno`` / ``strerror`` / ``filename`` as for any ``OSError``.
    """

    def __init__(self, path: str | Path, cause: BaseException) -> None:
        code = cause.errno if isinstance(cause, OSError) else None
        reason = (cause.strerror if isinstance(cause, OSError) else None) or str(cause)
        reason = reason or type(cause).__name__
        super().__init__(code, reason, str(path))
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (DDP, workers)
        return (_rebuild_output_error, (self.path, self.errno, self.reason))


def _rebuild_output_error(path: str, code: int | None, reason: str) -> OutputError:
    return OutputError(path, OSError(code, reason))


def _as_output_error(path: str | Path, exc: OSError) -> OutputError:
    return exc if isinstance(exc, OutputError) else OutputError(path, exc)


@contextlib.contextmanager
def output_errors(default_path: str | Path) -> Iterator[None]:
    """Turn a write failure raised inside the block into an :class:`OutputError`.

    An ``OSError`` that names its file becomes ``OutputError(<that file>)``; one without a
    file name whose errno only a write can produce (no space, quota, read-only file system,
    file too large) becomes ``OutputError(default_path)``. Other errors pass unchanged.
    """
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise OutputError(exc.filename or default_path, exc) from exc
        raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file through ``write(binary_file)`` so that a failure never leaves it torn.

    The data goes to a temporary file in the destination's folder, is flushed and fsynced and
    then ``os.replace``-d over ``path``: a crash or a full disk leaves the old file (or none),
    never a partial one, and the temporary file is removed. A destination that exists but is
    not a regular file (a device such as ``/dev/full`` or ``/dev/stdout``, a FIFO, or a link to
    one) is written in place instead: it cannot be replaced.

    Raises:
        OutputError: the write failed (the message names ``path`` and the reason).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(path, IsADirectoryError(errno.EISDIR, "is a directory, not a file"))
    if path.exists() and not path.is_file():  # a device or FIFO: write through it
        try:
            with path.open("wb") as f:
                write(f)
                f.flush()
        except OSError as exc:
            raise _as_output_error(path, exc) from exc
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _as_output_error(path.parent, exc) from exc
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _as_output_error(path, exc) from exc
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not supported everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 ``text``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


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


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted
    (not the stream of the moment it was created, which a caller or a test harness may have
    replaced and closed since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # set by StreamHandler.__init__; always stderr
        pass


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
        handler = _StderrHandler()
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
        )
    vars(handler)["_ka_rs"] = True  # marks our handler: the next call replaces it
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
    finite floats are written as ``null``. A failed open or write (full disk, ...) raises
    :class:`OutputError` naming ``path``; the writer is then closed and writes nothing more.
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._f: IO[str] | None = None
        if enabled:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = self.path.open("a", encoding="utf-8")
            except OSError as exc:
                raise _as_output_error(self.path, exc) from exc

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        if self._f is None:
            return
        line = json.dumps(_jsonable(record), allow_nan=False) + "\n"
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as exc:
            self._abandon()
            raise _as_output_error(self.path, exc) from exc

    def _abandon(self) -> None:
        """Drop the file after a failed write (its unflushed bytes cannot be written)."""
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError as exc:
                raise _as_output_error(self.path, exc) from exc

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
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG with :func:`atomic_write` (:class:`OutputError` on a
    failed write)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))

"""The ``ka-rs`` command line.

Subcommands live in their own modules; each module listed in :data:`SUBCOMMAND_MODULES` defines
``register(subparsers) -> None``, which adds its parsers and sets ``func`` (``args -> int`` exit
code) with ``parser.set_defaults(func=...)``. Registration must stay cheap (no torch import at
module level), so that ``ka-rs --help`` answers at once; import heavy code inside ``func``.
To add a subcommand, write such a module and append its name here.

User errors (bad config, missing, foreign or corrupted file, invalid dataset, bad argument
values), failed writes of a run's outputs (full disk, read-only folder: ``<path>: <reason>``,
see :class:`ka_rs.engine.logging.OutputError`; atomic writes keep the last good checkpoint)
and a diverged training (NaN / inf loss, gradient or weight; the last good checkpoint is kept)
are printed as one line, ``ka-rs <command>: error: <message>``, with exit code 2 and no
traceback; ``--debug`` (or ``KA_RS_DEBUG=1``) shows the traceback instead. Ctrl-C exits with
130.
Under ``torchrun`` run it as ``torchrun --nproc-per-node N -m ka_rs.cli train-teacher ...``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMAND_MODULES", "UserError", "build_parser", "main"]

#: Modules contributing subcommands (each has ``register(subparsers)``).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "ka_rs.engine.commands",
    "ka_rs.engine.amalgamate_commands",  # amalgamate, demo, ablate
)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback (exit code 2)."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # ValueError covers ConfigError, CheckpointError and DatasetError (all ValueError
    # subclasses); OSError covers OutputError (a failed write) and missing / unreadable files;
    # FloatingPointError covers NonFiniteError (a diverged run)
    return (UserError, ValueError, OSError, FloatingPointError)


def _message(exc: BaseException) -> str:
    """The one-line message of a user error."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and msg.startswith("[Errno"):
        # a bare OSError "[Errno 28] No space left on device: 'f'" -> "f: No space left on device"
        msg = f"{exc.filename}: {exc.strerror or msg}"
    return " ".join(line.strip() for line in msg.splitlines() if line.strip()) or msg


def build_parser() -> argparse.ArgumentParser:
    """The ``ka-rs`` parser with every registered subcommand."""
    from ka_rs import __version__

    parser = argparse.ArgumentParser(
        prog="ka-rs",
        description="Knowledge amalgamation for DETR-family object detectors (Rust-accelerated).",
    )
    parser.add_argument("--version", action="version", version=f"ka-rs {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks for errors (KA_RS_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ka-rs`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    debug = args.debug or os.environ.get("KA_RS_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ka-rs {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        if debug:
            raise
        print(f"ka-rs {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m ka_rs.cli (also: torchrun -m ka_rs.cli)
    sys.exit(main())

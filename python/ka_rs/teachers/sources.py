"""Teacher sources: one string names a teacher, wherever it comes from.

==========================  ========================================================  =======
source                      what it is                                                 SA
==========================  ========================================================  =======
``PATH``                    a ka_rs checkpoint (``ka-rs train-teacher``/``convert``)   yes
``detr:PATH``               a facebookresearch/detr file (model zoo or ``main.py``);   yes
                            R50/R101, DC5 read from the file's ``args``
``detr-c5:PATH``            the same, stating the backbone is not dilated              yes
``detr-dc5:PATH``           the same, stating a dilated (DC5) backbone                 yes
``hf:DIR`` / ``hf:ORG/ID``  a Hugging Face ``*ForObjectDetection`` folder or hub id:   DETR: yes
                            DETR converted into ka_rs's DETR; Conditional / Deformable  others:
                            / DAB-DETR, RT-DETR v1/v2 run by transformers              TA only
==========================  ========================================================  =======

Class names come with the source where it has them (ka_rs checkpoints, ``id2label`` of a Hugging
Face config, COCO's 91 category slots of a DETR COCO head). Otherwise — and to rename — the user
gives them (``classes=``: a list, or a file with one name per line or a JSON list); a list whose
length does not fit the head is an error. In such a list :data:`NON_CLASS` (``"N/A"``) marks a
slot that is not a class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ka_rs.teachers.base import Teacher

__all__ = [
    "NON_CLASS",
    "SOURCE_PREFIXES",
    "SourceError",
    "load_teacher",
    "parse_source",
    "read_class_names",
]

#: The name that marks a non-class slot in a user-given class list (DETR's COCO convention).
NON_CLASS = "N/A"

#: prefix -> what it loads (for messages and ``ka-rs --help``)
SOURCE_PREFIXES: dict[str, str] = {
    "detr": "facebookresearch/detr file (.pth); R50/R101/DC5 from its args",
    "detr-c5": "facebookresearch/detr file with a plain (non-dilated) backbone",
    "detr-dc5": "facebookresearch/detr file with a dilated (DC5) backbone",
    "hf": "Hugging Face *ForObjectDetection folder (save_pretrained) or hub id",
}

# "word:" at the start, where word looks like a prefix (not a Windows drive letter)
_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$", re.S)


class SourceError(ValueError):
    """A teacher source cannot be loaded: unknown prefix, missing file, wrong format, ..."""


def parse_source(source: str | Path) -> tuple[str, str]:
    """Split a source into ``(prefix, rest)``; ``("", path)`` for a ka_rs checkpoint path.

    Raises:
        SourceError: an unknown ``prefix:``, or an empty source.
    """
    text = str(source).strip()
    if not text:
        raise SourceError("teacher source: empty")
    m = _PREFIX.match(text)
    if m is None or Path(text).exists():
        return "", text
    prefix, rest = m.group(1).lower(), m.group(2).strip()
    if prefix not in SOURCE_PREFIXES:
        known = ", ".join(f"{p}:" for p in SOURCE_PREFIXES)
        raise SourceError(
            f"{text}: unknown teacher source prefix {m.group(1)!r}; expected a ka_rs checkpoint "
            f"path or one of {known}"
        )
    if not rest:
        raise SourceError(f"{text}: nothing after {prefix + ':'!r}; expected a path or hub id")
    return prefix, rest


def read_class_names(spec: Sequence[str] | str | Path, where: str = "classes") -> list[str | None]:
    """Class names from a list or a file (one per line, or a JSON list).

    Blank lines and lines starting with ``#`` in a text file are skipped; :data:`NON_CLASS`
    entries become ``None`` (non-class slots).

    Raises:
        SourceError: a missing or unreadable file, or a JSON value that is not a list of
            strings.
    """
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise SourceError(f"{where}: class-name file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"{where}: cannot read {str(path)!r}: {exc}") from None
        if text.lstrip()[:1] in ("[", "{"):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: {str(path)!r} is not a JSON list: {exc}") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise SourceError(f"{where}: {str(path)!r} must hold a JSON list of strings")
        else:
            names = [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
        where = f"{where} ({path})"
    else:
        names = list(spec)
        if not all(isinstance(n, str) for n in names):
            raise SourceError(f"{where}: expected a list of class-name strings")
    if not names:
        raise SourceError(f"{where}: no class names")
    return [None if n == NON_CLASS else n for n in names]


def load_teacher(
    source: str | Path,
    *,
    name: str = "",
    classes: Sequence[str] | str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a teacher from any source (see the module docstring), frozen and in eval mode.

    Args:
        source: ``PATH`` (ka_rs checkpoint), ``detr:PATH``, ``detr-c5:PATH``,
            ``detr-dc5:PATH``, ``hf:DIR`` or ``hf:ORG/ID``.
        name: the teacher's name in the run (``teacher.name``).
        classes: class names in the head's order (a list, or a file: one per line or a JSON
            list); required for DETR files whose head is not COCO's 91 slots, optional
            (renaming) elsewhere. ``"N/A"`` marks a non-class slot.
        device: where the teacher runs.

    Returns:
        A :class:`~ka_rs.teachers.Teacher` (a :class:`~ka_rs.teachers.DetrTeacher` where the
        source converts into ka_rs's DETR).

    Raises:
        SourceError: naming the source and what was expected (unknown prefix, missing file,
            folder without ``config.json``, a file of another architecture, a class list
            whose length does not fit the head, ``transformers`` not installed, ...).
    """
    prefix, rest = parse_source(source)
    names = read_class_names(classes, f"{source}: classes") if classes is not None else None
    if prefix == "":
        from ka_rs.teachers.ka_rs_checkpoint import load_ka_rs_teacher

        teacher = load_ka_rs_teacher(rest, classes=names)
    elif prefix.startswith("detr"):
        from ka_rs.teachers.official_detr import load_official_detr

        dilation = {"detr": None, "detr-c5": False, "detr-dc5": True}[prefix]
        teacher = load_official_detr(rest, dilation=dilation, classes=names, source=str(source))
    else:  # hf
        from ka_rs.teachers.hf import load_hf_teacher

        teacher = load_hf_teacher(rest, classes=names, source=str(source))
    teacher.name = name
    return teacher.to(device)

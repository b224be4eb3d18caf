"""Teachers: any detector the amalgamation engine can learn from, behind one interface.

:class:`Teacher` is the interface (class names in head order with non-class slots marked, head
kind, a forward giving ``pred_logits`` / ``pred_boxes`` and, for ka_rs DETRs, the encoder
sequences SA needs). :func:`load_teacher` builds one from a source string: a ka_rs checkpoint
path, ``detr:PATH`` (facebookresearch/detr), ``hf:DIR`` / ``hf:ORG/ID`` (Hugging Face).
"""

from ka_rs.teachers.base import HEADS, DetrTeacher, Teacher
from ka_rs.teachers.sources import (
    NON_CLASS,
    SOURCE_PREFIXES,
    SourceError,
    load_teacher,
    parse_source,
    read_class_names,
)

__all__ = [
    "HEADS",
    "NON_CLASS",
    "SOURCE_PREFIXES",
    "DetrTeacher",
    "SourceError",
    "Teacher",
    "load_teacher",
    "parse_source",
    "read_class_names",
]

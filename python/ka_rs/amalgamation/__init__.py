"""Amalgamation: the student built from its teachers and the loss of one training step.

- :class:`AmalgamationStep` — teachers → pseudo-targets (Rust) → matcher (Rust) → SA / TA /
  aggregation / ground-truth losses; what ``ka-rs amalgamate`` and your own loop both call.
- :func:`build_amalgamation_student` — the N-slot student over the teachers' union classes.
"""

from ka_rs.amalgamation.step import MODES, AmalgamationStep
from ka_rs.amalgamation.student import (
    build_amalgamation_student,
    init_student_from_teacher,
    label_space_of,
    sa_teacher_indices,
    student_base_config,
)

__all__ = [
    "MODES",
    "AmalgamationStep",
    "build_amalgamation_student",
    "init_student_from_teacher",
    "label_space_of",
    "sa_teacher_indices",
    "student_base_config",
]

"""Pieces that distillation methods share: a frozen teacher, teacher–student matching, map losses.

* :mod:`replic.distill.teacher` — name a teacher (a DAG run or a checkpoint file), read and
  check it against the student before training, build it frozen;
* :mod:`replic.distill.matcher` — Hungarian matching of student to teacher predictions;
* :mod:`replic.distill.losses` — prediction and attention-map losses between matched queries.

Methods (``replic.methods.d3etr`` …) compose these; none of them touches the detector core.
"""

from replic.distill.losses import (
    attention_map_loss,
    binary_kl_with_logits,
    matched_cross_attention,
    matched_self_attention,
    normalise_rows,
    prediction_losses,
)
from replic.distill.matcher import TeacherStudentMatcher, identity_indices
from replic.distill.teacher import (
    TeacherCheckpoint,
    TeacherError,
    TeacherSpec,
    build_teacher,
    check_teacher_fits,
    read_teacher,
    shares_backbone,
    teacher_facts,
    teacher_path,
)

__all__ = [
    "TeacherCheckpoint", "TeacherError", "TeacherSpec", "TeacherStudentMatcher", "attention_map_loss",
    "binary_kl_with_logits", "build_teacher", "check_teacher_fits", "identity_indices",
    "matched_cross_attention", "matched_self_attention", "normalise_rows", "prediction_losses",
    "read_teacher", "shares_backbone", "teacher_facts", "teacher_path",
]

"""replic.eval.feature_gap: MasKD's teacher-student feature gap as 1 - R² of least-squares fits."""

from __future__ import annotations

import copy

import torch

from replic.eval.feature_gap import feature_gap, unexplained_share
from replic.models.cnn.build import build_model
from replic.data.collate import collate_fn
from test_cnn_models import tiny


def _images(seed: int, count: int = 4, size: int = 384):
    """Random images large enough that every FPN level (P7 at stride 128) has more positions than
    channels to fit."""
    gen = torch.Generator().manual_seed(seed)
    target = {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]]), "labels": torch.tensor([1]),
              "size": torch.tensor([size, size]), "orig_size": torch.tensor([size, size]), "image_id": torch.tensor(0)}
    return collate_fn([(torch.randn(3, size, size, generator=gen), dict(target)) for _ in range(count)])


def test_an_exact_affine_map_leaves_nothing_and_noise_leaves_everything():
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    a, b = torch.randn(6, 3), torch.randn(3)
    assert unexplained_share(x, x @ a + b, split=200, ridge=0.0) < 1e-10
    assert unexplained_share(x, x @ a + b, split=200) < 1e-4  # the default ridge shrinks a little
    noise = torch.randn(400, 3)
    assert 0.9 < unexplained_share(x, noise, split=200) < 1.2  # held out: no better than the mean
    half = x @ a + noise * (x @ a).std(dim=0)  # signal and noise of equal variance per channel
    assert 0.35 < unexplained_share(x, half, split=200) < 0.65


def test_a_student_equal_to_its_teacher_expresses_every_teacher_level():
    torch.manual_seed(0)
    teacher = build_model(tiny("retinanet")).eval()
    student = copy.deepcopy(teacher)
    batches = [_images(0), _images(1)]  # fitted on the first, measured on the second
    gap = feature_gap(teacher, student, batches)
    assert len(gap) >= 3  # every FPN level, P6/P7 included
    for level, row in gap.items():
        assert row["unexplained"] < 1e-2, level  # exact up to the ridge's shrinkage
    # A student with other FPN weights no longer expresses the teacher's maps exactly.
    with torch.no_grad():
        for p in student.model.backbone.fpn.parameters():
            p.add_(torch.randn_like(p))
    assert max(row["unexplained"] for row in feature_gap(teacher, student, batches).values()) > 5e-2

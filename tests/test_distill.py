"""replic.distill: teacher–student matcher, prediction / attention-map losses, teacher checks."""

from __future__ import annotations

import pytest
import torch

from replic.config import to_dict
from replic.distill import (
    TeacherError,
    TeacherSpec,
    TeacherStudentMatcher,
    attention_map_loss,
    binary_kl_with_logits,
    check_teacher_fits,
    matched_cross_attention,
    matched_self_attention,
    normalise_rows,
    prediction_losses,
    read_teacher,
    teacher_path,
)
from replic.models.config import ModelConfig


def _preds(batch: int, queries: int, classes: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, queries, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(batch, queries, 2, generator=g) * 0.2 + 0.05
    return {"pred_logits": torch.randn(batch, queries, classes, generator=g) * 3,
            "pred_boxes": torch.cat([centres, sizes], -1)}


def test_matcher_recovers_a_known_permutation_with_unequal_query_counts():
    teacher = _preds(3, 7)
    perms = [torch.randperm(7, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    # The student holds the teacher's queries in another order, plus 4 queries of its own.
    extra = _preds(3, 4, seed=5)
    student = {k: torch.cat([torch.stack([teacher[k][b, p] for b, p in enumerate(perms)]), extra[k]], 1)
               for k in teacher}
    indices = TeacherStudentMatcher()(student, teacher)
    for b, (s_idx, t_idx) in enumerate(indices):
        assert len(s_idx) == 7  # min(11, 7) pairs
        # student query i holds teacher query perms[b][i]
        assert torch.equal(perms[b][s_idx], t_idx)


def test_binary_kl_is_zero_only_where_the_logits_agree():
    t = torch.randn(4, 5) * 4
    assert torch.equal(binary_kl_with_logits(t, t), torch.zeros_like(t))
    s = t.clone()
    s[1, 2] += 0.5
    kl = binary_kl_with_logits(s, t)
    assert kl[1, 2] > 0 and kl.sum() == kl[1, 2]


def test_prediction_losses_zero_for_identical_and_positive_for_shifted_boxes():
    p = _preds(2, 5)
    ident = [(torch.arange(5), torch.arange(5))] * 2
    zero = prediction_losses(p, p, ident)
    assert all(float(v) == pytest.approx(0.0, abs=1e-7) for v in zero.values())
    moved = {"pred_logits": p["pred_logits"], "pred_boxes": p["pred_boxes"] + torch.tensor([0.05, 0, 0, 0])}
    terms = prediction_losses(moved, p, ident)
    assert float(terms["bbox"]) == pytest.approx(0.05, rel=1e-5)  # one coordinate per pair moved by 0.05
    assert float(terms["giou"]) > 0 and float(terms["class"]) == pytest.approx(0.0, abs=1e-7)


def test_unmatched_student_queries_get_a_background_target_only_when_asked():
    s, t = _preds(1, 6), _preds(1, 4, seed=1)
    pairs = [(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))]
    ignore = prediction_losses(s, t, pairs, "ignore")["class"]
    background = prediction_losses(s, t, pairs, "background")["class"]
    expected = torch.nn.functional.softplus(s["pred_logits"][0, 4:]).sum() / 4
    torch.testing.assert_close(background - ignore, expected)


def _maps(b: int, m: int, n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(b, m, n, k, generator=torch.Generator().manual_seed(seed)).softmax(-1)


@pytest.mark.parametrize("form", ["mse", "kl"])
def test_cross_attention_loss_ignores_padded_keys(form):
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 9:] = True
    s, t = _maps(2, 3, 4, 12, 0), _maps(2, 3, 4, 12, 1)
    base = attention_map_loss(s, t, pad, form)
    # Anything at padded keys (student or teacher side) leaves the loss unchanged.
    s2, t2 = s.clone(), t.clone()
    s2[1, :, :, 9:] = torch.rand(3, 4, 3) * 5
    t2[1, :, :, 9:] = 7.0
    torch.testing.assert_close(attention_map_loss(s2, t2, pad, form), base, rtol=0, atol=1e-7)
    # ... but a change at a valid key does change it.
    s2[1, 0, 0, 2] += 0.3
    assert float(attention_map_loss(s2, t2, pad, form)) != pytest.approx(float(base), rel=1e-4)
    assert float(attention_map_loss(t, t, pad, form)) == pytest.approx(0.0, abs=1e-7)


def test_compared_rows_sum_to_one_over_valid_keys():
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 6:] = True
    rows = normalise_rows(torch.rand(2, 3, 4, 10) + 0.1, pad)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 3, 4))
    assert torch.all(rows[0, :, :, 6:] == 0)
    # The self-attention sub-matrix of matched queries is renormalised over those queries only.
    attn = _maps(2, 3, 8, 8, 2)
    idx = torch.tensor([[5, 1, 2], [0, 7, 3]])
    sub = matched_self_attention(attn, idx)
    assert sub.shape == (2, 3, 3, 3)
    assert sub[1, 2, 1, 0] == attn[1, 2, 7, 0]  # pair order: row of pair 1 = query 7, column of pair 0 = query 0
    torch.testing.assert_close(normalise_rows(sub).sum(-1), torch.ones(2, 3, 3))
    cross = matched_cross_attention(_maps(2, 3, 8, 10, 3), idx)
    assert cross.shape == (2, 3, 3, 10)


def test_per_head_vs_head_averaged_attention_loss():
    s, t = _maps(1, 2, 3, 6, 0), _maps(1, 2, 3, 6, 1)
    swapped = s.flip(1)  # heads exchanged: per-head loss changes, head-averaged loss does not
    torch.testing.assert_close(attention_map_loss(swapped, t, per_head=False), attention_map_loss(s, t, per_head=False))
    assert float(attention_map_loss(swapped, t)) != pytest.approx(float(attention_map_loss(s, t)), rel=1e-3)


def _cfg(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                num_queries=6, num_classes=5, pretrained_backbone="none")
    return ModelConfig(**{**base, **kw})


def test_teacher_checks_name_the_file_and_the_mismatch(tmp_path):
    with pytest.raises(TeacherError, match="teacher checkpoint not found: .*missing.pt"):
        read_teacher(tmp_path / "missing.pt")
    bad = tmp_path / "no_config.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(TeacherError, match="no 'model_config'"):
        read_teacher(bad)
    with pytest.raises(TeacherError, match=r"t\.pt: the teacher does not fit the student: num_classes: teacher 9 vs student 5"):
        check_teacher_fits(_cfg(num_classes=9), _cfg(), tmp_path / "t.pt", same_hidden=True, same_layers=True,
                           same_heads=True)
    with pytest.raises(TeacherError, match="hidden_dim: teacher 64 vs student 32"):
        check_teacher_fits(_cfg(hidden_dim=64), _cfg(), "t.pt", same_hidden=True, same_layers=False, same_heads=False)
    # Adaptive-only distillation of the last layer needs neither the hidden size nor the depth.
    check_teacher_fits(_cfg(hidden_dim=64, dec_layers=4, num_queries=9), _cfg(), "t.pt", same_hidden=False,
                       same_layers=False, same_heads=True)


def test_teacher_named_by_experiment_is_the_sibling_run(tmp_path):
    spec = TeacherSpec(experiment="cdetr_r101_50ep")
    assert teacher_path(spec, tmp_path / "smoke" / "student") == (tmp_path / "smoke" / "cdetr_r101_50ep"
                                                                  / "checkpoint_final.pt").resolve()
    with pytest.raises(TeacherError, match="no run directory is known"):
        teacher_path(spec, None)
    ckpt = tmp_path / "smoke" / "cdetr_r101_50ep" / "checkpoint_final.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": {}, "model_config": to_dict(_cfg()), "config": {"name": "other_run"}}, ckpt)
    with pytest.raises(TeacherError, match="written by experiment 'other_run'"):
        read_teacher(ckpt, expect_experiment="cdetr_r101_50ep")

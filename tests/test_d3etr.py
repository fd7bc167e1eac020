"""D³ETR on real (tiny) Conditional DETR models: MixMatcher, distilled terms, frozen teacher, eval.

Tolerances: a student that copies the teacher computes the teacher's function, but with the
auxiliary group decoded in the same pass (block-diagonal attention), so sums run in another
order: weighted terms are 0 to 1e-6 (measured ≤ 7e-7), and a perturbed layer gives weighted
terms > 1e-5 (the smallest measured: 1e-4, cross-attention of the perturbed layer).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from replic.config import ConfigError, from_dict, to_dict
from replic.distill import TeacherError
from replic.engine.config import ExperimentConfig
from replic.methods import MethodStep, build_method
from replic.methods.d3etr import layer_outputs
from replic.models.build import build_criterion, build_model

MODEL = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=3, dim_feedforward=64,
             num_queries=8, num_classes=5, dropout=0.0, pretrained_backbone="none", channels_last=False)
ZERO, POSITIVE = 1e-6, 1e-5


def _teacher_file(path, model_cfg: dict, seed: int = 0):
    """A teacher checkpoint as `replic train` writes it (model + model_config), with random boxes."""
    torch.manual_seed(seed)
    cfg = from_dict(ExperimentConfig, {"model": model_cfg}).model
    teacher = build_model(cfg)
    # The official init zeroes the last box layer (every box at its reference point); spread the boxes.
    torch.nn.init.normal_(teacher.bbox_embed.layers[-1].weight, std=0.3)
    torch.nn.init.normal_(teacher.class_embed.weight, std=1.0)  # confident classes: a class change shows
    torch.save({"model": teacher.state_dict(), "model_config": to_dict(cfg)}, path)
    return teacher


def _setup(tmp_path, method: dict | None = None, student_model: dict | None = None, seed: int = 0):
    teacher = _teacher_file(tmp_path / "teacher.pt", MODEL, seed)
    section = {"name": "d3etr", "teacher": {"checkpoint": str(tmp_path / "teacher.pt")}, **(method or {})}
    cfg = from_dict(ExperimentConfig, {"model": student_model or MODEL, "method": section})
    m = build_method(cfg)
    m.check_inputs()
    student = copy.deepcopy(teacher) if student_model is None else build_model(cfg.model)
    criterion = build_criterion(cfg.model)
    m.setup(student, criterion, torch.device("cpu"))
    return m, student, criterion


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True  # the second image is padded on the right
    images[1, :, :, 96:] = 0
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.2]])}]
    return images, mask, targets


def _distill_terms(losses, weights):
    """The weighted distillation terms (the attention losses are tiny before their 1e3-1e4 weights)."""
    return {k: float(v.detach()) * weights[k] for k, v in losses.items() if k.startswith("d3_")}


def test_self_distillation_terms_are_zero_and_a_perturbed_layer_makes_them_positive(tmp_path):
    method, student, criterion = _setup(tmp_path)
    images, mask, targets = _batch()
    out = method.forward_train(student, images, mask, targets)
    terms = _distill_terms(criterion(out, targets), criterion.weight_dict)
    # 5 signals × 3 layers × 2 matchings
    assert len(terms) == 30 and all(abs(v) < ZERO for v in terms.values()), terms
    # Adaptive matching finds the identity at every layer.
    teacher_layers = layer_outputs(out["distill_teacher"])
    for s_layer, t_layer in zip(layer_outputs(out), teacher_layers):
        for s_idx, t_idx in method.matcher(s_layer, t_layer):
            assert torch.equal(s_idx, t_idx)

    # Perturb decoder layer 1 (its self-attention query): layer 0 still agrees, layers 1 and 2 do not.
    with torch.no_grad():
        student.transformer.decoder.layers[1].sa_qcontent_proj.weight.add_(
            0.5 * torch.randn_like(student.transformer.decoder.layers[1].sa_qcontent_proj.weight))
    terms = _distill_terms(criterion(method.forward_train(student, images, mask, targets), targets),
                           criterion.weight_dict)
    for name, value in terms.items():
        layer = int(name.rsplit("_", 1)[1]) if name[-1].isdigit() else 2
        if layer == 0:
            assert abs(value) < ZERO, name
        else:
            assert value > POSITIVE, (name, value)


def test_adaptive_matching_recovers_a_permutation_of_the_teachers_queries_at_every_layer(tmp_path):
    method, student, _ = _setup(tmp_path, {"matching": "adaptive"})
    teacher = method.frozen("teacher")
    perm = torch.randperm(MODEL["num_queries"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # teacher query j is student query perm[j]
        teacher.query_embed.weight.copy_(student.query_embed.weight[perm])
    images, mask, targets = _batch(seed=4)
    out = method.forward_train(student, images, mask, targets)
    layers = list(zip(layer_outputs(out), layer_outputs(out["distill_teacher"])))
    assert len(layers) == MODEL["dec_layers"]
    for s_layer, t_layer in layers:
        for s_idx, t_idx in method.matcher(s_layer, t_layer):
            assert torch.equal(s_idx, perm[t_idx])


def test_teacher_stays_frozen_and_student_gradient_reaches_the_auxiliary_group(tmp_path):
    method, student, criterion = _setup(tmp_path, student_model={**MODEL, "num_queries": 6}, seed=2)
    teacher = method.frozen("teacher")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    step = MethodStep(student, method)
    assert not any(k.startswith("method.") for k in step.state_dict())
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-3)
    images, mask, targets = _batch()
    step.train()
    for _ in range(3):
        losses = criterion(step(images, mask, targets), targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key

    # The fixed-matching terms alone train the shared decoder and heads through the auxiliary
    # group, and nothing of the student's own queries (block-diagonal attention keeps them apart).
    student.zero_grad()
    out = step(images, mask, targets)
    fixed = sum(v * criterion.weight_dict[k] for k, v in criterion(out, targets).items() if k.startswith("d3_fix_"))
    fixed.backward()
    assert student.query_embed.weight.grad is None or not student.query_embed.weight.grad.any()
    for module in (student.transformer.decoder.layers[0].sa_qpos_proj, student.transformer.decoder.ref_point_head.layers[0],
                   student.class_embed, student.bbox_embed.layers[-1]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0, module


def test_student_predictions_do_not_depend_on_the_auxiliary_group(tmp_path):
    method, student, _ = _setup(tmp_path, student_model=MODEL, seed=5)
    student.eval()
    images, mask, _ = _batch()
    teacher = method.frozen("teacher")
    plain = student(images, mask)
    with_group = student(images, mask, extra_queries=[{"query_pos": teacher.query_embed.weight}])
    torch.testing.assert_close(with_group["pred_logits"], plain["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_group["pred_boxes"], plain["pred_boxes"], rtol=0, atol=1e-6)
    assert with_group["extra_groups"][0]["pred_logits"].shape == plain["pred_logits"].shape


def test_teacher_that_does_not_fit_is_refused_before_training(tmp_path):
    _teacher_file(tmp_path / "teacher.pt", {**MODEL, "num_classes": 9})
    cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": {
        "name": "d3etr", "teacher": {"checkpoint": str(tmp_path / "teacher.pt")}}})
    with pytest.raises(TeacherError, match="num_classes: teacher 9 vs student 5"):
        build_method(cfg).check_inputs()
    # A wider teacher is fine for adaptive matching of predictions (no shared queries, no per-layer pairing).
    _teacher_file(tmp_path / "wide.pt", {**MODEL, "hidden_dim": 64, "dec_layers": 2})
    cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": {
        "name": "d3etr", "teacher": {"checkpoint": str(tmp_path / "wide.pt")}, "matching": "adaptive",
        "layers": "last", "signals": ["predictions"]}})
    method = build_method(cfg)
    method.check_inputs()
    criterion = build_criterion(cfg.model)
    student = build_model(cfg.model)
    method.setup(student, criterion, torch.device("cpu"))
    images, mask, targets = _batch()
    losses = criterion(method.forward_train(student, images, mask, targets), targets)
    assert sorted(k for k in losses if k.startswith("d3_")) == ["d3_ada_bbox", "d3_ada_class", "d3_ada_giou"]


def test_ablation_switches_select_the_terms(tmp_path):
    method, _, criterion = _setup(tmp_path, {"matching": "fixed", "signals": ["predictions", "self_attn"],
                                             "fixed_group_gt_loss": "teacher_assignment"})
    names = {k for k in criterion.weight_dict if k.startswith("d3_")}
    assert not any(k.startswith("d3_ada_") or "cross_attn" in k for k in names)
    assert {"d3_fix_self_attn", "d3_fix_self_attn_0", "d3_fix_class_1", "d3_fix_gt_loss_ce",
            "d3_fix_gt_loss_giou_1"} <= names
    assert criterion.weight_dict["d3_fix_self_attn"] == 1.0e4 and criterion.weight_dict["d3_fix_gt_loss_ce"] == 2.0
    assert method.provenance()["teacher"]["sha256"] and method.provenance()["options"]["matching"] == "fixed"


def test_cached_backbone_maps_give_the_same_d3etr_terms_as_images(tmp_path):
    """Mini scale: the cached maps of the shared frozen backbone stand in for both models' images;
    a teacher with another backbone makes the run train from images (the method says why)."""
    from replic.engine.feature_cache import unsupported_reason
    from replic.models.backbone import BackboneFeatures

    method, student, criterion = _setup(tmp_path, seed=6)
    with torch.no_grad():  # a student that differs from its teacher: every term is non-zero
        for module in (student.class_embed, student.transformer.decoder.layers[0].ca_qcontent_proj):
            module.weight.add_(0.2 * torch.randn_like(module.weight))
    assert method.feature_cache_reason(student) is None
    images, mask, targets = _batch()
    with torch.no_grad():
        maps = dict(student.backbone[0].body(images))
        cached = criterion(method.forward_train(student, BackboneFeatures(maps, tuple(images.shape)), mask, targets),
                           targets)
        direct = criterion(method.forward_train(student, images, mask, targets), targets)
    assert cached.keys() == direct.keys() and any(k.startswith("d3_fix_") for k in cached)
    for key, value in direct.items():
        assert float(value) > 0, key
        torch.testing.assert_close(cached[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert unsupported_reason(method.cfg) is None

    (tmp_path / "other").mkdir()
    other, other_student, _ = _setup(tmp_path / "other", student_model=MODEL, seed=2)
    assert "teacher's backbone differs" in other.feature_cache_reason(other_student)


# ----------------------------------------------------------------------------- refused before training
def _config(student: dict, teacher_file, **method):
    return from_dict(ExperimentConfig, {"model": student, "method": {
        "name": "d3etr", "teacher": {"checkpoint": str(teacher_file)}, **method}})


def test_softmax_detr_student_or_teacher_is_refused_before_training(tmp_path):
    """D³ETR's class terms are sigmoid: a softmax model's logits carry a no-object column."""
    _teacher_file(tmp_path / "teacher.pt", MODEL)
    # The student: refused when the config loads (no teacher read, no model built).
    with pytest.raises(ConfigError, match=r"method\.name: d3etr: the student's model is DETR \(model\.arch: detr, "
                                          r"model\.focal_loss: false\).*no-object column.*sigmoid"):
        _config({**MODEL, "arch": "detr"}, tmp_path / "teacher.pt")
    with pytest.raises(ConfigError, match=r"student's model is conditional_detr with focal_loss: false"):
        _config({**MODEL, "focal_loss": False}, tmp_path / "teacher.pt")
    # The teacher: refused by check_inputs, naming its file, before the student is built.
    _teacher_file(tmp_path / "detr.pt", {**MODEL, "arch": "detr"})
    method = build_method(_config(MODEL, tmp_path / "detr.pt"))
    with pytest.raises(TeacherError, match=r"detr\.pt: method d3etr: the teacher's model is DETR.*no-object"):
        method.check_inputs()
    # A sigmoid DETR (arch detr, focal_loss: true) has no no-object column: accepted.
    _config({**MODEL, "arch": "detr", "focal_loss": True}, tmp_path / "teacher.pt")
    # A CNN detector has no decoder to distil.
    cnn = types.SimpleNamespace(model=types.SimpleNamespace(arch="retinanet"),
                                method={"name": "d3etr", "teacher": {"checkpoint": str(tmp_path / "teacher.pt")}})
    with pytest.raises(ConfigError, match=r"method\.name: d3etr distils a DETR decoder.*no transformer decoder"):
        build_method(cnn)


def test_attention_signals_without_aux_outputs_are_refused_before_training(tmp_path):
    """Without aux outputs the decoder returns attention maps of every layer but predictions of the
    last only, which the first training step could not pair: refused up front, keys named."""
    _teacher_file(tmp_path / "teacher.pt", MODEL)
    no_aux = {**MODEL, "aux_loss": False}
    for signals in (["self_attn"], ["predictions", "cross_attn"]):
        with pytest.raises(ConfigError, match=r"method\.signals: .* needs model\.aux_loss: true.*method\.layers: "
                                              r"'last' use method\.signals: \[predictions\]"):
            _config(no_aux, tmp_path / "teacher.pt", layers="last", signals=signals)
    # Predictions alone pair the last layers: accepted, and the step runs.
    cfg = _config(no_aux, tmp_path / "teacher.pt", layers="last", signals=["predictions"])
    method = build_method(cfg)
    method.check_inputs()
    student, criterion = build_model(cfg.model), build_criterion(cfg.model)
    method.setup(student, criterion, torch.device("cpu"))
    images, mask, targets = _batch()
    losses = criterion(method.forward_train(student, images, mask, targets), targets)
    assert sorted(k for k in losses if k.startswith("d3_")) == [
        "d3_ada_bbox", "d3_ada_class", "d3_ada_giou", "d3_fix_bbox", "d3_fix_class", "d3_fix_giou"]
    # A teacher without aux outputs: the same pairing problem on its side, refused by check_inputs.
    _teacher_file(tmp_path / "no_aux.pt", no_aux)
    method = build_method(_config(MODEL, tmp_path / "no_aux.pt", layers="last", matching="adaptive"))
    with pytest.raises(TeacherError, match=r"no_aux\.pt: the teacher was trained with aux_loss: false"):
        method.check_inputs()


# ----------------------------------------------------------------------------- index order, dropout
def test_a_self_teacher_with_permuted_queries_gives_vanishing_adaptive_terms(tmp_path):
    """The teacher is the student with its queries shuffled: matched pairs compute the same function,
    so every adaptive term vanishes; reading the pairs the wrong way round (student at the teacher's
    index) does not, which is what the equal-query-count tests above could not tell apart."""
    method, student, criterion = _setup(tmp_path, {"matching": "adaptive"})
    teacher = method.frozen("teacher")
    perm = torch.tensor([1, 2, 0, 5, 3, 4, 7, 6])  # teacher query j = student query perm[j]
    assert not torch.equal(perm[perm], torch.arange(len(perm)))  # not an involution: swapped ≠ right
    with torch.no_grad():
        teacher.query_embed.weight.copy_(student.query_embed.weight[perm])
    images, mask, targets = _batch(seed=4)
    out = method.forward_train(student, images, mask, targets)
    terms = _distill_terms(criterion(out, targets), criterion.weight_dict)
    # 5 signals × 3 layers, adaptive only
    assert len(terms) == 15 and all(abs(v) < ZERO for v in terms.values()), terms

    s_layers, t_layers = layer_outputs(out), layer_outputs(out["distill_teacher"])
    for layer, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers)):
        indices = method.matcher(s_layer, t_layer)
        assert all(torch.equal(s, perm[t]) for s, t in indices)  # not the identity
        swapped = [(t, s) for s, t in indices]
        with torch.no_grad():
            wrong = method._pair_terms("d3_ada_", "", s_layer, t_layer, swapped, out, out["distill_teacher"])
        for key, value in wrong.items():
            assert float(value) * criterion.weight_dict[key] > POSITIVE, (layer, key)


def test_distilled_attention_maps_are_the_pre_dropout_softmax_maps(tmp_path):
    """Dropout in train mode: the student's maps that reach the attention terms are the softmax weights
    before dropout (dropped maps would have rows of 0 and 1/(1-p)-scaled entries, summing ≠ 1)."""
    model = {**MODEL, "dropout": 0.5}
    method, student, criterion = _setup(tmp_path, student_model=model, seed=7)
    images, mask, targets = _batch()
    student.train()
    torch.manual_seed(0)
    out = method.forward_train(student, images, mask, targets)
    memory_pad = out["memory_mask"]
    assert memory_pad.any() and (~memory_pad).any()
    groups = [out, out["extra_groups"][0]]
    for group in groups:
        for layer in layer_outputs(group):
            maps = layer["attention"]
            torch.testing.assert_close(maps["self_attn"].sum(-1), torch.ones_like(maps["self_attn"][..., 0]),
                                       rtol=0, atol=1e-5)
            cross = maps["cross_attn"]
            torch.testing.assert_close(cross.sum(-1), torch.ones_like(cross[..., 0]), rtol=0, atol=1e-5)
            assert not cross.masked_select(memory_pad[:, None, None, :]).any()  # padded keys: exactly 0
    # Layer 0's self-attention input (content 0 + query_pos) is not dropped, so its map must equal
    # the eval-mode map bit for bit; a map taken after dropout would not.
    student.eval()
    with torch.no_grad():
        reference = student(images, mask, return_attention=True)
    torch.testing.assert_close(layer_outputs(out)[0]["attention"]["self_attn"],
                               layer_outputs(reference)[0]["attention"]["self_attn"], rtol=0, atol=1e-6)
    # And dropout is on: the train-mode predictions differ from eval's.
    assert (out["pred_logits"] - reference["pred_logits"]).abs().max() > 1e-3
    # The terms are computed from those maps (finite, non-zero: the student is not the teacher).
    terms = _distill_terms(criterion(out, targets), criterion.weight_dict)
    assert all(v > 0 for k, v in terms.items() if "attn" in k)


def test_fixed_group_reference_points_are_the_students_or_the_teachers_as_asked(tmp_path):
    """``fixed_reference_points``: ``student`` decodes the teacher's queries at the student's own
    reference points (its ref_point_head on them); ``teacher`` at the teacher's (TPRD's choice). With
    a student of other weights the two differ, and only the auxiliary group's outputs change."""
    images, mask, targets = _batch()
    outs = {}
    for choice in ("student", "teacher"):
        (tmp_path / choice).mkdir()
        method, student, _ = _setup(tmp_path / choice, {"fixed_reference_points": choice}, student_model=MODEL, seed=5)
        student.eval()
        teacher = method.frozen("teacher")
        outs[choice] = method.forward_train(student, images, mask, targets)
        group = outs[choice]["extra_groups"][0]
        query_pos = teacher.query_embed.weight
        own = student.transformer.decoder.make_reference_points(query_pos[None].repeat(2, 1, 1))
        with torch.no_grad():
            theirs = teacher(images, mask)["reference_points"]
        expected = theirs if choice == "teacher" else own
        torch.testing.assert_close(group["reference_points"], expected, rtol=0, atol=0)
    assert not torch.allclose(outs["student"]["extra_groups"][0]["reference_points"],
                              outs["teacher"]["extra_groups"][0]["reference_points"])
    assert not torch.allclose(outs["student"]["extra_groups"][0]["pred_boxes"],
                              outs["teacher"]["extra_groups"][0]["pred_boxes"])
    torch.testing.assert_close(outs["student"]["pred_boxes"], outs["teacher"]["pred_boxes"], rtol=0, atol=0)

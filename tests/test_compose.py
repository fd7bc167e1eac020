"""Methods composed on one student (replic/methods/compose.py): KS-DETR + D³ETR + MasKD.

The composed step is checked against each method alone on the same batch, the same detector
weights and the same frozen teacher, in float64 (the composed forward decodes the KS teacher
streams and D³ETR's query group in other passes than the methods alone do, so sums run in
another order; float64 keeps that at rounding level): every method's own terms are its terms
alone, the detector's set loss is the plain one, so the composed loss is the plain loss plus
the sum of what each method adds. Refusals happen when the config loads; evaluation is the
plain detector.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from replic.config import ConfigError, from_dict, to_dict
from replic.engine.config import ExperimentConfig
from replic.methods import TrainingMethod, build_method, method_classes
from replic.methods.compose import ComposedMethod, ComposedOptions, check_composable
from replic.models.build import build_criterion, build_model

MODEL = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=64,
             num_queries=8, num_classes=5, dropout=0.0, pretrained_backbone="none", channels_last=False)
TOL = 1e-10  # float64, relative to the term's size


def _teacher(path: Path) -> None:
    torch.manual_seed(7)
    cfg = from_dict(ExperimentConfig, {"model": MODEL}).model
    teacher = build_model(cfg)
    torch.nn.init.normal_(teacher.bbox_embed.layers[-1].weight, std=0.3)
    torch.nn.init.normal_(teacher.class_embed.weight, std=1.0)
    torch.save({"model": teacher.state_dict(), "model_config": to_dict(cfg)}, path)


def _sections(teacher: Path) -> dict[str, dict]:
    return {
        "ks_detr": {"name": "ks_detr"},
        "d3etr": {"name": "d3etr", "teacher": {"checkpoint": str(teacher)}},
        "maskd": {"name": "maskd", "teacher": {"checkpoint": str(teacher)}, "tokens": {"random": True},
                  "num_tokens": 2, "position": "memory", "custom_mask_warmup": 0},
    }


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    images[1, :, :, 96:] = 0
    targets = [{"labels": torch.tensor([1, 3]), "size": torch.tensor([96, 128]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]], dtype=torch.float64)},
               {"labels": torch.tensor([2]), "size": torch.tensor([96, 96]),
                "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.2]], dtype=torch.float64)}]
    return images, mask, targets


def _float64(method: TrainingMethod) -> None:
    method.double()
    parts = method.parts.values() if isinstance(method, ComposedMethod) else [method]
    for part in parts:
        for frozen in part._frozen.values():
            frozen.double()


def _step(section, detector: torch.nn.Module, state: dict | None = None):
    """(method, losses dict, weights) of one training step of ``section`` on a copy of ``detector``."""
    cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": section})
    method = build_method(cfg)
    method.check_inputs()
    model = copy.deepcopy(detector)
    criterion = build_criterion(cfg.model)
    method.setup(model, criterion, torch.device("cpu"))
    if state is not None:  # the composed method's trainable state (MasKD's align convs): same inputs
        method.load_state_dict(state)
    _float64(method)
    images, mask, targets = _batch()
    losses = criterion(method.forward_train(model, images, mask, targets), targets)
    return method, {k: float(v) for k, v in losses.items()}, dict(criterion.weight_dict)


def _total(losses: dict[str, float], weights: dict[str, float]) -> float:
    return sum(v * weights[k] for k, v in losses.items() if k in weights)


def test_a_composed_step_is_the_plain_loss_plus_each_methods_terms(tmp_path):
    teacher = tmp_path / "teacher.pt"
    _teacher(teacher)
    sections = _sections(teacher)
    composed_cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": list(sections.values())})
    torch.manual_seed(0)
    detector = build_method(composed_cfg).build_model().double()  # with the KS layer swapped in
    composed, all_terms, all_weights = _step(list(sections.values()), detector)
    assert composed.name == "ks_detr+d3etr+maskd" and set(composed.parts) == set(sections)
    # One frozen teacher serves D³ETR and MasKD.
    assert composed.parts["d3etr"].frozen("teacher") is composed.parts["maskd"].frozen("teacher")

    _, plain, plain_weights = _step({"name": "none"}, detector)
    added_total, owned = 0.0, set()
    for name, section in sections.items():
        state = composed.parts[name].state_dict()
        _, alone, weights = _step(section, detector, state)
        own = set(alone) - set(plain)
        assert own and not own & owned, name
        owned |= own
        for key in own:  # the method's own terms: as alone
            assert all_terms[key] == pytest.approx(alone[key], rel=TOL, abs=1e-12), (name, key)
        for key in plain:  # the student's set loss is the plain detector's
            assert alone[key] == pytest.approx(plain[key], rel=TOL, abs=1e-12), (name, key)
        added_total += _total(alone, weights) - _total(plain, plain_weights)
    assert set(all_terms) == set(plain) | owned  # nothing lost, nothing added by composing
    for key in plain:
        assert all_terms[key] == pytest.approx(plain[key], rel=TOL, abs=1e-12), key
    assert _total(all_terms, all_weights) == pytest.approx(_total(plain, plain_weights) + added_total, rel=TOL)
    assert added_total > 0


def test_the_composed_state_keeps_each_methods_state_apart_and_evaluates_as_a_plain_detector(tmp_path):
    from replic.engine.runtime import build_detector

    teacher = tmp_path / "teacher.pt"
    _teacher(teacher)
    sections = _sections(teacher)
    cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": list(sections.values())})
    method = build_method(cfg)
    method.check_inputs()
    detector = method.build_model()
    method.setup(detector, build_criterion(cfg.model), torch.device("cpu"))
    state = method.state_dict()
    assert state and all(k.startswith("parts.maskd.") for k in state)  # only MasKD has trainable state
    assert "parts.maskd.step" in state
    assert set(method.input_files()) == {"method.d3etr.teacher", "method.maskd.teacher"}
    # Evaluation builds the detector as training did (KS's layer, student path only) and runs it
    # plainly: no teacher, no GT, the same predictions as the trained detector's plain forward.
    evaluated = build_detector(cfg)
    evaluated.load_state_dict(detector.state_dict())
    detector.eval(), evaluated.eval()
    images, mask, _ = _batch()
    with torch.no_grad():
        a, b = detector(images.float(), mask), evaluated(images.float(), mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    # Without KS (no layer swapped in) the composed student is a plain Conditional DETR, weight for weight.
    cfg2 = from_dict(ExperimentConfig, {"model": MODEL, "method": [sections["d3etr"], sections["maskd"]]})
    student = build_method(cfg2).build_model()
    build_model(cfg2.model).load_state_dict(student.state_dict())  # strict


def _options(*classes) -> ComposedOptions:
    return ComposedOptions([(cls, cls.Options()) for cls in classes])


@pytest.mark.parametrize("section, message", [
    ([{"name": "ks_detr"}, {"name": "ks_detr"}], r"method\[1\].name: 'ks_detr' is listed twice"),
    ([{"name": "ks_detr"}, {"name": "none"}], r"method\[1\].name: 'none' cannot be composed"),
    ([{"name": "ks_detr"}, {"name": "maskd_tokens", "teacher": {"checkpoint": "t.pt"}}],
     "'maskd_tokens' trains no student"),
    ([{"name": "ks_detr"}], "two or more methods"),
    ([{"name": "ks_detr"}, {"name": "d3etr", "tacher": {}}], r"unknown config key 'method\[1\]\.tacher' \(did you mean 'method\[1\]\.teacher'\?\)"),
])
def test_combinations_that_cannot_work_are_refused_when_the_config_loads(section, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ExperimentConfig, {"model": MODEL, "method": section}).validate()


def test_two_layer_swaps_or_one_forward_argument_twice_are_refused_naming_both():
    class SwapA(TrainingMethod):
        name = "swap_a"

        def build_model(self):  # pragma: no cover - never called
            return super().build_model()

    class SwapB(SwapA):
        name = "swap_b"

    class AskA(TrainingMethod):
        name = "ask_a"
        model_input_keys = frozenset({"encoder_inputs"})

    class AskB(TrainingMethod):
        name = "ask_b"
        model_input_keys = frozenset({"encoder_inputs", "other"})

    with pytest.raises(ConfigError, match="swap_a and swap_b both build the detector"):
        check_composable(_options(SwapA, SwapB))
    with pytest.raises(ConfigError, match=r"ask_a and ask_b both set the student's forward argument\(s\) "
                                          r"\['encoder_inputs'\]"):
        check_composable(_options(AskA, AskB))
    check_composable(_options(SwapA, AskA))  # one swap, distinct arguments: fine


def test_the_feature_cache_follows_what_each_method_declares(tmp_path):
    from replic.engine.feature_cache import unsupported_reason

    teacher = tmp_path / "teacher.pt"
    sections = _sections(teacher)
    both = from_dict(ExperimentConfig, {"model": MODEL, "method": [sections["ks_detr"], sections["d3etr"]]})
    assert unsupported_reason(both) is None
    assert [c.name for c in method_classes(both.method)] == ["ks_detr", "d3etr"]
    three = from_dict(ExperimentConfig, {"model": MODEL, "method": list(sections.values())})
    assert unsupported_reason(three) is None  # MasKD's memory tap decides after setup (next test)
    tokens = from_dict(ExperimentConfig, {"model": MODEL, "method": {
        "name": "maskd_tokens", "teacher": {"checkpoint": str(teacher)}, "position": "memory"}})
    assert unsupported_reason(tokens) == "method 'maskd_tokens' runs its own forward on the images"


def test_cached_backbone_maps_give_the_same_maskd_memory_terms_as_images(tmp_path):
    """At mini scale teacher and student share one frozen backbone, so the student's cached maps are
    the teacher's too: MasKD's memory term from cached maps equals the term from images. A teacher
    with another backbone, or a backbone tap, trains from images and says why."""
    from replic.models.backbone import BackboneFeatures

    teacher = tmp_path / "teacher.pt"
    _teacher(teacher)
    section = _sections(teacher)["maskd"]
    cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": section})
    method = build_method(cfg)
    method.check_inputs()
    torch.manual_seed(3)
    student = build_model(cfg.model)
    criterion = build_criterion(cfg.model)
    method.setup(student, criterion, torch.device("cpu"))
    assert "teacher's backbone differs" in method.feature_cache_reason(student)
    student.backbone.load_state_dict(method.frozen("teacher").backbone.state_dict())  # the shared backbone
    assert method.feature_cache_reason(student) is None
    images, mask, targets = _batch()
    images = images.float()
    with torch.no_grad():
        maps = dict(student.backbone[0].body(images))
        cached = criterion(method.forward_train(student, BackboneFeatures(maps, tuple(images.shape)), mask,
                                                targets), targets)
        direct = criterion(method.forward_train(student, images, mask, targets), targets)
    assert cached.keys() == direct.keys() and float(direct["loss_maskd"]) > 0
    for key, value in direct.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-5, atol=1e-7, msg=key)
    backbone_tap = build_method(from_dict(ExperimentConfig, {"model": MODEL, "method": {**section, "position": "backbone"}}))
    assert "position 'backbone' runs the backbones on the images" in backbone_tap.feature_cache_reason(student)


def test_a_refused_combination_exits_2_before_training(tmp_path):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"extends": str(Path(__file__).resolve().parents[1] / "configs" / "experiments"
                                                     / "cdetr_r50_50ep.yaml"),
                                      "method": [{"name": "ks_detr"}, {"name": "ks_detr"}]}))
    result = subprocess.run([sys.executable, "-m", "replic", "train", "--config", str(config), "--scale", "smoke",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'ks_detr' is listed twice" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_memory_tap_reads_and_masks_a_detrs_encoder_output(tmp_path):
    """MasKD on a DETR at ``position: memory``: stage 1's hook replaces the teacher's encoder
    memory by its masked version (the decoder reads it), and stage 2 reads the memory as a
    D-channel map, the same values the encoder returned."""
    from replic.methods.maskd import memory_map, probe_channels, tap_features

    teacher = tmp_path / "teacher.pt"
    _teacher(teacher)
    cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": {
        "name": "maskd_tokens", "teacher": {"checkpoint": str(teacher)}, "num_tokens": 3, "position": "memory"}})
    tokens = build_method(cfg)
    tokens.check_inputs()
    model = tokens.build_model()
    assert probe_channels(model, "memory") == [MODEL["hidden_dim"]]
    images, mask, targets = _batch()
    images = images.float()
    with torch.no_grad():
        plain = model(images, mask)
    tokens.setup(model, build_criterion(cfg.model), torch.device("cpu"))
    out = tokens.forward_train(model, images, mask, targets)
    h, w = plain["feature_size"]
    assert memory_map(plain).shape == (2, MODEL["hidden_dim"], h, w)
    assert torch.equal(memory_map(plain).flatten(2).transpose(1, 2), plain["memory"])
    # The masked memory (Σ_t p_t (x ⊙ M_t), masks in (0, 1)) is smaller than the plain one everywhere.
    assert out["memory"].shape == plain["memory"].shape
    assert bool((out["memory"].abs() <= plain["memory"].abs() + 1e-6).all())
    assert not torch.allclose(out["memory"], plain["memory"])
    assert float(out["maskd_dice"]) > 0
    # Stage 2 reads the teacher's memory through the same map.
    with torch.no_grad():
        (tapped,) = tap_features(build_model(cfg.model).eval(), images, mask, "memory")
    assert tapped.shape == (2, MODEL["hidden_dim"], h, w)
    with pytest.raises(ConfigError, match="'memory' is a DETR's encoder output"):
        from_dict(ExperimentConfig, {"model": {"family": "cnn", "arch": "retinanet", "backbone": "resnet18"},
                                     "method": {"name": "maskd_tokens", "position": "memory",
                                                "teacher": {"checkpoint": "t.pt"}}}).validate()

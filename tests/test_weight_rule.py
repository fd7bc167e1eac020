"""The distillation-weight rule (replic/engine/weight_rule.py, docs/weight_rule.md).

A tiny Conditional DETR pair stands in for the paper (R18, 2 decoder layers, 10 queries, 64-px
images) and an overlay ``tiny.yaml`` for a small scale (6 queries, 48-px images): the null runs are
fast, and everything the rule does at mini happens here — paper-sized and scale-sized null runs,
fresh teachers, the record in the run directory, the weights the training uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from engine_testutil import REPO, make_uniform_coco, metric_lines
from replic.engine import weight_rule
from replic.engine.config import load_experiment
from replic.engine.runtime import build_loss
from replic.engine.weight_rule import RULE_FILE, RuleSource, calibrate_norms, compute_rule, load_or_compute

PAPER_MODEL = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 2,
               "dim_feedforward": 64, "num_queries": 10, "pretrained_backbone": "none", "dropout": 0.0}
TINY_OVERLAY = {"model": {"num_queries": 6},
                "data": {"val_size": 48, "val_max_size": 48, "train_scales": [48], "max_size": 48,
                         "resize_only_prob": 1.0, "hflip_prob": 0.0},
                "train": {"max_steps": 2, "epochs": 1, "lr_drop": 1, "eval_at_end": False, "log_every": 1,
                          "batch_size": 2, "device": "cpu", "feature_cache": False}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weight_rule")
    data = make_uniform_coco(root / "data", n_train=6, n_val=2)
    experiments = root / "experiments"
    experiments.mkdir()
    base = REPO / "configs" / "experiments" / "cdetr_r50_50ep.yaml"
    (experiments / "teacher.yaml").write_text(yaml.safe_dump({
        "extends": str(base), "model": PAPER_MODEL,
        "data": {"root": str(data), "val_size": 64, "val_max_size": 64}}))
    (experiments / "student.yaml").write_text(yaml.safe_dump({
        "extends": "teacher.yaml", "method": {"name": "d3etr", "teacher": {"experiment": "teacher"}}}))
    (experiments / "student_paperw.yaml").write_text(yaml.safe_dump({
        "extends": "student.yaml", "method": {"weight_rule": False}}))
    overlay = root / "tiny.yaml"
    overlay.write_text(yaml.safe_dump(TINY_OVERLAY))
    same = root / "same.yaml"  # an overlay that changes nothing: the "scale" is the paper's size
    same.write_text(yaml.safe_dump({"train": {"device": "cpu"}}))
    return {"root": root, "data": data, "experiments": experiments, "overlay": overlay, "same": same}


def _teacher_run(setup: dict[str, Path], runs: Path) -> None:
    """The sibling teacher run a student at ``runs`` reads (a trained teacher's checkpoint layout)."""
    from replic.config import to_dict
    from replic.models.build import build_model

    cfg = load_experiment(setup["experiments"] / "teacher.yaml", str(setup["overlay"]))
    torch.manual_seed(3)
    path = runs / "teacher" / "checkpoint_final.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": build_model(cfg.model).state_dict(), "model_config": to_dict(cfg.model),
                "config": {"name": "teacher"}}, path)


def test_a_scale_the_size_of_the_paper_keeps_every_paper_weight(setup):
    # Same models, same images, same seeds at both "sizes": every ratio must be exactly 1 (a null
    # run that drew its teacher, tokens or images differently at the two sizes would break this).
    weights = compute_rule(RuleSource(setup["experiments"] / "student.yaml", str(setup["same"])), seed=42)
    assert {w.option for w in weights} == {f"method.{k}_weight" for k in
                                           ("class", "bbox", "giou", "self_attn", "cross_attn")}
    for w in weights:
        assert w.paper_size == w.scale_size and w.paper_size > 0, w
        assert w.weight == w.paper_weight
        assert w.terms_paper == w.terms_scale == 2 * 2  # 2 matchings x 2 decoder layers


def test_each_weight_is_the_paper_weight_times_its_null_run_ratio(setup):
    weights = compute_rule(RuleSource(setup["experiments"] / "student.yaml", str(setup["overlay"])), seed=42)
    paper = {"class": 1.0, "bbox": 5.0, "giou": 2.0, "self_attn": 1.0e4, "cross_attn": 1.0e3}
    for w in weights:
        assert w.paper_weight == paper[w.option.removeprefix("method.").removesuffix("_weight")]
        exact = w.paper_weight * w.paper_size / w.scale_size
        assert w.weight == weight_rule.round_significant(exact, 3) and w.weight == pytest.approx(exact, rel=5e-3)
    by = {w.option: w for w in weights}
    # Self-attention rows over 10 queries at paper size vs 6 at the scale: the MSE of rows that sum
    # to 1 is smaller over more keys, so the scale's weight is below the paper's.
    assert by["method.self_attn_weight"].ratio < 1
    # The same seed gives the same weights (the rule is a function of the run's inputs).
    again = compute_rule(RuleSource(setup["experiments"] / "student.yaml", str(setup["overlay"])), seed=42)
    assert [w.as_dict() for w in again] == [w.as_dict() for w in weights]


def test_the_null_runs_leave_the_runs_random_stream_alone(setup, tmp_path, monkeypatch):
    # The null runs reseed every generator; the run's own stream must not depend on whether its
    # weights were computed now or read from an earlier start.
    from replic.engine.runtime import seed_everything

    def reseeding(src, seed):
        seed_everything(123)
        torch.rand(5)
        return [weight_rule.RuleWeight("method.self_attn_weight", 1.0e4, 2.0, 4.0, 1, 1)]

    monkeypatch.setattr(weight_rule, "compute_rule", reseeding)
    cfg = load_experiment(setup["experiments"] / "student.yaml", str(setup["overlay"]))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    load_or_compute(tmp_path, RuleSource(setup["experiments"] / "student.yaml", str(setup["overlay"])), cfg,
                    {"method.self_attn_weight": (1.0e4, ["d3_ada_self_attn"])})
    assert torch.equal(torch.get_rng_state(), state)


def test_the_record_is_reused_for_the_same_config_and_recomputed_for_another(setup, tmp_path, monkeypatch):
    cfg = load_experiment(setup["experiments"] / "student.yaml", str(setup["overlay"]))
    source = RuleSource(setup["experiments"] / "student.yaml", str(setup["overlay"]))
    groups = {"method.self_attn_weight": (1.0e4, ["d3_ada_self_attn"])}
    calls = []

    def fake(src, seed):
        calls.append(seed)
        return [weight_rule.RuleWeight("method.self_attn_weight", 1.0e4, 2.0, 4.0 + len(calls), 1, 1)]

    monkeypatch.setattr(weight_rule, "compute_rule", fake)
    first = load_or_compute(tmp_path, source, cfg, groups)
    assert json.loads((tmp_path / RULE_FILE).read_text())["weights"] == first
    assert load_or_compute(tmp_path, None, cfg, groups) == first and len(calls) == 1  # a resume reads it
    other = load_experiment(setup["experiments"] / "student.yaml", str(setup["overlay"]), {"seed": 7})
    second = load_or_compute(tmp_path, source, other, groups)
    assert calls == [42, 7] and second != first
    # Without the experiment file there is no paper-size null run: a clear error, not a silent default.
    (tmp_path / RULE_FILE).unlink()
    with pytest.raises(Exception, match="weight rule"):
        load_or_compute(tmp_path, None, cfg, groups)


def test_training_at_a_small_scale_uses_and_records_the_rule(setup, tmp_path):
    from replic.cli import main

    runs = tmp_path / "runs" / "tiny"
    _teacher_run(setup, runs)
    student = runs / "student"
    argv = ["train", "--config", str(setup["experiments"] / "student.yaml"), "--scale", str(setup["overlay"]),
            "--out", str(student), "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    record = json.loads((student / RULE_FILE).read_text())
    weights = {w["option"].removeprefix("method.").removesuffix("_weight"): w["weight"] for w in record["weights"]}
    assert json.loads((student / "provenance.json").read_text())["weight_rule"] == record["weights"]
    # The logged total is the weighted sum with the rule's weights, not the config's.
    step = [r for r in metric_lines(student) if r["type"] == "step"][0]
    cfg = load_experiment(setup["experiments"] / "student.yaml", str(setup["overlay"]))
    own = build_loss(cfg).weight_dict  # the set loss's weights, every decoder layer
    total, distilled = 0.0, 0
    for key, value in step.items():
        base = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].isdigit() else key
        if key in own:
            total += own[key] * value
        elif base.startswith(("d3_ada_", "d3_fix_")):
            total += weights[base.removeprefix("d3_ada_").removeprefix("d3_fix_")] * value
            distilled += 1
    assert distilled == 5 * 2 * 2
    assert step["loss"] == pytest.approx(total, rel=1e-5)
    assert weights["self_attn"] != 1.0e4


def test_paper_weights_row_and_smoke_keep_the_weights_as_written(setup, tmp_path):
    from replic.cli import main

    runs = tmp_path / "runs" / "tiny"
    _teacher_run(setup, runs)
    student = runs / "student_paperw"
    argv = ["train", "--config", str(setup["experiments"] / "student_paperw.yaml"), "--scale",
            str(setup["overlay"]), "--out", str(student), "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert not (student / RULE_FILE).exists()
    assert json.loads((student / "provenance.json").read_text())["weight_rule"] is None
    cfg = load_experiment(setup["experiments"] / "student.yaml", "smoke", {"data": {"root": str(setup["data"])}})
    assert not weight_rule.weight_rule_applies(cfg, {"method.x": (1.0, ["k"])})


def test_calibrated_norms_give_unit_statistics_at_every_depth():
    # A random ResNet-50 under frozen BatchNorm (mean 0, var 1): activations grow with depth; with
    # statistics from the input each BatchNorm's output is zero-mean, unit-variance per channel.
    from replic.models.backbone import FrozenBatchNorm2d
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    # (A copy: the ReLU after each BatchNorm acts in place.)
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.clone())) for m in net.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        raw = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        outputs.clear()
        remove = calibrate_norms([net])
        net(x)
        remove()
    for h in hooks:
        h.remove()
    assert len(outputs) == 53
    for out in outputs:
        assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
        assert (out.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2
    assert raw.std() > 5  # uncalibrated: the deepest maps are already far from unit scale (R50, 64 px)
    with torch.no_grad():  # the hooks are gone: a second forward changes no statistic
        before = [m.running_var.clone() for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
        net(torch.randn(2, 3, 64, 64))
        after = [m.running_var for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_each_option_sets_every_criterion_key_it_weighs_and_a_missing_one_is_an_error():
    from replic.engine.weight_rule import apply_weights

    groups = {"method.d3etr.self_attn_weight": (1.0e4, ["d3_ada_self_attn", "d3_fix_self_attn_0"]),
              "method.maskd.loss_weight": (7.0, ["loss_maskd"])}
    weight_dict = {"loss_ce": 2.0, "d3_ada_self_attn": 1.0e4, "d3_fix_self_attn_0": 1.0e4, "loss_maskd": 7.0}
    apply_weights(weight_dict, groups, [{"option": "method.d3etr.self_attn_weight", "weight": 280.0},
                                        {"option": "method.maskd.loss_weight", "weight": 53.0}])
    assert weight_dict == {"loss_ce": 2.0, "d3_ada_self_attn": 280.0, "d3_fix_self_attn_0": 280.0, "loss_maskd": 53.0}
    with pytest.raises(ValueError, match="method.maskd.loss_weight"):
        apply_weights(weight_dict, groups, [{"option": "method.d3etr.self_attn_weight", "weight": 1.0}])


@pytest.mark.parametrize("value, expected", [(279.9534, 280.0), (3.2463, 3.25), (0.74106, 0.741), (8.6428, 8.64),
                                             (53.27, 53.3), (6773906621.4, 6.77e9), (0.0, 0.0), (-0.012345, -0.0123)])
def test_weights_keep_three_significant_figures(value, expected):
    assert weight_rule.round_significant(value, 3) == expected

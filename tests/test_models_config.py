"""ModelConfig: strict loading, arch defaults, rejected combinations, example YAML configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from replic.config import ConfigError, from_dict, load_yaml
from replic.models import ModelConfig, build_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"


def test_arch_defaults_resolve():
    cond = from_dict(ModelConfig, {}).resolved()
    assert (cond.num_queries, cond.spatial_query, cond.lambda_form, cond.reference_point) == (300, "csq", "diagonal", "predicted")
    assert cond.focal_loss and cond.offset_regression
    assert (cond.criterion.cost_class, cond.criterion.cls_loss_coef) == (2.0, 2.0)
    detr = from_dict(ModelConfig, {"arch": "detr"}).resolved()
    assert (detr.num_queries, detr.spatial_query, detr.focal_loss, detr.offset_regression) == (100, "none", False, False)
    assert (detr.criterion.cost_class, detr.criterion.cls_loss_coef) == (1.0, 1.0)


def test_explicit_switch_overrides_arch_default():
    cfg = from_dict(ModelConfig, {"arch": "detr", "focal_loss": True, "num_queries": 300}).resolved()
    assert cfg.focal_loss and cfg.num_queries == 300 and cfg.criterion.cls_loss_coef == 2.0
    assert from_dict(ModelConfig, {"spatial_query": "csq_p"}).resolved().lambda_form == "identity"


@pytest.mark.parametrize("data, fragment", [
    ({"spatial_query": "csq_x"}, "spatial_query"),
    ({"lambda_fom": "full"}, "did you mean 'lambda_form'"),
    ({"spatial_query": "csq_p", "lambda_form": "full"}, "lambda_form"),
    ({"arch": "detr", "reference_point": "learned"}, "reference_point"),
    ({"hidden_dim": 30, "nheads": 8}, "divisible"),
    ({"dropout": 1.5}, "dropout"),
    ({"backbone_levels": ["C5", "C5"]}, "backbone_levels"),
    ({"criterion": {"eos_coef": 0}}, "eos_coef"),
    ({"backbone": "resnet18", "dilation": True}, "dilation"),
    ({"criterion": {"cost_bbox": -1.0}}, "cost_bbox"),
])
def test_invalid_configs_name_the_key(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(ModelConfig, data)


def test_example_yaml_configs_load_and_build_tiny():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(files) >= 10, f"expected the example model configs in {CONFIG_DIR}"
    for path in files:
        cfg = from_dict(ModelConfig, load_yaml(path))
        cfg.resolved()
    # One ablation file, shrunk, really builds (the paper-scale ones are covered by the count test).
    data = load_yaml(CONFIG_DIR / "cond_detr_r50_csq_i.yaml")
    data.update(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                num_queries=4, pretrained_backbone="none")
    model = build_model(from_dict(ModelConfig, data))
    assert model.transformer.decoder.spatial_query == "csq_i"


def test_pretrained_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_backbone"):
        build_model(ModelConfig(backbone="resnet18", pretrained_backbone=str(tmp_path / "nope.pth")))

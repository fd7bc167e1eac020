"""Official state-dict layout and parameter counts of Conditional DETR (paper settings).

Counts are parameters including frozen ones, buffers excluded, measured on the official code
(counted from the official model built at commit 8ea7c3f): R50 43,418,401; R101 62,358,305.
"""

from __future__ import annotations

import pytest
import torch

from replic.models import ModelConfig, build_model


def _count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("backbone, total, trainable, keys", [
    ("resnet50", 43_418_401, 43_196_001, 564),
    ("resnet101", 62_358_305, 62_135_905, 819),
])
def test_parameter_counts_match_official(backbone, total, trainable, keys):
    model = build_model(ModelConfig(backbone=backbone, pretrained_backbone="none"))
    assert _count(model) == total
    assert _count(model, trainable_only=True) == trainable
    assert len(model.state_dict()) == keys


def test_dc5_has_the_same_parameters_as_c5():
    c5 = build_model(ModelConfig(backbone="resnet50"))
    dc5 = build_model(ModelConfig(backbone="resnet50", dilation=True))
    assert [(k, v.shape) for k, v in c5.state_dict().items()] == [(k, v.shape) for k, v in dc5.state_dict().items()]


def test_official_key_names_and_shapes():
    sd = build_model(ModelConfig()).state_dict()
    keys = list(sd)
    # Top-level order of the official state dict.
    groups = []
    for k in keys:
        g = k.split(".")[0]
        if not groups or groups[-1] != g:
            groups.append(g)
    assert groups == ["transformer", "class_embed", "bbox_embed", "query_embed", "input_proj", "backbone"]
    expected = {
        "transformer.encoder.layers.0.self_attn.in_proj_weight": (768, 256),
        "transformer.encoder.layers.5.self_attn.in_proj_bias": (768,),
        "transformer.decoder.layers.0.ca_qpos_proj.weight": (256, 256),
        "transformer.decoder.layers.3.ca_qpos_sine_proj.weight": (256, 256),
        "transformer.decoder.layers.5.cross_attn.out_proj.weight": (256, 256),
        "transformer.decoder.layers.2.sa_kpos_proj.bias": (256,),
        "transformer.decoder.query_scale.layers.1.weight": (256, 256),
        "transformer.decoder.ref_point_head.layers.1.weight": (2, 256),
        "transformer.decoder.norm.weight": (256,),
        "class_embed.weight": (91, 256),
        "bbox_embed.layers.2.weight": (4, 256),
        "query_embed.weight": (300, 256),
        "input_proj.weight": (256, 2048, 1, 1),
        "backbone.0.body.layer4.2.bn3.running_var": (2048,),
        "backbone.0.body.layer1.0.downsample.1.weight": (256,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # ca_qpos_proj exists in decoder layer 0 only; no BN counters, no fc, no encoder norm.
    assert [k for k in keys if "ca_qpos_proj" in k] == [
        "transformer.decoder.layers.0.ca_qpos_proj.weight", "transformer.decoder.layers.0.ca_qpos_proj.bias"]
    assert not [k for k in keys if "num_batches_tracked" in k or ".fc." in k or "encoder.norm" in k]
    assert sum(k.startswith("transformer.decoder.layers.0.") for k in keys) == 36
    assert sum(k.startswith("transformer.decoder.layers.1.") for k in keys) == 34
    assert sum(k.startswith("transformer.encoder.layers.0.") for k in keys) == 12


def test_official_initialisation():
    model = build_model(ModelConfig())
    assert torch.allclose(model.class_embed.bias, torch.full((91,), -4.59511985013459))
    assert model.bbox_embed.layers[-1].weight.abs().sum() == 0 and model.bbox_embed.layers[-1].bias.abs().sum() == 0
    layer = model.transformer.decoder.layers[0]
    assert layer.self_attn.out_proj.bias.abs().sum() == 0 and layer.cross_attn.out_proj.bias.abs().sum() == 0
    enc = model.transformer.encoder.layers[0].self_attn
    assert enc.in_proj_bias.abs().sum() == 0
    # xavier_uniform_ bound for a 256×256 weight is sqrt(6/512) ≈ 0.108; PyTorch's default would be 1/16.
    w = model.transformer.decoder.layers[1].sa_qcontent_proj.weight
    assert 0.0625 < w.abs().max() <= (6 / 512) ** 0.5


def test_detr_r50_layout():
    model = build_model(ModelConfig(arch="detr"))
    sd = model.state_dict()
    assert tuple(sd["class_embed.weight"].shape) == (92, 256)
    assert tuple(sd["query_embed.weight"].shape) == (100, 256)
    assert tuple(sd["transformer.decoder.layers.0.multihead_attn.in_proj_weight"].shape) == (768, 256)
    assert not [k for k in sd if "ref_point_head" in k or "query_scale" in k]
    # Arithmetic: backbone 23,454,912 + encoder 7,890,432 + decoder 6 × 1,578,752 + norm 512
    # + input_proj 524,544 + queries 25,600 + class 23,644 + box 132,612 = 41,524,768.
    assert _count(model) == 41_524_768
    # facebookresearch/detr main.py logs the trainable count, "number of params: 41302368" [third-party].
    assert _count(model, trainable_only=True) == 41_302_368

"""Backbone: FrozenBatchNorm2d, frozen stem/layer1, levels and strides, DC5, local weights."""

from __future__ import annotations

import pytest
import torch
import torchvision

from replic.models.backbone import Backbone, FrozenBatchNorm2d


def test_frozen_bn_matches_batchnorm_eval_and_drops_counter():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is dropped, not "unexpected"
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-6, rtol=1e-5)
    assert frozen.eps == 1e-5 and list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert not list(frozen.parameters())


def test_stem_and_layer1_frozen():
    body = Backbone("resnet18")
    trainable = {n for n, p in body.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[1] in ("layer2", "layer3", "layer4") for n in trainable)
    assert not body.body.conv1.weight.requires_grad and not body.body.layer1[0].conv1.weight.requires_grad
    frozen_all = Backbone("resnet18", train_backbone=False)
    assert not any(p.requires_grad for p in frozen_all.parameters())


def test_levels_strides_and_dc5():
    images = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[0, :, 64:] = True
    body = Backbone("resnet18", levels=("C2", "C4"))
    with torch.no_grad():
        out = body(images, mask)
    assert list(out) == ["C2", "C4", "C5"]
    assert out["C2"][0].shape == (1, 64, 16, 24) and out["C4"][0].shape == (1, 256, 4, 6)
    assert out["C5"][0].shape == (1, 512, 2, 3)
    # Nearest-neighbour mask: C5 column j samples input column 32·j (0, 32 real; 64 padded).
    assert out["C5"][1].tolist() == [[[False, False, True]] * 2]
    dc5 = Backbone("resnet50", dilation=True)
    with torch.no_grad():
        assert dc5(images, mask)["C5"][0].shape == (1, 2048, 4, 6)  # stride 16
    with pytest.raises(ValueError, match="dilation"):
        Backbone("resnet18", dilation=True)


def test_local_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    body = Backbone("resnet18", pretrained=str(path))
    torch.testing.assert_close(body.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(body.body.bn1.running_var, reference.bn1.running_var)
    bad = reference.state_dict()
    bad.pop("layer2.0.conv1.weight")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layer2.0.conv1.weight'\] \(1\), unexpected keys \['extra.weight'\] \(1\)"):
        Backbone("resnet18", pretrained=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="does not match torchvision resnet50.*shape mismatches"):
        Backbone("resnet50", pretrained=str(path))


def test_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    """``pretrained_backbone: torchvision`` reads $TORCH_HOME/hub/checkpoints (no network when cached)."""
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")  # torchvision's IMAGENET1K_V1 file name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    body = Backbone("resnet18", pretrained="torchvision")
    torch.testing.assert_close(body.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

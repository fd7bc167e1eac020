"""Parity with the official code: Conditional DETR (Atten4Vis/ConditionalDETR @ 8ea7c3f) and
DETR (facebookresearch/detr @ 29901c5).

Each test runs only when ``REPLIC_OFFICIAL_CONDDETR`` / ``REPLIC_OFFICIAL_DETR`` points at a
checkout of the official repository (never vendored here). The official model runs in a subprocess — its top-level packages
``models``/``util`` would shadow others — with the torch-2 import workaround of
conditional_detr.md §6.1 and no ImageNet download. Every LayerNorm, FrozenBN buffer, bias
and the zero-initialised last box layer are randomised first (defaults hide misplaced norms).

Compared in full, fp32 CPU, dropout 0: eval logits/boxes of every decoder layer (atol 1e-5),
each loss term (atol 1e-5), the weighted total, and all parameter gradients (atol 1e-4 ·
largest gradient). Measured: logits 1.4e-6, boxes 1.8e-7, losses 2.4e-7, gradients 4e-6
(largest 5.2) at the official R50 shape; 1.2e-6 / 1.8e-7 / 6e-8 / 1.4e-6 for the tiny R18;
DETR tiny R18: 7.2e-7 / 6.0e-8 / 6.0e-8 / 4.8e-7.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from replic.models import ModelConfig, build_criterion, build_model

OFFICIAL = os.environ.get("REPLIC_OFFICIAL_CONDDETR")
OFFICIAL_DETR = os.environ.get("REPLIC_OFFICIAL_DETR")

OFFICIAL_SIDE = textwrap.dedent('''
    import argparse, sys, torch
    import torchvision
    repo, out_path, arch, backbone, hidden, heads, queries, ffn, layers = sys.argv[1:10]
    sys.path.insert(0, repo)
    real_torch, real_tv = torch.__version__, torchvision.__version__
    torch.__version__ = "1.9.0"  # ConditionalDETR models/attention.py: version check broken on torch >= 2
    torchvision.__version__ = "0.99"  # DETR util/misc.py parses float(version[:3])
    import util.misc  # noqa: F401
    if arch == "conditional_detr":
        import models.attention  # noqa: F401
    torch.__version__, torchvision.__version__ = real_torch, real_tv
    import models.backbone as official_backbone
    official_backbone.is_main_process = lambda: False  # no ImageNet download
    if arch == "conditional_detr":
        from models.conditional_detr import build
    else:
        from models.detr import build
    from util.misc import NestedTensor
    torch.manual_seed(0)
    args = argparse.Namespace(
        lr_backbone=1e-5, masks=False, backbone=backbone, dilation=False, position_embedding="sine",
        hidden_dim=int(hidden), dropout=0.0, nheads=int(heads), num_queries=int(queries), dim_feedforward=int(ffn),
        enc_layers=int(layers), dec_layers=int(layers), pre_norm=False, dataset_file="coco", device="cpu",
        aux_loss=True, set_cost_class=2 if arch == "conditional_detr" else 1, set_cost_bbox=5, set_cost_giou=2,
        cls_loss_coef=2, bbox_loss_coef=5, giou_loss_coef=2, focal_alpha=0.25, eos_coef=0.1, frozen_weights=None,
        mask_loss_coef=1, dice_loss_coef=1)
    model, criterion, _ = build(args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
            if type(module).__name__ == "FrozenBatchNorm2d":
                for name, scale, base in (("weight", 0.1, 1), ("bias", 0.1, 0), ("running_mean", 0.1, 0)):
                    getattr(module, name).copy_(base + scale * torch.randn(getattr(module, name).shape, generator=g))
                module.running_var.copy_(1 + 0.1 * torch.rand(module.running_var.shape, generator=g))
        if arch == "conditional_detr":
            model.bbox_embed.layers[-1].weight.normal_(0, 0.05, generator=g)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "bias" in name and "norm" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 80:] = True
    mask[1, 70:, :] = True
    images[mask[:, None].expand_as(images)] = 0
    targets = [{"labels": torch.tensor([1, 17, 90]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]
    model.eval()
    with torch.no_grad():
        out_eval = model(NestedTensor(images, mask))
    model.train()
    losses = criterion(model(NestedTensor(images, mask)), targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    torch.save({
        "state": model.state_dict(), "images": images, "mask": mask, "targets": targets,
        "logits": [out_eval["pred_logits"]] + [a["pred_logits"] for a in out_eval["aux_outputs"]],
        "boxes": [out_eval["pred_boxes"]] + [a["pred_boxes"] for a in out_eval["aux_outputs"]],
        "losses": {k: v.detach() for k, v in losses.items()}, "total": total.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "weight_dict": {k: float(v) for k, v in criterion.weight_dict.items()},
    }, out_path)
''')


_CONDDETR = pytest.mark.skipif(not OFFICIAL, reason="set REPLIC_OFFICIAL_CONDDETR to an official checkout")
_DETR = pytest.mark.skipif(not OFFICIAL_DETR, reason="set REPLIC_OFFICIAL_DETR to an official checkout")


@pytest.mark.parametrize("arch, backbone, hidden, heads, queries, ffn, layers", [
    pytest.param("conditional_detr", "resnet18", 256, 8, 7, 96, 3, marks=_CONDDETR),
    pytest.param("conditional_detr", "resnet50", 256, 8, 300, 2048, 6, marks=[_CONDDETR, pytest.mark.slow]),
    pytest.param("detr", "resnet18", 64, 4, 7, 96, 3, marks=_DETR),
])
def test_matches_official_forward_losses_and_gradients(tmp_path, arch, backbone, hidden, heads, queries, ffn, layers):
    script = tmp_path / "official_side.py"
    script.write_text(OFFICIAL_SIDE)
    out_path = tmp_path / "official.pt"
    repo = OFFICIAL if arch == "conditional_detr" else OFFICIAL_DETR
    subprocess.run([sys.executable, str(script), str(Path(repo)), str(out_path), arch, backbone, str(hidden),
                    str(heads), str(queries), str(ffn), str(layers)], check=True, cwd=tmp_path, timeout=600)
    ref = torch.load(out_path, weights_only=True)

    cfg = ModelConfig(arch=arch, backbone=backbone, hidden_dim=hidden, nheads=heads, num_queries=queries,
                      dim_feedforward=ffn, enc_layers=layers, dec_layers=layers, dropout=0.0)
    model, criterion = build_model(cfg), build_criterion(cfg)
    model.load_state_dict(ref["state"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref["images"], ref["mask"])
    mine = [out["pred_logits"]] + [a["pred_logits"] for a in out["aux_outputs"]]
    mine_boxes = [out["pred_boxes"]] + [a["pred_boxes"] for a in out["aux_outputs"]]
    # The official list is [last, aux 0, ...]; ours is the same order.
    for a, b in zip(mine, ref["logits"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(mine_boxes, ref["boxes"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    model.train()
    losses = criterion(model(ref["images"], ref["mask"]), ref["targets"])
    assert set(losses) == set(ref["losses"])
    assert criterion.weight_dict == ref["weight_dict"]
    for key, value in ref["losses"].items():
        torch.testing.assert_close(losses[key].detach(), value, atol=1e-5, rtol=0)
    total = criterion.total(losses)
    torch.testing.assert_close(total.detach(), ref["total"], atol=1e-4, rtol=0)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref["grads"])
    scale = max(g.abs().max() for g in ref["grads"].values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref["grads"][name], atol=1e-4 * float(scale), rtol=0, msg=name)

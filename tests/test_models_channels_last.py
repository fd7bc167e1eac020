"""channels_last: the same function as NCHW (float rounding only), and checkpoints cross over."""

from __future__ import annotations

import torch

from models_helpers import tiny_batch, tiny_config
from replic.models import build_criterion, build_model

# Measured on this batch (eval): logits differ by 1e-6, boxes by 0, C5 features by 2.5e-5.
# oneDNN picks other convolution kernels for NHWC, so bit equality is not expected.
ATOL, RTOL = 1e-4, 1e-4


def _pair():
    torch.manual_seed(0)
    nchw = build_model(tiny_config(channels_last=False))
    nhwc = build_model(tiny_config(channels_last=True))
    nhwc.load_state_dict(nchw.state_dict())
    return nchw, nhwc


def test_channels_last_is_applied_to_the_body():
    nchw, nhwc = _pair()
    conv_cl = nhwc.backbone[0].body.conv1.weight
    conv = nchw.backbone[0].body.conv1.weight
    assert conv_cl.is_contiguous(memory_format=torch.channels_last) and not conv_cl.is_contiguous()
    assert conv.is_contiguous()
    images, mask, _ = tiny_batch()
    features, _ = nhwc.backbone(images, mask)
    c5 = features["C5"][0]
    assert c5.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_forward_loss_and_gradients_match_nchw():
    nchw, nhwc = _pair()
    criterion = build_criterion(tiny_config())
    images, mask, targets = tiny_batch()
    results = []
    for model in (nchw, nhwc):
        model.train()
        torch.manual_seed(1)  # same dropout masks
        out = model(images, mask)
        total = criterion.total(criterion(out, targets))
        model.zero_grad()
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["pred_logits"].detach(), out["pred_boxes"].detach(), total.detach(), grads))
    (l0, b0, t0, g0), (l1, b1, t1, g1) = results
    torch.testing.assert_close(l1, l0, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(b1, b0, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(t1, t0, atol=ATOL, rtol=RTOL)
    assert g0.keys() == g1.keys() and any("backbone" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name].contiguous(), g0[name], atol=ATOL, rtol=RTOL, msg=name)


def test_channels_last_checkpoint_loads_into_nchw_model():
    _, nhwc = _pair()
    state = {k: v.clone() for k, v in nhwc.state_dict().items()}
    torch.manual_seed(5)
    fresh = build_model(tiny_config(channels_last=False))
    fresh.load_state_dict(state)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, state[name]), name
        if value.dim() == 4:
            assert value.is_contiguous(), name  # the destination keeps its own layout


def test_channels_last_model_exports_to_safetensors(tmp_path):
    from replic.models.convert import load_replic_checkpoint, write_replic_checkpoint

    _, nhwc = _pair()
    out = tmp_path / "model.safetensors"
    write_replic_checkpoint(out, nhwc.state_dict(), {"channels_last": True}, {"format": "test"})
    _, state, _ = load_replic_checkpoint(out)
    for name, value in nhwc.state_dict().items():
        assert torch.equal(state[name], value), name

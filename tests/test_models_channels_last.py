"""channels_last: the same function as NCHW (float rounding only), and checkpoints cross over."""

from __future__ import annotations

import torch

from models_helpers import tiny_batch, tiny_config
from replic.models import build_criterion, build_model

# "The same function" is checked in float64, where kernel choice cannot move the result beyond
# rounding: measured worst gradient difference 2.2e-16 of the largest (2026-12-07, AMD EPYC, 1 and 2
# threads).
FLOAT64_TOL = 1e-10
# float32, the precision a run uses: oneDNN picks other convolution kernels for NHWC and a
# random-weight backbone amplifies their rounding. Per-element tolerances fail on some CPUs
# (0.0014 of the largest gradient on an AMD EPYC at 1 and 2 threads vs < 1e-4 on a Xeon), so float32 is bounded
# relative to the largest value of each quantity, with ~10x headroom over both measurements.
FLOAT32_REL_TOL = 1e-2


def _pair(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    nchw = build_model(tiny_config(channels_last=False)).to(dtype)
    nhwc = build_model(tiny_config(channels_last=True)).to(dtype)
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


def _forward_loss_gradients(dtype: torch.dtype) -> list[tuple]:
    """(logits, boxes, total loss, gradients) of the NCHW and the channels-last model on one batch."""
    nchw, nhwc = _pair(dtype)
    criterion = build_criterion(tiny_config()).to(dtype)
    images, mask, targets = tiny_batch()
    images = images.to(dtype)
    targets = [{**t, "boxes": t["boxes"].to(dtype)} for t in targets]
    results = []
    for model in (nchw, nhwc):
        model.train()
        torch.manual_seed(1)  # same dropout masks
        out = model(images, mask)
        total = criterion.total(criterion(out, targets))
        model.zero_grad()
        total.backward()
        grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["pred_logits"].detach(), out["pred_boxes"].detach(), total.detach(), grads))
    assert nhwc.backbone[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    return results


def test_channels_last_forward_loss_and_gradients_match_nchw():
    """float64: the channels-last model computes the NCHW model's function, gradients included."""
    (l0, b0, t0, g0), (l1, b1, t1, g1) = _forward_loss_gradients(torch.float64)
    assert l0.dtype == torch.float64
    torch.testing.assert_close(l1, l0, atol=FLOAT64_TOL, rtol=0)
    torch.testing.assert_close(b1, b0, atol=FLOAT64_TOL, rtol=0)
    torch.testing.assert_close(t1, t0, atol=FLOAT64_TOL, rtol=0)
    assert g0.keys() == g1.keys() and any("backbone" in n for n in g0)
    scale = max(float(g.abs().max()) for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=FLOAT64_TOL * scale, rtol=0, msg=name)


def test_channels_last_float32_stays_within_a_bound_relative_to_the_largest_value():
    """float32: the layout moves outputs, loss and gradients by kernel rounding only."""
    (l0, b0, t0, g0), (l1, b1, t1, g1) = _forward_loss_gradients(torch.float32)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)

    assert rel(l1, l0) <= FLOAT32_REL_TOL and rel(b1, b0) <= FLOAT32_REL_TOL
    assert abs(float(t1 - t0)) <= FLOAT32_REL_TOL * abs(float(t0))
    scale = max(float(g.abs().max()) for g in g0.values())
    worst, where = max((float((g1[n] - g0[n]).abs().max()), n) for n in g0)
    assert worst <= FLOAT32_REL_TOL * scale, (worst / scale, where)


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

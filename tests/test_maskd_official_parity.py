"""Optional parity with the official MasKD code (hunto/MasKD, mmrazor/mmrazor/models/losses/maskd.py).

Runs only when ``REPLIC_OFFICIAL_MASKD`` points to a checkout of hunto/MasKD (tested at
b5af34fe343f1b82689291871f85b97a6aea4278). The official file imports mmcv and mmrazor's registry;
both are stubbed here (a ``LOSSES.register_module`` that returns the class, and mmcv's
``_load_checkpoint`` as ``torch.load``), so mmcv is not installed. With the same weights and features:

* ``MaskModule.forward_mask`` / ``forward_prob`` / ``forward_train`` (stage-1 masked features and Dice)
  vs :class:`ReceptiveTokens` and :func:`dice_diversity`;
* ``MasKDLoss`` (weighting on and off, custom masks after the warm-up) vs :class:`MasKD.distill_loss`'s
  pieces (the official loss takes already aligned student features).

Both sides run in float64 (weights, features), so only the order of reductions differs (einsum vs
batched matmul, one sum vs a pairwise mask) at float64 rounding: tolerance 1e-10 relative and
absolute, against a measured worst of 1.8e-15 (2026-12-07, AMD EPYC). In float32 the same pieces
differ by up to ~1e-6, which a per-element tolerance cannot tell from a defect on every CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from replic.methods.maskd import ReceptiveTokens, dice_diversity, masked_distillation

OFFICIAL = os.environ.get("REPLIC_OFFICIAL_MASKD")
pytestmark = pytest.mark.skipif(not OFFICIAL, reason="set REPLIC_OFFICIAL_MASKD to a hunto/MasKD checkout")
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _official():
    """The official losses module, loaded with mmcv / mmrazor stubbed."""
    path = Path(str(OFFICIAL)) / "mmrazor" / "mmrazor" / "models" / "losses" / "maskd.py"
    if not path.is_file():
        pytest.fail(f"REPLIC_OFFICIAL_MASKD={OFFICIAL}: no {path}")
    stubs = {}
    for name in ("mmcv", "mmcv.runner", "mmcv.runner.checkpoint", "mmrazor", "mmrazor.models",
                 "mmrazor.models.builder", "mmrazor.models.losses"):
        stubs[name] = types.ModuleType(name)
        stubs[name].__path__ = []
    stubs["mmcv.runner.checkpoint"]._load_checkpoint = lambda f, map_location=None: torch.load(f, map_location=map_location)
    stubs["mmrazor.models.builder"].LOSSES = types.SimpleNamespace(register_module=lambda: (lambda cls: cls))
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("mmrazor.models.losses.maskd", path)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "mmrazor.models.losses"
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return _official()


@pytest.mark.parametrize("weighting", [True, False])
def test_mask_module_and_dice_match(official, weighting):
    theirs = official.MaskModule(channels=16, num_tokens=6, weight_mask=weighting).double()
    ours = ReceptiveTokens(16, 6, weighting).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    assert ours.masks(x).dtype == torch.float64
    torch.testing.assert_close(ours.masks(x), theirs.forward_mask(x), **TOL)
    out_t, dice_t = theirs.forward_train(x)
    out_o, masks = ours(x)
    torch.testing.assert_close(out_o, out_t, **TOL)
    torch.testing.assert_close(dice_diversity(masks), dice_t, **TOL)
    torch.testing.assert_close(official.dice_coeff(masks.flatten(2)), dice_diversity(masks), **TOL)
    if weighting:
        torch.testing.assert_close(ours.weights(x), theirs.forward_prob(x).flatten(1), **TOL)
    print(f"parity MaskModule weighting={weighting}: max |masked features ours - official| = "
          f"{float((out_o - out_t).abs().max().detach()):.3e}, |Dice ours - official| = "
          f"{abs(float((dice_diversity(masks) - dice_t).detach())):.3e}")


@pytest.mark.parametrize(("weighting", "custom"), [(True, False), (False, False), (True, True)])
def test_distillation_loss_matches(official, weighting, custom, tmp_path):
    levels = [(16, 12, 10), (16, 6, 5), (16, 3, 3)]
    theirs = official.MasKDLoss(channels=[c for c, _, _ in levels], num_tokens=6, weight_mask=weighting,
                                custom_mask=custom, custom_mask_warmup=0, loss_weight=7.0).double()
    modules = [ReceptiveTokens(c, 6, weighting).double() for c, _, _ in levels]
    for ours, their in zip(modules, theirs.mask_modules):
        ours.load_state_dict(their.state_dict(), strict=True)
    s = [torch.randn(2, c, h, w, dtype=torch.float64) for c, h, w in levels]
    t = [torch.randn(2, c, h, w, dtype=torch.float64) for c, h, w in levels]
    expected = theirs(s, t)
    total = 0.0
    for ss, tt, m in zip(s, t, modules):
        masks = m.masks(tt)
        if custom:
            masks = masks * m.masks(ss)
        total = total + masked_distillation(ss, tt, masks, m.weights(tt) if weighting else None)
    assert expected.dtype == torch.float64
    torch.testing.assert_close(7.0 * total, expected, **TOL)
    print(f"parity weighting={weighting} custom={custom}: |ours - official| = {abs(float((7.0 * total - expected).detach())):.3e}"
          f" (official {float(expected.detach()):.6f})")

"""MasKD pieces on hand-made tensors: masks, Dice diversity, weighting, the masked distillation loss,
token checkpoints (replic and the official key layout), the token-count check, the cosine schedule.

Tolerances: float32 arithmetic on tensors of a few hundred elements, compared with 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from replic.methods.maskd import (
    ReceptiveTokens,
    TokenBank,
    TokenError,
    dice_diversity,
    load_tokens,
    masked_distillation,
    token_state,
)

torch.set_num_threads(1)


def test_masks_are_the_sigmoid_of_token_feature_dot_products():
    tokens = ReceptiveTokens(channels=3, num_tokens=2, weighting=False)
    with torch.no_grad():
        tokens.mask_token.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]))
    x = torch.tensor([[[[1.0, -2.0]], [[0.0, 1.0]], [[3.0, 0.5]]]])  # (N=1, C=3, H=1, W=2)
    masks = tokens.masks(x)
    # Pixel (0, 0): x = (1, 0, 3); pixel (0, 1): x = (-2, 1, 0.5).
    expected = torch.tensor([[[[1 - 3, -2 - 0.5]], [[0.5, -1 + 2]]]]).sigmoid()
    torch.testing.assert_close(masks, expected, rtol=1e-6, atol=0)
    # Stage-1 replacement without weighting: Σ_t x ⊙ M_t.
    out, _ = tokens(x)
    torch.testing.assert_close(out, x * expected.sum(1, keepdim=True), rtol=1e-6, atol=0)


def test_dice_matches_a_hand_computation_and_ignores_the_diagonal():
    m = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0]]]).reshape(1, 3, 1, 3)
    flat = m.flatten(2)[0]
    pairs = []
    for i in range(3):
        for j in range(3):
            if i != j:
                a, b = flat[i], flat[j]
                pairs.append(2 * (a * b).sum() / ((a * a).sum() + (b * b).sum()))
    expected = torch.stack(pairs).mean()
    torch.testing.assert_close(dice_diversity(m), expected, rtol=1e-6, atol=0)
    # The diagonal (d_ii = 1) would raise the mean: identical masks still give 1, disjoint ones 0.
    same = torch.ones(2, 4, 3, 3)
    assert float(dice_diversity(same)) == pytest.approx(1.0)
    disjoint = torch.zeros(1, 2, 1, 4)
    disjoint[0, 0, 0, :2] = 1
    disjoint[0, 1, 0, 2:] = 1
    assert float(dice_diversity(disjoint)) == 0.0
    assert float(dice_diversity(torch.rand(2, 1, 4, 4))) == 0.0  # one token: no pair


def test_weighting_is_a_softmax_over_tokens():
    torch.manual_seed(0)
    tokens = ReceptiveTokens(channels=8, num_tokens=5, weighting=True)
    w = tokens.weights(torch.randn(3, 8, 6, 7))
    assert w.shape == (3, 5) and (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3), rtol=1e-6, atol=1e-6)
    plain = ReceptiveTokens(channels=8, num_tokens=4, weighting=False).weights(torch.randn(2, 8, 3, 3))
    torch.testing.assert_close(plain, torch.full((2, 4), 0.25))


def test_init_statistics_and_official_parameter_names():
    bank = TokenBank([64, 64], num_tokens=500, weighting=True, generator=torch.Generator().manual_seed(0))
    token = bank.mask_modules[0].mask_token
    token = token.detach()
    assert abs(float(token.std()) - 0.01) < 0.0005 and abs(float(token.mean())) < 0.001
    assert sorted(bank.state_dict())[:5] == ["mask_modules.0.mask_token", "mask_modules.0.prob.0.bias",
                                             "mask_modules.0.prob.0.weight", "mask_modules.0.prob.2.bias",
                                             "mask_modules.0.prob.2.weight"]
    assert float(bank.mask_modules[0].prob[0].bias.abs().sum()) == 0.0


def test_distillation_loss_is_zero_for_equal_features_and_grows_with_the_difference():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 5, 6)
    masks = torch.rand(2, 3, 5, 6)
    weights = torch.softmax(torch.randn(2, 3), 1)
    assert float(masked_distillation(t.clone(), t, masks, weights)) == 0.0
    noise = torch.randn_like(t)
    losses = [float(masked_distillation(t + s * noise, t, masks, weights)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert losses[-1] / losses[0] == pytest.approx(400.0, rel=1e-4)  # quadratic in the difference
    # Hand computation at one (image, token, channel) against the formula of the official
    # ``MasKDLoss.forward`` (hunto/MasKD mmrazor/mmrazor/models/losses/maskd.py).
    s = t + noise
    per = ((masks[:, :, None] * (s - t)[:, None]) ** 2).sum((3, 4)) / masks.sum((2, 3))[:, :, None]
    torch.testing.assert_close(masked_distillation(s, t, masks, weights), (per.mean(-1) * weights).sum(-1).mean())
    torch.testing.assert_close(masked_distillation(s, t, masks, None), per.mean())


def test_masks_with_zero_mass_do_not_divide_by_zero():
    t = torch.randn(1, 2, 3, 3)
    masks = torch.zeros(1, 2, 3, 3)
    masks[0, 1, 1, 1] = 1.0  # token 0 sees nothing
    loss = masked_distillation(t + 1.0, t, masks, torch.tensor([[0.5, 0.5]]))
    assert torch.isfinite(loss) and float(loss) == pytest.approx(0.5)  # token 1: one pixel, diff 1 on 2 channels
    assert float(masked_distillation(t + 1.0, t, torch.zeros(1, 2, 3, 3), None)) == 0.0


def _official_file(path, num_tokens=6, levels=5, channels=16, weighting=True, prefix="distiller.losses.loss_maskd."):
    bank = TokenBank([channels] * levels, num_tokens, weighting, torch.Generator().manual_seed(3))
    state = {prefix + k: v.clone() for k, v in bank.state_dict().items()}
    state["backbone.conv1.weight"] = torch.zeros(1)  # other weights of the mmcv checkpoint are ignored
    torch.save({"state_dict": state, "meta": {"iter": 2000, "mmcv_version": "1.4.0"}}, path)
    return bank


def test_a_token_checkpoint_in_the_official_key_layout_loads(tmp_path):
    path = tmp_path / "retinanet_r101_tokens.ckpt"
    released = _official_file(path)
    state, config = token_state(path)
    assert config == {} and all(k.startswith("mask_modules.") for k in state)
    bank = TokenBank([16] * 5, 6, True)
    load_tokens(bank, state, path)
    for (k, a), (_, b) in zip(sorted(bank.state_dict().items()), sorted(released.state_dict().items())):
        assert torch.equal(a, b), k


def test_token_count_mismatch_is_an_error_naming_both(tmp_path):
    path = tmp_path / "t4.ckpt"
    _official_file(path, num_tokens=4)
    state, _ = token_state(path)
    with pytest.raises(TokenError, match=r"t4\.ckpt: token checkpoint has 4 tokens per level, but method.num_tokens is 6"):
        load_tokens(TokenBank([16] * 5, 6, True), state, path)
    with pytest.raises(TokenError, match="has mask-weighting module, but method.weighting is False"):
        load_tokens(TokenBank([16] * 5, 4, False), state, path)
    with pytest.raises(TokenError, match="token checkpoint has 5 levels, the tapped features have 3"):
        load_tokens(TokenBank([16] * 3, 4, True), state, path)
    junk = tmp_path / "junk.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, junk)
    with pytest.raises(TokenError, match="no key containing 'mask_modules'"):
        token_state(junk)


def test_cosine_schedule_runs_from_lr_to_min_lr_over_max_steps():
    from replic.engine.config import TrainConfig
    from replic.engine.optim import build_optimizer, build_scheduler

    cfg = TrainConfig(optimizer="adam", lr=0.01, lr_backbone=0.01, weight_decay=1e-3, lr_schedule="cosine",
                      min_lr=1e-6, max_steps=10)
    cfg.validate()
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["weight_decay"] == 1e-3
    sched = build_scheduler(opt, cfg)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        sched.step_iteration()
        lrs.append(opt.param_groups[0]["lr"])
    sched.step()  # an epoch end changes nothing
    assert lrs[0] == 0.01 and lrs[-1] == pytest.approx(1e-6) and opt.param_groups[0]["lr"] == lrs[-1]
    assert lrs[5] == pytest.approx(1e-6 + (0.01 - 1e-6) * 0.5)
    assert lrs[3] == pytest.approx(1e-6 + (0.01 - 1e-6) * (1 + math.cos(math.pi * 0.3)) / 2)
    state = sched.state_dict()
    other = build_scheduler(build_optimizer(model, cfg), cfg)
    other.load_state_dict(state)
    assert other.get_last_lr() == sched.get_last_lr()
    from replic.config import ConfigError

    with pytest.raises(ConfigError, match="max_steps: lr_schedule cosine"):
        TrainConfig(lr_schedule="cosine").validate()

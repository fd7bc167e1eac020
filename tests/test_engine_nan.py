"""A non-finite loss stops the run naming the step and every loss term, keeping the last good checkpoint."""

from __future__ import annotations

import pytest
import torch

import replic.engine.train as train_module
from replic.engine.config import load_experiment, parse_overrides
from replic.engine.train import NonFiniteLossError, Trainer

from engine_testutil import FAMILY_RUNS, make_uniform_coco

# family -> (extra settings, the term poisoned, terms the message must name besides it)
CASES = {
    "detr": (["train.lr_drop=1"], "loss_giou", ("loss_ce=", "loss_bbox_0=")),
    "cnn": (["train.lr_steps=[1]"], "loss_box_reg", ("loss_classifier=", "loss_objectness=")),
}


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("family", sorted(CASES))
def test_nan_loss_stops_with_terms_named_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, family):
    experiment, settings = FAMILY_RUNS[family]
    extra, poisoned_term, other_terms = CASES[family]
    data = make_uniform_coco(tmp_path / "data", n_train=8, n_val=2)
    overrides = parse_overrides([*settings, f"data.root={data}", "train.epochs=2", *extra,
                                 "train.eval_at_end=false"])
    cfg = load_experiment(experiment, "smoke", overrides)
    real_build_loss = train_module.build_loss
    calls = {"n": 0}

    def build_loss_with_nan_at_step_6(config):
        criterion = real_build_loss(config)
        forward = criterion.forward

        def poisoned(outputs, targets):
            calls["n"] += 1
            losses = forward(outputs, targets)
            if calls["n"] == 6:  # epoch 1 (4 steps per epoch), second step
                losses[poisoned_term] = losses[poisoned_term] * float("nan")
            return losses

        criterion.forward = poisoned
        return criterion

    monkeypatch.setattr(train_module, "build_loss", build_loss_with_nan_at_step_6)
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(cfg, run_dir, progress=False).run()
    message = str(info.value)
    assert "global step 6" in message and "epoch 1" in message
    assert f"{poisoned_term}=nan" in message and all(term in message for term in other_terms)

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["position"] == {"epoch": 1, "step_in_epoch": 0, "global_step": 4}
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (run_dir / "done.json").exists()

"""The training-method interface: config selection and the frozen-module contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from replic.config import ConfigError
from replic.methods import MethodStep, TrainingMethod, build_method, parse_method_options


class _Cfg:
    def __init__(self, method):
        self.method = method


def test_unknown_method_name_is_named():
    with pytest.raises(ConfigError, match=r"method\.name: 'd4etr' is not one of"):
        parse_method_options({"name": "d4etr"})


def test_unknown_option_of_a_method_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'method\.teacher'"):
        parse_method_options({"name": "none", "teacher": "x.pt"})


def test_default_is_plain_training():
    method = build_method(_Cfg({"name": "none"}))
    assert type(method) is TrainingMethod and method.name == "none"
    model = nn.Linear(2, 2)
    x = torch.randn(3, 2)
    out = method.forward_train(lambda images, mask: {"y": model(images)}, x, None, [])
    assert torch.equal(out["y"], model(x))


def test_frozen_module_stays_out_of_tree_and_in_eval_mode():
    method = build_method(_Cfg({"name": "none"}))
    teacher = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    method.hold_frozen("teacher", teacher)
    step = MethodStep(nn.Linear(2, 2), method)
    # Not a parameter of the trained module, so never optimised, synced or checkpointed.
    assert all(p.requires_grad is False for p in teacher.parameters())
    assert not any(name.startswith("method.") for name in step.state_dict())
    step.train()
    assert step.training and not teacher.training
    assert method.frozen("teacher") is teacher

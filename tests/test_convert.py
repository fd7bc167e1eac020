"""Tests for official-checkpoint conversion (``replic.models.convert``, ``replic convert``)."""

from __future__ import annotations

import argparse
import hashlib
import os

import pytest
import torch

from replic.cli import main
from replic.config import from_dict, to_dict
from replic.models import ModelConfig, build_model
from replic.models.convert import (
    CheckpointError,
    architecture_from_checkpoint,
    check_against_model,
    convert_official,
    load_official_checkpoint,
    load_replic_checkpoint,
)

# A tiny Conditional DETR in the options the official main.py spells.
TINY = {
    "backbone": "resnet18", "dilation": False, "hidden_dim": 64, "nheads": 8, "enc_layers": 2,
    "dec_layers": 2, "dim_feedforward": 128, "num_queries": 10, "dropout": 0.1, "aux_loss": True,
}  # fmt: skip


def official_args(**overrides) -> argparse.Namespace:
    """An ``args`` namespace with the official main.py argument names."""
    values = dict(
        lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, epochs=50, lr_drop=40,
        clip_max_norm=0.1, frozen_weights=None, position_embedding="sine", pre_norm=False,
        masks=False, set_cost_class=2, set_cost_bbox=5, set_cost_giou=2, cls_loss_coef=2,
        bbox_loss_coef=5, giou_loss_coef=2, focal_alpha=0.25, dataset_file="coco",
        coco_path="../data/coco", output_dir="output/x", device="cuda", seed=42, resume="",
        start_epoch=0, eval=False, num_workers=2, world_size=8, dist_url="env://", **TINY,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def tiny_model(seed: int, arch: str = "conditional_detr") -> torch.nn.Module:
    torch.manual_seed(seed)
    options = {k: v for k, v in TINY.items()}
    model = build_model(from_dict(ModelConfig, {"arch": arch, "num_classes": 91, **options})).eval()
    # Move every weight off its default so a dropped or mis-routed tensor shows in the outputs.
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=g))
                if tensor.dim() == 1:
                    tensor.abs_()  # keeps running_var positive; harmless elsewhere
    return model


def save_official(path, state, args=None, **extra) -> None:
    ckpt = {"model": state, **extra}
    if args is not None:
        ckpt["args"] = args
    torch.save(ckpt, path)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.zeros(2, 3, 96, 128)
    mask = torch.ones(2, 96, 128, dtype=torch.bool)
    for i, (h, w) in enumerate([(96, 128), (64, 96)]):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_official_round_trip_keeps_outputs_exactly(tmp_path, suffix):
    torch.set_num_threads(1)
    original = tiny_model(seed=0)
    src = tmp_path / "official.pth"
    optimizer = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    save_official(src, original.state_dict(), official_args(), optimizer=optimizer,
                  lr_scheduler={"step_size": 40, "gamma": 0.1}, epoch=49)  # fmt: skip

    out = tmp_path / f"converted{suffix}"
    source = convert_official(src, out)
    model_config, state, recorded = load_replic_checkpoint(out)

    assert recorded == source
    assert source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert source["epoch"] == 49 and source["args"]["lr_drop"] == 40
    expected_options = {"arch": "conditional_detr", "num_classes": 91, "pretrained_backbone": "none", **TINY}
    assert {k: model_config[k] for k in expected_options} == expected_options
    # The rest is the ModelConfig default, so it compares cleanly with a training run's config.
    assert model_config == to_dict(from_dict(ModelConfig, expected_options))
    if suffix == ".pt":  # the replic format itself needs no allow-list
        torch.load(out, weights_only=True)

    torch.manual_seed(123)  # a different init, so only the loaded weights can make outputs equal
    restored = build_model(from_dict(ModelConfig, model_config)).eval()
    restored.load_state_dict(state, strict=True)
    images, mask = padded_batch()
    with torch.no_grad():
        expected, got = original(images, mask), restored(images, mask)
    for key in ("pred_logits", "pred_boxes", "hs", "reference_points"):
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    src = tmp_path / "official.pth"
    save_official(src, tiny_model(seed=1).state_dict(), official_args())
    out = tmp_path / "out" / "model.pt"
    assert main(["convert", "--from", "official", str(src), "--out", str(out)]) == 0
    assert hashlib.sha256(src.read_bytes()).hexdigest() in capsys.readouterr().out
    assert load_replic_checkpoint(out)[0]["backbone"] == "resnet18"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]  # no temp file left

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["convert", "--from", "official", str(tmp_path / "junk.pth"), "--out", str(out)]) == 2
    assert "junk.pth" in capsys.readouterr().err


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = tiny_model(seed=2).state_dict()
    state["transformer.decoder.layers.1.ca_qpos_proj.weight"] = torch.zeros(64, 64)  # only layer 0 has it
    del state["transformer.decoder.ref_point_head.layers.1.bias"]
    src = tmp_path / "official.pth"
    save_official(src, state, official_args())
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(src)
    message = str(info.value)
    assert "official.pth" in message
    assert "missing keys (1): ['transformer.decoder.ref_point_head.layers.1.bias']" in message
    assert "unexpected keys (1): ['transformer.decoder.layers.1.ca_qpos_proj.weight']" in message


def test_args_that_contradict_the_weights_are_refused(tmp_path):
    src = tmp_path / "official.pth"
    save_official(src, tiny_model(seed=3).state_dict(), official_args(hidden_dim=256))
    with pytest.raises(CheckpointError, match=r"args\.hidden_dim = 256 but the weights say 64"):
        load_official_checkpoint(src)
    save_official(src, tiny_model(seed=3).state_dict(), official_args(pre_norm=True))
    with pytest.raises(CheckpointError, match="pre_norm"):
        load_official_checkpoint(src)


class _Payload:
    """Unpickling this runs a shell command; a safe loader must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_non_allow_listed_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "executed"
    src = tmp_path / "evil.pth"
    save_official(src, tiny_model(seed=4).state_dict(), official_args(), extra=_Payload(str(marker)))
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load.*system"):
        load_official_checkpoint(src)
    assert not marker.exists()


def test_checkpoint_without_args_is_inferred_from_shapes(tmp_path):
    src = tmp_path / "bare.pth"
    save_official(src, tiny_model(seed=5).state_dict())
    model_config, _ = load_official_checkpoint(src)
    assert model_config["backbone"] == "resnet18" and model_config["hidden_dim"] == 64
    assert model_config["enc_layers"] == 2 and model_config["num_queries"] == 10


def test_detr_checkpoint_is_recognised(tmp_path):
    state = tiny_model(seed=6, arch="detr").state_dict()
    assert not any("ref_point_head" in k for k in state)
    src = tmp_path / "detr.pth"
    save_official(src, state, official_args())
    model_config, loaded = load_official_checkpoint(src)
    assert model_config["arch"] == "detr"
    assert model_config["num_classes"] == 91  # 92 logits minus the no-object class
    assert loaded.keys() == state.keys()


def test_official_r50_layout_is_accepted_without_allocating():
    """The full official R50 layout (564 keys) maps onto the replic model as-is."""
    with torch.device("meta"):
        state = build_model(from_dict(ModelConfig, {})).state_dict()
    assert len(state) == 564
    args = vars(official_args(backbone="resnet50", hidden_dim=256, enc_layers=6, dec_layers=6,
                              dim_feedforward=2048, num_queries=300))  # fmt: skip
    model_config = architecture_from_checkpoint(state, args, "<r50>")
    assert model_config == {
        "arch": "conditional_detr", "backbone": "resnet50", "dilation": False, "pretrained_backbone": "none",
        "hidden_dim": 256, "nheads": 8, "enc_layers": 6, "dec_layers": 6, "dim_feedforward": 2048,
        "dropout": 0.1, "num_classes": 91, "num_queries": 300, "aux_loss": True,
    }  # fmt: skip
    check_against_model(state, model_config, "<r50>")

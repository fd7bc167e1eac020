"""KS-DETR (replic/methods/ks_detr.py): GT mask, token modification, triple attention, losses, eval path."""

from __future__ import annotations

import types

import pytest
import torch

from models_helpers import tiny_batch, tiny_config
from replic.config import ConfigError
from replic.methods import build_method, parse_method_options
from replic.methods.ks_detr import (
    TEACHERS,
    KSEncoderLayer,
    KSOptions,
    TripleAttention,
    gt_foreground_mask,
    mask_on_grid,
    significance_value,
)
from replic.models.build import build_criterion, build_model
from replic.models.transformer import TransformerEncoderLayer

E, HEADS = 16, 4


def _layer(variant: str = "triple", **kw) -> KSEncoderLayer:
    torch.manual_seed(0)
    layer = KSEncoderLayer(E, HEADS, 32, 0.0, KSOptions(variant=variant, **kw))
    return layer.eval()


def _tokens(b: int = 2, n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, E, generator=g), torch.randn(b, n, E, generator=g)


def _student_rows_to_teacher(attn: TripleAttention) -> None:
    """Copy the student's q/k/v projection rows into the teacher rows."""
    with torch.no_grad():
        for t in ("q_t", "k_t", "v_t"):
            if t in attn.rows:
                s, d = attn.rows.index(t[0]), attn.rows.index(t)
                attn.in_proj_weight[d * E:(d + 1) * E] = attn.in_proj_weight[s * E:(s + 1) * E]
                attn.in_proj_bias[d * E:(d + 1) * E] = attn.in_proj_bias[s * E:(s + 1) * E]


def _branches(layer: KSEncoderLayer, src, pos, fg, mask=None) -> list[torch.Tensor]:
    teacher = layer.teacher_inputs(src, pos, fg)
    outs, _ = layer.self_attn(src + pos, src + pos, src, teacher, key_padding_mask=mask)
    return outs


# ----------------------------------------------------------------------------- teachers vs student
def test_without_foreground_smlp_teacher_inputs_and_branches_equal_the_student():
    layer = _layer()
    src, pos = _tokens()
    no_fg = torch.zeros(2, 12)
    teacher = layer.teacher_inputs(src, pos, no_fg)
    assert torch.equal(teacher["q_t"], src + pos) and torch.equal(teacher["k_t"], src + pos)
    assert torch.equal(teacher["v_t"], src)
    _student_rows_to_teacher(layer.self_attn)
    student, share_v, share_a = _branches(layer, src, pos, no_fg)
    torch.testing.assert_close(share_v, student, rtol=0, atol=1e-6)
    torch.testing.assert_close(share_a, student, rtol=0, atol=1e-6)
    # With foreground tokens the teachers see modified tokens: both branches move away.
    fg = torch.zeros(2, 12)
    fg[:, 3:7] = 1
    student_fg, share_v_fg, share_a_fg = _branches(layer, src, pos, fg)
    torch.testing.assert_close(student_fg, student, rtol=0, atol=0)
    assert (share_v_fg - student_fg).abs().max() > 1e-3
    assert (share_a_fg - student_fg).abs().max() > 1e-3


@pytest.mark.parametrize("variant,changed,moves", [
    ("triple", "v_t", ["share_a"]),          # teacher 2 (A·V_t) only
    ("triple", "q_t", ["share_v"]),          # teacher 1 (A_t·V) only
    ("triple", "k_t", ["share_v"]),
    ("share_a", "v_t", ["share_a"]),
    ("share_v", "q_t", ["share_v"]),
])
def test_each_teacher_projection_moves_only_its_own_branch(variant, changed, moves):
    layer = _layer(variant)
    src, pos = _tokens()
    fg = torch.zeros(2, 12)
    fg[0, :5] = 1
    names = ["student", *TEACHERS[variant]]
    before = dict(zip(names, _branches(layer, src, pos, fg)))
    i = layer.self_attn.rows.index(changed)
    with torch.no_grad():
        layer.self_attn.in_proj_weight[i * E:(i + 1) * E] += 0.5
    after = dict(zip(names, _branches(layer, src, pos, fg)))
    for name in names:
        if name in moves:
            assert (after[name] - before[name]).abs().max() > 1e-3, name
        else:
            assert torch.equal(after[name], before[name]), name


def test_share_a_branch_reuses_the_student_attention_map():
    """A·V_t with V_t := V must equal the student exactly when the teacher sees the same tokens."""
    layer = _layer("share_a")
    src, pos = _tokens()
    _student_rows_to_teacher(layer.self_attn)
    student, share_a = _branches(layer, src, pos, torch.zeros(2, 12))
    torch.testing.assert_close(share_a, student, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant,rows", [("triple", 6), ("share_a", 4), ("share_v", 5)])
def test_parameter_count_matches_the_official_packed_projection(variant, rows):
    layer = _layer(variant)
    attn = layer.self_attn
    assert tuple(attn.in_proj_weight.shape) == (rows * E, E)  # official in_proj_weight (nE, E)
    assert tuple(attn.in_proj_bias.shape) == (rows * E,)
    plain = TransformerEncoderLayer(E, HEADS, 32, 0.0)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_ks = sum(p.numel() for p in layer.parameters())
    smlp = E * E + E
    assert n_ks == n_plain + (rows - 3) * (E * E + E) + smlp


def _assert_xavier_uniform(name: str, weight: torch.Tensor) -> None:
    """Drawn from U(±√(6/(fan_in+fan_out))): inside the bound, reaching near it, with its std.

    PyTorch's default Linear init is U(±1/√fan_in): for a square E×E matrix that bound is 1/√3 of
    xavier's, so the "reaches 0.9 × bound" check fails for it."""
    fan_out, fan_in = weight.shape
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    top = float(weight.abs().max())
    assert top <= bound * (1 + 1e-6), (name, top, bound)
    assert top > 0.9 * bound, (name, top, bound)
    assert abs(float(weight.std()) / (bound / 3 ** 0.5) - 1) < 0.1, (name, float(weight.std()), bound)


@pytest.mark.parametrize("variant,masking", [("triple", "sMLP"), ("share_a", "Mark"), ("share_v", "sMLP")])
def test_every_matrix_of_a_fresh_ks_layer_is_xavier_uniform_like_the_plain_layers(variant, masking):
    """Official: detrex ConditionalDetrTransformer.init_weights xaviers every dim > 1 parameter of
    the transformer, the KS layer's out_proj included; the sMLP sits on the model (ksgt) and keeps
    PyTorch's default. replic's plain layer gets the same from Transformer._reset_parameters."""
    width = 64
    mc = tiny_config(hidden_dim=width, nheads=4, dim_feedforward=128, enc_layers=2)
    cfg = types.SimpleNamespace(model=mc, method={"name": "ks_detr", "variant": variant, "token_masking": masking})
    torch.manual_seed(0)
    model = build_method(cfg).build_model()
    plain, ks = model.transformer.encoder.layers
    assert isinstance(ks, KSEncoderLayer) and not isinstance(plain, KSEncoderLayer)
    checked = []
    for tag, layer in (("plain", plain), ("ks", ks)):
        for name, param in layer.named_parameters():
            if param.dim() > 1 and not name.startswith("smlp."):
                _assert_xavier_uniform(f"{tag}.{name}", param.detach())
                checked.append(f"{tag}.{name}")
    assert "ks.self_attn.out_proj.weight" in checked and "ks.self_attn.in_proj_weight" in checked
    assert sorted(n for n in checked if n.startswith("ks.")) == sorted(
        "ks." + n for n, p in plain.named_parameters() if p.dim() > 1)  # same matrices as the plain layer
    if masking == "sMLP":
        weight = ks.smlp.linear.weight.detach()
        assert float(weight.abs().max()) <= width ** -0.5  # PyTorch's default U(±1/√fan_in), as official


def test_ks_layer_keeps_the_plain_layers_dropout_after_attention():
    """Decision (docs/ks_detr.md): the official KS layer has no dropout after its attention, but
    neither has any detrex encoder layer (proj_drop 0); replic's detector core is the official
    Conditional DETR, whose encoder layer drops the attention output, so the KS layer keeps exactly the
    plain layer's dropouts. Pinned: in train mode, with the same weights and random stream, the KS
    layer's student path is the plain layer bit for bit (it would not be without dropout1)."""
    torch.manual_seed(0)
    plain = TransformerEncoderLayer(E, HEADS, 32, 0.3)
    ks = KSEncoderLayer(E, HEADS, 32, 0.3, KSOptions())
    state = {k: v for k, v in ks.state_dict().items() if not k.startswith("smlp.")}
    for key in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
        state[key] = state[key][:3 * E]
    plain.load_state_dict(state, strict=True)
    plain.train()
    ks.train()
    src, pos = _tokens()
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 9:] = True
    torch.manual_seed(5)
    want = plain(src, pos, padding)
    torch.manual_seed(5)
    got = ks(src, pos, padding)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert ks.dropout1.p == ks.dropout.p == ks.dropout2.p == ks.self_attn.dropout == 0.3
    with torch.no_grad():  # dropout is really on: eval differs
        assert (ks.eval()(src, pos, padding) - got).abs().max() > 1e-3


# ----------------------------------------------------------------------------- GT mask
def test_gt_mask_on_hand_made_boxes_and_padding_equals_a_hand_computed_grid():
    # Image 8×8 (target size), padded to 8×12; grid 3×4 samples rows y = 0, 3.5, 7 and
    # columns x = 0, 3.67, 7.33, 11 of the canvas (bilinear, align_corners=True).
    boxes_xyxy = torch.tensor([[0, 0, 2, 2], [3, 3, 5, 4], [7, 6, 8, 8]], dtype=torch.float32)
    cxcywh = torch.cat([(boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2, boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], 1) / 8
    targets = [{"boxes": cxcywh, "size": torch.tensor([8, 8])}, {"boxes": torch.zeros(0, 4), "size": torch.tensor([8, 8])}]
    canvas = gt_foreground_mask(targets, (8, 12))
    expected_canvas = torch.zeros(2, 8, 12)
    expected_canvas[0, 0:2, 0:2] = 1
    expected_canvas[0, 3:4, 3:5] = 1
    expected_canvas[0, 6:8, 7:8] = 1
    assert torch.equal(canvas, expected_canvas)
    # Without a padding mask: box 3 leaks into token (2, 2) (x = 7.33 has weight on pixel 7).
    grid = mask_on_grid(canvas, (3, 4), None).view(2, 3, 4)
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)
    assert torch.equal(grid[0], expected) and not grid[1].any()
    # Grid columns 2-3 are padding tokens: never foreground.
    padding = torch.zeros(2, 12, dtype=torch.bool).view(2, 3, 4)
    padding[:, :, 2:] = True
    grid = mask_on_grid(canvas, (3, 4), padding.flatten(1)).view(2, 3, 4)
    expected[2, 2] = 0
    assert torch.equal(grid[0], expected)


def test_gt_mask_dilation_clamps_to_the_image_and_significance_values():
    box = torch.tensor([[4.0 / 8, 3.5 / 8, 2.0 / 8, 1.0 / 8]])  # xyxy (3, 3, 5, 4) in an 8×8 image
    canvas = gt_foreground_mask([{"boxes": box, "size": torch.tensor([8, 8])}], (8, 12), pad_fg_pixel=4)
    expected = torch.zeros(1, 8, 12)
    expected[0, 0:8, 0:8] = 1  # (−1, −1, 9, 8) clamped to the 8×8 image, never into the padding
    assert torch.equal(canvas, expected)
    assert significance_value(20 ** 2) == 1.0
    assert significance_value(600 ** 2) == pytest.approx(0.6)
    assert significance_value(2560.0) == pytest.approx(0.95)  # halfway between 32² and 64²
    soft = gt_foreground_mask([{"boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]), "size": torch.tensor([64, 64])}],
                              (64, 64), criterion="significance_value")
    assert soft.max().item() == pytest.approx(significance_value(64.0 * 64.0))


# ----------------------------------------------------------------------------- detector-level
def _ks(variant: str = "triple", **model_kw):
    mc = tiny_config(enc_layers=2, dropout=0.0, **model_kw)
    cfg = types.SimpleNamespace(model=mc, method={"name": "ks_detr", "variant": variant})
    method = build_method(cfg)
    torch.manual_seed(0)
    model = method.build_model()
    criterion = build_criterion(mc)
    method.setup(model, criterion, torch.device("cpu"))
    return method, model, criterion, mc


def _batch():
    images, mask, targets = tiny_batch()
    targets[0]["size"] = torch.tensor([96, 128])
    targets[1]["size"] = torch.tensor([96, 96])
    return images, mask, targets


def test_eval_is_independent_of_targets_and_equals_the_plain_student_path():
    method, model, _, mc = _ks()
    images, mask, targets = _batch()
    model.eval()
    with torch.no_grad():
        evaluated = model(images, mask)
        trained = method.forward_train(model, images, mask, targets)
        other = [dict(t, boxes=t["boxes"].flip(-1).clamp(0.1, 0.9)) for t in targets]
        trained_other = method.forward_train(model, images, mask, other)
    assert "encoder_streams" not in evaluated and len(trained["encoder_streams"]) == 2
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(trained[key], evaluated[key], rtol=0, atol=1e-5)
        torch.testing.assert_close(trained_other[key], evaluated[key], rtol=0, atol=1e-5)
    # Teachers do see the GT: different boxes, different teacher predictions.
    assert (trained["encoder_streams"][0]["hs"] - trained_other["encoder_streams"][0]["hs"]).abs().max() > 1e-4
    # A plain detector holding the student rows gives the same detections.
    plain = build_model(mc).eval()
    state = model.state_dict()
    for name in list(state):
        if name.endswith("self_attn.in_proj_weight") or name.endswith("self_attn.in_proj_bias"):
            state[name] = state[name][:3 * mc.hidden_dim]
    state = {k: v for k, v in state.items() if ".smlp." not in k}
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        reference = plain(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(evaluated[key], reference[key], rtol=0, atol=1e-5)


def test_each_teacher_loss_reaches_the_shared_student_weights():
    method, model, criterion, mc = _ks()
    images, mask, targets = _batch()
    model.train()
    e = mc.hidden_dim
    attn = model.transformer.encoder.layers[-1].self_attn
    for teacher, shared_rows, own_rows in (("share_v", ["v"], ["q_t", "k_t"]), ("share_a", ["q", "k"], ["v_t"])):
        model.zero_grad()
        losses = criterion(method.forward_train(model, images, mask, targets), targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k.endswith(f"_teacher_{teacher}"))
        total.backward()
        grad = attn.in_proj_weight.grad
        rows = {n: grad[i * e:(i + 1) * e] for i, n in enumerate(attn.rows)}
        for name in shared_rows + own_rows:
            assert rows[name].abs().sum() > 0, (teacher, name)
        # The other teacher's private projections get nothing from this loss.
        other_private = {"share_v": ["v_t"], "share_a": ["q_t", "k_t"]}[teacher]
        for name in other_private:
            assert rows[name].abs().sum() == 0, (teacher, name)
        for shared in (attn.out_proj.weight, model.transformer.encoder.layers[-1].linear1.weight,
                       model.class_embed.weight, model.transformer.encoder.layers[0].linear1.weight):
            assert shared.grad is not None and shared.grad.abs().sum() > 0, teacher


def test_teacher_losses_are_weighted_like_the_student_sets():
    method, model, criterion, _ = _ks()
    for teacher in ("share_v", "share_a"):
        for term in ("loss_ce", "loss_bbox", "loss_giou"):
            assert criterion.weight_dict[f"{term}_teacher_{teacher}"] == criterion.weight_dict[term]


# ----------------------------------------------------------------------------- bad input
def test_bad_ks_configs_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"method.*pad_fg_pixel.*>= 0.*-8"):
        parse_method_options({"name": "ks_detr", "pad_fg_pixel": -8})
    with pytest.raises(ConfigError, match=r"method\.masking_loc.*'XY'"):
        parse_method_options({"name": "ks_detr", "masking_loc": "XY"})
    with pytest.raises(ConfigError, match=r"method.*masking_loc.*share_a"):
        parse_method_options({"name": "ks_detr", "variant": "share_a", "masking_loc": "QK"})
    no_encoder = types.SimpleNamespace(model=tiny_config(enc_layers=0), method={"name": "ks_detr"})
    with pytest.raises(ConfigError, match=r"method\.encoder_layer.*model\.enc_layers is 0"):
        build_method(no_encoder)
    cnn = types.SimpleNamespace(model=types.SimpleNamespace(arch="retinanet"), method={"name": "ks_detr"})
    with pytest.raises(ConfigError, match=r"method\.name: ks_detr replaces a transformer encoder layer.*no transformer"):
        build_method(cnn)
    out_of_range = types.SimpleNamespace(model=tiny_config(enc_layers=2), method={"name": "ks_detr", "encoder_layer": 2})
    with pytest.raises(ConfigError, match=r"method\.encoder_layer: 2 is out of range"):
        build_method(out_of_range)


def test_ks_on_a_model_without_encoder_layers_fails_when_the_config_loads(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from replic.engine.config import load_experiment

    experiment = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "ks_cdetr_r50_50ep.yaml"
    with pytest.raises(ConfigError, match=r"method\.encoder_layer.*model\.enc_layers is 0"):
        load_experiment(experiment, "paper", overrides={"model": {"enc_layers": 0}})
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "replic", "train", "--config", str(experiment), "--out", str(out),
                             "--set", "method.masking_loc=XQ", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 2 and "method.masking_loc" in result.stderr and "'XQ'" in result.stderr
    assert not out.exists()  # refused before the run directory is made


def test_every_ks_experiment_has_the_detrex_protocol_and_a_baseline_that_differs_only_in_the_method():
    from pathlib import Path

    from replic.config import to_dict
    from replic.engine.config import load_experiment

    folder = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    missing = {"data": {"root": "/nonexistent/replic-data"}}
    paths = sorted(folder.glob("ks_*.yaml"))
    assert len(paths) == 19
    for path in paths:
        cfg = load_experiment(path, "paper", missing)
        assert cfg.model.postprocess_topk == 300 and cfg.train.weight_decay_norm == 0.0, path.stem
        assert (cfg.train.epochs, cfg.train.lr_drop) in ((50, 40), (12, 11)), path.stem
        assert cfg.model.pretrained_backbone == "torchvision" and cfg.train.clip_max_norm == 0.1
        if path.stem.endswith("_base"):
            assert cfg.method == {"name": "none"}
            continue
        assert cfg.method["name"] == "ks_detr"
        base_name = None
        for candidate in (path.stem + "_base", "_".join(path.stem.split("_")[:4]) + "_base"):
            if (folder / f"{candidate}.yaml").is_file():
                base_name = candidate
                break
        assert base_name, f"{path.stem} has no baseline config"
        ks, base = to_dict(cfg), to_dict(load_experiment(folder / f"{base_name}.yaml", "paper", missing))
        # The plain baseline's method section is omitted from its resolved config (ADDED_KEY).
        differ = {k for k in set(ks) | set(base) if ks.get(k) != base.get(k)}
        assert differ <= {"method", "name", "description"}, (path.stem, differ)


def test_cached_backbone_maps_give_the_same_ks_outputs_as_images():
    """Mini scale trains from cached frozen-backbone maps: the KS teachers need only the padded size."""
    from replic.engine.feature_cache import unsupported_reason
    from replic.models.backbone import BackboneFeatures

    method, model, _, mc = _ks()
    images, mask, targets = _batch()
    model.eval()
    with torch.no_grad():
        maps = dict(model.backbone[0].body(images))
        cached = method.forward_train(model, BackboneFeatures(maps, tuple(images.shape)), mask, targets)
        direct = method.forward_train(model, images, mask, targets)
    for got, want in [(cached, direct)] + list(zip(cached["encoder_streams"], direct["encoder_streams"])):
        torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=0, atol=1e-6)
    cfg = types.SimpleNamespace(model=mc, method={"name": "ks_detr"})
    assert unsupported_reason(cfg) is None

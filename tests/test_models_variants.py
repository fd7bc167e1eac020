"""Every ablation variant builds, trains one step with finite loss, and really differs.

"Really differs": variants that share parameter names are run with the *same* weights and
must give different outputs; the one pair that is mathematically equal (CSQ with λ = identity
and CSQ-P: both use p_s alone, Figure 5 "identity" = Table 3 "CSQ-P") must give equal outputs.
"""

from __future__ import annotations

import pytest
import torch

from models_helpers import tiny_batch, tiny_config
from replic.models import build_criterion, build_model
from replic.models.conditional_decoder import QueryScale

VARIANTS = {
    "csq": {},
    "csq_c": {"spatial_query": "csq_c"},
    "csq_t": {"spatial_query": "csq_t"},
    "csq_p": {"spatial_query": "csq_p"},
    "csq_i": {"spatial_query": "csq_i"},
    "lambda_identity": {"lambda_form": "identity"},
    "lambda_scalar": {"lambda_form": "scalar"},
    "lambda_block_diagonal": {"lambda_form": "block_diagonal"},
    "lambda_full": {"lambda_form": "full"},
    "ref_learned": {"reference_point": "learned"},
    "ref_zero": {"reference_point": "zero"},
    "no_focal": {"focal_loss": False},
    "no_offset": {"offset_regression": False},
    "detr": {"arch": "detr"},
    "detr_or": {"arch": "detr", "offset_regression": True},
    "detr_fl": {"arch": "detr", "focal_loss": True},
    "detr_or_fl": {"arch": "detr", "offset_regression": True, "focal_loss": True},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_trains_one_step(name):
    torch.manual_seed(0)
    cfg = tiny_config(**VARIANTS[name])
    model = build_model(cfg).train()
    criterion = build_criterion(cfg)
    images, mask, targets = tiny_batch()
    losses = criterion(model(images, mask), targets)
    assert set(criterion.weight_dict) <= set(losses)
    total = criterion.total(losses)
    assert torch.isfinite(total)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    total.backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


def _outputs(cfg_overrides, state=None, strict=True):
    torch.manual_seed(0)
    model = build_model(tiny_config(**cfg_overrides)).eval()
    if state is not None:
        result = model.load_state_dict(state, strict=strict)
        assert not result.missing_keys, result.missing_keys
    with torch.no_grad():
        # Random LayerNorms, non-zero last box layer: differences must not hide behind the init.
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and state is None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        images, mask, _ = tiny_batch()
        return model, model(images, mask)


def test_spatial_query_variants_differ_with_the_same_weights():
    base_model, _ = _outputs({})
    with torch.no_grad():  # non-zero last box layer so box differences are visible
        base_model.bbox_embed.layers[-1].weight.normal_(0, 0.1)
    state = base_model.state_dict()
    images, mask, _ = tiny_batch()
    with torch.no_grad():
        base = base_model(images, mask)
    results = {}
    for name in ("csq_t", "csq_i", "csq_c", "csq_p"):
        _, out = _outputs(VARIANTS[name], state, strict=name in ("csq_t", "csq_i"))
        results[name] = out
        assert not torch.allclose(out["pred_logits"], base["pred_logits"], atol=1e-4), name
        assert not torch.allclose(out["pred_boxes"], base["pred_boxes"], atol=1e-4), name
    _, identity = _outputs(VARIANTS["lambda_identity"], state, strict=False)
    torch.testing.assert_close(identity["pred_logits"], results["csq_p"]["pred_logits"])
    torch.testing.assert_close(identity["pred_boxes"], results["csq_p"]["pred_boxes"])


def test_reference_point_modes():
    model_pred, pred = _outputs({})
    _, zero = _outputs(VARIANTS["ref_zero"], model_pred.state_dict(), strict=False)
    assert torch.equal(zero["reference_points"], torch.full_like(zero["reference_points"], 0.5))
    learned_model, learned = _outputs(VARIANTS["ref_learned"])
    expected = learned_model.transformer.decoder.ref_point_embed.weight.sigmoid()
    torch.testing.assert_close(learned["reference_points"], expected[None].expand(2, -1, -1))
    assert not hasattr(learned_model.transformer.decoder, "ref_point_head")
    # Predicted points follow query_embed; learned ones do not.
    torch.testing.assert_close(pred["reference_points"],
                               model_pred.transformer.decoder.ref_point_head(model_pred.query_embed.weight).sigmoid()[None].expand(2, -1, -1))
    spread = learned["reference_points"][0]
    assert spread.min() < 0.3 and spread.max() > 0.7  # [inferred] uniform init over the image


def test_offset_regression_switch():
    model, with_or = _outputs({})
    _, without = _outputs(VARIANTS["no_offset"], model.state_dict())
    torch.testing.assert_close(without["pred_logits"], with_or["pred_logits"])
    torch.testing.assert_close(without["pred_boxes"][..., :2], torch.full((2, 6, 2), 0.5))  # zero-init head, no offset
    assert not torch.allclose(with_or["pred_boxes"][..., :2], without["pred_boxes"][..., :2])


def test_detr_with_offset_regression_uses_reference_points():
    model = build_model(tiny_config(arch="detr", offset_regression=True)).eval()
    assert hasattr(model.transformer.decoder, "ref_point_head")
    images, mask, _ = tiny_batch()
    with torch.no_grad():
        out = model(images, mask)
        raw = model.bbox_embed(out["hs"][-1])
        raw[..., :2] += torch.logit(out["reference_points"].clamp(1e-5, 1 - 1e-5))
    torch.testing.assert_close(out["pred_boxes"], raw.sigmoid(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["diagonal", "scalar", "block_diagonal", "full"])
def test_lambda_forms_apply_the_documented_matrix(form):
    torch.manual_seed(0)
    d, heads = 16, 4
    scale = QueryScale(form, d, heads)
    f, p = torch.randn(2, 3, d), torch.randn(2, 3, d)
    t = scale.layers[1](torch.relu(scale.layers[0](f)))
    matrices = torch.zeros(2, 3, d, d)
    for b in range(2):
        for q in range(3):
            if form == "diagonal":
                matrices[b, q] = torch.diag(t[b, q])
            elif form == "scalar":
                matrices[b, q] = t[b, q, 0] * torch.eye(d)
            elif form == "block_diagonal":
                blocks = t[b, q].view(heads, d // heads, d // heads)
                matrices[b, q] = torch.block_diag(*blocks)
            else:
                matrices[b, q] = t[b, q].view(d, d)
    expected = torch.einsum("bqij,bqj->bqi", matrices, p)
    torch.testing.assert_close(scale(f, p), expected, atol=1e-5, rtol=1e-5)


def test_lambda_form_parameter_shapes():
    shapes = {}
    for form, out_dim in (("diagonal", 32), ("scalar", 1), ("block_diagonal", 4 * 8 * 8), ("full", 32 * 32)):
        model = build_model(tiny_config(lambda_form=form))
        shapes[form] = tuple(model.transformer.decoder.query_scale.layers[1].weight.shape)
        assert shapes[form] == (out_dim, 32)
    assert build_model(tiny_config(lambda_form="identity")).transformer.decoder.query_scale is None


def test_csq_i_predicts_lambda_in_every_layer_from_self_attention_output():
    torch.manual_seed(0)
    model = build_model(tiny_config(spatial_query="csq_i", dec_layers=3)).eval()
    decoder = model.transformer.decoder
    seen, after_sa = [], []
    hooks = [decoder.query_scale.register_forward_hook(lambda m, i, o: seen.append(i[0]))]
    hooks += [layer.norm1.register_forward_hook(lambda m, i, o: after_sa.append(o)) for layer in decoder.layers]
    images, mask, _ = tiny_batch()
    with torch.no_grad():
        model(images, mask)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for s, c in zip(seen, after_sa):
        torch.testing.assert_close(s, c)

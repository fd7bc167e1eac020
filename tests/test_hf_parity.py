"""Forward parity against Hugging Face ``ConditionalDetrForObjectDetection`` (transformers 5.x).

HF's model is built offline from a config (timm backbone, random weights, no
download): a tiny ResNet-18 model, plus the full official R50 shape and a DC5-R50
marked slow; always with ``auxiliary_loss=False`` (HF's aux path differs from the
official decoder: the ``auxiliary_loss`` branch of the decoder loop in HF's
``transformers/models/conditional_detr/modeling_conditional_detr.py`` feeds the
layer-normalised state to the next layer). Every LayerNorm, every FrozenBatchNorm buffer and
the zero-initialised last bbox layer are randomised first, because default values
hide misplaced norms. The weights go through the explicit name map of
``replic.models.hf_mapping`` into replic and load strictly; logits and boxes are
compared in full for two images of different sizes in one padded batch.
"""

from __future__ import annotations

import re

import pytest
import torch

from replic.config import from_dict
from replic.models import ModelConfig, build_model
from replic.models.hf_mapping import hf_to_official_state_dict, model_config_from_hf

pytest.importorskip("transformers")
pytest.importorskip("timm")

# fp32 on CPU; measured max abs difference: 0 (tiny R18), 2.9e-6 logits / 1.8e-7 boxes
# (R50, DC5-R50). The bar is the one HF's own conversion script uses.
ATOL = 1e-4
ATTN_GAIN = 4.0


def _randomise_hidden_defaults(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Give every weight an informative value: LayerNorms, frozen-BN buffers and the
    last bbox layer off their defaults, and O(1)-gain weights and non-zero biases
    instead of HF's N(0, 0.02) init (under which all queries give near-equal outputs)."""
    changed = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.backbone."):
                if param.dim() == 4:
                    fan_out = param.shape[0] * param.shape[2] * param.shape[3]
                    param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / fan_out) ** 0.5)
            elif param.dim() > 1:
                fan_in, fan_out = param.shape[1] * param[0, 0].numel(), param.shape[0]
                # xavier-uniform (the official init); query/key projections get a larger
                # gain so attention is peaked and each query attends to different places.
                gain = ATTN_GAIN if re.search(r"\.[qk]_(content_|pos_|pos_sine_)?proj\.", name) else 1.0
                bound = gain * (6.0 / (fan_in + fan_out)) ** 0.5
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        query_pos = model.model.query_position_embeddings.weight
        query_pos.copy_(torch.randn(query_pos.shape, generator=generator))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
                changed += 1
            elif type(module).__name__.endswith("FrozenBatchNorm2d"):
                n = module.weight.shape[0]
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))  # positive
                changed += 1
        last = model.bbox_predictor.layers[-1]
        last.weight.copy_(0.05 * torch.randn(last.weight.shape, generator=generator))
        last.bias.copy_(0.5 * torch.randn(last.bias.shape, generator=generator))
    return changed


# name → ConditionalDetrConfig options. The tiny ResNet-18 model runs in every test
# session; the full official R50 shape and a DC5-R50 (dilated C5, stride 16) are slow.
HF_CONFIGS = {
    "r18-tiny": dict(
        backbone="resnet18",  # timm, use_pretrained_backbone=False: nothing is downloaded
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=8, decoder_attention_heads=8, num_queries=12,
    ),
    "r50-official": dict(),  # HF defaults = official R50: d 256, 6+6 layers, 300 queries
    "r50-dc5": dict(dilation=True, encoder_layers=2, decoder_layers=2, num_queries=50),
}  # fmt: skip


@pytest.fixture(
    scope="module",
    params=[
        "r18-tiny",
        pytest.param("r50-official", marks=pytest.mark.slow),
        pytest.param("r50-dc5", marks=pytest.mark.slow),
    ],
)
def hf_model(request):
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    torch.manual_seed(0)
    config = ConditionalDetrConfig(num_labels=91, auxiliary_loss=False, **HF_CONFIGS[request.param])
    model = ConditionalDetrForObjectDetection(config).eval()
    changed = _randomise_hidden_defaults(model, torch.Generator().manual_seed(1))
    assert changed > 20  # encoder/decoder LayerNorms and the backbone's frozen BNs
    return model


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    sizes = [(96, 128), (128, 96)]
    images = torch.zeros(2, 3, 128, 128)
    mask = torch.ones(2, 128, 128, dtype=torch.bool)  # replic: True = padding
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


def test_mapping_covers_every_key(hf_model):
    hf_state = hf_model.state_dict()
    mapped = hf_to_official_state_dict(hf_state)
    # HF splits each encoder in_proj into q/k/v: 4 tensors fewer per encoder layer.
    assert len(mapped) == len(hf_state) - 4 * hf_model.config.encoder_layers
    with pytest.raises(KeyError, match="model.decoder.brand_new.weight"):
        hf_to_official_state_dict({**hf_state, "model.decoder.brand_new.weight": torch.zeros(1)})


def test_forward_matches_hugging_face(hf_model):
    torch.set_num_threads(1)
    cfg = from_dict(ModelConfig, model_config_from_hf(hf_model.config))
    replic_model = build_model(cfg).eval()
    replic_model.load_state_dict(hf_to_official_state_dict(hf_model.state_dict()), strict=True)

    images, mask = _padded_batch()
    with torch.no_grad():
        ours = replic_model(images, mask)
        theirs = hf_model(pixel_values=images, pixel_mask=(~mask).long())  # HF: 1 = real pixel

    err_logits = (ours["pred_logits"] - theirs.logits).abs().max().item()
    err_boxes = (ours["pred_boxes"] - theirs.pred_boxes).abs().max().item()
    print(f"max abs error: logits {err_logits:.3g}, boxes {err_boxes:.3g}")
    torch.testing.assert_close(ours["pred_logits"], theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], theirs.pred_boxes, atol=ATOL, rtol=0)
    # The comparison must be sensitive: queries give distinct outputs, and ignoring
    # the padding mask changes them by far more than the tolerance.
    if hf_model.config.decoder_layers <= 2:  # deeper random decoders make queries alike
        assert ours["pred_logits"].std(dim=1).mean().item() > 100 * ATOL
    with torch.no_grad():
        unpadded = hf_model(pixel_values=images, pixel_mask=torch.ones_like(mask, dtype=torch.long))
    print(f"effect of ignoring the mask: {(unpadded.logits - theirs.logits).abs().max().item():.3g}")
    assert (unpadded.logits - theirs.logits).abs().max().item() > 100 * ATOL

"""Optional parity with the official KS-DETR attention (edocanonymous/KS-DETR).

Set ``REPLIC_OFFICIAL_KSDETR`` to a checkout (or ``git archive``) of the official repository
(HEAD df0f2f6e5c3c11c5e54fa55cfc6a452c3456c978). Only ``projects/ks_detr/modeling/layers/attn/``
is imported, as a standalone package (it needs torch only: no detectron2 / detrex). Given the same
weights and inputs, replic's :class:`TripleAttention` reproduces ``MultiheadTripleAttention`` (all
three branch outputs and the attention maps) and the dual ``MultiheadAttentionShareA`` /
``MultiheadAttentionShareV`` at unit-scale activations, both sides in float64 (replic's fused SDPA vs
the official bmm differ only by reduction order): within 1e-10 absolute, against a measured worst of
~1e-15 (2026-12-07, AMD EPYC); in float32 they differ by ~1e-6, a margin that depends on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from replic.methods.ks_detr import KSEncoderLayer, KSOptions

ROOT = os.environ.get("REPLIC_OFFICIAL_KSDETR")
pytestmark = pytest.mark.skipif(not ROOT, reason="set REPLIC_OFFICIAL_KSDETR to an official KS-DETR checkout")
E, HEADS, N, B = 32, 4, 20, 2
TOL = 1e-10


def _official_attn():
    """The official attn/ package imported on its own (its relative imports stay inside it)."""
    folder = Path(ROOT) / "projects" / "ks_detr" / "modeling" / "layers" / "attn"
    if not (folder / "__init__.py").is_file():
        pytest.fail(f"REPLIC_OFFICIAL_KSDETR={ROOT}: no {folder}/__init__.py")
    name = "ksdetr_official_attn"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _inputs(fg_tokens: bool = True):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    pos = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    fg = torch.zeros(B, N, dtype=torch.float64)
    if fg_tokens:
        fg[0, 3:9] = 1
        fg[1, 10:14] = 1
    padding = torch.zeros(B, N, dtype=torch.bool)
    padding[1, -5:] = True
    return src, pos, fg, padding


@pytest.mark.parametrize("variant,official_cls,loc,masking", [
    ("triple", "MultiheadTripleAttention", "X", "sMLP"),
    ("triple", "MultiheadTripleAttention", "X", "Mark"),
    ("share_a", "MultiheadAttentionShareA", "V", "sMLP"),
    ("share_v", "MultiheadAttentionShareV", "QK", "sMLP"),
])
def test_attention_branches_match_the_official_module(variant, official_cls, loc, masking):
    official_mod = _official_attn()
    torch.manual_seed(0)
    layer = KSEncoderLayer(E, HEADS, 64, 0.0, KSOptions(variant=variant, masking_loc=loc, token_masking=masking))
    layer = layer.double().eval()
    official = getattr(official_mod, official_cls)(E, HEADS, dropout=0.0).double().eval()
    with torch.no_grad():
        # Unit-scale activations (std E^-1/2 weights), non-zero biases.
        for p in (official.in_proj_weight, official.out_proj.weight):
            p.normal_(std=E ** -0.5)
        official.in_proj_bias.normal_(std=0.1)
        official.out_proj.bias.normal_(std=0.1)
        layer.self_attn.in_proj_weight.copy_(official.in_proj_weight)
        layer.self_attn.in_proj_bias.copy_(official.in_proj_bias)
        layer.self_attn.out_proj.load_state_dict(official.out_proj.state_dict())
    src, pos, fg, padding = _inputs()
    teacher = layer.teacher_inputs(src, pos, fg)
    with torch.no_grad():
        ours, weights = layer.self_attn(src + pos, src + pos, src, teacher, key_padding_mask=padding,
                                        need_weights=True)
        seq = {k: v.transpose(0, 1) for k, v in teacher.items()}  # official: sequence-first
        kwargs = {"query_teacher": seq["q_t"], "key_teacher": seq["k_t"], "value_teacher": seq["v_t"]}
        outs, maps, _ = official((src + pos).transpose(0, 1), (src + pos).transpose(0, 1), src.transpose(0, 1),
                                 key_padding_mask=padding, need_weights=True, average_attn_weights=False, **kwargs)
    outs = [o.transpose(0, 1) for o in outs]
    assert len(outs) == len(ours)
    for mine, theirs in zip(ours, outs):
        # Padded query rows included: they are computed, just never attended to.
        torch.testing.assert_close(mine, theirs, rtol=0, atol=TOL)
    torch.testing.assert_close(weights[0], maps[0], rtol=0, atol=TOL)
    if variant != "share_a":
        torch.testing.assert_close(weights[1], maps[1], rtol=0, atol=TOL)


def test_smlp_matches_the_official_token_split():
    """replic's sMLP (where(fg, ReLU(Linear(x)), x)) against the official loop over images."""
    folder = Path(ROOT) / "projects" / "ks_detr" / "modeling" / "ks_utils" / "smlp.py"
    spec = importlib.util.spec_from_file_location("ksdetr_official_smlp", folder)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    official = module.sMLP(embed_dim=E).double()
    layer = KSEncoderLayer(E, HEADS, 64, 0.0, KSOptions()).double()
    with torch.no_grad():
        layer.smlp.linear.load_state_dict(official.token_split_conv.linear[0].state_dict())
    src, _, fg, padding = _inputs()
    theirs = official(src.transpose(0, 1), padding, {"fg_gt": fg.t()})["x"].transpose(0, 1)
    # The official module excludes padding itself; replic's grid mask already has padding at 0.
    ours = layer.modify_tokens(src, fg * (~padding).to(fg.dtype))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)

"""Optional parity with the official KS-DETR attention (edocanonymous/KS-DETR).

Set ``REPLIC_OFFICIAL_KSDETR`` to a checkout (or ``git archive``) of the official repository
(HEAD df0f2f6e5c3c11c5e54fa55cfc6a452c3456c978). Only torch-only files of
``projects/ks_detr/modeling/`` are imported, each folder as a standalone package whose
``__init__.py`` is not run (those import detectron2 / detrex): ``layers/attn/`` (the attention
modules), ``layers/attention.py`` (``get_self_attn_q_k_v``: the teacher's q/k/v per masking
location) and ``ks_utils/{ksgt,smlp,gt_mask_generator}.py`` (the GT-mask resize and the token
modification). Compared, both sides in float64, given the same weights and inputs:

* the GT canvas resized to the token grid (``resize_ksgt_target`` vs ``mask_on_grid``), with a
  foreground that reaches into padding tokens;
* the teacher inputs q_t/k_t/v_t for every masking location × sMLP/Mark;
* all branch outputs of ``MultiheadTripleAttention`` (sMLP and Mark),
  ``MultiheadAttentionShareA`` and ``MultiheadAttentionShareV`` and their attention maps, on both
  of replic's paths: the explicit-matmul one (``need_weights=True``: maps returned) and the fused
  ``scaled_dot_product_attention`` one that training runs (``need_weights=False``).

Unit-scale activations; within 1e-10 absolute (the two sides differ only by reduction order:
measured worst ~1e-15 in float64; in float32 they differ by ~1e-6, a margin that depends on the
CPU). One documented difference: the official ``MarkFg1Bg0`` also writes the mask into padding
tokens, replic's Mark does not (docs/ks_detr.md), so Mark inputs and outputs are compared on the
valid tokens and query rows, and the difference itself is asserted.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from replic.methods.ks_detr import KSEncoderLayer, KSOptions, mask_on_grid

ROOT = os.environ.get("REPLIC_OFFICIAL_KSDETR")
pytestmark = pytest.mark.skipif(not ROOT, reason="set REPLIC_OFFICIAL_KSDETR to an official KS-DETR checkout")
E, HEADS, B = 32, 4, 2
GRID = (4, 5)  # token grid h × w: N = 20 tokens
N = GRID[0] * GRID[1]
TOL = 1e-10
OFFICIAL_MASKING = {"sMLP": "sMLP", "Mark": "MarkFg1Bg0"}
MODELING = ("projects", "ks_detr", "modeling")


def _official_attn():
    """The official attn/ package imported on its own (its relative imports stay inside it)."""
    folder = Path(ROOT).joinpath(*MODELING, "layers", "attn")
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


def _official_module(folder: str, module: str):
    """``modeling/<folder>/<module>.py`` as a submodule of a stand-in package whose __init__ is not run."""
    package = f"ksdetr_official_{folder.replace('/', '_')}"
    if package not in sys.modules:
        path = Path(ROOT).joinpath(*MODELING, *folder.split("/"))
        if not (path / f"{module}.py").is_file():
            pytest.fail(f"REPLIC_OFFICIAL_KSDETR={ROOT}: no {path}/{module}.py")
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(path)]
        sys.modules[package] = stand_in
    return importlib.import_module(f"{package}.{module}")


def _inputs():
    """Tokens (B, N, E), a GT canvas (B, 16, 20) and token padding (B, N) where image 1's foreground
    reaches into its padding tokens (grid column 4), so both sides' padding handling is exercised."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    pos = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    canvas = torch.zeros(B, 16, 20, dtype=torch.float64)
    canvas[0, 2:10, 3:13] = 1
    canvas[1, 4:16, 10:20] = 1  # up to the canvas' right edge
    padding = torch.zeros(B, *GRID, dtype=torch.bool)
    padding[1, :, 4] = True
    return src, pos, canvas, padding.flatten(1)


def _foreground(canvas: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(replic's token mask (B, N), the official one (N, B)), checked equal off the padding."""
    official = _official_module("ks_utils", "gt_mask_generator").resize_ksgt_target(
        {"fg_gt": canvas}, GRID)["fg_gt"].to(torch.float64)
    ours = mask_on_grid(canvas, GRID, padding).to(torch.float64)
    assert (official.t().bool() & padding).any(), "the test needs foreground on padding tokens"
    torch.testing.assert_close(ours, official.t() * (~padding).to(official.dtype), rtol=0, atol=0)
    return ours, official


def _official_teacher_inputs(layer: KSEncoderLayer, masking: str, loc: str, src, pos, fg_official, padding):
    """The official ``get_self_attn_q_k_v`` with a ``KSGT`` set as the detector sets it; (B, N, E) each."""
    ksgt_mod = _official_module("ks_utils", "ksgt")
    attention = _official_module("layers", "attention")
    ksgt = ksgt_mod.KSGT(gt_fg_bg_mask_criterion="Fg1Bg0", embed_dim=E, with_smlp=masking == "sMLP",
                         encoder_token_masking=OFFICIAL_MASKING[masking], encoder_token_masking_loc=loc).double()
    if masking == "sMLP":
        with torch.no_grad():
            ksgt.smlp_module.token_split_conv.linear[0].load_state_dict(layer.smlp.linear.state_dict())
    ksgt.ksgt_targets = {"fg_gt": fg_official}  # (N, B), as set_ksgt_targets leaves it
    ksgt.mask = padding                          # (B, N) token padding, as the transformer sets it
    q, k, v = attention.get_self_attn_q_k_v(src.transpose(0, 1), pos.transpose(0, 1), ksgt=ksgt)
    return {"q_t": q.transpose(0, 1), "k_t": k.transpose(0, 1), "v_t": v.transpose(0, 1)}


def _layer(variant: str, loc: str, masking: str) -> KSEncoderLayer:
    torch.manual_seed(0)
    layer = KSEncoderLayer(E, HEADS, 64, 0.0, KSOptions(variant=variant, masking_loc=loc, token_masking=masking))
    layer = layer.double().eval()
    if layer.smlp is not None:
        with torch.no_grad():
            layer.smlp.linear.bias.normal_(std=0.1)  # sMLP output with negative and positive entries
    return layer


@pytest.mark.parametrize("masking", ["sMLP", "Mark"])
@pytest.mark.parametrize("loc", ["X", "Q", "K", "V", "QK", "KV"])
def test_teacher_inputs_match_the_official_get_self_attn_q_k_v(loc, masking):
    layer = _layer("triple", loc, masking)
    src, pos, canvas, padding = _inputs()
    fg, fg_official = _foreground(canvas, padding)
    with torch.no_grad():
        ours = layer.teacher_inputs(src, pos, fg)
        theirs = _official_teacher_inputs(layer, masking, loc, src, pos, fg_official, padding)
    valid = ~padding
    modified = {"q_t": "Q" in loc or loc == "X", "k_t": "K" in loc or loc == "X", "v_t": "V" in loc or loc == "X"}
    for key in ("q_t", "k_t", "v_t"):
        if masking == "sMLP":  # both exclude padding tokens: equal everywhere
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=TOL, msg=key)
        else:
            torch.testing.assert_close(ours[key][valid], theirs[key][valid], rtol=0, atol=TOL, msg=key)
            # The documented difference: official Mark writes the mask into padding tokens as well.
            on_pad = fg_official.t().bool() & padding
            if modified[key]:
                mark = theirs[key][..., -1] - (pos[..., -1] if key != "v_t" else 0)
                torch.testing.assert_close(mark[on_pad], torch.ones_like(mark[on_pad]), rtol=0, atol=TOL, msg=key)
                assert not torch.equal(ours[key][on_pad], theirs[key][on_pad]), key
            else:
                torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=TOL, msg=key)
        assert modified[key] == (not torch.equal(ours[key], src + pos if key != "v_t" else src)), key


@pytest.mark.parametrize("need_weights", [True, False], ids=["explicit", "fused_sdpa"])
@pytest.mark.parametrize("variant,official_cls,loc,masking", [
    ("triple", "MultiheadTripleAttention", "X", "sMLP"),
    ("triple", "MultiheadTripleAttention", "X", "Mark"),
    ("share_a", "MultiheadAttentionShareA", "V", "sMLP"),
    ("share_v", "MultiheadAttentionShareV", "QK", "sMLP"),
])
def test_attention_branches_match_the_official_module(variant, official_cls, loc, masking, need_weights):
    """Each side builds its own teacher inputs from the same GT canvas (official: get_self_attn_q_k_v
    with a KSGT), then runs its own attention; need_weights=False is replic's training path (SDPA)."""
    official_mod = _official_attn()
    layer = _layer(variant, loc, masking)
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
    src, pos, canvas, padding = _inputs()
    fg, fg_official = _foreground(canvas, padding)
    with torch.no_grad():
        teacher = layer.teacher_inputs(src, pos, fg)
        ours, weights = layer.self_attn(src + pos, src + pos, src, teacher, key_padding_mask=padding,
                                        need_weights=need_weights)
        seq = {k: v.transpose(0, 1) for k, v in _official_teacher_inputs(
            layer, masking, loc, src, pos, fg_official, padding).items()}  # official: sequence-first
        kwargs = {"query_teacher": seq["q_t"], "key_teacher": seq["k_t"], "value_teacher": seq["v_t"]}
        outs, maps, _ = official((src + pos).transpose(0, 1), (src + pos).transpose(0, 1), src.transpose(0, 1),
                                 key_padding_mask=padding, need_weights=True, average_attn_weights=False, **kwargs)
    outs = [o.transpose(0, 1) for o in outs]
    assert len(outs) == len(ours)
    # Padded query rows are computed, never attended to; with Mark their teacher query differs
    # (the official mark reaches padding tokens), so Mark compares the valid rows.
    rows = torch.ones_like(padding) if masking == "sMLP" else ~padding
    for mine, theirs in zip(ours, outs):
        torch.testing.assert_close(mine[rows], theirs[rows], rtol=0, atol=TOL)
    if need_weights:
        torch.testing.assert_close(weights[0], maps[0], rtol=0, atol=TOL)
        if variant != "share_a":
            torch.testing.assert_close(weights[1].transpose(1, 2)[rows], maps[1].transpose(1, 2)[rows],
                                       rtol=0, atol=TOL)
    else:
        assert weights is None  # the fused path returns no maps: the outputs above are SDPA's


def test_smlp_matches_the_official_token_split():
    """replic's sMLP (where(fg, ReLU(Linear(x)), x)) against the official loop over images."""
    module = _official_module("ks_utils", "smlp")
    official = module.sMLP(embed_dim=E).double()
    layer = KSEncoderLayer(E, HEADS, 64, 0.0, KSOptions()).double()
    with torch.no_grad():
        layer.smlp.linear.load_state_dict(official.token_split_conv.linear[0].state_dict())
    src, _, canvas, padding = _inputs()
    fg, fg_official = _foreground(canvas, padding)
    theirs = official(src.transpose(0, 1), padding, {"fg_gt": fg_official})["x"].transpose(0, 1)
    # The official module excludes padding itself; replic's grid mask already has padding at 0.
    ours = layer.modify_tokens(src, fg)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)

"""Attention extraction on tiny random-weight models (built with build_model), loading, and the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from replic.config import ConfigError, to_dict
from replic.data import DataConfig, collate_fn, generate_synthetic_coco
from replic.engine.config import ExperimentConfig
from replic.models.build import build_model
from replic.models.config import ModelConfig
from replic.viz.attention import extract_attention
from replic.viz.loading import load_images, load_model_for_viz

HEADS = 4
QUERIES = 10


def tiny_config(arch: str = "conditional_detr") -> ModelConfig:
    return ModelConfig(arch=arch, backbone="resnet18", hidden_dim=32, nheads=HEADS, enc_layers=1, dec_layers=2,
                       dim_feedforward=64, num_queries=QUERIES, num_classes=5)


@pytest.fixture(scope="module", params=["conditional_detr", "detr"])
def tiny_model(request):
    torch.manual_seed(0)
    model = build_model(tiny_config(request.param))
    model.eval()
    return request.param, model


def _padded_batch():
    """Two images of different shapes: each is padded (bottom for one, right for the other)."""
    gen = torch.Generator().manual_seed(1)
    items = []
    for (h, w), orig, image_id in [((96, 64), (192, 128), 11), ((64, 224), (64, 224), 12)]:
        target = {"size": torch.tensor([h, w]), "orig_size": torch.tensor(orig), "image_id": torch.tensor(image_id)}
        items.append((torch.randn(3, h, w, generator=gen), target))
    return collate_fn(items)


def test_shapes_normalisation_and_padding(tiny_model):
    arch, model = tiny_model
    batch = _padded_batch()
    results = extract_attention(model, batch.images, batch.mask, batch.targets, num_queries=3)
    assert len(results) == 2
    fh, fw = 3, 7  # 96 x 224 padded canvas at stride 32
    for res, (valid_rows, valid_cols) in zip(results, [(3, 2), (2, 7)]):
        assert res.cross_attn.shape == (3, HEADS, fh, fw)
        assert res.geometry.feature_size == (fh, fw)
        assert res.geometry.stride == 32
        expected_pad = torch.ones(fh, fw, dtype=torch.bool)
        expected_pad[:valid_rows, :valid_cols] = False
        assert torch.equal(res.key_padding, expected_pad)
        maps = [res.cross_attn] + ([res.cross_attn_spatial] if arch == "conditional_detr" else [])
        for m in maps:
            # Every (query, head) row is a distribution over the non-padded keys only.
            assert torch.allclose(m[..., ~res.key_padding].sum(-1), torch.ones(3, HEADS), atol=1e-5)
            assert torch.all(m[..., res.key_padding] == 0)
            assert torch.all(m >= 0)
        if arch == "detr":
            assert res.cross_attn_spatial is None
        else:
            # The spatial-only map is a different distribution from the full one.
            assert not torch.allclose(res.cross_attn_spatial, res.cross_attn)


def test_top_queries_boxes_and_layers_follow_the_model_outputs(tiny_model):
    arch, model = tiny_model
    batch = _padded_batch()
    with torch.no_grad():
        out = model(batch.images, batch.mask, return_attention=True)
    for layer in (-1, 0):
        results = extract_attention(model, batch.images, batch.mask, batch.targets, layer=layer, num_queries=4)
        head_out = out if layer == -1 else out["aux_outputs"][0]
        probs = (head_out["pred_logits"].softmax(-1)[..., :-1] if arch == "detr"
                 else head_out["pred_logits"].sigmoid())
        for b, res in enumerate(results):
            scores = probs[b].max(-1).values
            expected = torch.sort(scores, descending=True).values[:4]
            assert torch.allclose(res.scores, expected)
            assert torch.allclose(res.boxes_cxcywh, head_out["pred_boxes"][b, res.query_indices])
            full = out["attention"][layer]["cross_attn"][b][:, res.query_indices]  # (M, K, HW)
            assert torch.allclose(res.cross_attn.flatten(-2), full.transpose(0, 1))
            h, w = batch.targets[b]["orig_size"].tolist()
            cx, cy, bw, bh = res.boxes_cxcywh[0].tolist()
            assert res.boxes_xyxy[0].tolist() == pytest.approx([(cx - bw / 2) * w, (cy - bh / 2) * h,
                                                                (cx + bw / 2) * w, (cy + bh / 2) * h], rel=1e-5)


def test_explicit_query_indices(tiny_model):
    _, model = tiny_model
    batch = _padded_batch()
    picks = [torch.tensor([7, 2]), torch.tensor([0])]
    results = extract_attention(model, batch.images, batch.mask, batch.targets, query_indices=picks)
    with torch.no_grad():
        out = model(batch.images, batch.mask, return_attention=True)
    for b, res in enumerate(results):
        assert res.query_indices.tolist() == picks[b].tolist()
        expected = out["attention"][-1]["cross_attn"][b][:, picks[b]].transpose(0, 1)
        assert torch.allclose(res.cross_attn.flatten(-2), expected)


def test_bad_arguments_are_rejected(tiny_model):
    _, model = tiny_model
    batch = _padded_batch()
    with pytest.raises(ValueError, match="layer 2 out of range"):
        extract_attention(model, batch.images, batch.mask, batch.targets, layer=2)
    with pytest.raises(ValueError, match="targets"):
        extract_attention(model, batch.images, batch.mask, batch.targets[:1])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A synthetic dataset and a run dir holding a random-weight Conditional DETR and its config."""
    root = tmp_path_factory.mktemp("viz")
    paths = generate_synthetic_coco(root / "data", n_train=1, n_val=2, size=96, seed=0)
    data = DataConfig(root=str(paths["root"]), val_size=64, val_max_size=96, num_workers=0)
    exp = ExperimentConfig(name="tiny_cdetr", data=data, model=tiny_config())
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(exp)))
    torch.manual_seed(0)
    model = build_model(exp.model)
    torch.save({"model": model.state_dict()}, run / "checkpoint_final.pt")
    return run, paths, model


def test_load_model_for_viz_run_and_converted_checkpoints(tiny_run, tmp_path):
    run, paths, model = tiny_run
    vm = load_model_for_viz(run / "checkpoint_final.pt")
    assert vm.name == "tiny_cdetr"
    assert vm.data_config is not None and vm.data_config.val_size == 64
    assert not vm.softmax
    for key, value in model.state_dict().items():
        assert torch.equal(vm.model.state_dict()[key], value), key
    # The engine stores the resolved experiment in the checkpoint: no config.yaml needed beside it.
    engine_style = tmp_path / "engine" / "checkpoint_final.pt"
    engine_style.parent.mkdir()
    exp = yaml.safe_load((run / "config.yaml").read_text())
    torch.save({"model": model.state_dict(), "model_config": exp["model"], "config": exp}, engine_style)
    vm_engine = load_model_for_viz(engine_style)
    assert vm_engine.name == "tiny_cdetr" and vm_engine.data_config.val_size == 64
    # A converted official checkpoint carries its model config inside.
    converted = tmp_path / "converted.pt"
    torch.save({"model": model.state_dict(), "model_config": to_dict(tiny_config())}, converted)
    vm2 = load_model_for_viz(converted)
    assert vm2.model_config.arch == "conditional_detr" and vm2.data_config is None
    # The same, converted to safetensors (config as JSON metadata).
    from replic.models.convert import write_replic_checkpoint

    safetensors = tmp_path / "converted.safetensors"
    write_replic_checkpoint(safetensors, model.state_dict(), to_dict(tiny_config()), {"format": "test"})
    vm3 = load_model_for_viz(safetensors)
    assert torch.equal(vm3.model.state_dict()["class_embed.weight"], model.state_dict()["class_embed.weight"])
    # A config that does not match the weights names the problem.
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": model.state_dict(), "model_config": to_dict(tiny_config("detr"))}, wrong)
    with pytest.raises(ValueError, match="do not match"):
        load_model_for_viz(wrong)
    bare = tmp_path / "bare" / "ckpt.pt"
    bare.parent.mkdir()
    torch.save({"model": model.state_dict()}, bare)
    with pytest.raises(ConfigError, match="pass --config"):
        load_model_for_viz(bare)


def test_load_images_resizes_and_keeps_originals(tiny_run, tmp_path):
    _, paths, _ = tiny_run
    data = DataConfig(root=str(paths["root"]), val_size=64, val_max_size=96)
    picture = tmp_path / "wide.png"
    Image.fromarray(np.full((50, 120, 3), 128, dtype=np.uint8)).save(picture)
    batch = load_images(["@0", str(picture)], data)
    assert batch.originals[1].shape == (50, 120, 3)
    assert batch.targets[1]["orig_size"].tolist() == [50, 120]
    h, w = batch.targets[1]["size"].tolist()
    assert max(h, w) <= 97 and (h == 64 or w >= 96)
    assert batch.images.shape[-2:] == batch.mask.shape[-2:]
    first_id = batch.targets[0]["image_id"].item()
    assert batch.originals[0].shape[:2] == tuple(batch.targets[0]["orig_size"].tolist())
    assert load_images([str(first_id)], data).targets[0]["image_id"].item() == first_id
    with pytest.raises(ValueError, match="only 2 images"):
        load_images(["@5"], data)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_images(["nothing.jpg"], data)


def test_cli_attention_and_extremity(tiny_run, tmp_path):
    from replic.cli import main

    run, _, _ = tiny_run
    ckpt = str(run / "checkpoint_final.pt")
    out = tmp_path / "figs"
    assert main(["viz", "attention", "--checkpoint", ckpt, "--image", "@0", "--out", str(out),
                 "--queries", "2", "--baseline-checkpoint", ckpt]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 * 4  # per query: heads_full, heads_spatial, spatial_vs_full, vs_<baseline>
    assert any(n.endswith("_spatial_vs_full.png") for n in names)
    assert any("_vs_tiny_cdetr" in n for n in names)
    csv = tmp_path / "extremity.csv"
    per_query = tmp_path / "per_query.csv"
    assert main(["viz", "extremity", "--checkpoint", ckpt, "--images", "2", "--queries", "3",
                 "--out", str(csv), "--per-query", str(per_query)]) == 0
    table = pd.read_csv(csv)
    assert list(table["head"]) == list(range(HEADS))
    assert set(table["map"]) == {"spatial"}
    fractions = table[["left", "right", "top", "bottom", "core", "outside"]].sum(axis=1)
    assert np.allclose(fractions, 1.0, atol=1e-3)
    rows = pd.read_csv(per_query)
    assert len(rows) <= 2 * 3 * HEADS and len(rows) > 0
    assert main(["viz", "extremity", "--checkpoint", ckpt, "--band", "1.5", "--out", str(csv)]) == 2


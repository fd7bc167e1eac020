"""Frozen-backbone feature cache (train.feature_cache): same detector outputs as the uncached path,
the same flips, exact resume, and a cache that is never used stale."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from replic.config import ConfigError
from replic.data.collate import collate_fn
from replic.data.synth import generate_synthetic_coco
from replic.engine.config import load_experiment
from replic.engine.feature_cache import CachedFeatureDataset, cache_inputs, cache_key, load_or_build
from replic.engine.sampling import SeededDataset
from replic.engine.train import Trainer
from replic.models.build import build_model

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "experiments" / "cdetr_r50_50ep.yaml"
# Float tolerance of "same outputs": the cached maps are NCHW copies of the channels-last maps,
# so input_proj may sum in another order.
ATOL = 1e-5


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    # Synthetic images have varied aspect ratios: batches mix sizes (padding).
    return generate_synthetic_coco(tmp_path_factory.mktemp("mini_data"), n_train=12, n_val=4, size=160)["root"]


def _config(data_root: Path, cache_dir: Path, **train: object):
    overrides = {
        "data": {"root": str(data_root)},
        "model": {"pretrained_backbone": "none", "hidden_dim": 32, "enc_layers": 1, "dec_layers": 2,
                  "dim_feedforward": 64, "num_queries": 10},
        "train": {"feature_cache_dir": str(cache_dir), "batch_size": 4, "epochs": 3, "lr_drop": 2,
                  "eval_every": 0, "log_every": 1, "eval_at_end": False, **train},
    }
    return load_experiment(EXPERIMENT, "mini", overrides)


@pytest.fixture(scope="module")
def cached(data_root, tmp_path_factory):
    """(cfg, detector in eval mode, the image dataset, the cached dataset, cache info)."""
    from replic.data import build_dataset

    cfg = _config(data_root, tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    detector = build_model(cfg.model).eval()
    images = build_dataset(cfg.data, "train")
    cache, info = load_or_build(cfg, images, detector.backbone[0], torch.device("cpu"), progress=False)
    return cfg, detector, images, CachedFeatureDataset(cache, cfg.data.hflip_prob), info


def _assert_outputs_close(a: dict, b: dict) -> None:
    for key in ("pred_logits", "pred_boxes", "memory", "reference_points"):
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0, msg=key)
    for la, lb in zip(a["aux_outputs"], b["aux_outputs"]):
        torch.testing.assert_close(la["pred_boxes"], lb["pred_boxes"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cached_sample_draws_the_flip_of_the_uncached_transform_and_gives_its_outputs(cached):
    cfg, detector, images, features, _ = cached
    plain, fast = SeededDataset(images, cfg.seed), SeededDataset(features, cfg.seed)
    flips = set()
    for key in [(e, i) for e in range(3) for i in range(len(images))]:
        image, target = plain[key]
        maps, cached_target = fast[key]
        assert target.keys() == cached_target.keys()
        for name, value in target.items():
            assert torch.equal(value, cached_target[name]), (key, name)
        flips.add(cached_target is features.targets[2 * key[1] + 1])  # which (image, flip) entry
        if key[0] == 0 and key[1] < 4:
            uncached = detector(*_image_batch([(image, target)]))
            batch = CachedFeatureDataset.collate_fn([(maps, cached_target)])
            _assert_outputs_close(uncached, detector(batch.images, batch.mask))
    assert flips == {False, True}  # both flips were drawn and matched


def _image_batch(items):
    batch = collate_fn(items)
    return batch.images, batch.mask


@torch.no_grad()
def test_mixed_size_cached_batch_gives_each_image_its_own_uncached_outputs(cached):
    cfg, detector, images, features, _ = cached
    keys = [(0, i) for i in range(6)]
    plain, fast = SeededDataset(images, cfg.seed), SeededDataset(features, cfg.seed)
    items = [fast[k] for k in keys]
    sizes = {tuple(t["size"].tolist()) for _, t in items}
    assert len(sizes) > 1, "the test needs a batch with padding"
    batch = CachedFeatureDataset.collate_fn(items)
    together = detector(batch.images, batch.mask)
    assert batch.mask.shape == collate_fn([plain[k] for k in keys]).mask.shape
    for i, key in enumerate(keys):
        alone = detector(*_image_batch([plain[key]]))
        torch.testing.assert_close(together["pred_logits"][i], alone["pred_logits"][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(together["pred_boxes"][i], alone["pred_boxes"][0], atol=1e-4, rtol=0)


def test_cache_key_changes_with_weights_data_and_transform(cached, data_root, tmp_path):
    cfg, detector, images, _, info = cached
    backbone = detector.backbone[0]
    assert cache_key(cache_inputs(cfg, images, backbone)) == info["key"]
    # Other backbone weights (one value of one tensor).
    other = build_model(cfg.model).backbone[0]
    other.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        next(iter(other.parameters()))[0, 0, 0, 0] += 1e-3
    assert cache_key(cache_inputs(cfg, images, other)) != info["key"]
    # Other transform.
    resized = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_scales=[112]))
    assert cache_key(cache_inputs(resized, images, backbone)) != info["key"]
    # Other image bytes (a copy of the data with one image file changed).
    import shutil

    from replic.data import build_dataset

    copy = tmp_path / "data"
    shutil.copytree(data_root, copy)
    first = sorted((copy / "train2017").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    changed = build_dataset(dataclasses.replace(cfg.data, root=str(copy)), "train")
    assert cache_key(cache_inputs(cfg, changed, backbone)) != info["key"]


def test_a_foreign_file_under_the_key_name_is_refused(cached, tmp_path):
    cfg, detector, images, _, info = cached
    moved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, feature_cache_dir=str(tmp_path)))
    torch.save({"key": "0" * 64, "maps": {}, "targets": []}, tmp_path / f"{info['key']}.pt")
    with pytest.raises(ValueError, match="stale or foreign"):
        load_or_build(moved, images, detector.backbone[0], torch.device("cpu"), progress=False)


@pytest.mark.parametrize("override, key", [
    ({"model": {"train_backbone": True}}, "train_backbone"),
    ({"data": {"train_scales": [112, 128]}}, "train_scales"),
    ({"data": {"resize_only_prob": 0.5}}, "resize_only_prob"),
])
def test_config_refuses_a_cache_that_cannot_match_the_uncached_run(data_root, tmp_path, override, key):
    from replic.config import deep_merge

    base = {"data": {"root": str(data_root)}, "model": {"pretrained_backbone": "none"},
            "train": {"feature_cache_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=key):
        load_experiment(EXPERIMENT, "mini", deep_merge(base, override))


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint_final.pt", weights_only=True)["model"]


def test_cached_training_resumes_exactly_and_records_the_cache(data_root, tmp_path, monkeypatch):
    cfg = _config(data_root, tmp_path / "cache", max_steps=7)
    reference = tmp_path / "reference"
    assert Trainer(cfg, reference, progress=False).run() == 0
    provenance = json.loads((reference / "provenance.json").read_text())
    assert provenance["feature_cache"]["built_by_this_run"] is True
    assert Path(provenance["feature_cache"]["path"]).is_file()

    # Stop after step 4 (mid-epoch: 3 steps per epoch) as SIGTERM would, then resume.
    original = Trainer._train_step

    def stop_after_four(self, batch):
        values = original(self, batch)
        if self.global_step == 3:  # incremented after this returns: the stop lands at step 4
            self.stop.signum = 15
        return values

    monkeypatch.setattr(Trainer, "_train_step", stop_after_four)
    out = tmp_path / "resumed"
    assert Trainer(cfg, out, progress=False).run() == 75
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert Trainer(cfg, out, resume=True, progress=False).run() == 0
    assert json.loads((out / "provenance.json").read_text())["feature_cache"]["built_by_this_run"] is False
    a, b = _final_weights(reference), _final_weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("experiment, reason", [
    ("cdetr_r50_50ep", None),
    ("d3etr_cdetr_r50_12ep_adaptive", None),  # its teacher shares the mini backbone (the method checks)
    ("fcos_r50_24ep", None),  # the mini overlay's CNN section turns the cache off
])
def test_runs_that_cannot_use_cached_features_say_why(data_root, experiment, reason):
    from replic.engine.feature_cache import unsupported_reason

    path = REPO / "configs" / "experiments" / f"{experiment}.yaml"
    if not path.is_file():
        pytest.skip(f"{path.name} not in this checkout")
    cfg = load_experiment(path, "mini", {"data": {"root": str(data_root)}})
    if experiment.startswith("fcos"):
        assert cfg.train.feature_cache is False and unsupported_reason(cfg) is not None
        return
    assert cfg.train.feature_cache
    found = unsupported_reason(cfg)
    assert (found is None) if reason is None else (reason in found)

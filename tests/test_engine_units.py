"""Unit tests of the engine parts: optimizer groups, data order, RNG capture, checkpoints."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from replic.engine.checkpoint import atomic_torch_save, capture_rng_state, load_checkpoint, restore_rng_state
from replic.engine.config import TrainConfig
from replic.engine.optim import build_optimizer, build_scheduler, parameter_groups
from replic.engine.sampling import EpochBatchSampler, SeededDataset, eval_batches


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone[1].weight.requires_grad_(False)  # frozen parameters are not optimised
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)
        self.query_embed = nn.Embedding(3, 2)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_official_groups_decay_everything_and_split_the_backbone():
    model = _Toy()
    groups = parameter_groups(model, TrainConfig())
    assert [g["name"] for g in groups] == ["main", "backbone"]
    assert _names(model, groups[1]) == {"backbone.0.weight", "backbone.0.bias", "backbone.1.bias"}
    assert groups[1]["lr"] == 1e-5 and groups[0]["lr"] == 1e-4
    assert "norm.weight" in _names(model, groups[0]) and "query_embed.weight" in _names(model, groups[0])
    assert all(g["weight_decay"] == 1e-4 for g in groups)


def test_detrex_style_norm_decay():
    model = _Toy()
    groups = {g["name"]: g for g in parameter_groups(model, TrainConfig(weight_decay_norm=0.0))}
    assert _names(model, groups["main_norm"]) == {"norm.weight", "norm.bias"}
    assert _names(model, groups["backbone_norm"]) == {"backbone.1.bias"}
    assert groups["main_norm"]["weight_decay"] == 0.0 and groups["main"]["weight_decay"] == 1e-4


def test_step_lr_drops_once_per_epoch_at_lr_drop():
    model = _Toy()
    opt = build_optimizer(model, TrainConfig(lr_drop=2))
    sched = build_scheduler(opt, TrainConfig(lr_drop=2))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])


def test_data_order_depends_only_on_seed_and_epoch_and_resumes_by_skipping():
    full = list(EpochBatchSampler(11, 2, seed=5, epoch=3))
    assert len(full) == 5  # drop_last of the incomplete global batch
    assert full == list(EpochBatchSampler(11, 2, seed=5, epoch=3))
    assert full != list(EpochBatchSampler(11, 2, seed=5, epoch=4))
    assert list(EpochBatchSampler(11, 2, seed=5, epoch=3, start=2)) == full[2:]
    flat = [i for b in full for _, i in b]
    assert len(set(flat)) == len(flat) == 10


def test_two_ranks_together_see_the_single_process_global_batches():
    single = list(EpochBatchSampler(12, 4, seed=1, epoch=0))
    rank0 = list(EpochBatchSampler(12, 2, seed=1, epoch=0, rank=0, world_size=2))
    rank1 = list(EpochBatchSampler(12, 2, seed=1, epoch=0, rank=1, world_size=2))
    assert [a + b for a, b in zip(rank0, rank1)] == single


def test_eval_shards_cover_every_image_once():
    shards = [eval_batches(7, 2, r, 3) for r in range(3)]
    flat = [i for shard in shards for batch in shard for _, i in batch]
    assert flat == list(range(7))


class _RandomItems:
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return torch.rand(()).item(), random.random(), float(np.random.rand())


def test_seeded_items_are_reproducible_and_leave_the_global_rng_alone():
    data = SeededDataset(_RandomItems(), seed=7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    py_before = random.getstate()
    first = data[(2, 1)]
    assert torch.equal(torch.get_rng_state(), before) and random.getstate() == py_before
    assert data[(2, 1)] == first
    assert data[(3, 1)] != first and data[(2, 2)] != first


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.randn(), torch.randn(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.randn(), torch.randn(3))
    atomic_torch_save({"model": {}, "rng": state}, tmp_path / "c.pt")
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.randn(), torch.randn(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="x.pt.*no 'model'"):
        load_checkpoint(tmp_path / "x.pt")


def test_loader_batches_do_not_depend_on_the_number_of_workers():
    from torch.utils.data import DataLoader

    data = SeededDataset(_RandomItems(), seed=3)

    def batches(workers: int) -> list:
        sampler = EpochBatchSampler(4, 2, seed=3, epoch=1)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        return [[tuple(float(x) for x in item) for item in zip(*batch)] for batch in loader]

    assert batches(0) == batches(2)


def test_rank_detection_torchrun_then_slurm_then_single(monkeypatch):
    from replic.engine.distributed import DistInfo, detect

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert detect() == DistInfo(0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert detect() == DistInfo(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win inside a Slurm job
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect() == DistInfo(rank=1, world_size=2, local_rank=1)

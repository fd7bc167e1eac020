"""benchmarks/bench_seed_batch.py compares like with like: the N-seed batched step (vmap over stacked
parameters) and N separate steps give the same losses and gradients (dropout off, float32: measured
~2e-6 of the largest gradient, bound 1e-4), and the check catches seeds whose data got swapped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_batched_seeds_give_each_seeds_own_losses_and_gradients():
    from bench_mini_step import _batch, _build
    from bench_seed_batch import SeedSteps, check_same, seed_maps, seed_models

    _, model, criterion = _build(1)
    feats, mask, targets = _batch()
    steps = SeedSteps(seed_models(model, 2), criterion, seed_maps(feats.maps["C4"], 2), mask, targets,
                      tuple(feats.shape))
    loss_rel, grad_rel = check_same(steps)
    assert loss_rel < 1e-6 and grad_rel < 1e-4
    # The separate steps reading each other's maps: the check sees it.
    _, swapped_grad = check_same(steps, separate_maps=steps.maps.flip(0))
    assert swapped_grad > 1e-3  # measured 7e-3 of the largest gradient, 3,500x the equivalence level

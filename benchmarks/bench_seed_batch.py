"""Several seeds in one process: N mini models trained as one batched model (``torch.func``) vs the same
N steps run one after the other — does batching the seeds pay on a CPU?

The batched form stacks the N models' parameters (``torch.func.stack_module_state``) and maps the
detector over them with ``torch.func.vmap`` (each seed its own weights, its own batch of cached maps
and its own dropout masks: ``randomness="different"``); matching and losses run per seed (the
Hungarian matcher is SciPy's and cannot be mapped), and one backward serves all N. The separate
form is N ordinary steps of the same models. Before timing, both forms are checked to give the same
losses and gradients with dropout off (float32; the largest difference relative to the largest
gradient is printed and must be under ``--tolerance``).

The step and batch are ``bench_mini_step.py``'s (Conditional DETR-R50 row at mini, batch 8, C4 maps
8x10, random weights and maps); blocks are interleaved and medians printed. Noisy machines: rerun
on an idle one before quoting, and say when another job was running.

Usage:
    python benchmarks/bench_seed_batch.py [--seeds 3] [--threads 1] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mini_step import _batch, _build  # noqa: E402  (the same step and batch)


def seed_models(model: torch.nn.Module, seeds: int) -> list[torch.nn.Module]:
    """``seeds`` copies of ``model``, each with its own trainable weights (re-drawn from its seed)."""
    models = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        copy_ = copy.deepcopy(model)
        with torch.no_grad():
            for p in copy_.parameters():
                if p.requires_grad and p.dim() > 1:
                    p.normal_(0.0, 0.02)
        models.append(copy_)
    return models


def seed_maps(maps: torch.Tensor, seeds: int) -> torch.Tensor:
    """(N, B, C, h, w): a different batch of cached maps per seed (their own data order)."""
    g = torch.Generator().manual_seed(123)
    return torch.stack([maps] + [torch.randn(maps.shape, generator=g) for _ in range(seeds - 1)])


class SeedSteps:
    """The N-seed step in both forms; ``batched()`` and ``separate()`` return the total loss."""

    def __init__(self, models, criterion, maps, mask, targets, image_shape) -> None:
        from replic.models.backbone import BackboneFeatures

        self.models, self.criterion, self.maps = models, criterion, maps
        self.mask, self.targets, self.image_shape = mask, targets, image_shape
        self.params, self.buffers = stack_module_state(models)
        template = copy.deepcopy(models[0]).to("meta")

        def detector(params, buffers, c4):
            out = functional_call(template, (params, buffers), (BackboneFeatures({"C4": c4}, image_shape), mask))
            aux = [(a["pred_logits"], a["pred_boxes"]) for a in out["aux_outputs"]]
            return out["pred_logits"], out["pred_boxes"], aux

        self._mapped = vmap(detector, in_dims=(0, 0, 0), randomness="different")
        self._features = BackboneFeatures

    def _loss(self, outputs) -> torch.Tensor:
        losses = self.criterion(outputs, self.targets)
        weights = self.criterion.weight_dict
        return sum(losses[k] * weights[k] for k in losses if k in weights)

    def batched(self) -> torch.Tensor:
        logits, boxes, aux = self._mapped(self.params, self.buffers, self.maps)
        total = logits.new_zeros(())
        for i in range(len(self.models)):
            total = total + self._loss({"pred_logits": logits[i], "pred_boxes": boxes[i],
                                        "aux_outputs": [{"pred_logits": a[0][i], "pred_boxes": a[1][i]} for a in aux]})
        for p in self.params.values():
            p.grad = None
        total.backward()
        return total.detach()

    def separate(self, maps: torch.Tensor | None = None) -> torch.Tensor:
        """N ordinary steps; ``maps`` replaces the seeds' cached maps (a test feeds wrong ones)."""
        total = torch.zeros(())
        for model, c4 in zip(self.models, self.maps if maps is None else maps, strict=True):
            model.zero_grad(set_to_none=True)
            loss = self._loss(model(self._features({"C4": c4}, self.image_shape), self.mask))
            loss.backward()
            total = total + loss.detach()
        return total


def check_same(steps: SeedSteps, separate_maps: torch.Tensor | None = None) -> tuple[float, float]:
    """Both forms with dropout off: (|loss difference| / loss, max gradient difference / max gradient).
    ``separate_maps``: feed the separate form other maps than the batched one (to see the check fail)."""
    for model in steps.models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p_saved, module.p = module.p, 0.0
    steps.params, steps.buffers = stack_module_state(steps.models)  # same values, fresh leaves
    batched, separate = steps.batched(), steps.separate(separate_maps)
    names = list(steps.params)
    worst, largest = 0.0, 0.0
    for i, model in enumerate(steps.models):
        grads = dict(model.named_parameters())
        for name in names:
            mine = grads[name].grad
            stacked = steps.params[name].grad
            if mine is None or stacked is None:
                continue
            worst = max(worst, float((stacked[i] - mine).abs().max()))
            largest = max(largest, float(mine.abs().max()))
    for model in steps.models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = module.p_saved
    return float((batched - separate).abs() / separate.abs()), worst / largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest gradient difference allowed, relative to the largest gradient")
    args = parser.parse_args()

    _, model, criterion = _build(args.threads)
    feats, mask, targets = _batch()
    models = seed_models(model, args.seeds)
    steps = SeedSteps(models, criterion, seed_maps(feats.maps["C4"], args.seeds), mask, targets, tuple(feats.shape))
    loss_rel, grad_rel = check_same(steps)
    print(f"{args.seeds} seeds, {args.threads} thread(s); same function (dropout off): loss {loss_rel:.1e}, "
          f"gradients {grad_rel:.1e} of the largest (tolerance {args.tolerance:g})")
    if not grad_rel < args.tolerance:
        raise SystemExit(f"the batched and separate steps differ: {grad_rel:.2e} > {args.tolerance:g}")
    forms = {f"vmap over {args.seeds} seeds": steps.batched, f"{args.seeds} separate steps": steps.separate}
    for fn in forms.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(args.rounds):
        for name, fn in forms.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    print(f"forward + loss + backward of {args.seeds} seeds, ms (median of {args.rounds} rounds x {args.steps}; min-max)")
    print("| form | ms | min-max |\n|---|---|---|")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} |")
    batched, separate = (statistics.median(v) for v in times.values())
    print(f"speed-up of the batched form: {separate / batched:.2f}x")


if __name__ == "__main__":
    main()

"""The authors' own training loop on fixed batches: run by tests/test_recipe_official_parity.py.

Not a test module (pytest does not collect it). It runs in a subprocess of its own because the
official top-level packages ``models``/``util``/``datasets`` would shadow others, and it imports
nothing from replic. Usage::

    python official_train_loop.py REPO SAMPLES OUT DTYPE [main.py arguments ...]

REPO: a checkout of Atten4Vis/ConditionalDETR or facebookresearch/detr. SAMPLES: a ``torch.save``
file ``{"samples": [(image CxHxW, {"labels", "boxes"}), ...], "samples_per_epoch": n}``. OUT: what
this writes (below). DTYPE: ``float64`` (the model and criterion ``.double()``) or ``float32``.

The official ``main.main(args)`` runs **unmodified**, with ``args`` from its own
``get_args_parser()`` and the given arguments: its ``build_model``, its parameter groups, its
``torch.optim.AdamW`` and per-epoch ``StepLR``, its epoch loop and ``engine.train_one_epoch``
(loss weighting, ``zero_grad``/``backward``/``clip_grad_norm_``/``step``). Only what lies outside
that recipe is replaced, from the outside:

* ``main.build_dataset`` returns SAMPLES, ``main.get_coco_api_from_dataset`` / ``main.evaluate``
  do nothing (no COCO files, no per-epoch evaluation);
* ``torch.utils.data.RandomSampler`` walks SAMPLES in order: epoch e reads samples
  ``[e·n, (e+1)·n)`` (n = samples_per_epoch), so every step gets a new batch in a fixed order;
* ``main.build_model`` calls theirs, then (float64) ``.double()`` on model and criterion, saves the
  initial weights as an official-format checkpoint ``{"model", "args"}`` and wraps the
  criterion's ``forward`` to record each step's loss terms and the weighted total, summed as
  ``engine.train_one_epoch`` sums them;
* ``torch.optim.AdamW`` is a subclass that records, before each step, every parameter group
  (member names, lr, weight decay, betas, eps, amsgrad, maximize);
* ``torch.nn.utils.clip_grad_norm_`` records the pre-clip total norm it returns.

OUT: ``torch.save({"initial": <checkpoint path>, "final": state_dict, "losses": [...],
"terms": [...], "groups": [...], "clip_norms": [...], "weight_dict": {...}, "epochs": n})``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torchvision

RECORD: dict[str, Any] = {"losses": [], "terms": [], "groups": [], "clip_norms": [], "epochs": 0}
NAMES: dict[int, str] = {}  # id(parameter) -> name in the official model


def _import_official(repo: str) -> Any:
    """Their ``main`` module, imported with a torch-2 workaround: their version checks
    break on torch >= 2, so the version strings are patched around the import."""
    sys.path.insert(0, repo)
    real_torch, real_tv = torch.__version__, torchvision.__version__
    torch.__version__ = "1.9.0"  # ConditionalDETR models/attention.py: version check broken on torch >= 2
    torchvision.__version__ = "0.99"  # DETR util/misc.py parses float(version[:3])
    try:
        import util.misc  # noqa: F401
        if os.path.isfile(os.path.join(repo, "models", "attention.py")):  # Conditional DETR only
            import models.attention  # noqa: F401
    finally:
        torch.__version__, torchvision.__version__ = real_torch, real_tv
    import models.backbone as official_backbone

    official_backbone.is_main_process = lambda: False  # pretrained=False: no ImageNet download
    import main as official_main

    return official_main


class _Samples(torch.utils.data.Dataset):
    """The saved samples, as their dataset would return them: (image, target)."""

    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        return self.samples[index]


def _scheduled_sampler(per_epoch: int) -> type:
    """A RandomSampler stand-in: its e-th iteration yields indices [e·n, (e+1)·n)."""

    class ScheduledSampler(torch.utils.data.Sampler):
        def __init__(self, data_source: Any, *args: Any, **kwargs: Any) -> None:
            self.epoch = 0

        def __len__(self) -> int:
            return per_epoch

        def __iter__(self):  # noqa: ANN204
            start = self.epoch * per_epoch
            self.epoch += 1
            RECORD["epochs"] = self.epoch
            return iter(range(start, start + per_epoch))

    return ScheduledSampler


class RecordingAdamW(torch.optim.AdamW):
    """torch's AdamW; records the parameter groups as they stand before each step."""

    def step(self, closure: Any = None) -> Any:
        RECORD["groups"].append([
            {"params": [NAMES[id(p)] for p in g["params"]], "lr": g["lr"],
             "weight_decay": g["weight_decay"], "betas": tuple(g["betas"]), "eps": g["eps"],
             "amsgrad": g["amsgrad"], "maximize": g["maximize"]}
            for g in self.param_groups])
        return super().step(closure)


def main() -> None:
    repo, samples_path, out_path, dtype, *argv = sys.argv[1:]
    torch.set_num_threads(1)  # the same thread count as the test's side
    official_main = _import_official(repo)
    data = torch.load(samples_path, weights_only=True)
    dataset = _Samples(data["samples"])
    parser = argparse.ArgumentParser(parents=[official_main.get_args_parser()])
    args = parser.parse_args(argv)
    initial_path = out_path + ".initial.pth"

    build_model = official_main.build_model

    def build_and_record(args: argparse.Namespace) -> tuple:
        model, criterion, postprocessors = build_model(args)
        if dtype == "float64":
            model.double()
            criterion.double()
        NAMES.update({id(p): n for n, p in model.named_parameters()})
        # The official checkpoint layout (main.py saves {"model", "optimizer", ..., "args"}).
        torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}, "args": args}, initial_path)
        forward = criterion.forward

        def recording_forward(outputs: dict, targets: list) -> dict:
            losses = forward(outputs, targets)
            weights = criterion.weight_dict
            # engine.train_one_epoch: sum(loss_dict[k] * weight_dict[k] for k in loss_dict.keys() if k in weight_dict)
            total = sum(losses[k] * weights[k] for k in losses.keys() if k in weights)
            RECORD["losses"].append(float(total))
            RECORD["terms"].append({k: float(v) for k, v in losses.items()})
            return losses

        criterion.forward = recording_forward
        RECORD["weight_dict"] = {k: float(v) for k, v in criterion.weight_dict.items()}
        RECORD["model"] = model
        return model, criterion, postprocessors

    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters: Any, max_norm: float, *a: Any, **kw: Any) -> torch.Tensor:
        norm = clip(parameters, max_norm, *a, **kw)
        RECORD["clip_norms"].append(float(norm))
        return norm

    official_main.build_model = build_and_record
    official_main.build_dataset = lambda image_set, args: dataset
    official_main.get_coco_api_from_dataset = lambda dataset: None
    official_main.evaluate = lambda *a, **kw: ({}, None)
    torch.utils.data.RandomSampler = _scheduled_sampler(int(data["samples_per_epoch"]))
    torch.optim.AdamW = RecordingAdamW
    torch.nn.utils.clip_grad_norm_ = recording_clip

    official_main.main(args)

    model = RECORD.pop("model")
    torch.save({**RECORD, "initial": initial_path,
                "final": {k: v.detach().clone() for k, v in model.state_dict().items()}}, out_path)


if __name__ == "__main__":
    main()

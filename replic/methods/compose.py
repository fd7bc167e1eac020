"""Several training methods on one student: ``method: [{name: ks_detr, ...}, {name: d3etr, ...}, ...]``.

KS-DETR changes the last encoder layer during training, D³ETR distils the decoder, MasKD distils
features under learned masks: they act on different parts of a DETR, so one step can carry all
three. A composed step is the methods' hooks in the order the config lists them, around **one**
student forward::

    kwargs = {}                                    # each method's model_inputs, merged
    for m in methods: kwargs |= m.model_inputs(student, images, mask, targets)
    outputs = student(images, mask, **kwargs)      # one forward: KS's GT mask, D³ETR's queries ...
    for m in methods: outputs = m.after_forward(student, outputs, images, mask, targets)
    losses = criterion(outputs, targets)           # the set loss + every method's own terms

Each method registers its own loss terms on the criterion (their names differ: ``*_teacher_*``,
``loss_d3etr_*``, ``loss_maskd``), so the composed loss is the plain loss plus the sum of the
methods' terms. Each method's trainable state stays under its name (``method.<name>.…`` in a
checkpoint). A teacher run named by several methods is built once (``teacher_pool``).
Evaluation builds the model and runs it plainly, as for a single method.

Refused before training (``ConfigError`` naming both methods): a method listed twice, a stage
that trains no student (``maskd_tokens``), two methods that both build the model (each swaps its
own layer into the detector), and two methods that set the same argument of the student's
forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from replic.config import ConfigError
from replic.methods.base import TrainingMethod


@dataclass
class ComposedOptions:
    """The parts of a composed method: (method class, its typed options), in config order."""

    parts: list[tuple[type[TrainingMethod], Any]]

    @property
    def names(self) -> list[str]:
        return [cls.name for cls, _ in self.parts]


def _builds_model(cls: type[TrainingMethod]) -> bool:
    return cls.build_model is not TrainingMethod.build_model


def check_composable(options: ComposedOptions) -> None:
    """``ConfigError`` naming the methods when the list cannot run on one student."""
    names = options.names
    if len(names) < 2:
        raise ConfigError(f"method: a list composes two or more methods, got {names}")
    for i, (cls, _) in enumerate(options.parts):
        if cls.name == "none":
            raise ConfigError(f"method[{i}].name: 'none' cannot be composed (leave it out of the list)")
        if not cls.composable:
            raise ConfigError(f"method[{i}].name: '{cls.name}' trains no student and cannot be composed")
        if cls.name in names[:i]:
            raise ConfigError(f"method[{i}].name: '{cls.name}' is listed twice")
    builders = [cls.name for cls, _ in options.parts if _builds_model(cls)]
    if len(builders) > 1:
        raise ConfigError(f"method: {' and '.join(builders)} both build the detector (each swaps its own layer "
                          "in); at most one method of a composition may")
    for i, (a, _) in enumerate(options.parts):
        for b, _ in options.parts[i + 1:]:
            shared = a.model_input_keys & b.model_input_keys
            if shared:
                raise ConfigError(f"method: {a.name} and {b.name} both set the student's forward argument(s) "
                                  f"{sorted(shared)}")


class ComposedMethod(TrainingMethod):
    """Methods listed under ``method`` run on one student (see the module docstring)."""

    name: ClassVar[str] = "composed"
    Options: ClassVar[type] = ComposedOptions

    def __init__(self, cfg: Any, options: ComposedOptions) -> None:
        super().__init__(cfg, options)
        check_composable(options)
        self.parts = nn.ModuleDict({cls.name: cls(cfg, opts) for cls, opts in options.parts})
        pool: dict[str, nn.Module] = {}
        for part in self.parts.values():
            part.teacher_pool = pool  # one frozen teacher per checkpoint, whichever method asks
        # The run's method name, e.g. "ks_detr+d3etr+maskd" (provenance, logs).
        self.name = "+".join(options.names)  # type: ignore[misc]

    @classmethod
    def check_config(cls, cfg: Any, options: ComposedOptions) -> None:
        # (check_composable already ran in parse_method_options, which made ``options``.)
        for part_cls, part_options in options.parts:
            part_cls.check_config(cfg, part_options)

    @property
    def run_dir(self) -> Any:
        return self.__dict__.get("_run_dir")

    @run_dir.setter
    def run_dir(self, value: Any) -> None:
        # The parts find their sibling teacher runs from it (set by build_method after __init__).
        self.__dict__["_run_dir"] = value
        parts = self.__dict__.get("_modules", {}).get("parts")
        for part in parts.values() if parts is not None else ():
            part.run_dir = value

    # ------------------------------------------------------------------ lifecycle
    def check_inputs(self) -> None:
        for part in self.parts.values():
            part.check_inputs()

    def input_files(self) -> dict[str, Path]:
        return {f"method.{name}.{key.removeprefix('method.')}": path
                for name, part in self.parts.items() for key, path in part.input_files().items()}

    def build_model(self) -> nn.Module:
        for part in self.parts.values():
            if _builds_model(type(part)):
                return part.build_model()
        return super().build_model()

    def setup(self, model: nn.Module, criterion: nn.Module, device: torch.device) -> None:
        for part in self.parts.values():
            part.setup(model, criterion, device)

    def feature_cache_reason(self, model: nn.Module) -> str | None:
        for name, part in self.parts.items():
            reason = part.feature_cache_reason(model)
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def frozen_modules(self) -> list[nn.Module]:
        return [module for part in self.parts.values() for module in part.frozen_modules()]

    def distillation_weights(self) -> dict[str, tuple[float, list[str]]]:
        return {f"method.{name}.{option.removeprefix('method.')}": group
                for name, part in self.parts.items() for option, group in part.distillation_weights().items()}

    def provenance(self) -> dict[str, Any]:
        return {"parts": {name: {"name": name, **part.provenance()} for name, part in self.parts.items()}}

    # ------------------------------------------------------------------ step
    def model_inputs(self, model: nn.Module, images: Tensor, mask: Tensor,
                     targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for part in self.parts.values():
            kwargs.update(part.model_inputs(model, images, mask, targets))
        return kwargs

    def after_forward(self, model: nn.Module, outputs: dict[str, Any], images: Tensor, mask: Tensor,
                      targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        for part in self.parts.values():
            outputs = part.after_forward(model, outputs, images, mask, targets)
        return outputs

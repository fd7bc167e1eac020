"""The training-method interface: what a paper's idea adds to plain detector training.

An experiment selects a method in its config (``method: {name: d3etr, ...}``); the engine asks
the method for the model, for extra loss terms and for one training forward, and is otherwise
the same for every method. The default, ``none``, is plain detector training.

Lifecycle, as :class:`replic.engine.train.Trainer` drives it::

    method = build_method(cfg)            # options parsed and checked (ConfigError names the key)
    method.check_inputs()                 # cheap pre-flight checks (teacher file, class count ...)
    model = method.build_model()          # the detector to train (a method may swap a layer)
    method.setup(model, criterion, device)  # load frozen teachers, register loss terms
    outputs = method.forward_train(model, images, mask, targets)   # every training step
    losses = criterion(outputs, targets)  # built-in set loss + the registered terms

A training step is three hooks: :meth:`~TrainingMethod.model_inputs` (keyword arguments the
method asks of the student's forward, e.g. KS-DETR's GT mask, D³ETR's teacher queries),
one student forward, and :meth:`~TrainingMethod.after_forward` (what the method adds to the
outputs: teacher predictions, a feature loss). Methods compose through these hooks
(replic/methods/compose.py: several methods, one student forward).

``method`` is an ``nn.Module``: its own trainable parameters (e.g. MasKD's align convs) are
optimised, all-reduced under DDP and checkpointed (key ``method``) beside the detector's.
Frozen teachers are *not* submodules: they never enter the optimizer, DDP's gradient sync or
the checkpoint (:meth:`hold_frozen`). Evaluation builds the model with :meth:`build_model`
and runs it plainly: no method-specific work happens at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class NoOptions:
    """The ``none`` method has no options."""


class TrainingMethod(nn.Module):
    """Plain detector training; paper methods subclass it and override the hooks they need."""

    name: ClassVar[str] = "none"
    # The dataclass of this method's options (the ``method`` config section minus ``name``).
    Options: ClassVar[type] = NoOptions
    # Whether cached frozen-backbone maps of the student (train.feature_cache) can stand in for the
    # images this method's step reads; a method that runs its own forward on the images says False.
    # (After setup, :meth:`feature_cache_reason` can still decline with a reason.)
    uses_cached_features: ClassVar[bool] = True
    # The keyword arguments of the student's forward that :meth:`model_inputs` sets: two methods
    # setting the same one cannot compose.
    model_input_keys: ClassVar[frozenset[str]] = frozenset()
    # A stage that trains no student (MasKD's token learning) cannot be composed with others.
    composable: ClassVar[bool] = True

    def __init__(self, cfg: Any, options: Any) -> None:
        """``cfg``: the whole ExperimentConfig; ``options``: an instance of :attr:`Options`."""
        super().__init__()
        self.cfg = cfg
        self.options = options
        # The training run's directory (set by the engine; None when only building the model).
        self.run_dir: Any = None
        self._frozen: dict[str, nn.Module] = {}
        # Frozen teachers by checkpoint path; a composition gives all its methods one pool, so a
        # teacher run named by several of them is built and held in memory once.
        self.teacher_pool: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ hooks
    @classmethod
    def check_config(cls, cfg: Any, options: Any) -> None:
        """Cross-section checks of the whole experiment ``cfg`` (e.g. the model has the layer this
        method swaps), run when the config is loaded; raise ``ConfigError`` naming the key. Default: none."""

    def check_inputs(self) -> None:
        """Fail fast (before data and model are built) on bad external inputs. Default: none."""

    def input_files(self) -> dict[str, Path]:
        """Files outside the config whose content shapes the run (a teacher checkpoint, tokens), by
        the config key that names them. The engine records their sha256 in the run directory and
        does not continue a run whose inputs changed (a retrained teacher means a new student run).
        Default: none."""
        return {}

    def build_model(self) -> nn.Module:
        """The detector this method trains and evaluates (default: the config's detector, built by
        its model family: DETR or the torchvision CNN detectors)."""
        from replic.models.families import family_of

        return family_of(self.cfg.model).build_model(self.cfg.model)

    def setup(self, model: nn.Module, criterion: nn.Module, device: torch.device) -> None:
        """Load frozen teachers onto ``device`` and register extra loss terms on ``criterion``."""

    def feature_cache_reason(self, model: nn.Module) -> str | None:
        """Why cached frozen-backbone maps of the student cannot stand in for the images this method
        reads (``train.feature_cache``), after :meth:`setup`; None: they can. Default: they can."""
        return None

    def model_inputs(self, model: nn.Module, images: Tensor, mask: Tensor,
                     targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        """Keyword arguments this method adds to the student's forward this step (keys in
        :attr:`model_input_keys`). Default: none."""
        return {}

    def after_forward(self, model: nn.Module, outputs: dict[str, Any], images: Tensor, mask: Tensor,
                      targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        """What this method adds to the student's outputs (teacher predictions, a feature loss)
        before the criterion sees them. Default: nothing."""
        return outputs

    def forward_train(self, model: nn.Module, images: Tensor, mask: Tensor,
                      targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        """One training forward; the outputs dict goes to the criterion (model contract keys):
        :meth:`model_inputs`, the student's forward, :meth:`after_forward`."""
        kwargs = self.model_inputs(model, images, mask, targets)
        outputs = student_forward(model, images, mask, targets, kwargs)
        return self.after_forward(model, outputs, images, mask, targets)

    def provenance(self) -> dict[str, Any]:
        """Extra facts recorded in the run's provenance (e.g. a teacher checkpoint's sha256)."""
        return {}

    def distillation_weights(self) -> dict[str, tuple[float, list[str]]]:
        """After :meth:`setup`: the distillation-weight options the weight rule sets at a non-paper
        scale (docs/weight_rule.md, :mod:`replic.engine.weight_rule`), as option path -> (its value
        in the config, the criterion keys it weighs). Default: none (no distillation weight, or the
        method's ``weight_rule: false``)."""
        return {}

    # ---------------------------------------------------------------- helpers
    def frozen_teacher(self, ckpt: Any, device: torch.device) -> nn.Module:
        """The frozen teacher of checkpoint ``ckpt`` (a ``TeacherCheckpoint``) on ``device``, held as
        ``teacher``; built once per :attr:`teacher_pool`."""
        from replic.distill.teacher import build_teacher

        key = str(Path(ckpt.path).resolve())
        if key not in self.teacher_pool:
            self.teacher_pool[key] = build_teacher(ckpt, device)
        return self.hold_frozen("teacher", self.teacher_pool[key])

    def hold_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep ``module`` frozen and outside the module tree (no optimizer, no DDP, no checkpoint).

        It is put in eval mode and every parameter stops requiring grad; :meth:`train` never
        switches it back to training mode.
        """
        module.eval()
        for param in module.parameters():
            param.requires_grad_(False)
        self._frozen[name] = module
        return module

    def frozen_modules(self) -> list[nn.Module]:
        """Every module held with :meth:`hold_frozen` (teachers, tokens)."""
        return list(self._frozen.values())

    def frozen(self, name: str) -> nn.Module:
        """A module stored with :meth:`hold_frozen`."""
        return self._frozen[name]

    def train(self, mode: bool = True) -> TrainingMethod:
        """Switch this method's own modules; frozen ones stay in eval mode."""
        super().train(mode)
        for module in self._frozen.values():
            module.eval()
        return self


def student_forward(model: nn.Module, images: Tensor, mask: Tensor, targets: list[dict[str, Tensor]],
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    """The student's forward with the methods' keyword arguments. Detectors that compute their
    losses inside the forward (torchvision's) declare ``takes_targets = True`` and get the targets too."""
    if getattr(model, "takes_targets", False):
        return model(images, mask, targets, **kwargs)
    return model(images, mask, **kwargs)


class MethodStep(nn.Module):
    """Detector + method as one module, so DDP wraps (and syncs) both with one forward per step.

    ``forward(images, mask, targets)`` is ``method.forward_train(detector, ...)``. The detector's
    parameter names keep their ``detector.`` prefix here only; checkpoints store
    ``detector.state_dict()`` (loads into a plain detector) and ``method.state_dict()`` apart.
    """

    def __init__(self, detector: nn.Module, method: TrainingMethod) -> None:
        super().__init__()
        self.detector = detector
        self.method = method

    def forward(self, images: Tensor, mask: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        return self.method.forward_train(self.detector, images, mask, targets)

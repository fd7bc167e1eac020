"""MasKD: Masked Distillation with Receptive Tokens (Huang et al., ICLR 2023, arXiv 2205.14589).

Read next to docs/maskd.md and the authors' code (``hunto/MasKD`` @ b5af34f, files named below).
The paper's maths (receptive tokens, masks, mask weighting, Dice diversity, masked distillation)
is :mod:`replic.methods.maskd_maths`, re-exported here; this module holds the plumbing around it:
token checkpoints, feature taps, teacher and student setup, the options and the
``TrainingMethod`` hooks. Two stages, two methods:

* ``maskd_tokens`` (:class:`MaskdTokens`, stage 1, official ``mmdetection/maskd_hook.py``):
  **receptive tokens** are learned on a frozen teacher. T tokens per FPN level give T masks
  ``M_t = sigmoid(token_t · x)`` per pixel (``MaskModule`` in
  ``mmrazor/mmrazor/models/losses/maskd.py``); a forward hook replaces each level x of the
  teacher's FPN by ``Σ_t p_t (x ⊙ M_t)``, where ``p = softmax_T(Conv1×1(GAP(Conv3×3(x))))`` is the
  mask weighting; the teacher's own task loss on these masked features plus the Dice diversity
  loss between the token masks (``dice_coeff``, same file) trains only the tokens and the
  weighting convs. The run's checkpoint holds the tokens under ``method`` (keys
  ``tokens.mask_modules.<level>.…``, the official layout behind a prefix).
* ``maskd`` (:class:`MasKD`, stage 2, official ``MasKDLoss`` in the same file): the student learns
  the teacher's features under the teacher's masks. Per level, with S = Conv1×1(student feature)
  and T = teacher feature::

      L = mean_N Σ_t p_t(T) · mean_C [ Σ_pixels (M_t ⊙ (S − T))² / Σ_pixels M_t ]

  Tokens and teacher are frozen (the teacher runs under ``no_grad``); the align convs train. After
  ``custom_mask_warmup`` steps the masks are multiplied by the (detached) masks of the student's
  features ("student-customised masks"). The student's own task losses are added as usual.

The tokens come from a stage-1 run of the DAG (``tokens: {experiment: …}``), a file
(``tokens: {checkpoint: …}``: a replic token run or a released official ``.ckpt`` whose keys
contain ``mask_modules``), or are random (``tokens: {random: true}``, the "no mask learning"
ablation), or one all-ones mask (``tokens: {all_ones: true}``: plain feature imitation, a
control). Beside the feature loss, the official configs distil RetinaNet's and Faster R-CNN's
box-regression outputs and start RetinaNet's student from the teacher's neck and head
(:mod:`replic.methods.maskd_heads`; ``head_distill``, ``init_from_teacher``). Feature taps: ``position: fpn`` (the FPN outputs, the paper) or ``backbone`` (the
ResNet stages feeding the FPN, an ablation) of a CNN detector; on a DETR (beyond the paper)
``backbone`` (its ResNet C5) or ``memory`` (the encoder's output, (B, HW, D) read as a D-channel
map): at mini scale teacher and student share one frozen backbone, so only the memory differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from replic.config import ConfigError
from replic.distill import TeacherSpec, build_teacher, read_teacher, shares_backbone, teacher_facts, teacher_path
from replic.distill.teacher import TeacherCheckpoint, TeacherError
from replic.io import file_sha256
from replic.methods.base import TrainingMethod
from replic.methods.maskd_heads import HEAD_DISTILL_ARCHS, HeadTap, init_from_teacher
from replic.methods.maskd_maths import ReceptiveTokens, dice_diversity, level_loss, masked_distillation

# The maths is re-exported: this module is the method's entry point (the tests import it from here).
__all__ = [
    "MasKD", "MasKDOptions", "MaskdTokens", "MaskdTokensOptions", "Position", "ReceptiveTokens", "TokenBank",
    "TokenError", "TokenSpec", "dice_diversity", "level_loss", "load_tokens", "masked_distillation",
    "probe_channels", "tap_features", "tap_module", "token_state",
]

Position = Literal["fpn", "backbone", "memory"]


# --------------------------------------------------------------------------- the token bank
class TokenBank(nn.Module):
    """One :class:`ReceptiveTokens` per tapped level; ``mask_modules.<i>.…`` as the official state dict."""

    def __init__(self, channels: list[int], num_tokens: int, weighting: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.mask_modules = nn.ModuleList(ReceptiveTokens(c, num_tokens, weighting, generator) for c in channels)


# --------------------------------------------------------------------------- feature taps
def tap_module(detector: nn.Module, position: Position) -> nn.Module:
    """The module whose output (a dict of maps by level) MasKD reads or replaces: a CNN detector's FPN
    (``fpn``) or the ResNet body feeding it (``backbone``); a DETR's ResNet body (``backbone`` only: the
    C5 map that feeds its transformer — beyond the paper)."""
    neck = getattr(detector, "neck", None)
    if neck is not None and position != "memory":
        return neck if position == "fpn" else neck.body
    if neck is None and position == "backbone" and hasattr(detector, "backbone"):
        return detector.backbone[0].body
    if neck is None and position == "memory" and hasattr(detector, "transformer"):
        return detector.transformer.encoder
    raise ConfigError(f"method.position: {position!r}: a CNN detector (model.family: cnn) has the 'fpn' and "
                      "'backbone' taps, a DETR the 'backbone' and 'memory' taps")


def memory_map(outputs: dict[str, Any]) -> Tensor:
    """A DETR's encoder memory (B, HW, D) as a D-channel map (B, D, H, W) (``feature_size`` = (H, W))."""
    memory = outputs["memory"]
    h, w = outputs["feature_size"]
    return memory.transpose(1, 2).reshape(memory.shape[0], memory.shape[2], h, w)


def tap_features(detector: nn.Module, images: Tensor, mask: Tensor, position: Position) -> list[Tensor]:
    """The tapped maps of ``detector`` for a replic batch (the same padded tensor the detector's
    forward builds), without running its heads."""
    return list(tap_maps(detector, images, mask, position).values())


def tap_maps(detector: nn.Module, images: Tensor, mask: Tensor, position: Position) -> dict[str, Tensor]:
    """:func:`tap_features` by level name, as the tapped module returns them (a CNN's FPN keys are what
    its RoI pooling reads)."""
    from replic.models.cnn.detector import image_sizes_from_mask

    if position == "memory":  # a DETR's encoder output: backbone and encoder, no decoder
        features, (memory, _, _) = detector.encode(images, mask)
        h, w = features[detector.backbone[0].input_level][0].shape[-2:]
        return {"memory": memory_map({"memory": memory, "feature_size": (h, w)})}
    if getattr(detector, "neck", None) is None:  # DETR: the padded batch goes to the ResNet as is
        return dict(tap_module(detector, position)(images))
    sizes = image_sizes_from_mask(mask)
    crops = [images[i, :, : int(h), : int(w)] for i, (h, w) in enumerate(sizes.tolist())]
    batch, _ = detector.model.transform(crops)
    return dict(tap_module(detector, position)(batch.tensors))


def probe_channels(detector: nn.Module, position: Position) -> list[int]:
    """Channel count of each tapped level (one forward of a small zero image)."""
    param = next(detector.parameters())
    if position == "memory":
        return [int(detector.query_embed.embedding_dim)]  # the transformer width D
    with torch.no_grad():
        out = tap_module(detector, position)(torch.zeros(1, 3, 64, 64, device=param.device, dtype=param.dtype))
    return [int(v.shape[1]) for v in out.values()]


# --------------------------------------------------------------------------- token checkpoints
class TokenError(ValueError):
    """Token checkpoint unusable; the message names the file and the mismatch."""


@dataclass
class TokenSpec:
    """Where the stage-2 tokens come from: exactly one of ``experiment`` (a ``maskd_tokens`` run of
    the DAG), ``checkpoint`` (a file), ``random: true`` (no mask learning, an ablation) or
    ``all_ones: true`` (no tokens: one mask of ones, i.e. plain feature imitation — a control)."""

    experiment: str | None = None
    checkpoint: str | None = None
    random: bool = False
    all_ones: bool = False

    def validate(self) -> None:
        given = (self.experiment is not None) + (self.checkpoint is not None) + bool(self.random) + bool(self.all_ones)
        if given != 1:
            raise ConfigError("give exactly one of 'experiment' (a maskd_tokens run), 'checkpoint' (a file), "
                              "'random: true' and 'all_ones: true'")


def token_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read the token weights of a file: every entry whose key contains ``mask_modules``, renamed
    from there on (the official loader's rule), from a replic run checkpoint (``method``) or a
    released mmcv checkpoint (``state_dict``). Returns (state, the file's replic config or {})."""
    from replic.io import load_torch_weights_only

    path = Path(path)
    if not path.is_file():
        raise TokenError(f"method.tokens: token checkpoint not found: {path}")
    data = load_torch_weights_only(path, map_location="cpu")
    source = None
    if isinstance(data, dict):
        for key in ("method", "state_dict", "model"):
            if isinstance(data.get(key), dict) and any("mask_modules" in k for k in data[key]):
                source = data[key]
                break
        if source is None and any(isinstance(k, str) and "mask_modules" in k for k in data):
            source = data
    if source is None:
        raise TokenError(f"{path}: no receptive-token weights (no key containing 'mask_modules')")
    state = {k[k.find("mask_modules"):]: v for k, v in source.items() if "mask_modules" in k}
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    return state, config


def load_tokens(bank: TokenBank, state: dict[str, Tensor], path: str | Path) -> None:
    """Load ``state`` into ``bank`` strictly; a different token count, level count, channel width or
    weighting is a TokenError naming the file and both values."""
    levels = sorted({int(k.split(".")[1]) for k in state})
    want_levels = len(bank.mask_modules)
    if len(levels) != want_levels:
        raise TokenError(f"{path}: token checkpoint has {len(levels)} levels, the tapped features have {want_levels}")
    tokens = state["mask_modules.0.mask_token"]
    want = bank.mask_modules[0].mask_token
    if tokens.shape[0] != want.shape[0]:
        raise TokenError(f"{path}: token checkpoint has {tokens.shape[0]} tokens per level, but "
                         f"method.num_tokens is {want.shape[0]}")
    if tokens.shape[1] != want.shape[1]:
        raise TokenError(f"{path}: token checkpoint has {tokens.shape[1]} channels, the teacher's features "
                         f"have {want.shape[1]}")
    has_prob = any(".prob." in k for k in state)
    if has_prob != bank.mask_modules[0].weighting:
        raise TokenError(f"{path}: token checkpoint {'has' if has_prob else 'has no'} mask-weighting module, "
                         f"but method.weighting is {bank.mask_modules[0].weighting}")
    bank.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- stage 1
@dataclass
class MaskdTokensOptions:
    """The ``method`` section of a stage-1 (token learning) experiment; defaults as the official
    detection configs (``mmdetection/configs/maskd/*.py``). The experiment's ``model`` section
    must be the teacher's architecture (extend the teacher's experiment YAML); the optimizer is the
    experiment's ``train`` section (Adam 0.01, wd 1e-3, cosine to 1e-6 over 2,000 steps in the
    official configs).

    teacher: ``{experiment: NAME}`` (a DAG run) or ``{checkpoint: FILE}``; its weights are loaded
        into the model and frozen.
    num_tokens: T per level (6 in every detection config).
    weighting: learn the mask-weighting module p (``weight_mask=True``); off = Σ_t x ⊙ M_t.
    dice: add the Dice diversity loss (off = ablation); dice_weight: its weight (1, Eq. 10).
    position: ``fpn`` (the neck outputs, the paper) | ``backbone`` (the ResNet stages, ablation).
    """

    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    num_tokens: int = 6
    weighting: bool = True
    dice: bool = True
    dice_weight: float = 1.0
    position: Position = "fpn"

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"num_tokens: must be >= 1, got {self.num_tokens}")
        if self.dice_weight < 0:
            raise ConfigError(f"dice_weight: must be >= 0, got {self.dice_weight}")


def _check_cnn(cfg: Any, position: str = "fpn") -> None:
    cnn = getattr(cfg.model, "family", "detr") == "cnn"
    if not cnn and position == "fpn":
        raise ConfigError("model.family: MasKD taps FPN features of a CNN detector (family: cnn); with a DETR "
                          "set method.position: backbone (its ResNet C5) or memory (its encoder output), "
                          "beyond the paper")
    if cnn and position == "memory":
        raise ConfigError("method.position: 'memory' is a DETR's encoder output; a CNN detector has 'fpn' and "
                          "'backbone'")


class MaskdTokens(TrainingMethod):
    """Stage 1: learn receptive tokens on the frozen teacher (see the module docstring)."""

    name = "maskd_tokens"
    Options = MaskdTokensOptions
    uses_cached_features = False
    composable = False  # stage 1: learns tokens on a frozen teacher, trains no student

    def __init__(self, cfg: Any, options: MaskdTokensOptions) -> None:
        super().__init__(cfg, options)
        self._teacher_ckpt: TeacherCheckpoint | None = None
        self._dice: list[Tensor] = []

    @classmethod
    def check_config(cls, cfg: Any, options: MaskdTokensOptions) -> None:
        _check_cnn(cfg, options.position)

    def input_files(self) -> dict[str, Path]:
        return {"method.teacher": teacher_path(self.options.teacher, self.run_dir)}

    def check_inputs(self) -> None:
        """Read the teacher checkpoint (a missing or foreign file fails here, before any data)."""
        spec = self.options.teacher
        self._teacher_ckpt = read_teacher(teacher_path(spec, self.run_dir), spec.experiment)

    def build_model(self) -> nn.Module:
        """The experiment's detector with the teacher's weights, every parameter frozen."""
        from replic.models.families import family_of

        if self._teacher_ckpt is None:
            self.check_inputs()
        ckpt = self._teacher_ckpt
        model = family_of(self.cfg.model).build_model(dataclasses.replace(self.cfg.model, pretrained_backbone="none"))
        try:
            model.load_state_dict(ckpt.state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise TeacherError(f"{ckpt.path}: the teacher's weights do not fit this experiment's model section "
                               f"(extend the teacher's experiment YAML): {first}") from err
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def setup(self, model: nn.Module, criterion: nn.Module, device: torch.device) -> None:
        """Tokens on every tapped level (trainable: the only parameters the optimizer gets), the
        hook that masks the teacher's features, and the Dice term."""
        o = self.options
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.tokens = TokenBank(probe_channels(model, o.position), o.num_tokens, o.weighting, generator).to(device)
        if o.position == "memory":
            # The encoder returns (B, HW, D); its map size is the input projection's output size.
            model.input_proj.register_forward_hook(self._record_size)
            tap_module(model, o.position).register_forward_hook(self._mask_memory_hook)
        else:
            tap_module(model, o.position).register_forward_hook(self._mask_hook)
        if o.dice:
            criterion.register_loss(self._dice_term, {"loss_maskd_dice": o.dice_weight})

    def _record_size(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._memory_size = tuple(output.shape[-2:])

    def _mask_memory_hook(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        """The teacher's encoder memory (B, HW, D), masked as a D-channel map and flattened back."""
        h, w = self._memory_size
        b, _, d = output.shape
        masked = self._mask_hook(module, inputs, {"memory": output.transpose(1, 2).reshape(b, d, h, w)})["memory"]
        return masked.flatten(2).transpose(1, 2)

    def _mask_hook(self, module: nn.Module, inputs: Any, output: dict[str, Tensor]) -> dict[str, Tensor]:
        masked = {}
        for (key, x), tokens in zip(output.items(), self.tokens.mask_modules, strict=True):
            masked[key], masks = tokens(x)
            self._dice.append(dice_diversity(masks))
        return type(output)(masked)

    def forward_train(self, model: nn.Module, images: Tensor, mask: Tensor,
                      targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        """The teacher's training forward (its task loss) on masked features; BN held in eval."""
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        self._dice.clear()
        out = super().forward_train(model, images, mask, targets)
        out["maskd_dice"] = torch.stack(self._dice).sum()  # Σ over levels (official hook)
        self._dice.clear()
        return out

    @staticmethod
    def _dice_term(outputs: dict[str, Any], targets: Any, context: Any) -> dict[str, Tensor]:
        return {"loss_maskd_dice": outputs["maskd_dice"]}

    def provenance(self) -> dict[str, Any]:
        return {"teacher": teacher_facts(self._teacher_ckpt) if self._teacher_ckpt else None,
                "options": dataclasses.asdict(self.options)}


# --------------------------------------------------------------------------- stage 2
@dataclass
class MasKDOptions:
    """The ``method`` section of a MasKD student (stage 2; official ``MasKDLoss`` defaults and
    ``mmrazor/configs/distill/maskd/*.py``).

    teacher: ``{experiment: NAME}`` or ``{checkpoint: FILE}`` (a CNN detector with as many tapped
        levels as the student).
    tokens: ``{experiment: NAME}`` (a ``maskd_tokens`` run, trained first), ``{checkpoint: FILE}``
        (such a run's checkpoint or a released official ``.ckpt``), or ``{random: true}`` (tokens drawn
        N(0, 0.01) from the seed, no stage 1: the learned-vs-random ablation).
    num_tokens: T per level; must equal the token checkpoint's (6 in every detection config).
    weighting: weight tokens by p(teacher features) (``weight_mask``); off = plain mean over tokens.
    loss_weight: 1 (Faster R-CNN), 7 (RetinaNet), 10 (FCOS, RepPoints) in the official configs.
    custom_mask: multiply the teacher's masks by the student's (detached) after
        ``custom_mask_warmup`` optimizer steps (official: 7330 / 7000 / 5000 for FRCNN / RetinaNet / FCOS).
    position: ``fpn`` (paper) | ``backbone`` (ablation; the tokens must have been learned there too).
    head_distill: distil the box-regression outputs as the official config of the student's detector
        (:mod:`replic.methods.maskd_heads`); unset = as that config: on for RetinaNet and Faster
        R-CNN, off for FCOS and DETRs (which have no official head term, so ``true`` is refused there).
    head_weight: the head term's weight (1 in both official configs).
    init_from_teacher: start the student's neck and heads from the teacher's; unset = as the official
        config (RetinaNet only).
    weight_rule: at a scale other than the paper's, ``loss_weight`` and ``head_weight`` come from the
        weight rule (docs/weight_rule.md); false = as written (the tables' paper-weight rows).
    """

    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    tokens: TokenSpec = field(default_factory=TokenSpec)
    num_tokens: int = 6
    weighting: bool = True
    loss_weight: float = 1.0
    custom_mask: bool = True
    custom_mask_warmup: int = 7330
    position: Position = "fpn"
    head_distill: bool | None = None
    head_weight: float = 1.0
    init_from_teacher: bool | None = None
    weight_rule: bool = True

    def validate(self) -> None:
        if self.head_weight < 0:
            raise ConfigError(f"head_weight: must be >= 0, got {self.head_weight}")
        if self.tokens.all_ones and (self.weighting or self.custom_mask):
            raise ConfigError("tokens: all_ones has one mask of ones and no tokens: set weighting: false and "
                              "custom_mask: false")
        if self.num_tokens < 1:
            raise ConfigError(f"num_tokens: must be >= 1, got {self.num_tokens}")
        if self.loss_weight < 0:
            raise ConfigError(f"loss_weight: must be >= 0, got {self.loss_weight}")
        if self.custom_mask_warmup < 0:
            raise ConfigError(f"custom_mask_warmup: must be >= 0, got {self.custom_mask_warmup}")


class MasKD(TrainingMethod):
    """Stage 2: masked feature distillation from a frozen teacher (see the module docstring)."""

    name = "maskd"
    Options = MasKDOptions
    # At the memory tap of a DETR whose teacher shares the student's frozen backbone (mini scale), the
    # cached maps are the teacher's too; every other tap reads the images (feature_cache_reason).
    uses_cached_features = True

    def __init__(self, cfg: Any, options: MasKDOptions) -> None:
        super().__init__(cfg, options)
        self._teacher_ckpt: TeacherCheckpoint | None = None
        self._token_state: dict[str, Tensor] | None = None
        self._token_facts: dict[str, Any] = ({"random": True, "seed": cfg.seed} if options.tokens.random
                                             else {"all_ones": True} if options.tokens.all_ones else {})
        self._head_tap: HeadTap | None = None
        self._student_taps: list[dict[str, Tensor]] = []
        # Optimizer steps seen (the custom-mask warm-up); in the state dict, so resume is exact.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @classmethod
    def check_config(cls, cfg: Any, options: MasKDOptions) -> None:
        _check_cnn(cfg, options.position)
        arch = student_arch(cfg)
        if options.head_distill and arch not in HEAD_DISTILL_ARCHS:
            raise ConfigError(f"method.head_distill: the official MasKD configs distil a head output of "
                              f"{' and '.join(sorted(HEAD_DISTILL_ARCHS))} only; this student is {arch}")
        if options.init_from_teacher and getattr(cfg.model, "family", "detr") != "cnn":
            raise ConfigError("method.init_from_teacher: copies a CNN detector's neck and heads (the official "
                              "RetinaNet config); this student is a DETR")

    @property
    def head_distill(self) -> bool:
        """``head_distill`` resolved: unset follows the official config of the student's detector."""
        option = self.options.head_distill
        return student_arch(self.cfg) in HEAD_DISTILL_ARCHS if option is None else option

    @property
    def init_from_teacher(self) -> bool:
        """``init_from_teacher`` resolved: unset follows the official configs (RetinaNet only)."""
        option = self.options.init_from_teacher
        return student_arch(self.cfg) == "retinanet" if option is None else option

    def feature_cache_reason(self, model: nn.Module) -> str | None:
        """Cached maps stand in for the images only at a DETR's memory tap with a teacher that shares the
        student's backbone: the teacher's encoder then reads the same maps (the backbone and FPN taps
        run the ResNets on the images)."""
        if self.options.position != "memory":
            return f"MasKD at position '{self.options.position}' runs the backbones on the images"
        if not shares_backbone(model, self.frozen("teacher")):
            return "the MasKD teacher's backbone differs from the student's (its maps are not the cached ones)"
        return None

    def token_path(self) -> Path | None:
        """The token checkpoint file (None for random or all-ones masks); an experiment is the sibling run."""
        spec = self.options.tokens
        if spec.random or spec.all_ones:
            return None
        return teacher_path(TeacherSpec(experiment=spec.experiment, checkpoint=spec.checkpoint), self.run_dir)

    def input_files(self) -> dict[str, Path]:
        files = {"method.teacher": teacher_path(self.options.teacher, self.run_dir)}
        tokens = self.token_path()
        if tokens is not None:
            files["method.tokens"] = tokens
        return files

    def check_inputs(self) -> None:
        """Read teacher and tokens before any data or model; token count and teacher checked here."""
        spec = self.options.teacher
        self._teacher_ckpt = read_teacher(teacher_path(spec, self.run_dir), spec.experiment)
        path = self.token_path()
        if path is None:
            return
        if self.options.tokens.experiment is not None and not path.is_file():
            raise TokenError(f"method.tokens: token checkpoint not found: {path} (train the token run first: "
                             f"experiment '{self.options.tokens.experiment}')")
        self._token_state, token_cfg = token_state(path)
        tokens = self._token_state.get("mask_modules.0.mask_token")
        if tokens is None:
            raise TokenError(f"{path}: no 'mask_modules.0.mask_token' entry")
        if tokens.shape[0] != self.options.num_tokens:
            raise TokenError(f"{path}: token checkpoint has {tokens.shape[0]} tokens per level, but "
                             f"method.num_tokens is {self.options.num_tokens}")
        position = (token_cfg.get("method") or {}).get("position")
        if position is not None and position != self.options.position:
            raise TokenError(f"{path}: tokens were learned at position '{position}', but method.position is "
                             f"'{self.options.position}'")
        recorded = ((token_cfg.get("method") or {}).get("teacher") or {}).get("experiment")
        if recorded is not None and spec.experiment is not None and recorded != spec.experiment:
            raise TokenError(f"{path}: tokens were learned on teacher '{recorded}', but method.teacher.experiment "
                             f"is '{spec.experiment}'")
        self._token_facts = {"path": str(path), "sha256": file_sha256(path),
                             "experiment": token_cfg.get("name")}

    def setup(self, model: nn.Module, criterion: nn.Module, device: torch.device) -> None:
        """Frozen teacher and tokens (outside the module tree), trainable align convs, the loss term."""
        o = self.options
        if self._teacher_ckpt is None:
            self.check_inputs()
        teacher = self.frozen_teacher(self._teacher_ckpt, device)
        t_channels = probe_channels(teacher, o.position)
        s_channels = probe_channels(model, o.position)
        if len(t_channels) != len(s_channels):
            raise TeacherError(f"{self._teacher_ckpt.path}: the teacher has {len(t_channels)} tapped levels, "
                               f"the student {len(s_channels)} (method.position {o.position})")
        if not o.tokens.all_ones:
            generator = torch.Generator().manual_seed(self.cfg.seed)
            bank = TokenBank(t_channels, o.num_tokens, o.weighting, generator)
            if self._token_state is not None:
                load_tokens(bank, self._token_state, self.token_path())
            self.hold_frozen("tokens", bank.to(device))
        # Built after the tokens: their seeded draws come first, as before these options existed.
        self.align = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(s_channels, t_channels)).to(device)
        if o.position == "backbone":
            tap_module(model, o.position).register_forward_hook(
                lambda module, inputs, output: self._student_taps.append(output))
        criterion.register_loss(self._loss_term, {"loss_maskd": o.loss_weight})
        if self.init_from_teacher:
            init_from_teacher(model, teacher, self._teacher_ckpt.path)
        if self.head_distill:
            self._head_tap = HeadTap(model, student_arch(self.cfg))
            criterion.register_loss(self._head_term, {"loss_maskd_head": o.head_weight})

    def distillation_weights(self) -> dict[str, tuple[float, list[str]]]:
        if not self.options.weight_rule or not hasattr(self, "align"):
            return {}
        groups = {"method.loss_weight": (self.options.loss_weight, ["loss_maskd"])}
        if self._head_tap is not None:
            groups["method.head_weight"] = (self.options.head_weight, ["loss_maskd_head"])
        return groups

    def model_inputs(self, model: nn.Module, images: Tensor, mask: Tensor,
                     targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        self._student_taps.clear()  # the forward hooks fill these during the student's forward
        if self._head_tap is not None:
            self._head_tap.clear()
        return {}

    def after_forward(self, model: nn.Module, out: dict[str, Any], images: Tensor, mask: Tensor,
                      targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        """The student's tapped maps, the teacher's under no_grad, and the MasKD loss."""
        if self.options.position == "memory":
            student = [memory_map(out)]
        elif self.options.position == "fpn":
            student = list(out["features"].values())
        else:
            (taps,) = self._student_taps
            student = list(taps.values())
        self._student_taps.clear()
        position = self.options.position
        with torch.no_grad():
            teacher_maps = tap_maps(self.frozen("teacher"), images, mask, position)
        out["loss_maskd"] = self.distill_loss(student, list(teacher_maps.values()))
        if self._head_tap is not None:
            if position != "fpn":  # the heads read the FPN maps
                with torch.no_grad():
                    teacher_maps = tap_maps(self.frozen("teacher"), images, mask, "fpn")
            out["loss_maskd_head"] = self._head_tap.loss(self.frozen("teacher"), teacher_maps)
            self._head_tap.clear()
        if self.training:
            self.step += 1
        return out

    def distill_loss(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """Σ over levels of :func:`~replic.methods.maskd_maths.level_loss` (aligned student vs teacher,
        the teacher's masks, customised by the student's after the warm-up)."""
        o = self.options
        total = student[0].new_zeros(())
        if o.tokens.all_ones:  # one mask of ones: the mean squared difference per level
            for s, t, align in zip(student, teacher, self.align, strict=True):
                a = align(s)
                total = total + masked_distillation(a, t, a.new_ones(a.shape[0], 1, *a.shape[2:]), None)
            return total
        bank = self.frozen("tokens")
        customise = o.custom_mask and int(self.step) >= o.custom_mask_warmup
        for s, t, align, tokens in zip(student, teacher, self.align, bank.mask_modules, strict=True):
            total = total + level_loss(align(s), t, tokens, customise, o.weighting)
        return total

    @staticmethod
    def _loss_term(outputs: dict[str, Any], targets: Any, context: Any) -> dict[str, Tensor]:
        return {"loss_maskd": outputs["loss_maskd"]}

    @staticmethod
    def _head_term(outputs: dict[str, Any], targets: Any, context: Any) -> dict[str, Tensor]:
        return {"loss_maskd_head": outputs["loss_maskd_head"]}

    def provenance(self) -> dict[str, Any]:
        return {"teacher": teacher_facts(self._teacher_ckpt) if self._teacher_ckpt else None,
                "tokens": self._token_facts, "options": dataclasses.asdict(self.options),
                "head_distill": self.head_distill, "init_from_teacher": self.init_from_teacher}


def student_arch(cfg: Any) -> str:
    """The student's detector: a CNN's ``model.arch`` (retinanet, fcos, faster_rcnn) or ``detr``."""
    return cfg.model.arch if getattr(cfg.model, "family", "detr") == "cnn" else "detr"

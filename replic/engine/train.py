"""The training loop: the paper recipe, exact resume, signals, NaN guard, DDP.

Exact resume rests on three things: (1) the data order and each sample's
augmentation are pure functions of (seed, epoch, index) (``replic.engine.sampling``);
(2) the checkpoint holds model/optimizer/scheduler/scaler states, every process's
RNG states and the position (epoch, step within epoch) plus the running epoch sums;
(3) checkpoints are only taken at step boundaries. So a run resumed from any
checkpoint reproduces, bit for bit on CPU, the run that never stopped.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from replic.config import config_hash, to_dict
from replic.data.io import atomic_write_json
from replic.engine import distributed, provenance
from replic.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from replic.engine.config import ExperimentConfig
from replic.engine.optim import after_optimizer_step, build_optimizer, build_scheduler
from replic.engine.progress import MetricsLog, Progress, StepMeter, format_step_line
from replic.engine.rundir import RunPaths, prepare, run_inputs
from replic.engine.runtime import (
    autocast_context,
    build_dataset,
    build_loss,
    loader_generator,
    seed_everything,
    select_device,
    set_determinism,
    to_float32,
    worker_init,
)
from replic.engine.sampling import EpochBatchSampler, SeededDataset
from replic.engine.tensorboard import TensorBoardLog
from replic.engine.weight_rule import RuleSource, apply_weights, load_or_compute, weight_rule_applies
from replic.methods import MethodStep, build_method

log = logging.getLogger("replic.engine")

# Exit code after a checkpoint taken on SIGTERM/SIGUSR1 (EX_TEMPFAIL: "try again").
from replic.engine.exit_codes import EXIT_PREEMPTED  # noqa: E402  (re-exported)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# RUN_DIR/train.log: the console's format with the date (a run can span days).
TRAIN_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TRAIN_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and every loss term."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere signals are left alone)."""
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                return

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a (DDP-wrapped) :class:`MethodStep`."""
    return _unwrap_step(model).detector


def _unwrap_step(model: torch.nn.Module) -> MethodStep:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def weighted_total(loss_dict: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ weight·term over the terms that have a weight (the official ``losses``)."""
    terms = [loss_dict[k] * weights[k] for k in loss_dict if k in weights]
    if not terms:
        raise ValueError(f"no loss term has a weight; terms {sorted(loss_dict)}, weights {sorted(weights)}")
    return torch.stack(terms).sum()


def _describe_terms(loss_dict: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in sorted(loss_dict.items()))


class Trainer:
    """One training run into one run directory."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, *, force: bool = False,
                 resume: bool = False, progress: bool = True, rule_source: RuleSource | None = None) -> None:
        self.cfg = cfg
        self.rule_source = rule_source
        self.weight_rule: list[dict[str, Any]] | None = None
        self.paths = RunPaths(run_dir)
        self.force = force
        self.resume_requested = resume
        self.show_progress = progress
        self.stop = StopFlag()
        self.file_log: logging.Handler | None = None
        self.tensorboard: TensorBoardLog | None = None
        self.bar: Progress | None = None

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        # Rank first (from the environment) so only the main process writes.
        info = distributed.detect()
        self.device = select_device(cfg.train.device, info.local_rank)
        self.dist = distributed.init(self.device.type)
        # The method first: its input files (a teacher checkpoint) are part of the run's identity.
        self.method = build_method(cfg, run_dir=self.paths.root)
        self.inputs = run_inputs(cfg, self.method.input_files())
        same = prepare(self.paths, cfg, force=self.force, write=self.dist.is_main, inputs=self.inputs)
        if self.dist.is_main:
            # Only now: a directory refused by prepare() (another run's) gets no lines of this one.
            self._open_train_log(continuing=same)
        distributed.barrier()
        if self.resume_requested and not self.paths.last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {self.paths.last}")
        self.resume_from = self.paths.last if (same and self.paths.last.is_file()) else None
        self.already_done = same and self.paths.done.is_file()
        if self.already_done:
            return

        set_determinism(cfg.train.deterministic, self.device)
        self.process_seed = cfg.seed + self.dist.rank
        seed_everything(self.process_seed)

        # Method inputs (a teacher checkpoint ...) and data first: both fail before the model is built.
        self.method.check_inputs()
        self.dataset = build_dataset(cfg, "train")
        self.steps_per_epoch = EpochBatchSampler(
            len(self.dataset), cfg.train.batch_size, seed=cfg.seed, epoch=0,
            rank=self.dist.rank, world_size=self.dist.world_size,
        ).batches_per_epoch

        detector = self.method.build_model().to(self.device)
        self.criterion = build_loss(cfg).to(self.device)
        self.method.to(self.device)
        self.method.setup(detector, self.criterion, self.device)
        self._apply_weight_rule()
        self.weights = dict(self.criterion.weight_dict)
        self.collate = None  # the image collate; the feature cache brings its own
        self.cache_info: dict[str, Any] | None = None
        if cfg.train.feature_cache:
            self._use_feature_cache(detector)
        # Detector + the method's own trainable modules: one module, one DDP wrapper.
        model = MethodStep(detector, self.method)
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.device.type == "cuda" and cfg.train.amp == "fp16"
        )
        self.model = model
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train.find_unused_parameters,
            )
        if self.dist.is_main:
            self.tensorboard = TensorBoardLog.open(
                self.paths.root, resume_step=self.global_step if self.resume_from is not None else None)
        self.metrics = MetricsLog(self.paths.metrics,
                                  mirrors=[self.tensorboard.write] if self.tensorboard else [])
        if self.dist.is_main:
            if self.resume_from is not None:
                self.metrics.truncate_after(self.global_step)
            record = provenance.collect(
                seeds={"base": cfg.seed, "per_process": "seed + rank",
                       "this_process": self.process_seed},
                world_size=self.dist.world_size,
                extra={"config_hash": config_hash(cfg), "device": str(self.device), "inputs": self.inputs,
                       "method": {"name": self.method.name, **self.method.provenance()},
                       "feature_cache": self.cache_info, "weight_rule": self.weight_rule,
                       "resumed_from": str(self.resume_from) if self.resume_from else None,
                       "resumed_at": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                                      "global_step": self.global_step}},
            )
            atomic_write_json(self.paths.provenance, record)

    def _open_train_log(self, *, continuing: bool) -> None:
        """Send this process's log records (INFO and up) to ``RUN_DIR/train.log`` too, appending.

        The workflow's ``logs/train.log`` is the job's redirected stdout/stderr, another file;
        this one exists for runs started by hand as well.
        """
        handler = logging.FileHandler(self.paths.train_log, mode="a", encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(TRAIN_LOG_FORMAT, TRAIN_LOG_DATEFMT))
        logging.getLogger().addHandler(handler)
        self.file_log = handler
        log.info("run directory %s (%s); log: %s", self.paths.root,
                 "continuing" if continuing else "new run", self.paths.train_log)

    def _close_logs(self, error: BaseException | None) -> None:
        """Close the event file and train.log; an error that ends the run is recorded in train.log."""
        try:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
        finally:
            # Whatever happened above, the handler leaves the root logger (in-process callers
            # would otherwise write their next run's lines into this directory).
            if self.file_log is not None:
                if error is not None:
                    # To the file only: the console already gets it (the CLI's line or a traceback).
                    self.file_log.handle(logging.LogRecord(
                        log.name, logging.ERROR, __file__, 0, "training ended by %s: %s",
                        (type(error).__name__, error), (type(error), error, error.__traceback__)))
                logging.getLogger().removeHandler(self.file_log)
                self.file_log.close()
                self.file_log = None

    def _apply_weight_rule(self) -> None:
        """At a non-paper scale, set the method's distillation weights by the rule (docs/weight_rule.md):
        computed once by the main process into the run directory, read from there by every process
        and on every resume."""
        groups = self.method.distillation_weights()
        if not weight_rule_applies(self.cfg, groups):
            return
        if self.dist.is_main:
            weights = load_or_compute(self.paths.root, self.rule_source, self.cfg, groups)
        distributed.barrier()
        if not self.dist.is_main:
            weights = load_or_compute(self.paths.root, None, self.cfg, groups)
        apply_weights(self.criterion.weight_dict, groups, weights)
        self.weight_rule = weights
        log.info("weight rule (%s): %s", self.cfg.scale,
                 ", ".join(f"{w['option']} {w['paper_weight']:g} -> {w['weight']:.4g}" for w in weights))

    def _use_feature_cache(self, detector: torch.nn.Module) -> None:
        """Train from cached frozen-backbone maps (``train.feature_cache``; same outputs, see the module)."""
        from replic.engine.feature_cache import CachedFeatureDataset, load_or_build, unsupported_reason

        reason = unsupported_reason(self.cfg) or self.method.feature_cache_reason(detector)
        if reason is not None:
            log.warning("train.feature_cache is on but not used: %s; training from images", reason)
            self.cache_info = {"used": False, "reason": reason}
            return
        cache, self.cache_info = load_or_build(
            self.cfg, self.dataset, detector.backbone[0], self.device, is_main=self.dist.is_main,
            progress=self.show_progress and self.dist.is_main)
        self.dataset = CachedFeatureDataset(cache, self.cfg.data.hflip_prob)
        self.collate = CachedFeatureDataset.collate_fn

    # ---------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        rng = distributed.all_gather_objects(capture_rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "model": _unwrap(self.model).state_dict(),
            **self._method_state(),
            "model_config": to_dict(self.cfg.model),
            "config": to_dict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                         "global_step": self.global_step},
            "epoch_sums": {"count": self.epoch_count,
                           "sums": {k: float(v) for k, v in self.epoch_sums.items()}},
            "world_size": self.dist.world_size,
        }

    def _method_state(self) -> dict[str, Any]:
        """The method's own trainable state (absent for methods without parameters)."""
        state = _unwrap_step(self.model).method.state_dict()
        return {"method": state} if state else {}

    def save(self) -> None:
        """Checkpoint at the current step boundary (all processes join; rank 0 writes)."""
        state = self._state()
        if self.dist.is_main:
            atomic_torch_save(state, self.paths.last)
            if self.tensorboard is not None:
                self.tensorboard.flush()
        distributed.barrier()

    def _load(self, path: Path) -> None:
        data = load_checkpoint(path, map_location=self.device)
        if data.get("config_hash") != config_hash(self.cfg):
            raise ValueError(f"{path}: checkpoint was written by a different config")
        self.model.detector.load_state_dict(data["model"])
        if "method" in data:
            self.model.method.load_state_dict(data["method"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.scaler.load_state_dict(data["scaler"])
        pos = data["position"]
        self.epoch, self.step_in_epoch = int(pos["epoch"]), int(pos["step_in_epoch"])
        self.global_step = int(pos["global_step"])
        self.epoch_count = int(data["epoch_sums"]["count"])
        self.epoch_sums = dict(data["epoch_sums"]["sums"])
        rng = data["rng"]
        if int(data.get("world_size", 1)) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            log.warning("%s: written with %s processes, resuming with %d: RNG streams reseeded",
                        path, data.get("world_size"), self.dist.world_size)
        log.info("resumed from %s at epoch %d step %d (global step %d)", path, self.epoch,
                 self.step_in_epoch, self.global_step)

    # -------------------------------------------------------------- logging
    def _lrs(self) -> dict[str, float]:
        return {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def _log_step(self, values: dict[str, float], t0: float) -> None:
        values = distributed.all_reduce_mean(values, self.device)
        if self.dist.is_main:
            lrs = self._lrs()
            self.metrics.write({"type": "step", "epoch": self.epoch, "step": self.global_step,
                                **lrs, **values, "time": time.time() - t0})
            # The log line shows the values just written (the all-reduced mean), nothing else.
            stats = self.meter.update(self.global_step, values["loss"])
            mem = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None)
            if self.bar is not None:
                self.bar.clear()
            log.info("%s", format_step_line(
                epoch=self.epoch, epoch_step=self.step_in_epoch, epoch_steps=self.steps_per_epoch,
                step=self.global_step, total=self.meter.total_steps, eta_s=stats["eta_s"],
                loss=values["loss"], smoothed=stats["smoothed"],
                lr=lrs.get("lr_main", next(iter(lrs.values()), None)),
                sec_per_step=stats["sec_per_step"], mem_bytes=mem))

    def _log_epoch(self, seconds: float) -> None:
        count = max(1, self.epoch_count)
        means = {k: v / count for k, v in self.epoch_sums.items()}
        means = distributed.all_reduce_mean(means, self.device)
        if self.dist.is_main:
            self.metrics.write({"type": "epoch", "epoch": self.epoch, "step": self.global_step,
                                **self._lrs(), **means, "steps": self.epoch_count,
                                "time": seconds})
        self.epoch_summary = means

    def _periodic_eval(self, t0: float) -> None:
        """Val AP at this step into metrics.jsonl (convergence curves); the RNG streams are left untouched."""
        import dataclasses

        from replic.engine.evaluate import evaluate_model

        cfg = self.cfg
        sub = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_images=cfg.train.eval_every_images))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out_dir = self.paths.root / "eval_steps" / f"step_{self.global_step}"
            evaluate_model(_unwrap(self.model), sub, out_dir, device=self.device, dist_info=self.dist,
                           progress=False)
        if self.dist.is_main:
            record = json.loads((out_dir / "metrics.json").read_text())
            values = {**record["metrics"], **record["diagnostics"]}
            # "epoch": epochs completed (fractional), so table curves place it on their epoch axis.
            self.metrics.write({"type": "eval", "epoch": self.global_step / self.steps_per_epoch,
                                "step": self.global_step,
                                "images": record["eval"]["images"],
                                **{k: v for k, v in values.items() if v is not None},
                                "time": time.time() - t0})

    # ----------------------------------------------------------------- loop
    def _loader(self, epoch: int, start: int) -> DataLoader:
        cfg = self.cfg
        sampler = EpochBatchSampler(
            len(self.dataset), cfg.train.batch_size, seed=cfg.seed, epoch=epoch,
            rank=self.dist.rank, world_size=self.dist.world_size, start=start,
        )
        from replic.data.collate import collate_fn

        return DataLoader(
            SeededDataset(self.dataset, cfg.seed),
            batch_sampler=sampler,
            collate_fn=self.collate or collate_fn,
            num_workers=cfg.data.num_workers,
            worker_init_fn=worker_init if cfg.data.num_workers else None,
            generator=loader_generator(cfg.seed, epoch),
            pin_memory=self.device.type == "cuda",
        )

    def _train_step(self, batch: Any) -> dict[str, float]:
        cfg = self.cfg.train
        batch = batch.to(self.device, non_blocking=True)
        with autocast_context(cfg.amp, self.device):
            outputs = self.model(batch.images, batch.mask, batch.targets)
        loss_dict = self.criterion(to_float32(outputs), batch.targets)
        total = weighted_total(loss_dict, self.weights)
        bad = not bool(torch.isfinite(total).item())
        if distributed.all_reduce_max(bad, self.device):
            raise NonFiniteLossError(
                f"non-finite loss at global step {self.global_step + 1} (epoch {self.epoch}, "
                f"step {self.step_in_epoch + 1} of the epoch) on rank {self.dist.rank}: "
                f"loss={float(total.detach()):.6g}; terms: {_describe_terms(loss_dict)}. "
                f"The last good checkpoint is kept at {self.paths.last}."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        after_optimizer_step(self.scheduler)  # per-iteration warm-up (CNN recipe); no-op for StepLR
        values = {"loss": total.detach()}
        values.update({k: v.detach() for k, v in loss_dict.items()})
        stacked = torch.stack([v.double() for v in values.values()]).tolist()
        return dict(zip(values.keys(), stacked))

    def run(self) -> int:
        """Train to the end (0), or until a stop signal (``EXIT_PREEMPTED`` after a checkpoint)."""
        self.stop.install()
        error: BaseException | None = None
        try:
            self._setup()
            if self.already_done:
                log.info("%s is already complete (%s); nothing to do", self.paths.root, self.paths.done)
                return 0
            return self._run()
        except BaseException as err:
            error = err
            raise
        finally:
            self._close_logs(error)
            self.stop.restore()
            distributed.shutdown()

    def _finished_steps(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return max_steps is not None and self.global_step >= max_steps

    def _total_steps(self) -> int:
        total = self.cfg.train.epochs * self.steps_per_epoch
        max_steps = self.cfg.train.max_steps
        return total if max_steps is None else min(total, max_steps)

    def _run(self) -> int:
        cfg = self.cfg
        t0 = time.time()
        self.meter = StepMeter(self._total_steps(), self.global_step)
        if self.dist.is_main:
            log.info("training %s (%s scale) on %s x%d: %d images, %d steps/epoch, epochs %d..%d",
                     cfg.name, cfg.scale, self.device, self.dist.world_size, len(self.dataset),
                     self.steps_per_epoch, self.epoch, cfg.train.epochs - 1)
        self.epoch_summary: dict[str, float] = {}
        while self.epoch < cfg.train.epochs and not self._finished_steps():
            epoch_t0 = time.time()
            self.model.train()
            self.criterion.train()
            # No plain lines off a terminal: the step line (_log_step) is logged at the same interval.
            bar = self.bar = Progress(self.steps_per_epoch, f"epoch {self.epoch}", start=self.step_in_epoch,
                                      enabled=self.dist.is_main and self.show_progress,
                                      plain_every=cfg.train.log_every, plain=False)
            for batch in self._loader(self.epoch, self.step_in_epoch):
                values = self._train_step(batch)
                self.global_step += 1
                self.step_in_epoch += 1
                self.epoch_count += 1
                for k, v in values.items():
                    self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                bar.update(f"loss {values['loss']:.4f}")
                if self.global_step % cfg.train.log_every == 0:
                    self._log_step(values, t0)
                if cfg.train.eval_every and self.global_step % cfg.train.eval_every == 0:
                    self._periodic_eval(t0)
                if self.step_in_epoch == self.steps_per_epoch or self._finished_steps():
                    break
                stop = distributed.all_reduce_max(self.stop.signum is not None, self.device)
                if stop:
                    bar.close()
                    self.save()
                    if self.dist.is_main:
                        log.warning("stop signal: checkpointed at global step %d (%s); exit %d",
                                    self.global_step, self.paths.last, EXIT_PREEMPTED)
                    return EXIT_PREEMPTED
                if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                    self.save()
            bar.close()
            self.bar = None
            if self.step_in_epoch < self.steps_per_epoch:
                break  # max_steps reached mid-epoch
            self._log_epoch(time.time() - epoch_t0)
            self.scheduler.step()
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_count = 0
            self.epoch_sums = {}
            self.save()
            if distributed.all_reduce_max(self.stop.signum is not None, self.device):
                log.warning("stop signal at epoch end: checkpointed; exit %d", EXIT_PREEMPTED)
                return EXIT_PREEMPTED
        return self._finish(time.time() - t0)

    def _finish(self, seconds: float) -> int:
        cfg = self.cfg
        model = _unwrap(self.model)
        if self.dist.is_main:
            atomic_torch_save(
                {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), **self._method_state(),
                 "model_config": to_dict(cfg.model), "config": to_dict(cfg),
                 "config_hash": config_hash(cfg),
                 "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                              "global_step": self.global_step}},
                self.paths.final,
            )
        result: dict[str, Any] = {
            "experiment": cfg.name, "scale": cfg.scale, "config_hash": config_hash(cfg),
            "epochs_completed": self.epoch, "global_steps": self.global_step,
            "final_epoch_losses": self.epoch_summary, "train_seconds_this_process": seconds,
            "world_size": self.dist.world_size,
        }
        if cfg.train.eval_at_end:
            from replic.engine.evaluate import evaluate_model

            metrics = evaluate_model(model, cfg, self.paths.eval_dir, device=self.device,
                                     dist_info=self.dist, checkpoint=str(self.paths.final),
                                     progress=self.show_progress)
            result["eval"] = metrics
        if self.dist.is_main:
            atomic_write_json(self.paths.done, result)
            log.info("done: %s", self.paths.done)
        return 0


def train(cfg: ExperimentConfig, run_dir: str | Path, *, force: bool = False, resume: bool = False,
          progress: bool = True, rule_source: RuleSource | None = None) -> int:
    """Train ``cfg`` into ``run_dir``; returns the process exit code. ``rule_source``: the experiment
    file the distillation-weight rule reads at a non-paper scale (:mod:`replic.engine.weight_rule`)."""
    return Trainer(cfg, run_dir, force=force, resume=resume, progress=progress, rule_source=rule_source).run()

"""Training and evaluation engine: configs, loops, checkpoints, exact resume, DDP, provenance."""

from replic.engine.config import EvalConfig, ExperimentConfig, TrainConfig, load_experiment

__all__ = ["EvalConfig", "ExperimentConfig", "TrainConfig", "load_experiment"]

"""Experiment configs: strict schema, extends chains, scales, run-directory refusal."""

from __future__ import annotations

import json

import re
from pathlib import Path

import pytest
import yaml

from replic.config import ConfigError, config_hash, to_dict
from replic.engine.config import (
    ExperimentConfig,
    build_config,
    load_experiment,
    load_with_extends,
    parse_overrides,
    resolve_raw,
)
from replic.engine.rundir import RunDirError, RunPaths, prepare

from engine_testutil import REPO

# The DETR-family experiments (the CNN detectors have their own checks in tests/test_cnn_config.py).
CNN_PREFIXES = ("frcnn_", "retinanet_", "fcos_")
# Method experiments on another paper's protocol check their recipe in their own tests
# (KS-DETR: tests/test_ks_detr.py, detrex protocol with top-300 and no norm decay; D³ETR:
# tests/test_d3etr_workflow.py).
METHOD_PREFIXES = ("ks_", "d3etr_", "maskd_")
EXPERIMENTS = sorted(p for p in (REPO / "configs" / "experiments").glob("*.yaml")
                     if not p.stem.startswith(CNN_PREFIXES + METHOD_PREFIXES))
MASKD_EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("maskd_*.yaml"))
MISSING_ROOT = {"data": {"root": "/nonexistent/replic-data"}}


def test_there_is_one_experiment_per_table_row():
    names = {p.stem for p in EXPERIMENTS}
    for backbone in ("r50", "dc5_r50", "r101", "dc5_r101"):
        for epochs in (50, 75, 108):
            assert f"cdetr_{backbone}_{epochs}ep" in names
        assert f"detr_{backbone}_50ep" in names and f"detr_{backbone}_500ep" in names
    for variant in ("csq_c", "csq_t", "csq_p", "csq_i", "lambda_identity", "lambda_scalar",
                    "lambda_block_diagonal", "lambda_full", "refpt_zero", "refpt_learned"):
        assert f"cdetr_r50_50ep_{variant}" in names
    assert {"detr_r50_50ep_t4_or", "detr_r50_50ep_t4_fl", "detr_r50_50ep_t4_or_fl"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_validates_at_paper_scale_without_reading_data(path):
    cfg = load_experiment(path, "paper", MISSING_ROOT)  # the data root does not exist
    assert cfg.name == path.stem and cfg.scale == "paper"
    assert cfg.model.pretrained_backbone == "torchvision" and cfg.model.num_classes == 91
    dc5 = "dc5" in path.stem
    assert cfg.model.dilation is dc5
    # Paper batch sizes: 2 per GPU, DC5 1 per GPU, for training and evaluation (pitfall 2).
    assert cfg.train.batch_size == (1 if dc5 else (4 if cfg.train.epochs == 500 else 2))
    assert cfg.eval.batch_size == (1 if dc5 else 2)
    schedule = re.search(r"_(\d+)ep(_|$)", path.stem)  # cdetr_r50_12ep, cdetr_r50_12ep_ks, ...
    epochs = int(schedule.group(1)) if schedule else 50
    assert cfg.train.epochs == epochs
    # 12 epochs (D³ETR's short schedule): lr drop at 11, detrex's 12-epoch schedule.
    assert cfg.train.lr_drop == {12: 11, 50: 40, 75: 60, 108: 80, 500: 400}[cfg.train.epochs]
    assert cfg.train.weight_decay_norm is None and cfg.train.clip_max_norm == 0.1
    # The official seed 42; a seed replicate (<name>_seed<n>, the convergence figure's) has seed n.
    replicate = re.search(r"_seed(\d+)$", path.stem)
    assert cfg.seed == (int(replicate.group(1)) if replicate else 42)


@pytest.mark.parametrize("path", MASKD_EXPERIMENTS, ids=lambda p: p.stem)
def test_every_maskd_experiment_validates_at_paper_scale(path):
    # MasKD's students follow the mmdet 2x recipe (CNN family) or the Conditional DETR one (the
    # rows beyond the paper); their method options are checked by the method's own schema here.
    cfg = load_experiment(path, "paper", MISSING_ROOT)
    assert cfg.name == path.stem and cfg.scale == "paper"
    assert cfg.method["name"] in ("maskd", "maskd_tokens")
    assert cfg.model.pretrained_backbone == "torchvision" and cfg.model.num_classes == 91


def test_ablations_change_only_their_switch():
    base = to_dict(load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper"))
    ablation = to_dict(load_experiment(REPO / "configs/experiments/cdetr_r50_50ep_lambda_full.yaml", "paper"))
    diff = {k for k in base["model"] if base["model"][k] != ablation["model"][k]}
    assert diff == {"lambda_form"} and ablation["model"]["lambda_form"] == "full"
    assert {k for k in base if base[k] != ablation[k]} == {"name", "description", "model"}


def test_smoke_scale_is_an_overlay_with_classes_from_the_data(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "instances_train2017.json").write_text(
        '{"images": [], "annotations": [], "categories": [{"id": 3, "name": "a"}, {"id": 17, "name": "b"}]}')
    cfg = load_experiment(REPO / "configs/experiments/cdetr_dc5_r101_108ep.yaml", "smoke",
                          {"data": {"root": str(tmp_path)}})
    assert cfg.scale == "smoke" and cfg.model.num_classes == 18  # max id + 1
    assert cfg.model.backbone == "resnet18" and cfg.model.pretrained_backbone == "none"
    assert cfg.train.epochs < 10 and cfg.model.dec_layers <= 3
    assert cfg.name == "cdetr_dc5_r101_108ep"


def test_unknown_key_fails_fast_naming_the_dotted_key_before_any_data_is_read(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"extends: {REPO}/configs/experiments/cdetr_r50_50ep.yaml\n"
                   "data:\n  root: /nonexistent/replic-data\nmodel:\n  num_classes: auto\n"
                   "train:\n  lr_dorp: 30\n")
    with pytest.raises(ConfigError, match=r"'train\.lr_dorp'.*did you mean 'train\.lr_drop'"):
        load_experiment(exp, "smoke", MISSING_ROOT)
    # The same file without the typo reaches the data (and only then fails on it).
    exp.write_text(exp.read_text().replace("lr_dorp", "lr_drop"))
    with pytest.raises(FileNotFoundError, match="replic-data"):
        load_experiment(exp, "smoke", MISSING_ROOT)


def test_unknown_key_through_the_cli_names_the_key(tmp_path, capsys):
    from replic.cli import main

    rc = main(["train", "--config", str(REPO / "configs/experiments/cdetr_r50_50ep.yaml"),
               "--scale", "smoke", "--set", "data.root=/nonexistent/replic-data",
               "--set", "model.hidden_dimm=8", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "model.hidden_dimm" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ({"train": {"epochs": "ten"}}, r"train\.epochs: expected an integer"),
    ({"train": {"amp": "int8"}}, r"train\.amp: 'int8' is not one of"),
    ({"train": {"epochs": 10, "lr_drop": 40}}, r"train\.lr_drop: 40 is after the last epoch"),
    ({"eval": {"batch_size": 0}}, r"eval\.batch_size: must be positive"),
    ({"train": {"device": "cpu", "amp": "fp16"}}, r"fp16 needs a CUDA device"),
])
def test_wrong_types_and_impossible_combinations_are_errors(override, message):
    raw = resolve_raw(REPO / "configs/experiments/cdetr_r50_50ep.yaml")
    from replic.config import deep_merge

    with pytest.raises(ConfigError, match=message):
        build_config(deep_merge(raw, override))


def test_extends_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntrain:\n  epochs: 3\n")
    (tmp_path / "b.yaml").write_text("train:\n  epochs: 9\n  lr: 0.5\n")
    assert load_with_extends(tmp_path / "a.yaml") == {"train": {"epochs": 3, "lr": 0.5}}
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_with_extends(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_with_extends(tmp_path / "c.yaml")


def test_parse_overrides():
    assert parse_overrides(["train.epochs=2", "data.train_scales=[64, 72]", "name=x"]) == {
        "train": {"epochs": 2}, "data": {"train_scales": [64, 72]}, "name": "x"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_run_dir_refuses_a_different_config_naming_the_difference(tmp_path):
    paths = RunPaths(tmp_path / "run")
    cfg = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper")
    assert prepare(paths, cfg, force=False, write=True) is False
    assert paths.config_hash.read_text().strip() == config_hash(cfg)
    assert prepare(paths, cfg, force=False, write=True) is True  # same config: a continuation
    other = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper",
                            {"train": {"lr": 2e-4}})
    with pytest.raises(RunDirError, match=r"train\.lr: 0\.0001 -> 0\.0002"):
        prepare(paths, other, force=False, write=True)
    paths.checkpoints.mkdir()
    (paths.last).write_bytes(b"old")
    assert prepare(paths, other, force=True, write=True) is False
    assert not paths.last.exists()  # --force starts afresh
    assert isinstance(build_config(to_dict(other)), ExperimentConfig)


def test_run_dir_written_before_channels_last_existed_continues(tmp_path, caplog):
    """A layout-only difference (model.channels_last, absent from older run directories) is a
    continuation with a warning, the directory's config is kept; any other difference still fails."""
    paths = RunPaths(tmp_path / "run")
    cfg = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper")
    prepare(paths, cfg, force=False, write=True)
    old = yaml.safe_load(paths.config.read_text())
    del old["model"]["channels_last"]
    old_text = yaml.safe_dump(old, sort_keys=True)
    paths.config.write_text(old_text)
    paths.checkpoints.mkdir()
    paths.last.write_bytes(b"kept")
    with caplog.at_level("WARNING", logger="replic.engine"):
        assert prepare(paths, cfg, force=False, write=True) is True
    assert "model.channels_last: '<absent>' -> True" in caplog.text
    assert paths.config.read_text() == old_text and paths.last.read_bytes() == b"kept"
    nchw = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper",
                           {"model": {"channels_last": False}})
    assert prepare(paths, nchw, force=False, write=True) is True
    other = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper", {"train": {"lr": 2e-4}})
    with pytest.raises(RunDirError, match=r"train\.lr"):
        prepare(paths, other, force=False, write=True)


def test_run_dir_refuses_to_continue_a_run_whose_input_files_changed(tmp_path):
    """The config names the pretrained backbone (and the data) by path only: a file rewritten in
    place must not let a continued run resume checkpoints made from the old file."""
    from replic.engine.rundir import run_inputs

    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_train2017.json").write_text('{"images": []}')
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"first weights")
    cfg = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper",
                          {"data": {"root": str(data)}, "model": {"pretrained_backbone": str(backbone)}})
    first = run_inputs(cfg)
    assert sorted(first) == ["data.root (train annotations)", "model.pretrained_backbone"]
    paths = RunPaths(tmp_path / "run")
    assert prepare(paths, cfg, force=False, write=True, inputs=first) is False
    assert json.loads(paths.inputs.read_text()) == first
    paths.checkpoints.mkdir()
    paths.last.write_bytes(b"made from the first weights")
    assert prepare(paths, cfg, force=False, write=True, inputs=run_inputs(cfg)) is True  # unchanged
    backbone.write_bytes(b"re-pretrained weights")
    changed = run_inputs(cfg)
    with pytest.raises(RunDirError, match=r"model\.pretrained_backbone \(.*backbone\.pt\): sha256 \w{12} -> \w{12}"):
        prepare(paths, cfg, force=False, write=True, inputs=changed)
    assert paths.last.exists()  # refused: nothing removed
    # A method's own inputs (a teacher checkpoint) count the same way.
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"teacher")
    assert "method.teacher" in run_inputs(cfg, {"method.teacher": teacher})
    assert prepare(paths, cfg, force=True, write=True, inputs=changed) is False
    assert not paths.last.exists() and json.loads(paths.inputs.read_text()) == changed


def test_run_dir_without_an_input_record_is_not_continued_blindly(tmp_path):
    """A run directory written before inputs were recorded, holding a checkpoint: continuing it
    could resume a run of other files, so it needs --force; an empty one just gets the record."""
    from replic.engine.rundir import run_inputs

    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_train2017.json").write_text('{"images": []}')
    cfg = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper", {"data": {"root": str(data)}})
    inputs = run_inputs(cfg)
    paths = RunPaths(tmp_path / "run")
    prepare(paths, cfg, force=False, write=True)  # an older engine: no record
    assert not paths.inputs.exists()
    assert prepare(paths, cfg, force=False, write=True, inputs=inputs) is True  # nothing to continue yet
    paths.inputs.unlink()
    paths.done.write_text("{}")
    with pytest.raises(RunDirError, match="no record of the files it read"):
        prepare(paths, cfg, force=False, write=True, inputs=inputs)


def test_misspelt_scale_name_suggests_the_closest_one(tmp_path, capsys):
    from replic.cli import main

    rc = main(["train", "--config", str(REPO / "configs/experiments/cdetr_r50_50ep.yaml"),
               "--scale", "minii", "--set", "data.root=/nonexistent/replic-data",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "minii" in err[0] and err[0].endswith("did you mean 'mini'?")
    assert not (tmp_path / "run").exists()
    # A path is not second-guessed, and a word close to no scale gets no suggestion.
    with pytest.raises(FileNotFoundError) as missing_file:
        load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", str(tmp_path / "smoke.yaml"))
    assert "did you mean" not in str(missing_file.value)
    with pytest.raises(FileNotFoundError) as unrelated:
        load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "xyzzy")
    assert "did you mean" not in str(unrelated.value)


def test_shortened_schedule_names_the_lr_drop_fix(tmp_path, capsys):
    from replic.cli import main

    argv = ["train", "--config", str(REPO / "configs/experiments/cdetr_r50_50ep.yaml"),
            "--scale", "smoke", "--set", "data.root=/nonexistent/replic-data",
            "--out", str(tmp_path / "run"), "--set", "train.epochs=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr_drop" in err[0], err
    assert err[0].endswith("add --set train.lr_drop=<N> (N <= 1)")
    # The fix the message names is accepted (and then reaches the missing data).
    assert main([*argv, "--set", "train.lr_drop=1"]) == 2
    assert "train.lr_drop" not in capsys.readouterr().err

"""The workflow reruns a run when its resolved config changes, by content (replic.workflow.prepare.run_fingerprint)."""

from __future__ import annotations

from pathlib import Path

import json

import pytest
import yaml

from replic.engine.pretrain import provenance_path
from replic.io import file_sha256
from replic.workflow.prepare import main as prepare_main
from replic.workflow.prepare import run_fingerprint

REPO = Path(__file__).resolve().parents[1]


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    experiments = tmp_path / "experiments"
    (experiments / "base").mkdir(parents=True)
    scales = tmp_path / "scales"
    scales.mkdir()
    (experiments / "base" / "common.yaml").write_text("train:\n  lr: 1.0e-4\n  epochs: 50\n")
    experiment = experiments / "exp.yaml"
    experiment.write_text("extends: base/common.yaml\nmodel:\n  hidden_dim: 256\n"
                          "scale_overrides:\n  smoke:\n    train: {epochs: 2}\n")
    scale = scales / "smoke.yaml"
    scale.write_text("scale: smoke\nmodel:\n  hidden_dim: 32\n")
    return experiment, experiments / "base" / "common.yaml", scale


def test_comments_and_touches_keep_the_fingerprint_values_change_it(tmp_path):
    experiment, base, scale = _setup(tmp_path)

    def fingerprint(**kwargs) -> str:
        args = {"scale": "smoke", "data_root": "data/tiny", "settings": None, **kwargs}
        return run_fingerprint(experiment, args["scale"], args["data_root"], tmp_path / "scales",
                               args["settings"])

    first = fingerprint()
    assert len(first) == 16 and first == fingerprint()
    for path in (experiment, base, scale):
        path.write_text("# a comment\n" + path.read_text() + "\n# another\n")
        path.touch()
        assert fingerprint() == first, path
    # A value anywhere the run's config comes from changes it: the scale file, a base file the
    # experiment extends (a file the workflow's inputs do not name), the experiment's own
    # per-scale sizes, the data root and the overlay settings.
    seen = {first}
    edits = [(scale, "hidden_dim: 32", "hidden_dim: 48"),
             (base, "lr: 1.0e-4", "lr: 2.0e-4"),
             (experiment, "epochs: 2", "epochs: 3")]
    for path, old, new in edits:
        path.write_text(path.read_text().replace(old, new))
        value = fingerprint()
        assert value not in seen, path
        seen.add(value)
    assert fingerprint(data_root="data/other") not in seen
    assert fingerprint(settings={"train": {"feature_cache_dir": "x"}}) not in seen
    # An edit that only matters at another scale (or is overridden at this one) changes nothing.
    before = fingerprint()
    experiment.write_text(experiment.read_text() + "  mini:\n    train: {epochs: 9}\n")
    assert fingerprint() == before
    base.write_text(base.read_text().replace("epochs: 50", "epochs: 40"))  # smoke says 3
    assert fingerprint() == before


def test_every_registered_experiment_has_a_fingerprint_at_every_workflow_scale():
    from replic.workflow.registry import load_registry

    registry = load_registry(REPO / "configs" / "tables.yaml")
    names = registry.experiments(list(registry.tables))
    assert names
    for scale in ("smoke", "mini", "paper"):
        values = {run_fingerprint(REPO / "configs" / "experiments" / f"{name}.yaml", scale, "data",
                                  REPO / "configs" / "scales") for name in names}
        # Distinct experiments resolve to distinct configs (their names differ at least).
        assert len(values) == len(names), scale


def _fake_backbone(tmp_path: Path, options: dict) -> Path:
    """A weights file with the provenance record `replic pretrain-backbone` writes (options, sha256)."""
    weights = tmp_path / "backbone" / "resnet18_dense.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    record = {"options": {"data_root": "data/mini", "steps": 1200, "batch_size": 16, "seed": 0, **options},
              "sha256": file_sha256(weights)}
    provenance_path(weights).write_text(json.dumps(record))
    return weights


def _overlay(tmp_path: Path, weights: Path, *expect: str) -> tuple[int, Path]:
    (tmp_path / "scales").mkdir(exist_ok=True)
    (tmp_path / "scales" / "mini.yaml").write_text("scale: mini\nmodel:\n  hidden_dim: 128\n")
    out = tmp_path / "scale.yaml"
    args = ["overlay", "--scale", "mini", "--data-root", "data/mini", "--scales-dir", str(tmp_path / "scales"),
            "--backbone", str(weights), "--out", str(out)]
    for item in expect:
        args += ["--backbone-expect", item]
    return prepare_main(args), out


EXPECT = ("steps=1200", "batch_size=16", "seed=0", "roi_cls_weight=1.0")


def test_overlay_accepts_a_backbone_made_with_the_configured_options(tmp_path):
    weights = _fake_backbone(tmp_path, {"roi_cls_weight": 1.0})
    rc, out = _overlay(tmp_path, weights, *EXPECT)
    assert rc == 0 and yaml.safe_load(out.read_text())["model"]["hidden_dim"] == 128


@pytest.mark.parametrize("options, replace, message", [
    # Written before the class term existed: the option is absent, so it was the default (off).
    ({}, False, "options.roi_cls_weight = 0.0, the config asks for 1.0"),
    ({"roi_cls_weight": 1.0, "steps": 400}, False, "options.steps = 400, the config asks for 1200"),
    ({"roi_cls_weight": 1.0}, True, "sha256 differs"),
])
def test_overlay_refuses_a_stale_backbone_naming_file_and_option(tmp_path, capsys, options, replace, message):
    """A backbone Snakemake has no record of (made by hand, or before a mini_pretrain change) is
    refused before any run uses it, and no overlay is written."""
    weights = _fake_backbone(tmp_path, options)
    if replace:
        weights.write_bytes(b"other weights")
    rc, out = _overlay(tmp_path, weights, *EXPECT)
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert message in err and str(weights) in err and "--forcerun pretrain_backbone" in err


def test_overlay_refuses_a_backbone_without_provenance(tmp_path, capsys):
    weights = _fake_backbone(tmp_path, {"roi_cls_weight": 1.0})
    provenance_path(weights).unlink()
    rc, out = _overlay(tmp_path, weights, *EXPECT)
    assert rc == 1 and not out.exists() and "provenance.json: missing" in capsys.readouterr().err

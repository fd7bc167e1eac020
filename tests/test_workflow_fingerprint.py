"""The workflow reruns a run when its resolved config changes, by content (replic.workflow.prepare.run_fingerprint)."""

from __future__ import annotations

from pathlib import Path

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

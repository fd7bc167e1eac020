"""The table registry: strict loading, the repository's registry contents, and per-job resources."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from replic.config import ConfigError
from replic.workflow.registry import experiment_epochs, experiment_traits, load_registry

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "configs" / "tables.yaml"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _minimal() -> dict:
    return {
        "version": 1,
        "paper": "a paper",
        "tables": {
            "t": {
                "title": "T",
                "source": "paper Table 9",
                "metrics": ["AP", "AP50"],
                "paper_only": ["GFLOPs"],
                "rows": [
                    {"id": "a", "label": "A", "source": "Table 9", "experiment": "exp_a_50ep",
                     "paper": {"AP": 40.0, "AP50": None, "GFLOPs": 90}},
                    {"id": "b", "label": "B", "source": "Table 9", "experiment": "exp_a_50ep",
                     "paper": {"AP": 41.0}},
                ],
            }
        },
        "compute": {
            "smoke": {"train": {"threads": 1, "runtime": 10}, "eval": {"threads": 1, "runtime": 5}},
            "paper": {
                "train": {"gpu": 8, "cpus_per_gpu": 4, "mem_mb": 1000, "minutes_per_epoch": 10,
                          "max_runtime": 1000},
                "eval": {"gpu": 1, "cpus_per_gpu": 8, "runtime": 60},
                "factors": {"dc5": {"runtime": 2.0, "mem_mb": 1.5}, "r101": {"runtime": 1.5}},
            },
        },
    }


def test_repository_registry_loads_and_shares_runs() -> None:
    registry = load_registry(REGISTRY)
    assert {"conditional_detr", "cdetr_ablations", "smoke_ci"} <= set(registry.tables)
    ablation_rows = registry.table("cdetr_ablations").rows
    # The proposed model fills one row of Table 3, Table 4, Figure 5 and the reference-point
    # ablation, but is one run.
    shared = [row.id for row in ablation_rows if row.experiment == "cdetr_r50_50ep"]
    assert len(shared) == 4
    experiments = registry.experiments(["cdetr_ablations"])
    assert len(experiments) == len(set(experiments))
    assert len(experiments) < len(ablation_rows)
    # Table 1 and the ablations share their 50-epoch R50 runs: the union is smaller than the sum.
    both = registry.experiments(["conditional_detr", "cdetr_ablations"])
    assert len(both) < len(registry.experiments(["conditional_detr"])) + len(experiments)


def test_repository_registry_unpublished_numbers_are_null_not_zero() -> None:
    registry = load_registry(REGISTRY)
    for name, table in registry.tables.items():
        for row in table.rows:
            assert all(v is None or v > 0 for v in row.paper.values()), (name, row.id)
    # Table 3 publishes AP only: AP50 must be absent/None, never 0.
    csq = next(r for r in registry.table("cdetr_ablations").rows if r.id == "t3_csq_c")
    assert csq.paper.get("AP50") is None and csq.paper["AP"] == pytest.approx(37.1)
    inferred = {r.id for r in registry.table("cdetr_ablations").rows if r.inferred}
    assert inferred == {"t4_or", "t4_fl"}


def test_every_registry_experiment_has_a_config() -> None:
    registry = load_registry(REGISTRY)
    missing = [e for e in registry.experiments() if not (REPO / "configs" / "experiments" / f"{e}.yaml").is_file()]
    assert not missing, f"registry experiments without configs/experiments/<name>.yaml: {missing}"


def test_missing_experiment_configs_are_listed(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal())
    (tmp_path / "experiments").mkdir()
    with pytest.raises(ConfigError, match=r"exp_a_50ep"):
        load_registry(path, experiments_dir=tmp_path / "experiments")
    (tmp_path / "experiments" / "exp_a_50ep.yaml").write_text("{}\n")
    assert load_registry(path, experiments_dir=tmp_path / "experiments").experiments() == ["exp_a_50ep"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["tables"]["t"]["rows"][0].update(experimnet="x"), r"experimnet.*did you mean"),
        (lambda d: d["tables"]["t"]["rows"][1].update(id="a"), r"rows\[1\].*duplicate row id"),
        (lambda d: d["tables"]["t"]["rows"][0]["paper"].update(APxl=1.0), r"metric 'APxl'"),
        (lambda d: d["tables"]["t"]["rows"][0]["paper"].update(AP="40"), r"paper.AP"),
        (lambda d: d["tables"]["t"].update(metrics=["AP", "mAP"]), r"unknown metric 'mAP'"),
        (lambda d: d["tables"].update({"Bad-Name": d["tables"]["t"]}), r"lower_snake_case"),
        (lambda d: d["compute"].pop("paper"), r"compute"),
        (lambda d: d["compute"]["smoke"]["train"].update(minutes_per_epoch=3), r"exactly one of runtime"),
        (lambda d: d.update(version=2), r"version"),
    ],
)
def test_bad_registry_is_rejected_naming_the_key(tmp_path: Path, mutate, message: str) -> None:
    data = _minimal()
    mutate(data)
    with pytest.raises(ConfigError, match=message) as info:
        load_registry(_write(tmp_path, data))
    assert "tables.yaml" in str(info.value)


def test_resources_scale_with_epochs_and_traits(tmp_path: Path) -> None:
    registry = load_registry(_write(tmp_path, _minimal()))
    r50 = registry.resources("cdetr_r50_50ep", "paper", "train")
    assert r50 == {"gpu": 8, "threads": 32, "mem_mb": 1000, "runtime": 500}
    dc5 = registry.resources("cdetr_dc5_r50_50ep", "paper", "train")
    assert dc5["runtime"] == 1000 and dc5["mem_mb"] == 1500
    # DC5 and R101 multiply; the cap bounds one job (the rest is resumed on retry).
    assert registry.resources("cdetr_dc5_r101_50ep", "paper", "train")["runtime"] == 1000
    assert registry.resources("cdetr_r101_50ep", "paper", "train")["runtime"] == 750
    assert registry.resources("cdetr_dc5_r101_50ep", "paper", "eval")["runtime"] == 180
    assert registry.resources("cdetr_dc5_r101_50ep", "smoke", "train")["gpu"] == 0
    with pytest.raises(ConfigError, match="no '<N>ep'"):
        registry.resources("cdetr_r50", "paper", "train")
    with pytest.raises(ConfigError, match="unknown scale"):
        registry.resources("cdetr_r50_50ep", "huge", "train")


def test_repository_compute_gives_dc5_r101_more_than_r50() -> None:
    registry = load_registry(REGISTRY)
    small = registry.resources("cdetr_r50_50ep", "paper", "train")
    big = registry.resources("cdetr_dc5_r101_50ep", "paper", "train")
    assert big["runtime"] > small["runtime"] and big["mem_mb"] > small["mem_mb"]
    assert registry.resources("cdetr_r50_50ep", "smoke", "train")["gpu"] == 0


def test_experiment_name_parsing() -> None:
    assert experiment_epochs("cdetr_dc5_r101_108ep") == 108
    assert experiment_epochs("cdetr_r50_50ep_csq_c") == 50
    assert experiment_epochs("detr_r50") is None
    assert {"dc5", "r101"} <= experiment_traits("cdetr_dc5_r101_108ep")
    assert "dc5" not in experiment_traits("cdetr_r50_50ep_lambda_block_diagonal")

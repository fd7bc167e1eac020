"""The claims ledger: the verdict rule on made-up inputs, the claims file, seeds as run names, and
a ledger built from run directories."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from replic.config import ConfigError
from replic.eval.coco_eval import score
from replic.workflow.claims import (
    SMOKE_VERDICT,
    Z95,
    Claim,
    SeedPrior,
    combine_verdicts,
    evaluate_ledger,
    load_ledger,
    measure_contrast,
    verdict_of,
    write_ledger,
)
from replic.workflow.registry import seed_replicate, seed_replicates

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
PAIR = {"a": 1.0, "b": -1.0}


def _noise(rng: np.random.Generator, seeds: int, resamples: int = 400, sd: float = 0.3) -> np.ndarray:
    return rng.normal(0.0, sd, size=(seeds, resamples))


@pytest.mark.parametrize(("gap", "expected"), [(5.0, "holds"), (0.0, "not resolved"), (-5.0, "contradicted")])
def test_verdict_of_a_clear_win_a_tie_and_a_clear_loss(gap: float, expected: str) -> None:
    rng = np.random.default_rng(0)
    a = np.array([30.0, 30.4, 29.8]) + gap
    b = np.array([30.1, 29.9, 30.2])
    comp = measure_contrast("a > b", PAIR, {"a": a, "b": b},
                            {"a": a[:, None] + _noise(rng, 3), "b": b[:, None] + _noise(rng, 3)}, None)
    assert comp.verdict == expected
    assert comp.effect == pytest.approx(float((a - b).mean()))
    assert comp.seed_noise == "measured" and comp.seeds == 3
    # The interval is effect +- 1.96 SE with both noise sources.
    se = math.sqrt(comp.sd_images ** 2 + comp.sd_seeds ** 2 / 3)
    assert comp.high - comp.low == pytest.approx(2 * Z95 * se)
    assert comp.sd_seeds == pytest.approx(float((a - b).std(ddof=1)))


def test_seed_noise_widens_the_interval_that_image_noise_alone_would_resolve() -> None:
    """Seeds that disagree more than the images do leave a small gap unresolved."""
    a, b = np.array([31.0, 28.0, 33.0]), np.array([30.0, 30.0, 30.0])
    resampled = {"a": a[:, None] + np.zeros((3, 100)), "b": b[:, None] + np.linspace(-0.1, 0.1, 100)}
    comp = measure_contrast("a > b", PAIR, {"a": a, "b": b}, resampled, None)
    assert comp.sd_images < 0.1 < comp.sd_seeds
    assert comp.effect > 0 and comp.verdict == "not resolved"


def test_one_seed_takes_the_declared_prior_and_says_so() -> None:
    a, b = np.array([33.0]), np.array([30.0])
    resampled = {"a": np.full((1, 50), 33.0), "b": np.full((1, 50), 30.0)}
    with_prior = measure_contrast("a > b", PAIR, {"a": a, "b": b}, resampled, SeedPrior(1.0, "test"))
    assert with_prior.seed_noise == "assumed" and with_prior.sd_seeds == pytest.approx(1.0)
    assert (with_prior.low, with_prior.high) == pytest.approx((3 - Z95, 3 + Z95))
    assert with_prior.verdict == "holds"
    # A gain difference (four runs) carries twice the variance of a pair: sqrt(2) x the prior.
    four = {k: np.array([v]) for k, v in {"a1": 33.0, "b1": 30.0, "a2": 31.0, "b2": 30.0}.items()}
    gd = measure_contrast("gd", {"a1": 1, "b1": -1, "a2": -1, "b2": 1}, four,
                          {k: np.repeat(v[:, None], 10, 1) for k, v in four.items()}, SeedPrior(1.0, "test"))
    assert gd.effect == pytest.approx(2.0) and gd.sd_seeds == pytest.approx(math.sqrt(2))
    # Without a prior one seed cannot bound its seed noise: never resolved.
    without = measure_contrast("a > b", PAIR, {"a": a, "b": b}, resampled, None)
    assert without.verdict == "not resolved" and math.isinf(without.high)


def test_ordering_combines_its_pairs() -> None:
    assert combine_verdicts(["holds", "holds"]) == "holds"
    assert combine_verdicts(["holds", "not resolved"]) == "not resolved"
    assert combine_verdicts(["holds", "contradicted", "not resolved"]) == "contradicted"
    assert verdict_of(0.1, 2.0) == "holds" and verdict_of(-2.0, -0.1) == "contradicted"
    assert verdict_of(-0.1, 0.1) == verdict_of(0.0, 1.0) == "not resolved"


def test_contrasts_of_each_kind() -> None:
    pair = Claim("p", "P", "T1", "x", "pair", ["a", "b"], ["mini"])
    assert pair.contrasts() == [("a > b", {"a": 1.0, "b": -1.0})]
    order = Claim("o", "P", "T3", "x", "ordering", ["a", "b", "c"], ["mini"])
    assert [w for _, w in order.contrasts()] == [{"a": 1.0, "b": -1.0}, {"b": 1.0, "c": -1.0}]
    gain = Claim("g", "P", "T1", "x", "gain_difference", ["a1", "b1", "a2", "b2"], ["mini"])
    assert gain.contrasts()[0][1] == {"a1": 1.0, "b1": -1.0, "a2": -1.0, "b2": 1.0}
    each = Claim("e", "P", "T", "x", "beats_each", ["c", "s1", "s2"], ["mini"])
    assert [w for _, w in each.contrasts()] == [{"c": 1.0, "s1": -1.0}, {"c": 1.0, "s2": -1.0}]
    # (c - base) - (s1 - base) - (s2 - base) - (s3 - base) = c + 2 base - s1 - s2 - s3
    added = Claim("a", "P", "T", "x", "gain_sum", ["c", "base", "s1", "s2", "s3"], ["mini"])
    ((label, weights),) = added.contrasts()
    assert weights == {"c": 1.0, "base": 2.0, "s1": -1.0, "s2": -1.0, "s3": -1.0}
    assert label == "(c - base) > (s1 - base) + (s2 - base) + (s3 - base)"
    observed = {"c": 35.0, "base": 30.0, "s1": 32.0, "s2": 31.0, "s3": 30.5}  # gains 5 vs 2 + 1 + 0.5
    assert sum(w * observed[r] for r, w in weights.items()) == pytest.approx(1.5)


def test_the_claims_file_loads_and_names_only_experiments() -> None:
    ledger = load_ledger(REPO / "configs" / "claims.yaml", EXPERIMENTS)
    papers = {c.paper for c in ledger.claims}
    assert papers == {"Conditional DETR", "KS-DETR", "D³ETR", "MasKD", "beyond the papers"}
    assert all(c.beyond_papers for c in ledger.claims if c.paper == "beyond the papers")
    mini = ledger.runs("mini")
    assert len(mini) == len(set(mini))
    # The headline pairs have three seeds at mini: the runs <row>, <row>_seed1, <row>_seed2.
    assert {"cdetr_r50_50ep", "cdetr_r50_50ep_seed1", "cdetr_r50_50ep_seed2"} <= set(mini)
    for name in mini:
        base, seed = seed_replicate(name, EXPERIMENTS)
        assert (EXPERIMENTS / f"{base}.yaml").is_file(), name
        assert (seed is None) == (name == base)


@pytest.mark.parametrize(("text", "message"), [
    ("rows: [cdetr_r50_50ep, no_such_experiment]", "claim c1: no experiment config"),
    ("rows: [cdetr_r50_50ep]", "kind pair takes 2 rows"),
    ("rows: [cdetr_r50_50ep, detr_r50_50ep, cdetr_r50_12ep]\n    kind: gain_sum", "gain_sum takes"),
    ("rows: [cdetr_r50_50ep, detr_r50_50ep]\n    seeds: {minii: 3}", "unknown scale 'minii'"),
    ("rows: [cdetr_r50_50ep, detr_r50_50ep]\n    colour: red", "colour"),
])
def test_a_bad_claims_file_names_the_claim_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "claims.yaml"
    path.write_text("version: 1\ndefault_seeds: {mini: 1}\nclaims:\n  - id: c1\n    paper: P\n    where: T1\n"
                    f"    text: t\n    kind: pair\n    scales: [mini]\n    {text}\n")
    with pytest.raises(ConfigError, match=message):
        load_ledger(path, EXPERIMENTS)


def test_seed_replicates_are_one_experiment_file(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text("seed: 42\n")
    (tmp_path / "own_seed3.yaml").write_text("seed: 3\n")
    assert seed_replicate("exp", tmp_path) == ("exp", None)
    assert seed_replicate("exp_seed2", tmp_path) == ("exp", 2)
    assert seed_replicate("own_seed3", tmp_path) == ("own_seed3", None)  # a file of its own wins
    assert seed_replicate("other_seed1", tmp_path) == ("other_seed1", None)
    assert seed_replicates("exp", 3) == ["exp", "exp_seed1", "exp_seed2"]
    with pytest.raises(ValueError):
        seed_replicates("exp", 0)


# --- a ledger from run directories -----------------------------------------------------------

def _ground_truth(n_images: int = 30) -> dict:
    rng = np.random.default_rng(1)
    images, annotations = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"})
        for k in range(2):
            x, y = rng.uniform(5, 50, size=2)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1 + k,
                                "bbox": [float(x), float(y), 30.0, 30.0], "area": 900.0, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _detections(gt: dict, jitter: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        dx, dy = rng.normal(0, jitter, size=2)
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                     "bbox": [x + float(dx), y + float(dy), w, h], "score": float(rng.uniform(0.5, 1.0))})
    return dets


def _write_run(runs: Path, scale: str, name: str, gt: dict, dets: list[dict]) -> None:
    out = runs / scale / name / "eval"
    out.mkdir(parents=True)
    (out / "detections.json").write_text(json.dumps(dets))
    metrics = score(gt, dets)
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "eval": {"backend": "pycocotools"},
                                                  "config_hash": f"hash-{name}",
                                                  "provenance": {"git": {"commit": "abc", "dirty": False}}}))


def _ledger_file(tmp_path: Path, seeds: int) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(f"""version: 1
default_seeds: {{smoke: {seeds}, mini: {seeds}}}
bootstrap: {{resamples: 300, seed: 0}}
claims:
  - {{id: better, paper: P, where: T1, text: "sharp beats jittered", kind: pair,
      rows: [cdetr_r50_50ep, detr_r50_50ep], scales: [smoke, mini], paper_effect: 6.0}}
  - {{id: tie, paper: P, where: T2, text: "identical detections", kind: pair,
      rows: [cdetr_r50_12ep, cdetr_r50_75ep], scales: [mini]}}
""")
    return path


def test_a_ledger_from_run_directories(tmp_path: Path) -> None:
    gt = _ground_truth()
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    runs = tmp_path / "runs"
    ledger = load_ledger(_ledger_file(tmp_path, seeds=2), EXPERIMENTS)
    for seed, name in enumerate(seed_replicates("cdetr_r50_50ep", 2)):
        _write_run(runs, "mini", name, gt, _detections(gt, 0.5, seed))
    for seed, name in enumerate(seed_replicates("detr_r50_50ep", 2)):
        _write_run(runs, "mini", name, gt, _detections(gt, 6.0, 10 + seed))
    same = _detections(gt, 3.0, 99)
    for name in seed_replicates("cdetr_r50_12ep", 2) + seed_replicates("cdetr_r50_75ep", 2):
        _write_run(runs, "mini", name, gt, same)

    results = {r.claim.id: r for r in evaluate_ledger(ledger, "mini", gt_path, runs)}
    better = results["better"].comparisons[0]
    assert results["better"].verdict == "holds" and better.effect > 10 and better.seeds == 2
    tie = results["tie"].comparisons[0]
    # A bootstrap on identical detections: a zero-width difference, and no verdict either way.
    assert tie.effect == 0 and tie.low == tie.high == 0 and tie.sd_images == 0
    assert results["tie"].verdict == "not resolved"

    write_ledger(list(results.values()), ledger, "mini", str(runs), tmp_path / "results")
    rows = list(csv.DictReader((tmp_path / "results" / "claims_mini.csv").open()))
    assert [r["claim"] for r in rows] == ["better", "tie"]
    assert rows[0]["verdict"] == "holds" and rows[0]["paper_effect"] == "6.0" and rows[0]["seed_noise"] == "measured"
    assert rows[0]["runs"].split() == ["cdetr_r50_50ep", "cdetr_r50_50ep_seed1", "detr_r50_50ep", "detr_r50_50ep_seed1"]
    markdown = (tmp_path / "results" / "claims_mini.md").read_text()
    assert "| better |" in markdown and "holds" in markdown
    # Links to the runs work from where the Markdown file is (results/ beside runs/).
    assert "(../runs/mini/cdetr_r50_50ep_seed1/provenance.json)" in markdown
    provenance = json.loads((tmp_path / "results" / "claims_mini.provenance.json").read_text())
    assert provenance["runs"]["detr_r50_50ep_seed1"]["config_hash"] == "hash-detr_r50_50ep_seed1"


def test_smoke_gives_no_verdict_and_a_wrong_ground_truth_is_caught(tmp_path: Path) -> None:
    gt = _ground_truth()
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    runs = tmp_path / "runs"
    ledger = load_ledger(_ledger_file(tmp_path, seeds=1), EXPERIMENTS)
    _write_run(runs, "smoke", "cdetr_r50_50ep", gt, _detections(gt, 0.5, 0))
    _write_run(runs, "smoke", "detr_r50_50ep", gt, _detections(gt, 6.0, 1))
    (result,) = evaluate_ledger(ledger, "smoke", gt_path, runs)
    assert result.verdict == SMOKE_VERDICT
    write_ledger([result], ledger, "smoke", str(runs), tmp_path / "results")
    assert "Smoke scale cannot test claims" in (tmp_path / "results" / "claims_smoke.md").read_text()
    # Another val set than the runs were evaluated on: refused, naming the run's metrics file.
    other = dict(gt, annotations=gt["annotations"][::2])
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="cdetr_r50_50ep/eval/metrics.json"):
        evaluate_ledger(ledger, "smoke", other_path, runs)

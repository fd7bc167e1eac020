"""The claims ledger: each paper's claims as data (``configs/claims.yaml``), each with a verdict.

A claim names the runs that test it and the comparison it makes, as a contrast (a signed sum of
the runs' metric) that the paper says is positive:

* ``pair``: ``rows: [A, B]``, A beats B (A - B > 0), optionally with the published size;
* ``ordering``: ``rows: [best, ..., worst]``, every adjacent pair a ``pair``;
* ``gain_difference``: ``rows: [A1, B1, A2, B2]``, the gain A1 - B1 exceeds A2 - B2;
* ``beats_each``: ``rows: [A, B1, B2, ...]``, A beats every B (a combination vs each single method);
* ``gain_sum``: ``rows: [C, base, S1, S2, ...]``, the gain C - base exceeds the sum of the gains
  S_i - base (the gains add, or more).

The verdict rule, fixed before any number was seen (docs/claims.md states it for readers):

1. Each run is evaluated once on the val images; every claim at a scale shares the same
   bootstrap resamples of those images (``replic.eval.bootstrap``).
2. With n seeds, the effect is the mean over seeds of the contrast, in AP points.
3. Its standard error adds two noise sources: the val images (the SD of the seed-averaged
   contrast over the resamples) and the seeds (the SD of the per-seed contrasts / sqrt(n), for
   n >= 2; for n = 1 the scale's declared ``seed_sd_prior``, scaled to the contrast, and the
   ledger says the seed noise was assumed).
4. The 95 % interval is effect +- 1.96 SE. **holds**: the interval lies above 0;
   **contradicted**: below 0; **not resolved**: it contains 0. An ordering holds when every
   adjacent pair holds, is contradicted when any pair is, and is otherwise not resolved (the
   same for the several contrasts of ``beats_each``).
5. At smoke scale no verdict is given (models there do not learn): the ledger is a pipeline check.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from replic.config import ConfigError, from_dict, load_yaml
from replic.io import atomic_write_text
from replic.workflow.gather import code_state
from replic.workflow.registry import SCALES, seed_replicates

KINDS = ("pair", "ordering", "gain_difference")
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
VERDICTS = ("holds", "contradicted", "not resolved")
SMOKE_VERDICT = "not testable at smoke"


@dataclass
class Claim:
    """One claim of one paper and the runs (experiments) that test it."""

    id: str
    paper: str
    where: str
    text: str
    kind: Literal["pair", "ordering", "gain_difference", "beats_each", "gain_sum"]
    rows: list[str]
    scales: list[str]
    metric: str = "AP"
    # Seeds per scale; scales not named take the ledger's default.
    seeds: dict[str, int] = field(default_factory=dict)
    # The published size of the effect in AP points (a pair's gain), shown beside ours.
    paper_effect: float | None = None
    # A question none of the papers asked (e.g. whether methods compose).
    beyond_papers: bool = False
    note: str | None = None

    def validate(self) -> None:
        needed = {"pair": 2, "gain_difference": 4}.get(self.kind)
        if needed is not None and len(self.rows) != needed:
            raise ConfigError(f"claim {self.id}: kind {self.kind} takes {needed} rows, got {len(self.rows)}")
        if self.kind == "ordering" and len(self.rows) < 2:
            raise ConfigError(f"claim {self.id}: an ordering takes at least 2 rows")
        if self.kind == "beats_each" and len(self.rows) < 2:
            raise ConfigError(f"claim {self.id}: beats_each takes a row and at least one it beats")
        if self.kind == "gain_sum" and len(self.rows) < 4:
            raise ConfigError(f"claim {self.id}: gain_sum takes [combination, base, single, single, ...]")
        if len(set(self.rows)) != len(self.rows):
            raise ConfigError(f"claim {self.id}: a row is named twice: {self.rows}")
        for scale in [*self.scales, *self.seeds]:
            if scale not in SCALES:
                raise ConfigError(f"claim {self.id}: unknown scale {scale!r} (one of {', '.join(SCALES)})")
        if any(n < 1 for n in self.seeds.values()):
            raise ConfigError(f"claim {self.id}: seeds must be >= 1")

    def contrasts(self) -> list[tuple[str, dict[str, float]]]:
        """(label, {row: weight}) of each comparison; the claim says each weighted sum is > 0."""
        if self.kind == "pair":
            return [(f"{self.rows[0]} > {self.rows[1]}", {self.rows[0]: 1.0, self.rows[1]: -1.0})]
        if self.kind == "gain_difference":
            a1, b1, a2, b2 = self.rows
            return [(f"({a1} - {b1}) > ({a2} - {b2})", {a1: 1.0, b1: -1.0, a2: -1.0, b2: 1.0})]
        if self.kind == "beats_each":
            return [(f"{self.rows[0]} > {b}", {self.rows[0]: 1.0, b: -1.0}) for b in self.rows[1:]]
        if self.kind == "gain_sum":
            # (C − base) − Σ_i (S_i − base) = C + (n − 1)·base − Σ_i S_i
            combo, base, singles = self.rows[0], self.rows[1], self.rows[2:]
            label = f"({combo} - {base}) > " + " + ".join(f"({s} - {base})" for s in singles)
            return [(label, {combo: 1.0, base: float(len(singles) - 1), **{s: -1.0 for s in singles}})]
        return [(f"{a} > {b}", {a: 1.0, b: -1.0}) for a, b in zip(self.rows, self.rows[1:])]


@dataclass
class SeedPrior:
    """The SD of a paired difference between two runs' seeds, when a claim has one seed."""

    value: float
    source: str


@dataclass
class Bootstrap:
    resamples: int = 1000
    seed: int = 0


@dataclass
class Ledger:
    """The whole claims file."""

    version: int
    default_seeds: dict[str, int]
    claims: list[Claim]
    seed_sd_prior: dict[str, SeedPrior] = field(default_factory=dict)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def validate(self) -> None:
        ids = [c.id for c in self.claims]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"claims: duplicate ids {duplicates}")
        for scale in [*self.default_seeds, *self.seed_sd_prior]:
            if scale not in SCALES:
                raise ConfigError(f"claims: unknown scale {scale!r} (one of {', '.join(SCALES)})")

    def seeds(self, claim: Claim, scale: str) -> int:
        return claim.seeds.get(scale, self.default_seeds.get(scale, 1))

    def at_scale(self, scale: str) -> list[Claim]:
        return [c for c in self.claims if scale in c.scales]

    def only(self, ids: Sequence[str]) -> Ledger:
        """The ledger restricted to the claims ``ids`` (in the file's order); unknown ids are errors."""
        known = [c.id for c in self.claims]
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"claims: no claim {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        return replace(self, claims=[c for c in self.claims if c.id in ids])

    def runs(self, scale: str) -> list[str]:
        """Every run (seed replicates included) the claims at ``scale`` read, each once."""
        names: list[str] = []
        for claim in self.at_scale(scale):
            for row in claim.rows:
                names += [n for n in seed_replicates(row, self.seeds(claim, scale)) if n not in names]
        return names


def load_ledger(path: str | Path, experiments_dir: str | Path | None = None) -> Ledger:
    """Read and check the claims file; with ``experiments_dir``, every row must be an experiment."""
    raw = load_yaml(path)
    try:
        ledger = from_dict(Ledger, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if experiments_dir is not None:
        for claim in ledger.claims:
            for row in claim.rows:
                if not (Path(experiments_dir) / f"{row}.yaml").is_file():
                    raise ConfigError(f"{path}: claim {claim.id}: no experiment config "
                                      f"{Path(experiments_dir) / f'{row}.yaml'}")
    return ledger


@dataclass
class Comparison:
    """One contrast of a claim, measured: effect and interval in AP points."""

    label: str
    effect: float
    low: float
    high: float
    sd_images: float
    sd_seeds: float
    seeds: int
    seed_noise: Literal["measured", "assumed"]
    per_seed: list[float]

    @property
    def verdict(self) -> str:
        return verdict_of(self.low, self.high)


def verdict_of(low: float, high: float) -> str:
    """The rule: an interval above 0 holds, below 0 is contradicted, else not resolved."""
    if low > 0:
        return "holds"
    if high < 0:
        return "contradicted"
    return "not resolved"


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """An ordering: holds if every pair holds, contradicted if any pair is, else not resolved."""
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    return "not resolved"


def measure_contrast(label: str, weights: dict[str, float], observed: dict[str, np.ndarray],
                     resampled: dict[str, np.ndarray], prior: SeedPrior | None) -> Comparison:
    """Effect, interval and noise of one contrast.

    ``observed[row]``: the row's metric per seed (n,), in AP points; ``resampled[row]``: (n, R),
    the same under R shared image resamples. A one-seed contrast takes its seed noise from
    ``prior`` (the SD of a two-run difference), scaled by sqrt(sum of squared weights / 2).
    """
    n = {len(observed[row]) for row in weights}
    if len(n) != 1:
        raise ValueError(f"{label}: rows have different numbers of seeds {sorted(n)}")
    seeds = n.pop()
    per_seed = sum(w * observed[row] for row, w in weights.items())  # (n,)
    per_resample = sum(w * resampled[row] for row, w in weights.items()).mean(axis=0)  # (R,)
    effect = float(per_seed.mean())
    sd_images = float(per_resample.std(ddof=1)) if per_resample.size > 1 else 0.0
    if seeds >= 2:
        sd_seeds, noise = float(per_seed.std(ddof=1)), "measured"
    elif prior is not None:
        sd_seeds, noise = prior.value * math.sqrt(sum(w * w for w in weights.values()) / 2), "assumed"
    else:
        sd_seeds, noise = math.inf, "assumed"  # no way to bound seed noise: never resolved
    se = math.sqrt(sd_images ** 2 + sd_seeds ** 2 / seeds)
    return Comparison(label, effect, effect - Z95 * se, effect + Z95 * se, sd_images, sd_seeds, seeds, noise,
                      [float(v) for v in per_seed])


@dataclass
class ClaimResult:
    claim: Claim
    comparisons: list[Comparison]
    verdict: str


def evaluate_ledger(ledger: Ledger, scale: str, gt: str | Path, runs_dir: str | Path) -> list[ClaimResult]:
    """Every claim at ``scale`` measured on the runs' detections (``<runs_dir>/<scale>/<run>/eval``)."""
    from replic.eval.bootstrap import ImageEvaluation, resampled_metrics

    names = ledger.runs(scale)
    evaluations: dict[str, ImageEvaluation] = {}
    for name in names:
        eval_dir = Path(runs_dir) / scale / name / "eval"
        evaluations[name] = ImageEvaluation(gt, eval_dir / "detections.json")
    results: list[ClaimResult] = []
    for claim in ledger.at_scale(scale):
        seeds = ledger.seeds(claim, scale)
        runs = {row: seed_replicates(row, seeds) for row in claim.rows}
        flat = [name for row in claim.rows for name in runs[row]]
        # Shared resamples for every run of the ledger: the same seed draws the same image counts.
        samples = 100 * resampled_metrics([evaluations[n] for n in flat], claim.metric,
                                          ledger.bootstrap.resamples, ledger.bootstrap.seed)
        full = {n: 100 * evaluations[n].metric(claim.metric) for n in flat}
        _check_against_metrics_json(runs_dir, scale, flat, full, claim.metric)
        observed = {row: np.array([full[n] for n in runs[row]]) for row in claim.rows}
        resampled = {row: samples[[flat.index(n) for n in runs[row]]] for row in claim.rows}
        prior = ledger.seed_sd_prior.get(scale)
        comparisons = [measure_contrast(label, weights, observed, resampled, prior)
                       for label, weights in claim.contrasts()]
        verdict = SMOKE_VERDICT if scale == "smoke" else combine_verdicts([c.verdict for c in comparisons])
        results.append(ClaimResult(claim, comparisons, verdict))
    return results


def _check_against_metrics_json(runs_dir: str | Path, scale: str, names: list[str], full: dict[str, float],
                                metric: str) -> None:
    """The re-scored metric must equal the run's own evaluation: a check that the ground truth
    given is the one the run was evaluated on."""
    for name in names:
        path = Path(runs_dir) / scale / name / "eval" / "metrics.json"
        recorded = json.loads(path.read_text())
        value = recorded.get("metrics", {}).get(metric)
        if recorded.get("eval", {}).get("backend", "pycocotools") != "pycocotools":
            continue  # another scorer may round differently
        if value is not None and abs(100 * float(value) - full[name]) > 1e-6:
            raise ValueError(f"{path}: {metric} {100 * float(value):.4f} but the detections re-scored on the "
                             f"given ground truth give {full[name]:.4f}: another val set?")


CSV_FIELDS = ("claim", "paper", "where", "kind", "comparison", "metric", "seeds", "effect", "ci_low", "ci_high",
              "sd_images", "sd_seeds", "seed_noise", "paper_effect", "verdict", "claim_verdict", "beyond_papers",
              "runs", "text")


def _fmt(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.2f}"


def ledger_rows(results: list[ClaimResult], ledger: Ledger, scale: str) -> list[dict[str, Any]]:
    """One CSV row per comparison (an ordering has one per adjacent pair)."""
    rows = []
    for result in results:
        claim = result.claim
        names = [n for row in claim.rows for n in seed_replicates(row, ledger.seeds(claim, scale))]
        for comp in result.comparisons:
            rows.append({
                "claim": claim.id, "paper": claim.paper, "where": claim.where, "kind": claim.kind,
                "comparison": comp.label, "metric": claim.metric, "seeds": comp.seeds,
                "effect": _fmt(comp.effect), "ci_low": _fmt(comp.low), "ci_high": _fmt(comp.high),
                "sd_images": _fmt(comp.sd_images), "sd_seeds": _fmt(comp.sd_seeds), "seed_noise": comp.seed_noise,
                "paper_effect": "" if claim.paper_effect is None else f"{claim.paper_effect:.1f}",
                "verdict": SMOKE_VERDICT if scale == "smoke" else comp.verdict,
                "claim_verdict": result.verdict, "beyond_papers": claim.beyond_papers,
                "runs": " ".join(names), "text": claim.text,
            })
    return rows


def ledger_markdown(results: list[ClaimResult], ledger: Ledger, scale: str, runs_dir: str,
                    link_root: str | None = None) -> str:
    """The ledger as Markdown: a verdict per claim, its comparisons, and links to the runs
    (``link_root``: the runs directory as seen from where the Markdown file lives)."""
    title = f"Claim {ledger.claims[0].id}" if len(ledger.claims) == 1 else "Claims ledger"
    out = [f"# {title} — {scale} scale", ""]
    if scale == "smoke":
        out += ["**Smoke scale cannot test claims**: its models do not learn (a pipeline check of the "
                "ledger only). Build `results/claims_mini.md` with `--config scale=mini` for verdicts.", ""]
    out += ["Effect: the mean over seeds of the claimed comparison, in AP points; 95 % interval from the val "
            "images (paired bootstrap, shared resamples) and the seeds. **holds**: interval above 0; "
            "**contradicted**: below 0; **not resolved**: contains 0. The rule: docs/claims.md.", ""]
    counts = {v: sum(r.verdict == v for r in results) for v in (*VERDICTS, SMOKE_VERDICT)}
    out += [", ".join(f"{n} {v}" for v, n in counts.items() if n), ""]
    out += ["| claim | paper | where | comparison | seeds | effect | 95 % interval | published | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        claim = result.claim
        for i, comp in enumerate(result.comparisons):
            assumed = " (seed noise assumed)" if comp.seed_noise == "assumed" else ""
            verdict = SMOKE_VERDICT if scale == "smoke" else comp.verdict
            if len(result.comparisons) > 1 and i == 0 and scale != "smoke":
                verdict = f"{verdict} (ordering: {result.verdict})"
            name = f"{claim.id}{' †' if claim.beyond_papers else ''}" if i == 0 else ""
            published = "" if claim.paper_effect is None or i else f"{claim.paper_effect:+.1f}"
            out.append(f"| {name} | {claim.paper if i == 0 else ''} | {claim.where if i == 0 else ''} | "
                       f"{comp.label} | {comp.seeds} | {comp.effect:+.2f} | "
                       f"[{_fmt(comp.low)}, {_fmt(comp.high)}]{assumed} | {published} | {verdict} |")
    out += ["", "† beyond the papers: a question none of them asked.", ""]
    state = code_state([(r.get("train_git_commit"), r.get("train_git_dirty"))
                        for r in (_run_provenance(Path(runs_dir) / scale / n) for n in ledger.runs(scale))])
    if state:
        out += [state, ""]
    out += ["## Claims", ""]
    for result in results:
        claim = result.claim
        names = [n for row in claim.rows for n in seed_replicates(row, ledger.seeds(claim, scale))]
        root = runs_dir if link_root is None else link_root
        links = ", ".join(f"[{n}]({root}/{scale}/{n}/provenance.json)" for n in names)
        out += [f"- **{claim.id}** ({claim.paper}, {claim.where}): {claim.text} — runs: {links}"
                + (f". {claim.note}" if claim.note else "")]
    return "\n".join(out) + "\n"


def write_ledger(results: list[ClaimResult], ledger: Ledger, scale: str, runs_dir: str, out_dir: str | Path,
                 stem: str | None = None) -> None:
    """``<stem>.{csv,md,provenance.json}`` under ``out_dir`` (stem ``claims_<scale>`` by default),
    each written atomically."""
    out_dir = Path(out_dir)
    stem = stem or f"claims_{scale}"
    rows = ledger_rows(results, ledger, scale)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / f"{stem}.csv", buffer.getvalue())
    link_root = os.path.relpath(Path(runs_dir).resolve(), out_dir.resolve())
    atomic_write_text(out_dir / f"{stem}.md", ledger_markdown(results, ledger, scale, runs_dir, link_root))
    provenance = {
        "scale": scale, "bootstrap": {"resamples": ledger.bootstrap.resamples, "seed": ledger.bootstrap.seed},
        "runs": {n: _run_provenance(Path(runs_dir) / scale / n) for n in ledger.runs(scale)},
    }
    atomic_write_text(out_dir / f"{stem}.provenance.json", json.dumps(provenance, indent=2) + "\n")


def _run_provenance(run_dir: Path) -> dict[str, Any]:
    """What the ledger records of each run: where it is, its config hash, and the commit and
    dirty flag of the code that trained and evaluated it."""
    record: dict[str, Any] = {"run_dir": str(run_dir)}
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.is_file():
        evaluated = json.loads(metrics.read_text())
        git = evaluated.get("provenance", {}).get("git") or {}
        record.update({"metrics": str(metrics), "config_hash": evaluated.get("config_hash"),
                       "eval_git_commit": git.get("commit"), "eval_git_dirty": git.get("dirty")})
    train = run_dir / "provenance.json"
    if train.is_file():
        git = json.loads(train.read_text()).get("git") or {}
        record.update({"provenance": str(train), "train_git_commit": git.get("commit"),
                       "train_git_dirty": git.get("dirty")})
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replic.workflow.claims", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", required=True, help="the claims file (configs/claims.yaml)")
    parser.add_argument("--scale", required=True, choices=SCALES)
    parser.add_argument("--gt", required=True, help="the val ground truth the runs were evaluated on")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--experiments-dir", default="configs/experiments")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--claim", action="append", default=[], metavar="ID",
                        help="only this claim (repeatable); the files are then named after the claim")
    args = parser.parse_args(argv)
    try:
        ledger = load_ledger(args.claims, args.experiments_dir)
        if args.claim:
            ledger = ledger.only(args.claim)
        if not ledger.at_scale(args.scale):
            raise ConfigError(f"claims: {', '.join(args.claim) or 'no claim'} cannot be tested at {args.scale} scale")
        results = evaluate_ledger(ledger, args.scale, args.gt, args.runs_dir)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"claims: error: {err}", file=sys.stderr)
        return 2
    write_ledger(results, ledger, args.scale, args.runs_dir, args.out_dir,
                 stem="_".join(args.claim) if args.claim else None)
    for result in results:
        print(f"{result.claim.id}: {result.verdict} "
              + "; ".join(f"{c.label} {c.effect:+.2f} [{_fmt(c.low)}, {_fmt(c.high)}]" for c in result.comparisons))
    return 0


if __name__ == "__main__":
    sys.exit(main())

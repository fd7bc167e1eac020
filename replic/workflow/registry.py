"""The table registry (``configs/tables.yaml``): paper tables → rows → experiment + published numbers.

The Snakefile derives its whole DAG from this registry, so it is loaded strictly
(unknown keys, unknown metric names, duplicate row ids and missing experiment
configs are errors naming the table and row) before any job is scheduled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replic.config import ConfigError, from_dict, load_yaml

#: Metrics measured by ``replic eval`` (fractions there, AP points in tables).
MEASURED_METRICS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
#: Numbers the paper reports that replic does not re-measure.
PAPER_ONLY_METRICS: tuple[str, ...] = ("GFLOPs", "params_M")
SCALES: tuple[str, ...] = ("smoke", "mini", "paper")
# Scales every registry must size; ``mini`` is optional (its tables then cannot run at mini).
REQUIRED_SCALES: tuple[str, ...] = ("smoke", "paper")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


@dataclass
class Row:
    """One row of a paper table: the experiment that fills it and what the paper reports."""

    id: str
    label: str
    source: str
    experiment: str | None = None  # None: a cited baseline that is not re-run
    epochs: int | None = None
    group: str | None = None
    inferred: bool = False
    note: str | None = None
    paper: dict[str, float | None] = field(default_factory=dict)
    # A paper that publishes only a gain (e.g. D³ETR: "+7.8 AP") states it relative to another row
    # of the same table: ``gain_over: <row id>`` and ``paper_gain: {AP: 7.8}``; the table then
    # shows the paper's gain beside ours (this row's result minus that row's).
    gain_over: str | None = None
    paper_gain: dict[str, float | None] = field(default_factory=dict)
    # A combination of methods (the composition table): the rows of its single methods, whose
    # gains (each over the same base) are summed beside this row's gain — do the gains add?
    sum_of: list[str] = field(default_factory=list)
    # The scales this row is run at (empty: every scale). E.g. a distilled row with the paper's
    # weights at a small scale, where the weight rule sets the other rows' weights: at paper scale
    # the two are the same run, so it is not repeated there.
    scales: list[str] = field(default_factory=list)

    def at(self, scale: str | None) -> bool:
        """Whether this row is run at ``scale`` (None: any)."""
        return scale is None or not self.scales or scale in self.scales


@dataclass
class Table:
    """A paper table: its rows and the metric columns compared with ours."""

    title: str
    source: str
    metrics: list[str]
    rows: list[Row]
    paper_only: list[str] = field(default_factory=list)
    test_only: bool = False
    # The paper this table reproduces, when not the registry's ``paper`` (several papers share it).
    paper: str | None = None
    # Shown under the title: what the paper says that is not a number (e.g. a qualitative claim).
    note: str | None = None

    def gain_metrics(self) -> list[str]:
        """Metrics (in column order) for which some row states a published gain or a base row."""
        if not any(row.gain_over for row in self.rows):
            return []
        named = {m for row in self.rows for m in row.paper_gain}
        return [m for m in self.metrics if m in named] or self.metrics[:1]


@dataclass
class JobCompute:
    """Resources of one job kind (train or eval) at one scale."""

    gpu: int = 0
    threads: int | None = None
    cpus_per_gpu: int | None = None
    mem_mb: int = 2000
    runtime: int | None = None  # minutes; fixed
    minutes_per_epoch: float | None = None  # or estimated from the epochs
    max_runtime: int | None = None  # cap (minutes); longer runs resume on retry
    # What one job typically takes (minutes, measured) where ``runtime`` is only a cap: the cost
    # estimates of ``replic tables`` at CPU scales.
    typical_minutes: float | None = None

    def validate(self) -> None:
        if self.gpu < 0 or self.mem_mb <= 0:
            raise ConfigError("gpu must be >= 0 and mem_mb > 0")
        if (self.runtime is None) == (self.minutes_per_epoch is None):
            raise ConfigError("give exactly one of runtime and minutes_per_epoch")
        if self.threads is None and self.cpus_per_gpu is None:
            raise ConfigError("give threads or cpus_per_gpu")
        if self.cpus_per_gpu is not None and self.gpu == 0:
            raise ConfigError("cpus_per_gpu needs gpu > 0")


@dataclass
class Factor:
    """Multipliers applied to an experiment with a given trait (e.g. dc5, r101)."""

    runtime: float = 1.0
    mem_mb: float = 1.0


@dataclass
class ScaleCompute:
    train: JobCompute
    eval: JobCompute
    factors: dict[str, Factor] = field(default_factory=dict)


@dataclass
class Registry:
    """The whole registry file."""

    version: int
    paper: str
    tables: dict[str, Table]
    compute: dict[str, ScaleCompute]

    def validate(self) -> None:
        if self.version != 1:
            raise ConfigError(f"version: only 1 is supported, got {self.version}")
        missing = [s for s in REQUIRED_SCALES if s not in self.compute]
        if missing or set(self.compute) - set(SCALES):
            raise ConfigError(f"compute: need the scales {list(REQUIRED_SCALES)} (and optionally "
                              f"{sorted(set(SCALES) - set(REQUIRED_SCALES))}), got {sorted(self.compute)}")
        for name, table in self.tables.items():
            _validate_table(name, table)

    def table(self, name: str) -> Table:
        """The table called ``name``, or a ConfigError listing the known ones."""
        if name not in self.tables:
            raise ConfigError(f"unknown table '{name}'; registered: {sorted(self.tables)}")
        return self.tables[name]

    def experiments(self, tables: list[str] | None = None, scale: str | None = None) -> list[str]:
        """Distinct experiments needed by ``tables`` (default: all) at ``scale`` (default: any), sorted:
        each is run once."""
        names = self.tables if tables is None else tables
        return sorted({row.experiment for t in names for row in self.table(t).rows
                       if row.experiment and row.at(scale)})

    def resources(self, experiment: str, scale: str, job: str, epochs: int | None = None,
                  capped: bool = True) -> dict[str, int]:
        """Snakemake resources (``gpu``, ``threads``, ``mem_mb``, ``runtime`` minutes) of one job.

        ``job`` is ``"train"`` or ``"eval"``. Paper-scale runtimes grow with the epochs
        and with the factors of the experiment's traits (:func:`experiment_traits`); ``capped``
        False gives the whole run's time rather than one job's (a capped job resumes on retry).
        """
        if scale not in self.compute:
            raise ConfigError(f"unknown scale '{scale}'; known: {sorted(self.compute)}")
        spec: JobCompute = getattr(self.compute[scale], job)
        factors = self.compute[scale].factors
        runtime_factor = mem_factor = 1.0
        for trait in experiment_traits(experiment):
            if trait in factors:
                runtime_factor *= factors[trait].runtime
                mem_factor *= factors[trait].mem_mb
        if spec.runtime is not None:
            runtime = spec.runtime * runtime_factor
        else:
            epochs = epochs if epochs is not None else experiment_epochs(experiment)
            if epochs is None:
                raise ConfigError(
                    f"experiment '{experiment}': cannot estimate the runtime (no '<N>ep' in its name)"
                )
            runtime = spec.minutes_per_epoch * epochs * runtime_factor
        if spec.max_runtime is not None and capped:
            runtime = min(runtime, spec.max_runtime)
        threads = spec.threads if spec.threads is not None else spec.cpus_per_gpu * spec.gpu
        return {
            "gpu": spec.gpu,
            "threads": threads,
            "mem_mb": int(math.ceil(spec.mem_mb * mem_factor)),
            "runtime": int(math.ceil(runtime)),
        }


def _validate_table(name: str, table: Table) -> None:
    where = f"tables.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{where}: table names are lower_snake_case (they become file names)")
    if not table.rows:
        raise ConfigError(f"{where}.rows: a table needs at least one row")
    for key, allowed in (("metrics", MEASURED_METRICS), ("paper_only", PAPER_ONLY_METRICS)):
        for metric in getattr(table, key):
            if metric not in allowed:
                raise ConfigError(f"{where}.{key}: unknown metric '{metric}'; allowed: {list(allowed)}")
    columns = set(table.metrics) | set(table.paper_only)
    seen: set[str] = set()
    for i, row in enumerate(table.rows):
        here = f"{where}.rows[{i}] (id '{row.id}')"
        if not _NAME.match(row.id):
            raise ConfigError(f"{here}: row ids are lower_snake_case")
        if row.id in seen:
            raise ConfigError(f"{here}: duplicate row id")
        seen.add(row.id)
        if row.experiment is not None and not _NAME.match(row.experiment):
            raise ConfigError(f"{here}.experiment: '{row.experiment}' is not a valid experiment name")
        unknown = [s for s in row.scales if s not in SCALES]
        if unknown:
            raise ConfigError(f"{here}.scales: {unknown} are not scales; known: {list(SCALES)}")
        for metric, value in row.paper.items():
            if metric not in columns:
                raise ConfigError(
                    f"{here}.paper: metric '{metric}' is not a column of this table {sorted(columns)}"
                )
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ConfigError(f"{here}.paper.{metric}: expected a number or null, got {value!r}")
        for single in row.sum_of:
            target = next((r for r in table.rows if r.id == single), None)
            if target is None or target.gain_over != row.gain_over or row.gain_over is None:
                raise ConfigError(f"{here}.sum_of: {single!r} must be a row of this table with the same gain_over "
                                  f"as this row ({row.gain_over!r})")
        if row.paper_gain and row.gain_over is None:
            raise ConfigError(f"{here}.paper_gain: a gain needs 'gain_over', the row it is relative to")
        for metric, value in row.paper_gain.items():
            if metric not in table.metrics:
                raise ConfigError(f"{here}.paper_gain: metric '{metric}' is not a measured column {table.metrics}")
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ConfigError(f"{here}.paper_gain.{metric}: expected a number or null, got {value!r}")
    ids = [row.id for row in table.rows]
    for i, row in enumerate(table.rows):
        if row.gain_over is not None and (row.gain_over not in ids or row.gain_over == row.id):
            raise ConfigError(f"{where}.rows[{i}] (id '{row.id}').gain_over: '{row.gain_over}' is not another "
                              f"row of this table")


def experiment_traits(experiment: str) -> set[str]:
    """Traits read from an experiment name's ``_``-separated tokens (``dc5``, ``r101``, ``50ep``)."""
    return set(experiment.split("_"))


def experiment_epochs(experiment: str) -> int | None:
    """The epoch count in an experiment name (``cdetr_r50_108ep`` → 108), or None."""
    for token in experiment.split("_"):
        match = re.fullmatch(r"(\d+)ep", token)
        if match:
            return int(match.group(1))
    return None


# A seed replicate of an experiment: ``<name>_seed<n>`` runs ``<name>.yaml`` with seed n, so a
# claim or a table asks for N seeds without a config file per seed.
_SEED_REPLICATE = re.compile(r"^(?P<base>[a-z0-9][a-z0-9_]*?)_seed(?P<seed>[0-9]+)$")


def seed_replicate(experiment: str, experiments_dir: str | Path) -> tuple[str, int | None]:
    """(the experiment whose config a run reads, the seed it overrides, or None).

    ``<name>_seed<n>`` with no config file of its own, whose ``<name>.yaml`` exists, is seed n of
    ``<name>``; any other name is its own experiment (``(name, None)``).
    """
    if (Path(experiments_dir) / f"{experiment}.yaml").is_file():
        return experiment, None
    match = _SEED_REPLICATE.match(experiment)
    if match and (Path(experiments_dir) / f"{match['base']}.yaml").is_file():
        return match["base"], int(match["seed"])
    return experiment, None


def seed_replicates(experiment: str, seeds: int) -> list[str]:
    """Run names of ``seeds`` seeds of one experiment: the experiment itself (its config's seed),
    then ``<name>_seed1`` ... ``<name>_seed<seeds-1>``."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    return [experiment] + [f"{experiment}_seed{n}" for n in range(1, seeds)]


def experiment_teachers(config_path: str | Path, key: str = "teacher") -> list[tuple[str, str]]:
    """Every teacher (or other ``key`` input) the experiment's method(s) name, each once: for a
    composition (``method: [...]``) one per method that names one; else :func:`experiment_teacher`."""
    path, seen = Path(config_path).resolve(), set()
    while path not in seen:  # the nearest file with a method list decides (lists replace, never merge)
        seen.add(path)
        data = load_yaml(path)
        section = data.get("method")
        if isinstance(section, dict):
            break
        if isinstance(section, list):
            found: list[tuple[str, str]] = []
            for item in section:
                if isinstance(item, dict) and "from" in item and key not in item:  # that experiment's method
                    ref = Path(config_path).resolve().parent / f"{item['from']}.yaml"
                    found += [t for t in (experiment_teachers(ref, key) if ref.is_file() else []) if t not in found]
                    continue
                spec = item.get(key) if isinstance(item, dict) else None
                for kind in ("experiment", "checkpoint"):
                    if isinstance(spec, dict) and spec.get(kind) is not None and (kind, str(spec[kind])) not in found:
                        found.append((kind, str(spec[kind])))
            return found
        parent = data.get("extends", data.get("base"))
        if not isinstance(parent, str):
            break
        path = (path.parent / parent).resolve()
    single = experiment_teacher(config_path, key)
    return [single] if single is not None else []


def experiment_teacher(config_path: str | Path, key: str = "teacher") -> tuple[str, str] | None:
    """The teacher an experiment's method names: ("experiment", NAME), ("checkpoint", FILE) or None.

    Read from the YAML and its ``extends`` chain without importing torch (the Snakefile calls it
    while building the DAG, so a student's training rule depends on its teacher's run).
    ``key``: another method input named the same way (MasKD's ``tokens``: a token run or file).
    """
    method: dict[str, Any] = {}
    path, seen = Path(config_path).resolve(), set()
    while path not in seen:  # child first: the nearest file that sets a key wins
        seen.add(path)
        data = load_yaml(path)
        section = data.get("method")
        if isinstance(section, dict):
            teacher = section.get(key)
            if isinstance(teacher, dict) and key in method:
                teacher = {**teacher, **method[key]}
            method = {**section, **method, **({key: teacher} if isinstance(teacher, dict) else {})}
        parent = data.get("extends", data.get("base"))
        if not isinstance(parent, str):
            break
        path = (path.parent / parent).resolve()
    teacher = method.get(key)
    if not isinstance(teacher, dict):
        return None
    for kind in ("experiment", "checkpoint"):
        if teacher.get(kind) is not None:
            return kind, str(teacher[kind])
    return None


def load_registry(path: str | Path, experiments_dir: str | Path | None = None) -> Registry:
    """Load and validate the registry at ``path``.

    With ``experiments_dir``, every row's experiment must have a config file
    ``<experiments_dir>/<experiment>.yaml``; the error lists all missing ones.
    """
    path = Path(path)
    data: dict[str, Any] = load_yaml(path)
    try:
        registry = from_dict(Registry, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    if experiments_dir is not None:
        exp_dir = Path(experiments_dir)
        missing = [e for e in registry.experiments() if not (exp_dir / f"{e}.yaml").is_file()]
        if missing:
            raise ConfigError(
                f"{path}: {len(missing)} experiment(s) named in the registry have no config in "
                f"{exp_dir}/: {', '.join(missing)}"
            )
    return registry

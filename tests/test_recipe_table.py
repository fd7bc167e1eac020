"""``replic recipe`` and ``docs/recipes.md``: the resolved recipe of every paper-scale experiment, and
replic's values against the values the authors' own files set.

Without a checkout: the doc is up to date with the configs, every experiment has a family, every
declared deliberate difference (``replic/workflow/recipe.py`` ``DELIBERATE``) still matches replic's
resolved value, and :func:`compare` reports a changed value (the authors' side given as a dict).

With a checkout (skipped, with the reason, when the variable is unset), the authors' values are read
from their files by **parsing** them with ``ast`` — nothing of theirs is imported or executed:

* ``REPLIC_OFFICIAL_CONDDETR`` (Atten4Vis/ConditionalDETR @ 8ea7c3f), ``REPLIC_OFFICIAL_DETR``
  (facebookresearch/detr @ 29901c5): the ``add_argument`` defaults of ``main.py``, overridden by the
  arguments of the training command (``scripts/conddetr_*_epoch50.sh``; DETR: the README's training
  command), the optimizer / scheduler calls of ``main.py`` (betas and gamma not passed there: torch's
  defaults via ``inspect``), ``models/*.py`` (``num_classes``, DETR's class weight, the focal γ, the
  top-k of ``PostProcess``), ``datasets/coco.py`` and ``datasets/transforms.py`` (augmentation).
* ``REPLIC_OFFICIAL_KSDETR`` (edocanonymous/KS-DETR @ df0f2f6): the detrex LazyConfig files,
  evaluated as far as their literal parts go: ``L(X)(...)`` becomes ``{"_target_": "X", ...}``,
  ``get_config("common/x.py")`` reads the repository's ``configs/common/x.py`` (the checkout's
  ``detrex/config/configs`` is a symlink into the authors' own machine), relative imports of config
  files are followed, attribute assignments applied, ``if`` blocks skipped (only the aux-loss weight
  copies live there), and a module-level function such as ``default_coco_scheduler(50, 40, 0)`` is
  evaluated from its own body with its arguments bound.
* ``REPLIC_OFFICIAL_MASKD`` (hunto/MasKD @ b5af34f): mmcv-style configs (``dict(...)``, literals,
  names, arithmetic) with their ``_base_`` chains merged as mmcv does (``_delete_`` replaces). An
  absent ``paramwise_cfg`` multiplier is 1 and an absent ``norm_decay_mult`` means norms decay: that
  is what "not set" means in mmcv's optimizer constructor. The GPU count comes from the README's
  ``dist_train*.sh <config> 8`` command.

Keys not compared because no file of the checkout states them (they are defaults of a library the
checkout does not contain, or hard-coded in Python code paths we do not parse): detectron2's
``RandomFlip`` p and test batch size and the choice between the two augmentation lists of
``KSDetrDatasetMapper`` (KS-DETR); the mmcv step gamma when ``lr_config`` has none; mmdet's test
batch and ``filter_empty_gt``; the seed of detrex (``train.seed`` unset) and of the mmdet commands;
the GPU count of the mmdet zoo teachers (not in the vendored files). The tests fail on any other
difference that ``DELIBERATE`` does not declare with its reason.

    REPLIC_OFFICIAL_CONDDETR=... REPLIC_OFFICIAL_DETR=... REPLIC_OFFICIAL_KSDETR=... \\
    REPLIC_OFFICIAL_MASKD=... .venv/bin/python -m pytest -p no:xdist tests/test_recipe_table.py -q
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from replic.engine.config import load_experiment
from replic.workflow import recipe
from replic.workflow.recipe import (
    ABSENT,
    AUTHORS_FILES,
    CODEBASES,
    DELIBERATE,
    Deviation,
    compare,
    family_of,
    load_recipes,
    recipe_values,
    render_markdown,
    same_value,
    undeclared,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
REGISTRY = REPO / "configs" / "tables.yaml"
DOC = REPO / "docs" / "recipes.md"


@pytest.fixture(scope="module")
def recipes() -> dict[str, dict[str, Any]]:
    return load_recipes(EXPERIMENTS, REGISTRY)


# =========================================================================== without a checkout
def test_docs_recipes_md_is_up_to_date(recipes: dict[str, dict[str, Any]]) -> None:
    expected = render_markdown(recipes)
    assert DOC.is_file(), f"{DOC} is missing: run `{recipe.REGENERATE}`"
    assert DOC.read_text(encoding="utf-8") == expected, (
        f"{DOC.relative_to(REPO)} is out of date with configs/: run `{recipe.REGENERATE}`")


def test_the_doc_covers_every_experiment_with_its_values(recipes: dict[str, dict[str, Any]]) -> None:
    names = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
    assert sorted(recipes) == names
    text = render_markdown(recipes)
    for name in names:
        family_of(name)  # raises for an experiment no family takes
        assert f"`{name}`" in text
    # A value that only one experiment has must reach the doc: the DC5 per-GPU batch of 1.
    assert recipes["cdetr_dc5_r50_50ep"]["train.batch_size"] == 1
    assert recipes["cdetr_dc5_r50_50ep"]["train.total_batch_size"] == 8
    assert "| `cdetr_dc5_r50_50ep` | 1 | 8 |" in text


def test_recipe_values_follow_the_resolved_config() -> None:
    cfg = load_experiment(EXPERIMENTS / "detr_r50_50ep.yaml", None, {})
    values = recipe_values(cfg, gpus=8)
    # DETR's defaults come from model.arch, not the YAML: softmax CE, class weight 1, 100 queries.
    assert values["model.num_queries"] == 100 and values["model.focal_loss"] is False
    assert values["model.criterion.cls_loss_coef"] == 1.0 and values["model.criterion.cost_class"] == 1.0
    assert "model.criterion.focal_alpha" not in values and values["model.criterion.eos_coef"] == 0.1
    assert values["train.total_batch_size"] == 16 and "train.momentum" not in values
    cnn = recipe_values(load_experiment(EXPERIMENTS / "maskd_retinanet_r50_24ep.yaml", None, {}), gpus=8)
    assert cnn["train.lr_steps"] == [16, 22] and cnn["train.warmup_iters"] == 1000
    assert cnn["method.loss_weight"] == 7 and cnn["method.tokens"] == "experiment maskd_tokens_retinanet_r101_24ep_t6"
    assert "train.lr_drop" not in cnn and "train.betas" not in cnn


def test_every_declared_difference_still_matches_replic(recipes: dict[str, dict[str, Any]]) -> None:
    """A deviation whose replic value is no longer replic's (a config changed) is stale: it would
    excuse a difference that is not the one declared."""
    stale = []
    for dev in DELIBERATE:
        hit = [n for n in recipes if dev.applies(n)]
        assert hit, f"deviation {dev.key} ({dev.experiments}) matches no experiment"
        assert dev.reason and dev.doc, dev
        if dev.key.startswith("impl."):
            continue
        stale += [f"{n}: {dev.key} is {recipes[n].get(dev.key, ABSENT)!r}, declared {dev.replic!r}"
                  for n in hit if not same_value(recipes[n].get(dev.key, ABSENT), dev.replic)]
    assert not stale, "\n".join(stale)


def test_every_authors_file_names_an_experiment_and_codebases_are_complete() -> None:
    names = {p.stem for p in EXPERIMENTS.glob("*.yaml")}
    assert set(AUTHORS_FILES) <= names
    for fam in recipe.FAMILIES:
        cb = CODEBASES[fam.codebase]
        assert cb.source("train.lr") is not None or fam.codebase == "maskd_detr", fam
    assert CODEBASES["d3etr"].source("train.lr").ref == "--lr"  # inherited from the student's recipe


def test_compare_reports_a_changed_value_and_only_undeclared_ones() -> None:
    cfg = load_experiment(EXPERIMENTS / "cdetr_r50_50ep.yaml", None, {})
    authors = {k: v for k, v in recipe_values(cfg, gpus=8).items() if k.startswith(("train.", "model."))}
    assert compare("cdetr_r50_50ep", recipe_values(cfg, gpus=8), authors) == []
    cfg.train.lr = 2e-4  # replic's resolved value changed in memory
    cfg.model.criterion.cost_giou = 3.0
    found = compare("cdetr_r50_50ep", recipe_values(cfg, gpus=8), authors)
    assert {(d.key, d.authors, d.replic) for d in found} == {("train.lr", 1e-4, 2e-4),
                                                            ("model.criterion.cost_giou", 2.0, 3.0)}
    assert undeclared(found) == found
    assert "NOT declared" in found[0].text() and "cdetr_r50_50ep" in found[0].text()


def test_compare_accepts_exactly_the_declared_difference() -> None:
    ks = recipe_values(load_experiment(EXPERIMENTS / "ks_cdetr_r50_50ep.yaml", None, {}), gpus=8)
    declared = compare("ks_cdetr_r50_50ep", ks, {"model.num_classes": 80})
    assert len(declared) == 1 and declared[0].declared is not None and undeclared(declared) == []
    # The same key with another authors' value, or for an experiment the glob misses, is undeclared.
    assert len(undeclared(compare("ks_cdetr_r50_50ep", ks, {"model.num_classes": 81}))) == 1
    assert len(undeclared(compare("cdetr_r50_50ep", ks, {"model.num_classes": 80}))) == 1
    # A key replic does not have counts as a difference (a reader's misspelt key cannot pass).
    missing = compare("ks_cdetr_r50_50ep", ks, {"train.momentm": 0.9})
    assert [(d.key, d.replic) for d in missing] == [("train.momentm", ABSENT)]
    custom = (Deviation(("x_*",), "train.lr", 1.0, 2.0, "because", "docs/x.md", exclude=("x_skip",)),)
    assert undeclared(compare("x_a", {"train.lr": 2.0}, {"train.lr": 1.0}, custom)) == []
    assert undeclared(compare("x_skip", {"train.lr": 2.0}, {"train.lr": 1.0}, custom)) != []


def test_same_value_semantics() -> None:
    assert same_value((384, 600), [384, 600]) and same_value(1, 1.0) and same_value(1 / 3, 0.3333333333333333)
    assert not same_value(True, 1) and not same_value(None, 0.0) and not same_value([1, 2], [1, 2, 3])
    assert not same_value(1e-4, 1.1e-4)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="replic")
    recipe.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["recipe", *argv])
    return args.func(args)


def test_cli_prints_and_writes_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert _cli(["--experiment", "cdetr_r50_50ep", "--experiment", "maskd_retinanet_r50_24ep"]) == 0
    out = capsys.readouterr().out
    assert "cdetr_r50_50ep" in out and "`--lr`" in out and "maskd_retinanet_r50_24ep" in out
    assert "impl.frozen_teacher_and_tokens: authors lr_mult 0" in out  # its deliberate differences are listed
    target = tmp_path / "sub" / "recipes.md"
    assert _cli(["--experiment", "ks_cdetr_r50_50ep", "--markdown", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render_markdown(load_recipes(EXPERIMENTS, REGISTRY,
                                                                              ["ks_cdetr_r50_50ep"]))
    assert not list(target.parent.glob(".*.tmp"))  # written atomically, nothing left behind
    with pytest.raises(ValueError, match="did you mean cdetr_r50_50ep"):
        _cli(["--experiment", "cdetr_r50_50e"])


# =========================================================================== reading the authors' files
class Unknown(Exception):
    """A node the evaluator does not compute."""


@dataclass(frozen=True)
class Opaque:
    """A value that is not computed (an imported class, a call into library code), kept by name."""

    name: str


@dataclass(frozen=True)
class LazyTarget:
    """``L(X)``: calling it gives ``{"_target_": X, **kwargs}`` (detectron2's LazyCall)."""

    name: str


@dataclass
class Function:
    """A module-level ``def`` of a config file; called by evaluating its body with bound arguments."""

    node: ast.FunctionDef
    module: dict[str, Any]


@dataclass(frozen=True)
class LambdaValue:
    node: ast.Lambda


class GetConfig:
    """detrex's ``get_config("common/x.py")``: the repository's ``configs/common/x.py``."""


class ConfigEvaluator:
    """Evaluates the literal parts of config ``.py`` files with ``ast`` (never imports them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[Path, dict[str, Any]] = {}

    # ------------------------------------------------------------------ files
    def load(self, path: Path) -> dict[str, Any]:
        path = path.resolve()
        if path not in self.cache:
            ns: dict[str, Any] = {"__file__": str(path)}
            self.cache[path] = ns  # before executing: a cycle sees a partial module, not a loop
            self._exec(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body, ns, path)
        return self.cache[path]

    def _exec(self, body: list[ast.stmt], ns: dict[str, Any], path: Path) -> Any:
        for stmt in body:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    ns[alias.asname or alias.name.split(".")[0]] = Opaque(alias.asname and alias.name
                                                                          or alias.name.split(".")[0])
            elif isinstance(stmt, ast.ImportFrom):
                self._import_from(stmt, ns, path)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                value = self.value(stmt.value, ns) if stmt.value is not None else None
                for target in targets:
                    self._assign(target, value, ns)
            elif isinstance(stmt, ast.FunctionDef):
                ns[stmt.name] = Function(stmt, ns)
            elif isinstance(stmt, ast.Return):
                return self.eval(stmt.value, ns) if stmt.value is not None else None
            # if / for / expression statements: not part of the literal configuration
        return None

    def _import_from(self, stmt: ast.ImportFrom, ns: dict[str, Any], path: Path) -> None:
        module = stmt.module or ""
        if module == "detrex.config":
            for alias in stmt.names:
                ns[alias.asname or alias.name] = GetConfig() if alias.name == "get_config" else Opaque(alias.name)
            return
        if stmt.level:
            base = path.parent
            for _ in range(stmt.level - 1):
                base = base.parent
        else:
            base = self.root
        target = base.joinpath(*module.split(".")) if module else base
        for alias in stmt.names:
            file = target.with_suffix(".py") if module else target / f"{alias.name}.py"
            if file.is_file() and file.resolve().is_relative_to(self.root.resolve()) and "configs" in file.parts:
                mod = self.load(file)
                value = mod if not module else mod.get(alias.name, Opaque(f"{module}.{alias.name}"))
            else:
                value = Opaque(f"{module}.{alias.name}")
            ns[alias.asname or alias.name] = copy.deepcopy(value)

    def _assign(self, target: ast.expr, value: Any, ns: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            ns[target.id] = value
        elif isinstance(target, (ast.Attribute, ast.Subscript)):
            try:
                obj = self.eval(target.value, ns)
                key = target.attr if isinstance(target, ast.Attribute) else self.eval(target.slice, ns)
            except Unknown:
                return
            if isinstance(obj, (dict, list)):
                obj[key] = value

    # ------------------------------------------------------------------ expressions
    def value(self, node: ast.expr, ns: dict[str, Any]) -> Any:
        try:
            return self.eval(node, ns)
        except Unknown:
            return Opaque(ast.unparse(node))

    def eval(self, node: ast.expr, ns: dict[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.eval(e, ns) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            out: dict[Any, Any] = {}
            for k, v in zip(node.keys, node.values):
                if k is None:
                    out.update(self.eval(v, ns))
                else:
                    out[self.eval(k, ns)] = self.eval(v, ns)
            return out
        if isinstance(node, ast.Name):
            if node.id in ns:
                return ns[node.id]
            raise Unknown(node.id)
        if isinstance(node, ast.Attribute):
            base = self.eval(node.value, ns)
            if isinstance(base, dict) and node.attr in base:
                return base[node.attr]
            if isinstance(base, Opaque):
                return Opaque(f"{base.name}.{node.attr}")
            raise Unknown(ast.unparse(node))
        if isinstance(node, ast.Subscript):
            base, key = self.eval(node.value, ns), self.eval(node.slice, ns)
            try:
                return base[key]
            except (KeyError, IndexError, TypeError) as err:
                raise Unknown(ast.unparse(node)) from err
        if isinstance(node, ast.BinOp):
            a, b = self.eval(node.left, ns), self.eval(node.right, ns)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.Div: lambda: a / b, ast.FloorDiv: lambda: a // b, ast.Pow: lambda: a ** b}
            if type(node.op) in ops and all(isinstance(x, (int, float, str)) for x in (a, b)):
                return ops[type(node.op)]()
            raise Unknown(ast.unparse(node))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.eval(node.operand, ns)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Lambda):
            return LambdaValue(node)
        if isinstance(node, ast.Call):
            return self._call(node, ns)
        raise Unknown(ast.unparse(node))

    def _call(self, node: ast.Call, ns: dict[str, Any]) -> Any:
        if isinstance(node.func, ast.Name) and node.func.id == "dict" and node.func.id not in ns:
            out: dict[str, Any] = {}
            for kw in node.keywords:
                if kw.arg is None:
                    out.update(self.eval(kw.value, ns))
                else:
                    out[kw.arg] = self.eval(kw.value, ns)
            return out
        func = self.eval(node.func, ns)
        args = [self.eval(a, ns) for a in node.args]
        kwargs = {kw.arg: self.eval(kw.value, ns) for kw in node.keywords if kw.arg is not None}
        if isinstance(func, LazyTarget):
            return {"_target_": func.name, **kwargs}
        if isinstance(func, Opaque) and func.name.endswith("LazyCall"):
            (target,) = args
            return LazyTarget(target.name if isinstance(target, Opaque) else str(target))
        if isinstance(func, Opaque) and func.name.endswith("OmegaConf.create") and not args and not kwargs:
            return {}
        if isinstance(func, GetConfig):
            # A fresh copy per call, as LazyConfig.load: assignments must not leak between configs.
            return copy.deepcopy(self.load(self.root / "configs" / args[0]))
        if isinstance(func, Function):
            bound = _signature(func.node).bind(*args, **kwargs)
            bound.apply_defaults()
            local = {**func.module, **bound.arguments}
            try:
                result = self._exec(func.node.body, local, Path(func.module["__file__"]))
            except Unknown:
                return Opaque(f"{func.node.name}(...)")
            if isinstance(result, dict):
                result = {**result, "_args_": dict(bound.arguments)}
            return result
        return Opaque(f"{getattr(func, 'name', '?')}(...)")


def _signature(node: ast.FunctionDef) -> inspect.Signature:
    """The signature of a ``def`` with literal defaults (to bind a call's arguments to its names)."""
    params = [a.arg for a in node.args.args]
    defaults = [ast.literal_eval(d) for d in node.args.defaults]
    padded = [inspect.Parameter.empty] * (len(params) - len(defaults)) + defaults
    return inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
                              for p, d in zip(params, padded)])


def mmcv_config(root: Path, rel: str) -> dict[str, Any]:
    """An mmcv config with its ``_base_`` chain merged (children over bases; ``_delete_`` replaces)."""
    path = (root / rel).resolve()
    ns = ConfigEvaluator(root).load(path)
    own = {k: v for k, v in ns.items() if not k.startswith("__") and not isinstance(v, (Opaque, Function))}
    bases = own.pop("_base_", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged.update(mmcv_config(root, str((path.parent / base).resolve().relative_to(root.resolve()))))
    return _mmcv_merge(own, merged)


def _mmcv_merge(child: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict):
            delete = value.get("_delete_", False)
            value = {k: v for k, v in value.items() if k != "_delete_"}
            if not delete and isinstance(out.get(key), dict):
                out[key] = _mmcv_merge(value, out[key])
                continue
        out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- argparse and commands
@dataclass(frozen=True)
class Arg:
    dest: str
    default: Any
    takes_value: bool


def argparse_defaults(main_py: Path) -> dict[str, Arg]:
    """``--flag`` -> (dest, default, takes a value) from every ``add_argument`` call of the file."""
    out = {}
    for node in ast.walk(ast.parse(main_py.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
        if not flags:
            continue
        kw = {k.arg: k.value for k in node.keywords}
        action = ast.literal_eval(kw["action"]) if "action" in kw else None
        dest = ast.literal_eval(kw["dest"]) if "dest" in kw else flags[0][2:].replace("-", "_")
        if action in ("store_true", "store_false"):
            out[flags[0]] = Arg(dest, action == "store_false", False)
        else:
            out[flags[0]] = Arg(dest, ast.literal_eval(kw["default"]) if "default" in kw else None, True)
    return out


def command_args(command: str, specs: dict[str, Arg]) -> tuple[dict[str, Any], int | None]:
    """(main.py's resolved args, --nproc_per_node) of one shell command line."""
    tokens = shlex.split(command.replace("\\\n", " "))
    gpus = None
    for i, tok in enumerate(tokens):
        if tok.startswith("--nproc_per_node"):
            gpus = int(tok.split("=", 1)[1] if "=" in tok else tokens[i + 1])
    rest = tokens[tokens.index("main.py") + 1:]
    args = {spec.dest: spec.default for spec in specs.values()}
    i = 0
    while i < len(rest):
        spec = specs[rest[i].split("=", 1)[0]]
        if not spec.takes_value:
            args[spec.dest] = not spec.default
            i += 1
            continue
        raw = rest[i].split("=", 1)[1] if "=" in rest[i] else rest[i + 1]
        i += 1 if "=" in rest[i] else 2
        default = spec.default
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        args[spec.dest] = type(default)(raw) if numeric else raw
    return args, gpus


def readme_training_command(readme: Path) -> str:
    """The README's first box-training command (launch + main.py; not eval, masks or panoptic)."""
    for line in readme.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        if "main.py" in line and "nproc_per_node" in line and not re.search(r"--eval|--masks|panoptic", line):
            return line
    raise AssertionError(f"no training command in {readme}")


def script_command(script: Path) -> str:
    """The ``main.py`` command of a launch script (backslash continuations joined)."""
    text = script.read_text(encoding="utf-8").replace("\\\n", " ")
    return next(line for line in text.splitlines() if "main.py" in line)


# --------------------------------------------------------------------------- Conditional DETR / DETR
def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls whose function is ``name`` or ``<anything>.name``."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Name) and n.func.id == name)
                 or (isinstance(n.func, ast.Attribute) and n.func.attr == name))]


def _def(tree: ast.AST, name: str) -> ast.FunctionDef | ast.ClassDef:
    return next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)


def _param_default(tree: ast.AST, cls: str, param: str) -> Any:
    init = _def(_def(tree, cls), "__init__")
    names = [a.arg for a in init.args.args]
    defaults = dict(zip(names[len(names) - len(init.args.defaults):], init.args.defaults))
    return ast.literal_eval(defaults[param])


def _torch_default(cls: Any, param: str) -> Any:
    return inspect.signature(cls).parameters[param].default


def detr_like_values(root: Path, command: str, model_file: str, focal: bool) -> dict[str, Any]:
    """The recipe of a DETR-family ``main.py`` run, read from the authors' files."""
    import torch

    specs = argparse_defaults(root / "main.py")
    a, gpus = command_args(command, specs)
    main_tree = ast.parse((root / "main.py").read_text(encoding="utf-8"))
    engine_tree = ast.parse((root / "engine.py").read_text(encoding="utf-8"))
    model_tree = ast.parse((root / model_file).read_text(encoding="utf-8"))
    coco_tree = ast.parse((root / "datasets" / "coco.py").read_text(encoding="utf-8"))
    t_tree = ast.parse((root / "datasets" / "transforms.py").read_text(encoding="utf-8"))
    v: dict[str, Any] = {}

    (adamw,) = _calls(main_tree, "AdamW")
    v["train.optimizer"] = "adamw"
    kw = {k.arg for k in adamw.keywords}
    if "betas" not in kw:
        v["train.betas"] = tuple(_torch_default(torch.optim.AdamW, "betas"))
    param_dicts = next(n.value for n in ast.walk(main_tree) if isinstance(n, ast.Assign)
                       and any(isinstance(t, ast.Name) and t.id == "param_dicts" for t in n.targets))
    group_keys = {ast.literal_eval(k) for d in param_dicts.elts for k in d.keys}  # type: ignore[attr-defined]
    assert group_keys <= {"params", "lr"}, group_keys  # no per-group decay: every parameter decays
    v["train.weight_decay_norm"] = None
    for key, dest in (("train.lr", "lr"), ("train.lr_backbone", "lr_backbone"), ("train.weight_decay", "weight_decay"),
                      ("train.batch_size", "batch_size"), ("train.epochs", "epochs"), ("train.lr_drop", "lr_drop"),
                      ("train.clip_max_norm", "clip_max_norm"), ("seed", "seed"), ("model.hidden_dim", "hidden_dim"),
                      ("model.nheads", "nheads"), ("model.enc_layers", "enc_layers"),
                      ("model.dec_layers", "dec_layers"),
                      ("model.dim_feedforward", "dim_feedforward"), ("model.dropout", "dropout"),
                      ("model.num_queries", "num_queries"), ("model.aux_loss", "aux_loss"),
                      ("model.backbone", "backbone"), ("model.dilation", "dilation"),
                      ("model.criterion.bbox_loss_coef", "bbox_loss_coef"),
                      ("model.criterion.giou_loss_coef", "giou_loss_coef"),
                      ("model.criterion.cost_class", "set_cost_class"), ("model.criterion.cost_bbox", "set_cost_bbox"),
                      ("model.criterion.cost_giou", "set_cost_giou")):
        v[key] = a[dest]
    if gpus:
        v["train.gpus"] = gpus
        v["train.total_batch_size"] = gpus * a["batch_size"]
    schedulers = [c for c in ast.walk(main_tree) if isinstance(c, ast.Attribute) and c.attr.endswith("LR")
                  and isinstance(c.value, ast.Attribute) and c.value.attr == "lr_scheduler"]
    assert [s.attr for s in schedulers] == ["StepLR"], "main.py uses StepLR only (no warm-up scheduler)"
    (step,) = _calls(main_tree, "StepLR")
    v["train.lr_schedule"] = "step"
    v["train.warmup"] = "none"
    gamma = next((k.value for k in step.keywords if k.arg == "gamma"), None)
    v["train.lr_gamma"] = ast.literal_eval(gamma) if gamma is not None else _torch_default(
        torch.optim.lr_scheduler.StepLR, "gamma")
    names = {n.attr if isinstance(n, ast.Attribute) else n.id for tree in (main_tree, engine_tree)
             for n in ast.walk(tree) if isinstance(n, (ast.Attribute, ast.Name))}
    v["train.amp"] = "none" if not names & {"autocast", "GradScaler"} else "amp"
    # Evaluation batch: DataLoader(dataset_val, args.batch_size, ...).
    val_loader = next(c for c in _calls(main_tree, "DataLoader")
                      if c.args and isinstance(c.args[0], ast.Name) and c.args[0].id == "dataset_val")
    assert ast.unparse(val_loader.args[1]) == "args.batch_size"
    v["eval.batch_size"] = a["batch_size"]
    # models/<model>.py: build()'s COCO class count, the loss and the class weight.
    build = _def(model_tree, "build")
    ifexp = next(n.value for n in ast.walk(build) if isinstance(n, ast.Assign) and isinstance(n.value, ast.IfExp)
                 and any(isinstance(t, ast.Name) and t.id == "num_classes" for t in n.targets))
    assert ast.unparse(ifexp.test) == "args.dataset_file != 'coco'"
    v["model.num_classes"] = ast.literal_eval(ifexp.orelse)
    loss_labels = _def(_def(model_tree, "SetCriterion"), "loss_labels")
    v["model.focal_loss"] = bool(_calls(loss_labels, "sigmoid_focal_loss"))
    assert v["model.focal_loss"] == focal
    weight_dict = next(n for n in ast.walk(build) if isinstance(n, ast.Dict)
                       and any(isinstance(k, ast.Constant) and k.value == "loss_ce" for k in n.keys))
    ce = weight_dict.values[[k.value for k in weight_dict.keys].index("loss_ce")]  # type: ignore[union-attr]
    from_flag = ast.unparse(ce) == "args.cls_loss_coef"
    v["model.criterion.cls_loss_coef"] = a["cls_loss_coef"] if from_flag else ast.literal_eval(ce)
    if focal:
        v["model.criterion.focal_alpha"] = a["focal_alpha"]
        (focal_call,) = _calls(loss_labels, "sigmoid_focal_loss")
        gamma_kw = next(k.value for k in focal_call.keywords if k.arg == "gamma")
        v["model.criterion.focal_gamma"] = ast.literal_eval(gamma_kw)
        (topk,) = _calls(_def(model_tree, "PostProcess"), "topk")
        v["model.postprocess_topk"] = ast.literal_eval(topk.args[1])
    else:
        v["model.criterion.eos_coef"] = a["eos_coef"]
    # datasets/coco.py make_coco_transforms and the defaults of datasets/transforms.py.
    fn = _def(coco_tree, "make_coco_transforms")
    local = {"scales": ast.literal_eval(next(n.value for n in fn.body if isinstance(n, ast.Assign)
                                             and n.targets[0].id == "scales"))}  # type: ignore[attr-defined]
    branches = {ast.literal_eval(n.test.comparators[0]): n.body for n in fn.body  # type: ignore[attr-defined]
                if isinstance(n, ast.If) and ast.unparse(n.test).startswith("image_set ==")}
    ev = ConfigEvaluator(root)
    train_resizes = [c for b in branches["train"] for c in _calls(b, "RandomResize")]
    full = [c for c in train_resizes if any(k.arg == "max_size" for k in c.keywords)]
    first_crop = [c for c in train_resizes if not c.keywords]
    assert all(ev.eval(c.args[0], local) == ev.eval(full[0].args[0], local) for c in full)
    v["data.train_scales"] = ev.eval(full[0].args[0], local)
    v["data.max_size"] = ast.literal_eval(next(k.value for k in full[0].keywords if k.arg == "max_size"))
    (crop_resize,) = first_crop
    v["data.crop_scales"] = ev.eval(crop_resize.args[0], local)
    (crop,) = [c for b in branches["train"] for c in _calls(b, "RandomSizeCrop")]
    v["data.crop_size"] = [ast.literal_eval(x) for x in crop.args]
    (select,) = [c for b in branches["train"] for c in _calls(b, "RandomSelect")]
    assert len(select.args) == 2 and not select.keywords  # p not passed: the class default
    v["data.resize_only_prob"] = _param_default(t_tree, "RandomSelect", "p")
    (flip,) = [c for b in branches["train"] for c in _calls(b, "RandomHorizontalFlip")]
    assert not flip.args and not flip.keywords
    v["data.hflip_prob"] = _param_default(t_tree, "RandomHorizontalFlip", "p")
    (val,) = [c for b in branches["val"] for c in _calls(b, "RandomResize")]
    (v["data.val_size"],) = ast.literal_eval(val.args[0])
    v["data.val_max_size"] = ast.literal_eval(next(k.value for k in val.keywords if k.arg == "max_size"))
    convert = _def(coco_tree, "ConvertCocoPolysToMask")
    v["data.remove_crowd"] = any(isinstance(n, ast.ListComp) and "iscrowd" in ast.unparse(n) for n in ast.walk(convert))
    return v


def _checkout(env: str) -> Path:
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"set {env} to a checkout of the authors' repository to compare with their files")
    root = Path(value)
    if not root.is_dir():
        pytest.fail(f"{env}={value}: not a directory")
    return root


def _assert_no_undeclared(name: str, authors: dict[str, Any], recipes: dict[str, dict[str, Any]],
                          required: set[str]) -> None:
    missing = required - set(authors)
    assert not missing, f"the reader lost keys it must compare: {sorted(missing)}"
    found = compare(name, recipes[name], authors)
    bad = undeclared(found)
    assert not bad, ("differences from the authors' files not declared in replic/workflow/recipe.py "
                     "DELIBERATE:\n" + "\n".join(d.text() for d in bad))


_DETR_REQUIRED = {"train.lr", "train.lr_backbone", "train.weight_decay", "train.batch_size", "train.epochs",
                  "train.lr_drop", "train.clip_max_norm", "model.criterion.cls_loss_coef",
                  "model.criterion.bbox_loss_coef", "model.criterion.giou_loss_coef", "model.criterion.cost_class",
                  "model.criterion.cost_bbox", "model.criterion.cost_giou", "model.num_queries", "model.dropout",
                  "model.hidden_dim", "model.nheads", "model.enc_layers", "model.dec_layers",
                  "model.dim_feedforward", "train.amp", "data.train_scales"}


@pytest.mark.parametrize("name", sorted(n for n in AUTHORS_FILES if n.startswith("cdetr_")))
def test_conditional_detr_recipe_matches_the_official_files(name: str, recipes: dict[str, dict[str, Any]]) -> None:
    root = _checkout("REPLIC_OFFICIAL_CONDDETR")
    _, script = AUTHORS_FILES[name]
    authors = detr_like_values(root, script_command(root / script), "models/conditional_detr.py", focal=True)
    assert authors["train.gpus"] == 8  # the scripts' --nproc_per_node
    if name == "cdetr_r50_50ep":
        # The README's R50 training command is the script's: the same recipe (no --epochs / --lr_drop:
        # the 50 / 40 of this run are main.py's defaults).
        readme = detr_like_values(root, readme_training_command(root / "README.md"), "models/conditional_detr.py",
                                  focal=True)
        assert readme == authors
    _assert_no_undeclared(name, authors, recipes, _DETR_REQUIRED | {"model.criterion.focal_alpha"})


def test_a_changed_replic_value_fails_against_the_official_files(recipes: dict[str, dict[str, Any]]) -> None:
    """The whole path (reader + comparison) catches a recipe change: replic's lr doubled in memory."""
    root = _checkout("REPLIC_OFFICIAL_CONDDETR")
    authors = detr_like_values(root, script_command(root / "scripts/conddetr_r50_epoch50.sh"),
                               "models/conditional_detr.py", focal=True)
    cfg = load_experiment(EXPERIMENTS / "cdetr_r50_50ep.yaml", None, {})
    cfg.train.lr *= 2
    cfg.model.num_queries = 100
    changed = recipe_values(cfg, gpus=recipes["cdetr_r50_50ep"]["train.gpus"])
    bad = {d.key: (d.authors, d.replic) for d in undeclared(compare("cdetr_r50_50ep", changed, authors))}
    assert bad.pop("train.lr") == (1e-4, 2e-4) and bad.pop("model.num_queries") == (300, 100)
    assert set(bad) <= {"train.amp"}  # the one difference the unchanged recipe has (see the report)


def test_detr_recipe_matches_the_official_files(recipes: dict[str, dict[str, Any]]) -> None:
    root = _checkout("REPLIC_OFFICIAL_DETR")
    authors = detr_like_values(root, readme_training_command(root / "README.md"), "models/detr.py", focal=False)
    assert authors["model.criterion.cls_loss_coef"] == 1  # hard-coded in build(), no flag
    _assert_no_undeclared("detr_r50_50ep", authors, recipes, _DETR_REQUIRED | {"model.criterion.eos_coef"})


# --------------------------------------------------------------------------- KS-DETR (detrex)
_KS_VARIANTS = {"TripleAttnQKVShareAV": "triple", "DualAttnShareA": "share_a", "DualAttnShareV": "share_v"}
_KS_MASKING = {"sMLP": "sMLP", "MarkFg1Bg0": "Mark"}


def _layer_config(text: str) -> list[tuple[str, int]]:
    """``'regular_5-TripleAttnQKVShareAV_1'`` -> ``[('regular', 5), ('TripleAttnQKVShareAV', 1)]``."""
    return [(kind, int(n)) for kind, n in (part.rsplit("_", 1) for part in text.split("-"))]


def _lambda_factor(lam: LambdaValue, word: str) -> float:
    """The factor ``lambda name: a if '<word>' in name else b`` gives names containing ``word``."""
    body = lam.node.body
    assert isinstance(body, ast.IfExp) and isinstance(body.test, ast.Compare), ast.unparse(lam.node)
    assert isinstance(body.test.ops[0], ast.In) and ast.literal_eval(body.test.left) == word, ast.unparse(lam.node)
    return ast.literal_eval(body.body)


def ks_values(root: Path, config: str) -> dict[str, Any]:
    """The recipe a KS-DETR LazyConfig sets, read by evaluating its literal parts."""
    ns = ConfigEvaluator(root).load(root / config)
    opt, train, model, data, sched = (ns[k] for k in ("optimizer", "train", "model", "dataloader", "lr_multiplier"))
    v: dict[str, Any] = {"train.optimizer": opt["_target_"].rsplit(".", 1)[-1].lower()}
    v["train.lr"] = opt["lr"]
    v["train.lr_backbone"] = opt["lr"] * _lambda_factor(opt["params"]["lr_factor_func"], "backbone")
    v["train.betas"] = tuple(opt["betas"])
    v["train.weight_decay"] = opt["weight_decay"]
    v["train.weight_decay_norm"] = opt["params"]["weight_decay_norm"]
    v["train.total_batch_size"] = data["train"]["total_batch_size"]
    # default_coco_scheduler(epochs, decay_epochs, warmup_epochs): milestones in iterations at batch 16.
    steps = sched["scheduler"]
    assert steps["_target_"].endswith("MultiStepParamScheduler") and len(steps["values"]) == 2
    per_epoch = steps["milestones"][-1] / sched["_args_"]["epochs"]
    v["train.epochs"] = train["max_iter"] / per_epoch
    v["train.lr_schedule"] = "step"  # one drop: values [1, γ]
    v["train.lr_drop"] = steps["milestones"][0] / per_epoch
    v["train.lr_gamma"] = steps["values"][1] / steps["values"][0]
    v["train.warmup"] = "none" if sched["warmup_length"] == 0 else sched["warmup_method"]
    clip = train["clip_grad"]
    v["train.clip_max_norm"] = clip["params"]["max_norm"] if clip["enabled"] else 0
    assert not clip["enabled"] or clip["params"]["norm_type"] == 2
    v["train.amp"] = "none" if not train["amp"]["enabled"] else "amp"
    arch = {"KSConditionalDETR": "conditional_detr", "ConditionalDETR": "conditional_detr"}
    v["model.arch"] = arch[model["_target_"].rsplit(".", 1)[-1]]
    v["model.backbone"] = f"resnet{model['backbone']['stages']['depth']}"
    enc, dec = model["transformer"]["encoder"], model["transformer"]["decoder"]
    v["model.hidden_dim"] = model["embed_dim"]
    assert enc["embed_dim"] == dec["embed_dim"] == model["embed_dim"]
    v["model.nheads"] = enc["num_heads"]
    assert dec["num_heads"] == enc["num_heads"] and dec["feedforward_dim"] == enc["feedforward_dim"]
    v["model.dim_feedforward"] = enc["feedforward_dim"]
    dropouts = {enc["attn_dropout"], enc["ffn_dropout"], dec["attn_dropout"], dec["ffn_dropout"]}
    assert len(dropouts) == 1, dropouts  # replic has one dropout for all of them
    (v["model.dropout"],) = dropouts
    enc_layers = _layer_config(enc["encoder_layer_config"])
    v["model.enc_layers"] = sum(n for _, n in enc_layers)
    v["model.dec_layers"] = sum(n for _, n in _layer_config(dec["decoder_layer_config"]))
    v["model.num_queries"] = model["num_queries"]
    v["model.aux_loss"] = model["aux_loss"]
    v["model.num_classes"] = model["num_classes"]
    v["model.postprocess_topk"] = model["select_box_nums_for_evaluation"]
    crit, matcher = model["criterion"], model["criterion"]["matcher"]
    v["model.focal_loss"] = crit["loss_class_type"] == "focal_loss"
    assert matcher["cost_class_type"] == "focal_loss_cost"
    v["model.criterion.cls_loss_coef"] = crit["weight_dict"]["loss_class"]
    v["model.criterion.bbox_loss_coef"] = crit["weight_dict"]["loss_bbox"]
    v["model.criterion.giou_loss_coef"] = crit["weight_dict"]["loss_giou"]
    v["model.criterion.focal_alpha"] = crit["alpha"]
    v["model.criterion.focal_gamma"] = crit["gamma"]
    assert (matcher["alpha"], matcher["gamma"]) == (crit["alpha"], crit["gamma"])  # replic shares them
    for name in ("cost_class", "cost_bbox", "cost_giou"):
        v[f"model.criterion.{name}"] = matcher[name]
    # Data (projects/ks_detr/configs/ks_coco_detr.py).
    mapper = data["train"]["mapper"]

    def resizes(augs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [a for a in augs if a["_target_"].endswith("ResizeShortestEdge")]

    plain = resizes(mapper["augmentation"])
    assert len(plain) == 1 and plain[0]["sample_style"] == "choice"
    v["data.train_scales"] = list(plain[0]["short_edge_length"])
    v["data.max_size"] = plain[0]["max_size"]
    crop_path = mapper["augmentation_with_crop"]
    first, last = resizes(crop_path)
    assert last["short_edge_length"] == plain[0]["short_edge_length"] and last["max_size"] == plain[0]["max_size"]
    v["data.crop_scales"] = list(first["short_edge_length"])
    (crop,) = [a for a in crop_path if a["_target_"].endswith("RandomCrop")]
    assert crop["crop_type"] == "absolute_range"  # side lengths drawn in [min, max] as DETR's RandomSizeCrop
    v["data.crop_size"] = list(crop["crop_size"])
    (test_resize,) = resizes(data["test"]["mapper"]["augmentation"])
    v["data.val_size"] = test_resize["short_edge_length"]
    v["data.val_max_size"] = test_resize["max_size"]
    # The KS method: the knowledge-sharing layer and the KSGT module.
    ks_layers = [(i, kind) for i, kind in enumerate(k for k, n in enc_layers for _ in range(n)) if kind != "regular"]
    if not ks_layers:
        v["method.name"] = "none"
        return v
    ((index, kind),) = ks_layers
    ksgt = model["ksgt"]
    v.update({"method.name": "ks_detr", "method.variant": _KS_VARIANTS[kind],
              "method.encoder_layer": index - v["model.enc_layers"],
              "method.token_masking": _KS_MASKING[ksgt["encoder_token_masking"]],
              "method.masking_loc": ksgt["encoder_token_masking_loc"], "method.pad_fg_pixel": ksgt["pad_fg_pixel"],
              "method.mask_criterion": ksgt["gt_fg_bg_mask_criterion"]})
    return v


@pytest.mark.parametrize("name", sorted(n for n in AUTHORS_FILES if n.startswith("ks_")))
def test_ks_detr_recipe_matches_the_official_configs(name: str, recipes: dict[str, dict[str, Any]]) -> None:
    root = _checkout("REPLIC_OFFICIAL_KSDETR")
    (config,) = AUTHORS_FILES[name]
    authors = ks_values(root, config)
    required = {"train.lr", "train.lr_backbone", "train.weight_decay", "train.weight_decay_norm", "train.epochs",
                "train.lr_drop", "train.total_batch_size", "train.clip_max_norm", "model.num_queries",
                "model.criterion.cls_loss_coef", "model.criterion.cost_class", "model.postprocess_topk",
                "data.train_scales", "method.name"}
    if not name.endswith("_base"):
        required |= {"method.variant", "method.token_masking", "method.masking_loc", "method.encoder_layer"}
    _assert_no_undeclared(name, authors, recipes, required)


# --------------------------------------------------------------------------- MasKD (mmdet / mmrazor)
_MMDET_ARCH = {"RetinaNet": "retinanet", "FasterRCNN": "faster_rcnn", "FCOS": "fcos"}
_POSITION = {"neck": "fpn", "backbone": "backbone"}


def _pipeline_step(pipeline: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (step,) = [s for s in pipeline if s["type"] == kind]
    return step


def _scales(img_scale: Any) -> tuple[list[int], int]:
    """mmdet ``img_scale`` (long, short) or a list of them -> (short sides, long side)."""
    pairs = [img_scale] if isinstance(img_scale[0], int) else list(img_scale)
    longs = {max(p) for p in pairs}
    assert len(longs) == 1, pairs
    return sorted(min(p) for p in pairs), longs.pop()


def _readme_gpus(readme: Path) -> int:
    match = re.search(r"dist_train\w*\.sh\s+\S+\s+(\d+)", readme.read_text(encoding="utf-8"))
    assert match, f"no dist_train command in {readme}"
    return int(match.group(1))


def mmdet_values(root: Path, config: str, role: str) -> dict[str, Any]:
    """The recipe of an mmdet / mmrazor config. ``role``: ``student`` (a MasKD KD config: the student
    and the distiller), ``student_alone`` (the KD config's student recipe, no method), ``teacher``
    (an mmdet zoo config) or ``tokens`` (a MasKD mask-learning config)."""
    cfg = mmcv_config(root, config)
    v: dict[str, Any] = {}
    opt = cfg["optimizer"]
    v["train.optimizer"] = opt["type"].lower()
    v["train.lr"] = v["train.lr_backbone"] = opt["lr"]
    paramwise = opt.get("paramwise_cfg", {})
    assert not any("backbone" in k for k in paramwise.get("custom_keys", {})), "a backbone lr multiplier"
    if v["train.optimizer"] == "sgd":
        v["train.momentum"] = opt["momentum"]
    v["train.weight_decay"] = opt["weight_decay"]
    norm_mult = paramwise.get("norm_decay_mult")
    v["train.weight_decay_norm"] = None if norm_mult is None else opt["weight_decay"] * norm_mult
    v["train.bias_lr_mult"] = paramwise.get("bias_lr_mult", 1.0)
    v["train.bias_decay_mult"] = paramwise.get("bias_decay_mult", 1.0)
    v["train.batch_size"] = cfg["data"]["samples_per_gpu"]
    if role != "teacher":
        gpus = _readme_gpus(root / ("mmdetection/README.md" if role == "tokens" else "README.md"))
        v["train.gpus"], v["train.total_batch_size"] = gpus, gpus * v["train.batch_size"]
    runner, lr = cfg["runner"], cfg["lr_config"]
    if runner["type"] == "EpochBasedRunner":
        v["train.epochs"] = runner["max_epochs"]
    else:
        v["train.max_steps"] = runner["max_iters"]
    policy = {"step": "multistep", "CosineAnnealing": "cosine"}[lr["policy"]]
    v["train.lr_schedule"] = policy
    if policy == "multistep":
        v["train.lr_steps"] = list(lr["step"])
        if "gamma" in lr:
            v["train.lr_gamma"] = lr["gamma"]
    else:
        v["train.min_lr"] = lr["min_lr"]
    v["train.warmup"] = lr.get("warmup") or "none"
    if lr.get("warmup"):
        v["train.warmup_iters"] = lr["warmup_iters"]
        v["train.warmup_ratio"] = lr["warmup_ratio"]
    clip = cfg["optimizer_config"].get("grad_clip")
    assert clip is None or clip.get("norm_type", 2) == 2
    v["train.clip_max_norm"] = clip["max_norm"] if clip else 0
    v["train.amp"] = "fp16" if "fp16" in cfg else "none"
    model = cfg["student"] if role.startswith("student") else cfg["model"]
    arch = _MMDET_ARCH[model["type"].split(".")[-1]]
    v["model.arch"] = arch
    backbone = model["backbone"]
    v["model.backbone"] = f"resnet{backbone['depth']}"
    v["model.backbone_style"] = backbone["style"]
    norm_trained, norm_eval = backbone["norm_cfg"]["requires_grad"], backbone["norm_eval"]
    v["model.backbone_norm"] = ("frozen" if norm_eval and not norm_trained else
                                "affine trained, statistics frozen" if norm_eval else "trained")
    v["model.trainable_layers"] = 4 - backbone["frozen_stages"]
    v["model.fpn_channels"] = model["neck"]["out_channels"]
    head = model["roi_head"]["bbox_head"] if arch == "faster_rcnn" else model["bbox_head"]
    v["model.num_classes"] = head["num_classes"]
    test = model["test_cfg"]["rcnn"] if arch == "faster_rcnn" else model["test_cfg"]
    v["model.score_thresh"] = test["score_thr"]
    v["model.nms_thresh"] = test["nms"]["iou_threshold"]
    v["model.detections_per_img"] = test["max_per_img"]
    if arch == "faster_rcnn":
        v["model.rpn_pre_nms_top_n_train"] = model["train_cfg"]["rpn_proposal"]["nms_pre"]
        v["model.rpn_post_nms_top_n_train"] = model["train_cfg"]["rpn_proposal"]["max_per_img"]
        v["model.rpn_pre_nms_top_n_test"] = model["test_cfg"]["rpn"]["nms_pre"]
        v["model.rpn_post_nms_top_n_test"] = model["test_cfg"]["rpn"]["max_per_img"]
        v["model.roi_head_dim"] = head["fc_out_channels"]
    else:
        v["model.topk_candidates"] = test["nms_pre"]
    train_pipe, test_pipe = cfg["data"]["train"]["pipeline"], cfg["data"]["test"]["pipeline"]
    resize = _pipeline_step(train_pipe, "Resize")
    assert resize["keep_ratio"]
    v["data.resize_rule"] = "mmdet"
    v["data.train_scales"], v["data.max_size"] = _scales(resize["img_scale"])
    assert resize.get("multiscale_mode", "range") == "value" or len(v["data.train_scales"]) == 1
    v["data.hflip_prob"] = _pipeline_step(train_pipe, "RandomFlip")["flip_ratio"]
    v["model.size_divisible"] = _pipeline_step(train_pipe, "Pad")["size_divisor"]
    (v["data.val_size"],), v["data.val_max_size"] = _scales(_pipeline_step(test_pipe, "MultiScaleFlipAug")["img_scale"])
    if role == "student":
        distiller = cfg["algorithm"]["distiller"]
        main, *extra = distiller["components"]
        (loss,) = main["losses"]
        assert loss["type"] == "MasKDLoss"
        v.update({"method.name": "maskd", "method.num_tokens": loss["num_tokens"],
                  "method.weighting": loss["weight_mask"], "method.loss_weight": loss["loss_weight"],
                  "method.custom_mask": loss["custom_mask"], "method.custom_mask_warmup": loss["custom_mask_warmup"],
                  "method.position": _POSITION[main["student_module"]],
                  "method.teacher.backbone": f"resnet{distiller['teacher']['backbone']['depth']}"})
        terms = []
        for comp in extra:
            for term in comp["losses"]:
                text = f"{term['type']} on {comp['student_module']} ×{term['loss_weight']}"
                inputs = [m["student_module"] for m in comp.get("modules_with_student_inputs", [])]
                terms.append(text + (f" (student inputs to {', '.join(inputs)})" if inputs else ""))
        v["method.head_kd"] = "; ".join(terms) or "none"
        prefixes = [part["init_cfg"]["prefix"] for part in model.values() if isinstance(part, dict)
                    and isinstance(part.get("init_cfg"), dict) and "prefix" in part["init_cfg"]]
        v["method.init_from_teacher"] = ", ".join(prefixes) or "none"
    elif role == "tokens":
        (hook,) = [h for h in cfg["custom_hooks"] if h["type"] == "MasKDHook"]
        v.update({"method.name": "maskd_tokens", "method.num_tokens": hook["num_tokens"],
                  "method.weighting": hook["weight_mask"], "method.position": _POSITION[hook["module_name"]]})
    return v


def _maskd_role(name: str) -> str:
    if name.startswith("maskd_tokens_"):
        return "tokens"
    if name.startswith("maskd_"):
        return "student"
    return "student_alone" if "_r50_" in name else "teacher"


@pytest.mark.parametrize("name", sorted(n for n, files in AUTHORS_FILES.items() if files[0].startswith("mm")))
def test_maskd_recipe_matches_the_official_configs(name: str, recipes: dict[str, dict[str, Any]]) -> None:
    root = _checkout("REPLIC_OFFICIAL_MASKD")
    (config,) = AUTHORS_FILES[name]
    role = _maskd_role(name)
    authors = mmdet_values(root, config, role)
    required = {"train.optimizer", "train.lr", "train.weight_decay", "train.clip_max_norm", "model.num_classes",
                "data.train_scales"}
    required |= {"train.epochs", "train.lr_steps", "train.warmup_iters"} if role != "tokens" else {"train.max_steps"}
    if role == "student":
        required |= {"method.loss_weight", "method.num_tokens", "method.custom_mask_warmup", "method.teacher.backbone"}
    if role == "tokens":
        required |= {"method.num_tokens", "method.weighting", "method.position"}
    _assert_no_undeclared(name, authors, recipes, required)

"""The bad-input contract: every row of ``tests/bad_inputs*.yaml`` through the real command line.

Each row is a bad input a user can give replic (data, configs, checkpoints, detections, the table
registry, the workflow config), the command that meets it, the exit code and the names (file, key,
value) the message must contain. Adding a bad input = adding a row (another method's rows may go
in their own ``tests/bad_inputs_<method>.yaml``; preparation steps that need code go in
``tests/bad_input_makers.py``).

``docs/bad-inputs.md`` is generated from the rows and the messages replic really prints:

    .venv/bin/python tests/test_bad_inputs.py --write-doc

and the test fails when the page and the rows (or the messages) drift apart.

Speed: ``replic`` rows run ``replic.cli.main`` in-process (the console script's code path: the
same parser, handlers and error reporting), so 40 rows cost one torch import; rows marked
``subprocess: true`` run ``python -m replic`` as a user would, and ``runner: snakemake`` rows
run a dry-run of the workflow in a copy of it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DOC = REPO / "docs" / "bad-inputs.md"
EXPERIMENT = REPO / "configs" / "experiments" / "cdetr_r50_50ep.yaml"
MESSAGE_WIDTH = 320

# Command prefixes a row can start from (``base:``); its ``args`` are appended.
BASES: dict[str, list[str]] = {
    "train": ["train", "--config", "{experiment}", "--scale", "smoke", "--out", "{tmp}/run", "--threads", "1",
              "--no-progress", "--set", "data.root={data}"],
    "eval": ["eval", "--config", "{experiment}", "--scale", "smoke", "--checkpoint", "{tmp}/model.pt",
             "--out", "{tmp}/eval", "--threads", "1", "--no-progress", "--set", "data.root={data}"],
    "score": ["score", "--gt", "{data}/annotations/instances_val2017.json", "--dets", "{tmp}/dets.json"],
    "convert": ["convert", "--from", "official", "{tmp}/official.pth", "--out", "{tmp}/converted.pt"],
    "none": [],
}
AREAS = ("data", "config", "checkpoint", "detections", "registry", "workflow")


@dataclass
class Row:
    """One bad input: how to make it, the command that meets it, what must come back."""

    id: str
    area: str
    input: str
    exit: int
    names: list[str]
    base: str = "none"
    args: list[str] = field(default_factory=list)
    prepare: list[dict[str, Any]] = field(default_factory=list)
    runner: str = "replic"  # replic | snakemake
    subprocess: bool = False
    not_created: list[str] = field(default_factory=list)  # files the command must not leave behind
    source: str = ""

    def command(self) -> list[str]:
        """The argv after ``replic`` (or ``snakemake``), with placeholders."""
        return [*BASES[self.base], *self.args]


def load_rows() -> list[Row]:
    """Every row of every ``tests/bad_inputs*.yaml``, checked for shape and unique ids."""
    rows: list[Row] = []
    for path in sorted(TESTS.glob("bad_inputs*.yaml")):
        for i, item in enumerate(yaml.safe_load(path.read_text()) or []):
            unknown = set(item) - set(Row.__dataclass_fields__)
            assert not unknown, f"{path.name} row {i}: unknown keys {unknown}"
            row = Row(**item, source=path.name)
            assert row.area in AREAS, f"{path.name}: {row.id}: area {row.area!r} not in {AREAS}"
            assert row.base in BASES, f"{path.name}: {row.id}: base {row.base!r} not in {list(BASES)}"
            assert row.runner in ("replic", "snakemake"), f"{row.id}: runner {row.runner!r}"
            assert row.names, f"{row.id}: a row must say what the message names"
            rows.append(row)
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)), f"duplicate row ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    return rows


ROWS = load_rows()


# ------------------------------------------------------------------------------------ preparing
def _expand(value: Any, places: dict[str, str]) -> Any:
    if isinstance(value, str):  # only the known placeholders: JSON braces stay as they are
        return re.sub(r"\{(tmp|data|experiment|repo|wf)\}", lambda m: places[m.group(1)], value)
    if isinstance(value, list):
        return [_expand(v, places) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, places) for k, v in value.items()}
    return value


def _walk(data: Any, dotted: str) -> tuple[Any, Any]:
    """(container, last key) of a dotted path with integer list indices, e.g. ``images.0.id``."""
    parts = [int(p) if p.lstrip("-").isdigit() else p for p in dotted.split(".")]
    node = data
    for part in parts[:-1]:
        node = node[part]
    return node, parts[-1]


def _edit_json(file: str, fn: Any) -> None:
    path = Path(file)
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def prepare(row: Row, places: dict[str, str]) -> None:
    """Apply the row's preparation steps to its own copy of the data."""
    from bad_input_makers import MAKERS

    for step in _expand(row.prepare, places):
        (kind, value), = step.items()
        if kind == "json_set":
            file, dotted, new = value

            def setter(data: Any, dotted: str = dotted, new: Any = new) -> None:
                node, key = _walk(data, dotted)
                node[key] = new
            _edit_json(file, setter)
        elif kind == "json_del":
            file, dotted = value

            def deleter(data: Any, dotted: str = dotted) -> None:
                node, key = _walk(data, dotted)
                del node[key]
            _edit_json(file, deleter)
        elif kind == "json_append":
            file, dotted, new = value

            def appender(data: Any, dotted: str = dotted, new: Any = new) -> None:
                node, key = _walk(data, dotted)
                node[key].append(new)
            _edit_json(file, appender)
        elif kind == "truncate":
            file, size = value
            Path(file).write_bytes(Path(file).read_bytes()[: int(size)])
        elif kind == "write":
            file, text = value
            Path(file).parent.mkdir(parents=True, exist_ok=True)
            Path(file).write_text(text)
        elif kind == "write_bytes":
            file, hex_text = value
            Path(file).write_bytes(bytes.fromhex(hex_text))
        elif kind == "remove":
            Path(value).unlink()
        elif kind == "make":
            name, file, *kwargs = value
            MAKERS[name](Path(file), **(kwargs[0] if kwargs else {}))
        else:
            raise AssertionError(f"{row.id}: unknown preparation step {kind!r}")


# -------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    code: int
    output: str


def _run_replic_in_process(argv: list[str]) -> Outcome:
    from replic.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(int(code), err.getvalue() + out.getvalue())


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SNAKEMAKE_PROFILE", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def run_row(row: Row, tmp: Path, data_template: Path) -> tuple[Outcome, dict[str, str]]:
    """Prepare the row's inputs under ``tmp`` and run its command; (outcome, placeholders)."""
    data = tmp / "data"
    shutil.copytree(data_template, data)
    places = {"tmp": str(tmp), "data": str(data), "experiment": str(EXPERIMENT), "repo": str(REPO),
              "wf": str(tmp / "wf")}
    if row.runner == "snakemake":
        from test_workflow import copy_workflow

        copy_workflow(tmp / "wf")
    prepare(row, places)
    argv = _expand(row.command(), places)
    if row.runner == "snakemake":
        snakemake = str(Path(sys.executable).with_name("snakemake"))
        result = subprocess.run(["timeout", "-k", "10", "120", snakemake, *argv], cwd=tmp / "wf",
                                env=_child_env(), capture_output=True, text=True)
        return Outcome(result.returncode, result.stderr + result.stdout), places
    if row.subprocess:
        result = subprocess.run([sys.executable, "-m", "replic", *argv], cwd=REPO, env=_child_env(),
                                capture_output=True, text=True, timeout=300)
        return Outcome(result.returncode, result.stderr + result.stdout), places
    return _run_replic_in_process(argv), places


def message_of(row: Row, output: str, places: dict[str, str]) -> str:
    """The line that names the first expected name, with the row's paths made generic."""
    first = _expand(row.names[0], places)
    line = next((ln.strip() for ln in output.splitlines() if first in ln), "")
    return normalise(line, places)


def normalise(text: str, places: dict[str, str]) -> str:
    """Temporary paths → ``<tmp>``/``<data>``, the repository → ``.``; one line, bounded width."""
    text = text.replace(places["data"], "<data>").replace(places["wf"], "<wf>")
    text = text.replace(places["tmp"], "<tmp>").replace(places["repo"] + "/", "./")
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MESSAGE_WIDTH else text[: MESSAGE_WIDTH - 1] + "…"


# ---------------------------------------------------------------------------------- the page
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_doc(messages: dict[str, str]) -> str:
    """docs/bad-inputs.md from the rows and the messages replic printed."""
    lines = [
        "# Bad inputs: what replic says",
        "",
        "Every bad input below is refused before long work starts, with one line naming the",
        "file / key / value, and exit code 2 from `replic` (Snakemake's own exit code 1 for the",
        "workflow rows). The table is the contract: `tests/test_bad_inputs.py` runs every row",
        "through the real command line and checks the exit code, the names and this page.",
        "",
        "Rows are data: `tests/bad_inputs*.yaml` (one file per area or method; steps that need code",
        "in `tests/bad_input_makers.py`). After adding or changing a row, or a message, regenerate",
        "this page with `.venv/bin/python tests/test_bad_inputs.py --write-doc`.",
        "",
        "In the messages, `<tmp>` is the row's scratch directory, `<data>` a small COCO-layout",
        "dataset in it (train2017 / val2017 splits) and `<wf>` a copy of the workflow.",
        "",
        f"{len(ROWS)} rows.",
        "",
        "| # | area | bad input | command | what replic says | exit |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(ROWS, 1):
        prog = "snakemake" if row.runner == "snakemake" else "replic"
        sub = row.command()[0] if row.command() else ""
        lines.append(f"| {i} | {row.area} | {_cell(row.input)} (`{row.id}`) | `{prog} {sub}` | "
                     f"{_cell(messages.get(row.id, ''))} | {row.exit} |")
    return "\n".join(lines) + "\n"


def doc_messages() -> dict[str, str]:
    """row id → message column of the page as written."""
    found: dict[str, str] = {}
    if not DOC.is_file():
        return found
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| \d+ \| \w+ \| .*\(`([^`]+)`\) \| `[^`]*` \| (.*) \| \d+ \|$", line)
        if match:
            found[match.group(1)] = match.group(2).replace("\\|", "|")
    return found


# ---------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def data_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine_testutil import make_uniform_coco

    return make_uniform_coco(tmp_path_factory.mktemp("bad_inputs_data"), n_train=4, n_val=2, size=64)


def test_the_table_has_the_rows_the_issue_asks_for() -> None:
    assert len(ROWS) >= 30
    for area in AREAS:
        assert any(r.area == area for r in ROWS), f"no row for {area}"
    assert sum(r.subprocess or r.runner == "snakemake" for r in ROWS) >= 3


def test_the_page_lists_every_row_in_order() -> None:
    written = doc_messages()
    assert list(written) == [r.id for r in ROWS], (
        "docs/bad-inputs.md is out of date: run `.venv/bin/python tests/test_bad_inputs.py --write-doc`")


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path, data_template: Path) -> None:
    outcome, places = run_row(row, tmp_path, data_template)
    output = outcome.output
    assert outcome.code == row.exit, f"exit {outcome.code}, expected {row.exit}:\n{output[-3000:]}"
    for name in _expand(row.names, places):
        assert name in output, f"message does not name {name!r}:\n{output[-3000:]}"
    if row.runner == "replic":
        assert "Traceback" not in output, output[-3000:]
    for leftover in _expand(row.not_created, places):
        assert not Path(leftover).exists(), f"{leftover} exists after the refused command"
    message = message_of(row, output, places)
    assert message, f"no line names {row.names[0]!r}"
    assert doc_messages().get(row.id) == message, (
        f"docs/bad-inputs.md says something else for {row.id}; replic now says:\n  {message}\n"
        "regenerate with `.venv/bin/python tests/test_bad_inputs.py --write-doc`")


def _write_doc() -> None:
    import tempfile

    sys.path.insert(0, str(TESTS))
    from engine_testutil import make_uniform_coco

    messages = {}
    with tempfile.TemporaryDirectory() as scratch:
        template = make_uniform_coco(Path(scratch) / "template", n_train=4, n_val=2, size=64)
        for row in ROWS:
            tmp = Path(scratch) / row.id
            tmp.mkdir()
            outcome, places = run_row(row, tmp, template)
            messages[row.id] = message_of(row, outcome.output, places)
            status = "ok" if outcome.code == row.exit and messages[row.id] else f"EXIT {outcome.code}"
            print(f"{status:8} {row.id}: {messages[row.id]}", file=sys.stderr)
    DOC.write_text(render_doc(messages))
    print(f"wrote {DOC} ({len(ROWS)} rows)", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-doc"]:
        sys.exit("usage: python tests/test_bad_inputs.py --write-doc")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _write_doc()

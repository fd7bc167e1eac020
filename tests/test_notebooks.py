"""The notebooks execute headless (nbclient, kernel python3) without errors and draw figures.

CI needs ipykernel's kernelspec: `python -m ipykernel install --sys-prefix` in the venv
(jupyter_client also falls back to the running interpreter's ipykernel for "python3").
"""

from __future__ import annotations

import json
from pathlib import Path

import nbclient  # the "notebook" extra; a hard import so CI without it fails loudly, not skips
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _stored_clean(path: Path) -> None:
    """Notebooks are committed without outputs, so diffs show code, not pixels."""
    raw = json.loads(path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: a code cell has stored outputs"
            assert cell["execution_count"] is None, f"{path.name}: a code cell has an execution count"


def _inject_parameters(nb, values: dict) -> None:
    """Papermill-style: a cell right after the one tagged 'parameters' overrides its values."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


@pytest.mark.timeout(900)
def test_conditional_attention_notebook_executes(tmp_path):
    path = NOTEBOOKS / "conditional_attention.ipynb"
    _stored_clean(path)
    nb = nbformat.read(path, as_version=4)
    _inject_parameters(nb, {"out_dir": str(tmp_path / "figures"), "extremity_images": 4})
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook displayed no figure"
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    # The extremity table was rendered (a DataFrame's HTML) with one row per head and map.
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]
    assert any("dominant_edge" in o["data"]["text/html"] for o in tables)



# notebooks/receptive_tokens.ipynb (MasKD) is executed by tests/test_maskd_workflow.py on the token run
# that test's smoke workflow produces (one training of teacher and tokens for both).

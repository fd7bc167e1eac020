"""The lockfile, pyproject and the conda environment describe the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _pyproject_deps() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        deps += extra
    return deps


def test_every_dependency_is_locked():
    lock = _lock()
    missing = [d for d in _pyproject_deps() if _name(d) not in lock]
    assert not missing, f"requirements.lock lacks {missing}: re-run the compile command in README"


def test_torch_and_torchvision_pinned_as_a_pair():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {_name(d): d for d in project["dependencies"]}
    lock = _lock()
    for name in ("torch", "torchvision"):
        assert "==" in pins[name], f"{name} must be pinned exactly in pyproject.toml"
        assert pins[name].split("==")[1] == lock[name]


def test_conda_env_matches_lock():
    env = yaml.safe_load((ROOT / "envs" / "replic.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = {_name(p): p.split("==")[1] for p in pip_section}
    lock = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"] + project["optional-dependencies"]["notebook"]
    for dep in runtime:
        name = _name(dep)
        assert name in conda_pins, f"envs/replic.yaml lacks {name}"
        assert conda_pins[name] == lock[name], (
            f"envs/replic.yaml pins {name}=={conda_pins[name]} but requirements.lock has {lock[name]}"
        )
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.startswith("python=3.1") and int(python.split(".")[1]) >= 11


def test_license_is_the_apache_2_text_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    head = [line.strip() for line in text.splitlines() if line.strip()][:3]
    assert head == ["Apache License", "Version 2.0, January 2004", "http://www.apache.org/licenses/"]
    # The whole text, not an excerpt: the 9 sections of terms and the end marker.
    assert "9. Accepting Warranty or Additional Liability." in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_citation_cff_parses_and_cites_the_four_replicated_papers():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] == "replic" and cff["type"] == "software" and cff["message"].strip()
    assert cff["license"] == project["license"]["text"] == "Apache-2.0"
    assert cff.get("version", project["version"]) == project["version"]
    assert cff["authors"] == [{"name": "replic contributors"}]
    # repository-code only once pyproject names the project's repository.
    assert ("repository-code" in cff) == bool(project.get("urls"))
    arxiv = {}
    for ref in cff["references"]:
        assert ref["title"] and ref["authors"] and ref["year"], ref
        ids = [i["value"] for i in ref.get("identifiers", [])]
        arxiv.update({v.removeprefix("arXiv:"): ref for v in ids if v.startswith("arXiv:")})
    assert set(arxiv) == {"2108.06152", "2302.11208", "2211.09768", "2205.14589"}
    assert arxiv["2108.06152"]["authors"][0]["family-names"] == "Meng"  # Conditional DETR
    assert arxiv["2205.14589"]["authors"][0]["family-names"] == "Huang"  # MasKD
    assert arxiv["2211.09768"]["year"] == 2024  # D³ETR, IJCAI 2024

"""Shared pytest set-up.

Guards against a silent pass: when REPLIC_MIN_TESTS is set (the README's test command
and CI set it), collecting fewer tests than that is an error, not success. Under
pytest-xdist (``-n``) the check runs once, in the controller, on each worker's collection.
"""

from __future__ import annotations

import os

import pytest


def _check_collected(collected: int, config: pytest.Config) -> None:
    minimum = int(os.environ.get("REPLIC_MIN_TESTS", "0"))
    if minimum and collected < minimum and not config.option.collectonly:
        raise pytest.UsageError(
            f"only {collected} tests collected, expected at least {minimum}: "
            "a test module failed to import or the test paths are wrong"
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    _check_collected(len(session.items), session.config)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    _check_collected(len(ids), node.config)


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Tests run on a 2-core CI machine; one intra-op thread keeps them predictable."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

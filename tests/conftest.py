"""Shared pytest set-up.

Guards against a silent pass: when REPLIC_MIN_TESTS is set (the README's test command
and CI set it), collecting fewer tests than that is an error, not success.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    minimum = int(os.environ.get("REPLIC_MIN_TESTS", "0"))
    collected = len(session.items)
    if minimum and collected < minimum and not session.config.option.collectonly:
        raise pytest.UsageError(
            f"only {collected} tests collected, expected at least {minimum}: "
            "a test module failed to import or the test paths are wrong"
        )


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

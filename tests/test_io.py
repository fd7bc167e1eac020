"""Atomic writes: all-or-nothing, readable permissions, no temp files left behind."""

from __future__ import annotations

import os
import stat

import pytest

from replic.io import atomic_path, atomic_write_json, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_permissions_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a" / "x.json", {"b": 1, "a": [1.5]})
    finally:
        os.umask(old)
    path = tmp_path / "a" / "x.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == b'{"a":[1.5],"b":1}'

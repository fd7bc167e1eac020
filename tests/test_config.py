"""Strict config loading: unknown keys, wrong types and bad combinations name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from replic.config import ConfigError, config_hash, deep_merge, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    lr: float = 1e-4
    mode: Literal["csq", "csq_c"] = "csq"
    sizes: tuple[int, ...] = (480, 512)
    crop: tuple[int, int] = (384, 600)


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    epochs: int = 50
    path: str | None = None

    def validate(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")


def test_roundtrip_and_defaults():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": 1, "sizes": [1, 2, 3]}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.sizes == (1, 2, 3)
    assert cfg.epochs == 50 and cfg.path is None
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_nested_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.mdoe'.*did you mean 'inner\.mode'"):
        from_dict(Outer, {"name": "x", "inner": {"mdoe": "csq"}})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"name": 3}, "name"),
        ({"name": "x", "epochs": 1.5}, "epochs"),
        ({"name": "x", "epochs": True}, "epochs"),
        ({"name": "x", "inner": {"mode": "csq_z"}}, "inner.mode"),
        ({"name": "x", "inner": {"crop": [1, 2, 3]}}, "inner.crop"),
        ({"name": "x", "inner": {"sizes": [1, "a"]}}, r"inner.sizes\[1\]"),
        ({"name": "x", "inner": 4}, "inner"),
    ],
)
def test_wrong_types_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(Outer, data)


def test_missing_required_and_validate_hook():
    with pytest.raises(ConfigError, match="missing required config key 'name'"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match="epochs must be positive"):
        from_dict(Outer, {"name": "x", "epochs": 0})


def test_deep_merge_overlays_nested_values_only():
    base = {"a": {"b": 1, "c": 2}, "d": [1, 2]}
    merged = deep_merge(base, {"a": {"c": 3}, "d": [5]})
    assert merged == {"a": {"b": 1, "c": 3}, "d": [5]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1, 2]}, "base must not be mutated"


def test_config_hash_is_stable_and_sensitive():
    a = from_dict(Outer, {"name": "x"})
    b = from_dict(Outer, {"name": "x"})
    assert config_hash(a) == config_hash(b)
    assert config_hash({"x": 1, "y": 2}) == config_hash({"y": 2, "x": 1})
    assert config_hash(a) != config_hash(from_dict(Outer, {"name": "x", "epochs": 51}))


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_yaml(listy)

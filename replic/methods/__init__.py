"""Paper methods on the shared detector core, one module per idea.

An experiment names its method in the ``method`` config section (``name`` plus that method's
options); :func:`build_method` returns a :class:`~replic.methods.base.TrainingMethod`. Methods
are imported lazily, so a config naming one method never imports the others.

Add a method: write ``replic/methods/<name>.py`` with a ``TrainingMethod`` subclass (its
``Options`` dataclass holds the config keys, each with a documented default), then add one line
to :data:`METHODS`.
"""

from __future__ import annotations

import importlib
from typing import Any

from replic.config import ConfigError, from_dict
from replic.methods.base import MethodStep, TrainingMethod

# name -> "module:class"
METHODS: dict[str, str] = {
    "none": "replic.methods.base:TrainingMethod",
    "ks_detr": "replic.methods.ks_detr:KSDetr",
    "d3etr": "replic.methods.d3etr:D3ETR",
    "maskd_tokens": "replic.methods.maskd:MaskdTokens",
    "maskd": "replic.methods.maskd:MasKD",
}

DEFAULT_METHOD: dict[str, Any] = {"name": "none"}


def method_class(name: Any) -> type[TrainingMethod]:
    """The class registered under ``name``; ConfigError naming ``method.name`` otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method.name: {name!r} is not one of {sorted(METHODS)}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_method_options(section: dict[str, Any] | list[dict[str, Any]]) -> tuple[type[TrainingMethod], Any]:
    """Split the ``method`` config section into (class, typed options); strict, keys named.

    A list of sections composes methods on one student (:class:`~replic.methods.compose.ComposedMethod`)."""
    if isinstance(section, list):
        from replic.methods.compose import ComposedMethod, ComposedOptions, check_composable

        parts = []
        for i, item in enumerate(section):
            if not isinstance(item, dict):
                raise ConfigError(f"method[{i}]: expected a mapping with a 'name', got {item!r}")
            options = dict(item)
            cls = method_class(options.pop("name", "none"))
            parts.append((cls, from_dict(cls.Options, options, prefix=f"method[{i}]")))
        composed = ComposedOptions(parts)
        check_composable(composed)
        return ComposedMethod, composed
    if not isinstance(section, dict):
        raise ConfigError(f"method: expected a mapping with a 'name' (or a list of them), got {section!r}")
    options = dict(section)
    cls = method_class(options.pop("name", "none"))
    return cls, from_dict(cls.Options, options, prefix="method")


def method_classes(section: dict[str, Any] | list[dict[str, Any]]) -> list[type[TrainingMethod]]:
    """The method class(es) a ``method`` section names (several for a composition)."""
    from replic.methods.compose import ComposedOptions

    cls, options = parse_method_options(section)
    return [part for part, _ in options.parts] if isinstance(options, ComposedOptions) else [cls]


def build_method(cfg: Any, run_dir: Any = None) -> TrainingMethod:
    """The training method of experiment ``cfg`` (``cfg.method``).

    ``run_dir``: the training run's directory (``replic train --out``), kept as
    ``method.run_dir`` so a method can find sibling runs (a DAG teacher); None at evaluation.
    """
    cls, options = parse_method_options(cfg.method)
    method = cls(cfg, options)
    method.run_dir = run_dir
    return method


__all__ = ["METHODS", "DEFAULT_METHOD", "MethodStep", "TrainingMethod", "build_method", "method_class",
           "method_classes", "parse_method_options"]

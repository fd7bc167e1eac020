"""Atomic writing for the data tools (kept as an import path; the code lives in ``replic.io``)."""

from replic.io import atomic_write_bytes, atomic_write_json, dump_json_bytes

__all__ = ["atomic_write_bytes", "atomic_write_json", "dump_json_bytes"]

"""replic: a reproducible paper-replication workbench for DETR-family detectors."""

__version__ = "0.1.0"

"""Helpers used by the Snakefile: the table registry and the gathering of results."""

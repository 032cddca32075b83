"""Deterministic retail policy: constraints, ranking, reason codes, policy schema.

Pure functions over numpy arrays and frozen dataclasses. Imports no network client, web
framework or logging framework (held by an import-linter contract).
"""

"""Learned parts and data handling: the data contract, dataset adapters, interaction
matrices, model fitting, artifacts and candidate generators. No network I/O."""

"""Holdout experiments: which arm a request is in, and what the arm does to ranking.

Assignment hashes (salt, experiment name, unit id) with BLAKE2b into a fraction in [0, 1)
and walks the arms' cumulative shares. So it is

* deterministic and sticky: the same unit always lands in the same arm, on every replica,
  with no state to share;
* uniform: the fraction is the first 8 bytes of a cryptographic hash, read as an integer
  over 2**64;
* independent across experiments: the experiment's name (and salt) enter the hash, so a
  unit's arm in one experiment says nothing about its arm in another;
* reshuffled by a new salt.

The unit is the customer id, else the session id; a request with neither joins no
experiment (it could not be kept in its arm). Pure: no I/O, and ids are never stored here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from rules.constraints import CompiledPolicy
from rules.policy import ArmStrategy, Channel, Experiment, ExperimentArm, ExperimentsPolicy

__all__ = [
    "Assignment",
    "arm_index",
    "arm_indexes",
    "arm_policy",
    "assign",
    "in_scope",
    "unit_fraction",
]

Unit = Literal["customer", "session"]
_SEPARATOR: Final = "\x1f"  # cannot appear in a YAML name or salt written by hand
_SCALE: Final = float(2**64)


@dataclass(frozen=True)
class Assignment:
    """The experiment and arm a request is in."""

    experiment: str
    arm: str
    strategy: ArmStrategy
    margin_weight: float | None
    unit: Unit

    @property
    def shows_nothing(self) -> bool:
        return self.strategy == "holdout"


def unit_fraction(experiment: Experiment, unit_id: str) -> float:
    """The unit's uniform draw in [0, 1) for ``experiment``."""
    text = _SEPARATOR.join((experiment.salt, experiment.name, unit_id))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def _upper_bounds(arms: Sequence[ExperimentArm]) -> npt.NDArray[np.float64]:
    bounds = np.cumsum([arm.share for arm in arms], dtype=np.float64)
    bounds[-1] = 1.0  # shares sum to 1 within rounding: the last arm takes the remainder
    return bounds


def arm_index(experiment: Experiment, unit_id: str) -> int:
    """Position in ``experiment.arms`` of the unit's arm."""
    bounds = _upper_bounds(experiment.arms)
    return int(np.searchsorted(bounds, unit_fraction(experiment, unit_id), side="right"))


def arm_indexes(experiment: Experiment, unit_ids: Iterable[str]) -> npt.NDArray[np.int64]:
    """``arm_index`` of many units at once (simulations, tests of the split)."""
    fractions = np.fromiter(
        (unit_fraction(experiment, unit_id) for unit_id in unit_ids), dtype=np.float64
    )
    indexes: npt.NDArray[np.int64] = np.searchsorted(
        _upper_bounds(experiment.arms), fractions, side="right"
    ).astype(np.int64)
    return indexes


def in_scope(
    experiment: Experiment,
    experiments: ExperimentsPolicy,
    *,
    channel: Channel,
    categories: Iterable[str],
    store_id: str | None,
) -> bool:
    """Whether a request on ``channel``, about items of ``categories``, at ``store_id``
    (None: not in a store) falls in the experiment's scope."""
    scope = experiment.scope
    if scope.channels and channel not in scope.channels:
        return False
    if scope.categories and not set(scope.categories).intersection(categories):
        return False
    if scope.store_clusters:
        if store_id is None:
            return False
        return any(
            store_id in experiments.store_clusters[cluster] for cluster in scope.store_clusters
        )
    return True


def assign(
    experiments: ExperimentsPolicy,
    *,
    channel: Channel,
    categories: Iterable[str],
    store_id: str | None,
    customer_id: str | None,
    session_id: str | None,
) -> Assignment | None:
    """The first running experiment the request is in scope of, and the unit's arm there.

    None when no experiment matches or the request has neither a customer nor a session id.
    """
    if not experiments.running:
        return None
    unit: Unit
    if customer_id is not None:
        unit_id, unit = customer_id, "customer"
    elif session_id is not None:
        unit_id, unit = session_id, "session"
    else:
        return None
    asked_categories = tuple(categories)
    for experiment in experiments.running:
        if not in_scope(
            experiment,
            experiments,
            channel=channel,
            categories=asked_categories,
            store_id=store_id,
        ):
            continue
        arm = experiment.arms[arm_index(experiment, unit_id)]
        return Assignment(
            experiment=experiment.name,
            arm=arm.name,
            strategy=arm.strategy,
            margin_weight=arm.margin_weight,
            unit=unit,
        )
    return None


def arm_policy(compiled: CompiledPolicy, assignment: Assignment | None) -> CompiledPolicy:
    """The compiled policy ranking reads under the arm: the knobs' weights overridden.

    Only the weight table changes; floors, restrictions and objectives stay the policy's,
    so every arm is held to the same constraints.
    """
    if assignment is None or assignment.strategy in ("policy", "holdout"):
        return compiled
    weight = 0.0 if assignment.strategy == "relevance" else float(assignment.margin_weight or 0.0)
    return replace(compiled, margin_weight=np.full_like(compiled.margin_weight, weight))

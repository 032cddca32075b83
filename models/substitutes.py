"""Substitutes for basket items that cannot be fulfilled: alternatives from the same
category, ranked by how alike the model thinks they are (cosine of ALS item factors).

Whether an alternative is itself in stock is the rules' business: the pipeline judges
substitutes like every other candidate. The category of each model item comes from the
snapshot's item master, handed in as an array, so this module needs no catalog of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.candidates import best_positions
from models.interfaces import ModelArtifacts
from rules.compiled import compiled, register_warm_up
from rules.sorting import score_order

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Substitutes:
    """Parallel arrays, best first, each item once."""

    item_idx: npt.NDArray[np.int32]  # model rows of the alternatives
    score: npt.NDArray[np.float32]  # in [0, 1]: cosine mapped from [-1, 1]
    for_row: npt.NDArray[np.int32]  # the constrained model row each one replaces

    def __len__(self) -> int:
        return int(self.item_idx.shape[0])


class SubstituteFinder:
    """Same-category alternatives by ALS similarity, for one (model, item master) pair.

    Categories are grouped once at construction, so a request touches only the categories
    of its constrained items, never the whole catalog.
    """

    def __init__(self, artifacts: ModelArtifacts, category_of_row: IntArray) -> None:
        if len(category_of_row) != len(artifacts.item_skus):
            raise ValueError(
                f"category_of_row covers {len(category_of_row)} items, "
                f"the model has {len(artifacts.item_skus)}"
            )
        self._factors = artifacts.item_factors
        norms = np.linalg.norm(self._factors, axis=1)
        norms[norms == 0] = 1.0
        self._norms = norms
        self._category = np.asarray(category_of_row, dtype=np.int64)
        known = np.flatnonzero(self._category >= 0)
        self._members = known[np.argsort(self._category[known], kind="stable")]
        n_groups = int(self._category.max()) + 1 if known.size else 0
        self._indptr = np.zeros(n_groups + 1, dtype=np.int64)
        np.cumsum(np.bincount(self._category[known], minlength=n_groups), out=self._indptr[1:])

    def find(self, constrained_rows: npt.ArrayLike, *, count_per_item: int) -> Substitutes:
        """Up to ``count_per_item`` alternatives for each constrained model row.

        Items of unknown category get none; a row proposed for several constrained items keeps
        its best score (and names that item); constrained rows are never proposed.
        """
        constrained = np.array(
            sorted(set(np.asarray(constrained_rows, dtype=np.int64).ravel().tolist())),
            dtype=np.int64,
        )
        found: list[tuple[IntArray, npt.NDArray[np.floating], int]] = []
        if count_per_item > 0:
            # One pass per constrained basket line: a basket holds few of them.
            for row in constrained.tolist():
                category = int(self._category[row])
                if category < 0:
                    continue
                same = _members_except(
                    self._members[self._indptr[category] : self._indptr[category + 1]],
                    constrained,
                )
                if not same.size:
                    continue
                cosine = (self._factors[same] @ self._factors[row]) / (
                    self._norms[same] * self._norms[row]
                )
                top = best_positions(cosine, count_per_item)
                found.append((same[top], (cosine[top] + 1.0) / 2.0, row))
        if not found:
            return Substitutes(
                item_idx=np.empty(0, dtype=np.int32),
                score=np.empty(0, dtype=np.float32),
                for_row=np.empty(0, dtype=np.int32),
            )
        item_idx, score, for_row = _best_of_each(
            np.concatenate([part[0] for part in found]),
            np.concatenate([part[1] for part in found]).astype(np.float64),
            np.repeat(
                np.array([part[2] for part in found], dtype=np.int64),
                [len(part[0]) for part in found],
            ),
        )
        return Substitutes(item_idx=item_idx, score=score, for_row=for_row)


@compiled
def _members_except(members: IntArray, excluded: IntArray) -> IntArray:
    """``members`` without those in ``excluded`` (sorted), in order."""
    kept = np.empty(members.shape[0], dtype=np.int64)
    count = 0
    for member in members:
        at = np.searchsorted(excluded, member)
        if at < excluded.shape[0] and excluded[at] == member:
            continue
        kept[count] = member
        count += 1
    return kept[:count]


@compiled
def _best_of_each(
    rows: IntArray, scores: npt.NDArray[np.float64], owners: IntArray
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Entries best score first (ties: the lower row), each row once with its best entry,
    scores clipped to [0, 1]: what ``np.lexsort((rows, -scores))`` and the first of each
    row by ``np.unique`` give."""
    order = score_order(scores, rows)
    distinct = np.unique(rows)
    seen = np.zeros(distinct.shape[0], dtype=np.bool_)
    item_idx = np.empty(distinct.shape[0], dtype=np.int32)
    kept_scores = np.empty(distinct.shape[0], dtype=np.float32)
    for_row = np.empty(distinct.shape[0], dtype=np.int32)
    kept = 0
    for entry in order:
        slot = np.searchsorted(distinct, rows[entry])
        if seen[slot]:
            continue
        seen[slot] = True
        item_idx[kept] = rows[entry]
        kept_scores[kept] = min(max(scores[entry], 0.0), 1.0)
        for_row[kept] = owners[entry]
        kept += 1
    return item_idx, kept_scores, for_row


def _warm_up() -> None:
    members = np.array([1, 2, 3], dtype=np.int64)
    _members_except(members, np.array([2], dtype=np.int64))
    _best_of_each(members, np.array([0.5, 0.75, 0.5]), np.array([0, 0, 4], dtype=np.int64))


register_warm_up(_warm_up)

"""Substitutes for basket items that cannot be fulfilled: in-stock alternatives from the same
category, ranked by how alike the model thinks they are (cosine of ALS item factors).

The category of each model item comes from the snapshot's item master, handed in as an
array, so this module needs no catalog of its own.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from models.interfaces import ModelArtifacts

IntArray = npt.NDArray[np.int64]


def substitute_candidates(
    artifacts: ModelArtifacts,
    *,
    constrained_rows: IntArray,
    category_of_row: IntArray,
    count_per_item: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Model rows and scores in [0, 1] of substitutes for each constrained model row.

    ``category_of_row`` gives each model item's category code (-1 where unknown); items of
    unknown category get no substitutes. A row proposed for several constrained items keeps
    its best score. Rows come back best first, unique, without the constrained rows.
    """
    factors = artifacts.item_factors
    norms = np.linalg.norm(factors, axis=1)
    norms[norms == 0] = 1.0
    found_rows: list[IntArray] = []
    found_scores: list[npt.NDArray[np.float64]] = []
    for row in constrained_rows:
        category = category_of_row[row]
        if category < 0:
            continue
        same = np.flatnonzero(category_of_row == category)
        same = same[~np.isin(same, constrained_rows)]
        if not same.size:
            continue
        cosine = (factors[same] @ factors[row]) / (norms[same] * norms[row])
        top = np.argsort(-cosine, kind="stable")[:count_per_item]
        found_rows.append(same[top])
        # Cosine lies in [-1, 1]; map to [0, 1] so it is comparable with other relevance.
        found_scores.append((cosine[top] + 1.0) / 2.0)
    if not found_rows:
        return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32)
    rows = np.concatenate(found_rows)
    scores = np.concatenate(found_scores)
    order = np.lexsort((rows, -scores))
    rows, scores = rows[order], scores[order]
    _, first = np.unique(rows, return_index=True)
    keep = np.sort(first)
    return rows[keep].astype(np.int32), scores[keep].astype(np.float32)

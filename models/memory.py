"""Candidate lists remembered for guests: generation is a pure function of immutable inputs.

A generator over one set of artifacts (and one snapshot's item facts) answers a request
without a customer row from the anchors as a set, the count, the region and the unmodelled
categories alone: nothing else of the request enters (replenishment and ALS need a customer,
and no generator reads ``context.now`` without one). Guests asking about the same basket or
product page, the usual traffic of a product page, then get the same list, so it is
remembered rather than generated again. Personalised requests are never remembered: they
rarely repeat, and keeping them would keep per-customer lists in memory.

The rules still judge every remembered list afresh (stock, prices and promotions change
between requests); only the model's proposal is reused. Lists are handed out read-only,
so a caller that tried to change one would fail loudly instead of changing what the next
guest gets. One memory serves one generator: a new snapshot, model or policy builds a new
generator and so starts an empty memory.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from models.interfaces import CandidateGenerator, Candidates, GenerationContext

# (anchor rows as a sorted set, count, region, unmodelled categories)
_Key = tuple[tuple[int, ...], int, str | None, tuple[str, ...]]


class GuestCandidateMemory:
    """The last ``capacity`` guest candidate lists of ``generator``, least recently used
    evicted first."""

    def __init__(self, generator: CandidateGenerator, *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.generator = generator
        self.capacity = capacity
        self._lists: OrderedDict[_Key, Candidates] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lists)

    def generate(
        self,
        *,
        anchors: npt.NDArray[np.int32],
        count: int,
        context: GenerationContext,
    ) -> tuple[Candidates, bool]:
        """``generator.generate`` for a guest, and whether the list was remembered."""
        key: _Key = (
            tuple(sorted(set(anchors.tolist()))),
            count,
            context.region,
            context.categories,
        )
        remembered = self._lists.get(key)
        if remembered is not None:
            self._lists.move_to_end(key)
            return remembered, True
        candidates = self.generator.generate(
            anchors=anchors, user_row=None, count=count, context=context
        )
        for column in (candidates.item_idx, candidates.score, candidates.kind):
            column.setflags(write=False)
        self._lists[key] = candidates
        if len(self._lists) > self.capacity:
            self._lists.popitem(last=False)
        return candidates, False

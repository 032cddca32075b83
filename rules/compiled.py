"""Compiled loops for the few rule steps where numpy's per-call cost is most of the work.

A request judges ~500 candidates at 16 nodes: arrays so small that a chain of numpy calls
spends more time dispatching each call than computing it (the node choice was a dozen whole-
array passes for what one pass over the cells decides). ``compiled`` turns a plain-Python
loop over arrays into machine code with numba; the function stays pure and is tested like
any rule. Compiled code is cached on disk (next to the source, or in numba's user-wide cache
when that is read-only, or ``NUMBA_CACHE_DIR``), so a process compiles each loop once per
machine; ``warm_up`` runs every registered loop once on tiny inputs, which a server does at
start-up so that no request pays for compiling.

Not for everything: a compiled loop is worth it only where it replaces many numpy calls on
small arrays. One-pass array work (a gather, a comparison) stays numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

__all__ = ["compiled", "compiled_inline", "register_warm_up", "warm_up"]

_Function = TypeVar("_Function", bound=Callable[..., Any])
_WARM_UPS: list[Callable[[], object]] = []


def compiled(function: _Function) -> _Function:
    """``function`` compiled (lazily, on first call; cached on disk), same signature."""
    return cast(_Function, numba.njit(cache=True, nogil=True)(function))


def compiled_inline(function: _Function) -> _Function:
    """``compiled``, and inlined into the compiled loops that call it: for a small step called
    once per run or row, where a call costs as much as the step."""
    return cast(_Function, numba.njit(cache=True, nogil=True, inline="always")(function))


def register_warm_up(run: Callable[[], object]) -> None:
    """A call that compiles (or loads from cache) one compiled loop for the types requests use."""
    _WARM_UPS.append(run)


def warm_up() -> int:
    """Compile or load every registered loop; the number of warm-up calls made."""
    for run in _WARM_UPS:
        run()
    return len(_WARM_UPS)

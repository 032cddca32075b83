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
import numpy as np
import numpy.typing as npt

__all__ = [
    "compiled",
    "compiled_inline",
    "compiled_signatures",
    "read_only",
    "register_warm_up",
    "warm_up",
]

_Function = TypeVar("_Function", bound=Callable[..., Any])
_WARM_UPS: list[Callable[[], object]] = []
_DISPATCHERS: list[Any] = []


def compiled(function: _Function) -> _Function:
    """``function`` compiled (lazily, on first call; cached on disk), same signature."""
    dispatcher = numba.njit(cache=True, nogil=True)(function)
    _DISPATCHERS.append(dispatcher)
    return cast(_Function, dispatcher)


def compiled_inline(function: _Function) -> _Function:
    """``compiled``, and inlined into the compiled loops that call it: for a small step called
    once per run or row, where a call costs as much as the step."""
    dispatcher = numba.njit(cache=True, nogil=True, inline="always")(function)
    _DISPATCHERS.append(dispatcher)
    return cast(_Function, dispatcher)


def compiled_signatures() -> dict[str, int]:
    """How many argument types each compiled loop is compiled for, by qualified name: a loop
    called with types its warm-up did not use compiles then, inside a request."""
    return {
        f"{dispatcher.py_func.__module__}.{dispatcher.py_func.__qualname__}": len(
            dispatcher.signatures
        )
        for dispatcher in _DISPATCHERS
    }


def read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A read-only copy of ``array``, for warm-ups: model artifacts are memory-mapped read-only,
    and numba compiles a loop separately for read-only arrays."""
    copy = np.array(array)
    copy.setflags(write=False)
    return copy


def register_warm_up(run: Callable[[], object]) -> None:
    """A call that compiles (or loads from cache) one compiled loop for the types requests use."""
    _WARM_UPS.append(run)


def warm_up() -> int:
    """Compile or load every registered loop; the number of warm-up calls made."""
    for run in _WARM_UPS:
        run()
    return len(_WARM_UPS)

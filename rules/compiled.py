"""Compiled loops for the few rule steps where numpy's per-call cost is most of the work.

A request judges ~500 candidates at 16 nodes: arrays so small that a chain of numpy calls
spends more time dispatching each call than computing it (the node choice was a dozen whole-
array passes for what one pass over the cells decides). ``compiled`` turns a plain-Python
loop over arrays into machine code with numba; the function stays pure and is tested like
any rule. Compiled code is cached on disk (``loop_cache_dir``), so a process compiles each
loop once per machine and version of the loops; ``warm_up`` runs every registered loop once
on tiny inputs, which a server does at start-up so that no request pays for compiling.

Not for everything: a compiled loop is worth it only where it replaces many numpy calls on
small arrays. One-pass array work (a gather, a comparison) stays numpy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

__all__ = [
    "compiled",
    "compiled_inline",
    "compiled_signatures",
    "loop_cache_dir",
    "loop_sources",
    "loops_fingerprint",
    "read_only",
    "register_warm_up",
    "warm_up",
]

_numba_config: Any = numba.config  # its settings are set at import, untyped

# The packages whose modules compile loops, beside this one (checkout or site-packages).
_PACKAGES = ("rules", "models", "service")
_LOOP_MARK = b"@compiled"  # how a module compiles a loop (also matches @compiled_inline)
_CACHE_PREFIX = "loops-"
_UNUSED_CACHE_SECONDS = 7 * 24 * 3600  # another version's cache, untouched this long, goes


def loop_sources(package_dirs: Iterable[Path]) -> list[Path]:
    """The modules under ``package_dirs`` that compile loops, and this one (its flags)."""
    found = {Path(__file__).resolve()}
    for package_dir in package_dirs:
        if package_dir.is_dir():
            found.update(
                path.resolve()
                for path in package_dir.rglob("*.py")
                if _LOOP_MARK in path.read_bytes()
            )
    return sorted(found)


def loops_fingerprint(sources: Iterable[Path]) -> str:
    """A short hash of the sources' names and contents, whatever order they come in."""
    digest = hashlib.sha256()
    for path in sorted(sources, key=lambda source: (source.name, str(source))):
        digest.update(f"{path.parent.name}/{path.name}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def loop_cache_dir(base: Path, fingerprint: str, *, now: float | None = None) -> Path:
    """Where compiled loops are cached: ``base``/loops-<fingerprint>, touched now. Other
    versions' directories that no process used for a week are removed.

    numba keys a cached loop on its own file's timestamp only, so a loop calling a loop of
    another module would keep the callee's old machine code after the callee changed: tests
    and benchmarks of an edited checkout would run code that is no longer there. A cache per
    fingerprint of every loop module starts afresh whenever any of them changes.
    """
    now = time.time() if now is None else now
    chosen = base / f"{_CACHE_PREFIX}{fingerprint}"
    chosen.mkdir(parents=True, exist_ok=True)
    os.utime(chosen, (now, now))
    for other in base.glob(f"{_CACHE_PREFIX}*"):
        unused = other != chosen and now - other.stat().st_mtime > _UNUSED_CACHE_SECONDS
        if unused and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    return chosen


def _default_cache_base() -> Path:
    """``NUMBA_CACHE_DIR`` when set (the image sets it), else the user's cache directory."""
    if _numba_config.CACHE_DIR:
        return Path(_numba_config.CACHE_DIR)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "upsell" / "numba"


def _use_loop_cache() -> None:
    """Point numba's cache at this version's directory, before any loop is decorated (numba
    reads ``config.CACHE_DIR`` when a cached function is created). Where that cannot be
    written, numba falls back to its own places, as before."""
    here = Path(__file__).resolve().parent
    sources = loop_sources(here.parent / package for package in _PACKAGES)
    try:
        chosen = loop_cache_dir(_default_cache_base(), loops_fingerprint(sources))
    except (OSError, RuntimeError):  # no writable base, or no home directory to put it in
        return
    _numba_config.CACHE_DIR = str(chosen)


_use_loop_cache()

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

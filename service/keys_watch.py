"""Follows ``UPSELL_API_KEYS_FILE`` while serving: a changed file is loaded and swapped in.

Every ``UPSELL_API_KEYS_RELOAD_SECONDS`` each worker compares the file's stamp (modification
time, size, inode: an atomic replace, as a Kubernetes secret update does it, changes the
inode) with the one it loaded. A changed file is read whole and checked as at start-up; a
good one replaces the keys at once (a new key works, a removed one gets 401), a bad one is
refused, logged once with the file and the entry, and the keys loaded before stay in force:
a typo never locks every caller out, nor lets anyone in. A file that changes while it is
read is read again at the next check, not used half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog

from rules.errors import InputError
from service.api_keys import KeyRing, load_key_ring

__all__ = ["FileStamp", "KeysFileWatcher", "file_stamp"]

log = structlog.get_logger(__name__)

FileStamp = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino
_UNKNOWN: Final = object()
RELOADED: Final = "reloaded"
REFUSED: Final = "refused"


def file_stamp(path: Path) -> FileStamp | None:
    """What tells one version of ``path`` from the next; None when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class KeysFileWatcher:
    """Checks ``path`` every ``interval`` seconds; hands each good new ring to ``use``."""

    def __init__(
        self,
        path: Path,
        *,
        loaded: KeyRing,
        use: Callable[[KeyRing], None],
        interval: float,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.interval = interval
        self._keys = loaded
        self._use = use
        self._on_outcome = on_outcome
        # The stamp of the version in force, or of one refused: neither is read again. Not
        # known at first: ``loaded`` was read before this watcher, maybe from an older file.
        self._seen: object = _UNKNOWN  # a FileStamp, or None for a file that was missing
        self._task: asyncio.Task[None] | None = None

    def check(self) -> str | None:
        """Load the file if it changed since the last check: ``RELOADED`` (in force now),
        ``REFUSED`` (bad, the keys before stay) or None (the same keys, or changing)."""
        before = file_stamp(self.path)
        if before == self._seen:
            return None
        try:
            ring = load_key_ring(self.path)
        except InputError as exc:
            if file_stamp(self.path) != before:
                return None  # written while read: judged once it settles
            self._seen = before
            log.error(
                "api_keys_reload_refused",
                reason=str(exc),
                effect=f"the {len(self._keys)} keys loaded before stay in force",
            )
            self._count(REFUSED)
            return REFUSED
        if file_stamp(self.path) != before:
            return None
        self._seen = before
        if ring.keys == self._keys.keys:
            return None  # the same keys (the first check, or a file touched, not changed)
        previous = {key.name: key for key in self._keys.keys}
        current = {key.name: key for key in ring.keys}
        self._keys = ring
        self._use(ring)
        log.info(
            "api_keys_reloaded",
            keys=len(ring),
            added=sorted(current.keys() - previous.keys()),
            removed=sorted(previous.keys() - current.keys()),
            changed=sorted(
                name for name in current.keys() & previous.keys() if current[name] != previous[name]
            ),
        )
        self._count(RELOADED)
        return RELOADED

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="api-keys-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a watcher that dies would leave revoked keys working
                log.exception("api_keys_watch_failed", effect="checked again next interval")

    def _count(self, outcome: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome)

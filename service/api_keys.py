"""API keys: who a caller is and what it may do (``UPSELL_API_KEYS_FILE``).

The file holds hashes only (a key is shown once, by ``upsell keys new``)::

    keys:
      - name: web-shop             # shown in logs and metrics, never the key
        sha256: "<hex sha256 of the raw key>"
        scopes: [cart, pdp]        # channels: cart, pdp, pos, contact_center; admin; events
        rate_limit: {per_second: 200, burst: 400}   # optional; default UPSELL_RATE_LIMIT_*

``admin`` holds every scope (an operator's key); ``events`` posts order events. A bad file is
refused whole at start-up with an error naming the file and the entry.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from rules.errors import InputError
from rules.policy import CHANNELS

__all__ = [
    "ADMIN",
    "EVENTS",
    "SCOPES",
    "ApiKey",
    "KeyRing",
    "RateLimit",
    "hash_key",
    "load_key_ring",
    "new_key",
]

ADMIN: Final = "admin"
EVENTS: Final = "events"
SCOPES: Final = frozenset((*CHANNELS, ADMIN, EVENTS))
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_FIELDS: Final = frozenset(("name", "sha256", "scopes", "rate_limit"))
_KEY_BYTES: Final = 32  # 256 random bits: no guessing, no salt needed for a plain sha256


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``per_second`` refill, ``burst`` tokens at most; per_second 0 = none."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the raw key
    scopes: frozenset[str]
    rate_limit: RateLimit | None  # None: the settings' default

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


def hash_key(raw: str) -> bytes:
    return hashlib.sha256(raw.encode("utf-8")).digest()


class KeyRing:
    """The configured keys; ``find`` compares the digest with every entry in constant time."""

    def __init__(self, keys: Iterable[ApiKey], *, source: str | None = None) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)
        self.source = source  # the file the keys came from, for messages

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, raw: str) -> ApiKey | None:
        digest = hash_key(raw)
        found: ApiKey | None = None
        for key in self.keys:  # no early exit: the time does not tell which entry matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def load_key_ring(path: Path | None) -> KeyRing:
    """The keys in ``path`` (an empty ring for None); InputError naming file and entry."""
    if path is None:
        return KeyRing(())
    where = f"UPSELL_API_KEYS_FILE {path}"
    try:
        document = yaml.safe_load(path.read_text("utf-8"))
    except OSError as exc:
        raise InputError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise InputError(f"{where}: expected a mapping with a `keys` list")
    unknown = set(document) - {"keys"}
    if unknown:
        raise InputError(f"{where}: unknown top-level fields {sorted(unknown)}")
    keys = [_entry(entry, where=f"{where}: keys[{i}]") for i, entry in enumerate(document["keys"])]
    for kind, values in (("name", [k.name for k in keys]), ("sha256", [k.digest for k in keys])):
        seen: set[object] = set()
        for position, value in enumerate(values):
            if value in seen:
                raise InputError(f"{where}: keys[{position}].{kind}: repeated")
            seen.add(value)
    return KeyRing(keys, source=str(path))


def _entry(entry: object, *, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping with name, sha256 and scopes")
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise InputError(f"{where}: unknown fields {sorted(map(str, unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"{where}.name: 1-64 of A-Z a-z 0-9 . _ - required, got {name!r}")
    where = f"{where} ({name})"
    digest = entry.get("sha256")
    if isinstance(digest, int | float):
        raise InputError(f"{where}.sha256: quote the hex digits (YAML read them as a number)")
    if not isinstance(digest, str) or not _HEX_SHA256.match(digest.lower()):
        raise InputError(f"{where}.sha256: 64 hex digits (sha256 of the key) required")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise InputError(f"{where}.scopes: a non-empty list of {sorted(SCOPES)} required")
    wrong = sorted(set(scopes) - SCOPES)
    if wrong:
        raise InputError(f"{where}.scopes: unknown {wrong}; known: {sorted(SCOPES)}")
    return ApiKey(
        name=name,
        digest=bytes.fromhex(digest),
        scopes=frozenset(scopes),
        rate_limit=_rate_limit(entry.get("rate_limit"), where=f"{where}.rate_limit"),
    )


def _rate_limit(value: object, *, where: str) -> RateLimit | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"per_second", "burst"}:
        raise InputError(f"{where}: expected {{per_second: N, burst: N}}")
    per_second, burst = value.get("per_second"), value.get("burst")
    if isinstance(per_second, bool) or not isinstance(per_second, int | float) or per_second < 0:
        raise InputError(f"{where}.per_second: a number >= 0 required (0 = unlimited)")
    if burst is None:
        burst = max(1, int(per_second))
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise InputError(f"{where}.burst: an integer >= 1 required")
    return RateLimit(per_second=float(per_second), burst=burst)


def new_key(*, name: str, scopes: Sequence[str]) -> tuple[str, str]:
    """A fresh random key and the YAML entry holding its hash (for the keys file)."""
    if not _NAME.match(name):
        raise InputError(f"--name: 1-64 of A-Z a-z 0-9 . _ - required, got {name!r}")
    wrong = sorted(set(scopes) - SCOPES)
    if not scopes or wrong:
        raise InputError(f"--scopes: unknown {wrong}; known: {sorted(SCOPES)}")
    raw = f"upsk_{secrets.token_urlsafe(_KEY_BYTES)}"
    entry = yaml.safe_dump(
        {"keys": [{"name": name, "sha256": hash_key(raw).hex(), "scopes": list(scopes)}]},
        sort_keys=False,
        default_flow_style=None,
    )
    return raw, entry

"""The keys file followed while serving: new keys work, removed ones are refused, a bad file
is refused and the keys before it stay, over real HTTP (uvicorn in a thread)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api_keys import KeyRing, load_key_ring
from service.app import create_app
from service.keys_watch import REFUSED, RELOADED, KeysFileWatcher
from service.logging import configure_logging
from service.settings import Settings
from tests.service.conftest import DemoData
from tests.service.test_api_guard import CART, bearer, write_keys
from tests.service.test_faults import served

# A known key with a body that fails validation gets 422 (an unknown key, 401): the key was
# accepted, whether or not a snapshot is served. Scopes are judged on a valid body.
PAST_AUTH = {"channel": "cart", "limit": 0}


def replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as a secret mount or `mv` does."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def status(base: str, name: str, body: dict[str, object] = PAST_AUTH) -> int:
    return httpx.post(
        f"{base}/v1/recommendations", json=body, headers=bearer(name), timeout=10
    ).status_code


def reloads(base: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "upsell_api_keys_reloads_total":
                found[sample.labels["outcome"]] = sample.value
    return found


def keys_settings(
    demo_data: DemoData, tmp_path: Path, keys_file: Path, *, reload_seconds: float
) -> Settings:
    """The sample's model, the in-process store, keys from ``keys_file``; info logs."""
    return Settings(
        auth="keys",
        api_keys_file=keys_file,
        api_keys_reload_seconds=reload_seconds,
        state_dir=tmp_path / "state",
        artifacts_dir=demo_data.artifacts_dir,
        explain_stats_log_seconds=0,
        log_level="info",
    )


def eventually(condition: Callable[[], bool], what: str, *, within: float = 10.0) -> None:
    give_up_at = time.monotonic() + within
    while not condition():
        if time.monotonic() > give_up_at:
            pytest.fail(f"not within {within:g} s: {what}")
        time.sleep(0.05)


def test_a_changed_keys_file_takes_effect_while_serving(
    demo_data: DemoData, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    keys_file = write_keys(tmp_path / "keys.yaml", {"alpha": (["cart"], None)})
    settings = keys_settings(demo_data, tmp_path, keys_file, reload_seconds=0.05)
    with served(create_app(settings)) as base:
        assert (status(base, "alpha"), status(base, "beta")) == (422, 401)

        # Rotation: beta added, alpha revoked, in one atomic replace.
        write_keys(tmp_path / "next.yaml", {"beta": (["cart"], None)})
        replace(keys_file, (tmp_path / "next.yaml").read_text())
        eventually(lambda: status(base, "beta") == 422, "the new key accepted")
        assert status(base, "alpha") == 401

        # A bad file: refused once, logged, and the keys in force stay.
        replace(keys_file, "keys:\n  - {name: beta, sha256: abc, scopes: [cart]}\n")
        eventually(lambda: reloads(base).get(REFUSED) == 1, "the bad file refused")
        assert (status(base, "beta"), status(base, "alpha")) == (422, 401)
        time.sleep(0.3)  # several checks of the same bad file: not refused again
        assert reloads(base) == {RELOADED: 1, REFUSED: 1}

        # A deleted file is a bad one too: nobody is locked out, nobody let in.
        keys_file.unlink()
        eventually(lambda: reloads(base).get(REFUSED) == 2, "the missing file refused")
        assert status(base, "beta") == 422

        # Fixed: a scope change applies (beta loses cart, gains pdp).
        write_keys(tmp_path / "fixed.yaml", {"beta": (["pdp"], None)})
        replace(keys_file, (tmp_path / "fixed.yaml").read_text())
        eventually(lambda: status(base, "beta", CART) == 403, "the scope change applied")
        assert reloads(base) == {RELOADED: 2, REFUSED: 2}

    logged = capfd.readouterr().err
    assert '"event":"api_keys_reloaded"' in logged
    assert '"added":["beta"]' in logged
    assert '"removed":["alpha"]' in logged
    assert '"changed":["beta"]' in logged
    refusal = next(line for line in logged.splitlines() if "api_keys_reload_refused" in line)
    assert "keys[0] (beta).sha256" in refusal
    assert "the 1 keys loaded before stay in force" in refusal
    assert "test-key-" not in logged  # raw keys never logged


def test_the_watcher_reloads_only_what_changed_and_settled(tmp_path: Path) -> None:
    configure_logging(level="error", json=True)  # to this test's stderr
    keys_file = write_keys(tmp_path / "keys.yaml", {"alpha": (["cart"], None)})
    rings: list[KeyRing] = []
    watcher = KeysFileWatcher(
        keys_file, loaded=load_key_ring(keys_file), use=rings.append, interval=1.0
    )
    assert watcher.check() is None  # unchanged
    write_keys(keys_file, {"alpha": (["cart"], None), "beta": (["pos"], None)})  # in place
    os.utime(keys_file, ns=(0, 1))  # a new stamp even where the clock is coarse
    assert watcher.check() == RELOADED
    assert [key.name for key in rings[-1].keys] == ["alpha", "beta"]
    assert watcher.check() is None
    keys_file.write_text("keys: [")
    assert watcher.check() == REFUSED
    assert watcher.check() is None  # the same bad version is not judged twice
    assert len(rings) == 1


def test_a_keys_file_others_may_write_is_warned_about_at_start(
    demo_data: DemoData, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    keys_file = write_keys(tmp_path / "keys.yaml", {"alpha": (["cart"], None)})
    settings = keys_settings(demo_data, tmp_path, keys_file, reload_seconds=0)
    keys_file.chmod(0o600)
    with served(create_app(settings)):
        pass
    assert "api_keys_file_writable" not in capfd.readouterr().err
    keys_file.chmod(0o664)
    with served(create_app(settings)):
        pass
    warning = next(
        line for line in capfd.readouterr().err.splitlines() if "api_keys_file_writable" in line
    )
    assert str(keys_file) in warning
    assert "chmod go-w" in warning


def test_the_first_check_catches_a_change_made_before_the_watcher_started(
    tmp_path: Path,
) -> None:
    configure_logging(level="error", json=True)
    keys_file = write_keys(tmp_path / "keys.yaml", {"alpha": (["cart"], None)})
    loaded = load_key_ring(keys_file)  # as create_app reads it, before the lifespan starts
    write_keys(keys_file, {"beta": (["cart"], None)})
    rings: list[KeyRing] = []
    watcher = KeysFileWatcher(keys_file, loaded=loaded, use=rings.append, interval=1.0)
    assert watcher.check() == RELOADED
    assert [key.name for key in rings[0].keys] == ["beta"]
    os.utime(keys_file, ns=(0, 2))  # touched, the same keys: nothing to say
    assert watcher.check() is None
    assert len(rings) == 1

"""The compiled rule loops: the start-up warm-up reaches every one of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import rules.compiled
from rules.compiled import loop_cache_dir, loop_sources, loops_fingerprint

# Run in a fresh interpreter: in this one, earlier tests may have compiled the loops already.
_CHECK = """
import numba
import rules.constraints, rules.ranking, models.calibration
from rules.compiled import warm_up
warm_up()
loops = {f"{module.__name__}.{name}": value
         for module in (rules.constraints, rules.ranking, models.calibration)
         for name, value in vars(module).items()
         if isinstance(value, numba.core.registry.CPUDispatcher)}
assert loops, "no compiled loops found"
print(",".join(sorted(name for name, loop in loops.items() if not loop.signatures)) or "-")
"""


def test_warm_up_compiles_every_compiled_loop() -> None:
    """After ``warm_up`` alone, every numba loop in the rules has a compiled signature, so no
    request waits for a compile; a loop added without a warm-up call fails here."""
    checked = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=300, check=False
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert checked.stdout.strip() == "-", f"not compiled by warm_up: {checked.stdout.strip()}"


# A loop calling a loop of another module, as the generators call the merges and the sorts.
_CALLEE = """
from rules.compiled import compiled


@compiled
def step(value):
    return value + {added}
"""
_CALLER = """
from rules.compiled import compiled
from rules.probe_callee import step


@compiled
def pipeline(value):
    return step(value) * 10
"""


def _run_probe(root: Path, cache: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(root), "NUMBA_CACHE_DIR": str(cache)}
    ran = subprocess.run(
        [sys.executable, "-c", "from rules.probe_caller import pipeline; print(pipeline(1))"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        cwd=root,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    return ran.stdout.strip()


def test_an_edited_callee_is_compiled_again_for_its_cached_callers(tmp_path: Path) -> None:
    """numba's disk cache keys a loop on its own file: without the cache per fingerprint of
    the loop modules, the caller would go on answering 20 from its cached machine code after
    its callee changed (a checkout's tests would run code that is no longer there)."""
    root = tmp_path / "checkout"
    shutil.copytree(Path(rules.compiled.__file__).parent, root / "rules")
    callee = root / "rules" / "probe_callee.py"
    callee.write_text(_CALLEE.format(added=1))
    (root / "rules" / "probe_caller.py").write_text(_CALLER)
    cache = tmp_path / "numba-cache"

    assert _run_probe(root, cache) == "20"
    assert _run_probe(root, cache) == "20"  # from the cache
    callee.write_text(_CALLEE.format(added=2))
    assert _run_probe(root, cache) == "30"
    assert len(list(cache.glob("loops-*"))) == 2  # the first version's cache is left a week


def test_fingerprint_follows_loop_modules_only(tmp_path: Path) -> None:
    package = tmp_path / "models"
    package.mkdir()
    loop = package / "loop.py"
    loop.write_text("@compiled\ndef step(value):\n    return value\n")
    plain = package / "plain.py"
    plain.write_text("VALUE = 1\n")
    sources = loop_sources([package, tmp_path / "absent"])
    assert loop.resolve() in sources
    assert plain.resolve() not in sources
    before = loops_fingerprint(sources)
    assert loops_fingerprint(reversed(sources)) == before
    plain.write_text("VALUE = 2\n")
    assert loops_fingerprint(loop_sources([package])) == before
    loop.write_text("@compiled\ndef step(value):\n    return value + 1\n")
    assert loops_fingerprint(loop_sources([package])) != before


def test_loop_cache_dir_removes_only_other_versions_unused_for_a_week(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    stale, recent, unrelated = (tmp_path / name for name in ("loops-old", "loops-new", "keep"))
    for directory in (stale, recent, unrelated):
        directory.mkdir()
    os.utime(stale, (now - 8 * 86_400, now - 8 * 86_400))
    os.utime(recent, (now - 86_400, now - 86_400))
    os.utime(unrelated, (now - 30 * 86_400, now - 30 * 86_400))

    chosen = loop_cache_dir(tmp_path, "abc", now=now)

    assert chosen == tmp_path / "loops-abc"
    assert chosen.stat().st_mtime == now
    assert not stale.exists()
    assert recent.exists()
    assert unrelated.exists()

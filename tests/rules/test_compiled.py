"""The compiled rule loops: the start-up warm-up reaches every one of them."""

from __future__ import annotations

import subprocess
import sys

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

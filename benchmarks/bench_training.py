"""`upsell train` on the full Ta-Feng set: wall time and peak memory, and a memory-mapped load.

Imports the published zip (817,741 lines) with `upsell import` into a scratch directory,
then runs `upsell train --orders DIR` in a fresh process, exactly as a user would: it fits
ALS, the co-occurrence neighbours, bundles, factor neighbours, purchase cycles, popularity
(overall and by region, the directory holding the nodes) and the acceptance calibration, and
saves the artifacts. Measured: the process's wall time (interpreter start to exit), the
phases `upsell train` prints, and its peak resident memory (VmHWM of the process itself,
read at exit: getrusage would report the parent's pages too, which Linux carries across fork
and exec). Then the artifacts are loaded back here, and every array is checked to be a
read-only memory map. Writes ``benchmarks/results/training_ta-feng.json``.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_training.py \\
        ../shared/data/ta-feng/ta_feng.csv.zip
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.artifacts import load_artifacts
from models.interfaces import ModelArtifacts

RESULTS = Path(__file__).resolve().parent / "results" / "training_ta-feng.json"
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ta-feng"

# Runs the `upsell` command line in this interpreter and reports its own VmHWM when it exits.
_MEASURED_CLI = """
import atexit, sys
from pathlib import Path

def report_peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(f"peak_kib={line.split()[1]}", file=sys.stderr, flush=True)

atexit.register(report_peak)
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_upsell(arguments: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak KiB, stdout) of one `upsell` verb in a fresh process."""
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-c", _MEASURED_CLI, *arguments],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"upsell {' '.join(arguments)} failed:\n{finished.stderr[-3000:]}")
    peak = re.search(r"peak_kib=(\d+)", finished.stderr)
    if peak is None:
        raise SystemExit("the measured process did not report its peak memory (no /proc?)")
    return seconds, int(peak.group(1)), finished.stdout


def memory_mapped_arrays(artifacts: ModelArtifacts) -> dict[str, bool]:
    """Every array of the artifacts (optional parts included) and whether it is a memmap."""
    arrays: dict[str, object] = {}
    for part in fields(artifacts):
        value = getattr(artifacts, part.name)
        if isinstance(value, np.ndarray):
            arrays[part.name] = value
        elif value is not None and hasattr(value, "__dataclass_fields__"):
            for inner in fields(value):
                member = getattr(value, inner.name)
                if isinstance(member, np.ndarray):
                    arrays[f"{part.name}.{inner.name}"] = member
    return {name: isinstance(array, np.memmap) for name, array in arrays.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        default=DEFAULT_SOURCE / "ta_feng.csv.zip",
        help="the Ta-Feng zip (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    env["UPSELL_LOG_LEVEL"] = "warning"

    with tempfile.TemporaryDirectory(prefix="upsell-bench-train-") as scratch:
        data, artifacts_dir = Path(scratch) / "ta-feng", Path(scratch) / "artifacts"
        import_seconds, _, imported = run_upsell(
            ["import", "ta-feng", str(args.source), "--out", str(data)], env
        )
        train_seconds, peak_kib, trained = run_upsell(
            ["train", "--orders", str(data), "--out", str(artifacts_dir)], env
        )
        phases = {
            "read_and_fit_seconds": float(re.findall(r"in ([\d.]+)s ->", trained)[0]),
            "calibration_seconds": float(re.findall(r"in ([\d.]+)s$", trained, re.M)[-1]),
        }
        lines = int(re.findall(r"on (\d+) order lines", trained)[0])
        started = time.perf_counter()
        artifacts = load_artifacts(artifacts_dir)
        load_seconds = time.perf_counter() - started
        mapped = memory_mapped_arrays(artifacts)
        sizes = sum(path.stat().st_size for path in artifacts_dir.rglob("*.npy"))

    result = {
        "what": "upsell train --orders <imported Ta-Feng> (fit + calibration), fresh process",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "order_lines": lines,
        "wall_seconds": round(train_seconds, 2),
        **{name: round(value, 2) for name, value in phases.items()},
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "model_version": artifacts.version,
        "items": len(artifacts.item_skus),
        "customers": len(artifacts.user_ids),
        "artifact_npy_mib": round(sizes / 2**20, 1),
        "load_seconds": round(load_seconds, 3),
        "all_arrays_memory_mapped": all(mapped.values()),
        "arrays": mapped,
        "import_wall_seconds": round(import_seconds, 2),
        "import_output": imported.strip(),
        "train_output": trained.strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "arrays"}, indent=2))


if __name__ == "__main__":
    main()

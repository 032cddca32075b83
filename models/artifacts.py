"""Save and load ``ModelArtifacts`` as .npy arrays plus JSON: no pickle anywhere.

Layout under a model root::

    root/
      CURRENT                 text: the version served by default
      <version>/              one directory per version, named by the content hash
        manifest.json         version, trained_at, params, and each array's file/dtype/shape
        item_skus.json        model item index -> SKU
        user_ids.json         model user row -> customer id
        user_factors.npy  item_factors.npy  neighbours.npy  neighbour_scores.npy  popularity.npy
        optional parts (format 2), each present whole or not at all:
          factor_neighbours.npy  factor_neighbour_scores.npy     neighbours by ALS factors
          bundle_items.npy  bundle_lift.npy                       frequently bought together
          region_share.npy  regions.json                          popularity by region
          cycle_indptr.npy  cycle_items.npy  cycle_interval_days.npy  cycle_last_purchase_us.npy

Format 1 (the five core arrays only) still loads, with every optional part absent; the
manifest's ``parts`` lists the optional parts a format 2 version holds. A format newer than
this code reads is refused with a message saying so, rather than half-read.

A version directory is written under a temporary name and renamed into place, and CURRENT is
replaced atomically, so a reader sees either the old model or the new one, never half of one.
Arrays load memory-mapped by default: several workers on one host then share one copy in the
page cache instead of each holding its own.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from models.interfaces import (
    ModelArtifacts,
    NeighbourTable,
    PurchaseCycles,
    RegionPopularity,
)
from rules.errors import InputError, NotReadyError

FORMAT = 2
READABLE_FORMATS = (1, 2)
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
ITEM_SKUS_FILE = "item_skus.json"
USER_IDS_FILE = "user_ids.json"
REGIONS_FILE = "regions.json"

# Array name -> dtype it must have; names are also the ModelArtifacts fields and file stems.
ARRAY_DTYPES: dict[str, np.dtype[Any]] = {
    "user_factors": np.dtype(np.float32),
    "item_factors": np.dtype(np.float32),
    "neighbours": np.dtype(np.int32),
    "neighbour_scores": np.dtype(np.float32),
    "popularity": np.dtype(np.float32),
}

# Optional part (a ModelArtifacts field) -> its arrays (file stems) and their dtypes.
OPTIONAL_PARTS: dict[str, dict[str, np.dtype[Any]]] = {
    "factor_neighbours": {
        "factor_neighbours": np.dtype(np.int32),
        "factor_neighbour_scores": np.dtype(np.float32),
    },
    "bundles": {"bundle_items": np.dtype(np.int32), "bundle_lift": np.dtype(np.float32)},
    "region_popularity": {"region_share": np.dtype(np.float32)},
    "purchase_cycles": {
        "cycle_indptr": np.dtype(np.int64),
        "cycle_items": np.dtype(np.int32),
        "cycle_interval_days": np.dtype(np.float32),
        "cycle_last_purchase_us": np.dtype(np.int64),
    },
}

# Versions are 16 hex digits (see models.training.content_version); checking the form also
# keeps a version given by a caller from naming a path outside the root.
_VERSION_PATTERN = re.compile(r"[0-9a-f]{16}")


def save_artifacts(artifacts: ModelArtifacts, root: Path) -> Path:
    """Write ``root/<version>/`` and point ``root/CURRENT`` at it; returns the version directory.

    Saving a version that is already there only flips CURRENT: the directory name is a content
    hash, so the files would be the same.
    """
    _check_version(artifacts.version, where="artifacts.version")
    root.mkdir(parents=True, exist_ok=True)
    target = root / artifacts.version
    if not target.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f".{artifacts.version}.", dir=root))
        try:
            _write_version(artifacts, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            # Another process may have saved the same version meanwhile; that is success.
            if not (target / MANIFEST_FILE).is_file():
                raise
    _write_atomically(root / CURRENT_FILE, artifacts.version.encode() + b"\n")
    return target


def load_artifacts(root: Path, *, version: str | None = None, mmap: bool = True) -> ModelArtifacts:
    """Load the version in ``root/CURRENT`` (or ``version``), arrays memory-mapped read-only.

    Raises ``NotReadyError`` when nothing has been trained at ``root`` and ``InputError`` when
    an artifact is missing, corrupt or inconsistent with its manifest (the message names the
    file).
    """
    if version is None:
        version = _read_current(root)
    else:
        _check_version(version, where="version")
    directory = root / version
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: model version {version} not found at {root}")

    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise InputError(f"{manifest_path}: corrupt manifest: expected a JSON object")
    artifact_format = manifest.get("format")
    if artifact_format not in READABLE_FORMATS:
        raise InputError(
            f"{manifest_path}: unsupported artifact format {artifact_format!r}: this code reads "
            f"formats {', '.join(map(str, READABLE_FORMATS))}; upgrade upsell or retrain"
        )
    if manifest.get("version") != version:
        raise InputError(
            f"{manifest_path}: manifest is for version {manifest.get('version')!r}, "
            f"expected {version}"
        )
    trained_at = manifest.get("trained_at")
    params = manifest.get("params")
    shapes = manifest.get("arrays")
    parts = manifest.get("parts", []) if artifact_format != 1 else []
    if not isinstance(trained_at, str) or not isinstance(params, dict):
        raise InputError(f"{manifest_path}: corrupt manifest: trained_at or params missing")
    if not isinstance(parts, list) or not set(parts) <= set(OPTIONAL_PARTS):
        raise InputError(
            f"{manifest_path}: corrupt manifest: 'parts' must be a list drawn from "
            f"{sorted(OPTIONAL_PARTS)}"
        )
    dtypes = dict(ARRAY_DTYPES)
    for part in parts:
        dtypes.update(OPTIONAL_PARTS[part])
    if not isinstance(shapes, dict) or set(shapes) != set(dtypes):
        raise InputError(f"{manifest_path}: corrupt manifest: 'arrays' must list {sorted(dtypes)}")

    item_skus = _read_id_list(directory / ITEM_SKUS_FILE)
    user_ids = _read_id_list(directory / USER_IDS_FILE)
    regions = _read_id_list(directory / REGIONS_FILE) if "region_popularity" in parts else ()
    arrays = {
        name: _load_array(
            directory / f"{name}.npy",
            expected_shape=shapes[name],
            expected_dtype=dtype,
            manifest_path=manifest_path,
            mmap=mmap,
        )
        for name, dtype in dtypes.items()
    }
    _check_consistent(arrays, n_items=len(item_skus), n_users=len(user_ids), where=directory)
    _check_parts_consistent(
        arrays,
        n_items=len(item_skus),
        n_users=len(user_ids),
        n_regions=len(regions),
        where=directory,
    )
    return ModelArtifacts(
        version=version,
        item_skus=item_skus,
        user_ids=user_ids,
        user_factors=arrays["user_factors"],
        item_factors=arrays["item_factors"],
        neighbours=arrays["neighbours"],
        neighbour_scores=arrays["neighbour_scores"],
        popularity=arrays["popularity"],
        trained_at=trained_at,
        params=params,
        **_parts_from_arrays(arrays, regions=regions),
    )


def current_version(root: Path) -> str | None:
    """The version ``root/CURRENT`` points at, or None when nothing has been trained."""
    try:
        return _read_current(root)
    except NotReadyError:
        return None


# -- writing -----------------------------------------------------------------------------


def _write_version(artifacts: ModelArtifacts, directory: Path) -> None:
    arrays = {name: np.asarray(getattr(artifacts, name)) for name in ARRAY_DTYPES}
    dtypes = dict(ARRAY_DTYPES)
    part_arrays, regions = _arrays_of_parts(artifacts)
    parts = [part for part in OPTIONAL_PARTS if getattr(artifacts, part) is not None]
    for part in parts:
        dtypes.update(OPTIONAL_PARTS[part])
    arrays.update(part_arrays)
    for name, dtype in dtypes.items():
        if arrays[name].dtype != dtype:
            raise InputError(f"artifacts.{name}: dtype {arrays[name].dtype}, expected {dtype}")
    _check_consistent(
        arrays,
        n_items=len(artifacts.item_skus),
        n_users=len(artifacts.user_ids),
        where=Path("artifacts"),
    )
    _check_parts_consistent(
        arrays,
        n_items=len(artifacts.item_skus),
        n_users=len(artifacts.user_ids),
        n_regions=len(regions),
        where=Path("artifacts"),
    )
    for name, array in arrays.items():
        with open(directory / f"{name}.npy", "wb") as file:
            np.save(file, np.ascontiguousarray(array), allow_pickle=False)
            _flush(file)
    shapes = {name: list(array.shape) for name, array in arrays.items()}
    manifest = {
        "format": FORMAT,
        "version": artifacts.version,
        "trained_at": artifacts.trained_at,
        "params": artifacts.params,
        "arrays": shapes,
        "parts": parts,
        "n_items": len(artifacts.item_skus),
        "n_users": len(artifacts.user_ids),
    }
    _write_file(directory / ITEM_SKUS_FILE, orjson.dumps(list(artifacts.item_skus)))
    _write_file(directory / USER_IDS_FILE, orjson.dumps(list(artifacts.user_ids)))
    if artifacts.region_popularity is not None:
        _write_file(directory / REGIONS_FILE, orjson.dumps(list(regions)))
    # The manifest goes last: a directory with a manifest is a complete one.
    _write_file(
        directory / MANIFEST_FILE,
        orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS),
    )


def _write_file(path: Path, content: bytes) -> None:
    with open(path, "wb") as file:
        file.write(content)
        _flush(file)


def _write_atomically(path: Path, content: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            _flush(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _flush(file: Any) -> None:
    # fsync before the rename, so that after a crash the new name never points at a file
    # whose contents did not reach the disk.
    file.flush()
    os.fsync(file.fileno())


# -- reading -----------------------------------------------------------------------------


def _read_current(root: Path) -> str:
    current = root / CURRENT_FILE
    try:
        version = current.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise NotReadyError(
            f"no model trained at {root}: run `upsell train` to create one"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{current}: unreadable: {error}") from error
    _check_version(version, where=str(current))
    return version


def _check_version(version: str, *, where: str) -> None:
    if not _VERSION_PATTERN.fullmatch(version):
        raise InputError(f"{where}: {version!r} is not a model version (16 hex digits)")


def _read_json(path: Path) -> object:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: missing from the model directory") from None
    except (OSError, orjson.JSONDecodeError) as error:
        raise InputError(f"{path}: corrupt JSON: {error}") from error


def _read_id_list(path: Path) -> tuple[str, ...]:
    ids = _read_json(path)
    if not isinstance(ids, list) or not all(isinstance(value, str) for value in ids):
        raise InputError(f"{path}: expected a JSON list of strings")
    return tuple(ids)


def _load_array(
    path: Path,
    *,
    expected_shape: object,
    expected_dtype: np.dtype[Any],
    manifest_path: Path,
    mmap: bool,
) -> npt.NDArray[Any]:
    if not isinstance(expected_shape, list) or not all(
        isinstance(size, int) for size in expected_shape
    ):
        raise InputError(f"{manifest_path}: corrupt manifest: bad shape for {path.name}")
    try:
        # An empty array cannot be memory-mapped (mmap refuses length 0); it costs nothing
        # to read instead.
        header_only = mmap and 0 in expected_shape
        array: npt.NDArray[Any] = np.load(
            path, mmap_mode="r" if mmap and not header_only else None, allow_pickle=False
        )
    except FileNotFoundError:
        raise InputError(f"{path}: missing from the model directory") from None
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"{path}: corrupt array file: {error}") from error
    if tuple(array.shape) != tuple(expected_shape):
        raise InputError(
            f"{path}: shape {tuple(array.shape)} does not match the manifest's "
            f"{tuple(expected_shape)}"
        )
    if array.dtype != expected_dtype:
        raise InputError(f"{path}: dtype {array.dtype}, expected {expected_dtype}")
    # A plain ndarray view of the same mapping: np.memmap's __getitem__ is Python code, and
    # candidate generation indexes these arrays a dozen times a request.
    return np.asarray(array)


def _check_consistent(
    arrays: dict[str, npt.NDArray[Any]], *, n_items: int, n_users: int, where: Path
) -> None:
    """The arrays agree with each other and with the id lists (shapes only, no data scan)."""
    for name in ARRAY_DTYPES:
        ndim = 1 if name == "popularity" else 2
        if arrays[name].ndim != ndim:
            raise InputError(f"{where / (name + '.npy')}: expected {ndim} dimension(s)")
    factors = arrays["user_factors"].shape[1]
    k = arrays["neighbours"].shape[1]
    expected = {
        "user_factors": (n_users, factors),
        "item_factors": (n_items, factors),
        "neighbours": (n_items, k),
        "neighbour_scores": (n_items, k),
        "popularity": (n_items,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise InputError(
                f"{where / (name + '.npy')}: shape {arrays[name].shape} inconsistent with "
                f"{n_items} items, {n_users} users, {factors} factors, {k} neighbours: "
                f"expected {shape}"
            )


def _check_parts_consistent(
    arrays: dict[str, npt.NDArray[Any]], *, n_items: int, n_users: int, n_regions: int, where: Path
) -> None:
    """The optional parts present agree with the id lists and among themselves."""
    expected: dict[str, tuple[int, ...]] = {}
    for table in ("factor_neighbours", "bundle_items"):
        if table in arrays:
            width = arrays[table].shape[1] if arrays[table].ndim == 2 else -1
            scores = "factor_neighbour_scores" if table == "factor_neighbours" else "bundle_lift"
            expected[table] = expected[scores] = (n_items, width)
    if "region_share" in arrays:
        if n_regions == 0:
            raise InputError(f"{where / REGIONS_FILE}: regional popularity without any region")
        expected["region_share"] = (n_regions, n_items)
    if "cycle_indptr" in arrays:
        entries = arrays["cycle_items"].shape[0] if arrays["cycle_items"].ndim == 1 else -1
        expected["cycle_indptr"] = (n_users + 1,)
        for name in ("cycle_items", "cycle_interval_days", "cycle_last_purchase_us"):
            expected[name] = (entries,)
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise InputError(
                f"{where / (name + '.npy')}: shape {arrays[name].shape} inconsistent with "
                f"{n_items} items, {n_users} users, {n_regions} regions: expected {shape}"
            )
    if "cycle_indptr" in arrays and int(arrays["cycle_indptr"][-1]) != expected["cycle_items"][0]:
        # One value read: the CSR pointer must end at the number of entries.
        raise InputError(
            f"{where / 'cycle_indptr.npy'}: ends at {int(arrays['cycle_indptr'][-1])}, "
            f"but there are {expected['cycle_items'][0]} entries"
        )


def _arrays_of_parts(
    artifacts: ModelArtifacts,
) -> tuple[dict[str, npt.NDArray[Any]], tuple[str, ...]]:
    """The optional parts present, as file stem -> array, and the region names."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    if artifacts.factor_neighbours is not None:
        arrays["factor_neighbours"] = np.asarray(artifacts.factor_neighbours.items)
        arrays["factor_neighbour_scores"] = np.asarray(artifacts.factor_neighbours.scores)
    if artifacts.bundles is not None:
        arrays["bundle_items"] = np.asarray(artifacts.bundles.items)
        arrays["bundle_lift"] = np.asarray(artifacts.bundles.scores)
    regions: tuple[str, ...] = ()
    if artifacts.region_popularity is not None:
        arrays["region_share"] = np.asarray(artifacts.region_popularity.share)
        regions = artifacts.region_popularity.regions
    if artifacts.purchase_cycles is not None:
        cycles = artifacts.purchase_cycles
        arrays["cycle_indptr"] = np.asarray(cycles.indptr)
        arrays["cycle_items"] = np.asarray(cycles.items)
        arrays["cycle_interval_days"] = np.asarray(cycles.interval_days)
        arrays["cycle_last_purchase_us"] = np.asarray(cycles.last_purchase_us)
    return arrays, regions


def _parts_from_arrays(
    arrays: dict[str, npt.NDArray[Any]], *, regions: tuple[str, ...]
) -> dict[str, Any]:
    """ModelArtifacts keyword arguments for the optional parts found among ``arrays``."""
    parts: dict[str, Any] = {}
    if "factor_neighbours" in arrays:
        parts["factor_neighbours"] = NeighbourTable(
            items=arrays["factor_neighbours"], scores=arrays["factor_neighbour_scores"]
        )
    if "bundle_items" in arrays:
        parts["bundles"] = NeighbourTable(
            items=arrays["bundle_items"], scores=arrays["bundle_lift"]
        )
    if "region_share" in arrays:
        parts["region_popularity"] = RegionPopularity(regions=regions, share=arrays["region_share"])
    if "cycle_indptr" in arrays:
        parts["purchase_cycles"] = PurchaseCycles(
            indptr=arrays["cycle_indptr"],
            items=arrays["cycle_items"],
            interval_days=arrays["cycle_interval_days"],
            last_purchase_us=arrays["cycle_last_purchase_us"],
        )
    return parts

"""Artifacts on disk: .npy + JSON, memory-mapped loading, CURRENT flips, clear errors."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest

from models.artifacts import current_version, load_artifacts, save_artifacts
from models.interfaces import ModelArtifacts
from models.training import train
from rules.errors import InputError, NotReadyError
from tests.models.builders import order_lines

ARRAY_FIELDS = ("user_factors", "item_factors", "neighbours", "neighbour_scores", "popularity")
PART_FILES = (
    "factor_neighbours",
    "factor_neighbour_scores",
    "bundle_items",
    "bundle_lift",
    "region_share",
    "cycle_indptr",
    "cycle_items",
    "cycle_interval_days",
    "cycle_last_purchase_us",
)
NODES = pl.DataFrame({"node_id": ["S-N", "S-S"], "kind": ["store"] * 2, "region": ["N", "S"]})


def small_order_lines() -> pl.DataFrame:
    """Two blocks of co-bought items, a few customers each, one guest order."""
    baskets: list[tuple[str, str | None, list[str]]] = [
        (
            f"o{customer}{order}",
            f"c{customer}",
            ["A0", "A1", "A2"] if customer < 3 else ["B0", "B1"],
        )
        for customer in range(6)
        for order in range(2)
    ]
    baskets.append(("guest", None, ["A0", "Z"]))
    # Each order on its own day, block A at store S-N and block B at S-S: every optional
    # part of the artifacts (purchase cycles, regional popularity) has something to hold.
    return order_lines(baskets).with_columns(
        ordered_at=pl.lit(datetime(2024, 3, 1))
        + pl.duration(
            days=pl.col("order_id").str.slice(-1).cast(pl.Int64, strict=False).fill_null(0) * 7
        ),
        store_id=pl.when(pl.col("sku").str.starts_with("B"))
        .then(pl.lit("S-S"))
        .otherwise(pl.lit("S-N")),
    )


@pytest.fixture(scope="module")
def artifacts() -> ModelArtifacts:
    return train(
        small_order_lines(), factors=4, neighbours=3, seed=1, nodes=NODES, cycle_min_purchases=2
    )


@pytest.fixture(scope="module")
def other_artifacts() -> ModelArtifacts:
    return train(small_order_lines(), factors=4, neighbours=3, seed=2)


def assert_same_artifacts(loaded: ModelArtifacts, saved: ModelArtifacts) -> None:
    assert loaded.version == saved.version
    assert loaded.item_skus == saved.item_skus
    assert loaded.user_ids == saved.user_ids
    assert loaded.trained_at == saved.trained_at
    assert loaded.params == saved.params
    for name in ARRAY_FIELDS:
        ours, theirs = getattr(loaded, name), getattr(saved, name)
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)
    for name, ours, theirs in zip(PART_FILES, part_arrays(loaded), part_arrays(saved), strict=True):
        assert ours.dtype == theirs.dtype, name
        np.testing.assert_array_equal(ours, theirs)
    assert (loaded.region_popularity is None) == (saved.region_popularity is None)
    if loaded.region_popularity is not None and saved.region_popularity is not None:
        assert loaded.region_popularity.regions == saved.region_popularity.regions


def part_arrays(artifacts: ModelArtifacts) -> list[np.ndarray]:
    """The optional parts' arrays in PART_FILES order (the test fixtures have them all)."""
    assert artifacts.factor_neighbours is not None
    assert artifacts.bundles is not None
    assert artifacts.region_popularity is not None
    assert artifacts.purchase_cycles is not None
    cycles = artifacts.purchase_cycles
    return [
        artifacts.factor_neighbours.items,
        artifacts.factor_neighbours.scores,
        artifacts.bundles.items,
        artifacts.bundles.scores,
        artifacts.region_popularity.share,
        cycles.indptr,
        cycles.items,
        cycles.interval_days,
        cycles.last_purchase_us,
    ]


def test_round_trip_is_exact(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """What load_artifacts returns equals what save_artifacts was given."""
    save_artifacts(artifacts, tmp_path)

    assert_same_artifacts(load_artifacts(tmp_path), artifacts)


def test_loaded_arrays_are_read_only_memory_maps(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """By default every array is a read-only view of a memory map (a plain ndarray, whose
    indexing is cheaper than np.memmap's), so workers share pages."""
    save_artifacts(artifacts, tmp_path)

    loaded = load_artifacts(tmp_path)

    for name in ARRAY_FIELDS:
        array = getattr(loaded, name)
        assert type(array) is np.ndarray, name
        assert isinstance(array.base, np.memmap), name
        assert not array.flags.writeable, name
    for name, array in zip(PART_FILES, part_arrays(loaded), strict=True):
        assert type(array) is np.ndarray, name
        assert isinstance(array.base, np.memmap), name
        assert not array.flags.writeable, name


def test_mmap_false_reads_into_memory(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """With mmap=False the arrays are ordinary in-memory arrays."""
    save_artifacts(artifacts, tmp_path)

    loaded = load_artifacts(tmp_path, mmap=False)

    assert not any(isinstance(getattr(loaded, name).base, np.memmap) for name in ARRAY_FIELDS)
    assert_same_artifacts(loaded, artifacts)


def test_layout_is_npy_and_json_only(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """A version directory holds one .npy per array and JSON files; the manifest lists shapes."""
    directory = save_artifacts(artifacts, tmp_path)

    assert directory == tmp_path / artifacts.version
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        [f"{name}.npy" for name in ARRAY_FIELDS + PART_FILES]
        + ["manifest.json", "item_skus.json", "user_ids.json", "regions.json"]
    )
    manifest = orjson.loads((directory / "manifest.json").read_bytes())
    assert manifest["format"] == 2
    assert manifest["parts"] == [
        "factor_neighbours",
        "bundles",
        "region_popularity",
        "purchase_cycles",
    ]
    assert manifest["version"] == artifacts.version
    assert manifest["arrays"]["neighbours"] == list(artifacts.neighbours.shape)
    assert (tmp_path / "CURRENT").read_text().strip() == artifacts.version


def test_current_flips_to_the_latest_save(
    tmp_path: Path, artifacts: ModelArtifacts, other_artifacts: ModelArtifacts
) -> None:
    """Saving a second version moves CURRENT to it; the first stays loadable by version."""
    assert artifacts.version != other_artifacts.version
    save_artifacts(artifacts, tmp_path)
    save_artifacts(other_artifacts, tmp_path)

    assert current_version(tmp_path) == other_artifacts.version
    assert load_artifacts(tmp_path).version == other_artifacts.version
    assert_same_artifacts(load_artifacts(tmp_path, version=artifacts.version), artifacts)

    save_artifacts(artifacts, tmp_path)  # rolling back is saving (or re-pointing) again
    assert load_artifacts(tmp_path).version == artifacts.version


def test_saving_again_is_idempotent_and_leaves_no_temporaries(
    tmp_path: Path, artifacts: ModelArtifacts
) -> None:
    """Saving the same version twice keeps one directory and no staging leftovers."""
    save_artifacts(artifacts, tmp_path)
    save_artifacts(artifacts, tmp_path)

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["CURRENT", artifacts.version]
    )


def test_model_without_customers_round_trips(tmp_path: Path) -> None:
    """A guest-only model (zero user rows) saves and loads, memory-mapped where possible."""
    guest_only = small_order_lines().with_columns(customer_id=pl.lit(None, pl.String))
    artifacts = train(guest_only, factors=4, neighbours=3, nodes=NODES)
    save_artifacts(artifacts, tmp_path)

    loaded = load_artifacts(tmp_path)

    assert loaded.user_factors.shape == (0, 4)
    assert_same_artifacts(loaded, artifacts)


def test_empty_root_is_not_ready(tmp_path: Path) -> None:
    """Loading where nothing was trained raises NotReadyError telling to run `upsell train`."""
    with pytest.raises(NotReadyError, match="upsell train"):
        load_artifacts(tmp_path)
    with pytest.raises(NotReadyError, match="upsell train"):
        load_artifacts(tmp_path / "does-not-exist")
    assert current_version(tmp_path) is None


def test_corrupt_manifest_names_the_file(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """A manifest that is not JSON raises InputError naming manifest.json."""
    directory = save_artifacts(artifacts, tmp_path)
    (directory / "manifest.json").write_text("{not json")

    with pytest.raises(InputError, match=r"manifest\.json"):
        load_artifacts(tmp_path)


def test_manifest_shape_mismatch_names_the_array_file(
    tmp_path: Path, artifacts: ModelArtifacts
) -> None:
    """An array whose shape differs from the manifest raises InputError naming the .npy."""
    directory = save_artifacts(artifacts, tmp_path)
    np.save(directory / "neighbours.npy", artifacts.neighbours[:, :1].copy())

    with pytest.raises(InputError, match=r"neighbours\.npy"):
        load_artifacts(tmp_path)


def test_arrays_inconsistent_with_the_ids_name_the_file(
    tmp_path: Path, artifacts: ModelArtifacts
) -> None:
    """Arrays that do not match the number of SKUs are refused on save, naming the array."""
    broken = dataclasses.replace(artifacts, popularity=artifacts.popularity[:-1].copy())

    with pytest.raises(InputError, match="popularity"):
        save_artifacts(broken, tmp_path)
    assert current_version(tmp_path) is None


def test_truncated_array_names_the_file(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """A truncated .npy raises InputError naming it."""
    directory = save_artifacts(artifacts, tmp_path)
    path = directory / "item_factors.npy"
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(InputError, match=r"item_factors\.npy"):
        load_artifacts(tmp_path)


def test_pickled_array_is_refused(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """An object-dtype .npy (which needs pickle to read) is refused, never unpickled."""
    directory = save_artifacts(artifacts, tmp_path)
    objects = np.empty(len(artifacts.item_skus), dtype=object)
    np.save(directory / "popularity.npy", objects, allow_pickle=True)

    with pytest.raises(InputError, match=r"popularity\.npy"):
        load_artifacts(tmp_path)


def test_missing_file_names_the_file(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """A version directory missing an id list raises InputError naming it."""
    directory = save_artifacts(artifacts, tmp_path)
    (directory / "user_ids.json").unlink()

    with pytest.raises(InputError, match=r"user_ids\.json"):
        load_artifacts(tmp_path)


def test_unknown_or_malformed_version_is_an_input_error(
    tmp_path: Path, artifacts: ModelArtifacts
) -> None:
    """Asking for a version that is absent, or not a version at all, raises InputError."""
    save_artifacts(artifacts, tmp_path)

    with pytest.raises(InputError, match="not found"):
        load_artifacts(tmp_path, version="0123456789abcdef")
    with pytest.raises(InputError, match="not a model version"):
        load_artifacts(tmp_path, version="../../etc")


def test_corrupt_current_names_the_file(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """A CURRENT file that does not hold a version raises InputError naming CURRENT."""
    save_artifacts(artifacts, tmp_path)
    (tmp_path / "CURRENT").write_text("garbage\n")

    with pytest.raises(InputError, match="CURRENT"):
        load_artifacts(tmp_path)


def test_format_1_artifacts_still_load(tmp_path: Path, artifacts: ModelArtifacts) -> None:
    """A version written before the optional parts existed (format 1: the five core arrays)
    loads, with every optional part None."""
    directory = save_artifacts(artifacts, tmp_path)
    manifest = orjson.loads((directory / "manifest.json").read_bytes())
    for name in PART_FILES:
        (directory / f"{name}.npy").unlink()
        del manifest["arrays"][name]
    (directory / "regions.json").unlink()
    del manifest["parts"]
    manifest["format"] = 1
    (directory / "manifest.json").write_bytes(orjson.dumps(manifest))

    loaded = load_artifacts(tmp_path)

    assert loaded.factor_neighbours is None
    assert loaded.bundles is None
    assert loaded.region_popularity is None
    assert loaded.purchase_cycles is None
    np.testing.assert_array_equal(loaded.neighbours, artifacts.neighbours)


def test_artifacts_without_optional_parts_round_trip(
    tmp_path: Path, artifacts: ModelArtifacts
) -> None:
    """Artifacts holding none of the optional parts save only the core arrays and load back."""
    core_only = dataclasses.replace(
        artifacts,
        factor_neighbours=None,
        bundles=None,
        region_popularity=None,
        purchase_cycles=None,
    )
    directory = save_artifacts(core_only, tmp_path)

    loaded = load_artifacts(tmp_path)

    assert sorted(path.name for path in directory.iterdir()) == sorted(
        [f"{name}.npy" for name in ARRAY_FIELDS]
        + ["manifest.json", "item_skus.json", "user_ids.json"]
    )
    assert loaded.bundles is None
    assert loaded.purchase_cycles is None


def test_a_newer_format_is_refused_with_the_reason(
    tmp_path: Path, artifacts: ModelArtifacts
) -> None:
    """A manifest of a format this code does not know says so and what to do."""
    directory = save_artifacts(artifacts, tmp_path)
    manifest = orjson.loads((directory / "manifest.json").read_bytes())
    manifest["format"] = 3
    (directory / "manifest.json").write_bytes(orjson.dumps(manifest))

    with pytest.raises(InputError, match=r"format 3.*reads formats 1, 2.*retrain"):
        load_artifacts(tmp_path)


def test_inconsistent_purchase_cycles_name_the_file(
    tmp_path: Path, artifacts: ModelArtifacts
) -> None:
    """A cycle pointer that does not end at the number of entries is refused, named."""
    assert artifacts.purchase_cycles is not None
    indptr = artifacts.purchase_cycles.indptr.copy()
    indptr[-1] += 1
    broken = dataclasses.replace(
        artifacts,
        purchase_cycles=dataclasses.replace(artifacts.purchase_cycles, indptr=indptr),
    )

    with pytest.raises(InputError, match=r"cycle_indptr"):
        save_artifacts(broken, tmp_path)

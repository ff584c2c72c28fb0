"""Partition paths: one folder per distinct value, bounded names, never one file for two values."""

import pyarrow as pa
import pytest

from pipeline.output import NULL_PARTITION, PARTITION_VALUE_BYTES, partition_files, partition_folder


def test_distinct_values_get_distinct_folders_and_every_row_lands_once():
    values = [None, NULL_PARTITION, "", "a~b", "a%7Eb", "en", "é" * 200, "é" * 200 + "x", "../x", 3.5, float("nan")]
    table = pa.table({"lang": pa.array([str(v) if isinstance(v, float) else v for v in values] * 2),
                      "row": list(range(2 * len(values)))})
    files = partition_files(table, "lang", "frag-000000000-0123456789ab")
    assert len(files) == len(values)  # one folder per value: neither the null marker nor a cut value collide
    assert sorted(r for _, rows in files for r in rows["row"].to_pylist()) == list(range(2 * len(values)))
    for path, rows in files:
        assert len(set(rows["lang"].to_pylist())) == 1, path


def test_folder_names_are_bounded_and_cut_values_keep_a_hash():
    folder = partition_folder("source", "sub/" * 30 + "é" * 100 + ".jsonl")
    assert len(folder.encode()) <= len("source=") + PARTITION_VALUE_BYTES and "~" in folder
    assert "%" not in folder[-17:]  # never cut inside an escape
    assert partition_folder("lang", NULL_PARTITION) == "lang=%5F_HIVE_DEFAULT_PARTITION__"
    assert partition_folder("lang", None) == f"lang={NULL_PARTITION}"


@pytest.mark.parametrize("values", [["en", "EN", "En"], ["a", "A"]])
def test_values_that_differ_by_case_never_share_a_file(values):
    files = partition_files(pa.table({"lang": values}), "lang", "frag")
    assert len({path.casefold() for path, _ in files}) == len(values)

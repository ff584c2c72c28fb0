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


def test_vector_values_are_stored_without_dictionary_or_statistics_and_read_back_exactly():
    import io

    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.output import parquet_bytes, vector_array

    vectors = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float16)
    table = pa.table({"id": [f"d{i}" for i in range(6)], "span": [{"start": i, "end": i + 1} for i in range(6)],
                      "vector": vector_array(vectors),
                      "tokens": pa.ListArray.from_arrays(pa.array([0, 2, 2, 5, 6, 6, 6], pa.int32()),
                                                         vector_array(vectors[:, 0]))})
    data = parquet_bytes(table)
    assert pq.read_table(io.BytesIO(data)).equals(table)
    columns = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    by_path = {columns.column(i).path_in_schema: columns.column(i) for i in range(columns.num_columns)}
    for path in ("vector.list.element.list.element", "tokens.list.element.list.element"):
        assert not by_path[path].is_stats_set and "RLE_DICTIONARY" not in by_path[path].encodings, path
    for path in ("id", "span.start"):  # what readers filter on keeps both
        assert by_path[path].is_stats_set and "RLE_DICTIONARY" in by_path[path].encodings, path


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_duckdb_reads_every_vector_type_exactly(tmp_path, precision):
    """The README's minimum DuckDB (1.3) types float16 vectors FLOAT[]; 1.1 and 1.2 gave BLOB[]
    (docs/READERS.md). Pooled, stacked and per-word vectors, null word vectors included."""
    import duckdb
    import numpy as np

    from pipeline.output import parquet_bytes, vector_array

    rng = np.random.default_rng(0)
    pooled, stacked, words = (rng.standard_normal(shape).astype(precision) for shape in ((3, 4), (3, 2, 4), (5, 4)))
    missing = np.array([False, True, False, False, False])
    per_row = pa.array([0, 2, 2, 5], pa.int32())
    table = pa.table({"id": ["a", "b", "c"], "pooled": vector_array(pooled), "stacked": vector_array(stacked),
                      "words": pa.ListArray.from_arrays(per_row, vector_array(words, missing))})
    (tmp_path / "v.parquet").write_bytes(parquet_bytes(table))
    rows = duckdb.sql(f"SELECT id, pooled, stacked, words FROM read_parquet('{tmp_path / 'v.parquet'}') ORDER BY id")
    assert [str(t) for t in rows.types[1:]] == ["FLOAT[]", "FLOAT[][]", "FLOAT[][]"]
    got = rows.fetchall()
    np.testing.assert_array_equal(np.array([r[1] for r in got], np.float32), pooled.astype(np.float32))
    np.testing.assert_array_equal(np.array([r[2] for r in got], np.float32), stacked.astype(np.float32))
    assert got[0][3][1] is None and [len(r[3]) for r in got] == [2, 0, 3]
    np.testing.assert_array_equal(np.array([got[0][3][0], *got[2][3]], np.float32), words[[0, 2, 3, 4]].astype(np.float32))

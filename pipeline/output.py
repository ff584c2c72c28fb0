"""Output rows as Arrow/Parquet: the schema of DESIGN.md, partition paths, quarantine files.

Vectors are fixed-size lists (nested for `combine: stack`), so readers get their shape from
the schema. Partition values are percent-encoded in the path; `pyarrow.dataset` with Hive
partitioning decodes them back to the same values as the `source` column in the files.
"""

from __future__ import annotations

import io
import json
from urllib.parse import quote

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from pipeline.embedder import EmbedResult
    from pipeline.tokenize import TokenWindows

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("text", pa.string())]
)


def vector_array(vectors: np.ndarray) -> pa.Array:
    """(N, D) -> fixed_size_list<D>; (N, L, D) -> fixed_size_list<fixed_size_list<D>, L>."""
    array = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    for size in reversed(vectors.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def row_table(docs: pa.Table, windows: TokenWindows, window_rows: bool, keep_fields: list[str]) -> pa.Table:
    """The non-vector columns: one row per document, or per window with `aggregate: none`.

    docs holds id, source, row, n_tokens, truncated and the keep fields.
    """
    if not window_rows:
        return docs.select(["id", "source", "row", "n_tokens", "truncated", *keep_fields])
    per_window = docs.take(pa.array(windows.doc))
    columns = {
        "id": per_window["id"], "source": per_window["source"], "row": per_window["row"],
        "window": pa.array(windows.window_index, pa.int32()), "window_span": _spans(windows.span),
        "n_tokens": pa.array(windows.lengths, pa.int32()),
        "truncated": pa.array(np.zeros(len(windows.lengths), bool)),
    }
    return pa.table({**columns, **{name: per_window[name] for name in keep_fields}})


def _spans(pairs: np.ndarray) -> pa.StructArray:
    """(N, 2) character [start, end) pairs as struct<start, end>."""
    return pa.StructArray.from_arrays([pa.array(pairs[:, 0]), pa.array(pairs[:, 1])], ["start", "end"])


def output_table(rows: pa.Table, result: EmbedResult) -> pa.Table:
    """Appends one column per output; token-level outputs get a list per row and `<name>_offsets`."""
    for name, vectors in result.vectors.items():
        array = vector_array(vectors)
        units = result.token_units.get(name)
        if units is None:
            rows = rows.append_column(name, array)
            continue
        offsets = pa.array(np.concatenate([[0], np.cumsum(units.counts)]).astype(np.int32))
        rows = rows.append_column(name, pa.ListArray.from_arrays(offsets, array))
        rows = rows.append_column(f"{name}_offsets", pa.ListArray.from_arrays(offsets, _spans(units.spans)))
    return rows


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def file_metadata(model_name: str, weights_sha256: str, layers: dict[str, list[int]], fingerprint: str) -> dict:
    """Parquet key-value metadata that says which model and layers made the vectors."""
    return {
        "strata.model": json.dumps({"name": model_name, "weights_sha256": weights_sha256}),
        "strata.layers": json.dumps(layers),
        "strata.config_fingerprint": fingerprint,
    }


def partition_files(table: pa.Table, partition_by: str, fragment_id: str) -> list[tuple[str, pa.Table]]:
    """Split a fragment's rows by partition value: [(path under the output root, rows)]."""
    name = f"{fragment_id}.parquet"
    if partition_by == "none":
        return [(f"data/{name}", table)]
    values = table[partition_by].to_pylist()
    files = []
    for value in dict.fromkeys(values):
        rows = table.filter(pa.array([v == value for v in values])) if len(set(values)) > 1 else table
        encoded = NULL_PARTITION if value is None else quote(str(value), safe="")
        files.append((f"data/{partition_by}={encoded}/{name}", rows))
    return files


def quarantine_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA)

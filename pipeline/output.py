"""Output rows as Arrow/Parquet: the schema of DESIGN.md, partition paths, quarantine files.

Vectors are fixed-size lists (nested for `combine: stack`), so readers get their shape from
the schema. Partition values are percent-encoded in the path, one folder per distinct value:
Hive readers decode a folder name back to its value, except for the two values no folder name
can carry (a value longer than PARTITION_VALUE_BYTES, cut and suffixed with a hash, and the
literal null marker, escaped). The files hold every partition column with its exact values.
"""

from __future__ import annotations

import hashlib
import io
import json
from urllib.parse import quote

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from pipeline.embedder import EmbedResult
    from pipeline.tokenize import TokenWindows

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
# Encoded bytes of a partition value in its folder name: with the column name and a hash suffix
# the folder stays far below the 255 bytes file systems allow for one name (ext4, XFS, APFS, NTFS).
PARTITION_VALUE_BYTES = 120
QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("text", pa.string())]
)


def vector_array(vectors: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """(N, D) -> fixed_size_list<D>; (N, L, D) -> fixed_size_list<fixed_size_list<D>, L>;
    `null` (N,) bool marks vectors stored as null (their values stay in the buffer, unread)."""
    array = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    for size in reversed(vectors.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    if null is not None and null.any():
        validity = pa.array(~null).buffers()[1]
        array = pa.Array.from_buffers(array.type, len(array), [validity], children=[array.values])
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


def _spans(pairs: np.ndarray, word: np.ndarray | None = None) -> pa.StructArray:
    """(N, 2) character [start, end) pairs as struct<start, end>; with given words
    struct<word, start, end>, `word` (N,) the index of the given word."""
    arrays, names = [pa.array(pairs[:, 0]), pa.array(pairs[:, 1])], ["start", "end"]
    if word is not None:
        arrays, names = [pa.array(word), *arrays], ["word", *names]
    return pa.StructArray.from_arrays(arrays, names)


def output_table(rows: pa.Table, result: EmbedResult) -> pa.Table:
    """Appends one column per output; token-level outputs get a list per row and `<name>_offsets`,
    word outputs of given words (pre-tokenized input) also `<name>_missing`."""
    for name, vectors in result.vectors.items():
        units = result.token_units.get(name)
        if units is None:
            rows = rows.append_column(name, vector_array(vectors))
            continue
        offsets = pa.array(np.concatenate([[0], np.cumsum(units.counts)]).astype(np.int32))
        rows = rows.append_column(name, pa.ListArray.from_arrays(offsets, vector_array(vectors, units.missing)))
        rows = rows.append_column(f"{name}_offsets",
                                  pa.ListArray.from_arrays(offsets, _spans(units.spans, units.word)))
        if units.missing is not None:
            row_of_unit = np.repeat(np.arange(len(units.counts)), units.counts)
            missing = np.bincount(row_of_unit[units.missing], minlength=len(units.counts))
            rows = rows.append_column(f"{name}_missing", pa.array(missing.astype(np.int32)))
    return rows


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """The table as a zstd Parquet file. Vector values get no dictionary and no statistics:
    dictionary encoding of float vectors is tried and abandoned in every page, and their
    min/max filter nothing; without both, encoding a bert-base all-layers float16 column took
    a third of the CPU (0.66 → 0.25 s for 2,000 documents) and readers read it 4× faster
    (docs/BENCHMARKS.md, "Keeping an accelerator fed")."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    leaves = [leaf for field in table.schema for leaf in _leaves(field.name, field.type)]
    plain = [path for path, is_vector in leaves if not is_vector]
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", use_dictionary=plain, write_statistics=plain)
    return buffer.getvalue()


def _leaves(path: str, kind: pa.DataType, in_list: bool = False) -> list[tuple[str, bool]]:
    # Parquet column paths of an Arrow field's leaves, each with whether it holds vector values
    # (floats inside a list); lists are written as `<name>.list.element` (pyarrow's default)
    if pa.types.is_struct(kind):
        return [leaf for child in kind for leaf in _leaves(f"{path}.{child.name}", child.type, in_list)]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaves(f"{path}.list.element", kind.value_type, True)
    if pa.types.is_map(kind):
        return _leaves(f"{path}.key_value.key", kind.key_type) + _leaves(f"{path}.key_value.value", kind.item_type)
    return [(path, in_list and pa.types.is_floating(kind))]


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
    folders = _folders(table[partition_by].combine_chunks(), partition_by)
    distinct = pc.unique(folders).to_pylist()
    files, seen = [], set()
    for folder in distinct:
        rows = table.filter(pc.equal(folders, folder)) if len(distinct) > 1 else table
        # on a case-insensitive disk (macOS, Windows) `lang=EN` and `lang=en` are one folder: never one file
        file = name if folder.casefold() not in seen else \
            f"{fragment_id}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}.parquet"
        seen.add(folder.casefold())
        files.append((f"data/{folder}/{file}", rows))
    paths = [path for path, _ in files]
    if len(set(paths)) != len(paths) or sum(rows.num_rows for _, rows in files) != table.num_rows:
        raise AssertionError(f"splitting a fragment by {partition_by!r} lost or doubled rows: {paths}")
    return files


def _folders(values: pa.Array, column: str) -> pa.Array:
    """Each row's partition folder, encoding each distinct value once."""
    try:
        encoded = pc.dictionary_encode(values)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # nested kept fields: row by row
        return pa.array([partition_folder(column, value) for value in values.to_pylist()], pa.string())
    names = pa.array([partition_folder(column, value) for value in encoded.dictionary.to_pylist()], pa.string())
    folders = names.take(encoded.indices)
    return pc.if_else(pc.is_null(encoded.indices), f"{column}={NULL_PARTITION}", folders)


def partition_folder(column: str, value) -> str:
    """`column=<percent-encoded value>`: injective, and bounded in length.

    `~` is escaped too, so that it only ever appears as the marker of a cut value; a value whose
    encoding is longer than PARTITION_VALUE_BYTES keeps its first bytes, then `~` and 16 hex digits
    of its sha256. The literal null marker is escaped (`%5F_HIVE...`) so it never meets null's folder.
    """
    if value is None:
        return f"{column}={NULL_PARTITION}"
    text = value if isinstance(value, str) else str(value)
    encoded = quote(text.encode("utf-8", "surrogatepass"), safe="").replace("~", "%7E")
    if encoded == NULL_PARTITION:
        encoded = "%5F" + encoded[1:]
    if len(encoded) > PARTITION_VALUE_BYTES:
        cut = PARTITION_VALUE_BYTES - 17
        cut -= 2 if encoded[cut - 2] == "%" else 1 if encoded[cut - 1] == "%" else 0  # never inside a %XX
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        encoded = f"{encoded[:cut]}~{digest}"
    return f"{column}={encoded}"


def quarantine_table(records: list[dict]) -> pa.Table:
    """Quarantine rows; strings that Arrow cannot hold (lone surrogates: often why the document
    is here) are stored with those characters escaped (`\\ud800`)."""
    try:
        return pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA)
    except (UnicodeEncodeError, pa.ArrowException):
        return pa.Table.from_pylist([{key: _escaped(value) for key, value in record.items()} for record in records],
                                    schema=QUARANTINE_SCHEMA)


def _escaped(value):
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value

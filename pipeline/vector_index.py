"""The LanceDB index of one output column: build it from the output's current version, keep it
in step with newer versions, and search it with queries embedded exactly as the corpus was.

A table (embedded LanceDB: a folder, local or on object storage, no server) holds id, source,
row (and window), the kept fields, and `vector`: the column's vectors as stored, or one layer
of a stacked column. The `vector` field's metadata `strata.index` says where they came from:
output, column, layer, metric, ANN kind, the output version the table holds, and that
version's settings identity, which is what `search` embeds queries with. It is written last,
so a build or update that dies half-way is simply redone by the next `strata index`.

An update replays the output's versions since the one the table holds: every document a
version added, changed, deleted or moved (its row renumbered) is deleted from the table and its
current rows are added again, then the ANN index takes in the new rows (`optimize`). A version
that embedded everything again (changed settings), or one `strata gc` removed, means a rebuild.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import versions
from pipeline.changes import CHANGES_SCHEMA
from pipeline.config import InputConfig, OutputSpec, StorageConfig
from pipeline.errors import InputError, OutputError, StrataError, one_line
from pipeline.incremental import changes_name
from pipeline.manifest import CommitRecord, Manifest
from pipeline.query import output_spec
from pipeline.sources import texts_at
from pipeline.storage import Location, S3_PROTOCOLS

os.environ.setdefault("LANCEDB_LOG", "error")  # set before lancedb loads: it warns on every table it creates

METRICS = ("cosine", "dot", "l2")
INDEX_TYPES = ("hnsw", "ivf_pq", "none")  # IVF_HNSW_SQ, IVF_PQ, exact search only
META_KEY = "strata.index"
REFINE_FACTOR = 10  # ANN candidates re-ranked by their full vectors: exact scores, better recall
DELETE_BATCH = 1000  # ids per delete statement
ROW_COLUMNS = ("id", "source", "row", "window")


@dataclass(frozen=True)
class VectorSource:
    """How a table's `vector` comes out of an output column."""

    column: str
    position: int | None  # which layer of a stacked column; None = the vector as stored
    layer: int | None  # the hidden-state index of that layer (0 = embeddings)
    dims: int


@dataclass
class IndexInfo:
    """What a table records about its vectors (the `strata.index` field metadata)."""

    output: str
    column: str
    layer: int | None
    position: int | None
    metric: str
    index_type: str
    dims: int
    version: int | None  # the output version the table holds; None while a build is under way
    fingerprint: str
    identity: dict  # the settings that made the vectors: queries are embedded with them


@dataclass(frozen=True)
class IndexRequest:
    output: str
    column: str
    to: str
    table: str | None = None
    layer: int | None = None
    metric: str | None = None  # None: the table's own; cosine for a new table
    index_type: str | None = None  # None: the table's own; hnsw for a new table
    rebuild: bool = False


def vector_source(spec: OutputSpec, column_type: pa.DataType, layers: list[int], layer: int | None,
                  num_layers: int | None) -> VectorSource:
    """Check that a column can feed an index and say which vector it gives. Pure."""
    name = spec.name
    if spec.pooling == "none":
        raise StrataError(f"column {name!r} is token-level (pooling: none, one vector per token or word); index a pooled "
                          "output (pooling cls, mean, max or first_last_avg)")
    inner = column_type.value_type
    if not pa.types.is_fixed_size_list(inner):  # (D,): concat, mean, sum, weighted
        if layer is not None:
            raise StrataError(f"--layer picks a layer of a stacked column; {name!r} holds one vector per row "
                              f"(layers {layers} combined by {spec.combine})")
        return VectorSource(name, None, None, column_type.list_size)
    count, dims = column_type.list_size, inner.list_size  # (L, D): stack
    stacked = layers if count == len(layers) else [layers[0]]  # first_last_avg folds its two layers into one
    if layer is None:
        if count == 1:
            return VectorSource(name, 0, stacked[0], dims)
        raise StrataError(f"column {name!r} stacks {count} layers {stacked} per row; choose one with --layer "
                          f"(e.g. --layer {stacked[-1]})")
    absolute = layer if layer >= 0 or num_layers is None else num_layers + 1 + layer
    if absolute not in stacked:
        raise StrataError(f"--layer {layer} is not in column {name!r}, which stacks layers {stacked}")
    return VectorSource(name, stacked.index(absolute), absolute, dims)


def index_rows(data: pa.Table, source: VectorSource, keep_fields: list[str]) -> pa.Table:
    """An output file's rows as index rows: the row columns, kept fields and `vector`. Pure."""
    vectors = data[source.column].combine_chunks()
    if source.position is not None:
        vectors = pc.list_element(vectors, source.position)
    columns = [name for name in (*ROW_COLUMNS, *keep_fields) if name in data.column_names]
    return data.select(columns).append_column("vector", vectors)


def moved_or_changed(changes: pa.Table) -> pa.Array:
    """Ids whose rows a version added, changed, deleted or renumbered. Pure."""
    unchanged = pc.equal(changes["change"], "unchanged")
    same_row = pc.fill_null(pc.equal(changes["row"], changes["old_row"]), False)
    return pc.unique(changes.filter(pc.invert(pc.and_(unchanged, same_row)))["id"])


def score(distance: float, metric: str) -> float:
    """LanceDB's distance as users read it: cosine similarity, dot product, or L2 distance. Pure."""
    if metric == "l2":
        return float(np.sqrt(max(distance, 0.0)))  # LanceDB reports the squared distance
    return 1.0 - distance  # cosine: 1 - cos; dot: 1 - dot


def connect(uri: str, create: bool = False, storage: StorageConfig | None = None):
    """A LanceDB database; for S3 the endpoint comes from AWS_ENDPOINT_URL, as for every strata URI.
    Only `create` (strata index) may bring it into being: LanceDB makes a missing local folder on
    connect, and a search, which only reads, must leave a mistyped path as it found it."""
    try:
        import lancedb
    except ImportError:
        raise StrataError("strata index and strata search need LanceDB: pip install 'strata[search]'") from None

    if not create:
        _require_database(uri, storage)
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if uri.split("://", 1)[0] in S3_PROTOCOLS and endpoint:
        options = {"aws_endpoint": endpoint, "allow_http": str(endpoint.startswith("http://")).lower()}
    try:
        return lancedb.connect(uri, storage_options=options or None)
    except Exception as exc:  # noqa: BLE001 - a bad path, no such bucket, no credentials
        raise OutputError(f"cannot open the index at {uri}: {_lance_error(exc)}") from None


def _require_database(uri: str, storage: StorageConfig | None) -> None:
    """A database is a folder (on object storage: objects under the prefix); look without touching."""
    try:
        location = Location.from_uri(uri, storage)
        location.fs.invalidate_cache(location.root)
        if location.fs.isdir(location.root):
            return
        is_file = location.fs.isfile(location.root)
    except Exception as exc:  # noqa: BLE001 - no credentials, an unreachable store
        raise OutputError(f"cannot open the index at {uri}: {one_line(exc)}") from None
    raise StrataError(f"no LanceDB database at {uri} ({'a file, not a folder' if is_file else 'nothing there'}); "
                      f"build one with strata index OUTPUT --column COLUMN --to {uri}")


def _lance_error(exc: BaseException) -> str:
    """LanceDB's error as one line, without the Rust source location it appends."""
    return re.sub(r",? /\S+\.rs:\d+:\d+", "", one_line(exc))


def table_names(db, uri: str) -> list[str]:
    names, page = [], None
    while True:
        try:
            response = db.list_tables(page_token=page)
        except Exception as exc:  # noqa: BLE001 - no such bucket, no credentials, unreachable store
            raise OutputError(f"cannot list the index at {uri}: {_lance_error(exc)}") from None
        names += response.tables
        page = response.page_token
        if not page:
            return names


def open_table(db, uri: str, name: str | None):
    """(table, info) of an index; `name` may be left out when the database holds one table."""
    names = table_names(db, uri)
    if name is None:
        if len(names) != 1:
            raise StrataError(f"{uri} holds {'no index tables' if not names else 'tables ' + ', '.join(names)}; "
                              + ("build one with strata index" if not names else "choose one with --table"))
        name = names[0]
    if name not in names:
        raise StrataError(f"{uri} has no table {name!r}" + (f"; it holds {', '.join(names)}" if names else ""))
    table = db.open_table(name)
    return table, read_info(table)


def read_info(table) -> IndexInfo | None:
    """The table's `strata.index` metadata; None for a table strata did not make."""
    if "vector" not in table.schema.names:
        return None
    raw = (table.schema.field("vector").metadata or {}).get(META_KEY.encode())
    if not raw:
        return None
    known = {f.name for f in fields(IndexInfo)}  # a newer strata may record more
    return IndexInfo(**{key: value for key, value in json.loads(raw).items() if key in known})


def _write_info(table, info: IndexInfo) -> None:
    table.update_field_metadata({"path": "vector", "metadata": {META_KEY: json.dumps(asdict(info))}})


def build_or_update(request: IndexRequest, storage: StorageConfig | None = None,
                    say: Callable[[str], None] = print) -> dict:
    """Make the table hold the output's current version; returns what was done. Metric and
    index type left out keep the table's own (cosine and hnsw for a new table)."""
    for value, known, what in ((request.metric, METRICS, "metric"), (request.index_type, INDEX_TYPES, "index type")):
        if value is not None and value not in known:
            raise StrataError(f"unknown {what} {value!r}; choose from {', '.join(known)}")
    location = Location.from_uri(request.output, storage)
    snapshot = versions.read_snapshot(location)
    if snapshot is None:
        raise OutputError(f"{request.output} holds no published version to index (see strata status {request.output})")
    source, file_schema = _describe(location, snapshot, request)
    db = connect(request.to, create=True)
    name = request.table or request.column + ("" if request.layer is None else f"_layer{source.layer}")
    table, held = (None, None) if request.rebuild else _existing(db, request.to, name)
    info = IndexInfo(location.uri(), request.column, source.layer, source.position,
                     request.metric or (held.metric if held else "cosine"),
                     request.index_type or (held.index_type if held else "hnsw"),
                     source.dims, None, snapshot.fingerprint, snapshot.identity)
    where = f"{request.to} table {name}"
    report = {"index": request.to, "table": name, "version": snapshot.version, "column": request.column,
              "layer": source.layer, "dims": source.dims, "metric": info.metric, "index_type": info.index_type}
    keep_fields = snapshot.identity["input"]["keep_fields"]
    if held is not None:
        _check_same_origin(held, info, where)
        if held.version == snapshot.version:
            say(f"{where} already holds version {snapshot.version} of {request.output}")
            return {**report, "action": "current", "rows": table.count_rows()}
        ids, files, why_rebuild = _changed_since(location, held, snapshot)
        if why_rebuild is None:
            touched = [r for r in snapshot.fragments if changes_name(r.source) in files]
            _apply(table, ids, _rows(location, touched, source, keep_fields, ids), _schema(file_schema, info, keep_fields))
            _write_info(table, replace(info, version=snapshot.version))
            say(f"updated {where} from version {held.version} to {snapshot.version}: "
                f"{len(ids):,} documents added, changed, deleted or moved")
            return {**report, "action": "updated", "from_version": held.version, "touched": len(ids),
                    "rows": table.count_rows()}
        say(f"rebuilding {where}: {why_rebuild}")
    schema = _schema(file_schema, info, keep_fields, marked=True)
    rows = _rows(location, snapshot.fragments, source, keep_fields)
    table = db.create_table(name, pa.RecordBatchReader.from_batches(schema, rows), mode="overwrite")
    count = table.count_rows()
    _create_ann(table, info.metric, info.index_type, count)
    _write_info(table, replace(info, version=snapshot.version))
    say(f"indexed version {snapshot.version} of {request.output} ({count:,} rows, {source.dims} dims, "
        f"{info.metric}, {info.index_type}) into {where}")
    return {**report, "action": "built", "rows": count}


def _describe(location: Location, snapshot: versions.Snapshot, request: IndexRequest) -> tuple[VectorSource, pa.Schema]:
    spec = output_spec(snapshot.identity, request.column)
    if not snapshot.files:
        raise OutputError(f"version {snapshot.version} of {request.output} holds no rows to index")
    schema = versions.data_schema(location, snapshot)
    layers = json.loads(schema.metadata[b"strata.layers"])[request.column]
    run = Manifest(location).read_run() or {}
    num_layers = run["model"]["num_layers"] if run.get("fingerprint") == snapshot.fingerprint else None
    return vector_source(spec, schema.field(request.column).type, layers, request.layer, num_layers), schema


def _schema(file_schema: pa.Schema, info: IndexInfo, keep_fields: list[str], marked: bool = False) -> pa.Schema:
    """The table's schema; `marked` adds the info (a new table is strata's from its first commit)."""
    kept = [file_schema.field(name) for name in (*ROW_COLUMNS, *keep_fields) if name in file_schema.names]
    column = file_schema.field(info.column).type
    vector = column.value_type if info.position is not None else column
    return pa.schema([*kept, pa.field("vector", vector, metadata={META_KEY: json.dumps(asdict(info))} if marked else None)])


def _rows(location: Location, records: list[CommitRecord], source: VectorSource, keep_fields: list[str],
          ids: pa.Array | None = None) -> Iterator[pa.RecordBatch]:
    """Index rows of the records' data files, one file at a time (only `ids` when given)."""
    columns = [*ROW_COLUMNS, *keep_fields, source.column]
    for record in records:
        for path in record.files:
            with location.fs.open(location.path(path), "rb") as f:
                present = pq.read_schema(f).names
                data = pq.read_table(f, columns=[c for c in columns if c in present])
            if ids is not None:
                data = data.filter(pc.is_in(data["id"], value_set=ids))
            yield from index_rows(data, source, keep_fields).to_batches()


def _existing(db, uri: str, name: str):
    if name not in table_names(db, uri):
        return None, None
    table, info = open_table(db, uri, name)
    if info is None:
        raise StrataError(f"{uri} table {name} was not made by strata index; pass --rebuild to replace it, "
                          "or --table for another name")
    return table, info


def _check_same_origin(held: IndexInfo, wanted: IndexInfo, where: str) -> None:
    # other settings may change the vectors' size; the version replay then rebuilds the table
    keys = ("output", "column", "layer", "metric", "index_type") + (("dims",) if held.fingerprint == wanted.fingerprint
                                                                    else ())
    differ = [f"{key} {getattr(held, key)!r} (now {getattr(wanted, key)!r})" for key in keys
              if getattr(held, key) != getattr(wanted, key)]
    if differ:
        raise StrataError(f"{where} was built with another {', '.join(differ)}; pass --rebuild to "
                          "replace it, or --table for a new table")


def _changed_since(location: Location, held: IndexInfo, snapshot: versions.Snapshot
                   ) -> tuple[pa.Array | None, set[str], str | None]:
    """(ids to replace, changes files that name them, None) or (None, ∅, why a rebuild is needed)."""
    if held.version is None:
        return None, set(), "its last build did not finish"
    ids, files = [], set()
    for version in range(held.version + 1, snapshot.version + 1):
        newer = versions.read_snapshot(location, version)
        if newer is None:
            return None, set(), f"version {version} of the output was removed by strata gc"
        if newer.fingerprint != held.fingerprint:
            return None, set(), f"version {version} embedded every document again (its settings changed)"
        for name in location.list_names(versions.changes_dir(version)):
            path = f"{versions.changes_dir(version)}/{name}"
            with location.fs.open(location.path(path), "rb") as f:
                ids.append(moved_or_changed(pq.read_table(f, schema=CHANGES_SCHEMA)))
            files.add(name)
    return pc.unique(pa.concat_arrays(ids)) if ids else pa.array([], pa.string()), files, None


def _apply(table, ids: pa.Array, rows: Iterator[pa.RecordBatch], schema: pa.Schema) -> None:
    """Replace the rows of `ids`: delete them all, add their current rows, index the new rows.
    Replaying it after a crash gives the same table: the delete also removes a half-done add."""
    values = ids.to_pylist()
    if not values:
        return
    for start in range(0, len(values), DELETE_BATCH):
        quoted = ", ".join("'" + value.replace("'", "''") + "'" for value in values[start:start + DELETE_BATCH])
        table.delete(f"id IN ({quoted})")
    table.add(pa.RecordBatchReader.from_batches(schema, rows))
    table.optimize()


def _create_ann(table, metric: str, index_type: str, rows: int) -> None:
    """IVF_HNSW_SQ or IVF_PQ with LanceDB's own sizing (partitions of about 1M and 8k rows)."""
    from lancedb.index import HnswSq, IvfPq

    if index_type == "none" or rows == 0:
        return
    config = HnswSq(distance_type=metric) if index_type == "hnsw" else IvfPq(distance_type=metric)
    table.create_index("vector", config=config)


@dataclass
class SearchResult:
    table: str
    info: IndexInfo
    hits: list[list[dict]]  # per text, nearest first: rank, score, the row columns and kept fields


def search(uri: str, texts: list[str], k: int = 10, table_name: str | None = None, where: str | None = None,
           exact: bool = False, with_text: bool = True, storage: StorageConfig | None = None) -> SearchResult:
    """The k nearest rows to each text. Scores: cosine similarity, dot product, or L2 distance.
    `with_text` adds each hit's text, read from the input where the run found it (None when the
    input no longer holds that document there)."""
    from pipeline.query import QueryEncoder

    table, info = open_table(connect(uri, storage=storage), uri, table_name)
    if info is None or info.version is None:
        raise StrataError(f"{uri} table {table.name} is not a finished strata index; run strata index again")
    vectors = QueryEncoder(info.identity, info.column, storage).encode(texts)
    if info.position is not None:
        vectors = vectors[:, info.position]
    if vectors.shape[1] != info.dims:
        raise StrataError(f"the query embeds to {vectors.shape[1]} dims but {uri} table {table.name} holds "
                          f"{info.dims}; build the index again with strata index --rebuild")
    hits = [nearest(table, info, vector.astype(np.float32), k, where, exact) for vector in vectors]
    if with_text:
        _add_texts(hits, InputConfig(**info.identity["input"]), storage)
    return SearchResult(table.name, info, hits)


def _add_texts(hits: list[list[dict]], cfg: InputConfig, storage: StorageConfig | None) -> None:
    wanted = [(hit["source"], hit["row"], hit["id"]) for per_text in hits for hit in per_text]
    try:
        texts = texts_at(cfg, wanted, storage)
    except InputError:  # the input is gone or unreachable: results without their texts
        texts = {}
    for per_text in hits:
        for hit in per_text:
            hit["text"] = texts.get((hit["source"], hit["row"]))


def nearest(table, info: IndexInfo, vector: np.ndarray, k: int, where: str | None = None,
            exact: bool = False) -> list[dict]:
    """The k rows nearest to one vector, nearest first."""
    query = table.search(vector, vector_column_name="vector").distance_type(info.metric).limit(k)
    query = query.bypass_vector_index() if exact else query.refine_factor(REFINE_FACTOR)
    if where:
        query = query.where(where, prefilter=True)
    try:
        hits = query.to_arrow().drop_columns(["vector"])
    except Exception as exc:  # noqa: BLE001 - a bad --where expression
        what = f"the filter --where {where!r}" if where else "the search"
        raise StrataError(f"{what} failed: {_lance_error(exc)}") from None
    rows = hits.to_pylist()
    return [{"rank": rank, "score": score(row.pop("_distance"), info.metric), **row}
            for rank, row in enumerate(rows, 1)]

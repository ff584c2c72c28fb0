"""One reader of strata's Parquet output, checked against the values pyarrow reads. Used by bench/readers.sh.

    readers_check.py reference OUT REF.npz      (strata's own venv) the reference: every vector column of the
                                                current version as float32 (float16 -> float32 is exact)
    readers_check.py pyarrow|pandas|duckdb|faiss|lancedb --ref-dir DIR OUT [OUT ...]
                                                read OUT the way the README shows for that reader and compare

A check prints one JSON line: {"reader", "version" (what was imported), "ok", "outputs": {OUT name: "ok" or why
not}, "notes": [...]}. A reader passes an output only when every vector of every vector column comes back as
numbers (not bytes, not BLOBs) whose float32 values equal the reference exactly, in the right shape.

The reading code is the README's own (taken from README.md at run time, with only the output path and, for
DuckDB, the column names put in), so this follows the README as it changes.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.environ.get("STRATA_README", os.path.join(REPO, "README.md"))


# -- the README's code --------------------------------------------------------------------------------

def readme_block(after: str, lang: str) -> str:
    """The first ```lang block after the text `after` in README.md."""
    text = open(README, encoding="utf-8").read()
    start = text.index(after)
    match = re.compile(r"```" + lang + r"\n(.*?)```", re.S).search(text, start)
    return match.group(1)


def pyarrow_code(out: str) -> str:
    code = readme_block("**Reading a version.**", "python")
    assert 'out = "out/demo"' in code, "README's pyarrow reading no longer sets out = \"out/demo\""
    return code.replace('out = "out/demo"', f"out = {out!r}")


def duckdb_sql(out: str, columns: list[str]) -> list[str]:
    sql = readme_block("With DuckDB", "sql")
    assert "out/demo/" in sql and "SELECT id, embedding" in sql, "README's DuckDB SQL changed shape"
    sql = sql.replace("out/demo/", out.rstrip("/") + "/").replace("SELECT id, embedding", "SELECT id, " + ", ".join(columns))
    statements = []
    for part in sql.split(";"):
        lines = [line for line in part.splitlines() if line.strip() and not line.strip().startswith("--")]
        if lines:
            statements.append("\n".join(lines))
    return statements


def faiss_code(out: str) -> str:
    code = readme_block("<!-- tested: faiss -->", "python")
    assert 'out = "out/passages"' in code
    return code.replace('out = "out/passages"', f"out = {out!r}")


# -- the reference -------------------------------------------------------------------------------------

def snapshot_files(out: str) -> tuple[dict, list[str]]:
    snapshot = json.load(open(max(glob.glob(f"{out}/_manifest/versions/*.json"))))
    return snapshot, [f"{out}/{f}" for f in snapshot["files"]]


def vector_columns(out: str) -> dict[str, dict]:
    """name -> {"shape": per-vector shape, "per": document/token/word} from _manifest/run.json."""
    return json.load(open(f"{out}/_manifest/run.json"))["outputs"]


def make_reference(out: str, to: str) -> None:
    import pyarrow as pa
    import pyarrow.dataset as ds

    _, files = snapshot_files(out)
    table = ds.dataset(files, format="parquet").to_table()
    arrays = {}
    for name, info in vector_columns(out).items():
        column = table[name].combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):  # one vector per token / word
            counts = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
            column = column.flatten()
        else:
            counts = np.ones(len(column), np.int64)
        while pa.types.is_fixed_size_list(column.type):
            column = column.flatten()
        arrays[f"{name}.values"] = column.to_numpy().astype(np.float32)
        arrays[f"{name}.counts"] = counts
        arrays[f"{name}.shape"] = np.array(info["shape"], np.int64)
        arrays[f"{name}.per"] = np.array(info["per"])
        arrays[f"{name}.type"] = np.array(str(table.schema.field(name).type))
        assert arrays[f"{name}.values"].size == counts.sum() * int(np.prod(info["shape"]))
    arrays["ids"] = np.array(table["id"].to_pylist())
    arrays["columns"] = np.array(list(vector_columns(out)))
    np.savez(to, **arrays)


class Reference:
    def __init__(self, path: str):
        data = np.load(path, allow_pickle=False)
        self.ids = [str(i) for i in data["ids"]]
        self.columns = [str(c) for c in data["columns"]]
        self.info, self.rows = {}, {}
        for name in self.columns:
            shape = tuple(int(d) for d in data[f"{name}.shape"])
            counts = data[f"{name}.counts"]
            per = str(data[f"{name}.per"])
            size = int(np.prod(shape))
            ends = np.cumsum(counts) * size
            values = data[f"{name}.values"]
            rows = {}
            for doc, end, count in zip(self.ids, ends, counts):
                block = values[end - count * size:end]
                rows[doc] = block.reshape(shape) if per == "document" else block.reshape((int(count), *shape))
            self.info[name] = {"shape": shape, "per": per, "type": str(data[f"{name}.type"])}
            self.rows[name] = rows


def describe(value) -> str:
    """What a reader handed back for one vector, in a few words."""
    if isinstance(value, np.ndarray):
        inner = ""
        if value.dtype == object and value.size:
            inner = f" of {describe(value.flat[0])}"
        return f"ndarray[{value.dtype}]{tuple(value.shape)}{inner}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{len(value)}]" + (f" of {describe(value[0])}" if value else "")
    if isinstance(value, (bytes, bytearray)):
        return f"bytes({len(value)})"
    return type(value).__name__


def as_numbers(value) -> np.ndarray:
    """A vector as read, as a float32 array; raises on bytes or other non-numbers (BLOBs, objects)."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = [as_numbers(v) for v in value]
    elif isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float, np.number)):
        value = [as_numbers(v) for v in value]
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"not numbers: {describe(value)}")
    return array.astype(np.float32)


def compare(ref: Reference, column: str, ids, vectors) -> str:
    """'ok' when every id's vectors equal the reference exactly, else why not."""
    ids = [str(i) for i in ids]
    if sorted(ids) != sorted(ref.ids):
        return f"{column}: ids differ ({len(ids)} rows read, {len(ref.ids)} expected)"
    first = None
    for doc, vector in zip(ids, vectors):
        if first is None:
            first = describe(vector)
        try:
            got = as_numbers(vector)
        except (TypeError, ValueError) as exc:
            return f"{column}: {one_line(exc)}"
        want = ref.rows[column][doc]
        if got.shape != want.shape:
            return f"{column}: shape {got.shape}, expected {want.shape} (read as {first})"
        if not np.array_equal(got, want):
            bad = int((got != want).sum())
            return f"{column}: {bad} of {want.size} values differ for {doc} (max |diff| {np.abs(got - want).max():.3g})"
    return "ok"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def first_failure(results: list[str]) -> str:
    bad = [r for r in results if r != "ok"]
    return "ok" if not bad else "; ".join(bad)


def arrow_vectors(column) -> list:
    """Per row, the vectors of a pyarrow (chunked) column as numpy, the way the README does it:
    flatten the fixed-size lists and reshape (lists of vectors: split by the list offsets)."""
    import pyarrow as pa

    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    n = len(column)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        counts = column.value_lengths().to_numpy(zero_copy_only=False)
        inner = arrow_vectors(column.flatten())
        out, at = [], 0
        for count in counts:
            out.append(np.stack(inner[at:at + count]) if count else np.zeros((0,), np.float32))
            at += count
        return out
    shape = []
    values = column
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    return list(flat.reshape(n, *shape))


# -- the readers ----------------------------------------------------------------------------------------

def check_pyarrow(ref: Reference, out: str, notes: list[str]) -> str:

    namespace: dict = {}
    exec(pyarrow_code(out), namespace)  # noqa: S102 - the README's own code
    table = namespace["table"]
    results = []
    for name in ref.columns:
        got_type = str(table.schema.field(name).type)
        if got_type != ref.info[name]["type"]:
            results.append(f"{name}: type {got_type}, expected {ref.info[name]['type']}")
            continue
        results.append(compare(ref, name, table["id"].to_pylist(), arrow_vectors(table[name])))
    return first_failure(results)


def nd(cell):
    """A pandas cell (object ndarray of ndarrays, possibly nested) as one n-dimensional array."""
    if isinstance(cell, np.ndarray) and cell.dtype == object:
        return np.stack([nd(c) for c in cell]) if len(cell) else np.zeros((0,), np.float32)
    return np.asarray(cell)


def check_pandas(ref: Reference, out: str, notes: list[str]) -> str:
    import pandas as pd

    df = pd.read_parquet(f"{out}/data", partitioning=None)  # README: "pd.read_parquet(..., partitioning=None)"
    _, files = snapshot_files(out)
    try:  # a version's files, as a list
        by_files = pd.read_parquet(files, partitioning=None)
        notes.append(f"{os.path.basename(out)}: read_parquet(list of the version's files, partitioning=None): "
                     + ("same rows" if len(by_files) == len(df) else f"{len(by_files)} rows, not {len(df)}"))
    except Exception as exc:  # noqa: BLE001
        notes.append(f"{os.path.basename(out)}: read_parquet(list of the version's files) fails: {one_line(exc)}")
    results = []
    for name in ref.columns:
        series = df[name]
        cell = series.iloc[0]
        if ref.info[name]["per"] == "document":
            try:
                matrix = np.stack([nd(c) for c in series.to_numpy()])
                recipe = f"np.stack(df[{name!r}].to_numpy())" if series.iloc[0].dtype != object else \
                    f"np.stack([np.stack(c) for c in df[{name!r}]])"
                shape = f"{recipe} -> {matrix.dtype}{matrix.shape}"
            except Exception as exc:  # noqa: BLE001
                shape = f"np.stack fails: {one_line(exc)}"
        else:
            shape = f"np.stack(cell) per row -> {nd(cell).dtype}(n_{ref.info[name]['per']}s, " + \
                    ", ".join(map(str, ref.info[name]["shape"])) + ")"
        notes.append(f"{os.path.basename(out)}.{name}: dtype {series.dtype}, cell {describe(cell)}; {shape}")
        results.append(compare(ref, name, df["id"].tolist(), [nd(c) for c in series.to_numpy()]))
    return first_failure(results)


def check_duckdb(ref: Reference, out: str, notes: list[str]) -> str:
    import duckdb

    con = duckdb.connect()
    *setup, select = duckdb_sql(out, ref.columns)
    for statement in setup:
        con.execute(statement)
    rel = con.sql(select)
    types = dict(zip(rel.columns, (str(t) for t in rel.types)))
    rows = rel.fetchall()
    ids = [r[0] for r in rows]
    base = os.path.basename(out)
    notes.append(f"{base}: " + ", ".join(f"{name} {types[name]}" for name in ref.columns))
    wrong = {}
    for i, name in enumerate(ref.columns, 1):
        result = compare(ref, name, ids, [r[i] for r in rows])
        if result != "ok":
            wrong[name] = result
    if not wrong:
        return "ok"
    verdict = "read as " + ", ".join(f"{name} {types[name]}" for name in wrong)
    name = next(iter(wrong))
    target = "FLOAT" + "[]" * (1 + (ref.info[name]["per"] != "document") + (len(ref.info[name]["shape"]) - 1))
    try:
        con.sql(f"SELECT CAST({name} AS {target}) FROM read_parquet(getvariable('files'), "
                "hive_partitioning = false)").fetchall()
        verdict += f"; CAST({name} AS {target}) runs but: {wrong[name]}"
    except Exception as exc:  # noqa: BLE001
        verdict += f"; CAST({name} AS {target}): {one_line(exc).split(' LINE ')[0][:160]}"
    try:  # work-arounds: let pyarrow read the files and DuckDB scan the Arrow table, as it is or cast to float32
        import pyarrow as pa
        import pyarrow.dataset as ds
    except ImportError:
        return verdict
    _, files = snapshot_files(out)
    arrow_table = ds.dataset(files, format="parquet").to_table(columns=["id", *ref.columns])
    as_float32 = pa.schema([field.with_type(float32_type(field.type)) for field in arrow_table.schema])
    for how, arrow_table in (("a pyarrow table", arrow_table), ("a pyarrow table cast to float32", arrow_table.cast(as_float32))):
        try:
            scanned = con.sql("SELECT * FROM arrow_table")
            scan_types = dict(zip(scanned.columns, (str(t) for t in scanned.types)))
            scan_rows = scanned.fetchall()
            scan = first_failure([compare(ref, name, [r[0] for r in scan_rows], [r[i] for r in scan_rows])
                                  for i, name in enumerate(ref.columns, 1)])
            notes.append(f"{base} via {how} (SELECT ... FROM arrow_table): "
                         + ", ".join(f"{n} {scan_types[n]}" for n in ref.columns) + f": {scan}")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"{base} via {how}: {one_line(exc)[:200]}")
    return verdict


def float32_type(type_):
    """The same Arrow type with float16 values made float32."""
    import pyarrow as pa

    if pa.types.is_float16(type_):
        return pa.float32()
    if pa.types.is_fixed_size_list(type_):
        return pa.list_(pa.field(type_.value_field.name, float32_type(type_.value_type)), type_.list_size)
    if pa.types.is_list(type_):
        return pa.list_(pa.field(type_.value_field.name, float32_type(type_.value_type)))
    return type_


def check_faiss(ref: Reference, out: str, notes: list[str]) -> str:
    import faiss

    if "sentence" not in ref.columns:
        return "no sentence column (the README's FAISS example indexes `sentence`)"
    namespace: dict = {}
    exec(faiss_code(out), namespace)  # noqa: S102 - the README's own code
    table, ids, index = namespace["table"], namespace["ids"], namespace["index"]
    result = compare(ref, "sentence", table["id"].to_pylist(),
                     list(table["sentence"].combine_chunks().flatten().to_numpy()
                          .reshape(len(ids), -1).astype("float32")))
    if result != "ok":
        return result
    want = np.stack([ref.rows["sentence"][str(i)] for i in ids]).astype(np.float32)
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    held = index.reconstruct_n(0, index.ntotal)
    if held.shape != unit.shape or not np.allclose(held, unit, atol=1e-6):
        return f"the index holds other vectors than the output's (max |diff| {np.abs(held - unit).max():.3g})"
    query = namespace["query"][0]
    exact = np.argsort(-(unit @ query), kind="stable")[:10]
    got = namespace["rows"][0]
    if list(ids[got]) != list(ids[exact]) or not np.allclose(namespace["scores"][0], (unit @ query)[exact], atol=1e-5):
        return f"search gave {list(ids[got][:3])}..., exact search {list(ids[exact][:3])}..."
    _, self_rows = index.search(unit[:20], 1)
    if list(self_rows[:, 0]) != list(range(20)):
        return "a stored vector as the query does not find its own row first"
    notes.append(f"{os.path.basename(out)}: faiss {faiss.__version__}, numpy {np.__version__}: "
                 f"top hit {ids[got[0]]} score {namespace['scores'][0][0]:.4f}")
    return "ok"


def strata_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """strata's CLI in this interpreter (its packages first, then strata's venv)."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"strata {args[0]} exited {proc.returncode}: {tail[-400:]}")
    return proc


def check_lancedb(ref: Reference, out: str, notes: list[str]) -> str:
    import lancedb

    base = os.path.basename(out)
    results = []
    with tempfile.TemporaryDirectory(prefix="strata-lance-") as scratch:
        db_uri = f"{scratch}/index"
        # the README's commands: a pooled column, and one layer of a stacked column
        strata_cli("index", out, "--column", "sentence", "--to", db_uri)
        strata_cli("index", out, "--column", "all_layers_mean", "--layer", "4", "--to", db_uri)
        db = lancedb.connect(db_uri)
        for table_name, column, position in (("sentence", "sentence", None), ("all_layers_mean_layer4", "all_layers_mean", 4)):
            data = db.open_table(table_name).to_arrow()
            vectors = arrow_vectors(data["vector"])
            if position is not None:  # compare with that layer of the reference stack
                sub = Reference.__new__(Reference)
                sub.ids, sub.columns = ref.ids, [column]
                sub.rows = {column: {k: v[position] for k, v in ref.rows[column].items()}}
                results.append(compare(sub, column, data["id"].to_pylist(), vectors).replace(column, table_name, 1))
            else:
                results.append(compare(ref, column, data["id"].to_pylist(), vectors))
            notes.append(f"{base}: table {table_name} vector {data.schema.field('vector').type}")
        # a document's own text as the query finds that document first
        doc, text = first_doc_text(out)
        proc = strata_cli("search", db_uri, text, "-k", "3", "--json", "--table", "sentence")
        top = json.loads(proc.stdout)["results"][0]
        if top["id"] != doc:
            results.append(f"search for {doc}'s own text found {top['id']} first")
        else:
            notes.append(f"{base}: search for {doc}'s own text: rank 1, score {top['score']:.4f}")
    return first_failure(results)


def first_doc_text(out: str) -> tuple[str, str]:
    snapshot, _ = snapshot_files(out)
    uri = snapshot["identity"]["input"]["uri"]
    uri = uri if os.path.isabs(uri) else os.path.join(REPO, uri)
    with open(os.path.join(uri, "part-0.jsonl"), encoding="utf-8") as f:
        doc = json.loads(f.readline())
    return doc["id"], doc["text"]


CHECKS = {"pyarrow": check_pyarrow, "pandas": check_pandas, "duckdb": check_duckdb, "faiss": check_faiss,
          "lancedb": check_lancedb}
MODULES = {"pyarrow": "pyarrow", "pandas": "pandas", "duckdb": "duckdb", "faiss": "faiss", "lancedb": "lancedb"}


def run_check(reader: str, ref_dir: str, outs: list[str]) -> dict:
    report = {"reader": reader, "version": None, "ok": False, "outputs": {}, "notes": []}
    try:
        module = __import__(MODULES[reader])
        report["version"] = getattr(module, "__version__", "?")
        if reader == "pandas":
            import pyarrow
            report["notes"].append(f"with pyarrow {pyarrow.__version__}, numpy {np.__version__}")
    except Exception as exc:  # noqa: BLE001 - a wheel that does not import (numpy ABI, missing library)
        report["outputs"] = {"import": f"{one_line(exc)} (numpy {np.__version__})"}
        return report
    for out in outs:
        name = os.path.basename(out.rstrip("/"))
        try:
            ref = Reference(os.path.join(ref_dir, f"{name}.npz"))
            with contextlib.redirect_stdout(sys.stderr):  # the README's examples print; stdout is the JSON line
                report["outputs"][name] = CHECKS[reader](ref, out, report["notes"])
        except Exception as exc:  # noqa: BLE001 - whatever the reader raised is the finding
            report["outputs"][name] = one_line(exc)
            if os.environ.get("READERS_DEBUG"):
                traceback.print_exc()
    report["ok"] = bool(report["outputs"]) and all(v == "ok" for v in report["outputs"].values())
    return report


# -- what readers.sh prints ---------------------------------------------------------------------------

KINDS = {"out-f16": "float16", "out-f32": "float32", "out-tok": "float16 per token"}


def trial_line(record: dict) -> str:
    """One line for a reader@version: PASS/FAIL and why."""
    label = f"{record['reader']}@{record['wanted']}" + (f" ({record['pins']})" if record.get("pins") else "")
    if record.get("install") != "ok":
        return f"FAIL  {label:<40} cannot install: {record.get('install')}"
    got = record.get("version")
    said = "" if got in (None, record["wanted"]) else f" [imported {got}]"
    if record.get("ok"):
        return f"PASS  {label:<40} {', '.join(KINDS.get(o, o) for o in record['outputs'])}: exact{said}"
    why = "; ".join(f"{KINDS.get(o, o)}: {'ok' if v == 'ok' else v[:260]}" for o, v in record["outputs"].items())
    return f"FAIL  {label:<40} {why or record.get('error', 'no result')}{said}"


def version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.]", re.sub(r"\.post", ".", version)))


def summary(path: str) -> None:
    """Per reader and kind of output, the lowest tried version from which every later tried version reads it
    exactly. A version counts as reading a kind when any of its trials (with or without extra pins) does;
    versions that could not be installed are passed over."""
    records = [json.loads(line) for line in open(path) if line.strip()]
    print("\nreal minimums (the lowest tried version from which every later tried version reads exactly):")
    for reader in dict.fromkeys(r["reader"] for r in records):
        trials = [r for r in records if r["reader"] == reader]
        versions = sorted({r["wanted"] for r in trials}, key=version_key)
        kinds = list(dict.fromkeys(o for r in trials for o in r.get("outputs", {}) if o in KINDS))
        parts = []
        for kind in kinds:
            lowest, needs = None, ""
            for version in reversed(versions):
                tried = [r for r in trials if r["wanted"] == version and r.get("install") == "ok"]
                if not tried:
                    continue
                passing = [r for r in tried if r.get("outputs", {}).get(kind) == "ok"]
                if not passing:
                    break
                lowest = version
                needs = "" if any(not r.get("pins") for r in passing) else f" (with {passing[0]['pins']})"
            parts.append((KINDS[kind], lowest + needs if lowest else "none of those tried"))
        if not parts:
            said = "nothing could be read (see the lines above)"
        elif len({found for _, found in parts}) == 1:
            said = f"{parts[0][1]} (every output: {', '.join(kind for kind, _ in parts)})"
        else:
            said = ", ".join(f"{kind} {found}" for kind, found in parts)
        print(f"  {reader:<8} {said}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["reference", "line", "summary", *CHECKS])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--ref-dir")
    args = parser.parse_intermixed_args()
    if args.what == "reference":
        make_reference(*args.paths)
        return
    if args.what == "line":  # a trial's JSON record on stdin
        print(trial_line(json.loads(sys.stdin.read())))
        return
    if args.what == "summary":
        summary(args.paths[0])
        return
    print(json.dumps(run_check(args.what, args.ref_dir, args.paths)))


if __name__ == "__main__":
    main()

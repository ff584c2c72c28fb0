"""The LanceDB index of an output column: ANN recall against exact search, a document's own text
finds it, updates follow incremental versions, and mistakes get one line that names the fix."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline import versions
from pipeline.config import OutputSpec, parse_config
from pipeline.errors import OutputError, StrataError
from pipeline.runner import run
from pipeline.storage import Location
from pipeline.vector_index import (IndexRequest, build_or_update, connect, moved_or_changed, nearest, open_table,
                                   score, search, vector_source)

from conftest import cli, passages, write_jsonl

README = Path(__file__).parents[1] / "README.md"


def current_rows(output: Path, column: str) -> pa.Table:
    files = versions.files(str(output))
    return ds.dataset(files, format="parquet").to_table(columns=["id", "source", "row", column]).sort_by("id")


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# -- pure parts ---------------------------------------------------------------------------------

STACK = pa.list_(pa.list_(pa.float16(), 384), 7)
FLAT = pa.list_(pa.float16(), 768)


def test_vector_source_picks_a_layer_of_a_stack_and_refuses_what_cannot_be_indexed():
    stack = OutputSpec(name="all", layers="all", pooling="mean", combine="stack")
    assert vector_source(stack, STACK, list(range(7)), 4, 6).position == 4
    assert vector_source(stack, STACK, list(range(7)), -1, 6).layer == 6  # negative: from the model's last layer
    assert vector_source(stack, pa.list_(pa.list_(pa.float16(), 384), 2), [2, 5], 5, 6).position == 1
    flat = vector_source(OutputSpec(name="cat", layers=[2, 3], pooling="cls", combine="concat"), FLAT, [2, 3], None, 6)
    assert (flat.position, flat.dims) == (None, 768)
    first_last = OutputSpec(name="fl", layers=[1, 6], pooling="first_last_avg", combine="stack")
    assert vector_source(first_last, pa.list_(pa.list_(pa.float16(), 384), 1), [1, 6], None, 6).position == 0
    with pytest.raises(StrataError, match=r"stacks 7 layers \[0, 1, 2, 3, 4, 5, 6\] per row; choose one with --layer"):
        vector_source(stack, STACK, list(range(7)), None, 6)
    with pytest.raises(StrataError, match=r"--layer 9 is not in column 'all'"):
        vector_source(stack, STACK, list(range(7)), 9, 6)
    with pytest.raises(StrataError, match="--layer picks a layer of a stacked column"):
        vector_source(OutputSpec(name="cat", layers=[2, 3], pooling="cls", combine="concat"), FLAT, [2, 3], 2, 6)
    with pytest.raises(StrataError, match="token-level"):
        vector_source(OutputSpec(name="tok", layers=[-1], pooling="none", combine="mean"), FLAT, [6], None, 6)


def test_moved_or_changed_ids_and_scores():
    changes = pa.table({"id": ["a", "b", "c", "d", "e", "e"], "row": [0, 1, 3, None, 4, 4],
                        "change": ["unchanged", "changed", "unchanged", "deleted", "added", "added"],
                        "old_row": [0, 1, 2, 3, None, None]})
    assert sorted(moved_or_changed(changes).to_pylist()) == ["b", "c", "d", "e"]  # c moved: row 2 -> 3
    assert score(0.25, "cosine") == 0.75 and score(-1.0, "dot") == 2.0 and score(4.0, "l2") == 2.0


# -- the ~2,000-passage output ------------------------------------------------------------------

@pytest.fixture(scope="module")
def indexed(passage_output, tmp_path_factory):
    output, docs = passage_output
    db = tmp_path_factory.mktemp("index") / "db"
    for kind in ("hnsw", "ivf_pq"):
        report = build_or_update(IndexRequest(str(output), "sentence", str(db), table=kind, index_type=kind))
        assert (report["action"], report["rows"], report["dims"]) == ("built", len(docs), 384)
    return output, docs, db


@pytest.mark.parametrize("kind", ["hnsw", "ivf_pq"])
def test_ann_recall_at_10_against_exact_search_and_own_text_first(indexed, kind):
    output, docs, db = indexed
    table, info = open_table(connect(str(db)), str(db), kind)
    assert table.index_stats("vector_idx").index_type == {"hnsw": "IVF_HNSW_SQ", "ivf_pq": "IVF_PQ"}[kind]
    rows = current_rows(output, "sentence")
    ids = np.array(rows["id"].to_pylist())
    vectors = unit(rows["sentence"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1))
    rng = np.random.default_rng(7)
    pairs = rng.choice(len(ids), (100, 2))
    queries = np.concatenate([vectors[rng.choice(len(ids), 100)], unit(vectors[pairs[:, 0]] + vectors[pairs[:, 1]])])
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = [{hit["id"] for hit in nearest(table, info, query, 10)} for query in queries]
    recall = np.mean([len(got & set(ids[want])) / 10 for got, want in zip(found, exact)])
    print(f"{kind}: recall@10 {recall:.4f} over {len(queries)} queries, {len(ids)} documents")
    assert recall >= 0.95

    sample = [str(i) for i in rng.choice(ids, 20, replace=False)]
    result = search(str(db), [docs[i]["text"] for i in sample], k=3, table_name=kind, with_text=False)
    assert [hits[0]["id"] for hits in result.hits] == sample
    assert all(hits[0]["score"] > 0.999 and hits[0]["score"] >= hits[1]["score"] for hits in result.hits)


def test_cli_indexes_a_layer_of_a_stacked_column_and_searches_with_a_filter(passage_output, tmp_path, capsys):
    output, docs = passage_output
    db = str(tmp_path / "db")
    code, out, err = cli(capsys, "index", str(output), "--column", "layers", "--layer", "3", "--to", db, "--json")
    assert code == 0, err
    assert json.loads(out)["table"] == "layers_layer3" and "indexed version 1" in err
    wanted = list(docs.values())[500]
    code, out, err = cli(capsys, "search", db, wanted["text"], "-k", "3", "--where", f"doc = '{wanted['doc']}'", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["column"], answer["layer"], answer["metric"], answer["version"]) == ("layers", 3, "cosine", 1)
    assert answer["results"][0]["id"] == wanted["id"] and answer["results"][0]["text"] == wanted["text"]
    assert {hit["doc"] for hit in answer["results"]} == {wanted["doc"]}
    code, out, err = cli(capsys, "search", db, wanted["text"], "-k", "2")
    assert code == 0 and "layers_layer3: column layers layer 3, version 1" in out and wanted["id"] in out, err


def test_mistakes_get_one_line_that_names_the_fix(passage_output, tmp_path, capsys):
    output, _ = passage_output
    db = str(tmp_path / "db")
    build_or_update(IndexRequest(str(output), "sentence", db, table="t", index_type="none"))
    with pytest.raises(StrataError, match=r"table t was built with another column 'sentence' \(now 'cls_mid'\), "
                                          r"dims 384 \(now 768\); pass --rebuild"):
        build_or_update(IndexRequest(str(output), "cls_mid", db, table="t"))
    rebuilt = build_or_update(IndexRequest(str(output), "cls_mid", db, table="t", rebuild=True, index_type="none"))
    assert (rebuilt["action"], rebuilt["dims"]) == ("built", 768)
    build_or_update(IndexRequest(str(output), "sentence", db, index_type="none"))  # exact search only
    text = next(iter(passage_output[1].values()))["text"]
    assert search(db, [text], k=1, table_name="sentence").hits[0][0]["text"] == text
    with pytest.raises(StrataError, match="holds tables sentence, t; choose one with --table"):
        search(db, ["anything"])
    with pytest.raises(StrataError, match="no vector column 'nope'; its columns: sentence, layers, cls_mid"):
        build_or_update(IndexRequest(str(output), "nope", db))
    with pytest.raises(OutputError, match="holds no published version"):
        build_or_update(IndexRequest(str(tmp_path), "sentence", db))
    with pytest.raises(StrataError, match="unknown metric 'manhattan'"):
        build_or_update(IndexRequest(str(output), "sentence", db, metric="manhattan"))
    code, _, err = cli(capsys, "index", str(output), "--column", "layers", "--to", db)
    assert code == 1 and err.strip().count("\n") == 0, err
    assert err.startswith("error: column 'layers' stacks 7 layers [0, 1, 2, 3, 4, 5, 6] per row; choose one "
                          "with --layer"), err


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below root (root included) with its size and modification time."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in [root, *root.rglob("*")]}


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert all(fragment in err for fragment in fragments), err


def test_search_only_reads_a_database_that_is_there(indexed, capsys):
    _, docs, db = indexed
    before = tree(db)
    code, out, err = cli(capsys, "search", str(db), "anything", "--table", "nope")
    assert_one_line_error(code, err, f"{db} has no table 'nope'; it holds hnsw, ivf_pq")
    code, out, err = cli(capsys, "search", str(db), next(iter(docs.values()))["text"], "--table", "hnsw", "--json")
    assert code == 0 and json.loads(out)["results"], err
    assert tree(db) == before  # not a lock, a manifest or a cache file more


def test_search_of_a_missing_database_fails_in_one_line_and_creates_nothing(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a database")
    before = tree(tmp_path)
    for name, why in (("no-such-db", "nothing there"), ("parent/no-such-db", "nothing there"),
                      ("a-file", "a file, not a folder")):
        code, _, err = cli(capsys, "search", str(tmp_path / name), "a query")
        assert_one_line_error(code, err, f"no LanceDB database at {tmp_path / name} ({why}); build one with strata "
                                         f"index OUTPUT --column COLUMN --to {tmp_path / name}")
    with pytest.raises(StrataError, match="no LanceDB database at"):
        search(str(tmp_path / "no-such-db"), ["a query"])
    assert tree(tmp_path) == before


def test_index_mistakes_create_no_database(passage_output, tmp_path, capsys):
    output, _ = passage_output
    code, _, err = cli(capsys, "index", str(output), "--column", "nope", "--to", str(tmp_path / "db"))
    assert_one_line_error(code, err, "no vector column 'nope'")
    code, _, err = cli(capsys, "index", str(tmp_path / "no-output"), "--column", "sentence", "--to", str(tmp_path / "db"))
    assert_one_line_error(code, err, "holds no published version")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def object_store(moto_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket="indexes")
    client.put_object(Bucket="indexes", Key="other/file.txt", Body=b"something else")
    return moto_endpoint, client


def test_search_on_object_storage_without_a_database_creates_nothing(object_store, monkeypatch, capsys):
    import s3fs

    endpoint, client = object_store
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems by options, not by the endpoint variable

    def stored() -> dict[str, list[str]]:
        return {bucket["Name"]: [o["Key"] for o in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", [])]
                for bucket in client.list_buckets()["Buckets"]}

    before = stored()
    for uri in ("s3://indexes/no-such-db", "s3://no-such-bucket/db"):
        code, _, err = cli(capsys, "search", uri, "a query")
        assert_one_line_error(code, err, f"no LanceDB database at {uri} (nothing there)")
    assert stored() == before and before["indexes"] == ["other/file.txt"] and "no-such-bucket" not in before


def test_readme_faiss_example_finds_the_exact_neighbours(passage_output):
    output, _ = passage_output
    code = re.search(r"<!-- tested: faiss -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(code.replace('out = "out/passages"', f'out = "{output}"'), namespace)  # noqa: S102 - the README's own code
    rows = current_rows(output, "sentence")
    vectors = unit(rows["sentence"].combine_chunks().flatten().to_numpy().reshape(rows.num_rows, -1))
    by_id = dict(zip(rows["id"].to_pylist(), vectors))
    query = namespace["query"][0] / np.linalg.norm(namespace["query"][0])
    exact = sorted(by_id, key=lambda i: -float(by_id[i] @ query))[:10]
    assert list(namespace["ids"][namespace["rows"][0]]) == exact


# -- a small output that changes ----------------------------------------------------------------

def small_config(corpus: Path, out: Path, normalize: bool = True) -> dict:
    return parse_config({
        "input": {"uri": str(corpus), "keep_fields": ["doc"]}, "model": {"max_length": 48},
        "outputs": [{"name": "sentence", "layers": [-1], "pooling": "mean", "combine": "concat", "normalize": normalize}],
        "output": {"uri": str(out), "precision": "float32"}, "run": {"mode": "incremental"}})


@pytest.fixture
def small(ray_cluster, tmp_path):
    corpus, docs = tmp_path / "corpus", passages()[:240]
    corpus.mkdir()
    shards = {name: docs[i * 80:(i + 1) * 80] for i, name in enumerate(("a.jsonl", "b.jsonl", "c.jsonl"))}
    for name, rows in shards.items():
        write_jsonl(corpus / name, rows)
    assert run(small_config(corpus, tmp_path / "out"))["docs"] == 240
    return corpus, tmp_path / "out", shards


def assert_table_is_the_current_version(db: Path, name: str, output: Path, normalized: bool) -> None:
    table = connect(str(db)).open_table(name).to_arrow().sort_by("id")
    rows = current_rows(output, "sentence")
    assert table["id"].to_pylist() == rows["id"].to_pylist() and table["row"].equals(rows["row"])
    got = table["vector"].combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(got, rows["sentence"].combine_chunks().flatten().to_numpy())
    norms = np.linalg.norm(got.reshape(table.num_rows, -1), axis=1)
    assert np.allclose(norms, 1, atol=1e-4) == normalized


def test_index_follows_incremental_versions_and_rebuilds_on_new_settings(small, tmp_path):
    corpus, out, shards = small
    db = tmp_path / "db"
    assert build_or_update(IndexRequest(str(out), "sentence", str(db)))["rows"] == 240
    a, b = shards["a.jsonl"], shards["b.jsonl"]
    for doc in (a[3], a[40], b[7]):
        doc["text"] = "An edited passage about sockets and pipes, " + doc["text"]
    deleted = [a.pop(10)["id"], a.pop(50)["id"]]  # rows after them move
    b += [{"id": "it's new", "text": "A new passage about vector search indexes.", "doc": "new"}]
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(corpus / name, shards[name])
    second = run(small_config(corpus, out))
    assert (second["version"], second["changed"], second["added"], second["deleted"]) == (2, 3, 1, 2)

    updated = build_or_update(IndexRequest(str(out), "sentence", str(db)))
    assert (updated["action"], updated["from_version"], updated["version"], updated["rows"]) == ("updated", 1, 2, 239)
    assert_table_is_the_current_version(db, "sentence", out, normalized=True)
    ids = set(connect(str(db)).open_table("sentence").to_arrow()["id"].to_pylist())
    assert not ids & set(deleted) and "it's new" in ids
    hits = search(str(db), ["A new passage about vector search indexes.", a[3]["text"]], k=1).hits
    assert [h[0]["id"] for h in hits] == ["it's new", a[3]["id"]] and hits[1][0]["text"] == a[3]["text"]
    assert build_or_update(IndexRequest(str(out), "sentence", str(db)))["action"] == "current"

    third = run(small_config(corpus, out, normalize=False))
    assert third["version"] == 3 and third["docs_this_run"] == 239
    lines = []
    rebuilt = build_or_update(IndexRequest(str(out), "sentence", str(db)), say=lines.append)
    assert rebuilt["action"] == "built" and "version 3 embedded every document again" in lines[0]
    assert_table_is_the_current_version(db, "sentence", out, normalized=False)

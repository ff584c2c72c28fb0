"""Incremental versions end to end through a real local Ray cluster: only what changed is
embedded, every version reads as a whole, a killed version resumes to the same result."""

import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pytest
from rich.console import Console

from pipeline import versions
from pipeline.config import parse_config
from pipeline.errors import InputError
from pipeline.runner import RunFailed, run

from conftest import CORPUS

SHARDS, PER_SHARD = 5, 40  # 200 documents


def make_corpus(folder: Path) -> dict[str, list[dict]]:
    folder.mkdir()
    docs = [json.loads(line) for line in (CORPUS / "part-0.jsonl").read_text().splitlines()]
    docs += [json.loads(line) for line in (CORPUS / "part-0.jsonl").read_text().splitlines()[:60]]
    for i, doc in enumerate(docs[150:], start=150):  # the second pass over the file: new ids and texts
        doc["id"], doc["text"] = f"again-{i}", f"Seen again ({i}): {doc['text']}"
    shards = {f"s{i}.jsonl": docs[i * PER_SHARD:(i + 1) * PER_SHARD] for i in range(SHARDS)}
    write_shards(folder, shards)
    return shards


def write_shards(folder: Path, shards: dict[str, list[dict]]) -> None:
    for name, docs in shards.items():
        (folder / name).write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def change_corpus(folder: Path, shards: dict[str, list[dict]]) -> dict[str, set[str]]:
    """Edit 5 %, add 3 %, delete 2 % of 200 documents over s0-s3 and a new shard; s4 untouched."""
    edited, added, deleted = set(), set(), set()
    for name, rows in (("s0.jsonl", [1, 7, 30, 39]), ("s1.jsonl", [0, 12, 25]), ("s2.jsonl", [5, 6, 20])):
        for row in rows:
            shards[name][row]["text"] += " (edited)"
            edited.add(shards[name][row]["id"])
    for name, rows in (("s2.jsonl", [33, 10]), ("s3.jsonl", [0, 21])):
        for row in rows:  # highest row first, so the others keep their place
            deleted.add(shards[name].pop(row)["id"])
    new = [{"id": f"new-{i}", "text": f"A document that did not exist before, number {i}."} for i in range(6)]
    shards["s1.jsonl"][10:10] = new[:2]  # inserted mid-shard: every later row moves
    shards["s3.jsonl"] += new[2:4]
    shards["s5.jsonl"] = new[4:]
    added = {doc["id"] for doc in new}
    write_shards(folder, {name: docs for name, docs in shards.items() if name != "s4.jsonl"})
    return {"edited": edited, "added": added, "deleted": deleted}


def config(corpus: Path, out: Path, **sections):
    raw = {"input": {"uri": str(corpus)}, "model": {"max_length": 64},
           "outputs": [{"name": "v", "layers": [0, -1], "pooling": "mean", "combine": "stack"}],
           "batching": {"fragment_docs": 16, "token_budget": 2048},
           "output": {"uri": str(out), "precision": "float32"}, "run": {"mode": "incremental"}}
    raw.update(sections)
    return parse_config(raw)


def quiet_run(cfg) -> tuple[dict, str]:
    buffer = io.StringIO()
    summary = run(cfg, console=Console(file=buffer, width=400))
    return summary, buffer.getvalue()


def snapshot_table(out: Path, version: int | None = None):
    table = ds.dataset(versions.files(str(out), version), format="parquet").to_table()
    assert len(set(table["id"].to_pylist())) == table.num_rows, "a document appears twice"
    return table


def by_id(table) -> dict[str, tuple]:
    vectors = np.array(table["v"].to_pylist(), np.float32)
    return {doc_id: (source, row, vector) for doc_id, source, row, vector in
            zip(table["id"].to_pylist(), table["source"].to_pylist(), table["row"].to_pylist(), vectors)}


def assert_same_documents(got, expected):
    got, expected = by_id(got), by_id(expected)
    assert sorted(got) == sorted(expected)
    for doc_id, (source, row, vector) in expected.items():
        assert got[doc_id][:2] == (source, row), doc_id
        np.testing.assert_allclose(got[doc_id][2], vector, atol=1e-4, err_msg=doc_id)


def assert_readme_readers_see(out: Path, docs: int) -> None:
    """The README's two ways of reading the current version, without strata."""
    snapshot = max(glob.glob(f"{out}/_manifest/versions/*.json"))
    table = ds.dataset([f"{out}/{f}" for f in json.load(open(snapshot))["files"]], format="parquet").to_table()
    assert table.num_rows == len(set(table["id"].to_pylist())) == docs
    con = duckdb.connect()
    con.sql(f"""SET VARIABLE files = (
      SELECT [ '{out}/' || f FOR f IN files ]
      FROM read_json('{out}/_manifest/versions/*.json', columns = {{version: 'INTEGER', files: 'VARCHAR[]'}})
      ORDER BY version DESC LIMIT 1)""")
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM read_parquet(getvariable('files'))").fetchone() == \
        (docs, docs)
    rows = con.execute("SELECT id, v FROM read_parquet(getvariable('files')) ORDER BY id").fetchall()
    expected = table.sort_by("id")
    assert [r[0] for r in rows] == expected["id"].to_pylist()
    np.testing.assert_array_equal(np.array([r[1] for r in rows], np.float32), np.array(expected["v"].to_pylist()))


def killed_run(cfg_path: Path, after_commits: int) -> None:
    """`strata run --incremental` in its own session, killed by SIGKILL once it committed some fragments."""
    env = {**os.environ, "STRATA_FAULT": f"kill-run-at:{after_commits}"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg_path), "--incremental"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the local Ray it started
    except ProcessLookupError:
        pass


def test_incremental_versions_embed_only_what_changed(ray_cluster, tmp_path):
    corpus, out, twin = tmp_path / "in", tmp_path / "out", tmp_path / "twin"
    shards = make_corpus(corpus)
    first, _ = quiet_run(config(corpus, out))
    assert (first["version"], first["docs"], first["docs_this_run"], first["published"]) == (1, 200, 200, True)
    v1 = snapshot_table(out)
    shutil.copytree(out, twin)  # the same version 1, for the interrupted run below
    truth = change_corpus(corpus, shards)

    second, log = quiet_run(config(corpus, out))
    assert (second["added"], second["changed"], second["deleted"]) == (6, 10, 4)
    assert second["docs_this_run"] == 16 == 0.08 * 200  # exactly the added and edited documents
    assert (second["version"], second["docs"], second["carried"]) == (2, 202, 186)
    assert "comparing 5 shards with version 1" in log  # s0-s3 and s5; s4 is carried unread
    assert "3 fragments carried from version 1, 5 shards" in log  # s4's fragments; the compared ones are read

    fresh, _ = quiet_run(config(corpus, tmp_path / "fresh", run={"mode": "once"}))
    current = snapshot_table(out)
    assert_same_documents(current, snapshot_table(tmp_path / "fresh"))
    assert fresh["docs"] == current.num_rows == 202
    ids = set(current["id"].to_pylist())
    assert not ids & truth["deleted"] and truth["added"] <= ids
    assert_same_documents(snapshot_table(out, 1), v1)  # version 1 reads as it was
    assert_readme_readers_see(out, 202)
    assert truth["deleted"] <= set(v1["id"].to_pylist())

    third, log = quiet_run(config(corpus, out))
    assert third["docs_this_run"] == 0 and third["version"] == 2 and "nothing to do" in log
    assert versions.list_versions(versions.Location.from_uri(str(out))) == [1, 2]

    # a run killed midway through version 2, then rerun, publishes the same version 2
    cfg_path = tmp_path / "twin.yaml"
    cfg_path.write_text(json.dumps(config(corpus, twin, run={"mode": "once"}).model_dump(mode="json")))  # --incremental
    killed_run(cfg_path, after_commits=2)
    assert versions.list_versions(versions.Location.from_uri(str(twin))) == [1]
    resumed, log = quiet_run(config(corpus, twin))
    committed_before = int(re.search(r"(\d+) fragments? already committed", log).group(1))
    assert committed_before >= 2 and resumed["fragments_this_run"] == second["fragments_this_run"] - committed_before
    assert (resumed["added"], resumed["changed"], resumed["deleted"], resumed["docs"]) == (6, 10, 4, 202)
    unfenced = lambda path: re.sub(r"-g\d+\.parquet$", ".parquet", path)  # files name the lease generation
    assert [unfenced(f) for f in versions.read_snapshot(versions.Location.from_uri(str(twin))).files] == \
        [unfenced(f) for f in versions.read_snapshot(versions.Location.from_uri(str(out))).files]
    assert_same_documents(snapshot_table(twin), current)


def test_changed_settings_re_embed_into_a_new_version_and_gc_keeps_the_newest(ray_cluster, tmp_path):
    corpus, out = tmp_path / "in", tmp_path / "out"
    shards = make_corpus(corpus)
    write_shards(corpus, {name: docs[:8] for name, docs in shards.items()})  # 40 documents
    quiet_run(config(corpus, out))
    normalized = [{"name": "v", "layers": [0, -1], "pooling": "mean", "combine": "stack", "normalize": True}]
    summary, log = quiet_run(config(corpus, out, outputs=normalized))
    assert (summary["version"], summary["docs_this_run"]) == (2, 40)
    assert "embedding every document again: the settings changed: outputs.0.normalize: False → True" in log
    norms = np.linalg.norm(np.array(snapshot_table(out)["v"].to_pylist()), axis=-1)
    np.testing.assert_allclose(norms, 1, atol=1e-4)
    old_files = versions.read_snapshot(versions.Location.from_uri(str(out)), 1).files

    report = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out), "--json"],
                                       capture_output=True, text=True).stdout)
    assert report["current_version"] == 2
    assert [(v["version"], v["kind"], v["embedded"], v["docs"]) for v in report["versions"]] == [
        (1, "first", 40, 40), (2, "full", 40, 40)]

    strata = lambda *args: subprocess.run([sys.executable, "-m", "pipeline.cli", *args],  # noqa: E731
                                          capture_output=True, text=True)
    result = strata("gc", str(out), "--keep", "1", "--dry-run")
    assert "would remove version 1: 5 fragments" in result.stderr and all((out / p).exists() for p in old_files)
    result = strata("gc", str(out), "--keep", "1")
    assert result.returncode == 0 and "removed version 1: 5 fragments, 5 data files" in result.stderr
    assert not any((out / path).exists() for path in old_files)
    assert versions.list_versions(versions.Location.from_uri(str(out))) == [2]
    assert snapshot_table(out).num_rows == 40
    import gzip

    (corpus / "s9.jsonl.gz").write_bytes(gzip.compress(b'{"id": "x", "text": "cut short"}\n' * 50)[:40])
    with pytest.raises(RunFailed, match=r"0 fragments and 1 shard could not be embedded \(s9.jsonl.gz"):
        run(config(corpus, out, outputs=normalized), console=Console(file=io.StringIO()))
    assert versions.list_versions(versions.Location.from_uri(str(out))) == [2]  # readers still get version 2
    (corpus / "s9.jsonl.gz").unlink()
    with pytest.raises(InputError, match=r"changed since version 2 .* `strata run --incremental` embeds only what "
                                         r"changed into version 3"):
        shards["s0.jsonl"][0]["text"] += "!"
        write_shards(corpus, {"s0.jsonl": shards["s0.jsonl"][:8]})
        run(config(corpus, out, outputs=normalized, run={"mode": "once"}))


def test_a_model_folder_whose_config_or_tokenizer_changed_is_embedded_again(ray_cluster, tmp_path):
    """The weights are not all of a model: config.json (an activation), the tokenizer's files and
    the folder's code change every vector too. An incremental run re-embeds everything, a once
    run refuses the output, as for any other changed setting."""
    from pipeline.errors import OutputError
    from pipeline.model import default_model_path

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    corpus, out = tmp_path / "in", tmp_path / "out"
    shards = make_corpus(corpus)
    write_shards(corpus, {name: docs[:4] for name, docs in shards.items()})  # 20 documents
    cfg = config(corpus, out, model={"name_or_path": str(model), "max_length": 64})
    quiet_run(cfg)
    before = snapshot_table(out)

    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "hidden_act": "relu"}))  # same weights
    summary, log = quiet_run(cfg)
    assert (summary["version"], summary["docs_this_run"]) == (2, 20)
    assert "embedding every document again: the settings changed: model_files_sha256: " in log
    after = by_id(snapshot_table(out))
    assert all(np.abs(after[doc][2] - vector).max() > 1e-3 for doc, (_, _, vector) in by_id(before).items())

    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(OutputError, match=r"holds a run made with different settings \(model_files_sha256: "):
        run(config(corpus, out, model={"name_or_path": str(model), "max_length": 64}, run={"mode": "once"}),
            console=Console(file=io.StringIO()))


def test_an_output_made_before_strata_recorded_the_model_files_keeps_its_versions(ray_cluster, tmp_path,
                                                                                   monkeypatch):
    from pipeline import runner

    corpus, out = tmp_path / "in", tmp_path / "out"
    shards = make_corpus(corpus)
    write_shards(corpus, {name: docs[:4] for name, docs in shards.items()})
    identity = runner.Plan.identity.fget
    with monkeypatch.context() as older:  # what an older strata recorded: the weights' sha256 only
        older.setattr(runner.Plan, "identity", property(
            lambda plan: {k: v for k, v in identity(plan).items() if k != "model_files_sha256"}))
        quiet_run(config(corpus, out))
    assert "model_files_sha256" not in versions.read_snapshot(versions.Location.from_uri(str(out))).identity
    summary, log = quiet_run(config(corpus, out))
    assert summary["version"] == 1 and "no shard changed since it was published; nothing to do" in log

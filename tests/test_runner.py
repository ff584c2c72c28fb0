"""End to end through a real local Ray cluster: shards in, partitioned Parquet + manifest out."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import OutputSpec, parse_config
from pipeline.embedder import Embedder
from pipeline.errors import InputError, OutputError
from pipeline.lease import LeaseLost
from pipeline.spec import EmbedSettings, resolve_output
from pipeline.runner import RunFailed, run
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS

OUTPUTS = [
    {"name": "sentence", "layers": [-1], "pooling": "mean", "combine": "concat", "normalize": True},
    {"name": "layers_mean", "layers": "all", "pooling": "mean", "combine": "stack"},
]


def small_corpus(folder: Path, docs_per_shard=(14, 9)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = (CORPUS / "part-0.jsonl").read_text().splitlines()
    start = 0
    for i, count in enumerate(docs_per_shard):
        (folder / f"s{i}.jsonl").write_text("\n".join(lines[start : start + count]) + "\n")
        start += count
    return folder


def config(input_uri, output_uri, **sections):
    raw = {"input": {"uri": str(input_uri)}, "model": {"max_length": 64}, "outputs": OUTPUTS,
           "batching": {"fragment_docs": 5, "token_budget": 1024}, "output": {"uri": str(output_uri)}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw)


def read_output(out: Path) -> pa.Table:
    return ds.dataset(out / "data", partitioning="hive").to_table()


def data_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "data").rglob("*.parquet")}


def test_end_to_end_run_resume_and_recompute_one_fragment(ray_cluster, tmp_path):
    corpus, out = small_corpus(tmp_path / "in"), tmp_path / "out"
    cfg = config(corpus, out)
    summary = run(cfg)
    assert summary["docs"] == 23 and summary["quarantined"] == 0 and summary["fragments"] == "5 / 5"

    table = read_output(out)
    assert table.num_rows == 23
    assert len(set(table["id"].to_pylist())) == 23
    assert set(table["source"].to_pylist()) == {"s0.jsonl", "s1.jsonl"}
    assert table.schema.field("sentence").type == pa.list_(pa.float16(), 384)
    assert table.schema.field("layers_mean").type == pa.list_(pa.list_(pa.float16(), 384), 7)
    assert (out / "data" / "source=s0.jsonl").is_dir()
    meta = pq.read_schema(next((out / "data").rglob("*.parquet"))).metadata
    assert json.loads(meta[b"strata.layers"]) == {"sentence": [6], "layers_mean": [0, 1, 2, 3, 4, 5, 6]}
    run_json = json.loads((out / "_manifest" / "run.json").read_text())
    assert meta[b"strata.config_fingerprint"].decode() == run_json["fingerprint"]
    assert run_json["identity"]["model_weights_sha256"] == run_json["model"]["weights_sha256"]
    assert run_json["model"]["num_layers"] == 6 and len(run_json["model"]["weights_sha256"]) == 64
    assert run_json["summary"]["docs"] == 23
    assert len(list((out / "_manifest" / "fragments").glob("*.json"))) == 5

    # vectors equal the plain embedder's on the same texts, rounded to float16
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in (corpus / "s0.jsonl").read_text().splitlines()}
    ids = sorted(texts)[:6]
    model = run_json["model"]
    from pipeline.model import ModelInfo

    info = ModelInfo(**model)
    outputs = tuple(resolve_output(spec, 6) for spec in cfg.outputs)
    windows = TextTokenizer(info.path, 64).encode([texts[i] for i in ids])
    direct = Embedder(EmbedSettings(info, outputs, "float32", 1024, "float16"), torch.device("cpu"))
    expected = direct.embed(windows).vectors
    rows = {r["id"]: r for r in table.filter(pa.compute.is_in(table["id"], pa.array(ids))).to_pylist()}
    for k, doc_id in enumerate(ids):
        np.testing.assert_allclose(np.array(rows[doc_id]["sentence"], np.float32), expected["sentence"][k], atol=2e-3)
        np.testing.assert_allclose(np.array(rows[doc_id]["layers_mean"], np.float32),
                                   expected["layers_mean"][k], atol=2e-3)

    # a rerun of a finished run does no work and touches no file
    before = data_files(out)
    again = run(cfg)
    assert again["fragments_this_run"] == 0 and again["docs"] == 23
    assert data_files(out) == before

    # a version not yet published that lost one commit record recomputes exactly that fragment
    (out / "_manifest" / "versions" / "00000001.json").unlink()
    record = sorted((out / "_manifest" / "fragments").glob("*.json"))[2]
    lost = json.loads(record.read_text())
    record.unlink()
    third = run(cfg)
    assert third["fragments_this_run"] == 1 and third["docs_this_run"] == lost["docs"] and third["published"]
    after = data_files(out)
    redone = json.loads(record.read_text())  # written anew, its files named by this run's lease generation
    assert redone["lease_generation"] > lost["lease_generation"] and set(redone["files"]).isdisjoint(lost["files"])
    assert set(after) == set(before) - set(lost["files"]) | set(redone["files"])  # the superseded files are gone
    assert all(after[name] == before[name] for name in set(before) - set(lost["files"]))  # the rest untouched
    assert read_output(out).num_rows == 23  # data/ read alone: every document once


def test_quarantine_reconciles_and_error_budget_fails_the_run(ray_cluster, tmp_path):
    corpus = small_corpus(tmp_path / "in", docs_per_shard=(6,))
    with open(corpus / "s0.jsonl", "a") as f:
        f.write('{"id": "bad-json"\n{"id": "no-text"}\n\n{"id": "empty", "text": ""}\n')
    out = tmp_path / "out"
    summary = run(config(corpus, out, run={"max_error_rate": 0.5}))
    assert (summary["docs"], summary["quarantined"], summary["blank"]) == (6, 3, 1)
    quarantine = ds.dataset(out / "quarantine").to_table()
    reasons = sorted(quarantine["reason"].to_pylist())
    assert reasons[0] == "'text' is empty or whitespace"
    assert reasons[1].startswith("malformed JSON")
    assert reasons[2] == "no 'text' field"
    assert sorted(quarantine["id"].to_pylist()) == ["empty", "no-text", "s0.jsonl#6"]
    with pytest.raises(RunFailed, match=r"3 of 9 documents were quarantined"):
        run(config(corpus, tmp_path / "strict", run={"max_error_rate": 0.01}))


def test_partition_by_keep_field_and_none(ray_cluster, tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    with open(corpus / "s.jsonl", "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": str(i), "text": f"document number {i}", "lang": ["en", "fr/be", None][i % 3]}) + "\n")
    out = tmp_path / "by-lang"
    run(config(corpus, out, input={"keep_fields": ["lang"]}, output={"partition_by": "lang"}))
    table = read_output(out)
    assert sorted(zip(table["id"].to_pylist(), table["lang"].to_pylist())) == [
        (str(i), ["en", "fr/be", None][i % 3]) for i in range(7)]
    assert (out / "data" / "lang=fr%2Fbe").is_dir()
    flat = tmp_path / "flat"
    run(config(corpus, flat, output={"partition_by": "none"}))
    assert {p.parent.name for p in (flat / "data").rglob("*.parquet")} == {"data"}
    assert ds.dataset(flat / "data").count_rows() == 7


def test_resuming_with_other_vector_settings_is_refused(ray_cluster, tmp_path, model_info):
    corpus, out = small_corpus(tmp_path / "in", docs_per_shard=(3,)), tmp_path / "out"
    model = tmp_path / "model"
    shutil.copytree(model_info.path, model)
    run(config(corpus, out, model={"name_or_path": str(model), "max_length": 64}))
    same = {"model": {"name_or_path": str(model), "max_length": 64}}
    run(config(corpus, out, compute={"replicas": 1}, batching={"token_budget": 512}, **same))  # allowed
    with pytest.raises(OutputError, match="different settings .output.precision: 'float16' → 'float32'"):
        run(config(corpus, out, output={"precision": "float32"}, **same))
    changed_pooling = [{**OUTPUTS[0]}, {**OUTPUTS[1], "pooling": "cls"}]
    with pytest.raises(OutputError, match="outputs.1.pooling: 'mean' → 'cls'.*use a new output.uri"):
        run(config(corpus, out, outputs=changed_pooling, **same))
    with pytest.raises(OutputError, match="batching.fragment_docs: 5 → 2"):  # would cut other fragments
        run(config(corpus, out, batching={"fragment_docs": 2}, **same))
    with open(model / "model.safetensors", "ab") as f:  # same folder, other weights
        f.write(b"\0")
    with pytest.raises(OutputError, match="model_weights_sha256"):
        run(config(corpus, out, **same))


def test_once_mode_refuses_a_changed_input_and_an_unfinished_version_follows_it(ray_cluster, tmp_path):
    """run.mode once: after version 1 is published a new, edited or deleted shard is refused (naming
    --incremental) and the output stays as it was; before, a rerun embeds the input as it is now and
    removes the rows of shards that changed under it."""
    corpus, out = small_corpus(tmp_path / "in", docs_per_shard=(7, 4)), tmp_path / "out"
    run(config(corpus, out))
    vector_before = {r["id"]: r["sentence"] for r in read_output(out).to_pylist()}
    lines = (CORPUS / "part-0.jsonl").read_text().splitlines()
    (corpus / "s2.jsonl").write_text("\n".join(lines[40:46]) + "\n")
    original = (corpus / "s1.jsonl").read_text()
    edited_id = json.loads(original.splitlines()[2])["id"]
    edited = original.replace(json.loads(original.splitlines()[2])["text"][:20], "an edited opening....", 1)
    (corpus / "s1.jsonl").write_text(edited)  # same rows, other text: only the shard's version tells
    manifest_files = lambda: {p: p.read_bytes() for p in (out / "_manifest").rglob("*")  # the lease is taken and
                              if p.is_file() and p.name != "lease.json"}  # released: the rest stays as it was
    before = manifest_files()
    with pytest.raises(InputError, match=r"input changed since version 1 .*: 2 shards new, edited or deleted "
                                         r"\(s1.jsonl, s2.jsonl\); `strata run --incremental` embeds only what changed"):
        run(config(corpus, out))
    assert manifest_files() == before  # a refused run leaves the output as it was

    (out / "_manifest" / "versions" / "00000001.json").unlink()  # as if version 1 was never finished
    summary = run(config(corpus, out))
    assert (summary["docs"], summary["docs_this_run"], summary["published"]) == (17, 10, True)
    table = read_output(out)  # data/ alone holds no stale rows of the edited shard
    expected = [json.loads(line)["id"] for line in lines[:11] + lines[40:46]]
    assert sorted(table["id"].to_pylist()) == sorted(expected)
    after = {r["id"]: r["sentence"] for r in table.to_pylist()}
    assert after[edited_id] != vector_before[edited_id]
    untouched = {json.loads(line)["id"] for line in lines[:7]}  # s0's fragments were kept as they were
    assert all(after[i] == vector_before[i] for i in untouched)


def test_windows_as_rows_and_token_level_outputs_through_ray(ray_cluster, tmp_path):
    corpus, out = small_corpus(tmp_path / "in", docs_per_shard=(4, 3)), tmp_path / "out"
    outputs = [{"name": "doc", "layers": "-2:", "pooling": "mean", "combine": "mean", "normalize": True},
               {"name": "tokens", "layers": [-1], "pooling": "none", "combine": "concat"},
               {"name": "words", "layers": [-4, -1], "pooling": "none", "combine": "sum", "words": "mean"}]
    cfg = config(corpus, out, outputs=outputs, model={"max_length": 24},
                 long_text={"strategy": "sliding_window", "stride": 6, "aggregate": "none"})
    summary = run(cfg)
    assert summary["docs"] == 7 and summary["fragments"] == "2 / 2"

    table = read_output(out).sort_by([("id", "ascending"), ("window", "ascending")])
    assert table.num_rows > 7 * 3  # real documents are many 24-token windows
    assert table.schema.field("window").type == pa.int32()
    assert table.schema.field("doc").type == pa.list_(pa.float16(), 384)
    assert table.schema.field("tokens").type == pa.list_(pa.list_(pa.float16(), 384))
    assert table.schema.field("tokens_offsets").type == pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())]))
    assert not any(table["truncated"].to_pylist())

    texts = {}
    for shard in ("s0.jsonl", "s1.jsonl"):
        for line in (corpus / shard).read_text().splitlines():
            texts[json.loads(line)["id"]] = json.loads(line)["text"]
    assert set(table["id"].to_pylist()) == set(texts)
    for doc_id, text in texts.items():
        rows = table.filter(pa.compute.equal(table["id"], doc_id)).to_pylist()
        assert [r["window"] for r in rows] == list(range(len(rows)))
        assert all(r["n_tokens"] <= 24 and len(r["tokens"]) == r["n_tokens"] - 2 for r in rows)
        for r in rows:
            span = r["window_span"]
            window_text = text[span["start"] : span["end"]]
            assert [text[o["start"] : o["end"]] for o in r["tokens_offsets"]][0] in window_text
            assert len(r["words"]) == len(r["words_offsets"]) <= len(r["tokens"])
            assert all(" " not in text[o["start"] : o["end"]] for o in r["words_offsets"])
    record = json.loads((out / "_manifest" / "run.json").read_text())
    assert {name: o["per"] for name, o in record["outputs"].items()} == {"doc": "window", "tokens": "token",
                                                                         "words": "word"}


def test_driver_and_cpu_steps_never_import_torch(model_info):
    """Read, tokenize and write workers (and the driver) load the job without torch: it costs
    ~1.5 s of start-up and ~190 MB per worker process, and only model replicas need it."""
    from pipeline.config import InputConfig
    from pipeline.stages import JobSpec

    settings = EmbedSettings(model_info, (resolve_output(OutputSpec(name="v"), model_info.num_layers),), "auto",
                             1024, "float16")
    job = pickle.dumps(JobSpec(InputConfig(uri=str(CORPUS)), settings, "out", "source", {}))
    code = ("import pickle, sys; import pipeline.cli, pipeline.runner, pipeline.ray_pipeline; "
            "job = pickle.loads(sys.stdin.buffer.read()); assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], input=job, check=True)


# --- strata never deletes what it did not write, and never reads its own output ---

def test_an_output_among_files_strata_did_not_write_is_refused_and_they_stay(tmp_path):
    corpus = small_corpus(tmp_path / "in")
    out = tmp_path / "existing"
    user_files = {out / "data" / "lang=en" / "user.parquet": b"PAR1 user data", out / "quarantine" / "keep.parquet": b"k",
                  out / "data" / ".gitkeep": b""}
    for path, content in user_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    with pytest.raises(OutputError, match=r"is not empty and is not a strata output \(it holds data/\.gitkeep, "):
        run(config(corpus, out))
    assert all(path.read_bytes() == content for path, content in user_files.items())
    assert not (out / "_manifest").exists()  # refused before anything was written


@pytest.mark.parametrize("input_at, output_at", [
    ("proj/data", "proj"),  # the input inside the output: its clean-up would have deleted the corpus
    ("corpus", "corpus/emb"),  # the output inside the input: the next run would read its own Parquet
    ("corpus/*.jsonl", "corpus/emb"),
])
def test_an_input_and_output_that_contain_each_other_are_refused(tmp_path, input_at, output_at):
    corpus = small_corpus(tmp_path / input_at.split("*")[0])
    pq.write_table(pa.table({"text": ["a document in Parquet"]}), corpus / "corpus.parquet")
    before = sorted(p.name for p in corpus.iterdir())
    with pytest.raises(Exception, match=r"output\.uri .* and input\.uri .* overlap"):
        run(config(tmp_path / input_at, tmp_path / output_at))
    assert sorted(p.name for p in corpus.iterdir()) == before


def test_a_model_replica_that_cannot_start_ends_the_run_in_one_line(ray_cluster, tmp_path, model_info):
    model = tmp_path / "model"
    shutil.copytree(model_info.path, model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # the driver hashes it; loading fails
    cfg = config(small_corpus(tmp_path / "in"), tmp_path / "out", model={"name_or_path": str(model)})
    with pytest.raises(RunFailed) as failed:
        run(cfg)
    message = str(failed.value)
    assert message.startswith("a model replica cannot start: SafetensorError: ") and "\n" not in message
    assert "\x1b" not in message and "rerun once it is" in message
    assert not list((tmp_path / "out" / "_manifest" / "failures").glob("*.json"))  # no fragment is to blame


def test_a_version_is_never_published_with_files_that_are_gone(ray_cluster, tmp_path):
    corpus, out = small_corpus(tmp_path / "in"), tmp_path / "out"
    cfg = config(corpus, out)
    stop = threading.Event()

    def delete_after_two_commits():
        while not stop.is_set():
            if len(list((out / "_manifest" / "fragments").glob("*.json"))) >= 2:
                shutil.rmtree(out, ignore_errors=True)  # rm -rf OUT, as a user or a cleaner might
                return
            time.sleep(0.05)

    deleter = threading.Thread(target=delete_after_two_commits)
    deleter.start()
    try:
        # the run finds the files gone at publishing, or its lease gone with them as it renews
        with pytest.raises((RunFailed, LeaseLost), match=r"not published: .* gone from the output|could not be "
                                                         r"embedded|the lease was removed or replaced"):
            run(cfg)
    finally:
        stop.set()
        deleter.join()
    assert not list((out / "_manifest" / "versions").glob("*.json"))
    summary = run(cfg)  # the rerun embeds what was lost and publishes a whole version
    snapshot = json.loads(sorted((out / "_manifest" / "versions").glob("*.json"))[-1].read_text())
    assert summary["published"] and all((out / f).is_file() for f in snapshot["files"])
    assert sorted(read_output(out)["id"].to_pylist()) == sorted(
        json.loads(line)["id"] for p in sorted(corpus.glob("*.jsonl")) for line in p.read_text().splitlines())


def test_an_output_inside_another_strata_output_is_refused(tmp_path):
    outer = tmp_path / "outer"
    (outer / "_manifest").mkdir(parents=True)
    (outer / "_manifest" / "run.json").write_text("{}")
    with pytest.raises(Exception, match=r"lies inside the strata output .*outer"):
        run(config(small_corpus(tmp_path / "in"), outer / "data" / "extra"))
    assert not (outer / "data").exists()


def test_vectors_that_overflow_their_precision_are_quarantined_not_stored(ray_cluster, tmp_path):
    corpus, out = small_corpus(tmp_path / "in", docs_per_shard=(4,)), tmp_path / "out"
    loud = {"name": "loud", "layers": [-1, -2], "pooling": "mean", "combine": "weighted", "weights": [1e5, 1e5]}
    with pytest.raises(RunFailed, match=r"4 of 4 documents were quarantined"):
        run(config(corpus, out, outputs=[loud]))
    reasons = [q["reason"] for q in ds.dataset(out / "quarantine").to_table().to_pylist()]
    assert len(reasons) == 4 and all(r.startswith("its vectors are not finite (inf or NaN: beyond float16's range")
                                     for r in reasons)

"""Object storage end to end against a real S3 API: moto's server on 127.0.0.1."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow.dataset as ds
import pytest
import s3fs

from pipeline.config import parse_config
from pipeline.runner import run

from conftest import CORPUS, cli, write_config


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    endpoint = moto_endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="corpus")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.put(str(CORPUS) + "/", "corpus/in/", recursive=True)
    yield endpoint, fs


def cfg(endpoint, input_uri, output_uri, **extra):
    return parse_config({"input": {"uri": input_uri}, "model": {"max_length": 32},
                         "outputs": [{"name": "v", "layers": [-1], "pooling": "mean", "combine": "concat"}],
                         "batching": {"fragment_docs": 100}, "output": {"uri": output_uri},
                         "storage": {"endpoint_url": endpoint}, **extra})


def strata(*args, endpoint=None, env=None, timeout=300):
    env = {**os.environ, **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {}), **(env or {})}
    env = {key: value for key, value in env.items() if value != ""}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_s3_to_s3_run_status_resume_and_pyarrow_read(ray_cluster, s3):
    endpoint, fs = s3
    summary = run(cfg(endpoint, "s3://corpus/in/", "s3://corpus/out"))
    assert summary["docs"] == 300 and summary["fragments"] == "4 / 4"
    table = ds.dataset("corpus/out/data", filesystem=fs, partitioning="hive").to_table()
    assert table.num_rows == 300 and len(set(table["id"].to_pylist())) == 300
    assert sorted(set(table["source"].to_pylist())) == ["part-0.jsonl", "part-1.jsonl.gz"]
    assert len(fs.ls("corpus/out/_manifest/fragments")) == 4

    again = run(cfg(endpoint, "s3://corpus/in/", "s3://corpus/out"))
    assert again["fragments_this_run"] == 0

    status = strata("status", "s3://corpus/out", "--json", endpoint=endpoint)  # endpoint from AWS_ENDPOINT_URL
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["docs"] == 300 and report["fragments_committed"] == 4
    manifest_text = fs.cat("corpus/out/_manifest/run.json").decode()
    assert "testing-secret" not in manifest_text


def test_s3_input_to_local_output_and_back(ray_cluster, s3, tmp_path):
    endpoint, fs = s3
    local = tmp_path / "out"
    assert run(cfg(endpoint, "s3://corpus/in/part-0.jsonl", str(local)))["docs"] == 150
    assert ds.dataset(local / "data", partitioning="hive").count_rows() == 150
    assert run(cfg(endpoint, str(CORPUS / "part-1.jsonl.gz"), "s3://corpus/from-local"))["docs"] == 150
    assert ds.dataset("corpus/from-local/data", filesystem=fs, partitioning="hive").count_rows() == 150


@pytest.mark.parametrize("case", ["wrong bucket", "unreachable endpoint", "missing credentials"])
def test_bad_object_storage_fails_fast_with_one_line(s3, tmp_path, case):
    endpoint, _ = s3
    input_uri = "s3://no-such-bucket/in/" if case == "wrong bucket" else "s3://corpus/in/"
    if case == "unreachable endpoint":
        endpoint = "http://127.0.0.1:9"  # discard port: nothing listens
    env = {}
    if case == "missing credentials":
        env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
               "AWS_CONFIG_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}
    path = write_config(tmp_path / "c.yaml", input={"uri": input_uri}, output={"uri": str(tmp_path / "out")},
                        storage={"endpoint_url": endpoint, "retries": 1, "connect_timeout": 2})
    started = time.monotonic()
    result = strata("run", str(path), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert time.monotonic() - started < 60
    print(case, "->", lines[0], f"({time.monotonic() - started:.1f} s)")


def test_an_output_bucket_that_does_not_exist_is_one_line_and_never_created(s3, tmp_path):
    endpoint, fs = s3
    path = write_config(tmp_path / "c.yaml", input={"uri": str(CORPUS / "part-0.jsonl")},
                        output={"uri": "s3://typo-bucket/out"}, storage={"endpoint_url": endpoint})
    for command in ("validate", "run"):
        result = strata(command, str(path))
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, result.stdout[-2000:] + result.stderr
        assert lines[0] == ("error: output.uri s3://typo-bucket/out: bucket typo-bucket does not exist; strata never "
                            "creates buckets: create it, or fix output.uri")
        fs.invalidate_cache()
        assert "typo-bucket" not in [b.rstrip("/") for b in fs.ls("")]


def test_model_folder_from_s3_is_cached_verified_and_gives_the_same_vectors(ray_cluster, s3, model_info, tmp_path):
    endpoint, fs = s3
    fs.put(model_info.path.rstrip("/") + "/", "corpus/models/minilm/", recursive=True)
    remote = cfg(endpoint, str(CORPUS / "part-0.jsonl"), str(tmp_path / "remote"),
                 model={"name_or_path": "s3://corpus/models/minilm/", "max_length": 32})
    local = cfg(endpoint, str(CORPUS / "part-0.jsonl"), str(tmp_path / "local"))
    run(remote)
    run(local)
    record = json.loads((tmp_path / "remote" / "_manifest" / "run.json").read_text())
    assert record["model"]["weights_sha256"] == model_info.weights_sha256
    assert record["model"]["path"].startswith(os.environ["STRATA_CACHE"])
    a = ds.dataset(tmp_path / "remote" / "data", partitioning="hive").to_table().sort_by("id")
    b = ds.dataset(tmp_path / "local" / "data", partitioning="hive").to_table().sort_by("id")
    assert a["v"].to_pylist() == b["v"].to_pylist()
    cached = list((Path(os.environ["STRATA_CACHE"]) / "models").iterdir())
    assert len([c for c in cached if ".tmp-" not in c.name]) == 1  # fetched once, driver and workers alike


def test_killed_runs_on_s3_resume_to_every_document_once(straight_run_of_resume_corpus, s3, tmp_path):
    from test_resume import DOCS, config, kill_repeatedly, start, vectors_by_id

    endpoint, fs = s3
    source, straight = straight_run_of_resume_corpus
    killed = config(tmp_path, "killed", source, output="s3://corpus/killed", storage={"endpoint_url": endpoint})
    commits = lambda: len(fs.ls("corpus/killed/_manifest/fragments", refresh=True)) if fs.exists(  # noqa: E731
        "corpus/killed/_manifest/fragments") else 0
    kill_repeatedly(killed, commits, 1, random.Random(11))
    final = start(killed)
    assert final.wait(timeout=600) == 0, final.stderr.read()
    expected, got = vectors_by_id(straight), vectors_by_id("corpus/killed", fs)
    assert len(got) == DOCS and got.keys() == expected.keys()
    for doc_id, vector in expected.items():
        np.testing.assert_array_equal(got[doc_id], vector)


def test_a_flaky_store_loses_and_duplicates_nothing(ray_cluster, s3, tmp_path):
    from flaky_proxy import FlakyProxy

    endpoint, fs = s3
    proxy = FlakyProxy(endpoint, fail_every=5, reset_every=11)
    try:
        summary = run(cfg(proxy.url, "s3://corpus/in/", "s3://corpus/flaky", storage={
            "endpoint_url": proxy.url, "retries": 8, "connect_timeout": 5}))
    finally:
        proxy.stop()
    assert proxy.failed >= 5 and proxy.reset >= 2  # the faults really happened
    assert summary["docs"] == 300 and summary["fragments"] == "4 / 4"
    ids = ds.dataset("corpus/flaky/data", filesystem=fs, partitioning="hive").to_table(columns=["id"])["id"]
    assert len(ids) == 300 and len(set(ids.to_pylist())) == 300


def test_incremental_version_on_s3_carries_copies_and_collects(ray_cluster, s3):
    from pipeline import versions
    from pipeline.incremental import changes_name

    endpoint, fs = s3
    lines = (CORPUS / "part-0.jsonl").read_text().splitlines()[:40]
    fs.pipe("corpus/inc/a.jsonl", ("\n".join(lines) + "\n").encode())
    incremental = {"run": {"mode": "incremental"}}
    assert run(cfg(endpoint, "s3://corpus/inc/", "s3://corpus/inc-out", **incremental))["docs"] == 40
    edited = json.loads(lines[5])
    edited["text"] += " (edited)"
    fs.pipe("corpus/inc/a.jsonl", ("\n".join(lines[:5] + [json.dumps(edited)] + lines[7:]) + "\n").encode())
    second = run(cfg(endpoint, "s3://corpus/inc/", "s3://corpus/inc-out", **incremental))
    assert (second["version"], second["changed"], second["deleted"], second["docs_this_run"]) == (2, 1, 1, 1)
    files = versions.files("s3://corpus/inc-out", storage=cfg(endpoint, "x", "y").storage)
    assert all(f.startswith("s3://corpus/inc-out/data/") for f in files)
    table = ds.dataset([f.removeprefix("s3://") for f in files], filesystem=fs).to_table()
    assert sorted(table["id"].to_pylist()) == sorted(json.loads(line)["id"] for line in lines[:6] + lines[7:])
    gc = strata("gc", "s3://corpus/inc-out", "--keep", "1", endpoint=endpoint)
    assert gc.returncode == 0 and "removed version 1: 1 fragment, 1 data file" in gc.stderr, gc.stderr
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.find("corpus/inc-out/_manifest/versions")] == [
        "00000002.json", changes_name("a.jsonl")]
    assert ds.dataset([f.removeprefix("s3://") for f in files], filesystem=fs).count_rows() == 39


def test_index_on_object_storage_and_search_it(ray_cluster, s3, monkeypatch, capsys):
    endpoint, fs = s3
    assert run(cfg(endpoint, "s3://corpus/in/part-0.jsonl", "s3://corpus/idx-out"))["docs"] == 150
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # as users point the CLI at their store
    code, _, err = cli(capsys, "index", "s3://corpus/idx-out", "--column", "v", "--to", "s3://corpus/index")
    assert code == 0 and "indexed version 1 of s3://corpus/idx-out (150 rows" in err, err
    assert any(path.endswith(".lance") for path in fs.find("corpus/index/v.lance"))
    doc = json.loads((CORPUS / "part-0.jsonl").read_text().splitlines()[20])
    code, out, err = cli(capsys, "search", "s3://corpus/index", doc["text"], "-k", "2", "--json")
    assert code == 0, err
    first = json.loads(out)["results"][0]
    assert (first["id"], first["source"], first["text"]) == (doc["id"], "part-0.jsonl", doc["text"])

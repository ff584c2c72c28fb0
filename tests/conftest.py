"""Shared fixtures: one real local Ray cluster for the session, the packaged model, sample data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The S3 tests talk to moto on 127.0.0.1 only; set before Ray starts so its workers inherit them
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["STRATA_CACHE"] = tempfile.mkdtemp(prefix="strata-cache-")  # models fetched from S3 land here

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "corpus"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from pipeline.ray_pipeline import ensure_ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1 for the session; tests use buckets of their own."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def model_info():
    from pipeline.config import ModelConfig
    from pipeline.model import resolve_model

    return resolve_model(ModelConfig())


@pytest.fixture
def corpus_copy(tmp_path) -> Path:
    """A private copy of the sample corpus, so a test may add or break shards."""
    target = tmp_path / "corpus"
    shutil.copytree(CORPUS, target)
    return target


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def passages() -> list[dict]:
    """About 2,000 distinct real passages: the sample corpus split at sentences and paragraphs,
    each with the id of the document it comes from (`doc`)."""
    import gzip
    import json
    import re

    docs = [json.loads(line) for line in (CORPUS / "part-0.jsonl").read_text().splitlines()]
    docs += [json.loads(line) for line in gzip.open(CORPUS / "part-1.jsonl.gz", "rt")]
    seen, found = set(), []
    for doc in docs:
        for i, part in enumerate(re.split(r"(?<=[.!?])\s+|\n\s*\n", doc["text"])):
            text = " ".join(part.split())
            if len(text) >= 40 and text not in seen:
                seen.add(text)
                found.append({"id": f"{doc['id']}/{i}", "text": text, "doc": doc["id"]})
    return found


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return path


@pytest.fixture(scope="session")
def passage_output(ray_cluster, tmp_path_factory):
    """A run over ~2,000 passages: a sentence vector, all layers stacked, CLS of two middle layers
    concatenated; sliding windows of 64 tokens, so long passages are embedded as several windows."""
    from pipeline.config import parse_config
    from pipeline.runner import run

    root = tmp_path_factory.mktemp("passages")
    docs = passages()
    write_jsonl(root / "passages.jsonl", docs)
    cfg = parse_config({
        "input": {"uri": str(root / "passages.jsonl"), "keep_fields": ["doc"]},
        "model": {"max_length": 64},
        "outputs": [{"name": "sentence", "layers": [-1], "pooling": "mean", "combine": "concat", "normalize": True},
                    {"name": "layers", "layers": "all", "pooling": "mean", "combine": "stack"},
                    {"name": "cls_mid", "layers": [2, 3], "pooling": "cls", "combine": "concat"}],
        "long_text": {"strategy": "sliding_window", "stride": 16},
        "batching": {"fragment_docs": 1024},
        "output": {"uri": str(root / "out"), "precision": "float32"},
    })
    assert run(cfg)["docs"] == len(docs)
    return root / "out", {doc["id"]: doc for doc in docs}


@pytest.fixture(scope="session")
def straight_run_of_resume_corpus(ray_cluster, tmp_path_factory):
    """(corpus, output) of the uninterrupted run that the kill-and-resume tests compare with."""
    from test_resume import config, corpus, straight_run

    root = tmp_path_factory.mktemp("resume")
    source = corpus(root / "in")
    straight_run(config(root, "straight", source))
    return source, root / "straight"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`strata ARGS` in this process, as its console script runs it: (exit code, stdout, stderr)."""
    import sys

    from pipeline.cli import main

    capsys.readouterr()
    argv, sys.argv = sys.argv, ["strata", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err

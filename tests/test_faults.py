"""Worker faults: out-of-memory micro-batches (in process) and a model replica killed mid-fragment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from pipeline.config import InputConfig, OutputSpec
from pipeline.embedder import Embedder
from pipeline.spec import EmbedSettings, resolve_output
from pipeline.fragments import table_from_bytes
from pipeline.sources import list_shards
from pipeline.stages import Embed, JobSpec, Tokenize, read_shard
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS, write_config

SPEC = OutputSpec(name="v", layers=[-1], pooling="mean", combine="concat")


class OutOfMemoryWhen:
    """The encoder, failing like CUDA does when a batch is too big for the device."""

    def __init__(self, encoder, too_big):
        self.encoder, self.too_big, self.raised = encoder, too_big, 0

    def __call__(self, input_ids, mask):
        if self.too_big(input_ids):
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.encoder(input_ids, mask)


def settings(model_info):
    return EmbedSettings(model_info, (resolve_output(SPEC, model_info.num_layers),), "float32", 4096, "float32")


def job_of(cfg, model_info, fragment_docs):
    return JobSpec(cfg, settings(model_info), "", "source", {}, fragment_docs=fragment_docs)


def test_an_out_of_memory_batch_is_split_and_retried(model_info):
    texts = [json.loads(line)["text"] for line in (CORPUS / "part-0.jsonl").read_text().splitlines()[:24]]
    windows = TextTokenizer(model_info.path, 128).encode(texts)
    expected = Embedder(settings(model_info), torch.device("cpu")).embed(windows)
    embedder = Embedder(settings(model_info), torch.device("cpu"))
    embedder.encoder = OutOfMemoryWhen(embedder.encoder, lambda ids: ids.shape[0] > 3)
    result = embedder.embed(windows)
    assert embedder.encoder.raised >= 3 and not result.failed_docs
    np.testing.assert_allclose(result.vectors["v"], expected.vectors["v"], atol=1e-5)


def test_a_document_too_big_even_alone_is_quarantined(model_info, tmp_path):
    source = tmp_path / "s.jsonl"
    lines = (CORPUS / "part-0.jsonl").read_text().splitlines()[:30]
    source.write_text("\n".join(lines) + "\n")
    cfg = InputConfig(uri=str(source))
    shard = list_shards(cfg)[0]
    payload = next(read_shard(shard, job_of(cfg, model_info, 100)))
    payload = Tokenize(model_info.path, 256, None, False)(payload)
    embed = Embed(settings(model_info), [])
    embed.embedder.encoder = OutOfMemoryWhen(embed.embedder.encoder, lambda ids: ids.shape[1] > 200)
    out = embed(payload)
    assert not out["error"]
    quarantine = table_from_bytes(out["quarantine"]).to_pylist()
    docs = [json.loads(line) for line in lines]
    lengths = TextTokenizer(model_info.path, 256).encode([d["text"] for d in docs]).lengths
    long_ids = [d["id"] for d, n in zip(docs, lengths) if n > 200]
    assert long_ids and sorted(q["id"] for q in quarantine) == sorted(long_ids)
    assert all(q["reason"].startswith("out of memory embedding a window of") for q in quarantine)
    rows = table_from_bytes(out["docs"])
    assert out["embedded"] == rows.num_rows == 30 - len(quarantine) > 0
    assert not set(rows["id"].to_pylist()) & set(long_ids)


def cli_run(cfg: Path, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STRATA_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def small_run(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "s.jsonl").write_text("\n".join((CORPUS / "part-0.jsonl").read_text().splitlines()[:20]) + "\n")
    cfg = write_config(tmp_path / "c.yaml", input={"uri": str(corpus)}, model={"max_length": 64},
                       batching={"fragment_docs": 5}, output={"uri": str(tmp_path / "out")})
    return cfg, tmp_path / "out"


def ids_in(out: Path) -> list[str]:
    return sorted(ds.dataset(out / "data", partitioning="hive").to_table(columns=["id"])["id"].to_pylist())


def test_a_replica_killed_mid_fragment_is_restarted_and_the_fragment_redone(small_run, tmp_path):
    cfg, out = small_run
    marker = tmp_path / "killed-once"
    result = cli_run(cfg, f"kill-embed-once:{marker}")
    assert result.returncode == 0, result.stderr
    assert marker.exists()  # the fault fired: one replica died after embedding a fragment
    ids = ids_in(out)
    assert len(ids) == 20 and len(set(ids)) == 20


def test_a_fragment_that_keeps_killing_its_replica_is_recorded_and_the_rest_finishes(small_run, tmp_path):
    cfg, out = small_run
    failed = cli_run(cfg, "kill-embed-at:5")  # the fragment of rows 5..9 kills its replica every time
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]  # Ray logs the deaths; strata's verdict is the last line
    assert last.startswith("error: 1 fragment and 0 shards could not be embedded (s.jsonl: its worker process "
                           "died 3 times while embedding it"), last
    assert len(ids_in(out)) == 15  # every other fragment is committed
    status = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out), "--json"],
                                       capture_output=True, text=True, timeout=120).stdout)
    assert status["fragments_failed"] == 1 and status["failures"][0]["rows"] == 5
    assert not (out / "_manifest" / "attempts").exists() or not any((out / "_manifest" / "attempts").iterdir())

    resumed = cli_run(cfg, "")
    assert resumed.returncode == 0, resumed.stderr
    ids = ids_in(out)
    assert len(ids) == 20 and len(set(ids)) == 20


@pytest.mark.parametrize("step, doing", [("read", "reading it"), ("tokenize", "tokenizing it"),
                                         ("write", "writing it")])
def test_a_fragment_or_shard_that_keeps_killing_any_step_is_recorded_and_the_rest_finishes(small_run, tmp_path,
                                                                                            step, doing):
    """Not only the model replica: a document that kills the tokenizer (12 MB of dots), a line that
    kills its read task (a 4 GiB line in a small gzip), a write that dies. Each kills its worker
    every time; the run records it with the step and goes on, and never retries without end."""
    cfg, out = small_run
    (tmp_path / "in" / "t.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": f"short text {i}"}) + "\n"
                                                    for i in range(3)))
    failed = cli_run(cfg, f"kill-{step}-at:15")  # s.jsonl's fragment of rows 15..19; t.jsonl has 3 rows
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    what = "0 fragments and 1 shard" if step == "read" else "1 fragment and 0 shards"
    assert last.startswith(f"error: {what} could not be embedded (s.jsonl: its worker process died 3 times "
                           f"while {doing}"), last
    ids = ids_in(out)
    assert len(ids) == len(set(ids)) and {f"t{i}" for i in range(3)} <= set(ids)  # the other shard is whole
    assert len(ids) == (23 - 5 if step != "read" else len(ids)) and len(ids) >= 3
    status = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out), "--json"],
                                       capture_output=True, text=True, timeout=120).stdout)
    assert (status["shards_failed"], status["fragments_failed"]) == ((1, 0) if step == "read" else (0, 1))
    assert status["failures"][0]["reason"].startswith(f"its worker process died 3 times while {doing}")


def test_documents_the_tokenizer_rejects_are_quarantined_and_the_rest_tokenized(model_info, tmp_path):
    source = tmp_path / "s.jsonl"
    source.write_text("\n".join(json.dumps({"id": str(i), "text": t}) for i, t in
                                enumerate(["fine text", "POISON for the tokenizer", "also fine"])) + "\n")
    cfg = InputConfig(uri=str(source))
    shard = list_shards(cfg)[0]
    payload = next(read_shard(shard, job_of(cfg, model_info, 10)))
    tokenize = Tokenize(model_info.path, 64, None, False)
    encode = tokenize.tokenizer.encode

    def picky(texts):
        if any("POISON" in t for t in texts):
            raise ValueError("cannot tokenize this")
        return encode(texts)

    tokenize.tokenizer.encode = picky
    out = tokenize(payload)
    assert not out["error"]
    assert table_from_bytes(out["docs"])["id"].to_pylist() == ["0", "2"]
    [rejected] = table_from_bytes(out["quarantine"]).to_pylist()
    assert rejected["id"] == "1" and rejected["reason"] == "the tokenizer failed: ValueError: cannot tokenize this"
    assert rejected["text"] == "POISON for the tokenizer"


# --- the write step is guarded: a failing disk costs fragments, never the run's report ---

def test_a_write_that_fails_is_the_fragments_failure_with_its_cause(model_info, tmp_path):
    from pipeline.stages import write_fragment

    source = tmp_path / "s.jsonl"
    source.write_text("\n".join((CORPUS / "part-0.jsonl").read_text().splitlines()[:4]) + "\n")
    cfg = InputConfig(uri=str(source))
    shard = list_shards(cfg)[0]
    payload = Tokenize(model_info.path, 32, None, False)(next(read_shard(shard, job_of(cfg, model_info, 10))))
    payload = Embed(settings(model_info), [])(payload)
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "source=s.jsonl").write_text("a file where the partition folder must go")
    job = JobSpec(cfg, settings(model_info), str(out), "source", {})
    record = write_fragment(payload, job)
    assert record.reason.startswith("writing it: cannot write ") and "File exists" in record.reason, record
    assert json.loads((out / "_manifest" / "failures" / f"{record.fragment}.json").read_text())["reason"] == record.reason
    assert not (out / "_manifest" / "fragments").exists()  # nothing committed


UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _can_mount() -> bool:
    try:
        return subprocess.run([*UNSHARE, "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount(), reason="needs unshare with user and mount namespaces (util-linux)")
def test_a_full_disk_and_a_read_only_remount_mid_run_end_in_one_line(tmp_path):
    """A real tmpfs, filled (ENOSPC) or remounted read-only once a few fragments are committed."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    lines = (CORPUS / "part-0.jsonl").read_text().splitlines()
    (corpus / "s.jsonl").write_text("\n".join(lines * 2) + "\n")
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = write_config(tmp_path / "c.yaml", input={"uri": str(corpus)}, model={"max_length": 16},
                       batching={"fragment_docs": 10}, output={"uri": str(disk / "out")})
    breaks = {"full": f"dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null",
              "read-only": f"mount -o remount,ro {disk}"}
    for name, break_it in breaks.items():
        script = (f"mount -t tmpfs -o size=64m tmpfs {disk} && "
                  f"( while [ $(ls {disk}/out/_manifest/fragments 2>/dev/null | wc -l) -lt 2 ]; do sleep 0.05; done; "
                  f"{break_it} ) & {sys.executable} -m pipeline.cli run {cfg}")
        result = subprocess.run([*UNSHARE, "sh", "-c", script], capture_output=True, text=True, timeout=600)
        cause = "No space left on device" if name == "full" else "Read-only file system"
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1, (name, result.stderr[-3000:])
        assert "Traceback" not in result.stderr and "\x1b[" not in result.stderr, (name, result.stderr[-3000:])
        assert last.startswith("error: ") and cause in last, (name, last)

"""Start-up independent of corpus size: shards are listed, never counted; the read step cuts
fragments as it streams a shard; commit records are folded into a compact index that never
outranks the records themselves."""

import gzip
import io
import json
from pathlib import Path

import pyarrow.dataset as ds
from rich.console import Console

import pytest

from pipeline.config import InputConfig, parse_config
from pipeline.errors import InputError
from pipeline.manifest import FRAGMENTS_DIR, INDEX_DIR, INDEX_FILES_MAX, CommitRecord, Manifest, hash_file_of
from pipeline.runner import run
from pipeline.sources import list_shards, read_fragments, select_listing
from pipeline.storage import Location, open_fs

from conftest import CORPUS

LINES = (CORPUS / "part-0.jsonl").read_text().splitlines()


def quiet() -> Console:
    return Console(file=io.StringIO())


def config(source: Path, out: Path, mode: str = "once"):
    return parse_config({"input": {"uri": str(source)}, "model": {"max_length": 32},
                         "outputs": [{"name": "v", "layers": [-1], "pooling": "mean"}],
                         "batching": {"fragment_docs": 4, "token_budget": 1024},
                         "output": {"uri": str(out)}, "run": {"mode": mode}})


def ids_in(out: Path) -> list[str]:
    ids = ds.dataset(out / "data", partitioning="hive").to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)), "a document appears twice"
    return sorted(ids)


def records_of(out: Path) -> list[CommitRecord]:
    return Manifest(Location.from_uri(str(out))).records()


def unpublish(out: Path) -> None:
    """What a run killed after its last commit and before publishing leaves: no snapshot."""
    for snapshot in (out / "_manifest" / "versions").glob("*.json"):
        snapshot.unlink()


def forget(out: Path, record: CommitRecord) -> None:
    """What a run killed before this fragment committed leaves: neither its record nor its files."""
    (out / FRAGMENTS_DIR / f"{record.fragment}.json").unlink()
    for path in record.files + [hash_file_of(record)]:
        (out / path).unlink()


# --- the read step finds a shard's fragments as it streams it ---

def test_fragments_are_found_while_streaming_and_the_last_says_so(tmp_path):
    cfg = InputConfig(uri=str(tmp_path))
    (tmp_path / "ten.jsonl.gz").write_bytes(gzip.compress(("\n".join(LINES[:10]) + "\n").encode()))
    (tmp_path / "eight.jsonl").write_text("\n".join(LINES[:8]))  # an exact multiple, no final newline
    (tmp_path / "empty.jsonl").write_text("")
    fs, _ = open_fs(str(tmp_path))
    cuts = {s.source: [(a, b, last, rows.docs.num_rows) for a, b, last, rows in read_fragments(fs, s, 4, cfg)]
            for s in list_shards(cfg)}
    assert cuts == {"ten.jsonl.gz": [(0, 4, False, 4), (4, 8, False, 4), (8, 10, True, 2)],
                    "eight.jsonl": [(0, 4, False, 4), (4, 8, True, 4)],
                    "empty.jsonl": [(0, 0, True, 0)]}
    [ten] = [s for s in list_shards(cfg) if s.source == "ten.jsonl.gz"]
    skipped = [(a, b, last, rows is None) for a, b, last, rows in read_fragments(fs, ten, 4, cfg, skip={0, 8})]
    assert skipped == [(0, 4, False, True), (4, 8, False, False), (8, 10, True, True)]


def test_a_compressed_shard_cut_short_is_an_error_never_a_shorter_shard(tmp_path):
    import zstandard

    cfg = InputConfig(uri=str(tmp_path))
    text = ("\n".join(LINES * 20) + "\n").encode()
    frames = zstandard.ZstdCompressor().compress(text[:5000]) + zstandard.ZstdCompressor().compress(text[5000:])
    (tmp_path / "cut.jsonl.zst").write_bytes(frames[: len(frames) - 200])  # the second frame cut short
    (tmp_path / "tiny.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text[:300])[:-8])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text)[:-100])
    fs, _ = open_fs(str(tmp_path))
    for shard in list_shards(cfg):
        with pytest.raises(InputError, match=f"cannot read shard {shard.source}.*(EOFError|cut short)"):
            list(read_fragments(fs, shard, 4, cfg))


def test_progress_never_claims_the_input_done_while_a_shard_is_open():
    from pipeline.progress import RunProgress

    def record(source: str, rows: int, last: bool) -> CommitRecord:
        return CommitRecord("f", source, 0, rows, [], rows, rows, 0, 0, 1, 1, 0.1, last=last)

    progress = RunProgress(quiet(), total_bytes=1000, shards=3)
    progress.update(record("a", 10, True), 100)  # 10 bytes per row
    shares = []
    for _ in range(5):  # b's rows would be 1,000 bytes at a's rate: more than b holds
        progress.update(record("b", 20, False), 800)
        shares.append(progress.estimate() / 1000)
    assert shares == sorted(shares) and max(shares) < 1.0
    progress.update(record("c", 5, True), 100)
    assert progress.estimate() < 1000
    progress.update(record("b", 1, True), 800)
    assert progress.estimate() == 1000


def test_listing_selects_shards_with_arrow_kernels_as_the_per_file_rules_do():
    names = ["/c/b.JSONL.GZ", "/c/a.parquet", "/c/x.parquet.gz", "/c/_SUCCESS", "/c/.h.jsonl", "/c/notes.md",
             "/c/d/e.txt.zst", "/c/fifo.jsonl", "/c/sub", "/c/f.ZSTD"]
    kinds = ["file"] * 7 + ["other", "directory", "file"]
    skipped: list[str] = []
    pages = [[names[:4], list(range(4)), ["v"] * 4, kinds[:4]], [names[4:], list(range(4, 10)), ["v"] * 6, kinds[4:]]]
    table = select_listing(pages, "/c", "auto", skipped)
    assert table.select(["source", "format", "compression", "size"]).to_pylist() == [
        {"source": "a.parquet", "format": "parquet", "compression": None, "size": 1},
        {"source": "b.JSONL.GZ", "format": "jsonl", "compression": "gzip", "size": 0},
        {"source": "d/e.txt.zst", "format": "text", "compression": "zstd", "size": 6}]
    assert skipped == ["x.parquet.gz", "notes.md", "fifo.jsonl (not a regular file)", "f.ZSTD"]
    assert table["path"].to_pylist()[0] == b"/c/a.parquet"


# --- resume: the records say what is done, a shard is done when its fragments cover it ---

def test_a_shard_whose_last_fragment_committed_before_an_earlier_one_is_finished_on_resume(ray_cluster, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.jsonl").write_text("\n".join(LINES[:14]) + "\n")  # 4 fragments: 4+4+4+2
    (source / "b.jsonl").write_text("\n".join(LINES[14:20]) + "\n")
    out = tmp_path / "out"
    first = run(config(source, out), console=quiet())
    assert first["published"] and first["fragments"] == "6 / 6"
    complete = ids_in(out)
    records = records_of(out)
    assert [(r.source, r.start, r.end, r.last) for r in records if r.source == "a.jsonl" and r.last] == \
        [("a.jsonl", 12, 14, True)]
    # killed after a.jsonl's last fragment committed, before its second did (fragments land out of order)
    second = next(r for r in records if r.source == "a.jsonl" and r.start == 4)
    unpublish(out)
    forget(out, second)
    console = Console(file=io.StringIO())
    again = run(config(source, out), console=console)
    assert "5 fragments already committed, 1 shard" in console.file.getvalue()
    assert again["published"] and again["fragments_this_run"] == 1 and again["fragments"] == "6 / 6"
    assert ids_in(out) == complete and again["docs"] == 20
    run_json = json.loads((out / "_manifest" / "run.json").read_text())
    assert run_json["plan"]["fragments"] == 6 and run_json["plan"]["rows"] == 20


def test_records_win_over_the_compact_index(ray_cluster, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.jsonl").write_text("\n".join(LINES[:12]) + "\n")
    out = tmp_path / "out"
    run(config(source, out), console=quiet())
    manifest = Manifest(Location.from_uri(str(out)))
    indexed = manifest.indexed()
    assert len(indexed) == 3 and list((out / INDEX_DIR).iterdir())  # the run folded its records
    # the index lists a fragment whose record is gone: it is not committed, and is embedded again
    gone = next(r for r in records_of(out) if r.start == 4)
    unpublish(out)
    forget(out, gone)
    assert gone.fragment in manifest.indexed() and gone.fragment not in {r.fragment for r in manifest.records()}
    again = run(config(source, out), console=quiet())
    assert again["published"] and again["fragments_this_run"] == 1 and ids_in(out) == sorted(
        json.loads(line)["id"] for line in LINES[:12])
    # a record that says otherwise than the index: the record's word counts
    record = out / FRAGMENTS_DIR / f"{gone.fragment}.json"
    edited = {**json.loads(record.read_text()), "seconds": 12345.678}
    record.write_text(json.dumps(edited))
    [seen] = [r for r in manifest.records() if r.fragment == gone.fragment]
    assert seen.seconds == 12345.678


def test_index_files_are_merged_and_a_damaged_one_costs_only_reads(tmp_path):
    location = Location.from_uri(str(tmp_path / "out"))
    manifest = Manifest(location)
    records = [CommitRecord(f"f{i:02d}", "s", i, i + 1, [], 1, 1, 0, 0, 3, 3, 0.1, shard_version="1:2",
                            last=i == 19) for i in range(20)]
    for record in records:
        manifest.commit(record)
    for i in range(0, 20, 2):
        manifest.fold(records[i:i + 2])
    assert len(list((tmp_path / "out" / INDEX_DIR).iterdir())) <= INDEX_FILES_MAX
    assert manifest.records() == records and set(manifest.indexed()) == {r.fragment for r in records}
    for path in (tmp_path / "out" / INDEX_DIR).iterdir():
        path.write_bytes(b"not parquet")
    read: list[CommitRecord] = []
    assert manifest.records(unindexed=read) == records and read == records


# --- a shard that grows or shrinks between runs ---

def test_a_shard_that_grows_or_shrinks_before_the_resume_is_embedded_as_it_is_now(ray_cluster, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    shard = source / "a.jsonl"
    shard.write_text("\n".join(LINES[:10]) + "\n")
    out = tmp_path / "out"
    run(config(source, out), console=quiet())
    unpublish(out)  # an unfinished first version, then the shard grows
    forget(out, next(r for r in records_of(out) if r.start == 0))
    shard.write_text("\n".join(LINES[:13]) + "\n")
    grown = run(config(source, out), console=quiet())
    assert grown["published"] and grown["docs"] == 13 and grown["fragments"] == "4 / 4"
    assert ids_in(out) == sorted(json.loads(line)["id"] for line in LINES[:13])
    assert {r.end for r in records_of(out)} == {4, 8, 12, 13}  # the old fragments were removed
    shard.write_text("\n".join(LINES[:5]) + "\n")  # a published version's shard shrinks: a new version
    shrunk = run(config(source, out, mode="incremental"), console=quiet())
    assert shrunk["published"] and shrunk["version"] == 2 and shrunk["docs"] == 5 and shrunk["deleted"] == 8

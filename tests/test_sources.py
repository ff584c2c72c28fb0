import gzip
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.sources import count_rows, keep_schema, list_shards, read_ranges

FS = fsspec.filesystem("file")


def lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def test_lists_corpus_files_of_a_folder_skipping_others(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text(lines({"text": "x"}))
    (tmp_path / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "y"}\n'))
    pq.write_table(pa.table({"text": ["z"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("not a corpus file")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.jsonl").write_text(lines({"text": "h"}))
    shards = list_shards(InputConfig(uri=str(tmp_path)))
    assert [(s.source, s.format, s.compression) for s in shards] == [
        ("a.jsonl", "jsonl", None), ("c.parquet", "parquet", None), ("sub/b.jsonl.gz", "jsonl", "gzip")]


def test_lists_a_single_file_and_a_glob(tmp_path: Path):
    for name in ("x1.jsonl", "x2.jsonl", "y.jsonl"):
        (tmp_path / name).write_text(lines({"text": "t"}))
    assert [s.source for s in list_shards(InputConfig(uri=str(tmp_path / "y.jsonl")))] == ["y.jsonl"]
    assert [s.source for s in list_shards(InputConfig(uri=str(tmp_path / "x*.jsonl")))] == ["x1.jsonl", "x2.jsonl"]


def test_missing_or_empty_input_is_a_clear_error(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        list_shards(InputConfig(uri=str(tmp_path / "nope")))
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(InputError, match="holds no corpus files"):
        list_shards(InputConfig(uri=str(tmp_path)))


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_counts_lines_with_and_without_final_newline(tmp_path: Path, suffix):
    for body, expected in ((b'{"text":"a"}\n{"text":"b"}\n', 2), (b'{"text":"a"}\n{"text":"b"}', 2), (b"", 0)):
        path = tmp_path / f"s.{suffix}"
        data = gzip.compress(body) if suffix.endswith("gz") else body
        if suffix.endswith("zst"):
            data = zstandard.ZstdCompressor().compress(body)
        path.write_bytes(data)
        shard = list_shards(InputConfig(uri=str(path)))[0]
        assert count_rows(FS, shard) == expected


def read_all(path: Path, ranges, **cfg):
    config = InputConfig(uri=str(path), **cfg)
    shard = list_shards(config)[0]
    return list(read_ranges(FS, shard, ranges, config, keep_schema(FS, [shard], config)))


def test_reads_row_ranges_with_ids_and_kept_fields(tmp_path: Path):
    path = tmp_path / "s.jsonl"
    path.write_text(lines(*({"id": f"d{i}", "text": f"text {i}", "lang": "en" if i % 2 else "fr", "n": i}
                            for i in range(7))))
    parts = read_all(path, [(0, 3), (3, 6), (6, 7)], keep_fields=["lang", "n", "absent"])
    assert [p.docs["id"].to_pylist() for p in parts] == [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["d6"]]
    assert parts[1].docs["row"].to_pylist() == [3, 4, 5]
    assert parts[0].docs["lang"].to_pylist() == ["fr", "en", "fr"]
    assert parts[0].docs["source"].to_pylist() == ["s.jsonl"] * 3
    # JSON values are kept as text, so every fragment's file has the same schema
    assert parts[2].docs["n"].to_pylist() == ["6"] and parts[2].docs["n"].type == pa.string()
    assert parts[2].docs["absent"].to_pylist() == [None] and parts[2].docs["absent"].type == pa.string()


def test_a_declared_format_reads_any_extension(tmp_path: Path):
    (tmp_path / "corpus.dat").write_text(lines({"text": "x"}))
    [shard] = list_shards(InputConfig(uri=str(tmp_path), format="jsonl"))
    assert (shard.source, shard.format) == ("corpus.dat", "jsonl")


def test_only_the_asked_ranges_are_returned(tmp_path: Path):
    path = tmp_path / "s.jsonl"
    path.write_text(lines(*({"text": f"t{i}"} for i in range(9))))
    parts = read_all(path, [(6, 9), (3, 6)])
    assert [p.docs["row"].to_pylist() for p in parts] == [[3, 4, 5], [6, 7, 8]]
    assert parts[0].docs["id"].to_pylist() == ["s.jsonl#3", "s.jsonl#4", "s.jsonl#5"]  # derived ids


def test_bad_rows_are_quarantined_with_reasons_and_blank_lines_counted(tmp_path: Path):
    path = tmp_path / "s.jsonl"
    body = lines({"id": "ok", "text": "fine"}, "{not json", {"id": "n", "text": None}, {"id": "e", "text": "  "},
                 {"id": "m"}, {"id": "i", "text": 5}, "[1, 2]", "   ")
    path.write_bytes(body.encode() + b'{"id": "u", "text": "\xff\xfe"}\n')
    [part] = read_all(path, [(0, 9)])
    assert part.docs["id"].to_pylist() == ["ok"]
    reasons = {q["id"]: q["reason"] for q in part.quarantine}
    assert reasons["n"] == "'text' is null"
    assert reasons["e"] == "'text' is empty or whitespace"
    assert reasons["m"] == "no 'text' field"
    assert reasons["i"] == "'text' is a int, not a string"
    assert reasons["s.jsonl#1"].startswith("malformed JSON")
    assert reasons["s.jsonl#6"] == "a JSON list, not an object"
    assert reasons["s.jsonl#8"].startswith("invalid UTF-8")
    assert part.blank == 1
    assert len(part.docs) + len(part.quarantine) + part.blank == 9


def test_parquet_ranges_and_missing_text_column(tmp_path: Path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(10)], "text": [f"t{i}" for i in range(10)],
                             "label": list(range(10))}), path, row_group_size=3)
    parts = read_all(path, [(2, 5), (8, 10)], keep_fields=["label"])
    assert [p.docs["id"].to_pylist() for p in parts] == [["p2", "p3", "p4"], ["p8", "p9"]]
    assert parts[1].docs["label"].to_pylist() == [8, 9] and parts[1].docs["label"].type == pa.int64()
    with pytest.raises(InputError, match="has no column 'body'"):
        read_all(path, [(0, 10)], text_field="body")


def test_text_format_is_one_document_per_line(tmp_path: Path):
    path = tmp_path / "s.txt"
    path.write_text("first line\n\nsecond line\n")
    [part] = read_all(path, [(0, 3)])
    assert part.docs["text"].to_pylist() == ["first line", "second line"]
    assert part.docs["row"].to_pylist() == [0, 2]
    assert part.blank == 1


def test_a_shard_shorter_than_planned_is_an_error_not_a_silent_drop(tmp_path):
    import fsspec

    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    cfg = InputConfig(uri=str(path))
    shard = list_shards(cfg)[0]
    with pytest.raises(InputError, match="ended after 2 rows, but 5 were planned"):
        list(read_ranges(fsspec.filesystem("file"), shard, [(0, 5)], cfg))


DOCS = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(5)]


def _jsonl_bytes() -> bytes:
    return lines(*DOCS).encode()


def _text_bytes() -> bytes:
    return "".join(d["text"] + "\n" for d in DOCS).encode()


def _zstd_frames(data: bytes) -> bytes:
    """Two zstd frames back to back, as parallel compressors (pzstd, zstd -T) write them."""
    cut = data.index(b"\n", len(data) // 2) + 1
    return zstandard.ZstdCompressor().compress(data[:cut]) + zstandard.ZstdCompressor().compress(data[cut:])


@pytest.mark.parametrize("name, make", [
    ("s.jsonl", _jsonl_bytes), ("s.ndjson", _jsonl_bytes), ("s.json", _jsonl_bytes),
    ("s.jsonl.gz", lambda: gzip.compress(_jsonl_bytes())), ("s.jsonl.zst", lambda: _zstd_frames(_jsonl_bytes())),
    ("s.jsonl.zstd", lambda: zstandard.ZstdCompressor().compress(_jsonl_bytes())),
    ("s.txt", _text_bytes), ("s.txt.gz", lambda: gzip.compress(_text_bytes())),
    ("s.txt.zst", lambda: _zstd_frames(_text_bytes())),
])
def test_every_listed_format_and_compression_is_read_not_only_counted(tmp_path: Path, name, make):
    path = tmp_path / name
    path.write_bytes(make())
    [shard] = list_shards(InputConfig(uri=str(tmp_path)))
    assert count_rows(FS, shard) == 5
    parts = read_all(path, [(0, 2), (2, 5)])
    assert [t for p in parts for t in p.docs["text"].to_pylist()] == [d["text"] for d in DOCS]


def test_parquet_is_read_too(tmp_path: Path):
    pq.write_table(pa.Table.from_pylist(DOCS), tmp_path / "s.parquet")
    assert [t for p in read_all(tmp_path / "s.parquet", [(0, 5)]) for t in p.docs["text"].to_pylist()] == \
        [d["text"] for d in DOCS]


def test_only_regular_files_are_shards(tmp_path: Path):
    import os
    import socket

    (tmp_path / "ok.jsonl").write_text(lines(*DOCS))
    os.mkfifo(tmp_path / "fifo.jsonl")  # reading would block forever
    (tmp_path / "zero.txt").symlink_to("/dev/zero")  # reading would never end
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "ok.jsonl")  # a symlink to a regular file is one
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")  # listed: it fails with its reason
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock.jsonl"))
    skipped: list[str] = []
    shards = list_shards(InputConfig(uri=str(tmp_path)), skipped=skipped)
    assert [s.source for s in shards] == ["gone.jsonl", "link.jsonl", "ok.jsonl"]
    assert sorted(skipped) == ["fifo.jsonl (not a regular file)", "sock.jsonl (not a regular file)",
                               "zero.txt (not a regular file)"]
    server.close()


def test_a_file_name_that_is_not_utf8_is_read_under_an_escaped_source(tmp_path: Path):
    import os

    name = os.fsdecode(b"caf\xe9.jsonl")  # Latin-1 bytes in a name: Python keeps them as a lone surrogate
    (tmp_path / name).write_text(lines(*DOCS))
    [shard] = list_shards(InputConfig(uri=str(tmp_path)))
    assert shard.source == "caf\\xe9.jsonl"
    [part] = list(read_ranges(FS, shard, [(0, 5)], InputConfig(uri=str(tmp_path))))
    assert part.docs["source"].to_pylist() == ["caf\\xe9.jsonl"] * 5


def test_a_value_arrow_cannot_store_costs_only_its_own_document(tmp_path: Path):
    path = tmp_path / "s.jsonl"
    good = [{"id": f"g{i}", "text": f"good {i}", "lang": "en"} for i in range(19)]
    body = lines(*good[:5]) + '{"id": "s5", "text": "broken \\ud800 here", "lang": "en"}\n' + lines(*good[5:10]) + \
        '{"id": "bad\\udfff", "text": "fine", "lang": "en"}\n' + lines(*good[10:]) + \
        '{"id": "k", "text": "fine", "lang": "x\\ud834"}\n'
    path.write_text(body)
    [part] = read_all(path, [(0, 22)], keep_fields=["lang"])
    assert part.docs["id"].to_pylist() == [g["id"] for g in good]
    reasons = {q["row"]: q["reason"] for q in part.quarantine}
    assert reasons[5] == "'text' holds a lone surrogate (\\ud800 at character 7), not valid Unicode"
    assert reasons[11].startswith("'id' holds a lone surrogate")
    assert reasons[21].startswith("kept field 'lang' holds a lone surrogate")
    from pipeline.output import quarantine_table

    assert quarantine_table(part.quarantine).num_rows == 3  # the quarantine file can hold them


def test_parquet_strings_that_are_not_utf8_cost_only_their_rows(tmp_path: Path):
    texts = pa.array([b"fine one", b"bad \xff byte", b"fine two"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts}), tmp_path / "s.parquet")
    [part] = read_all(tmp_path / "s.parquet", [(0, 3)])
    assert part.docs["id"].to_pylist() == ["a", "c"]
    assert [q["reason"] for q in part.quarantine] == ["'text' is not valid UTF-8 (byte 4 of a string)"]


def test_kept_fields_take_the_first_shards_types_and_a_value_that_does_not_fit_is_quarantined(tmp_path: Path):
    pq.write_table(pa.table({"text": ["a", "b"], "label": pa.array([1, 2], pa.int64()),
                             "meta": [{"k": 1}, {"k": 2}]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["c", "d", "e"], "label": pa.array(["3", "x", None]).dictionary_encode(),
                             "meta": [{"k": 3}, None, {"k": 5}]}), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_text(lines({"text": "f", "label": 6, "meta": {"k": 6}},
                                            {"text": "g", "label": "7", "meta": "not an object"}))
    cfg = InputConfig(uri=str(tmp_path), keep_fields=["label", "meta"])
    shards = list_shards(cfg)
    schema = keep_schema(FS, shards, cfg)
    assert str(schema.field("label").type) == "int64" and str(schema.field("meta").type) == "struct<k: int64>"
    parts = [part for shard in shards for part in read_ranges(FS, shard, [(0, count_rows(FS, shard))], cfg, schema)]
    assert all(p.docs.schema.field("label").type == pa.int64() for p in parts)
    assert pa.concat_tables([p.docs for p in parts])["label"].to_pylist() == [1, 2, 3, None, 6]
    reasons = [q["reason"] for p in parts for q in p.quarantine]
    assert len(reasons) == 2 and "kept field 'label' is \"x\", which is not a int64" in reasons[0]
    assert "kept field 'meta' is \"not an object\", which is not a struct<k: int64>" in reasons[1]


def test_json_nested_too_deep_costs_only_its_own_line(tmp_path: Path):
    path = tmp_path / "s.jsonl"
    deep = '{"id": "deep", "text": "deep", "z": ' + "[" * 5000 + "]" * 5000 + "}"
    path.write_text(lines(*DOCS[:2]) + deep + "\n" + lines(*DOCS[2:]))
    [part] = read_all(path, [(0, 6)], keep_fields=["z"])
    assert part.docs["id"].to_pylist() == [d["id"] for d in DOCS]
    assert [q["reason"] for q in part.quarantine] == ["JSON nested too deep to read (about 1,000 levels or more)"]


def test_ids_that_are_not_strings_read_as_json_text(tmp_path: Path):
    path = tmp_path / "s.jsonl"
    path.write_text(lines(*({"id": value, "text": "t"} for value in (7, 2.5, True, {"a": 1}, [1, "x"]))))
    [part] = read_all(path, [(0, 5)])
    assert part.docs["id"].to_pylist() == ["7", "2.5", "true", '{"a": 1}', '[1, "x"]']


def test_lines_are_read_within_a_bound_whatever_their_length():
    """bounded_lines splits as count_rows counts (a last line without newline counts), and gives an
    over-long line as its length, for any chunking."""
    import io
    import random

    from pipeline.sources import bounded_lines

    rng = random.Random(0)
    for _ in range(2000):
        lines = [bytes(rng.choice(b"ab\r ") for _ in range(rng.choice([0, 1, 3, 7, 20])))
                 for _ in range(rng.randint(0, 12))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        limit, chunk = rng.randint(1, 12), rng.randint(1, 9)
        expected = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n") if data else []
        assert list(bounded_lines(io.BytesIO(data), limit, chunk)) == \
            [line if len(line) <= limit else len(line) for line in expected], (data, limit, chunk)


def test_a_line_longer_than_max_line_bytes_is_quarantined_with_its_length_without_being_held(tmp_path):
    """A small gzip shard can hold a line of gigabytes (a 4 GiB line killed every read task): such a
    line is quarantined with its length, its bytes never held, and the rows around it are read."""
    import tracemalloc

    from pipeline.sources import read_fragments

    long_line = 48 * 1024 * 1024
    path = tmp_path / "s.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"id": "a", "text": "before"}\n')
        f.write(b'{"id": "b", "text": "' + b"x" * long_line + b'"}\n')
        f.write(b'{"id": "c", "text": "after"}\n')
    cfg = InputConfig(uri=str(path), max_line_bytes="1MiB")
    shard = list_shards(cfg)[0]
    tracemalloc.start()
    try:
        (_, end, last, rows), = read_fragments(fsspec.filesystem("file"), shard, 10, cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (end, last) == (3, True) and rows.docs["id"].to_pylist() == ["a", "c"]
    assert [(q["id"], q["row"], q["reason"]) for q in rows.quarantine] == [
        ("s.jsonl.gz#1", 1, f"a line of {long_line + 23:,} bytes, longer than input.max_line_bytes (1,048,576): "
                            "not read into memory")]
    assert peak < 8 * 1024 * 1024  # the line is 48 MiB

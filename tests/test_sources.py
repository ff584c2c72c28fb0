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
from pipeline.sources import count_rows, list_shards, read_ranges

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
    return list(read_ranges(FS, shard, ranges, config))


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

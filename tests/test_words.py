"""Word vectors of given words (pre-tokenized input) against an independent reference: plain
transformers with `is_split_into_words=True` and `word_ids()`, subword pooling as flair does it
(layers combined per sub-token, then first / last / mean / first and last concatenated)."""

import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from pipeline.config import OutputSpec
from pipeline.embedder import Embedder
from pipeline.spec import EmbedSettings, resolve_output
from pipeline.stages import EMPTY_REASON
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS, write_jsonl
from reference import Reference
from test_windows import max_context_owner

SENTENCES = [
    ["I", "can't", "believe", "it", "isn't", "state-of-the-art", "yet", "."],
    ["See", "https://example.org/a/b?x=1&y=two", "or", "mail", "ana.lopez@example.com", "today"],
    ["Prices", "rose", "to", "€1.234,56", "and", "$2,000.75", "(", "+3.5%", ")", "in", "2024-01-31"],
    ["Tokyo", "is", "東京都", "and", "Beijing", "北京", ";", "smile", "🙂", "👍🏽", "!"],
    ["Café", "naïve", "Zoë", "São", "Paulo", "Ångström", "crème", "brûlée"],
    ["a", "\u0301", "lone", "accent", "and", "a", "\u200b", "zero-width", "space", "vanish"],  # words 1 and 6: no sub-token
    ["U.S.A.", "v2.0.1", "don't", "rock'n'roll", "e-mail", "O'Neill", "x86_64"],
]
HOWS = ("first", "last", "mean", "first_last")
LAYERS = [([-1], "concat"), ("all", "mean"), ([-1, -2, -3, -4], "concat")]


@pytest.fixture(scope="module")
def reference(model_info):
    return Reference(model_info.path)


def specs():
    return [OutputSpec(name=f"{how}_{k}", layers=layers, pooling="none", combine=combine, words=how)
            for how in HOWS for k, (layers, combine) in enumerate(LAYERS)]


def embed(model, documents, stride=None):
    outputs = tuple(resolve_output(s, model.num_layers) for s in specs())
    settings = EmbedSettings(model, outputs, "float32", 512, "float32")
    windows = TextTokenizer(model.path, model.max_length, stride, details=True, words=True).encode(documents)
    return Embedder(settings, torch.device("cpu")).embed(windows)


def combined(hidden: list[np.ndarray], token: int, layers, combine: str, num_layers: int) -> np.ndarray:
    # one sub-token's vector, layers combined first (as flair does)
    chosen = range(num_layers + 1) if layers == "all" else [i % (num_layers + 1) for i in layers]
    per_layer = [hidden[i][token] for i in chosen]
    return np.concatenate(per_layer) if combine == "concat" else np.mean(per_layer, axis=0)


def expected_word(pieces: list[np.ndarray], how: str) -> np.ndarray:
    # pieces: the word's sub-token vectors in order, each from the window that owns it
    if how == "first":
        return pieces[0]
    if how == "last":
        return pieces[-1]
    if how == "mean":
        return np.mean(pieces, axis=0)
    return np.concatenate([pieces[0], pieces[-1]])


def check(result, expected: list[list[np.ndarray | None]], num_words: list[int]):
    for how in HOWS:
        for k in range(len(LAYERS)):
            name = f"{how}_{k}"
            units = result.token_units[name]
            assert units.counts.tolist() == num_words
            vectors = result.vectors[name]
            for unit, want in enumerate(w for doc in expected for w in doc[k][how]):
                if want is None:
                    assert units.missing[unit]
                else:
                    assert not units.missing[unit]
                    np.testing.assert_allclose(vectors[unit], want, atol=1e-5, rtol=0, err_msg=f"{name} unit {unit}")


def test_word_vectors_equal_plain_transformers_is_split_into_words(model_info, reference):
    n = model_info.num_layers
    result = embed(model_info, SENTENCES)
    expected = []
    for words in SENTENCES:
        enc = reference.tokenizer(words, is_split_into_words=True)
        hidden = reference.hidden(enc["input_ids"])
        word_ids = enc.word_ids()
        per_setting = []
        for layers, combine in LAYERS:
            by_how = {how: [] for how in HOWS}
            for w in range(len(words)):
                pieces = [combined(hidden, t, layers, combine, n) for t, wid in enumerate(word_ids) if wid == w]
                for how in HOWS:
                    by_how[how].append(expected_word(pieces, how) if pieces else None)
            per_setting.append(by_how)
        expected.append(per_setting)
    check(result, expected, [len(words) for words in SENTENCES])
    units = result.token_units["first_0"]
    assert units.missing.sum() == 2 and units.word.tolist()[:8] == list(range(8))
    assert result.vectors["first_last_0"].shape[1] == 2 * result.vectors["first_0"].shape[1]


def test_long_given_sentences_through_sliding_windows(model_info, reference):
    """A word whose sub-tokens straddle two windows takes each from the window that owns it."""
    max_length, stride = 32, 8
    model = dataclasses.replace(model_info, max_length=max_length)
    with open(CORPUS / "part-0.jsonl") as f:
        text = max((json.loads(line)["text"] for line in f), key=len)[:1500]
    long_words = text.split() + ["state-of-the-art", "€1.234,56", "東京都"] * 4
    documents = [long_words, SENTENCES[0]]
    result = embed(model, documents, stride)
    n = model.num_layers

    expected = []
    for words in documents:
        enc = reference.tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                                  stride=stride, return_overflowing_tokens=True)
        windows = enc["input_ids"]
        step = max_length - 2 - stride
        spans = [range(k * step, k * step + len(ids) - 2) for k, ids in enumerate(windows)]
        content = sum(len(span) for span in spans) - stride * (len(spans) - 1)
        owners = max_context_owner(content, spans)
        hidden = [reference.hidden(ids) for ids in windows]
        word_of = [enc.word_ids(k)[p - spans[k].start + 1] for p, k in enumerate(owners)]  # per content token
        per_setting = []
        for layers, combine in LAYERS:
            token_vectors = [combined(hidden[k], p - spans[k].start + 1, layers, combine, n)
                             for p, k in enumerate(owners)]
            by_how = {how: [] for how in HOWS}
            for w in range(len(words)):
                pieces = [v for v, wid in zip(token_vectors, word_of) if wid == w]
                for how in HOWS:
                    by_how[how].append(expected_word(pieces, how) if pieces else None)
            per_setting.append(by_how)
        expected.append(per_setting)
        if words is long_words:
            assert len(windows) >= 10
            straddling = [w for w in range(len(words)) if len({k for k, wid in zip(owners, word_of) if wid == w}) > 1]
            assert straddling, "no word straddles a window boundary: the test proves nothing about ownership"
    check(result, expected, [len(words) for words in documents])


def test_truncated_given_words_are_null_past_the_cut(model_info, reference):
    model = dataclasses.replace(model_info, max_length=16)
    words = SENTENCES[2] + SENTENCES[3]
    result = embed(model, [words])
    enc = reference.tokenizer(words, is_split_into_words=True, truncation=True, max_length=16)
    seen = {w for w in enc.word_ids() if w is not None}
    units = result.token_units["mean_0"]
    assert units.counts.tolist() == [len(words)]
    assert units.missing.tolist() == [w not in seen for w in range(len(words))]
    assert units.missing[-1] and not units.missing[0]


# --- through the pipeline: config, sources, quarantine, output schema, README example ---------

REPO = Path(__file__).resolve().parent.parent


def test_conll_example_end_to_end_joins_back_to_its_tags(ray_cluster, tmp_path, capsys, monkeypatch):
    from conftest import cli

    out = tmp_path / "ner-conll"
    sets = ["--set", f"input.uri={REPO / 'tests/data/conll/sample.jsonl'}", "--set", f"output.uri={out}",
            "--set", "outputs=[{name: word, layers: [-1, -2, -3, -4], pooling: none, combine: concat, words: first}, "
                     "{name: pair, layers: all, pooling: none, combine: mean, words: first_last}]"]
    code, _, err = cli(capsys, "validate", str(REPO / "configs/ner-conll.yaml"), *sets)
    assert code == 0, err
    assert "word: layers [6, 5, 4, 3] of 0..6 concatenated in this order" in err and "[1536] per word" in err
    assert "pair: layers [0, 1, 2, 3, 4, 5, 6] of 0..6 averaged, pooling none, words first_last → [768]" in err
    code, _, err = cli(capsys, "run", str(REPO / "configs/ner-conll.yaml"), *sets)
    assert code == 0, err
    assert "strata: outputs: word: layers [6, 5, 4, 3]" in err.splitlines()[0]
    assert "keeps them whole" not in err  # sliding windows: nothing truncated, no hint

    sample = [json.loads(line) for line in (REPO / "tests/data/conll/sample.jsonl").read_text().splitlines()]
    readme = (REPO / "README.md").read_text()
    code_block = re.search(r"<!-- tested: tagging -->\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code_block.replace('"out/ner-conll/data"', repr(str(out / "data"))), namespace)
    assert namespace["features"].shape == (sum(len(d["words"]) for d in sample), 1536)
    assert namespace["labels"] == [tag for d in sample for tag in d["tags"]]  # one fragment: rows in file order

    table = ds.dataset(out / "data", format="parquet").to_table()
    assert table.schema.field("pair").type == pa.list_(pa.list_(pa.float32(), 768))
    assert table.schema.field("word_offsets").type == pa.list_(
        pa.struct([("word", pa.int32()), ("start", pa.int32()), ("end", pa.int32())]))
    by_id = {d["id"]: d for d in sample}
    for row in table.to_pylist():
        words = by_id[row["id"]]["words"]
        assert [o["word"] for o in row["word_offsets"]] == list(range(len(words)))
        assert all(words[o["word"]][o["start"]:o["end"]] for o in row["word_offsets"])
        assert row["word_missing"] == row["pair_missing"] == 0 and len(row["pair"]) == len(words)


def test_bad_word_lists_are_quarantined_and_missing_words_are_null(ray_cluster, tmp_path):
    from pipeline.config import parse_config
    from pipeline.runner import run

    good = ["A", "lone", "\u0301", "accent"]
    jsonl = [{"id": "ok", "words": good}, {"id": "long", "words": "one two three four five six seven".split()},
             {"id": "empty-word", "words": ["a", "", "b"]}, {"id": "space-word", "words": ["a", " \t"]},
             {"id": "number-word", "words": ["a", 3]}, {"id": "null-word", "words": ["a", None]},
             {"id": "string", "words": "a b c"}, {"id": "empty-list", "words": []}, {"id": "no-words", "text": "a b"},
             {"id": "null", "words": None}, {"id": "only-invisible", "words": ["\u200b", "\u0301"]},
             {"id": "surrogate", "words": ["a", "b\ud800"]}]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", jsonl)
    pq.write_table(pa.table({"id": ["p0", "p1"], "words": pa.array([["Paris", "\u200b", "rocks"], ["x", None]],
                                                                  pa.large_list(pa.large_string()))}),
                   tmp_path / "in" / "b.parquet")
    outputs = [{"name": "w", "layers": [-1], "pooling": "none", "combine": "concat", "words": "mean"},
               {"name": "doc", "layers": [-1], "pooling": "mean", "combine": "concat"}]
    console_file = io.StringIO()
    cfg = parse_config({"input": {"uri": str(tmp_path / "in"), "words_field": "words"},
                        "model": {"max_length": 6}, "outputs": outputs, "run": {"max_error_rate": 1},
                        "output": {"uri": str(tmp_path / "out"), "precision": "float32"}})
    summary = run(cfg, console=Console(file=console_file, width=200))
    assert (summary["docs"], summary["quarantined"]) == (3, 11)  # 12 + 2 rows

    quarantine = {q["id"]: q["reason"] for q in ds.dataset(tmp_path / "out" / "quarantine").to_table().to_pylist()}
    assert quarantine == {
        "empty-word": "'words'[1] is an empty word (''); a word holds at least one visible character",
        "space-word": "'words'[1] is an empty word (' \\t'); a word holds at least one visible character",
        "number-word": "'words'[1] is a int, not a string (a word)", "null-word": "'words'[1] is null, not a string (a word)",
        "string": "'words' is a str, not a list of words (strings)", "empty-list": "'words' is an empty list",
        "no-words": "no 'words' field", "null": "'words' is null", "only-invisible": EMPTY_REASON,
        "surrogate": "'words'[1] holds a lone surrogate (\\ud800 at character 1), not valid Unicode",
        "p1": "'words'[1] is null, not a string (a word)"}  # the Parquet shard's
    rows = {r["id"]: r for r in ds.dataset(tmp_path / "out" / "data", format="parquet").to_table().to_pylist()}
    ok, long = rows["ok"], rows["long"]
    assert ok["w"][2] is None and ok["w_missing"] == 1 and ok["w_offsets"][2] == {"word": 2, "start": 0, "end": 0}
    assert all(v is not None for i, v in enumerate(ok["w"]) if i != 2)
    assert long["truncated"] and len(long["w"]) == 7 and long["w_missing"] == 3  # 4 words fit in 6 tokens
    assert (rows["p0"]["w_missing"], [v is None for v in rows["p0"]["w"]]) == (1, [False, True, False])
    assert "1 document was cut at 6 tokens (33% of the version); long_text.strategy: sliding_window keeps them " \
           "whole" in console_file.getvalue()


def test_shards_that_cannot_hold_the_words_fail_validate_and_run(tmp_path, capsys):
    from conftest import cli, write_config
    from pipeline.config import InputConfig
    from pipeline.errors import InputError
    from pipeline.sources import list_shards, read_fragments
    from pipeline.storage import open_fs

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one line\n")
    cfg = InputConfig(uri=str(tmp_path / "in" / "a.txt"), words_field="words")
    fs, _ = open_fs(cfg.uri)
    with pytest.raises(InputError, match="is plain text .* input.words_field needs JSONL or Parquet shards"):
        list(read_fragments(fs, list_shards(cfg)[0], 10, cfg))
    config = write_config(tmp_path / "c.yaml", input={"uri": str(tmp_path / "in"), "words_field": "words"},
                          output={"uri": str(tmp_path / "out")})
    pq.write_table(pa.table({"text": ["a b"]}), tmp_path / "in" / "b.parquet")
    code, _, err = cli(capsys, "validate", str(config))
    assert code == 1 and err.count("\n") == 1 and "2 shards cannot be read (a.txt: shard a.txt is plain text" in err
    assert "; b.parquet: shard b.parquet has no column 'words' (input.words_field)); the rest is fine" in err


def test_the_layer_line_says_what_each_vector_is_made_of(model_info):
    from pipeline.config import parse_config
    from pipeline.runner import describe_outputs

    cfg = parse_config({"input": {"uri": "in/"}, "output": {"uri": "out/"}, "outputs": [
        {"name": "a", "layers": "-4:", "pooling": "mean", "combine": "concat"},
        {"name": "b", "layers": [-1, -2, -3, -4], "pooling": "none", "combine": "stack", "words": "first_last"},
        {"name": "c", "layers": [2, 4], "pooling": "first_last_avg", "combine": "concat"}]})
    outputs = tuple(resolve_output(spec, model_info.num_layers) for spec in cfg.outputs)
    assert describe_outputs(outputs, cfg, model_info) == (
        "a: layers [3, 4, 5, 6] of 0..6 concatenated in this order, pooling mean → [1536] per document; "
        "b: layers [6, 5, 4, 3] of 0..6 stacked in this order, pooling none, words first_last → [4, 768] per word; "
        "c: layers [1, 4] of 0..6, pooling first_last_avg (token-wise mean of 1 and 4) → [384] per document")


def test_no_documents_no_units(model_info):
    """A fragment whose documents were all quarantined still passes through the embedder."""
    for words in (True, False):
        outputs = tuple(resolve_output(s, model_info.num_layers) for s in specs())
        windows = TextTokenizer(model_info.path, 64, None, details=True, words=words).encode([])
        result = Embedder(EmbedSettings(model_info, outputs, "float32", 512, "float32"), torch.device("cpu")).embed(windows)
        assert all(len(v) == 0 for v in result.vectors.values())
        assert result.vectors["first_last_0"].shape == (0, 768)

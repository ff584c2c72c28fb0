"""Tokenizing long texts: the whitespace-cut shortcut gives exactly the whole text's first window."""

import json

import pytest

from pipeline.tokenize import CHARS_PER_TOKEN, TextTokenizer

from conftest import CORPUS


@pytest.fixture(scope="module")
def tokenizer(model_info):
    return TextTokenizer(model_info.path, 64, details=True)


def test_cutting_long_texts_changes_no_token(tokenizer):
    docs = [json.loads(line)["text"] for line in (CORPUS / "part-0.jsonl").read_text().splitlines()[:30]]
    limit = CHARS_PER_TOKEN * tokenizer.max_length
    texts = [
        *(doc * (limit // len(doc) + 2) for doc in docs),  # real prose and code, past the cut
        "x" * (limit * 2),  # no whitespace to cut at: tokenized whole (one [UNK] for BERT)
        "start" + " " * (limit + 10) + "word " * 500,  # the prefix fits in one window: tokenized whole
        "Zürich naïve café " * 2000, "日本語のテキストです。" * 2000, "tab\tseparated\nlines " * 2000,
        # no whitespace to cut at, or a prefix that does not overflow: cut twice, and the cuts agree
        "word " + "." * (limit * 3), "word" + "." * (limit * 3), "a," * (limit * 2), "😀" * (limit * 2),
        "e\u0301" * (limit * 2), "https://example.com/" + "a/b?c=d&" * limit,
    ]
    assert all(len(t) > limit for t in texts)
    cut = tokenizer._encode_truncated(texts)
    whole = tokenizer.backend.encode_batch(texts)
    for c, w in zip(cut, whole):
        assert (c.ids, c.offsets, c.word_ids, c.special_tokens_mask) == (w.ids, w.offsets, w.word_ids,
                                                                         w.special_tokens_mask)
        assert bool(c.overflowing) == bool(w.overflowing)  # the truncated flag
    # one [UNK] each for BERT's WordPiece (words past 100 characters): "x"s, emoji, accents stripped to "e"s
    assert sum(bool(w.overflowing) for w in whole) == len(texts) - 3


@pytest.mark.parametrize("text", ["word " + "." * 12_000_000, "supercalifragilistic." * 600_000],
                         ids=["a word and dots", "no whitespace at all"])
def test_a_huge_unbroken_document_is_tokenized_from_a_prefix_not_whole(tokenizer, text):
    """12 MB of one word and dots made the tokenizer allocate ~6 GB (about 500 bytes per character)
    and killed its worker; 12.6 MB of words joined by dots, 1.1 GB. Its first window comes from
    prefixes of a few thousand characters now: the backend never sees the whole text."""
    seen = []
    real = tokenizer.backend

    class Watched:  # the real tokenizer, with the length of every text it is given written down
        def __getattr__(self, name):
            method = getattr(real, name)

            def call(texts, *args, **kwargs):
                seen.extend(len(t) for t in (texts if isinstance(texts, list) else [texts]))
                return method(texts, *args, **kwargs)

            return call

    tokenizer.backend = Watched()
    try:
        windows = tokenizer.encode([text])
    finally:
        tokenizer.backend = real
    assert max(seen) <= 2 * CHARS_PER_TOKEN * tokenizer.max_length
    assert windows.ids.tolist() == real.encode(text[:100_000]).ids and windows.truncated.tolist() == [True]


def test_a_max_length_with_no_room_for_text_is_refused(model_info):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.max_length 2 leaves no room for text beside the model's 2 special "
                                          r"tokens; use at least 3"):
        TextTokenizer(model_info.path, 2)
    assert TextTokenizer(model_info.path, 3).encode(["hello world"]).n_tokens.tolist() == [3]


def test_without_token_details_the_tokenizer_skips_offsets_and_gives_the_same_windows(model_info):
    import numpy as np

    texts = [json.loads(line)["text"] for line in (CORPUS / "part-0.jsonl").read_text().splitlines()[:30]]
    texts += ["", "x " * 400]
    plain = TextTokenizer(model_info.path, 64).encode(texts)  # encode_batch_fast
    detailed = TextTokenizer(model_info.path, 64, details=True).encode(texts)  # encode_batch, offsets and all
    for field in ("ids", "lengths", "doc", "owned", "n_tokens", "truncated"):
        assert np.array_equal(getattr(plain, field), getattr(detailed, field)), field
    assert plain.truncated.any() and plain.offsets is None

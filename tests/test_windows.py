"""Long documents (sliding windows) and word-level vectors against a plain-transformers reference."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.config import OutputSpec
from pipeline.embedder import Embedder
from pipeline.spec import EmbedSettings, resolve_output
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS
from reference import Reference

MAX_LENGTH, STRIDE = 32, 8  # windows of 30 text tokens overlapping by 8: many windows per document
SPECS = [
    OutputSpec(name="mean", layers="all", pooling="mean", combine="stack"),
    OutputSpec(name="max", layers=[2, -1], pooling="max", combine="stack"),
    OutputSpec(name="cls", layers=[-1], pooling="cls", combine="stack"),
    OutputSpec(name="fla", layers=[-1], pooling="first_last_avg", combine="stack"),
    OutputSpec(name="tokens", layers=[0, -1], pooling="none", combine="stack"),
]


@pytest.fixture(scope="module")
def model(model_info):
    return dataclasses.replace(model_info, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def reference(model_info):
    return Reference(model_info.path)


@pytest.fixture(scope="module")
def long_text():
    with open(CORPUS / "part-0.jsonl") as f:
        return max((json.loads(line)["text"] for line in f), key=len)[:1500]


def run(model, texts, stride, window_rows=False, specs=SPECS):
    outputs = tuple(resolve_output(s, model.num_layers) for s in specs)
    settings = EmbedSettings(model, outputs, "float32", 512, "float32", window_rows=window_rows)
    windows = TextTokenizer(model.path, model.max_length, stride, details=True).encode(texts)
    return Embedder(settings, torch.device("cpu")).embed(windows), windows


def max_context_owner(n_content: int, windows: list[range]) -> list[int]:
    """For each text token, the window where it has the most context on its shorter side
    (BERT's SQuAD max-context rule, without its 0.01 × window-length bonus); ties go to the later window."""
    owners = []
    for p in range(n_content):
        score = {k: min(p - w.start, w.stop - 1 - p) for k, w in enumerate(windows) if p in w}
        owners.append(max(score, key=lambda k: (score[k], k)))
    return owners


def test_a_short_document_gives_the_same_vectors_as_truncate(model):
    texts = ["A short sentence fits in one window.", "So does this one."]
    truncated, _ = run(model, texts, None)
    windowed, windows = run(model, texts, STRIDE)
    rows, _ = run(model, texts, STRIDE, window_rows=True)
    assert len(windows.lengths) == 2 and not windows.truncated.any()
    for name in truncated.vectors:
        np.testing.assert_array_equal(windowed.vectors[name], truncated.vectors[name])
        np.testing.assert_array_equal(rows.vectors[name], truncated.vectors[name])


def test_windows_cover_every_token_once_and_aggregate_like_the_reference(model, reference, long_text):
    result, windows = run(model, [long_text], STRIDE)
    full = reference.tokenizer(long_text, add_special_tokens=False, return_offsets_mapping=True)
    content = full["input_ids"]
    encoded = reference.tokenizer(long_text, truncation=True, max_length=MAX_LENGTH, stride=STRIDE,
                                  return_overflowing_tokens=True)["input_ids"]
    assert len(encoded) >= 8 and len(windows.lengths) == len(encoded)
    step = MAX_LENGTH - 2 - STRIDE
    spans = [range(k * step, k * step + len(ids) - 2) for k, ids in enumerate(encoded)]
    for ids, span in zip(encoded, spans):
        assert ids[1:-1] == content[span.start : span.stop]  # the reference's windows, placed in the text
    assert windows.n_tokens[0] == sum(len(ids) for ids in encoded) and not windows.truncated[0]

    hidden = [reference.hidden(ids) for ids in encoded]  # per window: 7 x (T, D)
    owners = max_context_owner(len(content), spans)
    # every text token once, from its owning window, plus the first [CLS] and the last [SEP]
    per_token = [[hidden[k][layer][p - spans[k].start + 1] for p, k in enumerate(owners)]
                 for layer in range(7)]  # 7 x n_content x (D,)
    cls_first, sep_last = [h[0] for h in hidden[0]], [h[-1] for h in hidden[-1]]
    all_tokens = [np.stack([cls_first[i], *per_token[i], sep_last[i]]) for i in range(7)]

    np.testing.assert_allclose(result.vectors["mean"][0], np.stack([t.mean(0) for t in all_tokens]), atol=1e-5)
    np.testing.assert_allclose(result.vectors["max"][0], np.stack([all_tokens[i].max(0) for i in (2, 6)]), atol=1e-5)
    fla = ((all_tokens[1] + all_tokens[6]) / 2).mean(0)
    np.testing.assert_allclose(result.vectors["fla"][0, 0], fla, atol=1e-5)
    counts = np.bincount(owners, minlength=len(encoded)) + np.eye(len(encoded))[[0, -1]].sum(0)  # + [CLS], [SEP]
    cls = sum(c * h[6][0] for c, h in zip(counts, hidden)) / counts.sum()
    np.testing.assert_allclose(result.vectors["cls"][0, 0], cls, atol=1e-5)

    tokens = result.token_units["tokens"]
    assert tokens.counts.tolist() == [len(content)]  # each text token exactly once
    assert [tuple(s) for s in tokens.spans] == [tuple(o) for o in full["offset_mapping"]]
    expected = np.stack([np.stack(per_token[0]), np.stack(per_token[6])], axis=1)  # (n, L=2, D)
    np.testing.assert_allclose(result.vectors["tokens"], expected, atol=1e-5)


def test_aggregate_none_gives_one_row_per_window_with_its_span(model, reference, long_text):
    result, windows = run(model, [long_text, "short text"], STRIDE, window_rows=True)
    encoded = reference.tokenizer(long_text, truncation=True, max_length=MAX_LENGTH, stride=STRIDE,
                                  return_overflowing_tokens=True, return_offsets_mapping=True)
    n = len(encoded["input_ids"])
    assert result.rows.rows == n + 1 and result.vectors["mean"].shape[0] == n + 1
    assert windows.window_index.tolist() == [*range(n), 0]
    for k, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        assert windows.lengths[k] == len(ids)
        assert tuple(windows.span[k]) == (offsets[1][0], offsets[-2][1])
        hidden = reference.hidden(ids)
        np.testing.assert_allclose(result.vectors["mean"][k], np.stack([h.mean(0) for h in hidden]), atol=1e-5)
    assert result.token_units["tokens"].counts.tolist()[:n] == [len(ids) - 2 for ids in encoded["input_ids"]]


def test_word_vectors_line_up_with_the_words(model_info, reference):
    sentence = "Tokenization of unbelievably long words works fine"
    specs = [OutputSpec(name=f"w_{how}", layers=[-1], pooling="none", combine="concat", words=how)
             for how in ("first", "mean")]
    result, windows = run(model_info, [sentence], None, specs=specs)
    words = sentence.split()
    enc = reference.tokenizer(sentence)
    assert len(enc["input_ids"]) - 2 > len(words)  # some words are several sub-tokens
    hidden = reference.hidden(enc["input_ids"])[-1]
    word_ids = enc.word_ids()
    for how in ("first", "mean"):
        units = result.token_units[f"w_{how}"]
        assert [sentence[s:e] for s, e in units.spans] == words
        for w in range(len(words)):
            pieces = [t for t, wid in enumerate(word_ids) if wid == w]
            expected = hidden[pieces[0]] if how == "first" else hidden[pieces].mean(0)
            np.testing.assert_allclose(result.vectors[f"w_{how}"][w], expected, atol=1e-5)

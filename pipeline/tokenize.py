"""Text to model windows with the model folder's fast (Rust) tokenizer.

`truncate` keeps one window per document, cut at max_length. `sliding_window` keeps every
window the tokenizer's own overflow produces: windows of max_length tokens (special tokens
included) whose content overlaps the previous window's by `stride` tokens.

Each window *owns* a contiguous range of its positions, so that across a document's windows
every token is owned exactly once: a token in an overlap belongs to the window where it has
more context (the later window on a tie), the first window owns the leading special tokens and
the last one the trailing ones. A one-window document owns all of its tokens. Aggregating
windows over owned tokens is what makes `aggregate: mean` count each token once.

Pre-tokenized documents (a list of words each, `input.words_field`) are encoded as transformers'
`is_split_into_words=True` does: every word goes through the normalizer and pre-tokenizer on its
own, each sub-token's word id is the index of the given word, and its character offsets are
inside that word. A word the tokenizer turns into nothing (a lone combining accent, a zero-width
character) has no sub-token; `n_words` keeps the count of given words.

The tokenizer is the one `AutoTokenizer` gives for the folder (see `load_backend`), so that
strata's tokens are a user's `AutoTokenizer` tokens. Token type ids travel only where that
tokenizer makes some that are not 0 and the model takes them (every model defaults them to 0).

Everything is flat numpy (ids back to back, per-window lengths), so a fragment's tokens travel
between Ray stages as a few Arrow columns, not as Python lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError, ModelError, escaped, one_line

if TYPE_CHECKING:
    from pipeline.model import ModelInfo

CHARS_PER_TOKEN = 32  # a generous bound: real text averages about 4 characters per token
# a tokenizer override saying: the model part is tokenizer.json's as the tokenizers library reads it
MODEL_AS_TOKENIZERS_READS_IT = "as tokenizers reads tokenizer.json"


@dataclass
class TokenWindows:
    """A fragment's documents as model windows; documents' windows are consecutive, in order."""

    ids: np.ndarray  # (sum of lengths,) int32, all windows back to back
    lengths: np.ndarray  # (W,) int32 tokens per window, special tokens included
    doc: np.ndarray  # (W,) int32 document index of each window
    owned: np.ndarray  # (W, 2) int32 [lo, hi) window positions that count for the document
    span: np.ndarray  # (W, 2) int32 character span of the window's text (zeros unless windowed)
    n_tokens: np.ndarray  # (N,) int32 tokens fed to the model per document (all windows)
    truncated: np.ndarray  # (N,) bool, text was cut at max_length
    # token details, only when a token-level output needs them (else None):
    special: np.ndarray | None = None  # (sum of lengths,) bool, a special token ([CLS], [SEP])
    word_ids: np.ndarray | None = None  # (sum of lengths,) int32 word index in the document, -1 if none
    offsets: np.ndarray | None = None  # (sum of lengths, 2) int32 character [start, end) (in its word, if given)
    n_words: np.ndarray | None = None  # (N,) int32 given words per document (pre-tokenized input only)
    type_ids: np.ndarray | None = None  # (sum of lengths,) int8 token type ids, where the model gets them

    @property
    def starts(self) -> np.ndarray:
        """(W + 1,) int64 offsets of each window in `ids`."""
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    @property
    def window_index(self) -> np.ndarray:
        """(W,) int32 index of each window inside its document (0, 1, ...)."""
        first = np.searchsorted(self.doc, self.doc, side="left")
        return (np.arange(len(self.doc)) - first).astype(np.int32)

    def to_table(self) -> pa.Table:
        """One row per window, for the trip to the embed stage."""
        offsets = pa.array(self.starts.astype(np.int32))
        columns = {
            "doc": pa.array(self.doc),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.ids)),
            "owned_lo": pa.array(self.owned[:, 0]), "owned_hi": pa.array(self.owned[:, 1]),
            "span_start": pa.array(self.span[:, 0]), "span_end": pa.array(self.span[:, 1]),
        }
        if self.special is not None:
            columns["special"] = pa.ListArray.from_arrays(offsets, pa.array(self.special))
            columns["word_ids"] = pa.ListArray.from_arrays(offsets, pa.array(self.word_ids))
            columns["offset_start"] = pa.ListArray.from_arrays(offsets, pa.array(self.offsets[:, 0]))
            columns["offset_end"] = pa.ListArray.from_arrays(offsets, pa.array(self.offsets[:, 1]))
        if self.type_ids is not None:
            columns["type_ids"] = pa.ListArray.from_arrays(offsets, pa.array(self.type_ids))
        return pa.table(columns)

    def select(self, keep: np.ndarray) -> "TokenWindows":
        """The windows of the documents where `keep` (N,) bool is true, documents renumbered."""
        window_kept = keep[self.doc]
        token_kept = np.repeat(window_kept, self.lengths)
        renumber = np.cumsum(keep, dtype=np.int32) - 1

        def tokens(values):
            return None if values is None else values[token_kept]

        return TokenWindows(self.ids[token_kept], self.lengths[window_kept], renumber[self.doc[window_kept]],
                            self.owned[window_kept], self.span[window_kept], self.n_tokens[keep], self.truncated[keep],
                            tokens(self.special), tokens(self.word_ids), tokens(self.offsets),
                            None if self.n_words is None else self.n_words[keep], tokens(self.type_ids))

    @classmethod
    def from_table(cls, table: pa.Table, n_tokens: np.ndarray, truncated: np.ndarray,
                   n_words: np.ndarray | None = None) -> "TokenWindows":
        def flat(name):
            return table[name].combine_chunks().values.to_numpy(zero_copy_only=False)

        def column(name):
            return table[name].to_numpy()

        details = "special" in table.column_names
        return cls(
            ids=flat("input_ids"),
            lengths=pc.list_value_length(table["input_ids"]).to_numpy().astype(np.int32),
            doc=column("doc"),
            owned=np.stack([column("owned_lo"), column("owned_hi")], axis=1),
            span=np.stack([column("span_start"), column("span_end")], axis=1),
            n_tokens=n_tokens,
            truncated=truncated,
            special=flat("special") if details else None,
            word_ids=flat("word_ids") if details else None,
            offsets=np.stack([flat("offset_start"), flat("offset_end")], axis=1) if details else None,
            n_words=n_words,
            type_ids=flat("type_ids") if "type_ids" in table.column_names else None,
        )


class TextTokenizer:
    """The tokenizer of `model` (a resolved ModelInfo; a bare folder path takes its tokenizer.json
    as it is). `stride` None = truncate; a number = sliding windows overlapping by that many
    tokens; `words`: documents are lists of words (pre-tokenized), not texts."""

    def __init__(self, model: "ModelInfo | str", max_length: int, stride: int | None = None, details: bool = False,
                 words: bool = False):
        path, overrides = (model, None) if isinstance(model, str) else (model.path, model.tokenizer_overrides)
        self.backend = load_backend(path, overrides)
        self.backend.no_padding()
        self.prefix, self.suffix = special_counts(self.backend)
        # token types that are all 0 are what every model assumes without them: they need not travel
        self.typed = not isinstance(model, str) and model.token_type_ids and any(self.backend.encode("x").type_ids)
        if max_length <= self.prefix + self.suffix:
            raise ConfigError(f"model.max_length {max_length} leaves no room for text beside the model's "
                              f"{self.prefix + self.suffix} special tokens; use at least {self.prefix + self.suffix + 1}")
        if stride is not None:
            check_stride(stride, max_length, self.prefix + self.suffix)
        self.backend.enable_truncation(max_length, stride=stride or 0)
        self.max_length, self.stride, self.details, self.words = max_length, stride, details, words

    def empty(self, windows: "TokenWindows") -> np.ndarray:
        """(N,) bool: documents the tokenizer kept nothing of but the special tokens (text made only
        of characters it strips: zero-width and bidi controls, soft hyphens, lone BOMs, ...)."""
        return windows.n_tokens <= self.prefix + self.suffix

    def encode(self, texts: list[str] | list[list[str]]) -> TokenWindows:
        """Texts, or lists of words when the tokenizer was made with `words=True`."""
        if self.stride is None:
            encodings = self._encode_truncated(texts)
            windows = [[e] for e in encodings]
            truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        else:
            encodings = self.backend.encode_batch(texts, is_pretokenized=self.words)
            windows = [[e, *e.overflowing] for e in encodings]
            truncated = np.zeros(len(encodings), dtype=bool)
        flat = [w for doc in windows for w in doc]
        counts = np.fromiter(map(len, windows), dtype=np.int32, count=len(windows))
        id_lists = [w.ids for w in flat]  # each access of .ids builds a new list: once
        lengths = np.fromiter(map(len, id_lists), dtype=np.int32, count=len(flat))
        doc = np.repeat(np.arange(len(windows), dtype=np.int32), counts)
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=total)
        n_tokens = np.bincount(doc, weights=lengths, minlength=len(windows)).astype(np.int32)
        owned, span = self._owned(lengths, doc), np.zeros((len(flat), 2), np.int32)
        if self.stride is not None and not self.words:  # a window's span in the text: there is no text
            span = np.array([self._span(w) for w in flat], np.int32).reshape(-1, 2)
        result = TokenWindows(ids, lengths, doc, owned, span, n_tokens, truncated)
        if self.words:
            result.n_words = np.fromiter(map(len, texts), np.int32, count=len(texts))
        if self.typed:
            result.type_ids = np.fromiter(chain.from_iterable(w.type_ids for w in flat), np.int8, count=total)
        if self.details:
            result.special = np.fromiter(chain.from_iterable(w.special_tokens_mask for w in flat), bool, count=total)
            result.word_ids = np.fromiter(
                (-1 if i is None else i for w in flat for i in w.word_ids), np.int32, count=total)
            result.offsets = np.fromiter(
                chain.from_iterable(chain.from_iterable(w.offsets for w in flat)), np.int32, count=2 * total
            ).reshape(-1, 2)
        return result

    def _encode_truncated(self, texts: list[str]) -> list:
        """Encodings of texts cut at max_length, without tokenizing megabytes to keep 256 tokens.

        A long text is first cut after the last whitespace within CHARS_PER_TOKEN * max_length
        characters (a list of words after its first max_length words). Pre-tokenizers split words
        at whitespace, so the words before the cut give the same tokens as in the whole text; if
        the prefix still overflows max_length, its first window is the whole text's. A long text
        with no whitespace to cut at, or whose prefix does not overflow (a word, a space and 12 MB
        of dots), is cut at that many characters and at twice as many: when both prefixes overflow and agree, the cut lies past max_length
        tokens and changed none of them. Otherwise the text is tokenized whole (a tokenizer needs
        some hundred bytes per character: that is the memory this saves).
        """
        limit = CHARS_PER_TOKEN * self.max_length
        if self.words:
            cut = [words[: self.max_length] for words in texts]
        else:
            # no whitespace to cut at (None): a prefix stands in, and `_unbroken` decides below
            cut = [_prefix_at_whitespace(text, limit) for text in texts]
        encodings = self._batch([text[:limit] if prefix is None else prefix for prefix, text in zip(cut, texts)])
        for i, (prefix, text, encoding) in enumerate(zip(cut, texts, encodings)):
            if self.words:
                if len(prefix) < len(text) and not encoding.overflowing:
                    encodings[i] = self.backend.encode(text, is_pretokenized=True)
            elif len(text) > limit and (prefix is None or not encoding.overflowing):
                encodings[i] = self._unbroken(text, limit)
        return encodings

    def _unbroken(self, text: str, limit: int):
        """The truncated encoding of a long text without whitespace to cut at (see `_encode_truncated`)."""
        short, longer = self._batch([text[:limit], text[:2 * limit]])
        if short.overflowing and longer.overflowing and short.ids == longer.ids and \
                short.type_ids == longer.type_ids:
            return short
        return self.backend.encode(text)

    def _batch(self, texts: list[str]) -> list:
        """encode_batch, without character offsets when nothing needs them (tokenizers'
        encode_batch_fast: ~25 % less CPU on docs-50k, the same ids and overflow)."""
        if self.details or self.stride is not None:
            return self.backend.encode_batch(texts, is_pretokenized=self.words)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # tokenizers < 0.20.1
        return encode(texts, is_pretokenized=self.words)

    def _owned(self, lengths: np.ndarray, doc: np.ndarray) -> np.ndarray:
        # (W, 2): everything for a lone window; inner overlaps split where context is larger
        lo, hi = np.zeros_like(lengths), lengths.copy()
        if self.stride is not None and len(doc):
            first = np.r_[True, doc[1:] != doc[:-1]]
            last = np.r_[doc[1:] != doc[:-1], True]
            lo[~first] = self.prefix + self.stride // 2
            hi[~last] = lengths[~last] - self.suffix - (self.stride - self.stride // 2)
        return np.stack([lo, hi], axis=1)

    def _span(self, window) -> tuple[int, int]:
        content = [pair for pair, special in zip(window.offsets, window.special_tokens_mask) if not special]
        return (content[0][0], content[-1][1]) if content else (0, 0)


def _prefix_at_whitespace(text: str, limit: int) -> str | None:
    """The text up to its last whitespace within `limit` characters (all of a short text); None
    when a long text has no whitespace there."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(space, 0, limit) for space in " \n\t")
    return text[:cut] if cut > 0 else None


def special_counts(backend) -> tuple[int, int]:
    """Special tokens the model's post-processor puts before and after a text ([CLS] … [SEP] = 1, 1)."""
    mask = backend.encode("x").special_tokens_mask
    prefix = next((i for i, m in enumerate(mask) if not m), len(mask))
    return prefix, len(mask) - prefix - sum(1 for m in mask[prefix:] if not m)


def check_stride(stride: int, max_length: int, added: int) -> None:
    content = max_length - added
    if stride >= content:
        raise ConfigError(
            f"long_text.stride {stride} must be smaller than a window's text, which is {content} tokens "
            f"(max_length {max_length} minus {added} special tokens); try stride: {content // 2}"
        )


def load_backend(model_path: str, overrides: str | None = None):
    """The Rust tokenizer `AutoTokenizer` gives for the folder: tokenizer.json with `overrides`
    (the parts transformers builds otherwise, found by `architecture.tokenizer_overrides`) in
    place, its Unigram scores exact (see `exact_unigram`). Without tokenizer.json and overrides,
    transformers converts the folder's vocabulary files. A ModelError (one line: the folder, the
    file, the cause) when neither gives a tokenizer with a vocabulary."""
    from tokenizers import Tokenizer

    def fail(why: str, exc: BaseException | None = None) -> ModelError:
        cause = "" if exc is None else f" ({escaped(one_line(exc))})"  # tokenizers echoes the file
        return ModelError(f"cannot load the tokenizer of {model_path}: {why}{cause}")

    folder = Path(model_path)
    file = folder / "tokenizer.json"
    if file.is_file() or overrides:
        source = file.name if file.is_file() else "the tokenizer transformers builds"
        changed = json.loads(overrides) if overrides else {}
        as_read = changed.pop("model", None) if changed.get("model") == MODEL_AS_TOKENIZERS_READS_IT else None
        try:
            if file.is_file():  # tokenizers' own reading first: its errors name the fault in the file
                backend = Tokenizer.from_file(str(file))
            if changed or (not as_read and type(backend.model).__name__ == "Unigram"):
                spec = json.loads(file.read_bytes()) if file.is_file() else {"version": "1.0"}
                spec.update(changed)
                backend = Tokenizer.from_str(json.dumps(spec))
                if not as_read:
                    exact_unigram(backend, spec.get("model"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
            raise fail("tokenizer.json is not valid", exc) from None
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True)
        except Exception as exc:  # noqa: BLE001 - unknown tokenizer class, bad vocabulary file, ...
            raise fail("there is no tokenizer.json and transformers cannot build a tokenizer", exc) from None
        names = list(dict.fromkeys(type(tokenizer).vocab_files_names.values()))
        present = [name for name in names if (folder / name).is_file()]
        if names and not present:
            # without its files transformers builds a tokenizer that knows only [CLS], [SEP], [UNK], ...
            raise fail(f"the folder holds no tokenizer files ({' or '.join(names)})")
        source, backend = " and ".join(present) or "the tokenizer", tokenizer.backend_tokenizer
    if backend.get_vocab_size(with_added_tokens=False) == 0:
        raise fail(f"{source} holds an empty vocabulary")
    return backend


def exact_unigram(backend, model: dict | None) -> None:
    """Give a Unigram model the scores its JSON holds, exactly. tokenizers parses the scores of
    tokenizer.json a unit in the last place off now and then (-3.65884015932 becomes
    -3.6588401593200004), while transformers passes them as Python floats: where two segmentations
    of a text score the same ('=' * 27 in a small vocabulary), the two then break the tie apart
    and give other tokens. Rebuilt from Python's floats, the model is transformers' own."""
    from tokenizers.models import Unigram

    if not isinstance(model, dict) or model.get("type") != "Unigram" or not model.get("vocab"):
        return
    backend.model = Unigram([(piece, float(score)) for piece, score in model["vocab"]], model.get("unk_id"),
                            bool(model.get("byte_fallback", False)))

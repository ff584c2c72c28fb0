"""A broken model folder ends on the driver in one ModelError line naming the file and what is wrong.

Each test copies the packaged model and breaks one file. The weights stay a link to the packaged
file unless a test breaks them, and then `write` replaces the link, never what it points to.
"""

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece

from pipeline.config import ModelConfig
from pipeline.errors import ModelError
from pipeline.model import WEIGHT_FILES, check_model_folder, check_weights_load, default_model_path, resolve_model
from pipeline.tokenize import TextTokenizer


class NotATensor:
    """Pickled into a pytorch_model.bin: torch.load(weights_only=True) must refuse it."""


@pytest.fixture
def folder(tmp_path) -> Path:
    source, target = default_model_path(), tmp_path / "model"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    for name in WEIGHT_FILES:
        if (source / name).is_file():
            (target / name).symlink_to(source / name)
    return target


def write(path: Path, content) -> None:
    path.unlink(missing_ok=True)  # a link to the packaged weights: replace it, do not write through it
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def edit_json(path: Path, **fields) -> None:
    write(path, json.dumps({**json.loads(path.read_text()), **fields}))


def refused(call, *args, match: str) -> str:
    """The ModelError `call(*args)` raises, checked to be one plain line."""
    with pytest.raises(ModelError, match=match) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and "Traceback" not in message
    return message


def resolve(folder: Path):
    return resolve_model(ModelConfig(name_or_path=str(folder)))


def test_the_packaged_model_passes_every_check():
    info = resolve_model(ModelConfig())
    assert (info.num_layers, info.hidden_size, info.max_length) == (6, 384, 256)
    check_model_folder(info, with_transformers=True)
    check_weights_load(info)
    probe = ("import sys, pipeline.model as m; m.check_model_folder(m.resolve_model(m.ModelConfig())); "
             "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"  # a run's checks keep the driver torch-free


@pytest.mark.parametrize("content, why", [
    ("{oops", "is not valid JSON"), ("", "is not valid JSON"), (b"\xff\xfe\x00", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"), ('"bert"', "holds a JSON str"), ("[" * 100_000, "is not valid JSON"),
])
def test_config_json_that_is_not_a_json_object(folder, content, why):
    write(folder / "config.json", content)
    refused(resolve, folder, match=rf"config\.json {why}")


@pytest.mark.parametrize("field, value, why", [
    ("num_hidden_layers", "twelve", "must be a positive integer, not 'twelve'"),
    ("num_hidden_layers", -1, "must be a positive integer, not -1"),
    ("num_hidden_layers", 1e9, "must be a positive integer, not 1000000000.0"),
    ("num_hidden_layers", 6.0, "must be a positive integer"),
    ("num_hidden_layers", True, "must be a positive integer, not True"),
    ("num_hidden_layers", 10**9, "1000000000 is beyond any real encoder"),
    ("hidden_size", "384", "must be a positive integer"),
    ("hidden_size", -384, "must be a positive integer"),
    ("hidden_size", 1e9, "must be a positive integer"),
    ("num_attention_heads", "12", "must be a positive integer"),
    ("max_position_embeddings", "512", "must be a positive integer"),
    ("max_position_embeddings", [512], "must be a positive integer"),
])
def test_config_json_sizes_must_be_positive_integers(folder, field, value, why):
    edit_json(folder / "config.json", **{field: value})
    refused(resolve, folder, match=rf"config\.json: {field} {why}")


@pytest.mark.parametrize("heads", [7, 500])
def test_config_json_hidden_size_that_heads_cannot_split(folder, heads):
    edit_json(folder / "config.json", num_attention_heads=heads)
    refused(resolve, folder, match=rf"config\.json: hidden_size 384 is not divisible by num_attention_heads {heads}")


@pytest.mark.parametrize("file, content, why", [
    ("sentence_bert_config.json", '{"max_seq_length": 256', " is not valid JSON"),
    ("sentence_bert_config.json", "[256]", " holds a JSON list"),
    ("sentence_bert_config.json", '{"max_seq_length": "256"}', ": max_seq_length must be a positive integer"),
    ("sentence_bert_config.json", '{"max_seq_length": -5}', ": max_seq_length must be a positive integer"),
    ("sentence_bert_config.json", '{"max_seq_length": 1}', " limits sequences to 1 tokens"),
    ("tokenizer_config.json", "{'model_max_length': 512}", " is not valid JSON"),
    ("tokenizer_config.json", '{"model_max_length": "512"}', ": model_max_length must be a positive integer"),
    ("tokenizer_config.json", '{"model_max_length": true}', ": model_max_length must be a positive integer"),
])
def test_sequence_limit_files_that_are_broken(folder, file, content, why):
    write(folder / file, content)
    refused(resolve, folder, match=rf"{re.escape(file)}{why}")


@pytest.mark.parametrize("content, why", [
    (lambda whole: whole[: len(whole) // 2], "EOF while parsing"),  # cut in half
    (lambda whole: b"not a tokenizer", "expected ident"),
    (lambda whole: b'{"version": "1.0"}', "Model missing"),  # JSON, but not a tokenizer
    (lambda whole: b"[]", "invalid type"),
    # tokenizers echoes the file: the colour code comes back escaped or removed, never raw
    (lambda whole: b'{"version": "\\u001b[31m9"}', r"Unknown tokenizer version '(\\x1b\[31m)?9'"),
])
def test_tokenizer_json_that_is_not_a_tokenizer(folder, content, why):
    write(folder / "tokenizer.json", content((folder / "tokenizer.json").read_bytes()))
    expected = rf"^cannot load the tokenizer of {re.escape(str(folder))}: tokenizer\.json is not valid \(.*({why})"
    message = refused(TextTokenizer, str(folder), 128, match=expected)
    assert refused(resolve, folder, match="tokenizer.json") == message  # the driver says it, before any worker starts


def test_tokenizer_json_that_loads_but_cannot_encode(folder):
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"]["single"][0] = {"SpecialToken": {"id": "[NOPE]", "type_id": 0}}
    write(folder / "tokenizer.json", json.dumps(tokenizer))  # Rust panics on encode: no such special token
    # the generic class keeps tokenizer.json's post-processor (BertTokenizer would build its own)
    edit_json(folder / "tokenizer_config.json", tokenizer_class="TokenizersBackend")
    refused(check_model_folder, resolve(folder), match=rf"tokenizer of {re.escape(str(folder))}: PanicException: ")


def test_tokenizer_json_with_an_empty_vocabulary(folder):
    write(folder / "tokenizer.json", Tokenizer(WordPiece(unk_token="[UNK]")).to_str())
    refused(TextTokenizer, str(folder), 128, match=r"tokenizer\.json holds an empty vocabulary")


@pytest.mark.parametrize("removed", [
    ["tokenizer.json", "vocab.txt"],
    ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"],
])
def test_folder_without_tokenizer_files(folder, removed):
    for name in removed:
        (folder / name).unlink()
    refused(TextTokenizer, str(folder), 128, match=r"no tokenizer files \(vocab\.txt or tokenizer\.json\)")


def test_folder_with_only_vocab_txt_still_gets_its_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    converted = TextTokenizer(str(folder), 128).encode(["Hello, tokenizer world"])
    original = TextTokenizer(str(default_model_path()), 128).encode(["Hello, tokenizer world"])
    assert converted.ids.tolist() == original.ids.tolist()


@pytest.mark.parametrize("fields, why", [
    ({"model_type": "not-a-model"}, r"config\.json: ValueError: .*not-a-model"),
    ({"vocab_size": "many"}, r"config\.json: .*vocab_size.*expected int, got str"),
    ({"hidden_act": 7}, r"config\.json: .*hidden_act"),
])
def test_config_json_transformers_cannot_read(folder, fields, why):
    edit_json(folder / "config.json", **fields)  # the sizes strata reads itself are fine
    refused(resolve, folder, match=rf"transformers cannot read .*{why}")  # the run's driver asks transformers too


def test_tokenizer_of_another_model(folder):
    edit_json(folder / "config.json", vocab_size=1000)
    refused(check_model_folder, resolve(folder),
            match=r"config\.json: vocab_size 1000 is too small for the tokenizer, whose ids reach 30521")


@pytest.mark.parametrize("save, why", [
    (lambda f: torch.save({"embeddings.word_embeddings.weight": NotATensor()}, f),
     r" holds objects other than tensors, which torch\.load\(weights_only=True\) refuses \(.*NotATensor"),
    (lambda f: torch.save({"x": {1, 2}}, f), r" lacks 101 of the model's tensors"),  # loads, holds no weights
    (lambda f: pickle.dump({"x": 1}, f, protocol=2), r": RuntimeError: Invalid magic number"),  # not torch's format
])
def test_pytorch_model_bin_that_holds_no_weights(folder, save, why):
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        save(f)
    refused(check_weights_load, resolve(folder), match=rf"pytorch_model\.bin{why}")


@pytest.mark.parametrize("cut", [lambda size: size // 2, lambda size: size - 1, lambda size: 4])
def test_model_safetensors_that_is_truncated(folder, cut):
    whole = (folder / "model.safetensors").read_bytes()
    write(folder / "model.safetensors", whole[: cut(len(whole))])
    refused(check_weights_load, resolve(folder), match=r"model\.safetensors: SafetensorError: .*(header|metadata)")


@pytest.mark.parametrize("fields, why", [
    ({"hidden_size": 768}, r"does not match config\.json: .* is \[\d+(, 384)?\] in the weights but \[\d+(, 768)?\]"),
    ({"intermediate_size": 1024}, r"does not match config\.json: .*intermediate.* is \[1536(, 384)?\]"),
    ({"num_hidden_layers": 8}, r"lacks 32 of the model's tensors \(encoder\.layer\.6\..*config\.json describes"),
])
def test_weights_that_do_not_match_config_json(folder, fields, why):
    edit_json(folder / "config.json", **fields)
    refused(check_weights_load, resolve(folder), match=rf"model\.safetensors {why}")

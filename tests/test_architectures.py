"""Every encoder architecture strata supports, each layer equal to transformers' own.

For each architecture a tiny random model is built here (tests/tiny_models.py) and embedded with
every pooling and combine, a middle layer and the deepest layer of a cut model, the whole model,
token and word outputs and sliding windows; each vector is compared with plain transformers:
`AutoTokenizer` + `AutoModel` of the *uncut* model, `output_hidden_states=True`, fp32, one
document at a time. strata runs padded, length-sorted micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ModelConfig, OutputSpec
from pipeline.embedder import Embedder
from pipeline.errors import ConfigError, ModelError
from pipeline.model import resolve_model
from pipeline.spec import EmbedSettings, resolve_output
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS
from reference import Reference, combine, pool
from test_windows import max_context_owner
from tiny_models import ARCHITECTURES, LIMIT, Tiny, build, corpus_texts

POOLINGS = ["cls", "mean", "max", "first_last_avg"]
COMBINES = ["stack", "concat", "mean", "sum", "weighted"]
WORDS = ["first", "last", "mean", "first_last"]
STRIDE = 16
ATOL = 1e-5


@lru_cache(maxsize=None)
def folder_of(name: str) -> Path:
    import tempfile

    arch = next(a for a in ARCHITECTURES if a.name == name)
    return build(arch, Path(tempfile.mkdtemp(prefix=f"tiny-{name}-")))


@lru_cache(maxsize=None)
def reference_of(name: str) -> Reference:
    return Reference(str(folder_of(name)))


def texts() -> list[str]:
    docs = corpus_texts()
    return docs[:10] + ["A short sentence.", "=" * 47, "Zoë's café in São Paulo, 東京 🙂", docs[11][:200]]


def embed(info, specs, documents, stride=None, token_budget=512):
    outputs = tuple(resolve_output(spec, info.num_layers) for spec in specs)
    embedder = Embedder(EmbedSettings(info, outputs, "float32", token_budget, "float32"), torch.device("cpu"))
    details = any(out.token_level for out in outputs)
    windows = TextTokenizer(info, info.max_length, stride, details=details).encode(documents)
    return embedder, embedder.embed(windows), windows


def rows(result, name: str) -> list[np.ndarray]:
    """Per row: its vector, or the (units, ...) vectors of a token-level output."""
    units = result.token_units.get(name)
    vectors = result.vectors[name]
    if units is None:
        return list(vectors)
    ends = np.cumsum(units.counts)
    return np.split(vectors, ends[:-1])


def weights_for(n: int) -> list[float]:
    w = np.linspace(0.5, 2.0, n)
    return list(w / w.sum())


def cut_specs() -> list[OutputSpec]:
    """Outputs that stop at layer 2 of 4: every pooling and combine of a middle and a deepest layer,
    sub-token vectors and word vectors."""
    specs = []
    for pooling in POOLINGS:
        for how in COMBINES:
            n = 1 if pooling == "first_last_avg" else 2
            specs.append(OutputSpec(name=f"{pooling}_{how}", layers=[0, 2], pooling=pooling, combine=how,
                                    weights=weights_for(n) if how == "weighted" else None,
                                    normalize=how == "concat"))
    specs.append(OutputSpec(name="tokens", layers=[1, 2], pooling="none", combine="stack"))
    specs += [OutputSpec(name=f"words_{how}", layers=[2, 1], pooling="none", combine="concat", words=how)
              for how in WORDS]
    return specs


def expected_pooled(hidden, spec: OutputSpec, num_layers: int) -> np.ndarray:
    layers = resolve_output(spec, num_layers).layers
    return combine(pool(hidden, list(layers), spec.pooling), spec.combine, spec.weights, spec.normalize)


def expected_tokens(hidden, encoding, layers) -> np.ndarray:
    keep = [i for i, special in enumerate(encoding["special_tokens_mask"]) if not special]
    return np.stack([hidden[layer][keep] for layer in layers], axis=1)  # (n, L, D)


def expected_words(hidden, encoding, layers, how: str) -> np.ndarray:
    # the encoding's words in order, each from its sub-tokens' vectors (layers concatenated first)
    per_token = np.concatenate([hidden[layer] for layer in layers], axis=-1)
    words: dict[int, list[int]] = {}
    for position, word in enumerate(encoding.word_ids()):
        if word is not None and not encoding["special_tokens_mask"][position]:
            words.setdefault(word, []).append(position)
    result = []
    for positions in words.values():
        pieces = per_token[positions]
        result.append({"first": pieces[0], "last": pieces[-1], "mean": pieces.mean(0),
                       "first_last": np.concatenate([pieces[0], pieces[-1]])}[how])
    return np.stack(result)


@pytest.fixture(params=[a.name for a in ARCHITECTURES])
def arch(request) -> str:
    return request.param


def test_every_output_equals_the_uncut_model_of_transformers(arch):
    info = resolve_model(ModelConfig(name_or_path=str(folder_of(arch))))
    reference = reference_of(arch)
    assert (info.num_layers, info.max_length) == (4, LIMIT)  # positions for 64 tokens, whatever the rule
    documents = texts()
    encodings = [reference.tokenizer(text, truncation=True, max_length=LIMIT, return_special_tokens_mask=True)
                 for text in documents]
    assert max(len(e["input_ids"]) for e in encodings) == LIMIT  # documents fill every position there is
    hidden = [reference.hidden_of(e) for e in encodings]

    # a model cut after layer 2: pooled, token and word outputs
    embedder, result, windows = embed(info, cut_specs(), documents)
    assert len(windows.lengths) == len(documents)
    assert [list(ids) for ids in np.split(windows.ids, np.cumsum(windows.lengths)[:-1])] == \
        [e["input_ids"] for e in encodings]  # AutoTokenizer's tokens, to the last one
    tiny = next(a for a in ARCHITECTURES if a.name == arch)
    assert (embedder.encoder.tap is not None) == tiny.early_exit  # early exit really happened where it can
    assert embedder.encoder.needs_equal_lengths == tiny.leaks_padding  # padded micro-batches wherever they are exact
    worst = 0.0
    for spec in cut_specs():
        for row, (h, e) in enumerate(zip(hidden, encodings)):
            if spec.pooling != "none":
                want = expected_pooled(h, spec, 4)
            elif spec.words == "none":
                want = expected_tokens(h, e, [1, 2])
            else:
                want = expected_words(h, e, [2, 1], spec.words)
            got = rows(result, spec.name)[row]
            assert got.shape == want.shape, spec.name
            worst = max(worst, float(np.abs(got - want).max()))
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{arch} {spec.name} row {row}")
    assert worst > 0  # real arithmetic on both sides

    # the whole model: every layer, the last one as transformers reports it (after any final norm)
    whole = [OutputSpec(name="all_mean", layers="all", pooling="mean", combine="stack"),
             OutputSpec(name="last_cls", layers=[-1], pooling="cls", combine="concat"),
             OutputSpec(name="last_tokens", layers=[-1], pooling="none", combine="concat")]
    embedder, result, _ = embed(info, whole, documents)
    assert embedder.encoder.tap is None
    for row, (h, e) in enumerate(zip(hidden, encodings)):
        np.testing.assert_allclose(result.vectors["all_mean"][row], expected_pooled(h, whole[0], 4), atol=ATOL)
        np.testing.assert_allclose(result.vectors["last_cls"][row], h[4][0], atol=ATOL)
        np.testing.assert_allclose(rows(result, "last_tokens")[row], expected_tokens(h, e, [4])[:, 0], atol=ATOL)


def test_sliding_windows_equal_the_uncut_model_window_by_window(arch):
    info = resolve_model(ModelConfig(name_or_path=str(folder_of(arch))))
    reference = reference_of(arch)
    text = " ".join(corpus_texts()[:3])[:3000]
    specs = [OutputSpec(name="mean", layers=[3], pooling="mean", combine="stack"),
             OutputSpec(name="max", layers=[1, 3], pooling="max", combine="stack"),
             OutputSpec(name="cls", layers=[3], pooling="cls", combine="stack"),
             OutputSpec(name="tokens", layers=[3], pooling="none", combine="stack")]
    _, result, windows = embed(info, specs, [text], stride=STRIDE)
    encoded = reference.tokenizer(text, truncation=True, max_length=LIMIT, stride=STRIDE,
                                  return_overflowing_tokens=True, return_special_tokens_mask=True)
    count = len(encoded["input_ids"])
    assert count >= 4 and len(windows.lengths) == count
    mask = encoded["special_tokens_mask"][0]
    prefix = mask.index(0)
    suffix = len(mask) - prefix - sum(1 for m in mask if not m)
    content = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    step = LIMIT - prefix - suffix - STRIDE
    spans = [range(k * step, k * step + len(ids) - prefix - suffix) for k, ids in enumerate(encoded["input_ids"])]
    for ids, span in zip(encoded["input_ids"], spans):
        assert ids[prefix:len(ids) - suffix] == content[span.start : span.stop]
    hidden = [reference.hidden_of({name: values[k] for name, values in encoded.items()}) for k in range(count)]
    owners = max_context_owner(len(content), spans)
    per_token = [np.stack([hidden[k][layer][p - spans[k].start + prefix] for p, k in enumerate(owners)])
                 for layer in range(5)]
    everything = [np.concatenate([hidden[0][layer][:prefix], per_token[layer],
                                  hidden[-1][layer][len(hidden[-1][layer]) - suffix:]]) for layer in range(5)]
    np.testing.assert_allclose(result.vectors["mean"][0, 0], everything[3].mean(0), atol=ATOL)
    np.testing.assert_allclose(result.vectors["max"][0], np.stack([everything[1].max(0), everything[3].max(0)]),
                               atol=ATOL)
    owned = np.bincount(owners, minlength=count) + prefix * np.eye(count)[0] + suffix * np.eye(count)[-1]
    cls = sum(c * h[3][0] for c, h in zip(owned, hidden)) / owned.sum()
    np.testing.assert_allclose(result.vectors["cls"][0, 0], cls, atol=ATOL)
    np.testing.assert_allclose(result.vectors["tokens"][:, 0], per_token[3], atol=ATOL)


# --- each rule the comparison above depends on, broken on purpose: the comparison notices ---

def cut_vectors(name: str, mutate) -> tuple[np.ndarray, np.ndarray]:
    """strata's mean of hidden state 2 per document, with `mutate(embedder, windows)` applied, and
    the reference's."""
    info = resolve_model(ModelConfig(name_or_path=str(folder_of(name))))
    spec = OutputSpec(name="v", layers=[2], pooling="mean", combine="concat")
    outputs = (resolve_output(spec, info.num_layers),)
    embedder = Embedder(EmbedSettings(info, outputs, "float32", 512, "float32"), torch.device("cpu"))
    documents = texts()[:6]
    windows = TextTokenizer(info, info.max_length).encode(documents)
    mutate(embedder, windows)
    reference = reference_of(name)
    want = [reference.hidden_of(reference.tokenizer(t, truncation=True, max_length=LIMIT))[2].mean(0)
            for t in documents]
    return embedder.embed(windows).vectors["v"], np.stack(want)


@pytest.mark.parametrize("name", ["roberta-prelayernorm", "xlm-roberta-xl", "modernbert", "eurobert"])
def test_the_final_norm_on_a_cut_layer_is_caught(name):
    ours, want = cut_vectors(name, lambda embedder, windows: None)
    np.testing.assert_allclose(ours, want, atol=ATOL)

    def final_norm_on_the_cut_layer(embedder, windows):  # what transformers reports when nothing is done
        embedder.encoder.tap.remove()
        embedder.encoder.tap = None

    ours, want = cut_vectors(name, final_norm_on_the_cut_layer)
    assert np.abs(ours - want).max() > 1e-3


def test_long_documents_without_whitespace_get_autotokenizers_first_window(arch):
    """strata tokenizes a long text from prefixes (tokenize.TextTokenizer._encode_truncated): for
    every tokenizer family (WordPiece, byte-level BPE, Unigram, ...) the window must be the one
    AutoTokenizer gives the whole text."""
    from pipeline.tokenize import CHARS_PER_TOKEN, TextTokenizer

    info = resolve_model(ModelConfig(name_or_path=str(folder_of(arch))))
    tokenizer, reference = TextTokenizer(info, LIMIT), reference_of(arch).tokenizer
    n = 3 * CHARS_PER_TOKEN * LIMIT
    documents = ["word " + "." * n, "word" + "." * n, "ab" * n, "日本語" * n, "=" * n, "🙂" * n, "e\u0301" * n,
                 "a, " * n, "x" * n]
    got = tokenizer.encode(documents)
    for i, (ids, text) in enumerate(zip(np.split(got.ids, np.cumsum(got.lengths)[:-1]), documents)):
        assert ids.tolist() == reference(text, truncation=True, max_length=LIMIT)["input_ids"], (arch, text[:12])


def test_token_type_ids_the_tokenizer_makes_reach_the_model():
    ours, want = cut_vectors("bert-typed", lambda embedder, windows: None)
    np.testing.assert_allclose(ours, want, atol=ATOL)

    def dropped(embedder, windows):
        assert windows.type_ids is not None and windows.type_ids.any()
        windows.type_ids = None

    ours, want = cut_vectors("bert-typed", dropped)
    assert np.abs(ours - want).max() > 1e-3


def test_type_ids_that_are_all_zero_do_not_travel(model_info):
    windows = TextTokenizer(model_info, 64).encode(["hello world"])
    assert model_info.token_type_ids and windows.type_ids is None  # BERT's zeros are every model's default


@pytest.mark.parametrize("name", ["roberta", "mpnet", "modernbert", "albert"])
def test_a_max_length_past_the_positions_is_refused_in_one_line(name):
    folder = str(folder_of(name))
    assert resolve_model(ModelConfig(name_or_path=folder, max_length=LIMIT)).max_length == LIMIT
    with pytest.raises(ConfigError) as refused:
        resolve_model(ModelConfig(name_or_path=folder, max_length=LIMIT + 1))
    message = str(refused.value)
    assert f"model.max_length {LIMIT + 1} is more than" in message and f"at most {LIMIT}" in message
    assert "\n" not in message
    if name in ("roberta", "mpnet"):
        assert "reserves for padding (padding_idx 1)" in message


def test_unigram_ties_break_as_autotokenizer_breaks_them():
    """tokenizers reads tokenizer.json's Unigram scores a unit in the last place off now and then;
    where two segmentations tie, that gives other tokens than AutoTokenizer (transformers passes
    Python's floats). strata's tokenizer is AutoTokenizer's on every run of one character."""
    from tokenizers import Tokenizer

    folder = folder_of("xlm-roberta")
    auto = reference_of("xlm-roberta").tokenizer
    ours = TextTokenizer(resolve_model(ModelConfig(name_or_path=str(folder))), LIMIT * 4)
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    runs = [ch * n for ch in sorted(set("".join(corpus_texts()[:50]))) for n in range(1, 48)]
    ours_ids = [list(ids) for ids in np.split(ours.encode(runs).ids, np.cumsum(ours.encode(runs).lengths)[:-1])]
    assert ours_ids == [auto(t)["input_ids"] for t in runs]
    assert any(plain.encode(t).ids != auto(t)["input_ids"] for t in runs)  # the kind this guards against exists


# --- what strata does not embed: one line, no prompt, no traceback ---

def refused_folder(tmp_path: Path, model_type: str, **fields) -> Path:
    from transformers import AutoConfig, AutoModel

    folder = tmp_path / model_type
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120,
                 n_embd=32, n_layer=2, n_head=4, d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8,
                 num_key_value_heads=4, head_dim=8)
    defaults = AutoConfig.for_model(model_type)
    config = AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if hasattr(defaults, k)}, **fields)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def validate(folder: Path, tmp_path: Path, **model) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"input": {"uri": str(CORPUS)}, "output": {"uri": str(tmp_path / "out")},
                                      "model": {"name_or_path": str(folder), **model}, "outputs": [{"name": "v"}]}))
    strata = Path(sys.executable).parent / "strata"
    return subprocess.run([str(strata), "validate", str(config)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def one_line_refusal(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "[y/N]" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


DECODER = "which transformers knows as a causal (decoder) language model, not as a masked-language-model encoder"


@pytest.mark.parametrize("model_type, kind", [("gpt2", DECODER), ("llama", DECODER), ("t5", "an encoder–decoder"),
                                              ("vit", "which transformers does not know as a masked-language-model "
                                                      "encoder")])
def test_decoders_and_encoder_decoders_are_refused_saying_what_strata_embeds(tmp_path, model_type, kind):
    line = one_line_refusal(validate(refused_folder(tmp_path, model_type), tmp_path))
    assert f"holds a {model_type} model, {kind}; strata embeds BERT-family encoders" in line
    assert "Supported models" in line


def custom_code_folder(folder: Path, module: str, methods: str, weights: bool = False) -> Path:
    """A copy of the tiny BERT whose config.json asks for its own code (auto_map): `module`.py
    holding `{Module}Config(BertConfig)` and `{Module}Model(BertModel)` with `methods` as the
    model's own; `weights`: saved anew from that model (it has other tensors)."""
    from transformers import AutoConfig, AutoModel

    name = module.title().replace("_", "")
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder_of("bert").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / f"{module}.py").write_text(
        "from torch import nn\nfrom transformers import BertConfig, BertModel\n\n\n"
        f"class {name}Config(BertConfig):\n    model_type = '{module}-bert'\n\n\n"
        f"class {name}Model(BertModel):\n    config_class = {name}Config\n" + methods)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=f"{module}-bert", architectures=[f"{name}Model"],
                  auto_map={"AutoConfig": f"{module}.{name}Config", "AutoModel": f"{module}.{name}Model"})
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                      trust_remote_code=True)
        model.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(config))  # save_pretrained writes it without auto_map
    return folder


DOUBLED = """
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        # the folder's own code: every hidden state doubled, so running it shows in the numbers
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              **kwargs)
        out.hidden_states = tuple(2 * h for h in out.hidden_states)
        return out
"""


@pytest.fixture(scope="module")
def custom_folder(tmp_path_factory) -> Path:
    return custom_code_folder(tmp_path_factory.mktemp("custom"), "tiny_custom", DOUBLED)


def test_custom_code_is_never_run_without_trust_remote_code(custom_folder, tmp_path):
    line = one_line_refusal(validate(custom_folder, tmp_path))
    assert "tiny_custom.TinyCustomModel" in line and "model.trust_remote_code: true" in line
    with pytest.raises(ModelError, match="model.trust_remote_code: true"):
        resolve_model(ModelConfig(name_or_path=str(custom_folder)))


def test_custom_code_runs_with_trust_remote_code(custom_folder):
    info = resolve_model(ModelConfig(name_or_path=str(custom_folder), trust_remote_code=True))
    assert info.trust_remote_code and info.model_class == "TinyCustomModel"
    plain = resolve_model(ModelConfig(name_or_path=str(folder_of("bert"))))
    spec = OutputSpec(name="v", layers=[2], pooling="mean", combine="concat")
    _, custom, _ = embed(info, [spec], texts()[:4])
    _, native, _ = embed(plain, [spec], texts()[:4])
    np.testing.assert_allclose(custom.vectors["v"], 2 * native.vectors["v"], atol=ATOL)  # the folder's code ran


def test_a_native_architecture_with_auto_map_loads_natively(tmp_path):
    """Folders published with remote code for a model transformers now has (NomicBERT, GTE) load
    with transformers' own class, as transformers does, without running the folder's Python."""
    import shutil

    folder = tmp_path / "nomic"
    shutil.copytree(folder_of("nomic_bert"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_hf_nomic_bert.NomicBertModel"}  # a file that is not there
    (folder / "config.json").write_text(json.dumps(config))
    info = resolve_model(ModelConfig(name_or_path=str(folder)))
    assert info.model_class == "NomicBertModel" and not info.trust_remote_code


def test_a_modernbert_run_at_8192_tokens_with_sliding_windows(ray_cluster, tmp_path):
    """ModernBERT's own shape: 8,192 rotary positions, local attention over 128 tokens with a
    global layer every third, a tokenizer that sets no limit. A document of three 8,192-token
    windows runs through a real run and equals the uncut model window by window."""
    import pyarrow.dataset as ds

    from pipeline.config import parse_config
    from pipeline.runner import run

    arch = Tiny("modernbert", "cls-sep-bpe", {"global_attn_every_n_layers": 3, "local_attention": 128})
    folder = build(arch, tmp_path / "modernbert", max_position_embeddings=8192)
    reference = Reference(str(folder))
    stride = 1024
    words = " ".join(corpus_texts()).split()
    text = " ".join(words[:6000])
    content = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 2 * 8190 - stride < len(content) <= 3 * 8190 - 2 * stride  # exactly three windows
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "long.jsonl").write_text(json.dumps({"id": "long", "text": text}) + "\n" +
                                       json.dumps({"id": "short", "text": "A short one."}) + "\n")
    summary = run(parse_config({
        "input": {"uri": str(corpus)}, "output": {"uri": str(tmp_path / "out"), "precision": "float32"},
        "model": {"name_or_path": str(folder), "dtype": "float32"},
        "long_text": {"strategy": "sliding_window", "stride": stride},
        "outputs": [{"name": "mean", "layers": [2, -1], "pooling": "mean", "combine": "stack"}],
        "batching": {"token_budget": 8192}}))
    assert summary["docs"] == 2
    table = ds.dataset(tmp_path / "out" / "data", partitioning="hive").to_table().to_pylist()
    got = {row["id"]: np.array(row["mean"], np.float32).reshape(2, -1) for row in table}

    encoded = reference.tokenizer(text, truncation=True, max_length=8192, stride=stride,
                                  return_overflowing_tokens=True)
    assert [len(ids) for ids in encoded["input_ids"]][:2] == [8192, 8192] and len(encoded["input_ids"]) == 3
    step = 8190 - stride
    spans = [range(k * step, k * step + len(ids) - 2) for k, ids in enumerate(encoded["input_ids"])]
    hidden = [reference.hidden_of({"input_ids": ids}) for ids in encoded["input_ids"]]
    owners = max_context_owner(len(content), spans)
    for n, layer in enumerate([2, 4]):
        tokens = [hidden[0][layer][0], *(hidden[k][layer][p - spans[k].start + 1] for p, k in enumerate(owners)),
                  hidden[-1][layer][-1]]
        np.testing.assert_allclose(got["long"][n], np.mean(tokens, axis=0), atol=ATOL)
    short = reference.hidden_of(reference.tokenizer("A short one."))
    np.testing.assert_allclose(got["short"], np.stack([short[2].mean(0), short[4].mean(0)]), atol=ATOL)


def test_a_cut_encoder_gives_each_thread_its_own_deepest_layer():
    """A replica on a device runs two fragments at once, in two threads: the deepest layer each
    forward pass takes from the layer's own output is that pass's, never the other thread's."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.encoder import Encoder

    info = resolve_model(ModelConfig(name_or_path=str(folder_of("roberta-prelayernorm"))))
    encoder = Encoder(info, 2, torch.float32, torch.device("cpu"))
    assert encoder.tap is not None
    batches = [torch.randint(5, 500, (8, n)) for n in (40, 24)]
    alone = [encoder(ids, torch.ones_like(ids))[-1] for ids in batches]

    def deepest(k: int) -> torch.Tensor:
        ids = batches[k % 2]
        return encoder(ids, torch.ones_like(ids))[-1]

    with ThreadPoolExecutor(2) as pool:
        for k, got in enumerate(pool.map(deepest, range(40))):
            assert torch.equal(got, alone[k % 2])


# --- models whose vectors strata cannot make equal to transformers': refused as a replica loads
# (and so by `strata validate`, which loads the weights as a replica does), never mid-run ---

FEWER_POSITIONS = """
    def __init__(self, config):
        super().__init__(config)
        # fewer positions than config.json says: the driver cannot see it in the position table
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings // 2, config.hidden_size)
"""


@pytest.mark.parametrize("case, why", [
    (Tiny("big_bird", "wordpiece", {"attention_type": "block_sparse", "block_size": 4, "num_random_blocks": 2}),
     r"BigBirdModel changes itself as it runs \(.*attention_type became 'original_full', after a sequence of 13 "
     r"tokens\): its vectors would depend on the documents before them"),
    (Tiny("reformer", "albert", {"axial_pos_shape": [8, 8], "axial_pos_embds_dim": [16, 16], "attention_head_size": 8,
                                 "attn_layers": ["local", "lsh"] * 2, "local_attn_chunk_length": 16,
                                 "lsh_attn_chunk_length": 16, "feed_forward_size": 64}),
     r"ReformerModel returns hidden states of 64 positions for a sequence of 61 tokens: strata cannot tell"),
    (Tiny("albert", "albert", {"inner_group_num": 2}),
     r"AlbertModel returns 9 hidden states for the 4 layers config.json names \(num_hidden_layers\)"),
    ("short positions", r"ShortModel cannot run a sequence of 61 tokens \(IndexError: index out of range in "
                        r"self\), which model.max_length 64 allows; set a smaller model.max_length"),
], ids=["bigbird-block-sparse", "reformer", "albert-inner-groups", "fewer-positions-than-config"])
def test_what_cannot_equal_transformers_is_refused_as_the_replica_loads(tmp_path, case, why):
    from pipeline.model import check_weights_load

    if isinstance(case, Tiny):
        folder, trust = build(case, tmp_path / "model"), False
    else:
        folder, trust = custom_code_folder(tmp_path / "model", "short", FEWER_POSITIONS, weights=True), True
    info = resolve_model(ModelConfig(name_or_path=str(folder), trust_remote_code=trust))
    with pytest.raises(ModelError, match=why) as refused:
        check_weights_load(info)  # what `strata validate` and every replica do first
    assert "\n" not in str(refused.value)


# --- custom code can do anything: what a replica's load-time probes catch of it ---

ODD = {"batch-mates": "0.5 * out.mean(dim=0, keepdim=True)",  # a window's vectors depend on its micro-batch
       "padding-amount": "0.02 * out.shape[1]",  # on how much padding there is
       "stateful": "0.01 * self.calls"}  # on how many sequences came before


def odd_folder(folder: Path, odd: str) -> Path:
    return custom_code_folder(folder, "odd", f"""
    def __init__(self, config):
        super().__init__(config)
        self.calls = 0
        self.embeddings.register_forward_hook(self._odd)

    def _odd(self, module, args, out):  # out: (B, T, D) embedding output
        self.calls += 1
        return out + {ODD[odd]}
""")


@pytest.mark.parametrize("odd", ["batch-mates", "padding-amount"])
def test_custom_code_that_depends_on_the_micro_batch_still_gives_one_document_at_a_time(tmp_path, odd):
    info = resolve_model(ModelConfig(name_or_path=str(odd_folder(tmp_path, odd)), trust_remote_code=True))
    spec = OutputSpec(name="v", layers=[2], pooling="mean", combine="concat")
    embedder, result, windows = embed(info, [spec], texts())
    assert (embedder.encoder.needs_one_window, embedder.encoder.needs_equal_lengths) == \
        ((True, False) if odd == "batch-mates" else (False, True))
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.path)
    for row, text in enumerate(texts()):
        model = AutoModel.from_pretrained(info.path, trust_remote_code=True).eval()  # fresh: it may count calls
        ids = tokenizer(text, truncation=True, max_length=LIMIT, return_tensors="pt")
        with torch.no_grad():
            want = model(**ids, output_hidden_states=True).hidden_states[2][0].mean(0).numpy()
        np.testing.assert_allclose(result.vectors["v"][row], want, atol=ATOL)


def test_custom_code_that_changes_itself_as_it_runs_is_refused(tmp_path):
    from pipeline.model import check_weights_load

    info = resolve_model(ModelConfig(name_or_path=str(odd_folder(tmp_path, "stateful")), trust_remote_code=True))
    with pytest.raises(ModelError, match=r"OddModel changes itself as it runs \(the same sequence gives other hidden "
                                         r"states the second time, after a sequence of 13 tokens\)"):
        check_weights_load(info)


def test_weights_split_into_shards_load_as_transformers_loads_them(tmp_path):
    from transformers import AutoModel

    from pipeline.model import check_weights_load

    whole = folder_of("bert")
    sharded = tmp_path / "sharded"
    AutoModel.from_pretrained(whole).save_pretrained(sharded, max_shard_size="40KB")
    for path in whole.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            (sharded / path.name).write_bytes(path.read_bytes())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    info = resolve_model(ModelConfig(name_or_path=str(sharded)))
    check_weights_load(info)
    spec = OutputSpec(name="v", layers=[2, -1], pooling="mean", combine="stack")
    _, split, _ = embed(info, [spec], texts()[:4])
    _, one, _ = embed(resolve_model(ModelConfig(name_or_path=str(whole))), [spec], texts()[:4])
    np.testing.assert_array_equal(split.vectors["v"], one.vectors["v"])

    shard = shards[-1].read_bytes()
    shards[-1].write_bytes(shard[:-4] + bytes(4))  # one shard's last bytes changed: other weights
    assert resolve_model(ModelConfig(name_or_path=str(sharded))).weights_sha256 != info.weights_sha256
    shards[0].unlink()
    with pytest.raises(ModelError, match=rf"model.safetensors.index.json lists 1 shard\(s\) the folder lacks "
                                         rf"\({shards[0].name}, ...\)"):
        resolve_model(ModelConfig(name_or_path=str(sharded)))


def test_a_model_that_cannot_run_in_16_bits_is_refused_naming_the_dtype():
    """FNet's Fourier transform has no bfloat16 kernel: the replica says so and what would run."""
    from pipeline.encoder import Encoder

    info = resolve_model(ModelConfig(name_or_path=str(folder_of("fnet"))))
    with pytest.raises(ModelError, match=r"FNetModel cannot run a sequence of 13 tokens \(RuntimeError: .*BFloat16, "
                                         r"in bfloat16: model.dtype float32 may run it\)"):
        Encoder(info, 2, torch.bfloat16, torch.device("cpu"))

"""The embedder against plain transformers and sentence-transformers on real text."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import OutputSpec
from pipeline.embedder import Embedder, EmbedSettings
from pipeline.extract import resolve_output
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS


@pytest.fixture(scope="module")
def texts():
    with open(CORPUS / "part-0.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f][:40]
    long_text = max(docs, key=len)
    assert len(long_text) > 2000  # one document far past the 256-token limit
    return docs + ["A short sentence.", long_text * 3]


def embedder_for(model_info, *specs, precision="float32", token_budget=2048):
    outputs = tuple(resolve_output(s, model_info.num_layers) for s in specs)
    return Embedder(EmbedSettings(model_info, outputs, "float32", token_budget, precision), torch.device("cpu"))


def embed(embedder, model_info, texts):
    tokens = TextTokenizer(model_info.path, model_info.max_length).encode(texts)
    return embedder.embed(tokens.ids, tokens.lengths), tokens


def test_matches_sentence_transformers_encode(model_info, texts):
    from sentence_transformers import SentenceTransformer

    spec = OutputSpec(name="st", layers=[-1], pooling="mean", combine="concat", normalize=True)
    result, tokens = embed(embedder_for(model_info, spec), model_info, texts)
    assert tokens.truncated.any() and tokens.lengths.max() == 256
    reference = SentenceTransformer(model_info.path, device="cpu").encode(texts, normalize_embeddings=True)
    ours = result.vectors["st"]
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()


def test_matches_plain_transformers_hidden_states(model_info, texts):
    from transformers import AutoModel, AutoTokenizer

    specs = [OutputSpec(name="mean_all", layers="all", pooling="mean", combine="stack"),
             OutputSpec(name="cls_mid", layers=[2, 3], pooling="cls", combine="concat"),
             OutputSpec(name="max_last", layers=[-1], pooling="max", combine="sum")]
    result, _ = embed(embedder_for(model_info, *specs), model_info, texts)
    tokenizer = AutoTokenizer.from_pretrained(model_info.path)
    model = AutoModel.from_pretrained(model_info.path).eval()
    for row in [*range(12), len(texts) - 2, len(texts) - 1]:
        enc = tokenizer(texts[row], truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states  # 7 x (1, T, D)
        mean_all = torch.stack([h[0].mean(0) for h in hidden]).numpy()
        cls_mid = torch.cat([hidden[2][0, 0], hidden[3][0, 0]]).numpy()
        max_last = hidden[6][0].max(0).values.numpy()
        np.testing.assert_allclose(result.vectors["mean_all"][row], mean_all, atol=1e-5)
        np.testing.assert_allclose(result.vectors["cls_mid"][row], cls_mid, atol=1e-5)
        np.testing.assert_allclose(result.vectors["max_last"][row], max_last, atol=1e-5)


def test_float16_output_is_the_rounded_float32_result(model_info, texts):
    spec = OutputSpec(name="v", layers=[1, -1], pooling="mean", combine="concat")
    full, _ = embed(embedder_for(model_info, spec), model_info, texts)
    half, _ = embed(embedder_for(model_info, spec, precision="float16"), model_info, texts)
    assert half.vectors["v"].dtype == np.float16
    np.testing.assert_array_equal(half.vectors["v"], full.vectors["v"].astype(np.float16))


def test_result_does_not_depend_on_micro_batching(model_info, texts):
    spec = OutputSpec(name="v", layers=[-1], pooling="mean", combine="concat")
    small, _ = embed(embedder_for(model_info, spec, token_budget=256), model_info, texts)
    large, tokens = embed(embedder_for(model_info, spec, token_budget=16384), model_info, texts)
    np.testing.assert_allclose(small.vectors["v"], large.vectors["v"], atol=1e-5)
    assert small.padded_tokens >= int(tokens.lengths.sum())


def test_encoder_stops_at_the_deepest_requested_layer(model_info):
    spec = OutputSpec(name="v", layers=[1, 3], pooling="mean", combine="stack")
    embedder = embedder_for(model_info, spec)
    assert embedder.encoder.depth == 3
    ran = []
    for index, layer in enumerate(embedder.encoder.model.encoder.layer):
        layer.register_forward_hook(lambda *_, index=index: ran.append(index))
    embed(embedder, model_info, ["one document", "and another"])
    assert sorted(set(ran)) == [0, 1, 2]  # encoder layers 1..3 are modules 0..2; 4..6 never run

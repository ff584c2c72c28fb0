"""The embedder against plain transformers and sentence-transformers on real text."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import OutputSpec
from pipeline.embedder import Embedder
from pipeline.spec import EmbedSettings, resolve_output
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS
from reference import Reference, combine, pool

POOLINGS = ["cls", "mean", "max", "first_last_avg", "none"]
COMBINES = ["stack", "concat", "mean", "sum", "weighted"]
# layer spec as a user writes it -> the hidden-state indices it means for a 6-layer model
SELECTIONS = [("all", list(range(7))), ([0, 3, -1], [0, 3, 6]), ("-2:", [5, 6]), ([2], [2])]


@pytest.fixture(scope="module")
def texts():
    with open(CORPUS / "part-0.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f][:40]
    long_text = max(docs, key=len)
    assert len(long_text) > 2000  # one document far past the 256-token limit
    return docs + ["A short sentence.", long_text * 3]


@pytest.fixture(scope="module")
def reference(model_info):
    return Reference(model_info.path)


def embedder_for(model_info, *specs, precision="float32", token_budget=2048):
    outputs = tuple(resolve_output(s, model_info.num_layers) for s in specs)
    return Embedder(EmbedSettings(model_info, outputs, "float32", token_budget, precision), torch.device("cpu"))


def embed(embedder, model_info, texts):
    details = any(out.token_level for out in embedder.settings.outputs)
    windows = TextTokenizer(model_info.path, model_info.max_length, details=details).encode(texts)
    return embedder.embed(windows), windows


def per_row(result, name, row):
    """One row's vectors: the row's slice of a token-level output, else the row's vector."""
    units = result.token_units.get(name)
    if units is None:
        return result.vectors[name][row]
    start = int(units.counts[:row].sum())
    return result.vectors[name][start : start + units.counts[row]]


def golden_specs():
    specs = []
    for s, (layers, absolute) in enumerate(SELECTIONS):
        for pooling in POOLINGS:
            for how in COMBINES:
                n = 1 if pooling == "first_last_avg" else len(absolute)
                # scalar-mix style weights (summing to 1), unequal so a wrong layer order shows
                weights = list(np.linspace(0.5, 2.0, n) / np.linspace(0.5, 2.0, n).sum()) if how == "weighted" else None
                specs.append(OutputSpec(name=f"{pooling}_{how}_{s}", layers=layers, pooling=pooling, combine=how,
                                        weights=weights, normalize=(s == 1)))
    return specs


@pytest.mark.parametrize("token_budget, rtol, atol", [(1, 0, 1e-5), (2048, 1e-6, 4e-5)],
                         ids=["one-doc-batches", "padded-batches"])
def test_every_pooling_and_combine_matches_plain_transformers(model_info, texts, reference, token_budget, rtol, atol):
    """token_budget 1 runs each document alone, as the reference does, so the hidden states are
    bitwise equal and the check isolates layer selection, pooling, combining and normalizing.
    Padded batches change the encoder's own fp32 rounding (up to ~4e-6 per hidden value); summed
    over 7 layers of magnitude ~30 that exceeds 1e-5 absolute, hence rtol 1e-6 (a few ulps) there;
    and a token's vector summed over 7 layers carries 7 such errors (1.7e-5 seen on some CPUs'
    kernels), hence atol 4e-5 for padded batches."""
    specs = golden_specs()  # 100 outputs, all from one forward pass per micro-batch
    embedder = embedder_for(model_info, *specs, token_budget=token_budget)
    result, windows = embed(embedder, model_info, texts[:12] + texts[-2:])
    assert windows.truncated[-1] and not windows.truncated[-2]
    worst = 0.0
    for row, text in enumerate(texts[:12] + texts[-2:]):
        hidden = reference.hidden(reference.encode(text, model_info.max_length))
        for spec in specs:
            absolute = dict((str(k), v) for k, v in SELECTIONS)[str(spec.layers)]
            expected = combine(pool(hidden, absolute, spec.pooling), spec.combine, spec.weights, spec.normalize)
            ours = per_row(result, spec.name, row)
            assert ours.shape == expected.shape, spec.name
            worst = max(worst, float(np.abs(ours - expected).max()))
            np.testing.assert_allclose(ours, expected, rtol=rtol, atol=atol, err_msg=spec.name)
    assert worst > 0  # the comparison is real arithmetic, not the same array twice
    print(f"max abs error over {len(specs)} outputs x 14 texts: {worst:.2e}")


def test_matches_sentence_transformers_encode(model_info, texts):
    from sentence_transformers import SentenceTransformer

    spec = OutputSpec(name="st", layers=[-1], pooling="mean", combine="concat", normalize=True)
    result, windows = embed(embedder_for(model_info, spec), model_info, texts)
    assert windows.truncated.any() and windows.lengths.max() == 256
    reference = SentenceTransformer(model_info.path, device="cpu").encode(texts, normalize_embeddings=True)
    ours = result.vectors["st"]
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()


def test_float16_output_is_the_rounded_float32_result(model_info, texts):
    specs = [OutputSpec(name="v", layers=[1, -1], pooling="mean", combine="concat"),
             OutputSpec(name="tok", layers="-2:", pooling="none", combine="stack", normalize=True)]
    full, _ = embed(embedder_for(model_info, *specs), model_info, texts)
    half, _ = embed(embedder_for(model_info, *specs, precision="float16"), model_info, texts)
    for name in ("v", "tok"):
        assert half.vectors[name].dtype == np.float16
        rounded = full.vectors[name].astype(np.float16)
        # within 1 ulp: adjacent float16 values are adjacent integers in their bit patterns
        ulps = np.abs(half.vectors[name].view(np.int16).astype(np.int32) - rounded.view(np.int16).astype(np.int32))
        assert ulps.max() <= 1, name


def test_result_does_not_depend_on_micro_batching(model_info, texts):
    spec = OutputSpec(name="v", layers=[-1], pooling="mean", combine="concat")
    small, _ = embed(embedder_for(model_info, spec, token_budget=256), model_info, texts)
    large, windows = embed(embedder_for(model_info, spec, token_budget=16384), model_info, texts)
    np.testing.assert_allclose(small.vectors["v"], large.vectors["v"], atol=1e-5)
    assert small.padded_tokens >= int(windows.lengths.sum())


def test_encoder_stops_at_the_deepest_requested_layer(model_info):
    specs = [OutputSpec(name="v", layers=[1, 3], pooling="mean", combine="stack"),
             OutputSpec(name="t", layers=[2], pooling="none", combine="concat")]
    embedder = embedder_for(model_info, *specs)
    assert embedder.encoder.depth == 3
    ran = []
    for index, layer in enumerate(embedder.encoder.model.encoder.layer):
        layer.register_forward_hook(lambda *_, index=index: ran.append(index))
    embed(embedder, model_info, ["one document", "and another"])
    assert sorted(set(ran)) == [0, 1, 2]  # encoder layers 1..3 are modules 0..2; 4..6 never run


def test_compute_dtype_and_output_precision_are_independent(model_info, texts):
    texts = texts[:10]  # bfloat16 matmuls are slow on a CPU
    spec = OutputSpec(name="v", layers=[-1], pooling="mean", combine="concat")
    outputs = (resolve_output(spec, model_info.num_layers),)
    exact, _ = embed(embedder_for(model_info, spec), model_info, texts)
    bf16 = Embedder(EmbedSettings(model_info, outputs, "bfloat16", 2048, "float32"), torch.device("cpu"))
    assert bf16.encoder.model.dtype == torch.bfloat16
    low, _ = embed(bf16, model_info, texts)
    assert low.vectors["v"].dtype == np.float32  # pooled in float32 from bf16 hidden states
    a, b = low.vectors["v"], exact.vectors["v"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(a, b)

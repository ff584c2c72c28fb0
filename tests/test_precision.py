"""Low-precision compute against float32 on real text: the encoder in bfloat16 (the GPU default)
or float16, pooling in float32 (pipeline/extract.py), checked on the CPU here and on the GPU by
bench/gpu-check.sh.

Bounds: cosine >= 0.999 per pooled vector (each layer of a stack on its own), >= 0.99 per token
or word vector. One embedder and one embed call per dtype, with every output at once.
"""

import json

import numpy as np
import pytest
import torch

from pipeline.config import OutputSpec
from pipeline.embedder import Embedder
from pipeline.encoder import pick_device
from pipeline.spec import EmbedSettings, resolve_output
from pipeline.tokenize import TextTokenizer

from conftest import CORPUS

LOW = ["bfloat16", "float16"]
POOLED_BOUND, TOKEN_BOUND = 0.999, 0.99
SEVEN_WEIGHTS = list(np.linspace(0.5, 2.0, 7) / np.linspace(0.5, 2.0, 7).sum())  # unequal, so layer order counts


def output_specs() -> list[OutputSpec]:
    """Every pooling x every combine over all 7 hidden states, and token and word vectors."""
    specs = []
    for pooling in ("cls", "mean", "max", "first_last_avg"):
        for how in ("stack", "concat", "mean", "sum", "weighted"):
            weights = ([1.0] if pooling == "first_last_avg" else SEVEN_WEIGHTS) if how == "weighted" else None
            specs.append(OutputSpec(name=f"{pooling}_{how}", layers="all", pooling=pooling, combine=how,
                                    weights=weights))
    return specs + [
        OutputSpec(name="tokens_stack", layers="all", pooling="none", combine="stack"),
        OutputSpec(name="tokens_concat", layers="-2:", pooling="none", combine="concat", normalize=True),
        OutputSpec(name="tokens_weighted", layers=[0, 3, -1], pooling="none", combine="weighted",
                   weights=[0.2, 0.3, 0.5]),
        OutputSpec(name="words_first", layers=[2, -1], pooling="none", combine="sum", words="first"),
        OutputSpec(name="words_mean", layers=[-1], pooling="none", combine="concat", words="mean"),
        OutputSpec(name="words_first_last", layers=[-1, -2], pooling="none", combine="stack", words="first_last"),
    ]


@pytest.fixture(scope="module")
def windows(model_info):
    """12 real documents, one of ~1,000 tokens cut into overlapping 128-token windows; about 2,600
    tokens in all, as float16 matmuls are slow on a CPU."""
    with open(CORPUS / "part-0.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    texts = [text for text in docs if len(text) < 700][:11] + [max(docs[:24], key=len)]
    windows = TextTokenizer(model_info.path, 128, 32, True).encode(texts)
    assert np.bincount(windows.doc)[-1] >= 4  # the long document really spans several windows
    return windows


@pytest.fixture(scope="module")
def embedded(model_info, windows):
    """dtype -> (embedder, result): one embedder and one embed call per dtype for the module."""
    outputs = tuple(resolve_output(spec, model_info.num_layers) for spec in output_specs())
    done = {}

    def embed(dtype):
        if dtype not in done:
            settings = EmbedSettings(model_info, outputs, dtype, 4096, precision="float32")
            embedder = Embedder(settings, pick_device())  # the GPU where there is one (bench/gpu-check.sh)
            done[dtype] = embedder, embedder.embed(windows)
        return done[dtype]

    return embed


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # along the last axis: per vector, per layer of a stack, per token; in float64
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def worst_cosines(low, exact) -> dict[str, float]:
    return {name: float(cosines(low.vectors[name], exact.vectors[name]).min()) for name in exact.vectors}


@pytest.mark.parametrize("dtype", LOW)
def test_encoder_really_runs_in_the_low_precision(embedded, dtype):
    embedder, low = embedded(dtype)
    exact_embedder, exact = embedded("float32")
    assert embedder.encoder.model.dtype == getattr(torch, dtype)
    assert exact_embedder.encoder.model.dtype == torch.float32
    for name, vectors in low.vectors.items():
        assert vectors.dtype == np.float32 and vectors.shape == exact.vectors[name].shape, name
        assert np.isfinite(vectors).all(), name
        assert not np.array_equal(vectors, exact.vectors[name]), name  # the low precision changed every output


@pytest.mark.parametrize("dtype", LOW)
def test_pooled_vectors_agree_with_float32(embedded, dtype):
    _, low = embedded(dtype)
    _, exact = embedded("float32")
    worst = {name: c for name, c in worst_cosines(low, exact).items() if name not in low.token_units}
    assert len(worst) == 20
    print(f"{dtype} pooled, min cosine: " + ", ".join(f"{n} {c:.6f}" for n, c in worst.items()))
    failing = {name: c for name, c in worst.items() if c < POOLED_BOUND}
    assert not failing, failing


@pytest.mark.parametrize("dtype", LOW)
def test_token_and_word_vectors_agree_with_float32(embedded, dtype):
    _, low = embedded(dtype)
    _, exact = embedded("float32")
    for name, units in exact.token_units.items():  # the same tokens and words, in the same places
        np.testing.assert_array_equal(low.token_units[name].spans, units.spans, err_msg=name)
    worst = {name: c for name, c in worst_cosines(low, exact).items() if name in low.token_units}
    assert len(worst) == 6
    print(f"{dtype} tokens, min cosine: " + ", ".join(f"{n} {c:.6f}" for n, c in worst.items()))
    failing = {name: c for name, c in worst.items() if c < TOKEN_BOUND}
    assert not failing, failing


def test_bfloat16_is_coarser_than_float16(embedded):
    """bfloat16 keeps 8 significant bits, float16 11: its error must be the larger one, or the two
    dtypes did not reach the encoder as asked."""
    _, exact = embedded("float32")
    error = {dtype: 1 - cosines(embedded(dtype)[1].vectors["tokens_stack"], exact.vectors["tokens_stack"]).mean()
             for dtype in LOW}
    print(f"mean 1 - cosine per token: {error}")
    assert error["bfloat16"] > 4 * error["float16"], error

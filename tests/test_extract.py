"""Pooling, window merging and combining against plain per-document loops."""

import pytest
import torch

from pipeline.config import OutputSpec
from pipeline.errors import ConfigError
from pipeline.extract import Accumulator, combine_layers, l2_normalize, pool_windows, token_vectors
from pipeline.spec import resolve_layers, resolve_output


@pytest.fixture
def batch():
    torch.manual_seed(0)
    lengths = [5, 3, 1]
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    hidden = tuple(torch.randn(3, 5, 4) for _ in range(4))  # embeddings + 3 layers
    return hidden, mask, lengths


def output(pooling, layers=(2,), combine="stack", **extra):
    return resolve_output(OutputSpec(name="o", layers=list(layers), pooling=pooling, combine=combine, **extra), 3)


def pooled(hidden, mask, out):
    acc = Accumulator(mask.shape[0], out, 4, torch.device("cpu"))
    values, weights = pool_windows(hidden, mask, out)
    acc.add(torch.arange(mask.shape[0]), values, weights)
    return acc.result()


def test_poolings_ignore_padding(batch):
    hidden, mask, lengths = batch
    h = hidden[2]
    for i, n in enumerate(lengths):
        assert torch.allclose(pooled(hidden, mask, output("mean"))[i, 0], h[i, :n].mean(0), atol=1e-6)
        assert torch.allclose(pooled(hidden, mask, output("max"))[i, 0], h[i, :n].max(0).values)
        assert torch.allclose(pooled(hidden, mask, output("cls"))[i, 0], h[i, 0], atol=1e-6)
        expected = ((hidden[1][i, :n] + hidden[3][i, :n]) / 2).mean(0)
        assert torch.allclose(pooled(hidden, mask, output("first_last_avg", layers=[3]))[i, 0], expected, atol=1e-6)


def test_windows_of_one_unit_merge_token_weighted(batch):
    hidden, mask, lengths = batch
    h = hidden[2]
    for pooling, expected in [("mean", torch.cat([h[0, :5], h[1, :3]]).mean(0)),
                              ("max", torch.cat([h[0, :5], h[1, :3]]).max(0).values),
                              ("cls", (5 * h[0, 0] + 3 * h[1, 0]) / 8)]:
        out = output(pooling)
        acc = Accumulator(2, out, 4, torch.device("cpu"))
        values, weights = pool_windows(hidden, mask, out)
        acc.add(torch.tensor([0, 0, 1]), values, weights)  # windows 0 and 1 are one document
        assert torch.allclose(acc.result()[0, 0], expected, atol=1e-6), pooling
        assert torch.allclose(acc.result()[1, 0], h[2, 0], atol=1e-6), pooling


def test_token_vectors_keep_the_emitted_positions_in_order(batch):
    hidden, mask, _ = batch
    out = output("none", layers=[1, 3])
    vectors = token_vectors(hidden, mask.flatten().nonzero().flatten(), out)
    assert vectors.shape == (9, 2, 4)
    assert torch.equal(vectors[5, 1], hidden[3][1, 0]) and torch.equal(vectors[8, 0], hidden[1][2, 0])


def test_combines():
    pooled = torch.randn(2, 3, 4)  # (B, L, D)
    assert combine_layers(pooled, "stack").shape == (2, 3, 4)
    assert torch.equal(combine_layers(pooled, "concat")[1], torch.cat([pooled[1, 0], pooled[1, 1], pooled[1, 2]]))
    assert torch.allclose(combine_layers(pooled, "mean"), pooled.mean(1))
    assert torch.allclose(combine_layers(pooled, "sum"), pooled.sum(1))
    weighted = combine_layers(pooled, "weighted", (0.5, 0.0, 2.0))
    assert torch.allclose(weighted, 0.5 * pooled[:, 0] + 2.0 * pooled[:, 2])


def test_normalize_makes_each_vector_unit_length():
    vectors = torch.randn(2, 3, 4)
    assert torch.allclose(l2_normalize(vectors).norm(dim=-1), torch.ones(2, 3), atol=1e-6)


def test_normalize_comes_after_the_combine(batch):
    hidden, mask, _ = batch
    out = output("mean", layers=[1, 2], combine="concat", normalize=True)
    result = pooled(hidden, mask, out)
    assert result.shape == (3, 8)
    assert torch.allclose(result.norm(dim=-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize(
    "spec, expected",
    [("all", (0, 1, 2, 3, 4, 5, 6)), ([-1], (6,)), ([0, 3, -1], (0, 3, 6)), ("-4:", (3, 4, 5, 6)),
     ("1:4", (1, 2, 3)), ("::2", (0, 2, 4, 6)), ([-7], (0,))],
)
def test_layer_specs_resolve_to_hidden_state_indices(spec, expected):
    assert resolve_layers(spec, 6) == expected


def test_layer_errors_name_the_valid_range():
    with pytest.raises(ConfigError, match=r"layer 7 is beyond the model's depth: it has 6 layers.*0\.\.6"):
        resolve_layers([7], 6)
    with pytest.raises(ConfigError, match="same layer twice"):
        resolve_layers([6, -1], 6)
    with pytest.raises(ConfigError, match="selects no layer"):
        resolve_layers("7:", 6)
    with pytest.raises(ConfigError, match="weights has 2 numbers"):
        resolve_output(OutputSpec(name="o", layers="-3:", combine="weighted", weights=[1, 2]), 6)

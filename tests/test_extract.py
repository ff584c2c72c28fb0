"""Pooling and combining against plain per-document loops over real hidden states."""

import pytest
import torch

from pipeline.config import OutputSpec
from pipeline.errors import ConfigError
from pipeline.extract import (
    combine_layers, compute_output, l2_normalize, pool_cls, pool_first_last_avg, pool_max, pool_mean,
    resolve_layers, resolve_output,
)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    lengths = [5, 3, 1]
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    hidden = tuple(torch.randn(3, 5, 4) for _ in range(4))  # embeddings + 3 layers
    return hidden, mask, lengths


def test_poolings_ignore_padding(batch):
    hidden, mask, lengths = batch
    h = hidden[2]
    for i, n in enumerate(lengths):
        assert torch.allclose(pool_mean(h, mask)[i], h[i, :n].mean(0), atol=1e-6)
        assert torch.allclose(pool_max(h, mask)[i], h[i, :n].max(0).values)
        assert torch.equal(pool_cls(h, mask)[i], h[i, 0])
        expected = ((hidden[1][i, :n] + hidden[3][i, :n]) / 2).mean(0)
        assert torch.allclose(pool_first_last_avg(hidden[1], hidden[3], mask)[i], expected, atol=1e-6)


def test_combines(batch):
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


def test_compute_output_selects_the_requested_layers(batch):
    hidden, mask, _ = batch
    spec = resolve_output(OutputSpec(name="o", layers=[0, -1], pooling="mean", combine="stack"), 3)
    result = compute_output(hidden, mask, spec)
    assert result.shape == (3, 2, 4)
    assert torch.allclose(result[:, 0], pool_mean(hidden[0], mask))
    assert torch.allclose(result[:, 1], pool_mean(hidden[3], mask))
    normalized = resolve_output(OutputSpec(name="o", layers="1:", pooling="cls", combine="concat", normalize=True), 3)
    out = compute_output(hidden, mask, normalized)
    assert out.shape == (3, 12)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-6)


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

import numpy as np
import pytest

from pipeline.batching import pack_micro_batches, padded_tokens


@pytest.mark.parametrize("budget", [1, 64, 512, 4096])
def test_batches_respect_budget_and_cover_each_doc_once(budget):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=500).astype(np.int32)
    batches = pack_micro_batches(lengths, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= budget


def test_batches_are_length_sorted_so_padding_is_small():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 512, size=2000).astype(np.int32)
    batches = pack_micro_batches(lengths, 8192)
    maxima = [int(lengths[b].max()) for b in batches]
    assert maxima == sorted(maxima, reverse=True)
    real = int(lengths.sum())
    assert 1 - real / padded_tokens(lengths, batches) < 0.05
    unsorted_padding = 1 - real / (len(lengths) * int(lengths.max()))
    assert unsorted_padding > 0.4  # what one big unsorted batch would waste


def test_empty_fragment_has_no_batches():
    assert pack_micro_batches(np.array([], np.int32), 100) == []

import numpy as np
import pytest

from pipeline.batching import CPU_PASS_OVERHEAD_TOKENS, pack_micro_batches, padded_tokens, pass_overhead_tokens


@pytest.mark.parametrize("budget", [1, 64, 512, 4096])
@pytest.mark.parametrize("overhead", [None, 0, 64])
def test_batches_respect_budget_and_cover_each_doc_once(budget, overhead):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=500).astype(np.int32)
    batches = pack_micro_batches(lengths, budget, overhead)
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


def test_run_ends_where_real_tokens_per_cost_peak():
    lengths = np.array([50, 100, 50, 100], np.int32)
    # a pass costing nothing extra: two runs of equal lengths, no padding
    assert [b.tolist() for b in pack_micro_batches(lengths, 400, 0)] == [[1, 3], [0, 2]]
    # an expensive pass: one run of all four (4 × 100 = the budget), padding and all
    assert [sorted(b.tolist()) for b in pack_micro_batches(lengths, 400, 1000)] == [[0, 1, 2, 3]]


def test_small_overhead_cuts_padding_of_a_small_fragment():
    rng = np.random.default_rng(2)
    lengths = rng.integers(10, 257, size=500).astype(np.int32)  # one small fragment, wide length spread
    real = int(lengths.sum())
    full = 1 - real / padded_tokens(lengths, pack_micro_batches(lengths, 16384))
    cpu = 1 - real / padded_tokens(lengths, pack_micro_batches(lengths, 16384, CPU_PASS_OVERHEAD_TOKENS))
    assert full > 0.08 and cpu < 0.03


def test_overhead_by_device():
    assert pass_overhead_tokens("cpu", 16384) == CPU_PASS_OVERHEAD_TOKENS
    assert pass_overhead_tokens("cuda", 16384) == 16384


def test_empty_fragment_has_no_batches():
    assert pack_micro_batches(np.array([], np.int32), 100) == []


def test_equal_lengths_batches_hold_one_length_each_within_the_budget():
    """For models whose vectors change with padding: no micro-batch pads at all."""
    lengths = np.random.default_rng(0).integers(1, 50, 300)
    batches = pack_micro_batches(lengths, 256, 64, equal_lengths=True)
    assert sorted(np.concatenate(batches).tolist()) == list(range(300))
    assert all(len(set(lengths[b].tolist())) == 1 for b in batches)
    assert all(len(b) * lengths[b].max() <= 256 for b in batches)
    assert padded_tokens(lengths, batches) == lengths.sum()
    assert len(batches) > len(pack_micro_batches(lengths, 256, 64))  # the price: more, smaller passes

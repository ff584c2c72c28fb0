"""The simulated device (pipeline/simulated.py), the replica's overlap, and the feed benchmark's parts."""

import io
import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from conftest import passages, write_jsonl
from pipeline.config import ComputeConfig, OutputSpec, StrataConfig
from pipeline.embedder import Embedder
from pipeline.ray_pipeline import plan_resources
from pipeline.simulated import QUEUE_DEPTH, SimulatedDevice
from pipeline.spec import EmbedSettings, Simulation, resolve_output
from pipeline.tokenize import TextTokenizer


class FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_pass_takes_its_padded_tokens_over_the_rate_and_launching_does_not_wait():
    clock = FakeClock()
    device = SimulatedDevice(Simulation(1000.0), clock, clock.sleep)
    device.launch(500)  # 0.5 s of work
    device.launch(250)  # queued behind it: ends at 0.75 s
    assert clock.sleeps == [] and device.free_at == pytest.approx(100.75)
    clock.now += 0.1  # the host does 0.1 s of its own work meanwhile
    device.synchronize()  # reading a result waits for the rest
    assert clock.now == pytest.approx(100.75)
    stats = device.stats()
    assert stats["busy_s"] == pytest.approx(0.75) and stats["busy_share"] == pytest.approx(1.0)
    assert stats["passes"] == 2 and stats["padded_tokens"] == 750 and stats["idle_gaps"] == 0


def test_a_late_host_leaves_the_device_idle_and_the_busy_share_says_so():
    clock = FakeClock()
    device = SimulatedDevice(Simulation(1000.0), clock, clock.sleep)
    device.launch(1000)  # 1 s
    clock.now += 3.0  # the host prepares the next micro-batch for 3 s: 2 s idle
    device.launch(1000)
    device.synchronize()
    stats = device.stats()
    assert stats["span_s"] == pytest.approx(4.0) and stats["busy_share"] == pytest.approx(0.5)
    assert stats["idle_gaps"] == 1 and stats["longest_gaps_s"] == [pytest.approx(2.0)]


def test_the_launch_queue_is_finite():
    clock = FakeClock()
    device = SimulatedDevice(Simulation(1000.0), clock, clock.sleep)
    for _ in range(QUEUE_DEPTH):
        device.launch(1000)
    assert clock.sleeps == []
    device.launch(1000)  # the queue is full: waits until the oldest pass ends
    assert clock.sleeps == [pytest.approx(1.0)]


@pytest.mark.parametrize("device", ["sim:0", "sim:-5", "sim:fast", "gpu:100", "sim:inf", "sim:nan"])
def test_a_simulated_device_needs_a_positive_rate(device):
    with pytest.raises(ValueError, match="sim:TOKENS_PER_S"):
        Simulation.parse(device)


def test_rates_parse():
    assert Simulation.parse("sim:4e6").tokens_per_s == 4e6


def _outputs(info):
    return tuple(resolve_output(spec, info.num_layers) for spec in (
        OutputSpec(name="layers", layers="all", pooling="mean", combine="stack"),
        OutputSpec(name="maxed", layers=[-1], pooling="max", combine="mean"),
        OutputSpec(name="tokens", layers=[-2, -1], pooling="none", combine="concat"),
        OutputSpec(name="words", layers=[-1], pooling="none", words="mean"),
    ))


def test_the_replica_runs_on_a_simulated_device_without_ever_reading_a_value_on_it(model_info):
    """On PyTorch's meta device an operation whose result depends on values (boolean masks,
    .item(), nonzero) raises: the whole micro-batch loop runs there, so it never synchronizes."""
    texts = [row["text"] for row in passages()[:40]]
    windows = TextTokenizer(model_info.path, 64, 16, details=True).encode(texts)
    settings = EmbedSettings(model_info, _outputs(model_info), "auto", 512, "float16", simulation=Simulation(1e9))
    embedder = Embedder(settings)
    result = embedder.embed(windows)
    stats = embedder.simulated.stats()
    assert stats["passes"] > 1 and stats["padded_tokens"] == result.padded_tokens
    hidden = model_info.hidden_size
    assert result.vectors["layers"].shape == (40, model_info.num_layers + 1, hidden)
    assert result.vectors["maxed"].shape == (40, hidden)
    assert result.vectors["tokens"].shape == (len(result.token_units["tokens"].spans), 2 * hidden)
    assert result.vectors["words"].dtype == np.float16


def test_two_fragments_at_once_give_the_same_bits_as_one_after_the_other(model_info):
    """What a replica on a device does (two fragments in flight, on threads), on the CPU model."""
    texts = [row["text"] for row in passages()[:48]]
    tokenizer = TextTokenizer(model_info.path, 128, 32, details=True)
    fragments = [tokenizer.encode(texts[:24]), tokenizer.encode(texts[24:])]
    embedder = Embedder(EmbedSettings(model_info, _outputs(model_info), "float32", 1024, "float32"),
                        torch.device("cpu"))
    one_by_one = [embedder.embed(windows) for windows in fragments]
    at_once = [None, None]

    def embed(i):
        at_once[i] = embedder.embed(fragments[i])

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for alone, together in zip(one_by_one, at_once):
        assert alone.vectors.keys() == together.vectors.keys()
        for name in alone.vectors:
            assert np.array_equal(alone.vectors[name], together.vectors[name]), name


def test_a_replica_on_a_device_takes_two_fragments_and_a_cpu_replica_one():
    assert plan_resources(ComputeConfig(), {"CPU": 16.0, "GPU": 1.0}).fragments_per_replica == 2
    assert plan_resources(ComputeConfig(), {"CPU": 2.0}).fragments_per_replica == 1
    simulated = plan_resources(ComputeConfig(), {"CPU": 2.0}, Simulation(1e5, None, 2))
    assert simulated.fragments_per_replica == 2 and simulated.gpus_per_replica == 0 and simulated.cpu_threads is None


def test_a_whole_run_against_a_simulated_device_keeps_it_busy(ray_cluster, model_info, tmp_path):
    from pipeline import runner

    docs = [{"id": f"d{i}", "text": row["text"]} for i, row in enumerate(passages()[:64])]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:32])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[32:])
    config = StrataConfig.model_validate({
        "input": {"uri": str(tmp_path / "in")}, "model": {"max_length": 64},
        "outputs": [{"name": "vector", "layers": "all", "pooling": "mean", "combine": "stack"}],
        "batching": {"fragment_docs": 8, "token_budget": 512}, "output": {"uri": str(tmp_path / "out")},
    })
    stats = tmp_path / "device.json"
    summary = runner.run(config, console=Console(file=io.StringIO()), simulation=Simulation(20000, str(stats)))
    assert summary["docs"] == 64 and summary["failed_fragments"] == 0 and summary["published"]
    device = json.loads(stats.read_text())
    assert device["padded_tokens"] >= summary["tokens"]
    assert 0 < device["busy_share"] <= 1.0 + 1e-9
    table = pq.read_table(tmp_path / "out" / "data", partitioning=None)
    assert table.num_rows == 64 and table.schema.field("vector").type.list_size == model_info.num_layers + 1

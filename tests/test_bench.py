"""`strata bench` at toy sizes: every method runs, and strata's vectors equal the plain loop's.

Speed is what the benchmark itself reports (docs/BENCHMARKS.md); these tests check that its
numbers are measured on the same work and that the vectors it compares really agree.
"""

import json

import numpy as np
import pytest

from conftest import CORPUS
from pipeline.bench import BenchOptions, column_numpy, min_cosine, run_bench
from test_cli import assert_one_line_error, strata

SHARD = str(CORPUS / "part-0.jsonl")


def by_method(result: dict) -> dict:
    return {r["method"]: r for r in result["results"]}


@pytest.mark.parametrize("workload", ["sentence", "all-layers"])
def test_every_method_embeds_the_same_tokens_into_the_same_vectors(ray_cluster, workload):
    result = run_bench(BenchOptions(corpus=SHARD, docs=40, workload=workload, fragment_docs=16, device="cpu"))
    methods = by_method(result)
    assert set(methods) == {"loop", "st_encode", "stage", "e2e"}
    tokens = result["models"]["minilm"]["tokens"]
    assert all(r["tokens"] == tokens and r["tokens_per_s"] > 0 for r in methods.values())
    assert methods["loop"]["ratio_to_loop"] == 1.0
    for method in ("stage", "e2e"):
        assert methods[method]["min_cosine"] > 0.9999 and methods[method]["vectors_match"], method
        assert 0 <= methods[method]["padding_share"] < 0.5
    if workload == "sentence":  # encode computes the same vectors; with all layers it does less work
        assert methods["st_encode"]["min_cosine"] > 0.9999
    else:
        assert methods["st_encode"]["min_cosine"] is None and "last layer only" in methods["st_encode"]["note"]
    json.dumps(result)  # what `strata bench` writes


def test_bert_base_shape_with_random_weights():
    result = run_bench(BenchOptions(corpus=SHARD, docs=6, models=("bert-base",), methods=("loop", "stage"),
                                    max_length=32, workload="all-layers", device="cpu"))
    facts = result["models"]["bert-base"]
    assert (facts["num_layers"], facts["hidden"], facts["max_length"]) == (12, 768, 32)
    assert by_method(result)["stage"]["min_cosine"] > 0.999


def test_vectors_that_differ_fail_the_check():
    from pipeline.bench import COSINE_FLOOR, Measurement

    assert Measurement("m", "stage", 1, 1.0, min_cosine=COSINE_FLOOR - 1e-4).vectors_match is False
    assert Measurement("m", "stage", 1, 1.0, min_cosine=1.0).vectors_match is True
    assert Measurement("m", "loop", 1, 1.0).vectors_match is None


def test_min_cosine_sees_one_bad_vector():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5, 3, 8)).astype(np.float32)
    changed = reference.copy()
    assert min_cosine(changed, reference) == pytest.approx(1.0)
    changed[4, 2] *= -1  # one layer of one document flipped
    assert min_cosine(changed, reference) == pytest.approx(-1.0)


def test_column_numpy_flattens_nested_vectors():
    import pyarrow as pa

    column = pa.chunked_array([pa.array([[[1.0, 2.0], [3.0, 4.0]]], pa.list_(pa.list_(pa.float32(), 2), 2)),
                               pa.array([[[5.0, 6.0], [7.0, 8.0]]], pa.list_(pa.list_(pa.float32(), 2), 2))])
    assert column_numpy(column).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_cli_writes_json_profile_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    result = strata("bench", "--corpus", SHARD, "--docs", "12", "--method", "stage", "--fragment-docs", "4",
                    "--profile", "--memory-scale", "2", "--device", "cpu", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "stage" in result.stdout and "tokens/s" in result.stdout
    report = json.loads(out.read_text())
    facts = report["models"]["minilm"]
    assert sum(facts["profile"]["share_by_kind"].values()) == pytest.approx(1.0)
    assert "matmul" in facts["profile"]["share_by_kind"]
    runs = facts["memory"]["runs"]
    assert [r["docs"] for r in runs] == [12, 24]
    assert all(r["peak_pss_bytes"] > 100 * 2**20 for r in runs)  # a Ray cluster and a model replica at least
    assert facts["memory"]["ratio"] == pytest.approx(runs[1]["peak_pss_bytes"] / runs[0]["peak_pss_bytes"])


def test_a_corpus_that_is_not_jsonl_is_one_clear_error(tmp_path):
    from pipeline.bench import load_sample
    from pipeline.errors import StrataError

    (tmp_path / "text.jsonl").write_text("just words\n")
    (tmp_path / "list.jsonl").write_text('{"id": 1, "text": "a"}\n[1, 2]\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "cut.jsonl.gz").write_bytes(__import__("gzip").compress(b'{"id": 1, "text": "a"}\n' * 500)[:-40])
    for name, message in [("text.jsonl", "line 1"), ("list.jsonl", "line 2: not a JSON object"),
                          ("empty.jsonl", "holds no documents"), ("cut.jsonl.gz", "cut.jsonl.gz")]:
        with pytest.raises(StrataError, match=message):
            load_sample(str(tmp_path / name), 1000)


def test_cli_errors_are_one_line(tmp_path):
    assert_one_line_error(strata("bench", "--corpus", str(tmp_path / "nope.jsonl")), "nope.jsonl", "is not a file")
    assert_one_line_error(strata("bench", "--corpus", SHARD, "--method", "fast"), "unknown method 'fast'")
    assert_one_line_error(strata("bench", "--corpus", SHARD, "--docs", "200", "--memory-scale", "2",
                                 "--method", "stage"), "needs 400 documents")


def test_simulated_device_reports_host_cost_by_step(ray_cluster):
    """(Whole runs against a simulated device: tests/test_simulated.py.)"""
    result = run_bench(BenchOptions(corpus=SHARD, docs=24, fragment_docs=6, busy_docs=0, device="sim:1e9",
                                    models=("minilm",)))
    assert result["results"] == []  # no model ran: only the feed tables
    feed = result["models"]["minilm"]["feed"]
    cost = feed["host_cost"]
    assert cost["docs"] == 24 and cost["fragments"] == 4 and cost["tokens"] == result["models"]["minilm"]["tokens"]
    per_million = feed["cpu_s_per_million_tokens"]
    assert set(per_million) == {"read", "tokenize", "replica", "write", "ray"} and all(v > 0 for v in per_million.values())
    assert feed["feed_tokens_per_s"]["16"] == pytest.approx(8 * feed["feed_tokens_per_s"]["2"])
    assert feed["feed_tokens_per_s"]["2"] == pytest.approx(2e6 / sum(per_million.values()))
    assert "whole_run" not in feed and "busy" not in feed  # --busy-docs 0: the host cost table only
    json.dumps(result)


@pytest.mark.parametrize("device", ["sim:0", "sim:abc", "sim:", "sim:1,,2", "sim:1e-300", "sim:50", "sim:inf"])
def test_a_bad_simulated_device_is_one_clear_error(device):
    from pipeline.bench import simulated_rates
    from pipeline.errors import StrataError

    with pytest.raises(StrataError, match="sim:TOKENS_PER_S"):
        simulated_rates(device)


@pytest.mark.parametrize("device", ["sim", "SIM:1000", "tpu", "", "cuda"])
def test_a_device_this_machine_lacks_is_one_clear_error(device):
    from pipeline.bench import bench_device
    from pipeline.errors import StrataError

    if device == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(StrataError, match="--device"):
        bench_device(device)


@pytest.mark.parametrize("spec, message", [("compile", "NAME=VALUE"), ("speed=3", "NAME=VALUE"), ("compile=", "NAME=VALUE"),
                                           ("token_budget=lots", "whole number"), ("token_budget=1", "at least 2"),
                                           ("pass_overhead=-5", "whole number"), ("token_budget=1e3", "whole number")])
def test_a_bad_try_is_one_clear_error(spec, message):
    from pipeline.bench import device_option
    from pipeline.errors import StrataError

    with pytest.raises(StrataError, match=message):
        device_option(spec)


def test_an_option_the_machine_cannot_run_is_reported_as_skipped():
    result = run_bench(BenchOptions(corpus=SHARD, docs=6, methods=("loop", "stage"), device="cpu",
                                    tries=("attention=no_such_attention",)))
    tried = by_method(result)["stage[attention=no_such_attention]"]
    assert tried["tokens_per_s"] == 0 and tried["note"].startswith("skipped:") and "\n" not in tried["note"]

"""`strata bench --device sim:RATE[,RATE...]`: what a node's CPUs can feed an accelerator, and
whether a model replica keeps one busy, measured without one (`simulated.py` stands in for it).

Host cost: the CPU-seconds per million tokens of every step outside the forward pass, each
step run on its own in this process over the same fragments (process CPU time, every thread):

    read      shard → fragments: gzip, JSON parse, Arrow tables, content hashes, payload bytes
    tokenize  the Tokenize step: the fast tokenizer, windows, payload bytes
    replica   the Embed step's host side on a simulated device: payload decode, packing, padded
              inputs copied as to pinned memory, results read back, output rows, payload bytes
    write     Parquet encoding and the commit (files, hash index, commit record) on local disk
    ray       carrying payloads between the steps: the adapter's conversions to and from one-row
              Arrow blocks and their trips through Ray's object store (three hops per fragment)

A node of C cores feeds at most C / (CPU-s per token) tokens per second, if every core works
on the host side and nothing else. A whole run against a device that never makes the host wait
shows what this machine feeds, all in: with Ray's scheduling, the driver, and the fixed cost
of starting workers (~2 CPU-s each), model and tokenizer. Busy share: whole runs against a
simulated device of each rate, its time computing over the span from its first pass to its last.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil

from pipeline.bench import Sample, e2e_config
from pipeline.sources import Shard, shard_table
from pipeline.spec import EmbedSettings, Simulation, resolve_output
from pipeline.stages import Embed, JobSpec, Tokenize, read_shard, write_fragment

UNLIMITED = 1e12  # tokens/s of a simulated device that never makes the host wait
NODE_CORES = (2, 16)  # this machine, and the lent H200 node


def host_cost(ctx) -> dict:
    """CPU-seconds of each step over the sample, and per million tokens."""
    root = ctx.scratch / "host-cost"
    config = e2e_config(ctx, ctx.sample, root, compressed=True)  # gzip: the corpus's own format
    output = resolve_output(ctx.workload.output, ctx.info.num_layers)
    settings = EmbedSettings(ctx.info, (output,), "auto", ctx.options.token_budget, ctx.workload.precision,
                             simulation=Simulation(UNLIMITED))
    job = JobSpec(config.input, settings, config.output.uri, "none", {}, fragment_docs=ctx.options.fragment_docs)
    (root / "output").mkdir()
    tokenize = Tokenize(ctx.info, ctx.info.max_length, None, settings.token_details)
    embed = Embed(settings, config.input.keep_fields, config.output.uri)
    shards = [Shard(**{**row, "path": row["path"].decode("utf-8", "surrogateescape")})
              for row in shard_table(config.input).to_pylist()]
    cpu = {"ray": 0.0}
    payloads = _timed(cpu, "read", lambda: [p for shard in shards for p in read_shard(shard, job)])
    payloads = _hop(cpu, payloads)
    payloads = _timed(cpu, "tokenize", lambda: [tokenize(p) for p in payloads])
    payloads = _hop(cpu, payloads)
    payloads = _timed(cpu, "replica", lambda: [embed(p) for p in payloads])
    payloads = _hop(cpu, payloads)
    records = _timed(cpu, "write", lambda: [write_fragment(p, job) for p in payloads])
    failed = [r.reason for r in records if not hasattr(r, "files")]
    if failed:
        raise RuntimeError(f"host-cost run failed a fragment: {failed[0]}")
    tokens = sum(r.tokens for r in records)
    cpu = {step: seconds for step, seconds in cpu.items() if seconds is not None}
    return {"docs": len(ctx.sample.texts), "shards": len(shards), "fragments": len(records), "tokens": tokens, "cpu_s": cpu,
            "cpu_s_per_million_tokens": {step: seconds / tokens * 1e6 for step, seconds in cpu.items()}}


def _hop(cpu: dict, payloads: list[dict]) -> list[dict]:
    """What carrying each payload to the next step costs: the adapter's conversions between a
    payload and a one-row Arrow block (`ray_pipeline`), and the block's trip through Ray's object
    store (put, then get: on one node a copy into shared memory and a zero-copy read). Without
    Ray (a GPU check machine) the row stays empty (None)."""
    try:
        import ray

        from pipeline import ray_pipeline
    except ImportError:
        cpu["ray"] = None
        return payloads

    ray_pipeline.ensure_ray()
    started = time.process_time()
    carried = [ray_pipeline._one(ray.get(ray.put(ray_pipeline._table(payload)))) for payload in payloads]
    cpu["ray"] += time.process_time() - started
    return carried


def _timed(cpu: dict, step: str, work):
    started = time.process_time()
    result = work()
    cpu[step] = time.process_time() - started
    return result


class TreeCpu:
    """CPU seconds (user + system) of this process and every descendant (Ray's GCS, raylet and
    workers) between start() and stop(), sampled every 0.1 s so that processes that end meanwhile
    count up to their last sample."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _sample(self, baseline: bool) -> None:
        root = psutil.Process(os.getpid())
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                seconds = times.user + times.system + times.children_user + times.children_system
            except psutil.Error:
                continue
            key = process.pid
            if baseline:
                self.first[key] = seconds
            self.last[key] = seconds

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(False)

    def __enter__(self) -> "TreeCpu":
        self._sample(True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(False)

    @property
    def seconds(self) -> float:
        return sum(last - self.first.get(pid, 0.0) for pid, last in self.last.items())


def run_simulated(ctx, docs: int, simulation: Simulation, name: str, fragment_docs: int | None = None) -> dict:
    """`strata run` on the first `docs` documents against a simulated device: wall seconds, CPU
    seconds of every process, tokens, and the simulated device's clock."""
    from rich.console import Console

    from pipeline import ray_pipeline, runner

    root = ctx.scratch / name
    config = e2e_config(ctx, Sample(ctx.sample.ids[:docs], ctx.sample.texts[:docs]), root, fragment_docs, compressed=True)
    stats_file = root / "device.json"
    simulation = Simulation(simulation.tokens_per_s, str(stats_file), simulation.concurrent_fragments)
    ray_pipeline.ensure_ray()
    with TreeCpu() as cpu:
        started = time.perf_counter()
        summary = runner.run(config, console=Console(file=io.StringIO()), simulation=simulation)
        seconds = time.perf_counter() - started
    if summary["failed_fragments"] or summary["failed_shards"]:
        raise RuntimeError(f"simulated run {name} failed fragments; see {config.output.uri}")
    device = json.loads(stats_file.read_text())
    shutil.rmtree(root, ignore_errors=True)
    return {"docs": docs, "tokens": summary["tokens"], "seconds": seconds, "cpu_s": cpu.seconds, "device": device,
            "tokens_per_s": summary["tokens"] / seconds}


def whole_run(ctx) -> dict:
    """`strata run` over the sample, the simulated device never making the host wait: what this
    machine feeds, all in (worker start-up, model and tokenizer loading included)."""
    run = run_simulated(ctx, len(ctx.sample.texts), Simulation(UNLIMITED), "whole-run")
    return {**run, "cpu_s_per_million_tokens_all_in": run["cpu_s"] / run["tokens"] * 1e6}


def fixed_cpu_s(feed: dict) -> float | None:
    """The whole run's CPU beyond its tokens' host cost: start-up (workers, model, tokenizer)."""
    run = feed.get("whole_run")
    return run and run["cpu_s"] - run["tokens"] / 1e6 * feed["total_cpu_s_per_million_tokens"]


def feed_rates(per_million: dict[str, float]) -> dict:
    """Tokens per second a node of C cores can feed, for each C in NODE_CORES."""
    total = sum(per_million.values())
    return {str(cores): cores / total * 1e6 for cores in NODE_CORES}


def busy_shares(ctx, rates: list[float]) -> list[dict]:
    """Whole runs on the first `busy_docs` documents (in 8 fragments) against each simulated rate,
    one fragment at a time in the replica vs two."""
    rows = []
    docs = min(ctx.options.busy_docs, len(ctx.sample.texts))
    for rate in rates:
        for concurrent in (1, 2):
            run = run_simulated(ctx, docs, Simulation(rate, None, concurrent), f"busy-{rate:g}-{concurrent}",
                                fragment_docs=-(-docs // 8))
            rows.append({"tokens_per_s_simulated": rate, "fragments_at_once": concurrent, "docs": docs,
                         "idle_gaps": run["device"]["idle_gaps"], "longest_gaps_s": run["device"]["longest_gaps_s"],
                         "busy_share": run["device"]["busy_share"], "e2e_tokens_per_s": run["tokens_per_s"],
                         "seconds": run["seconds"], "device_busy_s": run["device"]["busy_s"],
                         "device_span_s": run["device"]["span_s"]})
    return rows


def bench_feed(ctx, rates: list[float]) -> dict:
    """Host cost by step, feed rates, a whole run, and the busy share at each simulated rate."""
    cost = host_cost(ctx)
    per_million = cost["cpu_s_per_million_tokens"]
    result = {"host_cost": cost, "cpu_s_per_million_tokens": per_million,
              "total_cpu_s_per_million_tokens": sum(per_million.values()), "feed_tokens_per_s": feed_rates(per_million)}
    if not ctx.options.busy_docs:
        return result
    try:
        import ray  # noqa: F401 - whole runs need it
    except ImportError:
        return {**result, "note": "ray is not installed: no whole runs, no busy shares, no ray row"}
    return {**result, "whole_run": whole_run(ctx), "busy": busy_shares(ctx, rates)}

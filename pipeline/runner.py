"""The driver: resolve the config against the model and the input, plan fragments, skip the
committed ones, run the rest through Ray, and summarize from the manifest.

Driver state is O(fragments): the plan and the set of committed fragment ids. Documents only
ever live inside the Ray stages.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from rich.console import Console

from pipeline.config import StrataConfig, fingerprint_of, redacted
from pipeline.errors import InputError, StrataError, one_line
from pipeline.fragments import Fragment, plan_fragments
from pipeline.lease import Lease, OutputBusy
from pipeline.manifest import CommitRecord, FailureRecord, Manifest, check_writable
from pipeline.model import ModelInfo, resolve_model
from pipeline.output import file_metadata
from pipeline.progress import RunProgress, summary_table
from pipeline.sources import count_rows, list_shards
from pipeline.spec import EmbedSettings, ResolvedOutput, resolve_output
from pipeline.stages import JobSpec
from pipeline.storage import Location, open_fs
from pipeline.tokenize import TextTokenizer

COUNT_THREADS = 8


class RunFailed(StrataError):
    """The run finished but broke its error budget."""


@dataclass
class Plan:
    config: StrataConfig
    model: ModelInfo
    outputs: tuple[ResolvedOutput, ...]
    fragments: list[Fragment]
    bad_shards: list[FailureRecord]  # shards that could not even be counted
    skipped: list[str]  # files under input.uri that are not corpus files

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.fragments)

    @property
    def identity(self) -> dict:
        """What a resumed run must share with the output's earlier runs: settings and weights."""
        return {**self.config.identity(), "model_weights_sha256": self.model.weights_sha256}

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.identity)


def resolve(config: StrataConfig) -> tuple[ModelInfo, tuple[ResolvedOutput, ...]]:
    """Check the config against the model: layer indices, options the engine supports."""
    model = resolve_model(config.model, config.storage)
    outputs = tuple(resolve_output(spec, model.num_layers) for spec in config.outputs)
    if config.long_text.window_stride is not None:
        TextTokenizer(model.path, model.max_length, config.long_text.window_stride)  # checks the stride fits a window
    return model, outputs


def make_plan(config: StrataConfig, resolved: tuple[ModelInfo, tuple[ResolvedOutput, ...]] | None = None) -> Plan:
    model, outputs = resolved or resolve(config)
    skipped: list[str] = []
    shards = list_shards(config.input, config.storage, skipped=skipped)
    fs, _ = open_fs(config.input.uri, config.storage)
    with ThreadPoolExecutor(COUNT_THREADS) as pool:
        counts = list(pool.map(lambda shard: _count(fs, shard), shards))
    good = [(shard, count) for shard, count in zip(shards, counts) if isinstance(count, int)]
    bad = [FailureRecord(shard_failure_id(shard.source), shard.source, reason, None)
           for shard, reason in zip(shards, counts) if isinstance(reason, str)]
    return Plan(config, model, outputs, plan_fragments(good, config.batching.fragment_docs), bad, skipped)


def _count(fs, shard) -> int | str:
    """Rows of a shard, or why it cannot be read (an unreadable shard must not stop the run)."""
    try:
        return count_rows(fs, shard)
    except InputError as exc:
        return str(exc)


def shard_failure_id(source: str) -> str:
    return "shard-" + hashlib.sha256(source.encode()).hexdigest()[:12]


def run_record(plan: Plan) -> dict:
    """What `_manifest/run.json` says about this run: config, fingerprint, model, outputs."""
    from pipeline import __version__

    hidden = plan.model.hidden_size
    return {
        "strata_version": __version__,
        "fingerprint": plan.fingerprint,
        "identity": plan.identity,
        "config": redacted(plan.config),
        "model": asdict(plan.model),
        "outputs": {o.name: {"layers": list(o.layers), "shape": list(o.vector_shape(hidden)),
                             "per": _unit(o, plan.config)} for o in plan.outputs},
        "plan": {"fragments": len(plan.fragments), "rows": plan.total_rows,
                 "shards": len({f.shard.source for f in plan.fragments})},
    }


def _unit(out: ResolvedOutput, config: StrataConfig) -> str:
    """What one vector of this output stands for."""
    if out.token_level:
        return "token" if out.words == "none" else "word"
    return "window" if config.long_text.window_rows else "document"


def run(config: StrataConfig, console: Console | None = None, if_free: bool = False) -> dict | None:
    """Embed every pending fragment; returns the summary (also saved in run.json). With
    `if_free`, a run that finds another live run on its output returns None instead of failing."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    resolved = resolve(config)
    location = Location.from_uri(config.output.uri, config.storage)
    check_writable(location)  # before listing and counting a corpus that may be large
    lease = Lease(location)
    try:
        lease.acquire(note=lambda line: console.print(line, markup=False, highlight=False))
    except OutputBusy as busy:
        if not if_free:
            raise
        console.print(f"strata: skipping this run: {busy}", markup=False, highlight=False)
        return None
    with lease:
        return _run_holding_the_output(config, resolved, location, console, started)


def _run_holding_the_output(config: StrataConfig, resolved, location: Location, console: Console,
                            started: float) -> dict:
    plan = make_plan(config, resolved)
    manifest = Manifest(location)
    run_info = run_record(plan)
    previous = manifest.check_settings(run_info)
    committed = manifest.committed()
    _check_input_unchanged(plan, manifest, committed)
    manifest.begin(run_info, previous)
    manifest.record_shard_versions({f.shard.source: f.shard.version for f in plan.fragments})
    manifest.clear_failures()  # this run retries them
    if plan.skipped:
        names = ", ".join(plan.skipped[:5]) + (", ..." if len(plan.skipped) > 5 else "")
        console.print(f"strata: ignoring {len(plan.skipped)} files that are not corpus files ({names})",
                      markup=False, highlight=False)
    for failure in plan.bad_shards:
        manifest.fail(failure)
        console.print(f"strata: skipping shard {failure.source}: {failure.reason}", markup=False, highlight=False)
    pending = [f for f in plan.fragments if f.id not in committed]
    removed = manifest.remove_uncommitted(committed)
    if removed:
        console.print(f"strata: removed {len(removed)} files an interrupted run left without a commit record")
    console.print(
        f"strata: {len(plan.fragments)} fragments planned over {run_info['plan']['shards']} shards "
        f"({plan.total_rows:,} rows); {len(plan.fragments) - len(pending)} already committed, {len(pending)} to do"
    )
    this_run: list[CommitRecord] = []
    failed: list[FailureRecord] = list(plan.bad_shards)
    if pending:
        this_run, failed_fragments = _execute(plan, pending, manifest, console)
        failed += failed_fragments
    elif not plan.bad_shards:
        console.print("strata: nothing to do, every fragment is committed")
    summary = summarize(plan, manifest.records(), this_run, failed, time.monotonic() - started)
    manifest.write_run({**run_info, "summary": summary})
    console.print(summary_table(summary))
    _check_failures(failed, config.output.uri)
    _check_error_budget(summary, config.run.max_error_rate)
    return summary


def _check_input_unchanged(plan: Plan, manifest: Manifest, committed: set[str]) -> None:
    """Refuse a rerun over shards that changed under committed fragments: their old rows would
    stay beside (or instead of) the new ones. A shard changed when its version (size + ETag or
    mtime) differs from the one recorded, or when committed fragments are no longer in the plan
    (rows added or removed, the shard deleted). A shard that merely cannot be read today is not a
    change. New shards are fine: they only add fragments."""
    unreadable = {failure.source for failure in plan.bad_shards}
    recorded = manifest.shard_versions()
    edited = {f.shard.source for f in plan.fragments if f.id in committed
              and recorded.get(f.shard.source) and f.shard.version and recorded[f.shard.source] != f.shard.version}
    gone = [record.source for record in manifest.records(committed - {f.id for f in plan.fragments})
            if record.source not in unreadable]
    changed = sorted(edited | set(gone))
    if changed:
        raise InputError(
            f"the input changed since {plan.config.output.uri} was made: {_count_of(len(changed), 'shard')} with "
            f"committed fragments {'was' if len(changed) == 1 else 'were'} edited, grew, shrank or vanished "
            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); embed the changed corpus into a new "
            "output.uri")


def _execute(plan: Plan, pending: list[Fragment], manifest: Manifest,
             console: Console) -> tuple[list[CommitRecord], list[FailureRecord]]:
    from pipeline import ray_pipeline
    from pipeline.metrics import RunMetrics

    ray_pipeline.ensure_ray()
    available = ray_pipeline.cluster_resources()
    resources = ray_pipeline.plan_resources(plan.config.compute, available)
    waiting = ""
    if resources.gpus_per_replica and not available.get("GPU"):
        waiting = " (no GPU in the cluster yet: waiting for the autoscaler to add GPU nodes)"
    console.print(f"strata: {resources.describe()}{waiting}", markup=False, highlight=False)
    long_text = plan.config.long_text
    settings = EmbedSettings(plan.model, plan.outputs, plan.config.model.dtype, plan.config.batching.token_budget,
                             plan.config.output.precision, resources.cpu_threads,
                             window_rows=long_text.window_rows)
    metadata = file_metadata(plan.model.name, plan.model.weights_sha256,
                             {o.name: list(o.layers) for o in plan.outputs}, plan.fingerprint)
    job = JobSpec(plan.config.input, settings, plan.config.output.uri, plan.config.output.partition_by, metadata,
                  stride=long_text.window_stride, storage=plan.config.storage)
    done_rows = plan.total_rows - sum(f.rows for f in pending)
    records, failures = [], []
    remaining = pending
    metrics = RunMetrics(plan.config.output.uri, plan.total_rows - done_rows)
    with RunProgress(console, plan.total_rows, done_rows) as progress:
        while remaining:
            try:
                for record in ray_pipeline.run_fragments(remaining, job, resources):
                    metrics.record(record)
                    if isinstance(record, FailureRecord):
                        failures.append(record)
                        console.print(f"strata: fragment {record.fragment} failed: {record.reason}", markup=False,
                                      highlight=False)
                    else:
                        records.append(record)
                        progress.update(record)
                remaining = []
            except ray_pipeline.RayError as exc:
                remaining = _after_worker_deaths(manifest, remaining, records, failures, exc, console)
    manifest.clear_attempts()
    return records, failures


def _after_worker_deaths(manifest: Manifest, remaining: list[Fragment], records: list[CommitRecord],
                         failures: list[FailureRecord], exc: Exception, console: Console) -> list[Fragment]:
    """Ray gave up on a worker that kept dying. A fragment that started embedding more often than
    Ray retries is what kills it: record it as failed, then go on with the rest."""
    from pipeline.ray_pipeline import ACTOR_RETRIES

    cause = one_line(exc)
    done = manifest.committed() | {f.fragment for f in failures}
    attempts = manifest.attempts()
    poisoned = [f for f in remaining if f.id not in done and attempts.get(f.id, 0) > ACTOR_RETRIES]
    if not poisoned:
        raise RunFailed(f"the run stopped after {len(records)} fragments: {cause}; committed fragments are kept, "
                        "rerun the same command to resume")
    for fragment in poisoned:
        failure = FailureRecord(fragment.id, fragment.shard.source, f"its worker process died "
                                f"{attempts[fragment.id]} times while embedding it (killed for memory, or a crash "
                                f"in native code): {cause}", fragment.rows)
        manifest.fail(failure)
        failures.append(failure)
        console.print(f"strata: fragment {fragment.id} failed: {failure.reason}", markup=False, highlight=False)
    return [f for f in remaining if f.id not in done and f not in poisoned]


def summarize(plan: Plan, records: list[CommitRecord], this_run: list[CommitRecord], failed: list[FailureRecord],
              wall: float) -> dict:
    planned = {f.id for f in plan.fragments}
    done = [r for r in records if r.fragment in planned]
    run_tokens = sum(r.tokens for r in this_run)
    run_docs = sum(r.docs for r in this_run)
    padded = sum(r.padded_tokens for r in this_run)
    return {
        "fragments": f"{len(done)} / {len(plan.fragments)}",
        "docs": sum(r.docs for r in done),
        "quarantined": sum(r.quarantined for r in done),
        "blank": sum(r.blank for r in done),
        "tokens": sum(r.tokens for r in done),
        "failed_fragments": sum(1 for f in failed if f.rows is not None),
        "failed_shards": sum(1 for f in failed if f.rows is None),
        "failed_rows": sum(f.rows or 0 for f in failed),
        "fragments_this_run": len(this_run),
        "docs_this_run": run_docs,
        "tokens_this_run": run_tokens,
        "tokens_per_s": run_tokens / wall if wall > 0 else 0.0,
        "docs_per_s": run_docs / wall if wall > 0 else 0.0,
        "padding_share": 1 - run_tokens / padded if padded else 0.0,
        "wall_seconds": wall,
    }


def _check_failures(failed: list[FailureRecord], output_uri: str) -> None:
    if failed:
        fragments = sum(1 for f in failed if f.rows is not None)
        shards = len(failed) - fragments
        raise RunFailed(
            f"{_count_of(fragments, 'fragment')} and {_count_of(shards, 'shard')} could not be embedded ({failed[0].source}: "
            f"{failed[0].reason}); all reasons: strata status {output_uri}; committed work is kept and "
            "rerunning retries the failed parts"
        )


def _count_of(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _check_error_budget(summary: dict, max_error_rate: float) -> None:
    seen = summary["docs"] + summary["quarantined"]
    if seen and summary["quarantined"] / seen > max_error_rate:
        raise RunFailed(
            f"{summary['quarantined']} of {seen} documents were quarantined "
            f"({summary['quarantined'] / seen:.2%} > run.max_error_rate {max_error_rate:.2%}); "
            "see the reasons in OUTPUT/quarantine/"
        )


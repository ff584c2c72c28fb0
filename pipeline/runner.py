"""The driver: resolve the config against the model and the input, list the shards, skip the
ones an earlier run finished, stream the rest through Ray, and summarize from the manifest.

Planning is listing, nothing more: no shard is opened or counted before embedding starts. The
read step cuts each shard into fragments as it streams it, and the driver learns a shard's
fragments from their commit records; a shard is done when its fragments from row 0 up to the
one marked last are committed. Driver state is the listing as an Arrow table and the commit
records; documents only ever live inside the Ray stages.
"""

from __future__ import annotations

import base64
import posixpath
import re
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from pipeline import errors, faults, versions
from pipeline.changes import KINDS
from pipeline.config import StrataConfig, fingerprint_of, identity_changes, redacted
from pipeline.errors import ConfigError, InputError, StrataError, root_cause
from pipeline.fragments import own_records, shard_failure_id, to_read, unfinished
from pipeline.incremental import DiffTask, changes_name
from pipeline.lease import Lease, OutputBusy
from pipeline.manifest import (FRAGMENTS_DIR, HASHES_DIR, RUN_FILE, CommitRecord, FailureRecord, Manifest, check_output_folder,
                               hash_file_of,
                               check_bucket, check_writable)
from pipeline.model import ModelInfo, check_model_folder, resolve_model
from pipeline.output import file_metadata
from pipeline.progress import RunProgress, byte_size, count_of, summary_table
from pipeline.sources import count_rows, keep_schema, shard_table, shards_of
from pipeline.spec import EmbedSettings, ResolvedOutput, Simulation, resolve_output
from pipeline.stages import JobSpec
from pipeline.storage import Location, open_fs, overlap
from pipeline.tokenize import TextTokenizer

COUNT_THREADS = 8  # shards `strata validate` reads at once
INDEX_EVERY = 500  # commit records the driver folds into one manifest index file
MAX_STALLED_RESUMES = 2  # passes in a row that a lost worker ends before any commit, before the run stops


class RunFailed(StrataError):
    """The run finished but broke its error budget."""


@dataclass
class Plan:
    config: StrataConfig
    model: ModelInfo
    outputs: tuple[ResolvedOutput, ...]
    work: pa.Table  # the shards this version embeds (sources.SHARD_SCHEMA), sorted by source
    bad_shards: list[FailureRecord]  # shards that could not be compared (incremental)
    skipped: list[str]  # files under input.uri that are not corpus files
    version: int = 1
    kind: str = "first"  # first | incremental | full (everything embedded again: the settings changed)
    reason: str = ""  # why a full re-embed
    carried: list[CommitRecord] = field(default_factory=list)  # the previous version's fragments of unchanged shards
    carried_shards: dict[str, str] = field(default_factory=dict)  # source -> version of the unchanged shards
    changes: dict[str, int] | None = None  # added/changed/unchanged/deleted of the diffed shards (incremental)
    keep_schema: pa.Schema | None = None  # the output's type of each kept field, fixed for the life of the output
    weights_only: bool = False  # the output was made before its identity held the model's files (see identity)
    lease_token: str = ""  # the run's lease on the output, and its generation (the fencing token, lease.py)
    lease_generation: int = 0

    @property
    def salt(self) -> str:
        """What joins a shard's version in this version's fragment ids (see fragments.cut)."""
        return f"{self.fingerprint}\0{self.version}"

    @property
    def identity(self) -> dict:
        """What a resumed run must share with the output's earlier runs: settings, weights, and the
        model folder's other files (config, tokenizer, code: `ModelInfo.files_sha256`), except
        for an output made before strata recorded those, which keeps comparing the weights only."""
        identity = {**self.config.identity(), "model_weights_sha256": self.model.weights_sha256}
        if not self.weights_only:
            identity["model_files_sha256"] = self.model.files_sha256
        return identity

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.identity)

    def shard_versions(self) -> dict[str, str]:
        """source -> version of every shard the version holds."""
        held = dict(self.carried_shards)
        held.update(zip(self.work["source"].to_pylist(), self.work["version"].to_pylist()))
        return dict(sorted(held.items()))


def resolve(config: StrataConfig) -> tuple[ModelInfo, tuple[ResolvedOutput, ...]]:
    """Check the config against the model: layer indices, options the engine supports."""
    model = resolve_model(config.model, config.storage)
    outputs = tuple(resolve_output(spec, model.num_layers) for spec in config.outputs)
    check_model_folder(model)  # the tokenizer loads: workers would otherwise fail one by one
    if config.long_text.window_stride is not None:
        TextTokenizer(model, model.max_length, config.long_text.window_stride)  # checks the stride fits a window
    return model, outputs


def check_output(config: StrataConfig) -> Location:
    """The output location, once it is clear that writing there can neither read its own output
    as input nor touch files strata did not write."""
    if overlap(config.input.uri, config.output.uri):
        raise ConfigError(f"output.uri {config.output.uri!r} and input.uri {config.input.uri!r} overlap (one lies "
                          "inside the other): strata would read its own output as input or write among the input's "
                          "files; put the output somewhere else")
    location = Location.from_uri(config.output.uri, config.storage)
    check_bucket(location)
    check_output_folder(location)
    outer = location.enclosing(RUN_FILE)
    if outer is not None:
        raise ConfigError(f"output.uri {config.output.uri!r} lies inside the strata output {outer}: its files would "
                          "become part of that output's data; put the output somewhere else")
    return location


def make_plan(config: StrataConfig, resolved: tuple[ModelInfo, tuple[ResolvedOutput, ...]] | None = None) -> Plan:
    """The plan of a first version: the listed shards (none opened)."""
    model, outputs = resolved or resolve(config)
    check_output(config)
    skipped: list[str] = []
    work = shard_table(config.input, config.storage, skipped=skipped)
    plan = Plan(config, model, outputs, work, [], skipped)
    plan.keep_schema = _keep_schema(plan, None)
    return plan


def count_shards(plan: Plan) -> tuple[int, list[FailureRecord]]:
    """Rows of every shard of the plan, and the shards that cannot be read: `strata validate`
    reads every shard once; a run never does."""
    fs, _ = open_fs(plan.config.input.uri, plan.config.storage)
    shards = shards_of(plan.work)
    with ThreadPoolExecutor(COUNT_THREADS) as pool:
        counts = list(pool.map(lambda shard: _count(fs, shard, plan.config.input), shards))
    bad = [FailureRecord(shard_failure_id(shard.source), shard.source, reason, None)
           for shard, reason in zip(shards, counts) if isinstance(reason, str)]
    return sum(count for count in counts if isinstance(count, int)), bad


def _keep_schema(plan: Plan, previous_run: dict | None) -> pa.Schema:
    """The kept fields' types an earlier run of these settings chose, else those of the first shard."""
    if previous_run and previous_run.get("fingerprint") == plan.fingerprint and previous_run.get("keep_schema"):
        try:
            return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(previous_run["keep_schema"])))
        except (ValueError, pa.ArrowException):
            raise InputError(f"{plan.config.output.uri}: _manifest/run.json holds a damaged keep_schema; restore the "
                             "file or use a new output.uri") from None
    fs, _ = open_fs(plan.config.input.uri, plan.config.storage)
    return keep_schema(fs, shards_of(plan.work.slice(0, 16)), plan.config.input)


def _count(fs, shard, cfg) -> int | str:
    """Rows of a shard, or why it cannot be read."""
    try:
        return count_rows(fs, shard, cfg)
    except InputError as exc:
        return str(exc)


def run_record(plan: Plan) -> dict:
    """What `_manifest/run.json` says about this run: config, fingerprint, model, outputs."""
    from pipeline import __version__

    hidden = plan.model.hidden_size
    return {
        "strata_version": __version__,
        "fingerprint": plan.fingerprint,
        "identity": plan.identity,
        "config": redacted(plan.config),
        # the tokenizer parts AutoTokenizer builds otherwise, by name: their JSON may be megabytes
        "model": {**asdict(plan.model), "tokenizer_overrides": sorted(json.loads(plan.model.tokenizer_overrides))
                  if plan.model.tokenizer_overrides else None},
        "outputs": {o.name: {"layers": list(o.layers), "shape": list(o.vector_shape(hidden)),
                             "per": _unit(o, plan.config)} for o in plan.outputs},
        "plan": {"version": plan.version, "kind": plan.kind, "fragments": None, "rows": None,
                 "carried_fragments": len(plan.carried), "shards": plan.work.num_rows + len(plan.carried_shards),
                 "shards_to_read": plan.work.num_rows, "bytes_to_read": int(pc.sum(plan.work["size"]).as_py() or 0)},
        "lease_generation": plan.lease_generation,  # the next run's lease takes a higher one, whatever lease.json says
        "keep_types": {f.name: str(f.type) for f in plan.keep_schema or []},
        "keep_schema": base64.b64encode(plan.keep_schema.serialize().to_pybytes()).decode()
        if plan.keep_schema is not None else None,
    }


_COMBINED = {"stack": "stacked in this order", "concat": "concatenated in this order", "mean": "averaged",
             "sum": "summed", "weighted": "weighted"}


def describe_outputs(outputs: tuple[ResolvedOutput, ...], config: StrataConfig, model: ModelInfo) -> str:
    """Each output's absolute layers (hidden-state indices) and what one vector is, for `strata
    validate` and a run's first lines: `words: layers [6, 5, 4, 3] of 0..6 concatenated in this
    order, pooling none, words first → [1536] per word`."""
    parts = []
    for o in outputs:
        how = f" {_COMBINED[o.combine]}" if o.pooled_layers > 1 else ""
        pooling = f"pooling {o.pooling}" + (f", words {o.words}" if o.words != "none" else "")
        layers = list(o.layers)
        if o.pooling == "first_last_avg":  # what the vector is made of: hidden states 1 and the deepest chosen
            layers, pooling = [1, o.depth], f"pooling first_last_avg (token-wise mean of 1 and {o.depth})"
        parts.append(f"{o.name}: layers {layers} of 0..{model.num_layers}{how}, {pooling} → "
                     f"{list(o.vector_shape(model.hidden_size))} per {_unit(o, config)}")
    return "; ".join(parts)


def _unit(out: ResolvedOutput, config: StrataConfig) -> str:
    """What one vector of this output stands for."""
    if out.token_level:
        return "token" if out.words == "none" else "word"
    return "window" if config.long_text.window_rows else "document"


def run(config: StrataConfig, console: Console | None = None, if_free: bool = False,
        simulation: Simulation | None = None) -> dict | None:
    """Embed every pending fragment; returns the summary (also saved in run.json). With
    `if_free`, a run that finds another live run on its output returns None instead of failing.
    `simulation` (benchmarks only) puts a simulated device in place of the model."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    resolved = resolve(config)
    location = check_output(config)
    check_writable(location)  # before listing and counting a corpus that may be large
    lease = Lease(location, ttl=config.run.lease_ttl)
    try:
        lease.acquire(note=lambda line: console.print(line, markup=False, highlight=False))
    except OutputBusy as busy:
        if not if_free:
            raise
        console.print(f"strata: skipping this run: {busy}", markup=False, highlight=False)
        return None
    with lease:
        return _run_holding_the_output(config, resolved, lease.fenced(location), console, started, simulation, lease)


def _say(console: Console, line: str) -> None:
    console.print(f"strata: {line}", markup=False, highlight=False)


def _run_holding_the_output(config: StrataConfig, resolved, location: Location, console: Console,
                            started: float, simulation: Simulation | None = None, lease: Lease | None = None) -> dict:
    """The run, once it holds the output; `location` is fenced by its lease (every write and
    removal first checks that this run still holds the output)."""
    manifest = Manifest(location, lease.generation if lease else 0)
    current = versions.read_snapshot(location)
    skipped: list[str] = []
    listing = shard_table(config.input, config.storage, skipped=skipped)
    plan = Plan(config, *resolved, listing, [], skipped)
    if lease is not None:
        plan.lease_token, plan.lease_generation = lease.token, lease.generation
    previous_run = manifest.read_run()
    recorded = current.identity if current and current.identity else (previous_run or {}).get("identity")
    plan.weights_only = bool(recorded) and "model_files_sha256" not in recorded
    plan.keep_schema = _keep_schema(plan, previous_run)
    if config.run.mode == "once":
        manifest.check_settings(run_record(plan), previous_run)
    elif previous_run and previous_run.get("fingerprint") != plan.fingerprint and \
            previous_run.get("plan", {}).get("version", 1) > (current.version if current else 0):
        _say(console, f"abandoning the unfinished version {previous_run['plan']['version']}: it was made with "
                      "other settings")
    gone = _compare_with(plan, current)
    if current and not (plan.work.num_rows or gone or plan.kind == "full"):
        return _nothing_to_do(plan, current, console, started)
    if current and config.run.mode == "once":
        changed = sorted(plan.work["source"].to_pylist() + gone)
        raise InputError(
            f"the input changed since version {current.version} of {config.output.uri} was published: "
            f"{count_of(len(changed), 'shard')} new, edited or deleted ({', '.join(changed[:3])}"
            f"{', ...' if len(changed) > 3 else ''}); `strata run --incremental` embeds only what changed into "
            f"version {current.version + 1}, or embed into a new output.uri")
    if plan.kind == "incremental":
        _diff(plan, current, gone, console)
    run_info = run_record(plan)
    manifest.begin(run_info, previous_run)
    manifest.clear_failures()  # this run retries them
    if plan.skipped:
        names = ", ".join(plan.skipped[:5]) + (", ..." if len(plan.skipped) > 5 else "")
        _say(console, f"ignoring {len(plan.skipped)} files that are not corpus files ({names})")
    for failure in plan.bad_shards:
        manifest.fail(failure)
        _say(console, f"skipping shard {failure.source}: {failure.reason}")
    own = _clean_up(plan, manifest, console)
    todo = to_read(plan.work, own)
    _say(console, "outputs: " + describe_outputs(plan.outputs, config, plan.model))
    _say(console, _plan_line(plan, current, own, todo))
    this_run: list[CommitRecord] = []
    failed: list[FailureRecord] = list(plan.bad_shards)
    if todo.num_rows:
        this_run, failed_fragments = _execute(plan, todo, own, manifest, console, simulation)
        failed += failed_fragments
    elif not plan.bad_shards:
        _say(console, "nothing to embed, every fragment is committed")
    mine = {r.fragment: r for r in own + this_run}
    open_shards = unfinished(plan.work, list(mine.values()))
    records = plan.carried + list(mine.values())
    summary = summarize(plan, records, this_run, failed, time.monotonic() - started, complete=not open_shards)
    lost = _lost_files(manifest, records, plan) if not failed and not open_shards else []
    if not failed and not open_shards and not lost:
        if lease is not None:
            lease.check(renew=True)  # publish only what this run can prove it still holds
        versions.publish(location, _snapshot(plan, records))
        summary["published"] = True
        _say(console, f"published version {plan.version} of {config.output.uri}")
    elif not failed and not lost:  # records vanished under the run: say so rather than publish less
        _say(console, f"version {plan.version} is not published: {count_of(len(open_shards), 'shard')} "
                      f"({open_shards[0]}{', ...' if len(open_shards) > 1 else ''}) lack committed fragments; "
                      "rerun to finish it")
    run_info["plan"].update(fragments=len(records) if not open_shards else None,
                            rows=sum(r.rows for r in records) if not open_shards else None)
    manifest.write_run({**run_info, "summary": summary})
    console.print(summary_table(summary))
    hint = truncation_hint(summary, plan.model.max_length)
    if hint:
        _say(console, hint)
    if lost:
        redo = [r for r in records if r.version == plan.version and set(_files_of(r)) & set(lost)]
        manifest.remove_fragments(redo)
        raise RunFailed(f"version {plan.version} is not published: {count_of(len(lost), 'file')} it lists "
                        f"{'is' if len(lost) == 1 else 'are'} gone from the output ({', '.join(lost[:2])}"
                        f"{', ...' if len(lost) > 2 else ''}), removed by hand or by another process since they were "
                        "written; rerun the same command "
                        f"to embed {'its fragment' if len(redo) == 1 else f'those {len(redo)} fragments'} again")
    _check_failures(failed, config.output.uri)
    _check_error_budget(summary, config.run.max_error_rate)
    return summary


def _files_of(record: CommitRecord) -> list[str]:
    """Every file of a committed fragment: its commit record, data, quarantine and hash index files."""
    return [f"{FRAGMENTS_DIR}/{record.fragment}.json", *record.files, hash_file_of(record),
            *([record.quarantine_file] if record.quarantine_file else [])]


def _lost_files(manifest: Manifest, records: list[CommitRecord], plan: Plan | None = None) -> list[str]:
    """The files of a version about to be published that are not in the output (a folder deleted
    or changed by hand under the run): one listing per folder, not a request per file. With the
    plan, also removes the superseded files of this version's fragments (`superseded`)."""
    location = manifest.location
    present = set()
    for folder in ("data", "quarantine", FRAGMENTS_DIR, HASHES_DIR):
        present.update(location.find(folder))
    if plan is not None:
        for path in superseded(present, [r for r in records if r.version == plan.version], plan.lease_generation):
            location.remove(path)
    return sorted(path for record in records for path in _files_of(record) if path not in present)


_FILE_OF = re.compile(r"^(?P<fragment>.+?)(?:-g(?P<generation>\d+))?(?:-[0-9a-f]{8})?\.parquet$")


def superseded(present: set[str], records: list[CommitRecord], generation: int) -> list[str]:
    """Files an older lease generation wrote for fragments that this version's records now hold
    with other files: a fragment recomputed after its commit record was lost (removed by hand), or
    written late by a run that had lost the output. Their names prove strata wrote them (a
    fragment id of this version, whose salt no other version shares, and an older generation),
    and no version lists them: without removing them, `data/` read alone would hold those
    documents twice."""
    owned = {r.fragment: set(_files_of(r)) for r in records}
    stale = []
    for path in present:
        match = _FILE_OF.match(posixpath.basename(path))
        if not match or match["fragment"] not in owned or path in owned[match["fragment"]]:
            continue
        if int(match["generation"] or 0) < generation and path.split("/", 1)[0] in ("data", "quarantine", "_manifest"):
            stale.append(path)
    return sorted(stale)


def _compare_with(plan: Plan, current: versions.Snapshot | None) -> list[str]:
    """Sets the plan's version, kind, carried fragments and work (the shards to embed: new or
    changed; all of them without a comparable version) against the current version; returns the
    sources of the current version that are gone from the input."""
    if current is None:
        return []
    plan.version = current.version + 1
    if current.fingerprint != plan.fingerprint:
        plan.kind = "full"
        changes = identity_changes(current.identity, plan.identity)[:3]
        plan.reason = "the settings changed: " + ("; ".join(changes) or f"fingerprint {current.fingerprint}")
        return []
    plan.kind = "incremental"
    held = pa.table({"source": pa.array(list(current.shards), pa.string()),
                     "held": pa.array(list(current.shards.values()), pa.string())})
    listed = plan.work.select(["source", "version"]).join(held, "source", join_type="left outer")
    same = pc.and_(pc.not_equal(listed["version"], ""),
                   pc.fill_null(pc.equal(listed["version"], listed["held"]), False))
    unchanged = pa.array(sorted(listed["source"].filter(same).to_pylist()), pa.string())
    plan.carried_shards = {source: current.shards[source] for source in unchanged.to_pylist()}
    plan.carried = [r for r in current.fragments if r.source in plan.carried_shards]
    plan.work = plan.work.filter(pc.invert(pc.is_in(plan.work["source"], unchanged)))
    return sorted(set(current.shards) - set(listed["source"].to_pylist()))


def _diff(plan: Plan, current: versions.Snapshot, gone: list[str], console: Console) -> None:
    """Diff every new, changed or deleted shard against the current version (Ray tasks, one per
    shard); a shard that cannot be compared leaves the work with its failure."""
    from pipeline import ray_pipeline

    old, hashes = {}, {}
    for record in current.fragments:
        old.setdefault(record.source, []).append(record.fragment)
        hashes.setdefault(record.source, []).append(hash_file_of(record))
    folder = versions.changes_dir(plan.version)
    tasks = [DiffTask(source, shard, tuple(old.get(source, ())), f"{folder}/{changes_name(source)}",
                      tuple(hashes.get(source, ())))
             for source, shard in [(s.source, s) for s in shards_of(plan.work)] + [(source, None) for source in gone]]
    totals = {kind: 0 for kind in KINDS}
    plan.changes = totals
    if not tasks:
        return
    ray_pipeline.ensure_ray()
    _say(console, f"comparing {count_of(len(tasks), 'shard')} with version {current.version}")
    failed = []
    for result in ray_pipeline.run_diffs(tasks, _job(plan)):
        if result["error"]:
            plan.bad_shards.append(FailureRecord(shard_failure_id(result["source"]), result["source"],
                                                 result["error"], None))
            failed.append(result["source"])
            continue
        for kind in KINDS:
            totals[kind] += result[kind]
    plan.work = plan.work.filter(pc.invert(pc.is_in(plan.work["source"], pa.array(failed, pa.string()))))


def _clean_up(plan: Plan, manifest: Manifest, console: Console) -> list[CommitRecord]:
    """Remove what an interrupted run left: files without a commit record, and committed fragments
    that neither this plan nor any published version holds (an abandoned unfinished version's, or
    a shard's that changed again before its version was published). Returns this plan's
    fragments that earlier runs committed."""
    removed = manifest.remove_unfinished()
    if removed:
        _say(console, f"removed {count_of(len(removed), 'file')} an interrupted run left without a commit record")
    read_one_by_one: list[CommitRecord] = []
    records = manifest.records(unindexed=read_one_by_one)
    own = own_records(plan.work, plan.salt, records)
    listed = {r.fragment for r in own}
    for snapshot in versions.all_snapshots(manifest.location):
        listed |= {r.fragment for r in snapshot.fragments}
    unreadable = {failure.source for failure in plan.bad_shards}  # may read fine tomorrow: keep their work
    abandoned = [r for r in records if r.fragment not in listed and r.source not in unreadable]
    if abandoned:
        manifest.remove_fragments(abandoned)
        _say(console, f"removed {count_of(len(abandoned), 'fragment')} of an unfinished version that no longer "
                      "matches the input or settings")
    gone = {r.fragment for r in abandoned}
    manifest.fold([r for r in read_one_by_one if r.fragment not in gone])
    return own


def _plan_line(plan: Plan, current: versions.Snapshot | None, own: list[CommitRecord], todo: pa.Table) -> str:
    shards = plan.work.num_rows + len(plan.carried_shards)
    line = (f"version {plan.version}: {count_of(shards, 'shard')}; "
            + (f"{count_of(len(plan.carried), 'fragment')} carried from version {current.version}, "
               if plan.carried else "")
            + (f"{count_of(len(own), 'fragment')} already committed, " if own else "")
            + f"{count_of(todo.num_rows, 'shard')} ({byte_size(int(pc.sum(todo['size']).as_py() or 0))}) to read")
    if plan.kind == "full":
        line += f"; embedding every document again: {plan.reason}"
    elif plan.changes is not None:
        c = plan.changes
        line += (f"; since version {current.version}: {c['added']:,} added, {c['changed']:,} changed, "
                 f"{c['deleted']:,} deleted, {c['unchanged']:,} unchanged in changed shards")
    return line


def _nothing_to_do(plan: Plan, current: versions.Snapshot, console: Console, started: float) -> dict:
    _say(console, f"version {current.version} is current: no shard changed since it was published; nothing to do")
    plan.version, plan.carried = current.version, current.fragments
    summary = summarize(plan, current.fragments, [], [], time.monotonic() - started, complete=True)
    summary.update(added=0, changed=0, deleted=0, carried=summary["docs"])
    console.print(summary_table(summary))
    return summary


def _snapshot(plan: Plan, records: list[CommitRecord]) -> versions.Snapshot:
    own = [r for r in records if r.version == plan.version]
    docs = sum(r.docs for r in records)
    embedded = sum(r.embedded for r in own)
    if plan.changes is not None:
        changes = {"added": plan.changes["added"], "changed": plan.changes["changed"],
                   "deleted": plan.changes["deleted"]}
    else:
        changes = {"added": docs, "changed": 0, "deleted": 0}
    counts = {"docs": docs, "embedded": embedded, **changes, "carried": docs - embedded,
              **{key: sum(getattr(r, key) for r in records) for key in ("quarantined", "blank", "rows", "tokens")}}
    return versions.Snapshot(plan.version, plan.fingerprint, plan.kind, counts, plan.shard_versions(),
                             sorted(records, key=lambda r: r.fragment), reason=plan.reason, identity=plan.identity,
                             lease_generation=plan.lease_generation)


def _job(plan: Plan, cpu_threads: int | None = None, simulation: Simulation | None = None) -> JobSpec:
    """What the workers need to know about this run, resolved here on the driver."""
    long_text = plan.config.long_text
    settings = EmbedSettings(plan.model, plan.outputs, plan.config.model.dtype, plan.config.batching.token_budget,
                             plan.config.output.precision, cpu_threads, window_rows=long_text.window_rows,
                             simulation=simulation)
    metadata = file_metadata(plan.model.name, plan.model.weights_sha256,
                             {o.name: list(o.layers) for o in plan.outputs}, plan.fingerprint)
    return JobSpec(plan.config.input, settings, plan.config.output.uri, plan.config.output.partition_by, metadata,
                   stride=long_text.window_stride, storage=plan.config.storage, version=plan.version,
                   changes_dir=versions.changes_dir(plan.version) if plan.changes is not None else None,
                   keep_schema=plan.keep_schema, fragment_docs=plan.config.batching.fragment_docs, salt=plan.salt,
                   lease_token=plan.lease_token, lease_generation=plan.lease_generation)


def _execute(plan: Plan, todo: pa.Table, own: list[CommitRecord], manifest: Manifest,
             console: Console, simulation: Simulation | None = None) -> tuple[list[CommitRecord], list[FailureRecord]]:
    from pipeline import ray_pipeline
    from pipeline.metrics import RunMetrics

    ray_pipeline.ensure_ray()
    available = ray_pipeline.cluster_resources()
    resources = ray_pipeline.plan_resources(plan.config.compute, available, simulation)
    waiting = ""
    if resources.gpus_per_replica and not available.get("GPU"):
        waiting = " (no GPU in the cluster yet: waiting for the autoscaler to add GPU nodes)"
    console.print(f"strata: {resources.describe()}{waiting}", markup=False, highlight=False)
    job = _job(plan, resources.cpu_threads, simulation)
    records: list[CommitRecord] = []
    failures: list[FailureRecord] = []
    unfolded: list[CommitRecord] = []
    remaining = todo
    todo_bytes = int(pc.sum(todo["size"]).as_py() or 0)
    metrics = RunMetrics(plan.config.output.uri, todo_bytes)
    nodes = ray_pipeline.alive_nodes()
    resumed_at, stalled = -1, 0  # this run's commits at the last resume after a lost worker; resumes since without one
    with RunProgress(console, todo_bytes, todo.num_rows) as progress:
        while remaining.num_rows:
            try:
                for record, shard_size in ray_pipeline.run_shards(remaining, job, resources):
                    manifest.location.guard()  # a run that lost its lease stops at once
                    metrics.record(record, shard_size)
                    if isinstance(record, FailureRecord):
                        failures.append(record)
                        what = f"fragment {record.fragment}" if record.rows is not None else f"shard {record.source}"
                        console.print(f"strata: {what} failed: {record.reason}", markup=False, highlight=False)
                        continue
                    records.append(record)
                    unfolded.append(record)
                    progress.update(record, shard_size)
                    if len(unfolded) >= INDEX_EVERY:
                        manifest.fold(unfolded)
                        unfolded = []
                    faults.maybe_kill("run", len(records))
                    errors.raise_if_stopped()  # a Ctrl-C or SIGTERM that a library swallowed where it landed
                remaining = remaining.slice(0, 0)
            except ray_pipeline.StepCannotStart as exc:
                raise RunFailed(f"{exc}; nothing more can be embedded until that is fixed (committed fragments are "
                                "kept: rerun once it is)") from None
            except ray_pipeline.RayError as exc:
                # a lost worker or node: go on with what is not committed, unless passes keep
                # ending that way without a commit (then the cause is not passing: the run stops)
                stalled = stalled + 1 if len(records) == resumed_at else 0
                lost = ray_pipeline.lost_worker(exc) and stalled < MAX_STALLED_RESUMES
                resumed_at = len(records)
                remaining = _after_worker_deaths(plan, manifest, remaining, own + records, failures, exc, console,
                                                 lost_nodes(nodes, ray_pipeline.alive_nodes()) if lost else None)
    gone = lost_nodes(nodes, ray_pipeline.alive_nodes())  # Ray marks a node dead seconds after it goes
    if gone:
        console.print(f"strata: {gone} left the cluster during the run", markup=False, highlight=False)
    manifest.fold(unfolded)
    manifest.clear_attempts()
    return records, failures


def lost_nodes(before: dict[str, str], now: dict[str, str]) -> str:
    """The nodes alive at the start and gone now, for a message: `node 10.0.0.7 (3f2a9c1e)`; "" if none
    (`before`, `now`: node id → address, as `ray_pipeline.alive_nodes` gives them)."""
    gone = sorted((address, node) for node, address in before.items() if node not in now)
    return ", ".join(f"node {address} ({node[:8]})" for address, node in gone)


def _after_worker_deaths(plan: Plan, manifest: Manifest, remaining: pa.Table, done: list[CommitRecord],
                         failures: list[FailureRecord], exc: Exception, console: Console,
                         lost: str | None = None) -> pa.Table:
    """Ray gave up on a worker that kept dying. A fragment that started a step (tokenize, embed,
    write) more often than Ray retries is what kills it: record it as failed (its shard stays
    unfinished, the rest of the shard is still read); a shard whose read started that often
    becomes a shard failure and is not read again this run. Then go on. Without such a fragment,
    a worker or node that went away (`lost` is not None: "" or the nodes gone) costs only the
    fragments it held: say so, and go on with everything not committed. Anything else stops the
    run. Returns the shards still to read, with what to skip."""
    from pipeline.ray_pipeline import ACTOR_RETRIES

    cause = root_cause(exc)
    committed = manifest.committed()
    known = {f.fragment for f in failures}
    started = {fid: seen for fid, seen in manifest.attempts().items() if fid not in committed and fid not in known}
    poisoned = {fid: seen for fid, seen in started.items() if seen[1] > ACTOR_RETRIES}
    if not poisoned and lost is not None:
        redo = sorted(started)
        shown = ", ".join(redo[:5]) + (f" and {len(redo) - 5} more" if len(redo) > 5 else "")
        console.print(f"strata: lost {lost or 'a worker'} ({cause}); {len(done)} committed fragments are kept, "
                      f"{len(redo)} started and not committed are done again{': ' + shown if redo else ''}",
                      markup=False, highlight=False)
    elif not poisoned:
        raise RunFailed(f"the run stopped after {len(done)} fragments: {cause}; committed fragments are kept, "
                        "rerun the same command to resume")
    skip: dict[str, set[int]] = {}
    unread: set[str] = set()
    for fragment, (step, times) in sorted(poisoned.items()):
        where = manifest.attempt(fragment)
        source, start, rows = str(where.get("source", "?")), where.get("start"), where.get("rows")
        doing = {"read": "reading", "tokenize": "tokenizing", "embed": "embedding", "write": "writing"}[step]
        reason = (f"its worker process died {times} times while {doing} it (killed for memory, or a crash in "
                  f"native code): {cause}")
        if step == "read":  # the shard's rest cannot be read: a shard failure, the other shards go on
            failure = FailureRecord(fragment, source, reason, None)
            unread.add(source)
        else:
            failure = FailureRecord(fragment, source, reason, int(rows or 0))
            if isinstance(start, int):
                skip.setdefault(source, set()).add(start)
        manifest.fail(failure)
        failures.append(failure)
        what = f"shard {source}" if step == "read" else f"fragment {fragment}"
        console.print(f"strata: {what} failed: {failure.reason}", markup=False, highlight=False)
    if unread:
        remaining = remaining.filter(pc.invert(pc.is_in(remaining["source"], pa.array(sorted(unread), pa.string()))))
    landed = {r.fragment for r in done}
    mine = done + own_records(plan.work, plan.salt, manifest.records(committed - landed))
    return to_read(remaining.drop_columns(["skip"]), mine, skip)  # its shard stays unfinished: not published


def summarize(plan: Plan, records: list[CommitRecord], this_run: list[CommitRecord], failed: list[FailureRecord],
              wall: float, complete: bool = False) -> dict:
    """Totals of the version as far as it is done (`records`: its committed and carried fragments),
    and what this run did. The number of fragments is known once every shard is read (`complete`)."""
    run_tokens = sum(r.embedded_tokens for r in this_run)
    run_docs = sum(r.embedded for r in this_run)
    padded = sum(r.padded_tokens for r in this_run)
    changes = plan.changes or {}
    return {
        "version": plan.version,
        "published": False,
        "fragments": f"{len(records)} / {len(records) if complete else '?'}",
        "docs": sum(r.docs for r in records),
        "quarantined": sum(r.quarantined for r in records),
        "blank": sum(r.blank for r in records),
        "tokens": sum(r.tokens for r in records),
        "truncated": sum(r.truncated for r in records),
        "added": changes.get("added"),
        "changed": changes.get("changed"),
        "deleted": changes.get("deleted"),
        "carried": (sum(r.carried for r in records if r.version == plan.version) + sum(r.docs for r in plan.carried)
                    if plan.changes is not None else None),
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


TRUNCATION_HINT_SHARE = 0.01  # more than 1 % of the documents cut: say how to keep them whole


def truncation_hint(summary: dict, max_length: int) -> str | None:
    """The end-of-run line when more than 1 % of the version's documents were cut at max_length."""
    cut, docs = summary.get("truncated") or 0, summary.get("docs") or 0
    if not docs or cut <= TRUNCATION_HINT_SHARE * docs:
        return None
    return (f"{cut:,} {'document was' if cut == 1 else 'documents were'} cut at {max_length} tokens ({cut / docs:.0%} "
            "of the version); long_text.strategy: sliding_window keeps them whole")


def _check_failures(failed: list[FailureRecord], output_uri: str) -> None:
    if failed:
        fragments = sum(1 for f in failed if f.rows is not None)
        shards = len(failed) - fragments
        raise RunFailed(
            f"{count_of(fragments, 'fragment')} and {count_of(shards, 'shard')} could not be embedded ({failed[0].source}: "
            f"{failed[0].reason}); all reasons: strata status {output_uri}; committed work is kept and "
            "rerunning retries the failed parts"
        )


def _check_error_budget(summary: dict, max_error_rate: float) -> None:
    seen = summary["docs"] + summary["quarantined"]
    if seen and summary["quarantined"] / seen > max_error_rate:
        raise RunFailed(
            f"{summary['quarantined']} of {seen} documents were quarantined "
            f"({summary['quarantined'] / seen:.2%} > run.max_error_rate {max_error_rate:.2%}); "
            "see the reasons in OUTPUT/quarantine/"
        )

